"""The demo scenario: Fashion-MNIST made as messy as real data, written as ordinary image folders.

``build_scenario`` reads the Fashion-MNIST IDX files and writes, deterministically for a seed::

    OUT/images/train/<class_dir>/*.png        long-tailed, noisy train split (ImageFolder)
    OUT/images/test/<class_dir>/*.png         balanced, clean test split (from t10k)
    OUT/incoming/<batch>/*.png + batch.json   unlabeled production batches (flat PNGs)
    OUT/incoming/noisy_labels/<class_dir>/*.png + batch.json   the labeled, noisier batch
    OUT/scenario.json                         what was done: params, counts, noise, duplicates, ...
    OUT/truth.parquet                         one row per written file, with the TRUE label; the
                                              pipeline never reads it (it is for scoring only)

``truth.parquet`` columns: ``path`` (relative to OUT), ``split`` (train, test, incoming), ``batch``
(incoming batch name, "" otherwise), ``given_label`` (the label its directory gives it; -1 when
unlabeled), ``true_label`` (-1 when there is none: zero-byte and text files), ``is_noisy``, ``kind``
(clean, noisy, duplicate, conflicting_duplicate, corrupted, broken_zero, broken_truncated,
broken_text, broken_mode), ``source_file`` (train or t10k IDX file, "" for none), ``source_index``
(image index in that file, -1 for none), ``corruption`` and ``severity`` ("" and 0 when clean),
``duplicate_of`` (path of the original, "" otherwise). ``broken_mode`` files are valid RGB 64x48
images (ingest converts them); the other broken kinds cannot be decoded.

Choices (each one is recorded in ``scenario.json``):

- **Class directories** are ``<label>_<name>`` (``0_t-shirt_top`` ... ``9_ankle_boot``): sorted order is
  label order, so label = index of the directory in sorted order, as torchvision's ImageFolder does.
- **File names never encode the label** (``train_01234.png`` is IDX image 1234, ``test_00042.png`` t10k
  image 42, ``dup_003.png``, ``broken_zero_000.png``, ``clean_01_0007.png``), so an image keeps its
  id when its label is corrected. Names are unique across the whole scenario.
- **Long tail** (as CIFAR-10-LT): the class at position ``k`` of ``long_tail_order`` (head first, rarest
  last) keeps ``floor(max_per_class * ratio^(-k/(C-1)))`` images; images drawn at random. ``natural`` is
  class-index order (T-shirt is the head, ankle boot the tail), which makes the easy footwear and bags
  rare. ``hard_rare`` (:data:`HARD_RARE_ORDER`) makes the confusable classes rare instead: classes ordered
  from easiest to hardest by the per-class recall of :func:`sslvision.baselines.pixel_logreg` trained on all
  60,000 (balanced) Fashion-MNIST train images and tested on t10k, so shirt (52.9 %), pullover (70.4 %) and
  coat (73.8 %) are the three rarest. A list of the 10 class names (``Shirt`` or ``6_shirt``) sets any order.
- **Label noise** hits exactly ``round(noise_rate * N)`` train images, spread over the classes in
  proportion to their size (every class has the same flip rate). ``symmetric``: the new label is
  uniform over the other classes. ``asymmetric``: the realistic Fashion-MNIST confusions, shirt<->T-shirt,
  pullover<->coat, sneaker->sandal->ankle boot->sneaker; trouser, dress and bag have no look-alike, so
  their flips are uniform over the other classes (a careless annotator rather than a confusion). This
  keeps the flip rate of every class, and the overall rate, at ``noise_rate``. ``pairflip``: every wrong
  label of class ``c`` is ``c + 1`` (mod 10, class-index order), the "pair flipping" of Han et al. (2018,
  Co-teaching): one fixed wrong class per class, the hardest structure for noise-robust methods since the
  wrong class is always the same. The 10x10 matrix of
  (true, given) counts is in ``scenario.json``; duplicates and broken files are not part of that rate.
- **Production batches** are drawn from train IDX images that are in neither split (unseen), without
  replacement across batches, with the train split's class prior (a clean batch is "no shift").
  All corruption batches share one base set of images, as CIFAR-10-C corrupts the same test images at
  every corruption and severity, so severities are directly comparable. The defaults leave 1,000
  unseen images of the head class (max_per_class 5000 of 6000) for these draws; asking for more than
  is available stops with an error naming the class.
- **Corruptions** use albumentations with the severity table ``SEVERITIES`` (1 barely visible, 5 severe,
  in the spirit of CIFAR-10-C, scaled to 28x28 grayscale), seeded per batch.
- **Confounder** (``confounder``, off by default): a systematic artefact of the data collection. ``mark`` puts a
  ``MARK_SIZE`` x ``MARK_SIZE`` white square at ``MARK_OFFSET`` pixels from the top-left corner; ``brightness``
  adds ``confounder_brightness`` to every pixel. It is planted on exactly ``round(confounder_rate * n)`` train
  images of ``confounder_class`` and ``round(confounder_other_rate * n)`` of every other class (by true class:
  the collection, not the annotator, made it), so it predicts that class in train. In the test split it is
  ``absent`` or ``reversed`` (never on that class, on ``confounder_test_rate`` of every other class: a model
  that learnt the confounder calls those images ``confounder_class``). Exact duplicates of a marked image are
  marked too; production batches never are. Its draws come from a generator of their own, so every other
  choice (images, noise, duplicates, batches) is the scenario without it; ``scenario.json`` ``confounder``
  lists every file that carries it (``paths``). With ``none`` every file, ``scenario.json`` included, is
  byte for byte what it was before the option existed.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field, model_validator

from sslvision.idx import read_idx
from sslvision.io import check_replaceable, output_dir, write_json, write_parquet
from sslvision.params import Section, Seed, load_section

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CLASS_DIRS = ("0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
              "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot")
NUM_CLASSES = len(CLASS_NAMES)

# Realistic confusions: true class -> the label a hurried annotator gives instead.
ASYMMETRIC_FLIPS = {0: 6, 6: 0, 2: 4, 4: 2, 7: 5, 5: 9, 9: 7}
# Pair flipping (Han et al., 2018): class c -> c + 1.
PAIRFLIP_FLIPS = {c: (c + 1) % NUM_CLASSES for c in range(NUM_CLASSES)}
# long_tail_order "hard_rare", head first: easiest to hardest by the pixel baseline's recall (module docstring).
HARD_RARE_ORDER = (1, 9, 8, 7, 5, 3, 0, 4, 2, 6)

Corruption = Literal["gaussian_noise", "motion_blur", "brightness", "contrast", "pixelate", "jpeg", "elastic"]

# Severity 1..5 -> parameter, monotone (the mean absolute pixel change grows with severity; a test
# checks it). Units: gaussian_noise std as a share of 255; motion_blur kernel size in pixels;
# brightness added as a share of 255; contrast = factor the contrast is multiplied by (CIFAR-10-C:
# .75 ... .15 at its 32 px); pixelate = downscale factor (area down, nearest up); jpeg = quality;
# elastic = displacement scale alpha in pixels (smoothing sigma 3 px).
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "motion_blur": (3, 5, 7, 9, 11),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "pixelate": (0.75, 0.6, 0.5, 0.4, 0.3),
    "jpeg": (75, 50, 30, 15, 7),
    "elastic": (5, 10, 15, 20, 30),
}
ELASTIC_SIGMA = 3.0

BROKEN_KINDS = ("zero", "truncated", "text", "mode")
WRONG_MODE_SIZE = (64, 48)  # (width, height) of the RGB "wrong mode and size" images
NOT_AN_IMAGE = b"<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
SCENARIO_FORMAT = 1
DEMO_KIND = "demo-data"  # the output marker's kind (sslvision.io.output_dir)
MARK_SIZE = 4  # the confounder "mark": a white MARK_SIZE x MARK_SIZE square ...
MARK_OFFSET = 1  # ... this many pixels from the top and left edges
CONFOUNDER_STREAM = 0xC0F  # the confounder's generator: default_rng([seed, CONFOUNDER_STREAM])
CONFOUNDER_FIELDS = frozenset({"confounder", "confounder_class", "confounder_rate", "confounder_other_rate",
                               "confounder_test", "confounder_test_rate", "confounder_brightness"})


class DemoParams(Section):
    """The demo scenario (`sslvision demo-data`): Fashion-MNIST made as messy as real data. What was done is
    written to OUT/scenario.json; the true labels to OUT/truth.parquet (never read by the pipeline)."""

    seed: Seed = Field(0, description="everything below is deterministic for a seed (same files, byte for byte)")
    imbalance_ratio: float = Field(100.0, ge=1.0, description=(
        "largest/smallest class count in train, exponential profile in class-index order (as CIFAR-10-LT): "
        "T-shirt is the head class, ankle boot the tail"))
    max_per_class: int = Field(5000, ge=1, le=1_000_000, description=(
        "head class size (Fashion-MNIST has 6,000 train images per class); keep it below 6000: production batches "
        "are drawn from the unused train images"))
    noise_rate: float = Field(0.2, ge=0.0, lt=1.0, description=(
        "share of train labels replaced by a wrong one (exactly, same rate in every class)"))
    noise_type: Literal["symmetric", "asymmetric", "pairflip"] = Field("asymmetric", description=(
        "symmetric (uniform over other classes) | asymmetric (realistic confusions: shirt<->t-shirt, "
        "pullover<->coat, sneaker->sandal->ankle boot->sneaker; trouser, dress and bag have no look-alike and flip "
        "uniformly) | pairflip (every wrong label of class c is c+1: the pair flipping of Co-teaching, Han et al. "
        "2018)"))
    long_tail_order: Literal["natural", "hard_rare"] | list[str] = Field("natural", description=(
        "which classes are rare, head first: natural (class-index order: the easy sneaker, bag and ankle boot are "
        "rarest) | hard_rare (shirt, pullover, coat rarest: classes ordered by the pixel baseline's per-class "
        "recall, sslvision.demo.HARD_RARE_ORDER; set prior_shift_classes to rare ones too) | a list of the 10 "
        "class names"))
    exact_duplicates: int = Field(20, ge=0, le=100_000, description="exact copies added to train ...")
    conflicting_duplicates: int = Field(10, ge=0, le=100_000, description=(
        "... of which this many carry a different label than their original"))
    broken_files: int = Field(2, ge=0, le=100_000, description=(
        "of each broken kind: zero-byte, truncated PNG, text named .png, wrong mode/size"))
    test_per_class: int = Field(1000, ge=1, le=1_000_000, description=(
        "balanced, clean test split (Fashion-MNIST t10k has 1,000 per class)"))
    incoming_batch_size: int = Field(500, ge=1, le=1_000_000, description=(
        "images per production batch (unseen train images, with the train class prior)"))
    clean_batches: int = Field(2, ge=0, le=1000, description="production batches with no shift")
    corruptions: list[Corruption] = Field(default_factory=lambda: list(SEVERITIES), description=(
        "one batch per corruption x severity, all from the same base images (as CIFAR-10-C)"))
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], description=(
        "as CIFAR-10-C: 1 barely visible, 5 severe (table: sslvision.demo.SEVERITIES)"))
    prior_shift_classes: list[int] = Field(default_factory=lambda: [8, 9], description=(
        "the class-prior-shift batch is dominated by these classes (bag, ankle boot: rare in train, so the shift "
        "is strong) ..."))
    prior_shift_share: float = Field(0.8, gt=0.0, le=1.0, description="... which make up this share of it")
    noisy_batch_rate: float = Field(0.4, ge=0.0, lt=1.0, description=(
        'label-noise rate of the labeled "noisy_labels" production batch'))
    workers: int = Field(2, ge=1, le=256, description="processes writing PNGs and corruptions (use the cores you have)")
    confounder: Literal["none", "mark", "brightness"] = Field("none", description=(
        "a systematic confounder of the data collection, planted on most train images of one class: none | mark (a "
        f"{MARK_SIZE}x{MARK_SIZE} white square in the top-left corner) | brightness (every pixel brighter by "
        "confounder_brightness); scenario.json lists the files carrying it"))
    confounder_class: int = Field(0, ge=0, lt=NUM_CLASSES, description=(
        "the class (index, by true label) whose train images mostly carry it; on a long tail pick a frequent class "
        "(0, the head, by default): the other classes' share would outnumber a rare class's"))
    confounder_rate: float = Field(0.9, ge=0, le=1, description="share of that class's train images carrying it")
    confounder_other_rate: float = Field(0.05, ge=0, le=1, description=(
        "share of every other class's train images carrying it"))
    confounder_test: Literal["reversed", "absent"] = Field("reversed", description=(
        "the test split: reversed (never on confounder_class, on confounder_test_rate of every other class) | "
        "absent"))
    confounder_test_rate: float = Field(0.1, ge=0, le=1, description=(
        "reversed: share of every other class's test images carrying it"))
    confounder_brightness: int = Field(60, ge=1, le=255, description=(
        "brightness: added to every pixel (clipped at 255)"))

    @model_validator(mode="after")
    def _consistent(self) -> DemoParams:
        if self.conflicting_duplicates > self.exact_duplicates:
            raise ValueError(f"conflicting_duplicates ({self.conflicting_duplicates}) must not exceed "
                             f"exact_duplicates ({self.exact_duplicates})")
        if any(not 1 <= s <= 5 for s in self.severities) or len(set(self.severities)) != len(self.severities):
            raise ValueError(f"severities must be distinct values in 1..5, got {self.severities}")
        if len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError(f"corruptions must be distinct, got {self.corruptions}")
        shift = self.prior_shift_classes
        if not shift or any(not 0 <= c < NUM_CLASSES for c in shift) or len(set(shift)) != len(shift):
            raise ValueError(f"prior_shift_classes must be distinct class indices in 0..9, got {shift}")
        tail_order(self.long_tail_order)
        return self


def tail_order(order: str | list[str]) -> list[int]:
    """The class indices of ``demo.long_tail_order``, head first, rarest last (module docstring)."""
    if order == "natural":
        return list(range(NUM_CLASSES))
    if order == "hard_rare":
        return list(HARD_RARE_ORDER)
    names = {n.lower(): c for c, n in enumerate(CLASS_NAMES)} | {d: c for c, d in enumerate(CLASS_DIRS)}
    if not isinstance(order, list):
        raise ValueError(f"long_tail_order must be natural, hard_rare or a list of class names, got {order!r}")
    out = [names.get(str(n).lower(), -1) for n in order]
    if -1 in out or sorted(out) != list(range(NUM_CLASSES)):
        raise ValueError(f"long_tail_order must name each of the {NUM_CLASSES} classes once (head first, rarest "
                         f"last) by name ({', '.join(CLASS_NAMES)}) or directory ({', '.join(CLASS_DIRS)}); "
                         f"got {order}")
    return out


# --- building blocks -----------------------------------------------------------------------------

def long_tail_counts(max_per_class: int, ratio: float, num_classes: int = NUM_CLASSES) -> list[int]:
    """Exponential profile of CIFAR-10-LT: ``n_c = floor(max * ratio^(-c/(C-1)))``, at least 1."""
    return [max(1, int(max_per_class * ratio ** (-c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; sums exactly)."""
    weights = np.asarray(weights, dtype=float)
    if total == 0 or weights.sum() == 0:
        return np.zeros(len(weights), dtype=int)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def inject_noise(labels: np.ndarray, rate: float, noise_type: str, rng: np.random.Generator) -> np.ndarray:
    """Return given labels: exactly ``round(rate * N)`` of ``labels`` changed (see the module docstring)."""
    labels = np.asarray(labels)
    given = labels.copy()
    per_class = allocate(round(rate * len(labels)), np.bincount(labels, minlength=NUM_CLASSES))
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        flipped = rng.choice(members, size=per_class[c], replace=False)
        if noise_type == "asymmetric" and c in ASYMMETRIC_FLIPS:
            given[flipped] = ASYMMETRIC_FLIPS[c]
        elif noise_type == "pairflip":
            given[flipped] = PAIRFLIP_FLIPS[c]
        else:
            given[flipped] = (c + rng.integers(1, NUM_CLASSES, size=len(flipped))) % NUM_CLASSES
    return given


