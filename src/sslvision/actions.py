"""The trigger's actions that change the model registry: the ``prior_correction`` action.

:func:`sslvision.trigger.decide` says what a batch calls for; when it is ``prior_correction`` (the class mix
changed and nothing else did), :func:`correct_prior` applies the estimated prior to the champion's logits,
registers the result as a new version and gates it at that mix. No stage re-runs and the network's weights
stay as they are. The monitor flow calls it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sslvision import registry, tracking
from sslvision.drift import resample_to_prior
from sslvision.finetune import MAX_PRIOR_ADJUSTMENT, load_classifier, save_classifier
from sslvision.registry import finetune_params as load_params
from sslvision.registry import golden_set
from sslvision.trigger import PRIOR_CORRECTION

log = logging.getLogger(__name__)


def prior_correction_thresholds(promotion: Any, champion_metrics: dict[str, float] | None) -> dict[str, Any]:
    """The gate of a prior-corrected version, on the golden set drawn at the estimated class mix: accuracy at
    that mix no worse than the champion's by more than ``min_improvement`` (the golden set's resolution),
    calibration within ``max_ece``, balanced accuracy above the absolute floor ``min_balanced_accuracy``.
    Balanced accuracy is not required to rise: a prior correction trades recall between classes for
    accuracy at the production mix, which is its point."""
    from mlflow.models import MetricThreshold

    out = {"balanced_accuracy": MetricThreshold(threshold=promotion.min_balanced_accuracy, greater_is_better=True),
           "ece": MetricThreshold(threshold=promotion.max_ece, greater_is_better=False)}
    if champion_metrics is not None:
        out["accuracy"] = MetricThreshold(threshold=champion_metrics["accuracy/score"] - promotion.min_improvement,
                                          greater_is_better=True)
    return out


def correct_prior(result: Mapping[str, Any], params: str | Path, batch: str) -> dict[str, Any]:
    """The ``prior_correction`` action: the scored classifier (``result["model"]``: the champion, or the file
    scored before there was one) with drift_eval's estimated class prior applied to its logits
    (``result["class_prior"]["adjustment"]``, added to any correction it already carries), registered as a
    new version (challenger) and gated at the estimated mix (:func:`prior_correction_thresholds`, golden set:
    the test split re-sampled to that prior). The network and its weights stay as they are.

    ``result``: drift_eval's result for ``batch`` (its ``model`` and ``class_prior``); ``params``: the params
    file (its ``finetune`` section). Returns the new version, its base, the prior and adjustment per class,
    the golden set's size and the gate's decision. Raises ValueError when ``finetune.registry.enabled`` is
    false (a correction is registered and gated like any model)."""
    import mlflow

    p = load_params(params)
    if not p.registry.enabled:
        raise ValueError(f"{params}: finetune.registry.enabled is false: a prior correction is registered and "
                         "gated like any model; enable the registry or retrain")
    model, prior_info = result["model"], result["class_prior"]
    classes = list(prior_info["estimate"])
    prior = np.asarray([prior_info["estimate"][c] for c in classes], dtype=float)
    prior /= prior.sum()
    step = np.asarray([prior_info["adjustment"][c] for c in classes], dtype=float)
    name = p.registry.model_name
    tracking.setup()
    if model.get("source") == "registry":
        classifier, base = registry.load_champion_classifier(name)
    else:
        classifier, base = load_classifier(model["path"]), model.get("path")
    before = np.asarray(classifier.prior_correction["adjustment"]) if classifier.prior_correction else 0.0
    total = np.clip(before + step - np.mean(before + step), -MAX_PRIOR_ADJUSTMENT, MAX_PRIOR_ADJUSTMENT)
    classifier.prior_correction = {"adjustment": [round(float(v), 6) for v in total],
                                   "prior": [float(v) for v in prior], "method": prior_info["method"],
                                   "batch": batch, "base": str(base)}
    images, labels = golden_set(p)
    rows = resample_to_prior(labels, prior, len(labels), seed=0)
    with tracking.stage_run(PRIOR_CORRECTION, {"batch": batch, "base": str(base), "model_name": name}), \
            tempfile.TemporaryDirectory(prefix="sslvision-prior-") as tmp:
        save_classifier(Path(tmp) / "classifier", classifier)
        version = registry.log_and_register(Path(tmp) / "classifier", name, images[rows[:3]])
        mlflow.set_tags({"sslvision.action": PRIOR_CORRECTION, "sslvision.batch": batch,
                         "sslvision.prior_correction.base": str(base)})
        mlflow.MlflowClient().set_model_version_tag(name, version, "sslvision.prior_correction",
                                                    f"base {base}, batch {batch}")
        decision = registry.promote(name, images[rows], labels[rows], p.promotion,
                                    limits_for=prior_correction_thresholds)
        mlflow.set_tag("sslvision.decision", decision["decision"])
    log.info("prior correction of %s (base %s) registered as version %s: %s", name, base, version,
             decision["decision"])
    return {"version": version, "base": str(base), "prior": dict(zip(classes, classifier.prior_correction["prior"],
                                                                      strict=True)),
            "adjustment": dict(zip(classes, classifier.prior_correction["adjustment"], strict=True)),
            "golden_size": int(len(rows)), "promotion": decision}
