"""Fine-tuning: the SSL encoder plus a classification head, trained for a long-tailed, noisy world.

The classifier is the pretrained :class:`~sslvision.models.Encoder` with timm's own head
(``reset_classifier``), trained either as a **linear probe** (encoder frozen; its features are
computed once, so an epoch costs almost nothing) or as a **full fine-tune** with layer-wise learning
rate decay (timm's ``layer_decay`` parameter groups: the stem learns ``layer_decay**depth`` times
slower than the head, which keeps the SSL features the labels cannot improve).

Inputs: a :class:`FinetuneData` (train: real rows, plus synthetic images whose loss weight is
``synthetic_weight``; validation: a stratified share of the *real* train rows, :func:`stratified_split` and
:func:`train_val_rows`; synthetic images never validate) and an encoder (:func:`init_classifier`). The DVC
stage that reads them from the project, evaluates, reports and registers is :mod:`sslvision.stages.finetune`.

Long-tail methods (``loss``, ``sampler``, ``drw_epoch``):

- ``logit_adjusted`` (Menon et al., 2021): cross-entropy on ``logits + tau * log(prior)``; the
  prediction uses the raw logits, so the classifier is Bayes-optimal for the *balanced* error.
- ``balanced_softmax`` (Ren et al., 2020): the same with ``tau = 1`` (the softmax of the training
  label distribution); kept under its own name because it is what the literature compares.
- ``ldam`` (Cao et al., 2019): a cosine head (``scale * cos``) and a per-class margin
  ``m_j ∝ n_j^(-1/4)`` (largest ``ldam_max_margin``) subtracted from the true-class logit, so rare
  classes get a wider margin. ``drw_epoch`` adds the deferred re-weighting of LDAM-DRW: from that epoch
  each class is weighted by ``(1 - beta) / (1 - beta^n_j)`` (the "effective number", Cui et al., 2019).
- ``sampler: class_balanced`` draws every class equally often. The prior the loss corrects for is the
  label distribution of the batches, which that sampler makes uniform (the logit adjustment then
  vanishes instead of correcting twice).
- ``label_smoothing`` under a prior correction spreads its mass by the training prior the adjusted logits
  model (``softmax(logit_shift)``), not uniformly: uniform smoothing of the adjusted softmax asks the raw
  logits for ``eps / K / prior`` on every rare class, which on a 100:1 tail puts rare classes above the
  head class on the head's own images (a head class's recall fell to 0 in the ladder). Spread by the prior,
  the smoothing is uniform in the balanced space the prediction uses; without a prior correction (``ce``,
  ``ldam``, class-balanced batches) it is PyTorch's uniform smoothing.

Residual label noise (``label_correction_epoch``): from that epoch on, each training row's target is a
running average of the model's own predictions, ``t <- m * t + (1 - m) * p`` with ``m =
label_correction_momentum``, starting from its given label (self-ensemble label correction, Lu & He,
2022). ``p`` is the posterior under the training prior (``softmax(logits + tau * log prior)``, what the
loss fits), so a row of a head class is not pulled towards the tail. Start it before the model begins
to memorise the wrong labels; rows whose target ends up favouring another class are counted per epoch
(``labels_corrected``). Single process only, and not with mixup.

``ema_decay`` > 0 keeps an exponential moving average of the trained weights (timm's ``ModelEmaV3``, with
its warm-up so the first steps' weights fade quickly); validation, epoch selection and the saved
classifier use the averaged weights.

After training, a single temperature is fitted on the validation logits (Guo et al., 2017). The
validation split is long-tailed while a prior-corrected classifier models the balanced distribution,
so the fit adds the log-prior change (:func:`calibration_shift`) to the logits, as the validation
distribution would; the temperature then calibrates the balanced probabilities the model outputs.

On disk (:func:`save_classifier`, a directory): ``classifier.safetensors`` and ``config.json`` (encoder
config, classes, head kind, temperature, and ``conversion``: how ingest converted the training images, so
the model converts a new image the same way wherever it runs): :func:`load_classifier` rebuilds it; no
pickles anywhere.

Under ``torchrun --nproc_per_node=N`` a full fine-tune (``mode: finetune``) runs DistributedDataParallel
(gloo on CPU, NCCL on GPU, :func:`join_process_group`): ``batch_size`` stays the global batch, each process
trains on its share of every batch and validation decisions are rank 0's. A linear probe trains a head on
features computed once (seconds), so it refuses to run distributed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file
from torch import nn

from sslvision.ingest import Conversion, IngestParams
from sslvision.io import output_dir
from sslvision.metrics import balanced_accuracy
from sslvision.models import (
    MAX_CLASSES,
    Encoder,
    build_for_weights,
    embed,
    encoder_config,
    load_weights,
    to_input,
)
from sslvision.params import Section, Seed, TrainingSplits
from sslvision.slices import SliceParams

log = logging.getLogger(__name__)


# --- params --------------------------------------------------------------------------------------

class RegistryParams(Section):
    enabled: bool = Field(True, description="log the classifier to MLflow and register it as `challenger`")
    model_name: str = Field("sslvision-classifier", min_length=1, description="registered model name")
    auto_promote: bool = Field(True, description=(
        "run the gated promotion right after registering (`sslvision promote` does the same by hand); a refusal "
        "is reported, not an error"))


class PromotionParams(Section):
    min_balanced_accuracy: float = Field(0.5, ge=0, le=1, description="absolute floor, also for the first model")
    max_ece: float = Field(0.1, gt=0, le=1, description="expected calibration error ceiling (15 bins)")
    min_improvement: float = Field(0.005, gt=0, le=1, description=(
        "balanced accuracy must beat the champion's by at least this (must be > 0; below ~0.005 a 10,000-image "
        "test split cannot tell models apart)"))
    worst_class_tolerance: float = Field(0.0, ge=0, le=1, description=(
        "worst-class recall may be at most this much below the champion's (0 = not worse)"))
    min_worst_class_recall: float = Field(0.0, ge=0, le=1, description=(
        "absolute floor on worst-class recall, also for the first model (a floor the classifier cannot reach "
        "leaves no champion)"))
    beat_pixel_baseline: bool = Field(True, description=(
        "refuse a challenger whose balanced accuracy does not beat the pixel baseline the finetune stage fits on "
        "the same training labels (logistic regression on 64 PCA components of the pixels; metrics.json "
        "baselines.pixel_logreg), on the same golden set: a model a user could build in two minutes without "
        "sslvision is not worth deploying"))
    baseline_margin: float = Field(0.0, ge=-1, le=1, description="... by at least this much (balanced accuracy, 0-1)")
    golden_per_class: int = Field(0, ge=0, le=1_000_000, description=(
        "images per class of the golden set (0 = the whole test split)"))


class FinetuneParams(Section):
    """The ``finetune`` stage: the SSL encoder + timm's classification head, trained on the audited (+ synthetic)
    data for the balanced error; calibrated; evaluated on the clean balanced test split; registered in MLflow."""

    encoder: str = Field("models/encoder", description="the pretrained encoder (pretrain's output)")
    ingested: str = Field("data/ingested", description=(
        "images and the test split (the clean, balanced evaluation set)"))
    manifest: str = Field("data/audit/manifest_clean.parquet", description=(
        "train rows and labels (audited); the raw data/ingested/manifest.parquet trains on the labels as given"))
    synthetic: str = Field("data/synthetic", description="synthesize's kept images; absent or empty = none")
    embeddings: str = Field("data/embeddings", description=(
        "the embed stage's SSL embeddings of every ingested image, for slices, slice_reweight and label_efficiency "
        "(absent: the rows they need are embedded with `encoder`)"))
    splits: TrainingSplits = Field(default_factory=lambda: ["train", "pool"], min_length=1, description=(
        "labelled rows of these manifest splits train (pool = labelled production batches that joined the data; "
        "unlabelled rows are always skipped)"))
    synthetic_weight: float = Field(1.0, ge=0, description=(
        "loss weight of a synthetic image relative to a real one (0 = ignore them); lower it (0.3-0.5) when "
        "synthesize's fidelity/consistency metrics are poor"))
    synthetic_ablation: Literal["auto", "on", "off"] = Field("auto", description=(
        "also train the same classifier without the synthetic images, compare the two on validation (synthetic_select "
        "deploys one) and report what they changed on the test split (metrics.json: synthetic_ablation; a warning "
        "when they are left out or lower tail recall or balanced accuracy). auto = on for linear_probe (seconds), off "
        "for a full fine-tune (it doubles the training) | on | off"))
    synthetic_select: Literal["validation", "always"] = Field("validation", description=(
        "with synthetic_ablation: validation = keep the synthetic images only when they raise validation balanced "
        "accuracy (a tie leaves them out; the ablation decides, the test split only reports) | always = train with "
        "them whatever validation says (the ablation only reports)"))
    out: str = Field("models/classifier", description=(
        "where the classifier (safetensors + config.json) is written"))
    init: Literal["ssl", "scratch"] = Field("ssl", description=(
        "ssl = start from the pretrained encoder | scratch = same architecture, random init (the supervised "
        "baseline; needs mode: finetune)"))
    mode: Literal["linear_probe", "finetune"] = Field("linear_probe", description=(
        "linear_probe: encoder frozen, features computed once (seconds per epoch on CPU; robust to label noise) | "
        "finetune: the whole network, layer-wise lr decay"))
    epochs: int = Field(30, ge=1, le=100_000, description=(
        "maximum epochs (early stopping usually ends sooner; select_epoch: last runs them all)"))
    batch_size: int = Field(256, ge=1, le=65536, description="images per step")
    lr: float = Field(3e-3, gt=0, description=(
        "AdamW peak lr (cosine schedule). linear_probe: 1e-3..1e-2; finetune: 3e-4..2e-3"))
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    layer_decay: float = Field(0.75, gt=0, le=1, description=(
        "finetune: each layer group down from the head learns this times slower (1 = same lr everywhere; "
        "0.65-0.8 keeps the SSL features of early layers)"))
    warmup_epochs: int = Field(1, ge=0, le=100_000, description="linear warm-up epochs of the cosine schedule")
    augment: bool = Field(True, description=(
        "finetune: random horizontal flips and 2-pixel shifts (linear_probe: none)"))
    loss: Literal["ce", "logit_adjusted", "balanced_softmax", "ldam"] = Field("logit_adjusted", description=(
        "ce | logit_adjusted (logits + tau*log prior in training) | balanced_softmax (= logit_adjusted with tau "
        "1) | ldam (cosine head, per-class margins)"))
    tau: float = Field(1.0, ge=0, description=(
        "logit_adjusted: strength of the prior correction (1 = Bayes-optimal for the balanced error; 0 = plain "
        "cross-entropy)"))
    ldam_max_margin: float = Field(0.5, gt=0, description=(
        "ldam: margin of the rarest class (the others get n^-1/4-proportional ones)"))
    ldam_scale: float = Field(30.0, gt=0, description=(
        "ldam: scale of the cosine logits (LDAM paper: 30; lower if training stalls)"))
    drw_epoch: int = Field(-1, ge=-1, le=100_000, description=(
        "deferred re-weighting (LDAM-DRW): from this epoch weight classes by their effective number; -1 = never. "
        "Typical: ~2/3 of the epochs, with loss: ldam"))
    drw_beta: float = Field(0.9999, ge=0, lt=1, description="effective-number beta of DRW (0.999-0.9999)")
    sampler: Literal["random", "class_balanced"] = Field("random", description=(
        "random | class_balanced (every class drawn equally often; the prior correction of logit_adjusted then "
        "vanishes, do not expect both to add up). For a full fine-tune it does much of what synthesize's images "
        "do"))
    label_smoothing: float = Field(0.0, ge=0, lt=1, description=(
        "cross-entropy label smoothing (0.05-0.1 helps against residual label noise; it lowers confidence: turn "
        "calibrate on, or ECE rises). With a prior correction (logit_adjusted, balanced_softmax) the smoothing mass "
        "is spread by the training prior, i.e. uniformly over the balanced classes the prediction uses"))
    mixup_alpha: float = Field(0.0, ge=0, description=(
        "mixup (Zhang et al. 2018): train on lam*x1 + (1-lam)*x2 with both labels weighted, lam ~ Beta(alpha, "
        "alpha); 0 = off, 0.2-0.4 typical; slows convergence on short runs"))
    label_correction_epoch: int = Field(-1, ge=-1, le=100_000, description=(
        "from this epoch, each training row's target becomes a running average of the model's predictions "
        "(self-ensemble label correction: relabels what the audit missed); -1 = off. Start it before the model "
        "memorises the wrong labels (~1/3 of the epochs)"))
    label_correction_momentum: float = Field(0.9, ge=0, lt=1, description=(
        "share of the old target kept at each visit (0.9: ~10 visits to flip a label)"))
    ema_decay: float = Field(0.0, ge=0, lt=1, description=(
        "> 0: validate, select and save an exponential moving average of the weights (timm ModelEmaV3 with "
        "warm-up; 0.998 for ~750 steps); 0 = off"))
    slice_reweight: Literal["off", "jtt", "subsample"] = Field("off", description=(
        "train a second classifier against the slices and keep it only when it raises the worst-slice accuracy "
        "on validation at a cost of at most 1 point of validation balanced accuracy (metrics.json slice_reweight "
        "records the decision; doubles the training; single process only). jtt: Just Train Twice (Liu et al. "
        "2021), the training rows the first classifier got wrong weighted jtt_upweight times, judged on the "
        "k-means slices of validation; subsample: each shortcut slice (a group of SSL-similar images far more "
        "common in a class's train images than in its test images, sharpened by what tells the two apart) thinned "
        "in its class until it no longer predicts the class (group subsampling, Idrissi et al. 2022), judged on "
        "validation re-weighted to the test split's slice mix; nothing to do without a shortcut slice. true = jtt "
        "(older params files)"))
    jtt_upweight: float = Field(5.0, gt=0, le=1000, description=(
        "slice_reweight: loss weight of a row the first classifier got wrong (JTT paper: 20-100 on clean labels; "
        "label noise is in the error set too, so lower)"))
    label_efficiency: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        default_factory=lambda: [10, 25, 100], max_length=20, description=(
            "labels per class of the label-efficiency curve in the report: the SSL linear probe against the pixel "
            "baseline with only this many labels (empty = skip); reports/finetune/label_efficiency.csv, "
            "metrics.json label_efficiency. A class with fewer real training rows gives all it has (flagged)"))
    label_efficiency_seeds: int = Field(3, ge=1, le=20, description=(
        "label_efficiency: draws of the labelled rows per count (mean and std over them)"))
    val_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "share of each class of the real train rows held out for early stopping and calibration (a class with "
        "one image keeps it for training)"))
    patience: int = Field(5, ge=1, le=100_000, description=(
        "early stopping: epochs without a better validation balanced accuracy"))
    select_epoch: Literal["best", "last"] = Field("best", description=(
        "best: keep the epoch with the best validation balanced accuracy (early stopping) | last: train every "
        "epoch and keep the end of the cosine schedule. The validation rows carry the audited labels and a rare "
        'class has only a handful of them, so "best" can pick a noisy maximum (with drw_epoch, keep drw_epoch + '
        "patience within epochs so DRW gets its turn)"))
    calibrate: bool = Field(False, description=(
        "fit a temperature on the validation logits (prior change accounted for); on with label_smoothing, which "
        "leaves the model under-confident. Off for a linear probe: its validation labels (the audited ones) agree "
        "with the SSL probe more than the truth does, so the fit sharpens the model and test ECE rises"))
    eval_batch_size: int = Field(512, ge=1, le=65536, description=(
        "images per forward pass when embedding / evaluating"))
    threads: int = Field(0, ge=0, le=1024, description="torch intra-op threads; 0 = torch's default (all cores)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (cuda if present) | cpu | cuda")
    seed: Seed = Field(0, description="validation split, init, batch order, augmentation")
    slices: SliceParams = Field(SliceParams(), description=(
        "slice discovery on the test split (sslvision.slices): groups of similar images where the classifier fails"))
    registry: RegistryParams = Field(RegistryParams(), description="the MLflow model registry")
    promotion: PromotionParams = Field(PromotionParams(), description=(
        "gates a challenger must pass on the golden set (the test split) to become champion"))

    @field_validator("slice_reweight", mode="before")
    @classmethod
    def _reweight_from_bool(cls, value: Any) -> Any:
        """``true``/``false`` (params files from before ``subsample``; YAML reads ``off`` as false too)."""
        return {True: "jtt", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _compatible_options(self) -> FinetuneParams:
        if self.init == "scratch" and self.mode == "linear_probe":
            raise ValueError("init: scratch trains a random encoder, so it needs mode: finetune")
        if self.label_correction_epoch >= 0 and self.mixup_alpha > 0:
            raise ValueError("label_correction_epoch and mixup_alpha cannot both be on: the running targets are "
                             "averaged from predictions on unmixed images")
        return self


# --- data ----------------------------------------------------------------------------------------

@dataclass
class Split:
    """Images (uint8 ``(N, H, W, C)``, in memory), labels and per-sample loss weights."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    synthetic: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def of(cls, images: np.ndarray, labels: np.ndarray, weight: float = 1.0, synthetic: bool = False) -> Split:
        n = len(labels)
        return cls(np.ascontiguousarray(images), np.array(labels, dtype=np.int64),
                   np.full(n, weight, dtype=np.float32), np.full(n, synthetic))

    def take(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx], self.weights[idx], self.synthetic[idx])

    def concat(self, other: Split) -> Split:
        return Split(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]),
                     np.concatenate([self.weights, other.weights]), np.concatenate([self.synthetic, other.synthetic]))