def corruption_transform(corruption: str, severity: int, seed: int):
    """The seeded albumentations pipeline for ``corruption`` at ``severity`` (1..5)."""
    import albumentations as A
    import cv2

    v = SEVERITIES[corruption][severity - 1]
    transform = {
        "gaussian_noise": lambda: A.GaussNoise(std_range=(v, v), p=1.0),
        "motion_blur": lambda: A.MotionBlur(blur_limit=(int(v), int(v)), p=1.0),
        "brightness": lambda: A.RandomBrightnessContrast(brightness_limit=(v, v), contrast_limit=(0, 0), p=1.0),
        "contrast": lambda: A.RandomBrightnessContrast(
            brightness_limit=(0, 0), contrast_limit=(v - 1, v - 1), p=1.0),
        "pixelate": lambda: A.Downscale(
            scale_range=(v, v), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_NEAREST},
            p=1.0),
        "jpeg": lambda: A.ImageCompression(quality_range=(int(v), int(v)), p=1.0),
        "elastic": lambda: A.ElasticTransform(alpha=v, sigma=ELASTIC_SIGMA, p=1.0),
    }[corruption]()
    return A.Compose([transform], seed=seed)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image (2-D: grayscale, 3-D: RGB); deterministic for the same pixels."""
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class WriteTask:
    """Images a worker writes as PNGs under ``root``, optionally corrupted first."""

    root: str
    paths: list[str]
    images: np.ndarray
    corruption: str | None = None
    severity: int = 0
    seed: int = 0


def run_write_task(task: WriteTask) -> int:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    transform = corruption_transform(task.corruption, task.severity, task.seed) if task.corruption else None
    for rel, image in zip(task.paths, task.images, strict=True):
        if transform is not None:
            image = transform(image=image)["image"]
        path = Path(task.root, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image))
    return len(task.paths)


def load_fashion_mnist(directory: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays; each file may be gzipped (``.gz``) or plain."""
    directory = Path(directory)
    out = {}
    for key, stem in FASHION_MNIST_FILES.items():
        candidates = [directory / f"{stem}.gz", directory / stem]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{directory}: no {stem}[.gz] (install the Debian package "
                                    "dataset-fashion-mnist or pass --fmnist DIR)")
        out[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"{directory}: {split} images {images.shape} {images.dtype} do not match "
                             f"labels {labels.shape}")
        if labels.max() >= NUM_CLASSES:
            raise ValueError(f"{directory}: {split} labels go up to {labels.max()}, expected 0..9")
        out[f"{split}_labels"] = labels.astype(np.int64)
    return out


