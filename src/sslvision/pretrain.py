"""Self-supervised pretraining: SimCLR (InfoNCE/RINCE), VICReg, DINO, MAE and CL+MIM on timm backbones.

What it reads (never labels that can change): ``images.npy`` and ``images.parquet`` from
``data/ingested/``. It trains on the ``train`` and ``pool`` rows (never ``test``), embeds EVERY row,
and evaluates on the clean ``test`` split only, with ``eval_labels.parquet``: a label fixed or broken
in ``manifest.parquet`` cannot change (or re-run) this stage.

Evaluation protocol (``test`` split, 2-fold cross-validation): the test rows are split in two
stratified halves; the kNN classifier (k=200, temperature 0.1, the similarity-weighted vote of
InstDisc that lightly's benchmarks use) takes one half as its memory bank and classifies the other,
then the halves swap; the linear probe (logistic regression on standardised features) is trained on
one half and scored on the other, and swapped. Reported accuracies are the means of both folds. The
SSL training never saw these images, and the evaluation never uses the (possibly noisy) train labels.

Training loop:

- Data: ``images.npy`` memory-mapped and read by DataLoader workers, which return uint8 views
  (``augment.ViewMaker``); a view depends only on ``(seed, epoch, index)``.
- Schedules (learning rate, DINO teacher momentum and temperature) are arrays precomputed per step.
- Checkpoints every ``checkpoint_every`` steps and at each epoch end, atomically, with the model,
  optimiser, torch RNG state and per-epoch history: a killed run resumes from the last one and ends
  with the weights an uninterrupted run would have (the batch order and views are functions of the
  seed and step, the RNG state is restored).
- Precision (``precision``): fp32, or the forward pass under bf16 autocast with fp32 weights, optimiser and
  losses (:func:`in_fp32`); ``auto`` resolves per device and architecture (:func:`resolve_precision`).
- A non-finite loss stops training with :class:`NonFiniteLossError`; collapse (low effective rank or
  per-dimension std of the features) is measured every epoch and reported.
- Throughput: ``data_img_s`` (what the workers can produce), ``model_img_s`` (forward+backward+step
  only) and ``train_img_s`` (wall clock) are logged separately; an image counts once, however many
  views it gives.
- Under ``torchrun --nproc_per_node=N`` it runs DistributedDataParallel (gloo on CPU, NCCL on GPU);
  ``batch_size`` stays the global batch, split over the processes, and contrastive negatives are
  gathered from all of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from sslvision import objectives
from sslvision.augment import AugmentConfig, ViewMaker
from sslvision.io import atomic_path, output_dir, write_csv, write_json
from sslvision.metrics import knn_predict, linear_probe_predict
from sslvision.models import (
    DecoderConfig,
    DINOHead,
    Encoder,
    EncoderConfig,
    MAEDecoder,
    embed,
    load_encoder,
    mlp,
    patchify,
    save_encoder,
    to_input,
)
from sslvision.params import Section, Seed

if TYPE_CHECKING:  # pandas is imported where manifests are read: train() and its workers never need it (~60 MiB)
    import pandas as pd

log = logging.getLogger("sslvision.pretrain")

Method = Literal["simclr", "vicreg", "dino", "mae", "cl_mim"]
Precision = Literal["auto", "fp32", "bf16"]


class PretrainParams(Section):
    """The ``pretrain`` section of params.yaml (each key is documented there with tuning advice)."""

    method: Method = "simclr"
    backbone: str = "resnet18"
    backbone_args: dict[str, Any] = Field(default_factory=dict)
    stem_stride: int = Field(1, ge=1, le=4)
    patch_size: int = Field(4, ge=1, le=1024)
    proj_hidden_dim: int = Field(512, gt=0, le=65536)
    proj_dim: int = Field(128, gt=0, le=65536)
    # simclr
    temperature: float = Field(0.1, gt=0)
    loss: Literal["infonce", "rince"] = "infonce"
    rince_q: float = Field(0.5, gt=0, le=1)
    rince_lam: float = Field(0.01, gt=0)
    # vicreg
    vicreg_sim_weight: float = Field(25.0, ge=0)
    vicreg_var_weight: float = Field(25.0, ge=0)
    vicreg_cov_weight: float = Field(1.0, ge=0)
    # dino
    dino_out_dim: int = Field(1024, gt=0, le=65536)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: float = Field(0.0, ge=0, le=100_000)
    teacher_momentum: float = Field(0.996, ge=0, le=1)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    local_crops: int = Field(2, ge=0, le=64)
    local_size: int = Field(12, gt=0, le=1024)
    # mae / cl_mim
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    decoder_dim: int = Field(128, gt=0, le=8192)
    decoder_depth: int = Field(2, ge=1, le=64)
    decoder_heads: int = Field(4, ge=1, le=256)
    cl_weight: float = Field(0.2, ge=0, le=1, alias="lambda")
    cl_mim_cl: Literal["simclr", "dino"] = "simclr"
    # augmentation
    crop_scale_min: float = Field(0.2, gt=0, le=1)
    flip: bool = True
    jitter: float = Field(0.4, ge=0)
    blur_p: float = Field(0.2, ge=0, le=1)
    noise_p: float = Field(0.2, ge=0, le=1)
    # optimisation
    epochs: int = Field(3, ge=1, le=100_000)
    steps_per_epoch: int = Field(0, ge=0, le=10_000_000)
    batch_size: int = Field(256, ge=2, le=65536)
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.5, ge=0, le=100_000)
    seed: Seed = 0
    workers: int = Field(2, ge=0, le=256)
    threads: int = Field(0, ge=0, le=1024)
    device: str = "auto"
    precision: Precision = Field("auto", description=(
        "auto | fp32 | bf16. bf16 runs the forward pass under bfloat16 autocast (weights, optimiser state and the "
        "losses stay float32): faster only where the hardware computes in bf16 natively; auto picks it there, and "
        "only for the architectures where it measured >= 1.3x faster at equal accuracy (resolve_precision)"))
    checkpoint_every: int = Field(50, ge=1, le=10_000_000)
    checkpoint_dir: str = "checkpoints/pretrain"
    # evaluation / outputs
    embed_batch_size: int = Field(512, gt=0, le=65536)
    knn_k: int = Field(200, gt=0, le=100_000)
    knn_temperature: float = Field(0.1, gt=0)
    collapse_min_effective_rank: float = Field(2.0, ge=0)
    collapse_min_std_ratio: float = Field(0.05, ge=0)

    def encoder_config(self, img_size: int, in_chans: int) -> EncoderConfig:
        return EncoderConfig(backbone=self.backbone, img_size=img_size, in_chans=in_chans, patch_size=self.patch_size,
                             stem_stride=self.stem_stride, backbone_args=dict(self.backbone_args))

    def augment_config(self, img_size: int, in_chans: int) -> AugmentConfig:
        return AugmentConfig(size=img_size, channels=in_chans, crop_scale_min=self.crop_scale_min, flip=self.flip,
                             jitter=self.jitter, blur_p=self.blur_p, noise_p=self.noise_p,
                             global_crops=1 if self.method == "mae" else 2,
                             local_crops=self.local_crops if self.method == "dino" else 0,
                             local_size=self.local_size)

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (a checkpoint from other params is ignored); where
        and how the arithmetic runs (device, threads, precision) is left out, so a run may resume elsewhere."""
        keep = self.model_dump(exclude={"workers", "device", "checkpoint_every", "checkpoint_dir", "embed_batch_size",
                                        "knn_k", "knn_temperature", "collapse_min_effective_rank",
                                        "collapse_min_std_ratio", "threads", "precision"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


# --- methods ------------------------------------------------------------------------------------------


def in_fp32(loss: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``loss(*args)`` with autocast off and every floating tensor (or list of them) in ``args`` cast to float32.

    Under bf16 autocast the heads' outputs are bfloat16 (8 bits of mantissa); the losses' normalisation,
    softmax and log-sum-exp over the batch need float32 to stay stable (and ``index_put`` of -inf needs
    one dtype). Outside autocast this is a plain call.
    """
    def fp32(a: Any) -> Any:
        if isinstance(a, list):
            return [fp32(x) for x in a]
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    first = next(a if isinstance(a, torch.Tensor) else a[0] for a in args if isinstance(a, (torch.Tensor, list)))
    with torch.autocast(first.device.type, enabled=False):
        return loss(*(fp32(a) for a in args))


class SSLMethod(nn.Module):
    """An encoder plus whatever heads a method needs; ``forward(views, step)`` returns the loss."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.decoder: MAEDecoder | None = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each optimiser step (EMA teachers)."""


class SimCLR(SSLMethod):
    def __init__(self, encoder: Encoder, p: PretrainParams):
        super().__init__(encoder)
        self.p = p
        self.head = mlp(encoder.dim, p.proj_hidden_dim, p.proj_dim, layers=2)

    def contrastive(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.head(f1), self.head(f2)
        if self.p.loss == "rince":
            return in_fp32(objectives.rince, z1, z2, self.p.temperature, self.p.rince_q, self.p.rince_lam)
        return in_fp32(objectives.nt_xent, z1, z2, self.p.temperature)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.contrastive(self.encoder(views[0]), self.encoder(views[1]))


class VICReg(SSLMethod):
    def __init__(self, encoder: Encoder, p: PretrainParams):
        super().__init__(encoder)
        self.p = p
        self.head = mlp(encoder.dim, p.proj_hidden_dim, p.proj_hidden_dim, layers=3)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z1, z2 = self.head(self.encoder(views[0])), self.head(self.encoder(views[1]))
        return in_fp32(objectives.vicreg, z1, z2, self.p.vicreg_sim_weight, self.p.vicreg_var_weight,
                       self.p.vicreg_cov_weight)


class DINO(SSLMethod):
    """Student = encoder + DINO head; teacher = its EMA, fed the global crops only."""

    def __init__(self, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int):
        super().__init__(encoder)
        self.head = DINOHead(encoder.dim, p.dino_out_dim, p.proj_hidden_dim, p.proj_dim)
        self.teacher_encoder = copy.deepcopy(encoder)
        self.teacher_head = copy.deepcopy(self.head)
        for t in (self.teacher_encoder, self.teacher_head):
            t.requires_grad_(False)
        self.criterion = objectives.DINOLoss(
            p.dino_out_dim, total_steps, p.student_temp, p.teacher_temp, p.warmup_teacher_temp,
            int(p.warmup_teacher_temp_epochs * steps_per_epoch), p.center_momentum)
        # teacher momentum: cosine from teacher_momentum to 1 (DINO's schedule)
        self.momentum = cosine_schedule(p.teacher_momentum, 1.0, total_steps)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        student = [self.head(self.encoder(v)) for v in views]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_encoder(v)) for v in views[:2]]
        return in_fp32(self.criterion, student, teacher, step)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        for student, teacher in ((self.encoder, self.teacher_encoder), (self.head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            for bs, bt in zip(student.buffers(), teacher.buffers(), strict=True):
                bt.copy_(bs)


class MAE(SSLMethod):
    def __init__(self, encoder: Encoder, p: PretrainParams):
        super().__init__(encoder)
        if not encoder.is_vit:
            raise ValueError(f"pretrain.method={p.method} needs a ViT backbone (vit_*), got {p.backbone}")
        self.p = p
        cfg = encoder.config
        self.decoder = MAEDecoder(encoder.dim, encoder.num_patches, cfg.patch_size, cfg.in_chans,
                                  DecoderConfig(p.decoder_dim, p.decoder_depth, p.decoder_heads))

    def reconstruction(self, imgs: torch.Tensor) -> torch.Tensor:
        latent, mask, ids_restore = self.encoder.forward_masked(imgs, self.p.mask_ratio)
        pred = self.decoder(latent, ids_restore)
        return in_fp32(objectives.mae_loss, pred, patchify(imgs, self.encoder.config.patch_size), mask,
                       self.p.norm_pix_loss)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return self.reconstruction(views[0])


class CLMIM(MAE):
    """One ViT: ``lambda`` x (SimCLR or DINO on the class token of two views) + (1 - ``lambda``) x MAE."""

    def __init__(self, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int):
        super().__init__(encoder, p)
        self.cl = (SimCLR(encoder, p) if p.cl_mim_cl == "simclr"
                   else DINO(encoder, p, total_steps, steps_per_epoch))

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        return objectives.cl_mim(self.cl(views[:2], step), self.reconstruction(views[0]), self.p.cl_weight)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.cl.after_step(step)


def build_method(p: PretrainParams, encoder: Encoder, total_steps: int, steps_per_epoch: int) -> SSLMethod:
    if p.method == "simclr":
        return SimCLR(encoder, p)
    if p.method == "vicreg":
        return VICReg(encoder, p)
    if p.method == "dino":
        return DINO(encoder, p, total_steps, steps_per_epoch)
    if p.method == "mae":
        return MAE(encoder, p)
    return CLMIM(encoder, p, total_steps, steps_per_epoch)


def cosine_schedule(start: float, end: float, steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Per-step values: linear warm-up from 0 to ``start``, then cosine from ``start`` to ``end``."""
    warm = np.linspace(0, start, warmup_steps, endpoint=False)
    t = np.arange(max(steps - warmup_steps, 1)) / max(steps - warmup_steps, 1)
    return np.concatenate([warm, end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))])


# --- data ---------------------------------------------------------------------------------------------


class ViewDataset(Dataset):
    """Views of rows of a memory-mapped ``images.npy``; fetched a batch at a time (``__getitems__``)."""

    def __init__(self, images_path: Path, rows: np.ndarray, views: ViewMaker):
        self.images_path = images_path
        self.rows = rows
        self.views = views
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, Any]:
        start = time.perf_counter()
        if self._images is None:  # opened in each worker, after fork
            self._images = np.load(self.images_path, mmap_mode="r")
        per_image = [self.views(np.asarray(self._images[self.rows[i]]), epoch, int(self.rows[i])) for epoch, i in keys]
        views = [torch.from_numpy(np.stack([v[k] for v in per_image])) for k in range(self.views.num_views)]
        return {"views": views, "seconds": time.perf_counter() - start}


def epoch_batches(n: int, batch_size: int, steps: int, seed: int, epoch: int, start: int = 0,
                  rank: int = 0, world: int = 1) -> list[list[tuple[int, int]]]:
    """This process's share of each global batch of one epoch, from batch ``start`` on."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [[(epoch, int(i)) for i in order[b * batch_size:(b + 1) * batch_size][rank::world]]
            for b in range(start, steps)]


class BatchPlan(Sampler):
    """Every remaining batch of the run, epoch after epoch, from global step ``start`` (``epoch_batches``
    per epoch, made lazily): one DataLoader, whose workers are forked once, serves the whole run."""

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int, start: int, total: int,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.steps_per_epoch, self.seed = n, batch_size, steps_per_epoch, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        spe = self.steps_per_epoch
        epoch, first = divmod(self.start, spe)
        while epoch * spe + first < self.total:
            batches = epoch_batches(self.n, self.batch_size, spe, self.seed, epoch, first, self.rank, self.world)
            yield from batches[: self.total - epoch * spe - first]
            epoch, first = epoch + 1, 0


def _identity(batch: Any) -> Any:
    return batch


# --- training -----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    encoder: Encoder
    decoder: MAEDecoder | None
    history: list[dict[str, float]]
    steps: int
    resumed_from: int = 0
    throughput: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # what the forward passes ran in: fp32 | bf16 (pretrain.precision resolved)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 instructions that compute in bf16
# Where ``precision: auto`` trains in bf16, per device type: the architectures ("resnet", "vit") whose bf16
# autocast measured >= 1.3x the fp32 throughput at equal kNN accuracy (benchmarks/results/precision.json);
# a device type or architecture not measured stays fp32. On a 2-core avx512_bf16 CPU neither path reached 1.3x.
BF16_FASTER: dict[str, frozenset[str]] = {"cpu": frozenset()}


def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (the ``flags`` line of Linux's /proc/cpuinfo; empty elsewhere: torch
    has no public query for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device_type: str, flags: frozenset[str] | set[str] = frozenset(), cuda_bf16: bool = False) -> bool:
    """Whether ``device_type`` computes in bf16 natively: a CPU with one of :data:`NATIVE_BF16_CPU_FLAGS` among
    ``flags``, a GPU for which ``cuda_bf16`` (``torch.cuda.is_bf16_supported()``) holds. Elsewhere bf16 is
    emulated, slower than fp32."""
    if device_type == "cuda":
        return cuda_bf16
    return device_type == "cpu" and bool(NATIVE_BF16_CPU_FLAGS & set(flags))


def resolve_precision(precision: Precision, *, device_type: str, vit: bool,
                      flags: frozenset[str] | set[str] = frozenset(), cuda_bf16: bool = False) -> str:
    """``fp32`` or ``bf16``: an explicit choice as given; ``auto`` is bf16 only on native-bf16 hardware
    (:func:`native_bf16`) for an architecture listed in :data:`BF16_FASTER`, fp32 everywhere else."""
    if precision != "auto":
        return precision
    arch = "vit" if vit else "resnet"
    faster = arch in BF16_FASTER.get(device_type, frozenset())
    return "bf16" if faster and native_bf16(device_type, flags, cuda_bf16) else "fp32"


def training_precision(precision: Precision, device: torch.device, vit: bool) -> str:
    """:func:`resolve_precision` with this machine's capabilities. Explicit bf16 on a GPU without bf16 is
    refused (autocast would fail mid-run); on a CPU without native bf16 it runs, emulated, with one warning."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    flags = cpu_flags() if device.type == "cpu" else frozenset()
    if precision == "bf16" and not native_bf16(device.type, flags, cuda_bf16):
        if device.type == "cuda":
            raise ValueError(f"pretrain.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                             "use fp32 or auto")
        log.warning("pretrain.precision=bf16 on a %s without native bf16 (%s): emulated, likely slower than fp32",
                    device.type, " / ".join(sorted(NATIVE_BF16_CPU_FLAGS)))
    return resolve_precision(precision, device_type=device.type, vit=vit, flags=flags, cuda_bf16=cuda_bf16)


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _optimizer(model: nn.Module, p: PretrainParams) -> torch.optim.Optimizer:
    """AdamW (two state buffers per weight), or SGD / LARS with momentum (one buffer: ~45 MiB less for a
    ResNet-18). Biases and norm weights get no weight decay (and LARS does not adapt their step)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum)
    if p.optimizer == "lars":
        from timm.optim import Lars  # SGD + layer-wise trust ratio (You et al. 2017), as SimCLR trains with

        return Lars(groups, lr=p.lr, momentum=p.momentum)
    return torch.optim.AdamW(groups, lr=p.lr)


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint's state, or None (with a warning) when it cannot be used: damaged, not a
    checkpoint, or holding anything but tensors and plain values (``weights_only``: never unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        log.warning("%s: unreadable checkpoint (%s); starting from scratch", path, str(err).splitlines()[0])
        return None
    if not isinstance(state, dict):
        log.warning("%s: not a pretrain checkpoint; starting from scratch", path)
        return None
    return state


def train(p: PretrainParams, images_path: str | Path, rows: np.ndarray, *,
          on_epoch: Callable[[dict[str, float]], None] | None = None,
          on_step: Callable[[int, float], bool | None] | None = None,
          probe_rows: np.ndarray | None = None, progress: bool = True) -> TrainResult:
    """Pretrain on ``rows`` of ``images_path`` (uint8 ``(N, H, W, C)`` .npy); resumes from checkpoints.

    ``on_epoch(metrics)`` is called on rank 0 after each epoch (logging; on resume, first for the
    epochs the checkpoint already holds); ``on_step(step, loss)``
    after every step: returning True ends training there (a wall-clock budget), raising simulates a kill. ``probe_rows`` (default: the
    first 512 training rows) are embedded each epoch to measure collapse.
    """
    images_path = Path(images_path)
    images = np.load(images_path, mmap_mode="r")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    _, h, w, c = images.shape
    if h != w:
        raise ValueError(f"{images_path}: images must be square, got {h}x{w}")
    device = resolve_device(p.device)
    distributed = init_distributed(device)
    rank, world = _dist()
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if p.threads:
        torch.set_num_threads(p.threads)
    if p.batch_size % world:
        raise ValueError(f"pretrain.batch_size={p.batch_size} must be divisible by the {world} processes")
    n = len(rows)
    if n < p.batch_size:
        raise ValueError(f"pretrain.batch_size={p.batch_size} is larger than the {n} training images")
    steps_per_epoch = n // p.batch_size
    if p.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, p.steps_per_epoch)
    total = steps_per_epoch * p.epochs

    torch.manual_seed(p.seed)
    encoder = Encoder(p.encoder_config(h, c))
    model = build_method(p, encoder, total, steps_per_epoch).to(device)
    optimizer = _optimizer(model, p)
    precision = training_precision(p.precision, device, encoder.is_vit)
    if rank == 0:
        log.info("pretrain: %s on %s", precision, device)
    lrs = cosine_schedule(p.lr, p.lr * p.min_lr_ratio, total, int(p.warmup_epochs * steps_per_epoch))

    ckpt_path = Path(p.checkpoint_dir) / "last.pt"
    fingerprint = p.fingerprint()
    step, history, epoch_sums = 0, [], {"loss": 0.0, "n": 0}
    state = _read_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        if state.get("fingerprint") == fingerprint and state.get("world") == world:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            step, history, epoch_sums = int(state["step"]), list(state["history"]), dict(state["epoch_sums"])
            log.info("resuming from %s at step %d/%d", ckpt_path, step, total)
            if rank == 0 and on_epoch is not None:  # loggers see every epoch, also those before the kill
                for record in history:
                    on_epoch(record)
        elif rank == 0:
            log.warning("%s: written with other params; starting from scratch", ckpt_path)
    resumed_from = step

    def save_checkpoint() -> None:
        if rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "step": step, "history": history, "epoch_sums": epoch_sums, "fingerprint": fingerprint,
                 "world": world}
        with atomic_path(ckpt_path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    dataset = ViewDataset(images_path, rows, ViewMaker(p.augment_config(h, c), seed=p.seed))
    probe = np.asarray(probe_rows if probe_rows is not None else rows[:512])
    totals = {"images": 0, "data_s": 0.0, "wait_s": 0.0, "model_s": 0.0, "wall_s": 0.0}
    model.train()
    stop = False
    # one loader for the whole run: its workers are forked once, before the model's activations exist
    loader = DataLoader(dataset, batch_sampler=BatchPlan(n, p.batch_size, steps_per_epoch, p.seed, step, total, rank,
                                                         world),
                        num_workers=p.workers, collate_fn=_identity, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if p.workers else None,
                        generator=torch.Generator().manual_seed(p.seed))  # keeps the global RNG untouched
    batches = iter(loader) if step < total else iter(())
    while step < total and not stop:
        epoch = step // steps_per_epoch
        t_epoch = time.perf_counter()
        t_wait = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            totals["wait_s"] += t0 - t_wait
            totals["data_s"] += batch["seconds"]
            views = [to_input(v.to(device, non_blocking=True)) for v in batch["views"]]
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = train_model(views, step)  # the losses themselves are computed in fp32 (in_fp32)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"pretrain: loss is {loss.item()} at step {step} (epoch {epoch + 1}); training stopped. "
                    f"Lower pretrain.lr (now {p.lr}), raise pretrain.temperature or warmup_epochs; the last good "
                    f"checkpoint is {ckpt_path}" + ("" if ckpt_path.exists() else " (none written yet)"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.after_step(step)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_wait = time.perf_counter()
            totals["model_s"] += t_wait - t0
            totals["images"] += len(views[0]) * world
            epoch_sums["loss"] += float(loss.item())
            epoch_sums["n"] += 1
            if on_step is not None and on_step(step, float(loss.item())):
                stop = True
                break
            if progress and rank == 0 and (step % 10 == 0 or step == total):
                log.info("step %d/%d epoch %d loss %.4f lr %.2e", step, total, epoch + 1, loss.item(), lrs[step - 1])
            if step % steps_per_epoch == 0:
                break
            if step % p.checkpoint_every == 0:
                save_checkpoint()
        totals["wall_s"] += time.perf_counter() - t_epoch
        if stop and step % steps_per_epoch:  # stopped mid-epoch: keep its partial sums for a resume
            save_checkpoint()
            break
        stats = collapse_stats(embed(encoder, images[np.sort(probe)], p.embed_batch_size, device)) if rank == 0 else {}
        model.train()
        record = {"epoch": epoch + 1, "step": step, "loss": epoch_sums["loss"] / max(epoch_sums["n"], 1),
                  "lr": float(lrs[step - 1]), **stats, **throughput(totals, p.workers)}
        history.append(record)
        epoch_sums = {"loss": 0.0, "n": 0}
        save_checkpoint()
        if rank == 0:
            log.info("epoch %d/%d: %s", epoch + 1, p.epochs, ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
            if on_epoch is not None:
                on_epoch(record)
    if distributed:
        dist.barrier()
    return TrainResult(encoder=encoder, decoder=model.decoder, history=history, steps=step,
                       resumed_from=resumed_from, throughput=throughput(totals, p.workers), precision=precision)


def throughput(totals: dict[str, float], workers: int) -> dict[str, float]:
    """Images per second of the data path (worker capacity), of the model, and end to end."""
    images = totals["images"]
    return {
        "data_img_s": images * max(workers, 1) / totals["data_s"] if totals["data_s"] else 0.0,
        "model_img_s": images / totals["model_s"] if totals["model_s"] else 0.0,
        "train_img_s": images / totals["wall_s"] if totals["wall_s"] else 0.0,
        "data_wait_share": totals["wait_s"] / totals["wall_s"] if totals["wall_s"] else 0.0,
    }


# --- evaluation ---------------------------------------------------------------------------------------


def effective_rank(features: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values of the centred features (Roy & Vetterli, 2007)."""
    x = features - features.mean(axis=0)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def collapse_stats(features: np.ndarray) -> dict[str, float]:
    """Effective rank, and mean per-dimension std of L2-normalised features times sqrt(D).

    ``std_ratio`` is about 1 for well-spread features and tends to 0 when every image maps to the
    same point (complete collapse); a low effective rank signals dimensional collapse.
    """
    z = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return {"effective_rank": effective_rank(features),
            "std_ratio": float(z.std(axis=0).mean() * np.sqrt(z.shape[1]))}


def evaluate(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 200, temperature: float = 0.1,
             seed: int = 0, linear: bool = True) -> dict[str, float]:
    """kNN and linear-probe accuracy by 2-fold cross-validation over labelled, held-out images."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if len(labels) < 4 or counts[counts > 0].min() < 2:
        raise ValueError(f"evaluation needs at least 2 labelled test images per class, got counts {counts.tolist()}")
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(features, labels)
    knn, lin = [], []
    for bank, query in folds:
        pred = knn_predict(features[bank], labels[bank], features[query], num_classes, k, temperature)
        knn.append(float((pred == labels[query]).mean()))
        if linear:
            lin.append(float((linear_probe_predict(features[bank], labels[bank], features[query])
                              == labels[query]).mean()))
    out = {"knn_accuracy": float(np.mean(knn))}
    if linear:
        out["linear_probe_accuracy"] = float(np.mean(lin))
    return out


# --- the stage ----------------------------------------------------------------------------------------


@dataclass
class StageInputs:
    images_path: Path
    images: pd.DataFrame
    train_rows: np.ndarray
    test_rows: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def read_inputs(ingested: str | Path) -> StageInputs:
    """The images pretraining reads, never labels that can change.

    ``ssl_pool.parquet`` (ingest's fingerprint of train, test and unlabeled pool images, the stage's DVC
    dependency) selects the rows; ``images.parquet`` maps its ids to rows of ``images.npy``, and each
    selected row's pixels are checked against the fingerprint's content hash, so the dependency really
    covers what is trained on. Without ``ssl_pool.parquet`` every row of ``images.parquet`` is used.
    ``eval_labels.parquet`` gives the clean test labels for the evaluation.
    """
    import pandas as pd

    root = Path(ingested)
    for name in ("images.npy", "images.parquet", "eval_labels.parquet"):
        if not (root / name).exists():
            raise FileNotFoundError(f"{root / name}: missing; run the ingest stage first (dvc repro ingest)")
    images = pd.read_parquet(root / "images.parquet")
    labels = pd.read_parquet(root / "eval_labels.parquet")
    for col in ("index", "id", "split"):
        if col not in images.columns:
            raise ValueError(f"{root / 'images.parquet'}: missing column {col!r}")
    for col in ("id", "label"):
        if col not in labels.columns:
            raise ValueError(f"{root / 'eval_labels.parquet'}: missing column {col!r}")
    if (root / "ssl_pool.parquet").exists():
        pool = pd.read_parquet(root / "ssl_pool.parquet")
        selected = images.merge(pool[["id", "content_hash"]], on="id", how="inner", suffixes=("", "_pool"))
        if len(selected) != len(pool):
            raise ValueError(f"{root / 'ssl_pool.parquet'}: {len(pool) - len(selected)} ids are not in images.parquet "
                             "(re-run ingest)")
        _check_hashes(np.load(root / "images.npy", mmap_mode="r"), selected, root)
        images = selected
    train_rows = np.sort(images.loc[images["split"].isin(["train", "pool"]), "index"].to_numpy())
    test = images[images["split"] == "test"].merge(labels[["id", "label"]], on="id", how="inner")
    test = test.sort_values("index")
    if len(train_rows) == 0:
        raise ValueError(f"{root / 'images.parquet'}: no train or pool images to pretrain on")
    classes_path = root / "classes.json"
    num_classes = (len(json.loads(classes_path.read_text())["classes"]) if classes_path.exists()
                   else int(labels["label"].max()) + 1)
    return StageInputs(root / "images.npy", images, train_rows, test["index"].to_numpy(),
                       test["label"].to_numpy().astype(np.int64), num_classes)


def _check_hashes(array: np.ndarray, selected: pd.DataFrame, root: Path) -> None:
    if "content_hash_pool" not in selected.columns:
        return
    for row, expected in zip(selected["index"].to_numpy(), selected["content_hash_pool"], strict=True):
        if hashlib.sha256(np.ascontiguousarray(array[row]).tobytes()).hexdigest() != expected:
            raise ValueError(f"{root / 'images.npy'}: row {row} does not match ssl_pool.parquet's content hash "
                             "(the ingested files are out of sync; re-run ingest)")


def embedding_report(train_features: np.ndarray, test_features: np.ndarray, inputs: StageInputs,
                     p: PretrainParams) -> dict[str, float]:
    """Collapse statistics on (a sample of) the training rows and 2-fold kNN / linear-probe accuracy on ``test``."""
    stats = collapse_stats(train_features)
    stats["collapsed"] = bool(stats["effective_rank"] < p.collapse_min_effective_rank
                              or stats["std_ratio"] < p.collapse_min_std_ratio)
    if len(inputs.test_rows):
        stats.update(evaluate(test_features, inputs.test_labels, inputs.num_classes, p.knn_k,
                              p.knn_temperature, p.seed))
    return stats


COLLAPSE_SAMPLE = 5000  # training rows the collapse statistics are computed on


def embed_ingested(encoder_dir: str | Path = "models/encoder", ingested: str | Path = "data/ingested",
                   embeddings_dir: str | Path = "data/embeddings", batch_size: int = 512,
                   device: str = "cpu") -> dict[str, Any]:
    """The ``embed`` stage: embeddings of EVERY ingested image with the saved encoder, written atomically.

    Separate from pretraining so that images joining without re-training (a labeled batch) get
    embeddings from a forward pass, not a new pretrain.
    """
    encoder = load_encoder(encoder_dir)
    images = np.load(Path(ingested) / "images.npy", mmap_mode="r")
    t0 = time.perf_counter()
    features = embed(encoder, images, batch_size, resolve_device(device), progress=True)
    seconds = time.perf_counter() - t0
    images_hash = hashlib.sha256((Path(ingested) / "images.parquet").read_bytes()).hexdigest()
    info = {"encoder": vars(encoder.config), "dim": int(features.shape[1]), "rows": int(features.shape[0]),
            "images_parquet_sha256": images_hash, "embed_img_s": len(images) / seconds if seconds else 0.0}
    with output_dir(embeddings_dir, "embeddings") as tmp:
        np.save(tmp / "embeddings.npy", features)
        (tmp / "embeddings.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_stage(p: PretrainParams, ingested: str | Path = "data/ingested", encoder_dir: str | Path = "models/encoder",
              embeddings_dir: str | Path | None = None, reports: str | Path = "reports/pretrain",
              on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train, save the encoder, evaluate; returns the metrics (rank 0). With ``embeddings_dir`` also embed
    every ingested image there (what the ``embed`` stage does; the DVC pipeline keeps the two apart)."""
    inputs = read_inputs(ingested)
    start = time.perf_counter()
    result = train(p, inputs.images_path, inputs.train_rows, on_epoch=on_epoch)
    train_s = time.perf_counter() - start
    rank, _ = _dist()
    if rank != 0:
        return {}
    images = np.load(inputs.images_path, mmap_mode="r")
    save_encoder(encoder_dir, result.encoder, result.decoder,
                 extra={"method": p.method, "params": p.model_dump(by_alias=True)})
    device = resolve_device(p.device)
    sample = np.random.default_rng(p.seed).permutation(inputs.train_rows)[:COLLAPSE_SAMPLE]
    train_features = embed(result.encoder, images[np.sort(sample)], p.embed_batch_size, device)
    test_features = embed(result.encoder, images[inputs.test_rows], p.embed_batch_size, device)
    extra = {}
    if embeddings_dir is not None:
        extra["embed_img_s"] = embed_ingested(encoder_dir, ingested, embeddings_dir, p.embed_batch_size,
                                              p.device)["embed_img_s"]
    metrics = {"method": p.method, "backbone": p.backbone, "precision": result.precision,
               **embedding_report(train_features, test_features, inputs, p),
               "final_loss": result.history[-1]["loss"], "epochs": p.epochs, "steps": result.steps,
               "train_images": int(len(inputs.train_rows)), "eval_images": int(len(inputs.test_rows)),
               **result.throughput, "train_s": train_s, **extra}
    if metrics["collapsed"]:
        log.warning("pretrain: the representation collapsed (effective rank %.2f, std ratio %.3f); "
                    "try a higher temperature/teacher_temp, a lower lr, or another method",
                    metrics["effective_rank"], metrics["std_ratio"])
    reports = Path(reports)
    write_json(reports / "metrics.json", metrics)
    import pandas as pd

    write_csv(reports / "history.csv", pd.DataFrame(result.history))
    return metrics


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, bool, np.generic))}


def pretrain_cli(params: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                 ingested: str | Path = "data/ingested", encoder_dir: str | Path = "models/encoder",
                 embeddings_dir: str | Path | None = None, reports: str | Path = "reports/pretrain") -> dict:
    """The stage as ``dvc repro``/``sslvision pretrain`` run it: per-epoch metrics to dvclive
    (``reports/pretrain/live``, DVC plots) and MLflow, then the encoder as an MLflow artifact."""
    from sslvision.params import load_section

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = load_section("pretrain", PretrainParams, params, overrides)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun workers: train only; rank 0 logs and writes
        return run_stage(p, ingested, encoder_dir, embeddings_dir, reports)
    import mlflow
    from dvclive import Live

    from sslvision import tracking

    read_inputs(ingested)  # fail on missing inputs before opening a run
    mlflow.enable_system_metrics_logging()
    with tracking.stage_run("pretrain", p.model_dump(by_alias=True)), \
            Live(str(Path(reports) / "live"), save_dvc_exp=False, dvcyaml=None) as live:
        def on_epoch(record: dict[str, float]) -> None:
            for key in ("loss", "lr", "effective_rank", "std_ratio", "train_img_s", "model_img_s", "data_img_s"):
                live.log_metric(key, record[key])
            live.next_step()
            mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))

        metrics = run_stage(p, ingested, encoder_dir, embeddings_dir, reports, on_epoch=on_epoch)
        mlflow.log_param("precision_used", metrics["precision"])  # what pretrain.precision (auto) resolved to
        mlflow.log_metrics(_numeric(metrics))
        mlflow.log_artifacts(str(encoder_dir), artifact_path="encoder")
        mlflow.log_artifact(str(Path(reports) / "metrics.json"), artifact_path="pretrain")
    return metrics


def sweep_temperature(values: list[float], params: str | Path = "params.yaml", epochs: int | None = None,
                      ingested: str | Path = "data/ingested", reports: str | Path = "reports/pretrain",
                      checkpoints: str | Path = "checkpoints/sweep") -> pd.DataFrame:
    """Short pretrains at each temperature; kNN/linear accuracy on ``test`` (2-fold, as the stage).

    Writes ``temperature_sweep.csv`` and ``temperature_sweep.png`` (kNN accuracy vs temperature) to
    ``reports``. Each run checkpoints under ``checkpoints/T=<value>`` so an interrupted sweep resumes.
    """
    import pandas as pd

    from sslvision.params import load_section

    if not values or any(v <= 0 for v in values):
        raise ValueError(f"temperatures must be positive numbers, got {values}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    overrides: dict[str, Any] = {"epochs": epochs} if epochs else {}
    base = load_section("pretrain", PretrainParams, params, overrides)
    inputs = read_inputs(ingested)
    if not len(inputs.test_rows):
        raise ValueError(f"{ingested}: no labelled test images to evaluate the sweep on")
    images = np.load(inputs.images_path, mmap_mode="r")
    rows = []
    for t in values:
        p = base.model_copy(update={"temperature": float(t), "checkpoint_dir": str(Path(checkpoints) / f"T={t}")})
        log.info("sweep: temperature %s (%d epochs)", t, p.epochs)
        result = train(p, inputs.images_path, inputs.train_rows)
        feats = embed(result.encoder, images[inputs.test_rows], p.embed_batch_size, resolve_device(p.device))
        scores = evaluate(feats, inputs.test_labels, inputs.num_classes, p.knn_k, p.knn_temperature, p.seed)
        rows.append({"temperature": float(t), **scores, **collapse_stats(feats),
                     "final_loss": result.history[-1]["loss"], "epochs": p.epochs})
    df = pd.DataFrame(rows)
    reports = Path(reports)
    write_csv(reports / "temperature_sweep.csv", df)
    plot_sweep(df, reports / "temperature_sweep.png", f"{base.method}, {base.backbone}, {base.epochs} epochs")
    return df


def plot_sweep(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(df["temperature"], df["knn_accuracy"] * 100, "o-", label="kNN (k=200, T=0.1)")
    if "linear_probe_accuracy" in df:
        ax.plot(df["temperature"], df["linear_probe_accuracy"] * 100, "s--", label="linear probe")
    ax.set_xscale("log")
    ax.set_xticks(df["temperature"], [f"{t:g}" for t in df["temperature"]])
    ax.minorticks_off()
    ax.set_xlabel("InfoNCE temperature")
    ax.set_ylabel("test accuracy (%), 2-fold")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