@dataclass
class FinetuneData:
    train: Split
    val: Split
    test: Split
    classes: list[str]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with ``fraction`` of every class in val (at least one image of each class
    that has two or more; a class with a single image stays in train, which needs it more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def train_val_rows(p: FinetuneParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of ``p.manifest`` the classifier trains on and those held out for validation: the
    labelled rows of ``p.splits`` (``pool`` holds labelled production batches that joined the data),
    split per class by :func:`stratified_split`. Other stages that need the held-out rows call this."""
    manifest = Path(p.manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: missing; run the audit stage first (dvc repro audit)")
    df = pd.read_parquet(manifest)
    missing = {"index", "split", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{manifest}: lacks column(s) {sorted(missing)}")
    df = df[df["split"].isin(p.splits) & (df["label"] >= 0)]
    if len(df) == 0:
        raise ValueError(f"{manifest}: no labelled rows in splits {p.splits}")
    tr, va = stratified_split(df["label"].to_numpy(np.int64), p.val_fraction, p.seed)
    return df.iloc[tr], df.iloc[va]


# --- the classifier ------------------------------------------------------------------------------

class Classifier(nn.Module):
    """An encoder with timm's classification head (``reset_classifier``).

    ``head="cosine"`` (LDAM) reads the same timm head as a cosine classifier, ``scale * cos(f, w_j)``.
    ``temperature`` divides the logits in :meth:`predict_proba` (fitted by :func:`fit_temperature`).
    ``conversion``: how an image file becomes the model's input (:func:`sslvision.ingest.convert_image` with
    its channels and size, and ingest's size limits); by default the encoder's input shape with ingest's
    default limits.
    """

    def __init__(self, encoder: Encoder, classes: list[str], head: Literal["linear", "cosine"] = "linear",
                 scale: float = 30.0, temperature: float = 1.0, conversion: Conversion | None = None):
        super().__init__()
        self.encoder = encoder
        self.classes = list(classes)
        self.head_kind = head
        self.scale = scale
        self.temperature = temperature
        limits = IngestParams()
        self.conversion = conversion or Conversion(encoder.config.in_chans, encoder.config.img_size,
                                                   limits.max_file_bytes, limits.max_pixels)
        self.prior_correction: dict[str, Any] | None = None  # see check_prior_correction
        encoder.backbone.reset_classifier(len(classes))

    @property
    def head(self) -> nn.Module:
        return self.encoder.backbone.get_classifier()

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "cosine":
            return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.head.weight, dim=1))
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.encoder(x))

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Uncalibrated logits of uint8 ``(N, H, W, C)`` images."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [self(to_input(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device)))
               .float().cpu().numpy() for s in range(0, len(images), batch_size)]
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Calibrated class probabilities of uint8 ``(N, H, W, C)`` images (at the corrected class prior when the
        classifier carries a ``prior_correction``: its ``adjustment`` is added to the scaled logits)."""
        z = self.logits(images, batch_size) / self.temperature
        return softmax(z + np.asarray(self.prior_correction["adjustment"]) if self.prior_correction else z)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


def init_classifier(encoder: Encoder, classes: list[str], p: FinetuneParams) -> Classifier:
    """``encoder`` (or, ``init: scratch``, the same architecture freshly initialised) with a new head for
    ``classes`` (cosine for ``loss: ldam``), initialised from ``p.seed`` (not from whatever the global
    generator's state happens to be). ``encoder`` becomes the classifier's: its head is replaced."""
    torch.manual_seed(p.seed)
    if p.init == "scratch":
        encoder = Encoder(encoder.config)
    head = "cosine" if p.loss == "ldam" else "linear"
    return Classifier(encoder, classes, head=head, scale=p.ldam_scale)


def save_classifier(directory: str | Path, classifier: Classifier, extra: dict[str, Any] | None = None) -> None:
    """``classifier.safetensors`` + ``config.json``, written atomically as a "classifier" ``output_dir``."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in classifier.state_dict().items()}
    config = {
        "encoder": asdict(classifier.encoder.config),
        "classes": classifier.classes,
        "head": classifier.head_kind,
        "scale": classifier.scale,
        "temperature": classifier.temperature,
        "conversion": {**asdict(classifier.conversion), "tag": classifier.conversion.tag},
        **({"prior_correction": classifier.prior_correction} if classifier.prior_correction else {}),
        **(extra or {}),
    }
    with output_dir(directory, "classifier") as tmp:
        save_file(state, tmp / "classifier.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


MAX_CONFIG_BYTES = 64 * 2**20  # config.json: a few KiB, up to some MiB with 100,000 class names


def load_classifier(directory: str | Path) -> Classifier:
    """Rebuild a classifier saved by :func:`save_classifier` (eval mode). The config is checked before the
    network is built (at most ``MAX_CONFIG_BYTES``, sizes in bounds, 1 to ``MAX_CLASSES`` class names, a
    ``conversion`` that ingest could have made for the encoder's input, and a network that fits the weights
    file: :func:`sslvision.models.build_for_weights`), so a bad file costs no memory. Keys it does not
    read are ignored (``metrics``, and whatever a later sslvision adds). A config without ``conversion``
    (saved before it was recorded) converts as ingest's defaults do."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the finetune stage first (dvc repro finetune)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a classifier config has ({MAX_CONFIG_BYTES})")
    try:
        config = json.loads(path.read_text())
        cfg = encoder_config(config, path)
        classes = config["classes"]
        if (not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES
                or not all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{path}: classes must be a list of 1 to {MAX_CLASSES} names")
        conversion = _conversion(config.get("conversion"), cfg, path)
        classifier = build_for_weights(
            lambda: Classifier(Encoder(cfg), classes, head=config["head"], scale=config["scale"],
                               temperature=config["temperature"], conversion=conversion),
            directory / "classifier.safetensors", path)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a classifier config: {err}") from err
    load_weights(classifier, directory / "classifier.safetensors")
    classifier.prior_correction = check_prior_correction(config.get("prior_correction"), len(classes), path)
    return classifier.eval()


MAX_PRIOR_ADJUSTMENT = 10.0  # |log prior ratio| per class: a correction never rules a class out


def check_prior_correction(raw: Any, num_classes: int, path: Path) -> dict[str, Any] | None:
    """A config's ``prior_correction`` (``sslvision.actions.correct_prior``), checked: ``adjustment`` (added
    to the temperature-scaled logits) and ``prior`` (the class prior it corrects for), one finite number per
    class, the adjustment within ``MAX_PRIOR_ADJUSTMENT``, the prior a distribution; other keys are kept."""
    if raw is None:
        return None
    try:
        adjustment = np.asarray(raw["adjustment"], dtype=float)
        prior = np.asarray(raw["prior"], dtype=float)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: prior_correction must have numeric 'adjustment' and 'prior' lists: {err}") from None
    if adjustment.shape != (num_classes,) or prior.shape != (num_classes,):
        raise ValueError(f"{path}: prior_correction needs {num_classes} values in 'adjustment' and 'prior'")
    if not (np.all(np.isfinite(adjustment)) and np.abs(adjustment).max() <= MAX_PRIOR_ADJUSTMENT):
        raise ValueError(f"{path}: prior_correction.adjustment must be finite and within ±{MAX_PRIOR_ADJUSTMENT}")
    if not (np.all(prior >= 0) and abs(prior.sum() - 1) < 1e-6):
        raise ValueError(f"{path}: prior_correction.prior must be a class distribution (>= 0, summing to 1)")
    return raw


def _conversion(raw: Any, cfg: Any, path: Path) -> Conversion | None:
    """The ``conversion`` object of a classifier config, checked: ingest's bounds, the encoder's input
    shape, and the conversion version (``tag``) of this sslvision (a model trained on images converted
    otherwise would silently get other inputs)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"channels", "size", "max_file_bytes", "max_pixels", "tag"}:
        raise ValueError(f"{path}: conversion must be an object with channels, size, max_file_bytes, max_pixels, tag")
    from sslvision.params import ParamsError, validate_section

    try:
        limits = validate_section("conversion", IngestParams, {k: v for k, v in raw.items() if k != "tag"},
                                  source=str(path))
    except ParamsError as err:
        raise ValueError(str(err)) from None
    conversion = Conversion(limits.channels, limits.size, limits.max_file_bytes, limits.max_pixels)
    if (conversion.channels, conversion.size) != (cfg.in_chans, cfg.img_size):
        raise ValueError(f"{path}: conversion makes {conversion.size}x{conversion.size}x{conversion.channels} "
                         f"images but the encoder takes {cfg.img_size}x{cfg.img_size}x{cfg.in_chans}")
    if raw["tag"] != conversion.tag:
        # A warning, not a refusal: an upgrade must not take the deployed champion out of service; the
        # conversions of two versions differ by little (e.g. reduced-scale JPEG decoding) and a retrain fixes it.
        log.warning("%s: the model's images were converted by ingest conversion %r, this sslvision converts as %r: "
                    "its inputs may differ slightly; retrain it (dvc repro) to match", path, str(raw["tag"])[:40],
                    conversion.tag)
    return conversion


# --- long-tail losses ----------------------------------------------------------------------------

def ldam_margins(class_counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """LDAM margins ``m_j ∝ n_j^(-1/4)``, the rarest class getting ``max_margin``."""
    m = class_counts.clamp_min(1.0).pow(-0.25)
    return m * (max_margin / m.max())


def drw_weights(class_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class weights from the effective number of samples, ``(1 - beta) / (1 - beta^n)``, mean 1."""
    w = (1.0 - beta) / (1.0 - torch.pow(beta, class_counts.clamp_min(1.0)))
    return w * (len(w) / w.sum())


class LongTailLoss(nn.Module):
    """Cross-entropy with the long-tail corrections of the module docstring.

    ``class_counts`` are the (weighted) training counts per class; ``balanced_sampling`` says the
    batches are drawn class-balanced (the label prior the loss sees is then uniform).
    """

    def __init__(self, kind: str, class_counts: np.ndarray | torch.Tensor, *, tau: float = 1.0,
                 label_smoothing: float = 0.0, ldam_max_margin: float = 0.5, ldam_scale: float = 30.0,
                 drw_epoch: int = -1, drw_beta: float = 0.9999, balanced_sampling: bool = False):
        super().__init__()
        if kind not in ("ce", "logit_adjusted", "balanced_softmax", "ldam"):
            raise ValueError(f"unknown loss {kind!r}: use ce, logit_adjusted, balanced_softmax or ldam")
        counts = torch.as_tensor(class_counts, dtype=torch.float32).clamp_min(1.0)
        self.kind = kind
        self.label_smoothing = label_smoothing
        self.drw_epoch = drw_epoch
        prior = torch.full_like(counts, 1.0 / len(counts)) if balanced_sampling else counts / counts.sum()
        shift = {"logit_adjusted": tau, "balanced_softmax": 1.0}.get(kind, 0.0)
        self.register_buffer("logit_shift", shift * prior.log())
        self.register_buffer("margins", ldam_scale * ldam_margins(counts, ldam_max_margin) if kind == "ldam"
                             else torch.zeros_like(counts))
        self.register_buffer("drw", drw_weights(counts, drw_beta))

    def class_weights(self, epoch: int) -> torch.Tensor:
        if 0 <= self.drw_epoch <= epoch:
            return self.drw
        return torch.ones_like(self.drw)

    def adjusted_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The logits the cross-entropy sees in training (prediction always uses the raw ones)."""
        return logits + self.logit_shift - _as_probs(target, logits.shape[1]) * self.margins

    def smoothed(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Class probabilities: ``(1 - eps) * target + eps * softmax(logit_shift)`` (the training prior the
        adjusted logits model; uniform without a prior correction, as PyTorch's ``label_smoothing``); ``target``
        itself without smoothing (cross-entropy takes indices or probabilities)."""
        if self.label_smoothing == 0:
            return target
        probs = _as_probs(target, num_classes)
        spread = self.logit_shift.softmax(0).to(probs.dtype)
        return (1.0 - self.label_smoothing) * probs + self.label_smoothing * spread

    def forward(self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                epoch: int = 0) -> torch.Tensor:
        """``target``: class indices ``(B,)`` or class probabilities ``(B, K)`` (soft targets: margins and
        class weights are then their expectation under the target)."""
        per_sample = F.cross_entropy(self.adjusted_logits(logits, target), self.smoothed(target, logits.shape[1]),
                                     reduction="none")
        w = target @ self.class_weights(epoch) if target.is_floating_point() else self.class_weights(epoch)[target]
        if sample_weight is not None:
            w = w * sample_weight
        return (per_sample * w).sum() / w.sum().clamp_min(1e-12)


def _as_probs(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return target if target.is_floating_point() else F.one_hot(target, num_classes).float()


def class_counts(labels: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, weights=weights, minlength=num_classes).astype(np.float64)


# --- calibration and metrics ---------------------------------------------------------------------

def fit_temperature(logits: np.ndarray, labels: np.ndarray, prior_shift: np.ndarray | None = None) -> float:
    """The temperature ``T`` minimising the validation NLL of ``softmax(logits / T + prior_shift)``.

    ``prior_shift`` turns the model's probabilities into the validation set's when the two class priors
    differ (see :func:`calibration_shift`); the fitted ``T`` then calibrates ``softmax(logits / T)``.
    """
    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    shift = torch.zeros(x.shape[1], dtype=torch.float64) if prior_shift is None else torch.as_tensor(
        prior_shift, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp() + shift, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibration_shift(p: FinetuneParams, train_counts: np.ndarray, val_labels: np.ndarray) -> np.ndarray:
    """``log pi_val - log pi_model``: the log-prior change from the distribution the raw logits model to
    the validation split's. Cross-entropy (and LDAM) logits model the training prior; logit adjustment
    with ``tau`` models ``pi_train^(1 - tau)``; balanced softmax and class-balanced sampling model a
    uniform prior (the balanced test distribution). Without this, a long-tailed validation split would
    fit the temperature of a balanced classifier to the wrong prior."""
    k = len(train_counts)
    log_train = np.log(np.maximum(train_counts, 1.0) / np.maximum(train_counts, 1.0).sum())
    val = np.maximum(np.bincount(val_labels, minlength=k).astype(float), 1.0)
    tau = 1.0 if p.sampler == "class_balanced" or p.loss == "balanced_softmax" else (
        p.tau if p.loss == "logit_adjusted" else 0.0)
    return np.log(val / val.sum()) - (1.0 - tau) * log_train


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_balanced_accuracy: float = 0.0
    temperature: float = 1.0
    seconds: float = 0.0
    world_size: int = 1
    corrected_labels: np.ndarray | None = None  # label correction: argmax of each training row's final target


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``pad`` pixels, per image (normalised input)."""
    b, c, h, w = x.shape
    dev = x.device
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)  # -1 = black after to_input's normalisation
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    return xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              rows, cols]


def mixup(x: torch.Tensor, mix: tuple[float, torch.Tensor] | None) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` (mixup, Zhang et al. 2018); ``x`` itself when ``mix`` is None."""
    if mix is None:
        return x
    lam, perm = mix
    return lam * x + (1 - lam) * x[perm]


def _batches(n: int, batch_size: int, sampler_weights: torch.Tensor | None, generator: torch.Generator,
             min_size: int = 2) -> list[torch.Tensor]:
    if sampler_weights is None:
        order = torch.randperm(n, generator=generator)
    else:
        from torch.utils.data import WeightedRandomSampler

        order = torch.tensor(list(WeightedRandomSampler(sampler_weights, n, replacement=True, generator=generator)))
    return [order[s:s + batch_size] for s in range(0, n, batch_size) if len(order[s:s + batch_size]) >= min_size]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("finetune.device: cuda requested but torch sees no CUDA device (use auto or cpu)")
    return torch.device(name)


def join_process_group(p: FinetuneParams, device: torch.device) -> tuple[torch.device, int, int]:
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group; return (device, rank, world size)."""
    from sslvision.pretrain import init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and p.mode == "linear_probe":
        raise ValueError("finetune.mode: linear_probe trains a head on features computed once (seconds): run it "
                         "in one process, without torchrun (mode: finetune runs distributed)")
    if not init_distributed(device):
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def check_replicas_agree(model: nn.Module, device: torch.device) -> None:
    """DDP keeps every process's weights identical; stop loudly if they are not (BatchNorm running
    statistics stay per process and are not compared: rank 0's are the ones saved)."""
    sums = torch.stack([t.detach().double().sum() for t in model.parameters()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("finetune: the processes ended with different weights; DistributedDataParallel "
                           "lost sync (every process must run the same number of steps)")


def make_optimizer(p: FinetuneParams, classifier: Classifier) -> torch.optim.Optimizer:
    """AdamW on the head (linear probe) or on the whole network with layer-wise lr decay (timm's
    parameter groups: group ``i`` of ``L`` gets ``lr_scale = layer_decay ** (L - i)``, applied by timm's scheduler)."""
    import timm.optim

    if p.mode == "linear_probe":
        return timm.optim.create_optimizer_v2(classifier.head, opt="adamw", lr=p.lr, weight_decay=p.weight_decay)
    return timm.optim.create_optimizer_v2(classifier.encoder.backbone, opt="adamw", lr=p.lr,
                                          weight_decay=p.weight_decay, layer_decay=p.layer_decay)


def train_classifier(classifier: Classifier, data: FinetuneData, p: FinetuneParams,
                     on_epoch: Any = None) -> TrainResult:
    """Train, keep the epoch with the best validation balanced accuracy, then fit the temperature.

    ``on_epoch(epoch, metrics)`` is called after every epoch (the stage logs to MLflow with it).
    """
    import timm.scheduler
    import timm.utils

    t0 = time.perf_counter()
    torch.manual_seed(p.seed)
    generator = torch.Generator().manual_seed(p.seed)
    device, rank, world = join_process_group(p, resolve_device(p.device))
    # every process draws the same batch order from `generator`; its augmentations are its own
    augment_generator = generator if world == 1 else torch.Generator().manual_seed(p.seed + 1 + rank)
    mix_rng = np.random.default_rng([p.seed, rank])  # mixup's mixing weights
    classifier.to(device)
    k = len(data.classes)
    train, val = data.train, data.val
    counts = class_counts(train.labels, train.weights, k)
    criterion = LongTailLoss(p.loss, counts, tau=p.tau, label_smoothing=p.label_smoothing,
                             ldam_max_margin=p.ldam_max_margin, ldam_scale=p.ldam_scale, drw_epoch=p.drw_epoch,
                             drw_beta=p.drw_beta, balanced_sampling=p.sampler == "class_balanced").to(device)
    if p.mode == "linear_probe":
        # The encoder is frozen: its features are computed once and the head trains on them.
        classifier.encoder.eval()
        x_train = torch.from_numpy(embed(classifier.encoder, train.images, p.eval_batch_size, device, progress=True))
        x_val = torch.from_numpy(embed(classifier.encoder, val.images, p.eval_batch_size, device))
        trained: nn.Module = classifier.head

        def forward(xb: torch.Tensor, mix: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
            return classifier.logits_from_features(mixup(xb, mix))
    else:
        x_train, x_val = torch.from_numpy(train.images), torch.from_numpy(val.images)
        trained = classifier.encoder.backbone
        net: nn.Module = classifier
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                classifier, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=classifier.head_kind == "cosine")  # the cosine head has an unused bias

        def forward(xb: torch.Tensor, mix: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
            x = to_input(xb)
            if p.augment and classifier.training:
                x = augment_batch(x, augment_generator)
            return (net if classifier.training else classifier)(mixup(x, mix))  # evaluation is local, no collectives

    optimizer = make_optimizer(p, classifier)
    y_train = torch.from_numpy(train.labels)
    w_train = torch.from_numpy(train.weights)
    sampler_weights = None
    if p.sampler == "class_balanced":
        per_class = torch.as_tensor(1.0 / np.maximum(np.bincount(train.labels, minlength=k), 1))
        sampler_weights = per_class[y_train] * w_train
    min_size = 2 * world  # at least two images per process and batch
    steps = max(len(_batches(len(train), p.batch_size, None, torch.Generator(), min_size)), 1)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=p.epochs,
                                                      warmup_epochs=p.warmup_epochs, warmup_lr=p.lr * 0.01,
                                                      min_lr=p.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps)
    if p.label_correction_epoch >= 0 and world > 1:
        raise ValueError("finetune.label_correction_epoch needs a single process: under torchrun each process sees "
                         "other rows every epoch, so the running targets would part ways")
    soft_targets: torch.Tensor | None = None  # label correction: a running average of the model's predictions
    ema = timm.utils.ModelEmaV3(trained, decay=p.ema_decay, use_warmup=True) if p.ema_decay > 0 else None
    live_state: dict[str, torch.Tensor] | None = None  # the trained weights while the EMA ones are validated
    result = TrainResult()
    best_state = copy.deepcopy(trained.state_dict())
    stale = 0
    update = 0
    for epoch in range(p.epochs):
        if live_state is not None:
            trained.load_state_dict(live_state)
        trained.train()
        if p.mode == "finetune":
            classifier.train()
        total, seen = 0.0, 0
        for idx in _batches(len(train), p.batch_size, sampler_weights, generator, min_size):
            idx = idx[rank::world]  # this process's share of the global batch
            yb, wb = y_train[idx].to(device), w_train[idx].to(device)
            if 0 <= p.label_correction_epoch <= epoch:
                if soft_targets is None:
                    soft_targets = F.one_hot(y_train, k).float()
                logits = forward(x_train[idx].to(device))
                loss = criterion(logits, soft_targets[idx].to(device), wb, epoch)
                with torch.no_grad():  # the model's posterior under the training prior, as the loss fits it
                    a = p.label_correction_momentum
                    posterior = (logits.detach().float() + criterion.logit_shift).softmax(1).cpu()
                    soft_targets[idx] = a * soft_targets[idx] + (1 - a) * posterior
            elif p.mixup_alpha > 0:
                lam = float(mix_rng.beta(p.mixup_alpha, p.mixup_alpha))
                perm = torch.randperm(len(idx), generator=augment_generator).to(device)
                logits = forward(x_train[idx].to(device), (lam, perm))
                loss = lam * criterion(logits, yb, wb, epoch) + (1 - lam) * criterion(logits, yb[perm], wb[perm], epoch)
            else:
                loss = criterion(forward(x_train[idx].to(device)), yb, wb, epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}: lower finetune.lr (now {p.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update += 1
            scheduler.step_update(update)
            if ema is not None:
                ema.update(trained, step=update)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        classifier.eval()
        if ema is not None:  # validate (and keep) the averaged weights; training goes on from the live ones
            live_state = copy.deepcopy(trained.state_dict())
            trained.load_state_dict(ema.module.state_dict())
        val_logits = _val_logits(classifier, forward, x_val, p.eval_batch_size)
        val_bacc = balanced_accuracy(val.labels, val_logits)
        if world > 1:  # rank 0's score decides best epoch and early stop for all, or they would part ways
            score = torch.tensor([val_bacc], dtype=torch.float64, device=device)
            dist.broadcast(score, 0)
            val_bacc = float(score.item())
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_balanced_accuracy": val_bacc,
               "lr": max(g["lr"] for g in optimizer.param_groups)}
        if soft_targets is not None:  # training rows whose running target now favours another class
            row["labels_corrected"] = int((soft_targets.argmax(1) != y_train).sum())
        result.history.append(row)
        if rank == 0:
            log.info("epoch %d/%d  loss %.4f  val balanced accuracy %.4f", epoch + 1, p.epochs, row["train_loss"],
                     val_bacc)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if p.select_epoch == "last":  # the end of the schedule, whatever the validation score says
            result.best_epoch, result.best_val_balanced_accuracy = epoch, val_bacc
        elif epoch == 0 or val_bacc > result.best_val_balanced_accuracy:
            result.best_epoch, result.best_val_balanced_accuracy = epoch, val_bacc
            best_state = copy.deepcopy(trained.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= p.patience:
                log.info("early stop: no better validation balanced accuracy for %d epochs", p.patience)
                break
    if p.select_epoch == "best":
        trained.load_state_dict(best_state)
    classifier.eval()
    if world > 1:
        check_replicas_agree(classifier, device)
    if p.calibrate and len(val):
        classifier.temperature = fit_temperature(_val_logits(classifier, forward, x_val, p.eval_batch_size), val.labels,
                                                 calibration_shift(p, counts, val.labels))
    result.temperature = classifier.temperature
    if soft_targets is not None:
        result.corrected_labels = soft_targets.argmax(1).numpy()
    result.seconds = time.perf_counter() - t0
    result.world_size = world
    return result


@torch.no_grad()
def _val_logits(classifier: Classifier, forward: Any, x: torch.Tensor, batch_size: int) -> np.ndarray:
    device = next(classifier.parameters()).device
    out = [forward(x[s:s + batch_size].to(device)).float().cpu().numpy() for s in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(classifier.classes)), np.float32)


# --- the array API -------------------------------------------------------------------------------

# FinetuneParams fields that say where the stage reads and writes, or what it does around the training:
# not settings of :func:`fit_classifier`.
STAGE_FIELDS = frozenset({"encoder", "ingested", "manifest", "synthetic", "splits", "synthetic_weight",
                          "synthetic_ablation", "synthetic_select", "out", "threads", "registry", "promotion",
                          "embeddings", "slices", "slice_reweight", "jtt_upweight", "label_efficiency",
                          "label_efficiency_seeds"})


def fit_classifier(encoder: Encoder, images: np.ndarray, labels: np.ndarray, *, classes: list[str] | None = None,
                   seed: int = 0, device: str = "cpu", **overrides: Any) -> Classifier:
    """Train a classifier on ``encoder`` with the finetune stage's recipe, from arrays; reads and writes no file.

    Args:
        encoder: the (pretrained) encoder; copied, the caller's is left as it is.
        images: uint8 ``(N, H, W)`` or ``(N, H, W, C)`` images of the encoder's input size and channels.
        labels: integer class indices, one per image.
        classes: the class names (default: ``"0"`` .. ``"K-1"`` for the largest label ``K - 1``).
        seed, device, overrides: :class:`FinetuneParams` fields (``mode``, ``epochs``, ``loss``, ``calibrate``,
            ``val_fraction``...); the stage's paths and reporting fields (:data:`STAGE_FIELDS`) are refused.

    Returns the trained :class:`Classifier` (eval mode; ``predict_proba`` takes the same kind of images), the
    epoch of the best balanced accuracy on a stratified ``val_fraction`` of the rows (:func:`stratified_split`),
    which it did not train on. For the rows and params of a project, the same weights as the finetune stage's
    without synthetic images.

    Raises:
        ValueError: images and labels that do not fit each other, the classes or the encoder; an unknown or
            invalid setting (pydantic's ``ValidationError`` is a ``ValueError``).
    """
    stage = sorted(STAGE_FIELDS & set(overrides))
    if stage:
        raise ValueError(f"fit_classifier: {', '.join(stage)} are settings of the finetune stage, not of training")
    p = FinetuneParams(seed=seed, device=device, **overrides)
    x = np.asarray(images)
    x = x[..., None] if x.ndim == 3 else x
    y = np.asarray(labels)
    cfg = encoder.config
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (cfg.img_size, cfg.img_size, cfg.in_chans):
        raise ValueError(f"images must be uint8 (N, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}) for this encoder "
                         f"(or (N, H, W) with one channel), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or len(y) == 0 or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be {len(x)} integers (one per image), got {y.dtype} {y.shape}")
    k = len(classes) if classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must be in 0..{k - 1}, got {y.min()}..{y.max()}")
    names = list(classes) if classes is not None else [str(c) for c in range(k)]
    tr, va = stratified_split(y.astype(np.int64), p.val_fraction, p.seed)
    data = FinetuneData(train=Split.of(x[tr], y[tr]), val=Split.of(x[va], y[va]), test=Split.of(x[:0], y[:0]),
                        classes=names)
    classifier = init_classifier(copy.deepcopy(encoder), names, p)
    train_classifier(classifier, data, p)
    return classifier.eval()