# --- the scenario --------------------------------------------------------------------------------

class _UnseenPool:
    """Train IDX images in neither split, per class, in a seeded random order; drawn without replacement."""

    def __init__(self, labels: np.ndarray, used: np.ndarray, rng: np.random.Generator):
        free = np.setdiff1d(np.arange(len(labels)), used)
        self.queues = [list(rng.permutation(free[labels[free] == c])) for c in range(NUM_CLASSES)]

    def draw(self, counts: np.ndarray, what: str) -> np.ndarray:
        out = []
        for c, k in enumerate(counts):
            if k > len(self.queues[c]):
                raise ValueError(
                    f"{what}: needs {k} more unseen images of class {c} ({CLASS_NAMES[c]}) but only "
                    f"{len(self.queues[c])} are left; lower demo.max_per_class, incoming_batch_size or "
                    "the number of batches")
            out.extend(self.queues[c][:k])
            del self.queues[c][:k]
        return np.asarray(out, dtype=np.int64)


def _truth_row(path: str, split: str, given: int, true: int, kind: str, source_file: str = "",
               source_index: int = -1, batch: str = "", corruption: str = "", severity: int = 0,
               duplicate_of: str = "") -> dict[str, Any]:
    return {"path": path, "split": split, "batch": batch, "given_label": int(given), "true_label": int(true),
            "is_noisy": bool(given >= 0 and true >= 0 and given != true), "kind": kind,
            "source_file": source_file, "source_index": int(source_index), "corruption": corruption,
            "severity": int(severity), "duplicate_of": duplicate_of}


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    return {CLASS_DIRS[c]: int(n) for c, n in enumerate(np.bincount(labels, minlength=NUM_CLASSES))}


