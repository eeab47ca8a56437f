"""DVC stage ``synthesize``: new images for the rare classes of ``data/audit/manifest_clean.parquet``,
made from their real images (``data/ingested/images.npy``) with the generator named in params.yaml and
filtered in the SSL space of ``models/encoder``; writes ``data/synthetic/`` (images + manifest) and
``reports/synthesize/`` (metrics, per-class counts, filter scores, sample grid); one MLflow run.

Run from the project root (``dvc repro synthesize``). This module reads the files, writes the outputs,
the plots and the MLflow run; planning, generating, filtering and scoring run on arrays in
:mod:`sslvision.synthesize`. ``sslvision synthesize`` calls :func:`synthesize_cli`.

Outputs (contract in :mod:`sslvision.data`): ``data/synthetic/images.npy`` + ``manifest.parquet``
(kept images only); ``reports/synthesize/``: ``metrics.json``, ``per_class.csv`` (DVC bar plot),
``filter_scores.csv`` (every candidate's filter scores, DVC scatter plot), ``grid.png`` (a row per
class: real examples, then kept synthetic images).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sslvision import io
from sslvision.data import Ingested, load_embeddings
from sslvision.params import load_section, params_path, require_sections
from sslvision.stages import check_code_version
from sslvision.synthesize import RealSet, Synthesis, SynthesizeParams, load_pretrain_decoder, synthesize

REPORTS = Path("reports/synthesize")
OUT = Path("data/synthetic")
MANIFEST = Path("data/audit/manifest_clean.parquet")
INGESTED = Path("data/ingested")
ENCODER = Path("models/encoder")
EMBEDDINGS = Path("data/embeddings")


def load_real(manifest: str | os.PathLike, ingested: str | os.PathLike,
              embeddings: str | os.PathLike) -> RealSet:
    """Clean labeled ``train`` rows of ``manifest`` (the audit's ``manifest_clean.parquet``)."""
    ing = Ingested.load(ingested, manifest=manifest)
    df = ing.manifest
    missing = {"index", "id", "split", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{manifest}: missing columns {sorted(missing)}")
    rows = df[(df["split"] == "train") & (df["label"] >= 0)].sort_values("index")
    if rows.empty:
        raise ValueError(f"{manifest}: no labeled train rows to synthesise from")
    emb = load_embeddings(embeddings)
    if len(emb) != len(ing.images):
        raise ValueError(f"{Path(embeddings) / 'embeddings.npy'}: {len(emb)} rows but "
                         f"{Path(ingested) / 'images.npy'} has {len(ing.images)}; re-run pretrain")
    bad = rows["label"] >= len(ing.classes)
    if bad.any():
        raise ValueError(f"{manifest}: label {int(rows.loc[bad, 'label'].iloc[0])} outside the "
                         f"{len(ing.classes)} classes of classes.json")
    idx = rows["index"].to_numpy()
    # the decoders' images: every ingested train image, from the raw manifest (Ingested.load checked it exists)
    everything = pd.read_parquet(Path(ingested) / "manifest.parquet", columns=["index", "split"])
    fit = np.sort(everything.loc[everything["split"] == "train", "index"].to_numpy())
    return RealSet(images=np.asarray(ing.images[idx]), labels=rows["label"].to_numpy().astype(np.int64),
                   ids=rows["id"].astype(str).to_numpy(), embeddings=np.asarray(emb[idx], dtype=np.float32),
                   classes=list(ing.classes), fit_images=np.asarray(ing.images[fit]),
                   fit_embeddings=np.asarray(emb[fit], dtype=np.float32))


def sample_grid(result: Synthesis, real: RealSet, columns: int):
    """A matplotlib figure: one row per synthesised class, real examples | kept synthetic images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, h, w, c = real.images.shape
    pad = 2
    n_real = max((len(v) for v in result.grid_sources.values()), default=0)
    cols = n_real + 1 + columns  # one blank column separates real from synthetic
    rows = max(len(result.plans), 1)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)

    def put(r: int, col: int, img: np.ndarray) -> None:
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = img

    labels = result.manifest["label"].to_numpy()
    for r, plan in enumerate(result.plans):
        for j, s in enumerate(result.grid_sources.get(plan.label, [])):
            put(r, j, real.images[s])
        for j, i in enumerate(np.flatnonzero(labels == plan.label)[:columns]):
            put(r, n_real + 1 + j, result.images[i])
    fig, ax = plt.subplots(figsize=(max(4.0, cols * 0.55), max(1.5, rows * 0.6) + 0.6))
    ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(result.plans))],
                  [f"{p.name} ({result.metrics['classes'][p.name]['kept']})" for p in result.plans])
    ax.set_xticks([pad + (n_real / 2) * (w + pad), pad + (n_real + 1 + columns / 2) * (w + pad)],
                  ["real", f"synthetic ({result.metrics['generator']}, kept)"])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout()
    return fig


def write_outputs(result: Synthesis, real: RealSet, params: SynthesizeParams, out: str | os.PathLike = OUT,
                  reports: str | os.PathLike = REPORTS) -> list[Path]:
    """``out/images.npy`` + ``out/manifest.parquet`` (one atomic directory, replacing only an earlier synthetic
    output: ``io.output_dir``) and the reports; returns report paths."""
    import matplotlib.pyplot as plt

    out, reports = Path(out), Path(reports)
    with io.output_dir(out, "synthetic") as tmp:
        np.save(tmp / "images.npy", result.images)
        result.manifest.to_parquet(tmp / "manifest.parquet", index=False)
    io.write_json(reports / "metrics.json", _json_safe(result.metrics))
    per_class = pd.DataFrame([{"class": name, **{k: v[k] for k in ("real", "need", "made", "passed", "kept")}}
                              for name, v in result.metrics["classes"].items()],
                             columns=["class", "real", "need", "made", "passed", "kept"])
    io.write_csv(reports / "per_class.csv", per_class)
    io.write_csv(reports / "filter_scores.csv", result.candidates.round(4))
    fig = sample_grid(result, real, params.grid_columns)
    with io.atomic_path(reports / "grid.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return [reports / n for n in ("metrics.json", "per_class.csv", "filter_scores.csv", "grid.png")]


def _json_safe(obj: Any) -> Any:
    """NaN (a metric undefined for too few images) -> None, so metrics.json stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def synthesize_cli(params: str | os.PathLike, manifest: str | os.PathLike = MANIFEST,
                   ingested: str | os.PathLike = INGESTED, encoder_dir: str | os.PathLike = ENCODER,
                   embeddings: str | os.PathLike = EMBEDDINGS, out: str | os.PathLike = OUT,
                   reports: str | os.PathLike = REPORTS, overrides: dict[str, Any] | None = None) -> dict:
    """Synthesise as the stage does, with one MLflow run holding params, metrics, grid and plots.

    Args:
        params: the params file (its ``synthesize`` section); ``overrides`` (nested) win over it.
        manifest, ingested, encoder_dir, embeddings: the stage's inputs (defaults: the DVC stage's paths).
        out, reports: where the synthetic set and the reports go.
    Returns:
        The run's metrics (``metrics.json`` before NaN -> null).
    Raises:
        ValueError, OSError: bad params or inputs, or ``out`` is a directory synthesize did not make.
    """
    import mlflow

    from sslvision import tracking
    from sslvision.models import load_encoder
    from sslvision.tracking import flatten

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("synthesize", SynthesizeParams, params, overrides=overrides)
    io.check_replaceable(out, "synthetic")  # refuse someone's directory before the work, not after
    real = load_real(manifest, ingested, embeddings)
    encoder = load_encoder(encoder_dir)
    decoder, norm_pix = (load_pretrain_decoder(encoder_dir) if p.generator == "mae_inpaint" else (None, False))
    with tracking.stage_run("synthesize", p.model_dump()):
        result = synthesize(real, encoder, p, decoder, norm_pix)
        paths = write_outputs(result, real, p, out, reports)
        flat = flatten({k: v for k, v in result.metrics.items() if k not in ("generator", "mode")})
        mlflow.log_metrics({k.replace(" ", "_").replace("/", "_"): float(v) for k, v in flat.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="synthesize")
    return result.metrics


def main() -> None:
    try:
        require_sections("synthesize", path=params_path())
        check_code_version()
        synthesize_cli(params=params_path())
    except (ValueError, OSError) as err:
        sys.exit(f"synthesize: error: {err}")


if __name__ == "__main__":
    main()
