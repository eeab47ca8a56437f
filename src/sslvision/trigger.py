"""The metric-degradation trigger: which stage failed first, what joins the data, what re-runs.

``drift_eval`` reports every monitored metric with its threshold and the stage that owns it
(``trigger.json``). The decision is the EARLIEST stage, in the pipeline's DAG order, that owns a failed
metric: re-running from there fixes every later failure too, and nothing upstream of it is touched.
The mapping (DESIGN.md):

- production images drift (embedding two-sample test fails)   -> ``pretrain`` (the batch joins the SSL pool)
- a labeled batch is noisier (its estimated noise rate rises)  -> ``audit``
- a rare class's recall falls with no input drift              -> ``synthesize``
- accuracy falls with no other cause                           -> ``finetune``
- the class mix changed and nothing else (label shift)         -> action ``prior_correction``: no stage
  re-runs; the champion's logits are corrected for the estimated prior (``sslvision.actions.correct_prior``), registered
  as a new version and gated at that class mix
- nothing failed                                               -> nothing re-runs

``drift_eval`` tests every other metric *given* the estimated class prior, so a new class mix alone fails
only ``class_prior_shift_pvalue`` (owned by ``prior_correction``); any stage's failure wins over it.

What a re-run starts from must differ from what the last run saw, or it would reproduce the same model:
so the batch that caused the decision joins the data first, and only when the re-run will happen (the
monitor never admits a batch with ``--no-retrain``). An unlabeled batch joins the SSL pool only when its
images drifted (in-distribution images add nothing to SSL); a labeled batch joins any retrain, as labeled
data (the pool batch keeps its class directories). Images identical to the held-out test split never
join (``batches.held_out_files``): pretraining on them would leak the test set. Both land under ``ingest.pool``, which
the ingest stage reads; DVC then re-runs exactly what the new data invalidates, and ``from_stage``
forces the chosen stage and everything downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sslvision import io
from sslvision.stages import STAGES

log = logging.getLogger(__name__)

STAGE_ORDER = list(STAGES)
PRIOR_CORRECTION = "prior_correction"  # an action, not a stage: the champion's prior is corrected
RETRAIN = "retrain"


@dataclass
class Decision:
    """The trigger's verdict for one batch: ``action`` is ``"retrain"`` (from ``stage``), ``"prior_correction"``
    (``stage`` None: the class mix changed and nothing else) or None (healthy); ``degraded``: a retrain."""

    stage: str | None
    reasons: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch: str | None = None
    action: str | None = None

    @property
    def degraded(self) -> bool:
        return self.stage is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"degraded": self.degraded}


def _describe(name: str, m: dict[str, Any]) -> str:
    op = "<" if m.get("direction", "max") == "max" else ">"
    value, threshold = m.get("value"), m.get("threshold")
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
    return f"{name} = {shown} {op} threshold {threshold} (owned by {m.get('stage')})"


def decide(metrics: dict[str, dict[str, Any]], order: list[str] | None = None, batch: str | None = None) -> Decision:
    """Earliest stage owning a failed metric (action ``retrain``); with only ``prior_correction`` metrics
    failed, no stage and action ``prior_correction``.

    ``metrics``: ``{name: {"value", "threshold", "direction": "max"|"min", "stage", "failed"}}`` as in
    ``trigger.json``. ``failed`` is recomputed from value/threshold/direction when absent. A metric that
    names a stage outside ``order`` (and is not ``prior_correction``) is an error: a typo must not
    silently disable a rule.
    """
    order = order or STAGE_ORDER
    failed: dict[str, dict[str, Any]] = {}
    for name, m in metrics.items():
        stage = m.get("stage")
        if stage not in order and stage != PRIOR_CORRECTION:
            raise ValueError(f"trigger metric {name!r} names stage {stage!r}, not one of {order} or "
                             f"{PRIOR_CORRECTION!r}")
        is_failed = m.get("failed")
        if is_failed is None:
            value, threshold = m.get("value"), m.get("threshold")
            if value is None or threshold is None:
                continue
            is_failed = value < threshold if m.get("direction", "max") == "max" else value > threshold
        if is_failed:
            failed[name] = m
    if not failed:
        return Decision(stage=None, reasons=["every monitored metric is within its threshold"], batch=batch)
    rank = {s: i for i, s in enumerate([*order, PRIOR_CORRECTION])}
    reasons = [_describe(n, m) for n, m in sorted(failed.items(), key=lambda kv: rank[kv[1]["stage"]])]
    stages = [m["stage"] for m in failed.values() if m["stage"] != PRIOR_CORRECTION]
    if not stages:
        reasons.append("the class mix changed and nothing else did (every other test allows for the estimated "
                       "prior): correct the champion's prior, no retraining")
        return Decision(stage=None, reasons=reasons, failed=failed, batch=batch, action=PRIOR_CORRECTION)
    return Decision(stage=min(stages, key=order.index), reasons=reasons, failed=failed, batch=batch, action=RETRAIN)


def is_labeled_batch(batch_dir: str | Path) -> bool:
    """A batch directory with class subdirectories carries labels (ImageFolder layout)."""
    return any(p.is_dir() and not p.is_symlink() for p in Path(batch_dir).iterdir())


@dataclass
class Admission:
    """What admitting a batch to the pool did: where it went (None when no file qualified), the files
    copied and the files left out, each with why (paths relative to the batch)."""

    dest: Path | None
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _copy_verified(src: Path, dst: Path, sha256: str) -> str | None:
    """Copy ``src`` (a regular file, never a link) to ``dst`` when its bytes still hash to ``sha256``;
    return why not otherwise. What is hashed is what is written, so no later change slips in."""
    fh = io.open_regular_file(src)
    if fh is None:
        return "no longer a regular file"
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with fh, open(dst, "wb") as out:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        dst.unlink()
        return "changed since it was evaluated"
    return None


def admit_batch(batch_dir: str | Path, decision: Decision, pool: str | Path,
                evaluated: Mapping[str, str], held_out: Mapping[str, str] | None = None) -> Admission | None:
    """Copy the evaluated files of the batch into the pool when the decision says it should join; None
    when it does not join.

    ``evaluated``: ``{path relative to the batch: sha256}`` of the files drift_eval decoded
    (``batches.read_batch_files``). Only those join, and only with the bytes that were evaluated: a file
    that appeared, changed or vanished after the evaluation (a batch still being written) is left out,
    as is every symbolic link (never followed: a link can point anywhere, and what it points to would
    become pool data and reach the reports) and anything that is not a regular file. Each file left out
    is in ``Admission.skipped`` with the reason, and logged. ``held_out``: ``{path: why}`` of files that
    must never join (identical to a held-out test image: ``batches.held_out_files``).

    The copy is made next to its destination and renamed into place, so an interrupted admission leaves
    no half batch in the pool; admitting the same batch twice is a no-op (nothing copied).
    """
    batch_dir, pool = Path(batch_dir), Path(pool)
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"{batch_dir}: production batch directory not found")
    labeled = is_labeled_batch(batch_dir)
    joins = decision.degraded and (labeled or decision.stage == "pretrain")
    if not joins:
        return None
    dest = pool / batch_dir.name
    if dest.exists():
        return Admission(dest)
    found: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for root, dirs, names in os.walk(batch_dir):  # does not descend into linked directories
        here = Path(root)
        for name in dirs + names:
            path = here / name
            rel = path.relative_to(batch_dir).as_posix()
            if path.is_symlink():
                skipped[rel] = "symbolic link (never followed)"
            elif name in names:
                found[rel] = path
    admission = Admission(None, skipped=skipped)
    pool.mkdir(parents=True, exist_ok=True)
    tmp = pool / f".{batch_dir.name}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in sorted(found.keys() | evaluated.keys()):
            if held_out and rel in held_out:
                why = held_out[rel]
            elif rel not in evaluated:
                why = "not evaluated (not an image drift_eval decoded, or added after it read the batch)"
            elif rel not in found:
                why = skipped.pop(rel, None) or "gone since it was evaluated"
            else:
                why = _copy_verified(found[rel], tmp / rel, evaluated[rel])
            if why:
                admission.skipped[rel] = why
            else:
                admission.files.append(rel)
        if admission.files:
            tmp.rename(dest)
            admission.dest = dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for rel, why in sorted(admission.skipped.items()):
        log.warning("%s: %s not admitted to the pool: %s", batch_dir, rel, why)
    return admission


def read_trigger(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``metrics`` mapping of a ``trigger.json`` written by drift_eval."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trigger report; run drift_eval on the batch first")
    data = json.loads(path.read_text())
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a 'metrics' mapping of monitored metrics")
    return metrics