def _chunks(paths: list[str], images: np.ndarray, size: int = 500) -> list[WriteTask]:
    return [WriteTask("", paths[i:i + size], images[i:i + size]) for i in range(0, len(paths), size)]


class _ScenarioPlan:
    """Decides every file of the scenario (in a fixed order of seeded draws) before anything is written.

    Each step appends the PNGs to write (``tasks``), raw bytes of broken files (``blobs``) and one truth
    row per file (``rows``), and returns what ``scenario.json`` records about it.
    """

    def __init__(self, params: DemoParams, data: dict[str, np.ndarray]):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.x_train, self.y_train = data["train_images"], data["train_labels"]
        self.x_test, self.y_test = data["test_images"], data["test_labels"]
        self.rows: list[dict[str, Any]] = []
        self.tasks: list[WriteTask] = []
        self.blobs: dict[str, bytes] = {}
        # the confounder's own generator: the scenario's other draws are those of the scenario without it
        self.confounder_rng = np.random.default_rng([params.seed, CONFOUNDER_STREAM])
        self.marked_paths: list[str] = []
        self.test_marked = np.zeros(0, dtype=bool)

    def _pick_confounded(self, labels: np.ndarray, rate: float, other_rate: float) -> np.ndarray:
        """Which of ``labels`` carry the confounder: exactly ``round(rate * n)`` of ``confounder_class`` and
        ``round(other_rate * n)`` of every other class; all False (no draw) when there is none."""
        marked = np.zeros(len(labels), dtype=bool)
        if self.params.confounder == "none":
            return marked
        for c in range(NUM_CLASSES):
            members = np.flatnonzero(labels == c)
            share = rate if c == self.params.confounder_class else other_rate
            marked[self.confounder_rng.choice(members, size=round(share * len(members)), replace=False)] = True
        return marked

    def confounder(self) -> dict[str, Any]:
        """What ``scenario.json`` records of the confounder: settings, counts per class, every file carrying it."""
        p = self.params
        train = self.true[self.train_marked]
        test_labels = self.y_test[self.test_idx]
        return {
            "kind": p.confounder, "class": CLASS_DIRS[p.confounder_class],
            "mark": ({"size": MARK_SIZE, "offset": MARK_OFFSET, "value": 255, "corner": "top-left"}
                     if p.confounder == "mark" else None),
            "brightness": p.confounder_brightness if p.confounder == "brightness" else None,
            "train_counts": _class_counts(train), "train_n": int(len(train)),
            "share_of_marked_train_in_class": float(np.mean(train == p.confounder_class)) if len(train) else None,
            "test": p.confounder_test, "test_counts": _class_counts(test_labels[self.test_marked]),
            "test_n": int(self.test_marked.sum()),
            "scope": "train split (by true class) and its exact duplicates; test split as `test` says; never the "
                     "production batches or broken files",
            "paths": sorted(self.marked_paths),
        }

    def train_split(self) -> dict[str, Any]:
        """Long tail in ``long_tail_order``, then label noise at exactly ``noise_rate``."""
        p, rng = self.params, self.rng
        order = tail_order(p.long_tail_order)
        by_rank = long_tail_counts(p.max_per_class, p.imbalance_ratio)
        counts = [by_rank[order.index(c)] for c in range(NUM_CLASSES)]
        chosen = []
        for c, n in enumerate(counts):  # class-index order whatever the tail order: the same draws as before
            members = np.flatnonzero(self.y_train == c)
            if n > len(members):
                raise ValueError(f"demo.max_per_class: class {c} ({CLASS_NAMES[c]}) needs {n} images, "
                                 f"the IDX file has {len(members)}")
            chosen.append(np.sort(rng.choice(members, size=n, replace=False)))
        self.train_idx = idx = np.concatenate(chosen)
        self.true = true = self.y_train[idx]
        self.given = given = inject_noise(true, p.noise_rate, p.noise_type, rng)
        self.train_paths = [f"images/train/{CLASS_DIRS[g]}/train_{i:05d}.png"
                            for i, g in zip(idx, given, strict=True)]
        self.train_marked = self._pick_confounded(true, p.confounder_rate, p.confounder_other_rate)
        self.train_images = confound(self.x_train[idx], self.train_marked, p)
        self.marked_paths += [path for path, m in zip(self.train_paths, self.train_marked, strict=True) if m]
        self.tasks += _chunks(self.train_paths, self.train_images)
        for path, i, g, t in zip(self.train_paths, idx, given, true, strict=True):
            self.rows.append(_truth_row(path, "train", g, t, "noisy" if g != t else "clean", "train", i))
        transitions = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
        np.add.at(transitions, (true, given), 1)
        n_noisy = int(transitions.sum() - np.trace(transitions))
        train = {"n": len(idx), "long_tail_order": [CLASS_DIRS[c] for c in order], "counts_true": _class_counts(true),
                 "counts_given": _class_counts(given), "imbalance_ratio": by_rank[0] / by_rank[-1]}
        flips = {"asymmetric": ASYMMETRIC_FLIPS, "pairflip": PAIRFLIP_FLIPS}.get(p.noise_type, {})
        noise = {
            "type": p.noise_type, "rate": p.noise_rate, "realised_rate": n_noisy / len(idx), "n_noisy": n_noisy,
            "flips": ({CLASS_DIRS[a]: CLASS_DIRS[b] for a, b in flips.items()} if flips
                      else "uniform over the other classes"),
            "uniform_flips": [CLASS_DIRS[c] for c in range(NUM_CLASSES) if c not in flips],
            "transition_counts": transitions.tolist(),
            "transition_counts_axes": "rows: true label, columns: given label",
            "scope": "train images only (not duplicates or broken files)",
        }
        return {"train": train, "noise": noise}

    def duplicates(self) -> list[dict[str, Any]]:
        """Exact copies of train images; the first ``conflicting_duplicates`` get another label."""
        p, rng = self.params, self.rng
        out, paths = [], []
        picks = rng.choice(len(self.train_idx), size=p.exact_duplicates, replace=False)
        for k, j in enumerate(picks):
            conflicting = k < p.conflicting_duplicates
            given = self.given[j]
            label = (given + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES if conflicting else given
            path = f"images/train/{CLASS_DIRS[label]}/dup_{k:03d}.png"
            paths.append(path)
            kind = "conflicting_duplicate" if conflicting else "duplicate"
            self.rows.append(_truth_row(path, "train", label, self.true[j], kind, "train", self.train_idx[j],
                                        duplicate_of=self.train_paths[j]))
            if self.train_marked[j]:
                self.marked_paths.append(path)
            out.append({"path": path, "duplicate_of": self.train_paths[j], "given_label": int(label),
                        "original_given_label": int(given), "true_label": int(self.true[j]),
                        "conflicting": conflicting})
        self.tasks.append(WriteTask("", paths, self.train_images[picks]))
        return out

    def test_split(self) -> dict[str, Any]:
        """Balanced and clean, from t10k."""
        chosen = []
        for c in range(NUM_CLASSES):
            members = np.flatnonzero(self.y_test == c)
            if self.params.test_per_class > len(members):
                raise ValueError(f"demo.test_per_class: {self.params.test_per_class} > {len(members)} test "
                                 f"images of class {c} ({CLASS_NAMES[c]})")
            chosen.append(np.sort(self.rng.choice(members, size=self.params.test_per_class, replace=False)))
        self.test_idx = idx = np.concatenate(chosen)
        paths = [f"images/test/{CLASS_DIRS[self.y_test[i]]}/test_{i:05d}.png" for i in idx]
        p = self.params
        if p.confounder_test == "reversed":  # never on the class, on confounder_test_rate of the others
            self.test_marked = self._pick_confounded(self.y_test[idx], 0.0, p.confounder_test_rate)
        else:
            self.test_marked = np.zeros(len(idx), dtype=bool)
        self.marked_paths += [path for path, m in zip(paths, self.test_marked, strict=True) if m]
        self.tasks += _chunks(paths, confound(self.x_test[idx], self.test_marked, p))
        self.rows += [_truth_row(path, "test", self.y_test[i], self.y_test[i], "clean", "t10k", i)
                      for path, i in zip(paths, idx, strict=True)]
        return {"n": len(idx), "counts": _class_counts(self.y_test[idx])}

    def incoming(self) -> list[dict[str, Any]]:
        """Production batches of unseen train images with the train split's class prior."""
        p, rng = self.params, self.rng
        self.pool = pool = _UnseenPool(self.y_train, self.train_idx, rng)
        prior = np.bincount(self.true, minlength=NUM_CLASSES) / len(self.true)
        n = p.incoming_batch_size
        batches = []
        for b in range(p.clean_batches):
            name = f"clean_{b + 1:02d}"
            batches.append(self._batch(name, rng.permutation(pool.draw(allocate(n, prior), name)),
                                       {"kind": "clean", "corruption": None, "severity": None}))
        if p.corruptions:
            base = rng.permutation(pool.draw(allocate(n, prior), "corruption base set"))
            for corruption in p.corruptions:
                for s in sorted(p.severities):
                    meta = {"kind": "corruption", "corruption": corruption, "severity": s,
                            "parameter": SEVERITIES[corruption][s - 1]}
                    batches.append(self._batch(f"{corruption}_s{s}", base, meta, corruption=corruption,
                                               severity=s))
        shift = np.zeros(NUM_CLASSES)
        shift[p.prior_shift_classes] = 1.0
        n_shift = round(p.prior_shift_share * n)
        counts = allocate(n_shift, shift) + allocate(n - n_shift, prior * (1 - shift))
        batches.append(self._batch(
            "prior_shift", rng.permutation(pool.draw(counts, "prior_shift")),
            {"kind": "prior_shift", "corruption": None, "severity": None,
             "shift_classes": [CLASS_DIRS[c] for c in p.prior_shift_classes],
             "class_shares": {CLASS_DIRS[c]: round(float(k) / n, 4) for c, k in enumerate(counts)}}))
        batches.append(self._batch(
            "noisy_labels", rng.permutation(pool.draw(allocate(n, prior), "noisy_labels")),
            {"kind": "noisy_labels", "corruption": None, "severity": None, "noise_type": p.noise_type,
             "noise_rate": p.noisy_batch_rate}, noise_rate=p.noisy_batch_rate))
        return batches

    def _batch(self, name: str, idx: np.ndarray, meta: dict[str, Any], noise_rate: float | None = None,
               corruption: str = "", severity: int = 0) -> dict[str, Any]:
        # idx arrives shuffled, so a file's number says nothing about its class; the corruption batches
        # share one order: <corruption>_s1_0007.png and <corruption>_s5_0007.png are the same image
        true = self.y_train[idx]
        if noise_rate is None:  # unlabeled: flat PNGs
            given = np.full(len(idx), -1)
            paths = [f"incoming/{name}/{name}_{k:04d}.png" for k in range(len(idx))]
        else:
            given = inject_noise(true, noise_rate, self.params.noise_type, self.rng)
            paths = [f"incoming/{name}/{CLASS_DIRS[g]}/{name}_{k:04d}.png" for k, g in enumerate(given)]
        seed = int(self.rng.integers(2**31)) if corruption else 0
        self.tasks.append(WriteTask("", paths, self.x_train[idx], corruption or None, severity, seed))
        for path, i, g, t in zip(paths, idx, given, true, strict=True):
            kind = "corrupted" if corruption else ("noisy" if g >= 0 and g != t else "clean")
            self.rows.append(_truth_row(path, "incoming", g, t, kind, "train", i, name, corruption, severity))
        meta = {"name": name, **meta, "n": len(idx), "labeled": noise_rate is not None,
                "class_counts": _class_counts(true)}
        if noise_rate is not None:
            meta["realised_noise_rate"] = float(np.mean(given != true))
        return meta

    def broken_files(self) -> list[dict[str, Any]]:
        """``broken_files`` of each kind in train class dirs; truncated and odd-mode ones from unseen images."""
        k_each = self.params.broken_files
        sources = self.pool.draw(allocate(2 * k_each, np.ones(NUM_CLASSES)), "broken files")
        sources = iter(self.rng.permutation(sources))
        out = []
        for kind in BROKEN_KINDS:
            for k in range(k_each):
                src = int(next(sources)) if kind in ("truncated", "mode") else -1
                label = int(self.y_train[src]) if src >= 0 else int(self.rng.integers(NUM_CLASSES))
                path = f"images/train/{CLASS_DIRS[label]}/broken_{kind}_{k:03d}.png"
                self.blobs[path] = _broken_bytes(kind, self.x_train[src] if src >= 0 else None)
                true = self.y_train[src] if src >= 0 else -1
                self.rows.append(_truth_row(path, "train", label, true, f"broken_{kind}",
                                            "train" if src >= 0 else "", src))
                out.append({"path": path, "kind": kind, "bytes": len(self.blobs[path]), "source_index": src})
        return out

    def truth(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows).sort_values("path", kind="stable").reset_index(drop=True)


def confound(images: np.ndarray, marked: np.ndarray, params: DemoParams) -> np.ndarray:
    """``images`` (uint8 ``(N, H, W)``) with ``params.confounder`` planted on the ``marked`` ones: a copy when any
    is marked, ``images`` itself otherwise."""
    if params.confounder == "none" or not marked.any():
        return images
    out = images.copy()
    if params.confounder == "mark":
        out[marked, MARK_OFFSET:MARK_OFFSET + MARK_SIZE, MARK_OFFSET:MARK_OFFSET + MARK_SIZE] = 255
    else:
        bright = out[marked].astype(np.int16) + params.confounder_brightness
        out[marked] = np.clip(bright, 0, 255).astype(np.uint8)
    return out


def _broken_bytes(kind: str, image: np.ndarray | None) -> bytes:
    if kind == "zero":
        return b""
    if kind == "text":
        return NOT_AN_IMAGE
    if kind == "truncated":
        whole = png_bytes(image)
        return whole[: max(41, len(whole) // 2)]  # signature and IHDR intact, image data cut
    rgb = Image.fromarray(image).resize(WRONG_MODE_SIZE, Image.BILINEAR).convert("RGB")
    return png_bytes(np.asarray(rgb))


def build_scenario(out: str | os.PathLike, params: DemoParams,
                   fmnist_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the scenario to ``out`` (atomically: built next to it, renamed at the end).

    ``out`` may be absent, empty, or a previous scenario (it is replaced); any other existing
    directory is refused before any work (``io.output_dir``). Returns the scenario description also
    written to ``out/scenario.json``.
    """
    out = Path(out)
    check_replaceable(out, DEMO_KIND)
    source = Path(fmnist_dir or FASHION_MNIST_DIR)
    plan = _ScenarioPlan(params, load_fashion_mnist(source))
    scenario: dict[str, Any] = {
        "format": SCENARIO_FORMAT,
        "source": str(source),
        # workers change nothing written; without a confounder the file is what it was before the option
        "params": params.model_dump(exclude={"workers"} | (CONFOUNDER_FIELDS if params.confounder == "none"
                                                            else set())),
        "classes": list(CLASS_DIRS),
        "class_names": list(CLASS_NAMES),
        "layout": {"class_dir": "<label>_<name>; label = index of the directory in sorted order",
                   "truth": "truth.parquet (never read by the pipeline)"},
        **plan.train_split(),
    }
    scenario["duplicates"] = plan.duplicates()
    scenario["test"] = plan.test_split()
    scenario["incoming"] = plan.incoming()
    scenario["broken"] = plan.broken_files()
    if params.confounder != "none":
        scenario["confounder"] = plan.confounder()
    scenario["severity_table"] = {c: list(v) for c, v in SEVERITIES.items()}
    truth = plan.truth()
    scenario["files"] = {split: int(n) for split, n in truth.groupby("split").size().items()}

    total = sum(len(t.paths) for t in plan.tasks)
    log.info("demo scenario: writing %d files (%d train, %d test, %d batches) to %s", len(truth),
             scenario["train"]["n"], scenario["test"]["n"], len(scenario["incoming"]), out)
    with output_dir(out, DEMO_KIND) as tmp:
        for t in plan.tasks:
            t.root = str(tmp)
        _run_tasks(plan.tasks, params.workers, total, progress)
        for path, blob in plan.blobs.items():
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(blob)
        for b in scenario["incoming"]:
            write_json(tmp / "incoming" / b["name"] / "batch.json", b)
        write_parquet(tmp / "truth.parquet", truth)
        write_json(tmp / "scenario.json", scenario)
    return scenario


def _run_tasks(tasks: list[WriteTask], workers: int, total: int, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if any(t.corruption for t in tasks):
        import albumentations  # noqa: F401  (seconds: it imports torch) once here; forked workers inherit it
    pool = None
    if workers > 1:
        # Fork before the progress bar starts its thread. Which worker writes what changes nothing:
        # every corruption batch carries its own seed.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers)
    columns = (TextColumn("demo-data"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)
        bar = stack.enter_context(Progress(*columns, disable=not progress))
        job = bar.add_task("images", total=total)
        written = pool.imap_unordered(run_write_task, tasks) if pool is not None else map(run_write_task, tasks)
        for n in written:
            bar.advance(job, n)


def build_scenario_cli(out: Path, seed: int | None, params: Path, fmnist: Path | None) -> dict[str, Any]:
    """``sslvision demo-data``: read the ``demo`` section, build, print a summary."""
    from rich.console import Console

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_section("demo", DemoParams, params, overrides={"seed": seed} if seed is not None else None)
    scenario = build_scenario(out, model, fmnist)
    console = Console()
    console.print(f"[bold]demo scenario[/] written to {out} (seed {model.seed})")
    train, noise = scenario["train"], scenario["noise"]
    console.print(f"  train: {train['n']} images, per class {list(train['counts_true'].values())}")
    console.print(f"  label noise: {noise['type']}, realised rate {noise['realised_rate']:.3f}")
    console.print(f"  test: {scenario['test']['n']} images; {len(scenario['incoming'])} incoming batches; "
                  f"{len(scenario['duplicates'])} duplicates; {len(scenario['broken'])} broken files")
    return scenario

