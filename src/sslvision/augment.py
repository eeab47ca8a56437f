"""View-making augmentations for SSL, built with albumentations on uint8 ``(H, W, C)`` images.

Two families:

- :func:`two_view_pipeline`: SimCLR-style views (random resized crop, flip, intensity jitter, blur,
  noise; colour jitter and random grayscale only when the images have 3 channels).
- :class:`ViewMaker` with ``local_crops > 0``: DINO multi-crop (two global crops at full size and
  small local crops covering a small part of the image).

Determinism: a view depends only on ``(seed, epoch, image index)`` (:meth:`ViewMaker.__call__`
reseeds the pipeline per sample), not on which data-loader worker made it or how many there are, so
a resumed run and a distributed run see exactly the views a single uninterrupted run sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 28
    channels: int = 1
    crop_scale_min: float = 0.2  # smallest crop area share for global views (SimCLR: 0.08 at 224px; 0.2+ for 28px)
    flip: bool = True
    jitter: float = 0.4  # brightness/contrast (and saturation/hue for RGB) strength, applied with p=0.8
    blur_p: float = 0.2
    noise_p: float = 0.2
    global_crops: int = 2  # full-size views per image (MAE needs 1)
    local_crops: int = 0  # DINO local views; 0 = two-view methods
    local_size: int = 12
    local_scale_max: float = 0.4


def _intensity(cfg: AugmentConfig) -> list[A.BasicTransform]:
    ops: list[A.BasicTransform] = []
    if cfg.jitter > 0:
        if cfg.channels == 3:
            ops += [A.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter, saturation=cfg.jitter,
                                  hue=min(0.5, cfg.jitter / 4), p=0.8), A.ToGray(p=0.2)]
        else:  # saturation/hue do not exist for grayscale
            ops.append(A.RandomBrightnessContrast(brightness_limit=cfg.jitter, contrast_limit=cfg.jitter, p=0.8))
    if cfg.blur_p > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 1.5), p=cfg.blur_p))
    if cfg.noise_p > 0:
        ops.append(A.GaussNoise(std_range=(0.02, 0.08), p=cfg.noise_p))
    return ops


def _crop_pipeline(cfg: AugmentConfig, size: int, scale: tuple[float, float]) -> A.Compose:
    ops: list[A.BasicTransform] = [A.RandomResizedCrop(size=(size, size), scale=scale)]
    if cfg.flip:
        ops.append(A.HorizontalFlip(p=0.5))
    return A.Compose(ops + _intensity(cfg), seed=0)


def two_view_pipeline(cfg: AugmentConfig) -> A.Compose:
    """One SimCLR-style view; applied twice (with different randomness) to make a positive pair."""
    return _crop_pipeline(cfg, cfg.size, (cfg.crop_scale_min, 1.0))


class ViewMaker:
    """Turns one uint8 image into its list of views, reproducibly from ``(seed, epoch, index)``."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.global_view = two_view_pipeline(cfg)
        self.local_view = (_crop_pipeline(cfg, cfg.local_size, (min(0.05, cfg.local_scale_max), cfg.local_scale_max))
                           if cfg.local_crops else None)

    @property
    def num_views(self) -> int:
        return self.cfg.global_crops + self.cfg.local_crops

    def __call__(self, image: np.ndarray, epoch: int, index: int) -> list[np.ndarray]:
        seq = np.random.SeedSequence([self.seed, epoch, index])
        seeds = seq.generate_state(self.num_views)
        views = []
        for v, s in enumerate(seeds):
            pipe = self.global_view if v < self.cfg.global_crops else self.local_view
            pipe.set_random_seed(int(s))
            out = pipe(image=image)["image"]
            views.append(out if out.ndim == 3 else out[..., None])
        return views
