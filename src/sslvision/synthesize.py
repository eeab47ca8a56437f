"""The synthesize stage: new, credible training images for the rare classes, checked in SSL space.

Pipeline (``synthesize``):

1. **Plan** (:func:`plan_classes`): count the clean labeled ``train`` images of each class and bring
   every class below ``target`` (``median`` or ``max`` of the class counts, or a number) up to it, at
   most ``max_per_class`` new images per class (``classes`` restricts which classes may receive any).
   ``oversample`` times as many candidates as needed are made, because the filter rejects some.
2. **Generate** candidates from the class's own real images with one generator:

   - ``mae_inpaint``: optionally replace a share (``mix_share``) of an image's patches with the same
     patches of a second image of the class, optionally (``pre_augment``) give the result a random
     ``augment`` transform (new pose and shape; the decoder then redraws what the warp and erasing
     left), hide ``mask_ratio`` of the patches and let a decoder reconstruct them from the frozen
     encoder's view of the visible ones (visible pixels are kept, as MAE shows its reconstructions),
     and optionally (``post_augment``) give the reconstruction a random ``augment`` transform.
     The decoder is, by backbone:

     * ViT with the MAE decoder pretrain kept (``pretrain.method`` mae / cl_mim): that decoder;
     * ViT without one: an :class:`~sslvision.models.MAEDecoder` trained here on the frozen encoder's
       visible-patch tokens (pixel targets);
     * ResNet (no tokens to drop): an inpainter trained here on the frozen encoder's feature map of
       the masked image, concatenated with the masked image and the mask at full resolution (a context
       encoder whose encoder is the SSL network): a small U-Net (:class:`UNetInpainter`, ``arch: unet``)
       or four dilated convolutions (:class:`ConvInpainter`, ``arch: conv``, cheaper and blurrier).
   - ``feature_interp``: a pixel decoder (:class:`EmbeddingDecoder`) is trained to invert the SSL
     embedding (embedding -> image, all classes); new images decode points on the segment between an
     image's embedding and one of its ``neighbours`` nearest same-class neighbours, plus a little noise
     scaled by the class's spread. It samples inside the class's region of SSL space instead of around
     single images.
   - ``augment``: heavy albumentations (affine, elastic, grid distortion, intensity, noise, erasing),
     the baseline a learned generator must beat.
3. **Filter** (:class:`EmbeddingFilter`): every candidate is embedded with the encoder; a classifier
   fit on the clean real embeddings (class-balanced logistic regression, or kNN) must give its target
   class probability >= ``filter.min_confidence`` (it looks like its class), and its cosine similarity
   to the embedding of each of its source images must be <= ``filter.max_source_similarity`` (it is not
   a near-copy). Of the candidates that pass, the first ``need`` (generation order, i.e. random) are kept.
4. **Fidelity** per class, in SSL space (L2-normalised embeddings), kept synthetic vs real:
   Fréchet distance (Gaussian fit, as FID but on the SSL features; biased upwards for small classes,
   compare across generators at equal counts), and k-NN precision/recall (Kynkäänniemi et al., 2019):
   precision = share of synthetic images inside the real manifold (union of balls reaching each real
   image's k-th nearest real neighbour), recall = share of real images inside the synthetic manifold.
   Also per class: ``real_nn_similarity``, the median cosine similarity of a real image to its nearest
   real neighbour of the class, the yardstick for ``filter.max_source_similarity``.

Arrays in, arrays out: :func:`synthesize_images` (images + labels + encoder -> new images + labels).
Generators are looked up by name in :data:`GENERATORS`; :func:`register_generator` adds one.
The DVC stage (files, reports, plots, MLflow) is :mod:`sslvision.stages.synthesize`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from sslvision import io
from sslvision.metrics import l2_normalise
from sslvision.models import (
    MEAN,
    STD,
    DecoderConfig,
    Encoder,
    MAEDecoder,
    embed,
    patchify,
    to_input,
    unpatchify,
)
from sslvision.params import Section, Seed, validate_section
from sslvision.plugins import GENERATORS_GROUP, load_plugins, require_registered, watch

log = logging.getLogger(__name__)

# name -> generator class, filled by @register_generator (the built-in ones below: augment, mae_inpaint,
# feature_interp). A class provides fit(real, encoder) -> dict[str, float] and generate(real, label, count, rng)
# -> (uint8 images (count, H, W, C), source rows (count, 2), -1 for none); make_generator builds it with
# cls.from_params(params, device, pretrain_decoder, norm_pix), or cls(params, device) when it has no from_params.
GENERATORS: dict[str, type] = {}
watch("generator", GENERATORS)  # a plugin may add a generator, never replace one


def register_generator(name: str) -> Callable[[type], type]:
    """Class decorator: make a generator class available to :func:`make_generator` as ``name``.

    Args:
        name: the generator's name (``synthesize.generator``, ``synthesize_images(generator=...)``); a name
            registered again is replaced.
    Returns:
        The decorator; it sets ``cls.name = name`` and returns the class unchanged otherwise.
    """

    def add(cls: type) -> type:
        cls.name = name
        GENERATORS[name] = cls
        return cls

    return add


# --- params ----------------------------------------------------------------------------------------


class MAEInpaintParams(Section):
    # generation-only keys: they do not change the decoder's training (nor its cache key)
    GENERATION_ONLY: ClassVar[frozenset[str]] = frozenset({"mix_share", "pre_augment", "post_augment"})

    mask_ratio: float = Field(0.5, gt=0, lt=1, description=(
        "share of patches hidden and redrawn: higher = more novel, less faithful (0.75 as in MAE pretraining "
        "makes blurry garments at 28x28)"))
    mix_share: float = Field(0.25, ge=0, lt=1, description=(
        "share of patches first taken from a second image of the class (0 = no mixing)"))
    pre_augment: bool = Field(False, description=(
        "then give the image a random `augment` transform (pose, shape, erasing) before masking, so the decoder "
        "redraws hidden patches of a new view. Off: it lowered mean tail recall on the demo "
        "(benchmarks/synthesize.py)"))
    post_augment: bool = Field(False, description=(
        "give each reconstruction a random `augment` transform (inpaint, then augment). Off: it lowered mean tail "
        "recall on the demo"))
    decoder: Literal["auto", "pretrain", "train"] = Field("auto", description=(
        "auto: pretrain's MAE decoder when the encoder is a ViT that kept one, else train one here | pretrain "
        "(fail without one) | train"))
    patch_size: int = Field(4, gt=0, le=1024, description=(
        "ResNet encoders: masking grid cell in pixels (a ViT uses its own patch size)"))
    arch: Literal["unet", "conv"] = Field("unet", description=(
        "ResNet encoders: unet (two stride-2 levels + skips: the whole garment as context) | conv (four dilated "
        "3x3 convolutions, cheaper, but hidden cells come out as blurred blocks)"))
    width: int = Field(32, gt=0, le=4096, description=(
        "channels of the trained conv inpainter / width of a trained MAE decoder"))
    steps: int = Field(300, ge=0, le=10_000_000, description=(
        "decoder training steps on the frozen encoder (each step runs the encoder once)"))
    batch_size: int = Field(64, gt=0, le=65536, description="images per decoder training step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (one-cycle schedule) of the decoder")


class FeatureInterpParams(Section):
    GENERATION_ONLY: ClassVar[frozenset[str]] = frozenset({"neighbours", "t_min", "t_max", "noise"})

    neighbours: int = Field(5, gt=0, le=10_000, description=(
        "interpolate towards one of this many nearest same-class neighbours (cosine)"))
    t_min: float = Field(0.2, ge=0, le=1, description=(
        "interpolation weight range of the neighbour: 0.5 = midpoint; near 0 or 1 ..."))
    t_max: float = Field(0.8, ge=0, le=1, description=(
        "... decodes (blurred) copies of a real image, which the copy filter rejects"))
    noise: float = Field(0.1, ge=0, description=(
        "Gaussian noise added to the point, as a share of the class's per-dimension std"))
    width: int = Field(32, gt=1, le=4096, description=(
        "channels of the embedding-to-pixels decoder (64: sharper, ~4x the compute)"))
    steps: int = Field(400, ge=0, le=10_000_000, description=(
        "decoder training steps (no encoder pass: embeddings come from pretrain)"))
    batch_size: int = Field(64, gt=0, le=65536, description="images per decoder training step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (one-cycle schedule)")


class AugmentParams(Section):
    rotate: float = Field(20.0, ge=0, le=180, description="max rotation, degrees")
    scale: tuple[float, float] = Field((0.8, 1.15), description="zoom range")
    translate: float = Field(0.1, ge=0, le=0.5, description="max shift, share of the image side")
    shear: float = Field(10.0, ge=0, le=45, description="max shear, degrees")
    elastic_p: float = Field(0.5, ge=0, le=1, description="probability of an elastic deformation")
    erase_p: float = Field(0.5, ge=0, le=1, description=(
        "probability of erasing 1-2 small rectangles (coarse dropout)"))


class FilterParams(Section):
    classifier: Literal["logreg", "knn"] = Field("logreg", description=(
        "logreg: class-balanced logistic regression on the clean real embeddings (recommended: calibrated for "
        "rare classes) | knn: cosine k-NN vote"))
    knn_k: int = Field(10, gt=0, le=10_000, description="neighbours of the knn classifier")
    min_confidence: float = Field(0.1, ge=0, le=1, description=(
        "keep a candidate only if the classifier gives its target class at least this probability; higher = "
        "more class-typical images, fewer kept. With a weak encoder even real tail images score low, so a high "
        "value keeps only what the classifier already gets right (benchmarks/synthesize.py)"))
    max_source_similarity: float = Field(0.95, ge=-1, description=(
        "... and its cosine similarity to each source image's embedding is at most this (near-copies add "
        "nothing); lower = more novel images, fewer kept. Read it against real_nn_similarity in "
        "reports/synthesize/metrics.json (how close a real image of the class is to its nearest real neighbour)"))


class SynthesizeParams(Section):
    """The ``synthesize`` stage: new images for the rare classes, made from their real images and kept only when
    the SSL embedding says they look like their class and are not near-copies of their sources."""

    seed: Seed = Field(0, description=(
        "everything below is deterministic for a seed (on one device and thread count)"))
    generator: str = Field("mae_inpaint", description=(
        "mae_inpaint (reconstruct hidden patches with an MAE-style decoder on the frozen encoder) | feature_interp "
        "(decode points between same-class neighbours in SSL space) | augment (heavy albumentations: the baseline "
        "to beat). README: what synthetic images add. Or a generator an installed package registers "
        "(@register_generator in a module it names as an entry point of group sslvision.generators)"))
    target: int | Literal["median", "max"] = Field("median", description=(
        "bring every class below this many clean train images up to it: median | max (of the class counts) | a "
        "number"))
    classes: list[str] = Field(default_factory=list, description=(
        "class names that may receive images; [] = every class below the target"))
    max_per_class: int = Field(500, ge=0, le=1_000_000, description=(
        "at most this many synthetic images per class (keeps real images the majority of a tail class: more than "
        "~5x its real count mostly adds redundant images)"))
    oversample: float = Field(6.0, ge=1, le=100, description=(
        "candidates made per image wanted; raise it when the filter rejects many (see "
        "reports/synthesize/per_class.csv: passed vs need)"))
    batch_size: int = Field(256, gt=0, le=65536, description=(
        "images per encoder forward pass when embedding candidates"))
    device: str = Field("cpu", description="cpu | cuda | auto")
    fidelity_k: int = Field(3, gt=0, le=10_000, description=(
        "k of the k-NN manifold precision/recall (Kynkaenniemi et al. 2019 use 3)"))
    grid_columns: int = Field(10, gt=0, le=1000, description=(
        "synthetic images per class in reports/synthesize/grid.png"))
    cache_dir: str = Field("checkpoints/synthesize", description=(
        "trained decoders, keyed by encoder weights + images + params (never labels): a re-run after a label "
        "change loads the decoder instead of training it again; outside DVC's cache like pretrain's checkpoints; "
        '"" disables'))
    mae_inpaint: MAEInpaintParams = Field(default_factory=MAEInpaintParams, description="the mae_inpaint generator")
    feature_interp: FeatureInterpParams = Field(default_factory=FeatureInterpParams, description=(
        "the feature_interp generator"))
    augment: AugmentParams = Field(default_factory=AugmentParams, description=(
        "the augment generator (also mae_inpaint's pre_augment / post_augment)"))
    filter: FilterParams = Field(default_factory=FilterParams, description=(
        "which candidates are kept: those the SSL embedding places in their class, away from their sources"))

    @field_validator("generator")
    @classmethod
    def _registered_generator(cls, v: str) -> str:
        load_plugins()
        return require_registered(v, "generator", GENERATORS, GENERATORS_GROUP)

    @field_validator("target")
    @classmethod
    def _positive_target(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be median, max or a positive number of images")
        return v


# --- the real data ---------------------------------------------------------------------------------


@dataclass
class RealSet:
    """The clean labeled train images a stage synthesises from, with their SSL embeddings."""

    images: np.ndarray  # uint8 (N, H, W, C), in memory
    labels: np.ndarray  # int (N,)
    ids: np.ndarray  # str (N,)
    embeddings: np.ndarray  # float32 (N, D), rows aligned with images
    classes: list[str]
    # what the learned generators' decoders train on: images (and their embeddings), never labels; every
    # ingested train image, so a label change (audit, a labeled batch) leaves the decoders unchanged and
    # their cache valid. None = the labeled images above.
    fit_images: np.ndarray | None = None
    fit_embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.ids) == len(self.embeddings) == n):
            raise ValueError(f"real set: {n} images, {len(self.labels)} labels, {len(self.ids)} ids, "
                             f"{len(self.embeddings)} embeddings; they must be aligned")
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"real set: images must be uint8 (N, H, W, C), got {self.images.dtype} "
                             f"{self.images.shape}")

    def of_class(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)

    def decoder_data(self) -> tuple[np.ndarray, np.ndarray]:
        if self.fit_images is None or self.fit_embeddings is None:
            return self.images, self.embeddings
        return self.fit_images, self.fit_embeddings


# --- plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassPlan:
    label: int
    name: str
    real: int  # clean real train images
    target: int
    need: int  # synthetic images wanted (kept at most)
    make: int  # candidates generated (need x oversample)


def plan_classes(labels: np.ndarray, classes: list[str], params: SynthesizeParams) -> list[ClassPlan]:
    """How many images each class gets; only classes with ``need > 0`` are returned."""
    counts = np.bincount(labels, minlength=len(classes))
    present = counts[counts > 0]
    if params.target == "median":
        target = int(np.median(present))
    elif params.target == "max":
        target = int(present.max())
    else:
        target = int(params.target)
    unknown = sorted(set(params.classes) - set(classes))
    if unknown:
        raise ValueError(f"synthesize.classes: unknown class names {unknown} (classes: {classes})")
    chosen = set(params.classes) or set(classes)
    plans = []
    for label, name in enumerate(classes):
        real = int(counts[label])
        if name not in chosen or real >= target:
            continue
        if real == 0:
            log.warning("class %r has no clean train images: nothing to synthesise from", name)
            continue
        need = min(params.max_per_class, target - real)
        if need > 0:
            plans.append(ClassPlan(label, name, real, target, need, math.ceil(need * params.oversample)))
    return plans


# --- shared pieces ---------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised ``(B, C, H, W)`` (as :func:`~sslvision.models.to_input` makes) -> uint8 ``(B, H, W, C)``."""
    img = (x * STD + MEAN).mul(255.0).round().clamp(0, 255).to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def mix_patches(a: np.ndarray, b: np.ndarray, share: float, patch: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of ``a`` with a random ``share`` of its ``patch``-sized patches taken from ``b``."""
    n, h, w, _ = a.shape
    gh, gw = h // patch, w // patch
    take = int(round(share * gh * gw))
    out = a.copy()
    if take == 0:
        return out
    for i in range(n):
        cells = rng.choice(gh * gw, size=take, replace=False)
        grid = np.zeros(gh * gw, dtype=bool)
        grid[cells] = True
        m = np.kron(grid.reshape(gh, gw), np.ones((patch, patch), dtype=bool))
        m = np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])))
        out[i][m] = b[i][m]
    return out


def _pick_sources(idx: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A source for each candidate and a different same-class partner (itself if the class has one image)."""
    a = rng.choice(idx, size=count)
    if len(idx) == 1:
        return a, a.copy()
    shift = rng.integers(1, len(idx), size=count)
    pos = np.searchsorted(idx, a)
    return a, idx[(pos + shift) % len(idx)]


def _train_loop(name: str, params: list[nn.Parameter], steps: int, lr: float,
                loss_fn: Any, rng: np.random.Generator) -> list[float]:
    """AdamW (one-cycle schedule) for ``steps`` steps on ``loss_fn(rng)``; stops loudly on a non-finite loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    losses = []
    every = max(1, steps // 10)
    for step in range(steps):
        loss = loss_fn(rng)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            log.info("%s: step %d/%d loss %.4f", name, step + 1, steps, np.mean(losses[-every:]))
    return losses


# --- generators ------------------------------------------------------------------------------------


@register_generator("augment")
class AugmentGenerator:
    """Heavy albumentations augmentation of one real image per candidate (the baseline)."""

    name = "augment"

    @classmethod
    def from_params(cls, params: SynthesizeParams, device: torch.device, pretrain_decoder: MAEDecoder | None = None,
                    norm_pix: bool = False) -> AugmentGenerator:
        return cls(params.augment, params.seed)

    def __init__(self, params: AugmentParams, seed: int):
        import albumentations as A

        self.pipeline = A.Compose([
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=params.scale, translate_percent=(-params.translate, params.translate),
                     rotate=(-params.rotate, params.rotate), shear=(-params.shear, params.shear), p=1.0),
            A.ElasticTransform(alpha=20.0, sigma=4.0, p=params.elastic_p),
            A.GridDistortion(num_steps=4, distort_limit=0.25, p=0.3),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.GaussNoise(std_range=(0.02, 0.06), p=0.2),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                            hole_width_range=(0.1, 0.25), p=params.erase_p),
        ], seed=seed)

    def fit(self, real: RealSet, encoder: Encoder) -> dict[str, float]:
        return {}

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random transform per image of ``images`` (uint8 ``(N, H, W, C)``), seeded from ``rng``."""
        out = np.empty_like(images)
        for i, image in enumerate(images):
            self.pipeline.set_random_seed(int(rng.integers(2**31)))
            img = self.pipeline(image=image)["image"]
            out[i] = img if img.ndim == 3 else img[..., None]
        return out

    def generate(self, real: RealSet, label: int, count: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        src = rng.choice(real.of_class(label), size=count)
        return self.apply(real.images[src], rng), np.stack([src, np.full(count, -1)], axis=1)


class ConvInpainter(nn.Module):
    """Fills hidden pixels from a frozen CNN's feature map of the masked image (ResNet encoders).

    The feature map (coarse: what the garment is) is upsampled to full resolution and concatenated
    with the masked image and the mask (fine: what is still visible, and where), then four 3x3
    convolutions with dilations 1, 2, 4, 1 (a 17-pixel receptive field, so the middle of a hidden
    patch sees visible pixels around it) predict every pixel.
    """

    def __init__(self, feature_dim: int, in_chans: int, width: int):
        super().__init__()
        self.reduce = nn.Conv2d(feature_dim, width, 1)
        self.refine = nn.Sequential(
            nn.Conv2d(width + in_chans + 1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.GELU(),
            nn.Conv2d(width, in_chans, 3, padding=1),
        )

    def forward(self, features: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = F.interpolate(self.reduce(features), size=masked.shape[-2:], mode="bilinear", align_corners=False)
        return (torch.sigmoid(self.refine(torch.cat([f, masked, mask], dim=1))) - MEAN) / STD


class UNetInpainter(nn.Module):
    """A small U-Net inpainter on a frozen CNN's feature map (ResNet encoders, ``arch: unet``).

    Its input is the same as :class:`ConvInpainter`'s: the upsampled feature map, the masked image and the
    mask. Two stride-2 levels (28 -> 14 -> 7 px) give every hidden pixel the whole garment as context, and
    skip connections return the visible pixels' detail at full resolution. Hidden 4x4 cells are then
    drawn with the garment's shape around them, where the flat convolution stack blurs them into blocks.
    """

    def __init__(self, feature_dim: int, in_chans: int, width: int):
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                                 nn.GroupNorm(8 if cout % 8 == 0 else 1, cout),
                                 nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU())

        self.reduce = nn.Conv2d(feature_dim, w, 1)
        self.enc1 = block(w + in_chans + 1, w)
        self.enc2 = block(w, 2 * w, stride=2)
        self.mid = nn.Sequential(block(2 * w, 4 * w, stride=2),
                                 nn.Conv2d(4 * w, 4 * w, 3, padding=2, dilation=2), nn.GELU())
        self.dec2 = block(4 * w + 2 * w, 2 * w)
        self.dec1 = block(2 * w + w, w)
        self.out = nn.Conv2d(w, in_chans, 1)

    def forward(self, features: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        size = masked.shape[-2:]
        f = F.interpolate(self.reduce(features), size=size, mode="bilinear", align_corners=False)
        s1 = self.enc1(torch.cat([f, masked, mask], dim=1))
        s2 = self.enc2(s1)
        m = self.mid(s2)
        d2 = self.dec2(torch.cat([F.interpolate(m, size=s2.shape[-2:], mode="bilinear", align_corners=False), s2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=size, mode="bilinear", align_corners=False), s1], 1))
        return (torch.sigmoid(self.out(d1)) - MEAN) / STD


def _grid_mask(n: int, height: int, width: int, patch: int, ratio: float, device: torch.device) -> torch.Tensor:
    """``(n, 1, H, W)`` float mask, 1 on a random ``ratio`` share of the ``patch``-sized cells."""
    gh, gw = height // patch, width // patch
    hide = max(1, int(round(gh * gw * ratio)))
    order = torch.rand(n, gh * gw, device=device).argsort(dim=1)
    cells = torch.zeros(n, gh * gw, device=device)
    cells.scatter_(1, order[:, :hide], 1.0)
    m = cells.view(n, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return F.pad(m, (0, width - m.shape[3], 0, height - m.shape[2]))


@register_generator("mae_inpaint")
class MAEInpaintGenerator:
    """Mix patches of two same-class images, hide some, reconstruct them with a decoder (see module doc)."""

    name = "mae_inpaint"

    @classmethod
    def from_params(cls, params: SynthesizeParams, device: torch.device, pretrain_decoder: MAEDecoder | None = None,
                    norm_pix: bool = False) -> MAEInpaintGenerator:
        p = params.mae_inpaint
        pre = AugmentGenerator(params.augment, params.seed) if p.pre_augment else None
        post = AugmentGenerator(params.augment, params.seed + 1) if p.post_augment else None
        return cls(p, device, pretrain_decoder, norm_pix, pre, post)

    def __init__(self, params: MAEInpaintParams, device: torch.device, pretrain_decoder: MAEDecoder | None = None,
                 norm_pix: bool = False, pre_augment: AugmentGenerator | None = None,
                 post_augment: AugmentGenerator | None = None):
        self.params = params
        self.pre_augment = pre_augment
        self.post_augment = post_augment
        self.device = device
        self.pretrain_decoder = pretrain_decoder
        self.norm_pix = norm_pix
        self.encoder: Encoder | None = None
        self.decoder: nn.Module | None = None
        self.mode = ""
        self.load_cached: Callable[[nn.Module], bool] | None = None  # set by synthesize() (DecoderCache)

    @property
    def patch(self) -> int:
        assert self.encoder is not None
        return self.encoder.config.patch_size if self.encoder.is_vit else self.params.patch_size

    def fit(self, real: RealSet, encoder: Encoder) -> dict[str, float]:
        p = self.params
        self.encoder = encoder.eval().to(self.device)  # frozen: every pass below runs under no_grad
        _, h, w, c = real.images.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"mae_inpaint: image size {h}x{w} is not a multiple of the patch size {self.patch}")
        if encoder.is_vit and self.pretrain_decoder is not None and p.decoder in ("auto", "pretrain"):
            self.decoder, self.mode = self.pretrain_decoder.eval().to(self.device), "pretrain_mae_decoder"
            return {"decoder_steps": 0.0}
        if p.decoder == "pretrain":
            raise ValueError("synthesize.mae_inpaint.decoder: pretrain, but the encoder has no MAE decoder "
                             "(pretrain.method mae or cl_mim keeps one; or use auto / train)")
        self.norm_pix = False  # the decoders trained here predict pixels
        if encoder.is_vit:
            cfg = DecoderConfig(embed_dim=p.width, depth=1, num_heads=max(1, p.width // 32))
            self.decoder = MAEDecoder(encoder.dim, encoder.num_patches, self.patch, c, cfg)
            self.mode = "trained_mae_decoder"
        else:
            with torch.no_grad():
                feat_dim = encoder.backbone.forward_features(torch.zeros(1, c, h, w, device=self.device)).shape[1]
            inpainter = UNetInpainter if p.arch == "unet" else ConvInpainter
            self.decoder, self.mode = inpainter(feat_dim, c, p.width), f"trained_{p.arch}_inpainter"
        self.decoder.to(self.device).train()
        if self.load_cached is not None and self.load_cached(self.decoder):
            self.decoder.eval()
            return {"decoder_steps": 0.0, "decoder_cached": 1.0}
        images = torch.from_numpy(real.decoder_data()[0])

        def loss_fn(rng: np.random.Generator) -> torch.Tensor:
            batch = images[rng.integers(len(images), size=p.batch_size)].to(self.device)
            x = to_input(batch)
            pred, target, mask = self._reconstruct(x)
            return (((pred - target) ** 2) * mask).sum() / (mask.sum() * pred.shape[1]).clamp(min=1)

        seed = int(torch.randint(2**31, (1,)).item())
        losses = _train_loop(f"mae_inpaint {self.mode}", list(self.decoder.parameters()), p.steps, p.lr, loss_fn,
                             np.random.default_rng(seed))
        self.decoder.eval()
        return {"decoder_steps": float(p.steps),
                "decoder_final_loss": float(np.mean(losses[-10:])) if losses else math.nan,
                "decoder_cached": 0.0}

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prediction, target and mask, all ``(B, C, H, W)`` (mask broadcastable), in input space."""
        assert self.encoder is not None and self.decoder is not None
        p = self.params
        if self.encoder.is_vit:
            with torch.no_grad():
                latent, mask, ids_restore = self.encoder.forward_masked(x, p.mask_ratio)
            pred = self.decoder(latent, ids_restore)
            target = patchify(x, self.patch)
            if self.norm_pix:  # the pretrain decoder predicts each patch normalised by its own statistics
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = pred * (var + 1e-6).sqrt() + mean
            c = x.shape[1]
            mask_img = unpatchify(mask.unsqueeze(-1).expand(-1, -1, target.shape[-1]), self.patch, c)[:, :1]
            return unpatchify(pred, self.patch, c), x, mask_img
        b, _, h, w = x.shape
        mask_img = _grid_mask(b, h, w, self.patch, p.mask_ratio, x.device)
        masked = x * (1 - mask_img)
        with torch.no_grad():
            features = self.encoder.backbone.forward_features(masked)
        return self.decoder(features, masked, mask_img), x, mask_img

    @torch.no_grad()
    def generate(self, real: RealSet, label: int, count: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        a, b = _pick_sources(real.of_class(label), count, rng)
        mixing = self.params.mix_share > 0 and len(real.of_class(label)) > 1
        base = mix_patches(real.images[a], real.images[b], self.params.mix_share, self.patch, rng) \
            if mixing else real.images[a].copy()
        if self.pre_augment is not None:
            base = self.pre_augment.apply(base, rng)
        out = np.empty_like(base)
        for s in range(0, count, 256):
            x = to_input(torch.from_numpy(base[s:s + 256]).to(self.device))
            pred, target, mask = self._reconstruct(x)
            out[s:s + len(x)] = to_uint8(target * (1 - mask) + pred * mask)
        if self.post_augment is not None:
            out = self.post_augment.apply(out, rng)
        return out, np.stack([a, b if mixing else np.full(count, -1)], axis=1)


class EmbeddingDecoder(nn.Module):
    """SSL embedding -> image: a linear map to a coarse grid, two transposed convolutions (x4)."""

    def __init__(self, dim: int, channels: int, size: tuple[int, int], width: int):
        super().__init__()
        self.size = size
        self.base = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
        self.width = width
        self.fc = nn.Sequential(nn.Linear(dim, 2 * width * self.base[0] * self.base[1]), nn.GELU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.GELU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.BatchNorm2d(width // 2), nn.GELU(),
            nn.Conv2d(width // 2, channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(self.fc(z).view(-1, 2 * self.width, *self.base))
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (torch.sigmoid(x) - MEAN) / STD


@register_generator("feature_interp")
class FeatureInterpGenerator:
    """Decode points between same-class neighbours in SSL space (see module doc)."""

    name = "feature_interp"

    @classmethod
    def from_params(cls, params: SynthesizeParams, device: torch.device, pretrain_decoder: MAEDecoder | None = None,
                    norm_pix: bool = False) -> FeatureInterpGenerator:
        return cls(params.feature_interp, device)

    def __init__(self, params: FeatureInterpParams, device: torch.device):
        if params.t_min > params.t_max:
            raise ValueError(f"synthesize.feature_interp: t_min {params.t_min} > t_max {params.t_max}")
        self.params = params
        self.device = device
        self.decoder: EmbeddingDecoder | None = None
        self.mean = self.std = np.zeros(0, dtype=np.float32)
        self.load_cached: Callable[[nn.Module], bool] | None = None  # set by synthesize() (DecoderCache)

    def _standardise(self, z: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((z - self.mean) / self.std).astype(np.float32)).to(self.device)

    def fit(self, real: RealSet, encoder: Encoder) -> dict[str, float]:
        p = self.params
        fit_images, fit_embeddings = real.decoder_data()
        _, h, w, c = fit_images.shape
        self.mean = fit_embeddings.mean(0)
        self.std = fit_embeddings.std(0) + 1e-6
        self.decoder = EmbeddingDecoder(fit_embeddings.shape[1], c, (h, w), p.width).to(self.device).train()
        if self.load_cached is not None and self.load_cached(self.decoder):
            self.decoder.eval()
            return {"decoder_steps": 0.0, "decoder_cached": 1.0}
        z_all = self._standardise(fit_embeddings)
        images = torch.from_numpy(fit_images)

        def loss_fn(rng: np.random.Generator) -> torch.Tensor:
            idx = rng.integers(len(images), size=p.batch_size)
            x = to_input(images[idx].to(self.device))
            return F.mse_loss(self.decoder(z_all[idx]), x)

        seed = int(torch.randint(2**31, (1,)).item())
        losses = _train_loop("feature_interp decoder", list(self.decoder.parameters()), p.steps, p.lr, loss_fn,
                             np.random.default_rng(seed))
        self.decoder.eval()
        return {"decoder_steps": float(p.steps),
                "decoder_final_loss": float(np.mean(losses[-10:])) if losses else math.nan,
                "decoder_cached": 0.0}

    @torch.no_grad()
    def generate(self, real: RealSet, label: int, count: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        assert self.decoder is not None
        p = self.params
        idx = real.of_class(label)
        z = real.embeddings[idx]
        zn = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
        k = min(p.neighbours, len(idx) - 1)
        a = rng.integers(len(idx), size=count)
        if k > 0:
            sims = zn @ zn.T
            np.fill_diagonal(sims, -np.inf)
            nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            b = nearest[a, rng.integers(k, size=count)]
        else:
            b = a.copy()
        t = rng.uniform(p.t_min, p.t_max, size=(count, 1)).astype(np.float32)
        spread = z.std(0) if len(idx) > 1 else self.std
        noise = rng.standard_normal((count, z.shape[1])).astype(np.float32) * spread * p.noise
        points = (1 - t) * z[a] + t * z[b] + noise
        out = np.empty((count, *real.images.shape[1:]), dtype=np.uint8)
        for s in range(0, count, 512):
            out[s:s + 512] = to_uint8(self.decoder(self._standardise(points[s:s + 512])))
        return out, np.stack([idx[a], np.where(b != a, idx[b], -1)], axis=1)


def make_generator(params: SynthesizeParams, device: torch.device, pretrain_decoder: MAEDecoder | None = None,
                   norm_pix: bool = False) -> Any:
    """The generator registered as ``params.generator`` (:data:`GENERATORS`), built from ``params``.

    Raises:
        ValueError: no generator is registered under that name.
    """
    load_plugins()
    cls = GENERATORS.get(params.generator)
    if cls is None:
        raise ValueError(f"unknown generator {params.generator!r}; registered: {', '.join(GENERATORS)}")
    if hasattr(cls, "from_params"):
        return cls.from_params(params, device, pretrain_decoder, norm_pix)
    return cls(params, device)


# --- filter ----------------------------------------------------------------------------------------


class EmbeddingFilter:
    """Class-consistency and novelty checks of candidates in SSL embedding space.

    The classifier sees L2-normalised embeddings. ``logreg`` is a standardised, class-balanced
    logistic regression (balanced, so a tail-class candidate is not rejected for being rare);
    ``knn`` is a cosine k-NN vote (simple, but its probabilities follow the class imbalance).
    """

    def __init__(self, params: FilterParams, num_classes: int, seed: int = 0):
        self.params = params
        self.num_classes = num_classes
        self.seed = seed
        self.model: Any = None

    def fit(self, embeddings: np.ndarray, labels: np.ndarray) -> EmbeddingFilter:
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.params.classifier == "logreg":
            self.model = make_pipeline(StandardScaler(), LogisticRegression(
                class_weight="balanced", max_iter=1000, random_state=self.seed))
        else:
            self.model = KNeighborsClassifier(n_neighbors=min(self.params.knn_k, len(labels)), metric="cosine")
        self.model.fit(l2_normalise(embeddings), labels)
        return self

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, num_classes)``; a class absent from the fit data has probability 0."""
        proba = self.model.predict_proba(l2_normalise(embeddings))
        out = np.zeros((len(embeddings), self.num_classes), dtype=np.float64)
        out[:, self.model.classes_] = proba
        return out

    def score(self, embeddings: np.ndarray, targets: np.ndarray, sources: np.ndarray,
              real_embeddings: np.ndarray) -> pd.DataFrame:
        """``target_prob``, ``source_similarity`` (max cosine over the sources) and ``passed`` per candidate."""
        target_prob = self.predict_proba(embeddings)[np.arange(len(targets)), targets]
        zs, zr = l2_normalise(embeddings), l2_normalise(real_embeddings)
        sim = np.full(len(targets), -np.inf)
        for j in range(sources.shape[1]):
            ok = sources[:, j] >= 0
            sim[ok] = np.maximum(sim[ok], np.einsum("nd,nd->n", zs[ok], zr[sources[ok, j]]))
        passed = (target_prob >= self.params.min_confidence) & (sim <= self.params.max_source_similarity)
        return pd.DataFrame({"target_prob": target_prob, "source_similarity": sim, "passed": passed})


# --- fidelity --------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fit to two sets of vectors (FID's formula); NaN below 2 each."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return math.nan
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # fewer images than dimensions: singular covariances are expected
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # regularise, as pytorch-fid does
            eps = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))


def manifold_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al., 2019); NaN when a set has ``<= k`` points."""
    from scipy.spatial.distance import cdist

    if len(real) <= k or len(fake) <= k:
        return math.nan, math.nan

    def radii(x: np.ndarray) -> np.ndarray:
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself

    fake_to_real = cdist(fake, real)
    precision = float((fake_to_real <= radii(real)[None, :]).any(axis=1).mean())
    real_to_fake = fake_to_real.T
    recall = float((real_to_fake <= radii(fake)[None, :]).any(axis=1).mean())
    return precision, recall


def nearest_neighbour_similarity(embeddings: np.ndarray) -> float:
    """Median cosine similarity of each image to its nearest other image: how close real images of a
    class are to each other, the scale ``filter.max_source_similarity`` is read against."""
    if len(embeddings) < 2:
        return math.nan
    z = l2_normalise(embeddings)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.median(sims.max(axis=1)))


def fidelity(real: np.ndarray, synthetic: np.ndarray, k: int) -> dict[str, float]:
    """Fréchet distance and k-NN precision/recall of ``synthetic`` vs ``real`` (L2-normalised embeddings)."""
    r, s = l2_normalise(real), l2_normalise(synthetic)
    precision, recall = manifold_precision_recall(r, s, k)
    return {"frechet": frechet_distance(r, s), "precision": precision, "recall": recall}


# --- synthesis -------------------------------------------------------------------------------------


@dataclass
class Synthesis:
    """Everything one synthesis run produced (kept images first, then every candidate's scores)."""

    images: np.ndarray  # uint8 (M, H, W, C): kept
    manifest: pd.DataFrame  # per the data contract, aligned with images
    embeddings: np.ndarray  # float32 (M, D): kept
    candidates: pd.DataFrame  # every candidate: label, class, target_prob, source_similarity, passed, kept
    plans: list[ClassPlan]
    metrics: dict[str, Any]
    grid_sources: dict[int, np.ndarray] = field(default_factory=dict)  # label -> real example rows for the grid


class DecoderCache:
    """Trained decoders kept under ``cache_dir``, keyed by everything their training depends on: the
    generator and its training params (not ``GENERATION_ONLY`` ones), the seed, the encoder's weights, the
    images (and embeddings) they train on, torch's version and the device type. Labels are not in the key
    (decoders never see them), so a re-run after a label change (audit, a noisier labeled batch) loads the
    decoder instead of training it again. Safetensors files (no pickle), written atomically; the oldest
    beyond ``keep`` are removed.
    """

    def __init__(self, params: SynthesizeParams, real: RealSet, encoder: Encoder, device: torch.device,
                 keep: int = 4):
        h = hashlib.sha256()
        section = getattr(params, params.generator, None)  # a registered generator may have no params section
        gen_params = ({} if section is None
                      else section.model_dump(exclude=set(getattr(section, "GENERATION_ONLY", ()))))
        h.update(json.dumps({"generator": params.generator, "params": gen_params, "seed": params.seed,
                             "torch": torch.__version__, "device": device.type}, sort_keys=True).encode())
        for name, tensor in sorted(encoder.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        images, embeddings = real.decoder_data()
        h.update(np.ascontiguousarray(images).tobytes())
        h.update(np.ascontiguousarray(embeddings).tobytes())
        self.dir = Path(params.cache_dir)
        self.path = self.dir / f"{params.generator}-{h.hexdigest()[:24]}.safetensors"
        self.keep = keep

    def load(self, decoder: nn.Module) -> bool:
        from safetensors.torch import load_file

        if not self.path.exists():
            return False
        try:
            decoder.load_state_dict(load_file(str(self.path), device="cpu"))
        except Exception as err:  # damaged or from another version: train again, overwrite it
            log.warning("%s: cached decoder unusable (%s); training it again", self.path, err)
            return False
        log.info("decoder loaded from the cache %s (same encoder, images and params)", self.path)
        return True

    def save(self, decoder: nn.Module) -> None:
        from safetensors.torch import save_file

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with io.atomic_path(self.path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(tmp))
            old = sorted(self.dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)[:-self.keep]
            for f in old:
                f.unlink(missing_ok=True)
        except OSError as err:  # a cache that cannot be written costs time, never the stage
            log.warning("%s: could not cache the decoder (%s)", self.path, err)


def _device(name: str) -> torch.device:
    """``synthesize.device``: ``auto`` = cuda when available, else cpu."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def synthesize(real: RealSet, encoder: Encoder, params: SynthesizeParams,
               pretrain_decoder: MAEDecoder | None = None, norm_pix: bool = False) -> Synthesis:
    """Plan, generate, filter and score; deterministic for ``params.seed`` (on one device/thread count)."""
    torch.manual_seed(params.seed)
    device = _device(params.device)
    seeds = np.random.SeedSequence(params.seed).spawn(3)
    plans = plan_classes(real.labels, real.classes, params)
    log.info("synthesising with %s for %d classes: %s", params.generator, len(plans),
             ", ".join(f"{p.name} {p.real}->{p.real + p.need}" for p in plans) or "none")
    generator = make_generator(params, device, pretrain_decoder, norm_pix)
    cache = DecoderCache(params, real, encoder, device) if params.cache_dir and hasattr(generator, "load_cached") \
        else None
    if cache is not None:
        generator.load_cached = cache.load
    fit_info = generator.fit(real, encoder) if plans else {}
    if cache is not None and plans and not fit_info.get("decoder_cached") and generator.decoder is not None \
            and fit_info.get("decoder_steps"):
        cache.save(generator.decoder)
    torch.manual_seed(params.seed + 1)  # generation draws the same numbers whether the decoder was trained or cached
    filt = EmbeddingFilter(params.filter, len(real.classes), params.seed).fit(real.embeddings, real.labels)

    rng = np.random.default_rng(seeds[0])
    _, h, w, c = real.images.shape
    kept_images, kept_emb, rows, cand_frames, per_class = [], [], [], [], {}
    for plan in plans:
        imgs, sources = generator.generate(real, plan.label, plan.make, rng)
        emb = embed(encoder, imgs, batch_size=params.batch_size, device=device)
        scores = filt.score(emb, np.full(len(imgs), plan.label), sources, real.embeddings)
        keep = np.flatnonzero(scores["passed"].to_numpy())[:plan.need]
        scores["kept"] = False
        scores.loc[keep, "kept"] = True
        scores.insert(0, "class", plan.name)
        scores.insert(0, "label", plan.label)
        cand_frames.append(scores)
        kept_images.append(imgs[keep])
        kept_emb.append(emb[keep])
        for j in keep:
            src = [str(real.ids[s]) for s in sources[j] if s >= 0]
            rows.append({"label": plan.label, "label_name": plan.name, "source_ids": src,
                         "target_prob": float(scores.at[j, "target_prob"]),
                         "source_similarity": float(scores.at[j, "source_similarity"])})
        class_emb = real.embeddings[real.of_class(plan.label)]
        fid = fidelity(class_emb, emb[keep], params.fidelity_k)
        per_class[plan.name] = {
            "real": plan.real, "target": plan.target, "need": plan.need, "made": int(len(imgs)),
            "passed": int(scores["passed"].sum()), "kept": int(len(keep)),
            "accept_rate": float(scores["passed"].mean()),
            "mean_target_prob": float(scores["target_prob"].mean()),
            "median_source_similarity": float(scores["source_similarity"].median()),
            "real_nn_similarity": nearest_neighbour_similarity(class_emb),
            **fid,
        }
        log.info("%s: made %d, passed %d, kept %d (Fréchet %.3f, precision %.2f, recall %.2f)", plan.name,
                 len(imgs), per_class[plan.name]["passed"], len(keep), fid["frechet"], fid["precision"],
                 fid["recall"])

    images = np.concatenate(kept_images) if kept_images else np.empty((0, h, w, c), dtype=np.uint8)
    embeddings = (np.concatenate(kept_emb) if kept_emb
                  else np.empty((0, real.embeddings.shape[1]), dtype=np.float32))
    manifest = pd.DataFrame(rows, columns=["label", "label_name", "source_ids", "target_prob", "source_similarity"])
    manifest.insert(0, "index", np.arange(len(manifest), dtype=np.int64))
    manifest.insert(1, "id", [f"syn/{params.generator}/{i}" for i in range(len(manifest))])
    manifest.insert(4, "split", "synthetic")
    manifest.insert(5, "generator", params.generator)
    manifest["label"] = manifest["label"].astype(np.int64)
    candidates = (pd.concat(cand_frames, ignore_index=True) if cand_frames
                  else pd.DataFrame(columns=["label", "class", "target_prob", "source_similarity", "passed", "kept"]))

    made = sum(v["made"] for v in per_class.values())
    kept = len(manifest)
    overall = fidelity(real.embeddings[np.isin(real.labels, [p.label for p in plans])], embeddings,
                       params.fidelity_k) if plans else {"frechet": math.nan, "precision": math.nan, "recall": math.nan}
    metrics = {
        "generator": params.generator,
        "mode": getattr(generator, "mode", "") or params.generator,
        "classes_synthesised": len(plans), "made": made, "kept": kept,
        "accept_rate": float(candidates["passed"].mean()) if made else math.nan,
        **{f"all_{k}": v for k, v in overall.items()},
        **{f"fit_{k}": v for k, v in fit_info.items()},
        "classes": per_class,
    }
    grid_rng = np.random.default_rng(seeds[1])
    grid_sources = {p.label: grid_rng.choice(real.of_class(p.label), size=min(3, p.real), replace=False)
                    for p in plans}
    return Synthesis(images, manifest, embeddings, candidates, plans, metrics, grid_sources)


def load_pretrain_decoder(encoder_dir: str | os.PathLike) -> tuple[MAEDecoder | None, bool]:
    """The MAE decoder pretrain kept (or None) and whether it predicts per-patch normalised pixels."""
    import json

    from sslvision.models import load_decoder

    config = json.loads((Path(encoder_dir) / "config.json").read_text())
    if not config.get("decoder"):
        return None, False
    # pretrain saves its params next to the weights; its MAE default is norm_pix_loss: true
    return load_decoder(encoder_dir), bool((config.get("params") or {}).get("norm_pix_loss", True))


def synthesize_images(images: np.ndarray, labels: np.ndarray, encoder: Encoder, *, generator: str = "augment",
                      per_class: int | None = None, seed: int = 0, pretrain_decoder: MAEDecoder | None = None,
                      norm_pix: bool = False, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
    """New images for the rare classes of ``images``, made and filtered as the ``synthesize`` stage does.

    Every class below the target count gets images from ``generator``, made from its own images; only
    candidates the filter keeps (classified as their class in ``encoder``'s embedding space, and not
    near-copies of their sources) are returned. Deterministic for ``seed`` on one device/thread count.
    Nothing is read or written on disk (``cache_dir`` defaults to ``""`` here: decoders are not cached).

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, H, W, C)``, the real images (labeled, trusted).
        labels: int ``(N,)``, their class labels (any non-negative ints; a label's class is its value).
        encoder: the SSL encoder (:class:`~sslvision.models.Encoder`) the filter and fidelity use.
        generator: a name in :data:`GENERATORS` (``augment``, ``mae_inpaint``, ``feature_interp``, or one
            added with :func:`register_generator`).
        per_class: bring each class below this many images up to it (real + new, filter permitting);
            None = :class:`SynthesizeParams`' rule (``target``: the median class count, at most
            ``max_per_class`` new images per class).
        seed: the synthesis seed.
        pretrain_decoder, norm_pix: for ``mae_inpaint`` with a ViT encoder, the MAE decoder pretrain kept and
            whether it predicts normalised pixels (:func:`load_pretrain_decoder`).
        **overrides: other ``synthesize`` params (:class:`SynthesizeParams`), nested as in params.yaml, e.g.
            ``filter={"min_confidence": 0.3}``, ``oversample=4``, ``device="cuda"``.
    Returns:
        ``(new_images, new_labels)``: uint8 ``(M, H, W[, C])`` shaped as ``images``, and int64 ``(M,)``,
        grouped by class; ``M`` may be 0.
    Raises:
        ValueError: bad shapes or dtypes, a negative label, an unknown generator, or an invalid param
            (:class:`~sslvision.params.ParamsError`).

    Example::

        from sslvision.synthesize import synthesize_images
        new_x, new_y = synthesize_images(x, y, encoder, generator="augment", per_class=500,
                                         filter={"min_confidence": 0.3})
        x_train, y_train = np.concatenate([x, new_x]), np.concatenate([y, new_y])
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ints of shape ({len(images)},), got {labels.dtype} {labels.shape}")
    if not len(labels):
        raise ValueError("no images to synthesise from")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0 (drop unlabeled images first)")
    if per_class is not None and "target" in overrides:
        raise ValueError("give per_class or target, not both")
    raw: dict[str, Any] = {"seed": seed, "cache_dir": "", **overrides}
    if per_class is not None:  # the caller's target: max_per_class does not cap it unless given too
        raw["target"] = per_class
        raw.setdefault("max_per_class", per_class)
    params = validate_section("synthesize", SynthesizeParams, raw, source="synthesize_images")
    # the generator is checked by make_generator (its message names the registered ones)
    params = params.model_copy(update={"generator": generator})
    squeeze = images.ndim == 3
    x = images[..., None] if squeeze else images
    values, y = np.unique(labels, return_inverse=True)
    device = _device(params.device)
    real = RealSet(images=x, labels=y.astype(np.int64), ids=np.arange(len(x)).astype(str),
                   embeddings=embed(encoder, x, batch_size=params.batch_size, device=device),
                   classes=[str(v) for v in values])
    result = synthesize(real, encoder, params, pretrain_decoder, norm_pix)
    new = result.images[..., 0] if squeeze else result.images
    return new, values[result.manifest["label"].to_numpy()].astype(np.int64)
