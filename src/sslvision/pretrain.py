"""Self-supervised pretraining: SimCLR (InfoNCE/RINCE), VICReg, DINO, MAE and CL+MIM on timm backbones.

On arrays: :func:`pretrain` trains an encoder on a uint8 image array and :func:`embed` embeds images with it;
:func:`train` is the loop underneath (rows of an ``.npy`` file or of an array, checkpoints, DDP). The
methods are the registry :mod:`sslvision.ssl`. The DVC stage around this (which rows it trains on, the
evaluation, reports, MLflow) is :mod:`sslvision.stages.pretrain`.

Evaluation protocol (:func:`evaluate`, 2-fold cross-validation on labelled images the training never saw):
the images are split in two stratified halves; the kNN classifier (k=200, temperature 0.1, the
similarity-weighted vote of InstDisc that lightly's benchmarks use) takes one half as its memory bank and
classifies the other, then the halves swap; the linear probe (logistic regression on standardised
features) is trained on one half and scored on the other, and swapped. Reported accuracies are the means
of both folds.

Training loop:

- Data: an ``.npy`` file memory-mapped in each DataLoader worker, or an in-memory array the forked workers
  share; the workers return uint8 views (``augment.ViewMaker``); a view depends only on ``(seed, epoch, index)``.
- Schedules (learning rate, DINO teacher momentum and temperature, SimCLR's temperature with
  ``temperature_schedule: cosine``) are arrays precomputed per step; the history records each epoch's last value.
- Initialisation: random (seeded), or the weights of an earlier encoder of the same architecture
  (``init_from``, :func:`load_init`: MAE pre-pretraining); the heads are initialised alike either way.
- Checkpoints every ``checkpoint_every`` steps and at each epoch end, atomically, with the model,
  optimiser, torch RNG state and per-epoch history: a killed run resumes from the last one and ends
  with the weights an uninterrupted run would have (the batch order and views are functions of the
  seed and step, the RNG state is restored).
- Precision (``precision``): fp32, or the forward pass under bf16 autocast with fp32 weights, optimiser and
  losses (:func:`sslvision.ssl.in_fp32`); ``auto`` resolves per device and architecture (:func:`resolve_precision`).
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

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from sslvision.augment import AugmentConfig, ViewMaker
from sslvision.io import atomic_path, file_sha256
from sslvision.metrics import knn_predict, l2_normalise, linear_probe_predict
from sslvision.models import Encoder, EncoderConfig, MAEDecoder, encoder_config, load_weights, to_input
from sslvision.models import embed as embed_features
from sslvision.params import Section, Seed
from sslvision.plugins import SSL_METHODS_GROUP, load_plugins, require_registered
from sslvision.ssl import SSL_METHODS, build_method, cosine_schedule

log = logging.getLogger("sslvision.pretrain")

Precision = Literal["auto", "fp32", "bf16"]


class PretrainParams(Section):
    """The ``pretrain`` stage: self-supervised learning on the train + pool images only (never labels); the
    ``embed`` stage then embeds every image. kNN and linear-probe accuracy are measured on the clean test split
    (2-fold CV)."""

    method: str = Field("simclr", description=(
        "simclr | vicreg | dino | mae | cl_mim. simclr: strongest on small CPU budgets; vicreg: no negatives, "
        "batch-size robust; dino: EMA teacher, needs longer training; mae / cl_mim: ViT only (set backbone: "
        "vit_tiny_patch16_224). Or a method an installed package registers (@register_method in a module it "
        "names as an entry point of group sslvision.ssl_methods: README, Python API)"))
    backbone: str = Field("resnet18", description=(
        "any timm resnet* (3x3 stem, no max-pool for small images) or vit_* model"))
    backbone_args: dict[str, Any] = Field(default_factory=dict, description=(
        "extra timm kwargs (layers, channels, stem_width, embed_dim, depth, ...); {} = the standard network"))
    stem_stride: int = Field(1, ge=1, le=4, description=(
        "ResNet: 1 keeps the full resolution into layer1 (best accuracy), 2 is ~4x cheaper"))
    patch_size: int = Field(4, ge=1, le=1024, description=(
        "ViT: patch side in pixels, must divide the image size (28/4 = 7x7 tokens; 7 is 3x cheaper and coarser)"))
    proj_hidden_dim: int = Field(512, gt=0, le=65536, description=(
        "projection / expander / DINO head hidden width"))
    proj_dim: int = Field(128, gt=0, le=65536, description=(
        "SimCLR projection output (DINO: bottleneck); 64-256 changes little"))
    # simclr
    temperature: float = Field(0.1, gt=0, description=(
        "SimCLR: InfoNCE temperature, THE parameter to tune (sslvision sweep-temperature). 0.1-0.2 for batches of "
        "256-1024; lower is sharper but unstable, >0.5 blurs classes"))
    loss: Literal["infonce", "rince"] = Field("infonce", description=(
        "SimCLR: infonce | rince (robust InfoNCE: tolerates noisy/false negatives and pairs)"))
    rince_q: float = Field(0.5, gt=0, le=1, description=(
        "RINCE: 0 -> InfoNCE, 1 -> most robust (slower to learn); 0.5 is a fair default"))
    rince_lam: float = Field(0.01, gt=0, description="RINCE: weight of the negatives' term (0.01-0.1)")
    temperature_schedule: Literal["constant", "cosine"] = Field("constant", description=(
        "SimCLR (and cl_mim's simclr term): constant (temperature throughout) | cosine (Kukleva et al., ICLR 2023: "
        "from temperature_max down to temperature_min and back every temperature_period steps, alternating "
        "group-wise and instance discrimination; meant for long-tailed data). The history logs it per epoch"))
    temperature_min: float = Field(0.1, gt=0, description="cosine schedule: lowest temperature (paper: 0.1)")
    temperature_max: float = Field(1.0, gt=0, description=(
        "cosine schedule: highest temperature, at step 0 and after every period (paper: 1.0)"))
    temperature_period: int = Field(0, ge=0, le=10_000_000, description=(
        "cosine schedule: steps per cycle; 0 = one cycle over the whole run (the paper: a few hundred epochs, "
        "several cycles per run)"))
    # vicreg
    vicreg_sim_weight: float = Field(25.0, ge=0, description="VICReg: invariance between views (paper: 25)")
    vicreg_var_weight: float = Field(25.0, ge=0, description=(
        "VICReg: keeps each dimension's std above 1 (prevents collapse; paper: 25)"))
    vicreg_cov_weight: float = Field(1.0, ge=0, description=(
        "VICReg: decorrelates dimensions (paper: 1); raise if the effective rank is low"))
    # dino
    dino_out_dim: int = Field(1024, gt=0, le=65536, description=(
        "DINO prototypes; 65536 in the paper for ImageNet, 1024-4096 is plenty for 10 classes"))
    student_temp: float = Field(0.1, gt=0, description="DINO: student softmax temperature (paper: 0.1)")
    teacher_temp: float = Field(0.04, gt=0, description=(
        "DINO: teacher sharpening; above 0.07 is often unstable early (paper advice)"))
    warmup_teacher_temp: float = Field(0.04, gt=0, description=(
        "DINO: teacher temperature at step 0, raised linearly to teacher_temp ..."))
    warmup_teacher_temp_epochs: float = Field(0.0, ge=0, le=100_000, description=(
        "... over this many epochs (paper: 30 when teacher_temp is 0.07)"))
    teacher_momentum: float = Field(0.996, ge=0, le=1, description=(
        "DINO: EMA of the teacher, cosine-raised to 1; use 0.99 for short runs / small batches"))
    center_momentum: float = Field(0.9, ge=0, lt=1, description=(
        "DINO: EMA of the teacher-output centre (prevents collapse to one prototype)"))
    local_crops: int = Field(2, ge=0, le=64, description=(
        "DINO: small crops per image (more = better features, linearly more compute)"))
    local_size: int = Field(12, gt=0, le=1024, description=(
        "DINO: side of the local crops in pixels (global crops are full size)"))
    # mae / cl_mim
    mask_ratio: float = Field(0.75, gt=0, lt=1, description=(
        "MAE / cl_mim (ViT only): share of patches hidden; 0.75 (paper) works for 7x7 tokens too"))
    norm_pix_loss: bool = Field(True, description=(
        "MAE: reconstruct per-patch-normalised pixels (better features; set false to get images back from the "
        "decoder directly)"))
    decoder_dim: int = Field(128, gt=0, le=8192, description=(
        "MAE decoder width (kept in models/encoder/ for the synthesis stage)"))
    decoder_depth: int = Field(2, ge=1, le=64, description=(
        "MAE decoder blocks; a light decoder forces the encoder to do the work"))
    decoder_heads: int = Field(4, ge=1, le=256, description="MAE decoder attention heads")
    cl_weight: float = Field(0.2, ge=0, le=1, alias="lambda", description=(
        "cl_mim: weight of the contrastive term (1 - lambda goes to MAE); Park et al. find small weights "
        "(0.1-0.3) keep MIM's local features and add separability"))
    cl_mim_cl: Literal["simclr", "dino"] = Field("simclr", description=(
        "cl_mim: simclr | dino for the class-token term"))
    # augmentation
    crop_scale_min: float = Field(0.2, gt=0, le=1, description=(
        "augmentation (albumentations; colour jitter and grayscale only for RGB): smallest random-resized-crop "
        "area; 0.08 (ImageNet) is too aggressive at 28px"))
    flip: bool = Field(True, description=(
        "horizontal flips (turn off for data where left/right matters, e.g. digits)"))
    jitter: float = Field(0.4, ge=0, description="brightness/contrast (+saturation/hue for RGB) strength")
    blur_p: float = Field(0.2, ge=0, le=1, description="Gaussian blur probability (keep low on tiny images)")
    noise_p: float = Field(0.2, ge=0, le=1, description="Gaussian noise probability")
    # optimisation
    epochs: int = Field(3, ge=1, le=100_000, description=(
        "passes (of steps_per_epoch steps) over the train + pool images"))
    steps_per_epoch: int = Field(0, ge=0, le=10_000_000, description=(
        "steps per epoch; 0 = a full pass over the images"))
    batch_size: int = Field(256, ge=2, le=65536, description=(
        "global batch (split over torchrun processes); SimCLR likes large batches"))
    optimizer: Literal["adamw", "sgd", "lars"] = Field("adamw", description=(
        "adamw | sgd (momentum; one state buffer instead of two: ~45 MiB less for a ResNet-18) | lars (SGD with a "
        "per-layer trust ratio, SimCLR's choice for big batches)"))
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd / lars momentum")
    lr: float = Field(2e-3, gt=0, description=(
        "peak learning rate; halve it if the loss spikes or becomes NaN. adamw: 2e-3; sgd: ~0.06 x batch/256 "
        "(lightly's SimCLR recipe); lars: ~0.3 x batch/256"))
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine decay ends at lr * this")
    weight_decay: float = Field(1e-4, ge=0, description=(
        "adamw: 1e-4 (0.05 for ViTs on long runs); sgd / lars: ~5e-4 (lightly) / 1e-6"))
    warmup_epochs: float = Field(0.5, ge=0, le=100_000, description=(
        "linear warm-up (fractional epochs allowed); raise for ViTs / large lr"))
    init_from: str = Field("", description=(
        "an encoder directory (models/encoder layout: config.json + encoder.safetensors) of the same architecture "
        "to start from instead of random weights (heads and decoder start fresh); '' = random init. MAE "
        "pre-pretraining (Singh et al., ICCV 2023): train method mae, copy models/encoder to e.g. models/mae and "
        "`dvc add` it, then `dvc exp run -S pretrain.method=simclr -S pretrain.init_from=models/mae`. The shipped "
        "dvc.yaml cannot list it as a dependency (it is optional): add it to your pretrain stage's deps, or force "
        "the stage (dvc repro -f pretrain) after it changes; its sha256 goes to config.json and MLflow "
        "(benchmarks/README.md)"))
    seed: Seed = Field(0, description=(
        "fixes init, batch order and augmentations (resume gives the same result)"))
    workers: int = Field(2, ge=0, le=256, description=(
        "DataLoader worker processes (0 = in the training process); leave a core for the model"))
    threads: int = Field(0, ge=0, le=1024, description="torch intra-op threads; 0 = torch's default (all cores)")
    device: str = Field("auto", description="auto (cuda if present) | cpu | cuda")
    precision: Precision = Field("auto", description=(
        "auto | fp32 | bf16. bf16 runs the forward pass under bfloat16 autocast (weights, optimiser state and the "
        "losses stay float32): faster only where the hardware computes in bf16 natively; auto picks it there, and "
        "only for the architectures where it measured >= 1.3x faster at equal accuracy (resolve_precision, "
        "benchmarks/README.md); else fp32"))
    checkpoint_every: int = Field(50, ge=1, le=10_000_000, description=(
        "steps between atomic checkpoints (also one at every epoch end)"))
    checkpoint_dir: str = Field("checkpoints/pretrain", description=(
        "outside DVC's cache; a killed run resumes from here"))
    # evaluation / outputs
    embed_batch_size: int = Field(512, gt=0, le=65536, description=(
        "images per forward pass when embedding every image (the embed stage)"))
    knn_k: int = Field(200, gt=0, le=100_000, description=(
        "neighbours of the kNN evaluation (lightly's benchmark protocol: 200)"))
    knn_temperature: float = Field(0.1, gt=0, description="kNN vote weight exp(sim / T) (lightly / InstDisc: 0.1)")
    collapse_min_effective_rank: float = Field(2.0, ge=0, description=(
        "below: reported as collapsed (all images on a line)"))
    collapse_min_std_ratio: float = Field(0.05, ge=0, description=(
        "below: collapsed (normalised features' std x sqrt(dim); ~1 is healthy)"))

    def encoder_config(self, img_size: int, in_chans: int) -> EncoderConfig:
        return EncoderConfig(backbone=self.backbone, img_size=img_size, in_chans=in_chans, patch_size=self.patch_size,
                             stem_stride=self.stem_stride, backbone_args=dict(self.backbone_args))

    def augment_config(self, img_size: int, in_chans: int) -> AugmentConfig:
        return AugmentConfig(size=img_size, channels=in_chans, crop_scale_min=self.crop_scale_min, flip=self.flip,
                             jitter=self.jitter, blur_p=self.blur_p, noise_p=self.noise_p,
                             global_crops=1 if self.method == "mae" else 2,
                             local_crops=self.local_crops if self.method == "dino" else 0,
                             local_size=self.local_size)

    @field_validator("method")
    @classmethod
    def _registered_method(cls, v: str) -> str:
        load_plugins()
        return require_registered(v, "SSL method", SSL_METHODS, SSL_METHODS_GROUP)

    @model_validator(mode="after")
    def _temperature_bounds(self) -> PretrainParams:
        if self.temperature_min > self.temperature_max:
            raise ValueError(f"temperature_min ({self.temperature_min}) must not exceed temperature_max "
                             f"({self.temperature_max})")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (a checkpoint from other params is ignored); where
        and how the arithmetic runs (device, threads, precision) is left out, so a run may resume elsewhere, and
        so are settings that change nothing at their defaults (a constant temperature's schedule bounds, an empty
        ``init_from``). :func:`train` adds the ``init_from`` encoder's digest."""
        unused = set()
        if self.temperature_schedule == "constant":
            unused |= {"temperature_schedule", "temperature_min", "temperature_max", "temperature_period"}
        if not self.init_from:
            unused.add("init_from")
        keep = self.model_dump(exclude={"workers", "device", "checkpoint_every", "checkpoint_dir", "embed_batch_size",
                                        "knn_k", "knn_temperature", "collapse_min_effective_rank",
                                        "collapse_min_std_ratio", "threads", "precision", *unused})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


# --- data ---------------------------------------------------------------------------------------------


class ViewDataset(Dataset):
    """Views of rows of a uint8 ``(N, H, W, C)`` array; fetched a batch at a time (``__getitems__``).

    ``images`` is an ``.npy`` path, memory-mapped in each worker when it first reads (nothing but the path
    travels to the workers), or an in-memory array, which forked workers share.
    """

    def __init__(self, images: str | Path | np.ndarray, rows: np.ndarray, views: ViewMaker):
        in_memory = isinstance(images, np.ndarray)
        self.images_path = None if in_memory else Path(images)
        self.rows = rows
        self.views = views
        self._images: np.ndarray | None = images if in_memory else None

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
    lineage: dict[str, Any] = field(default_factory=dict)  # init_lineage of pretrain.init_from; {} from scratch


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
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
# a device type or architecture not measured stays fp32. On a 2-core avx512_bf16 CPU neither path reached 1.3x;
# on an H100 the ResNet-18 SimCLR step ran 1.51x (benchmarks/results/gpu_profile.json; autocast's accuracy was
# within the seed spread on the CPU, the same arithmetic). The ViT is not measured on a GPU.
BF16_FASTER: dict[str, frozenset[str]] = {"cpu": frozenset(), "cuda": frozenset({"resnet"})}


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


def _arch(config: EncoderConfig) -> str:
    """An encoder architecture in one line: the backbone, then every other setting that shapes its weights."""
    rest = {k: v for k, v in asdict(config).items() if k != "backbone"}
    return f"{config.backbone} {json.dumps(rest, sort_keys=True)}"


def init_lineage(directory: str | Path) -> dict[str, Any]:
    """Where an ``init_from`` encoder came from: ``{"path", "sha256"}`` (of its ``encoder.safetensors``),
    ``"method"`` (the method that trained it, when its ``config.json`` says) and ``"init_from"`` (that encoder's
    own lineage, when it was itself initialised from another).

    Raises:
        FileNotFoundError: ``directory`` has no ``encoder.safetensors`` or ``config.json``.
        ValueError: ``config.json`` is not a JSON object.
    """
    directory = Path(directory)
    for name in ("config.json", "encoder.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"pretrain.init_from={directory}: no {name} there (expected an encoder "
                                    "directory as the pretrain stage writes models/encoder/)")
    try:
        config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"pretrain.init_from={directory}: config.json is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"pretrain.init_from={directory}: config.json is not a JSON object")
    lineage: dict[str, Any] = {"path": str(directory), "sha256": file_sha256(directory / "encoder.safetensors")}
    if isinstance(config.get("method"), str):
        lineage["method"] = config["method"]
    if isinstance(config.get("init_from"), dict):
        lineage["init_from"] = config["init_from"]
    return lineage


def load_init(encoder: Encoder, directory: str | Path) -> dict[str, Any]:
    """Load the weights of the encoder saved in ``directory`` (:func:`sslvision.models.save_encoder`'s layout)
    into ``encoder``, which must have the same architecture; draws no random numbers.

    Returns:
        :func:`init_lineage` of ``directory``.

    Raises:
        FileNotFoundError: ``directory`` holds no saved encoder.
        ValueError: another architecture (the message names both), or weights that do not fit.
    """
    directory = Path(directory)
    lineage = init_lineage(directory)
    source = encoder_config(json.loads((directory / "config.json").read_text()), directory / "config.json")
    if _arch(source) != _arch(encoder.config):
        raise ValueError(f"pretrain.init_from={directory}: the encoder there is {_arch(source)}, this run builds "
                         f"{_arch(encoder.config)}; init_from needs the same architecture (backbone, backbone_args, "
                         "img_size, in_chans, patch_size, stem_stride)")
    load_weights(encoder, directory / "encoder.safetensors")
    return lineage


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


def train(p: PretrainParams, images: str | Path | np.ndarray, rows: np.ndarray, *,
          on_epoch: Callable[[dict[str, float]], None] | None = None,
          on_step: Callable[[int, float], bool | None] | None = None,
          probe_rows: np.ndarray | None = None, progress: bool = True, checkpoints: bool = True) -> TrainResult:
    """Pretrain on ``rows`` of ``images``: uint8 ``(N, H, W, C)``, an ``.npy`` path (memory-mapped, see
    :class:`ViewDataset`) or an in-memory array (used as it is, not copied).

    With ``checkpoints`` it checkpoints to ``p.checkpoint_dir`` and resumes from a checkpoint of the same
    params there; without, it neither reads nor writes one. ``on_epoch(metrics)`` is called on rank 0 after
    each epoch (logging; on resume, first for the epochs the checkpoint already holds); ``on_step(step, loss)``
    after every step: returning True ends training there (a wall-clock budget), raising simulates a kill.
    ``probe_rows`` (default: the first 512 training rows) are embedded each epoch to measure collapse.
    """
    views_from = images  # what the DataLoader workers read: the path (each maps the file) or the array
    source = "images" if isinstance(images, np.ndarray) else str(images)
    if not isinstance(images, np.ndarray):
        images = np.load(Path(images), mmap_mode="r")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    _, h, w, c = images.shape
    if h != w:
        raise ValueError(f"{source}: images must be square, got {h}x{w}")
    device = resolve_device(p.device)
    distributed = init_distributed(device)
    rank, world = rank_and_world()
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
    lineage = load_init(encoder, p.init_from) if p.init_from else {}  # before DINO copies it into its teacher
    model = build_method(p, encoder, total, steps_per_epoch).to(device)
    optimizer = _optimizer(model, p)
    precision = training_precision(p.precision, device, encoder.is_vit)
    if rank == 0:
        log.info("pretrain: %s on %s", precision, device)
    lrs = cosine_schedule(p.lr, p.lr * p.min_lr_ratio, total, int(p.warmup_epochs * steps_per_epoch))

    ckpt_path = Path(p.checkpoint_dir) / "last.pt" if checkpoints else None
    fingerprint = p.fingerprint()
    if lineage:  # another init_from encoder at the same path is another run
        fingerprint = hashlib.sha256(f"{fingerprint}:{lineage['sha256']}".encode()).hexdigest()[:16]
    step, history, epoch_sums = 0, [], {"loss": 0.0, "n": 0}
    state = _read_checkpoint(ckpt_path) if ckpt_path is not None and ckpt_path.exists() else None
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
        if rank != 0 or ckpt_path is None:
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
    dataset = ViewDataset(views_from, rows, ViewMaker(p.augment_config(h, c), seed=p.seed))
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
                last = ("no checkpoints are kept" if ckpt_path is None else f"the last good checkpoint is {ckpt_path}"
                        + ("" if ckpt_path.exists() else " (none written yet)"))
                raise NonFiniteLossError(
                    f"pretrain: loss is {loss.item()} at step {step} (epoch {epoch + 1}); training stopped. "
                    f"Lower pretrain.lr (now {p.lr}), raise pretrain.temperature or warmup_epochs; {last}")
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
        stats = (collapse_stats(embed_features(encoder, images[np.sort(probe)], p.embed_batch_size, device))
                 if rank == 0 else {})
        model.train()
        record = {"epoch": epoch + 1, "step": step, "loss": epoch_sums["loss"] / max(epoch_sums["n"], 1),
                  "lr": float(lrs[step - 1]), **model.scheduled(step - 1), **stats, **throughput(totals, p.workers)}
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
                       resumed_from=resumed_from, throughput=throughput(totals, p.workers), precision=precision,
                       lineage=lineage)


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
    z = l2_normalise(features)
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


# --- the array API ------------------------------------------------------------------------------------


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` as ``(N, H, W, C)``: a view, never a copy."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images: expected a uint8 array (N, H, W) or (N, H, W, C), got {got}")
    return images[..., None] if images.ndim == 3 else images


def pretrain_encoder(images: np.ndarray, *, method: str = "simclr", epochs: int | None = None,
                     batch_size: int | None = None,
             seed: int = 0, device: str = "cpu", **overrides: Any) -> Encoder:
    """Self-supervised pretraining of an encoder on every image of an array (no labels, no files).

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, H, W, C)``, square, ``N >= batch_size``; used as it is, not copied.
        method: the SSL method (``simclr``, ``vicreg``, ``dino``, ``mae``, ``cl_mim``; the ViT-only ``mae`` and
            ``cl_mim`` need ``backbone="vit_*"``), or any name in :data:`sslvision.ssl.SSL_METHODS` (registered
            with :func:`~sslvision.ssl.register_method`, here or by an entry-point plugin).
        epochs: passes over the images; None keeps :class:`PretrainParams`' default.
        batch_size: images per step; None keeps :class:`PretrainParams`' default.
        seed: seeds the weights, the batch order and the views.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        **overrides: any other :class:`PretrainParams` field (``backbone``, ``lr``, ``workers``, ...). Checkpoints
            are written, and a checkpoint of the same params resumed, only when ``checkpoint_dir`` is given.

    Returns:
        The trained :class:`~sslvision.models.Encoder`, in eval mode, on ``device``.

    Raises:
        ValueError: an unknown or invalid parameter (the message names the key); images of another dtype or
            shape; fewer images than ``batch_size``; an ``init_from`` encoder of another architecture.
        FileNotFoundError: ``init_from`` names a directory without a saved encoder.
        NonFiniteLossError: the loss became NaN or infinite.

    Example::

        images = np.random.default_rng(0).integers(0, 256, (512, 28, 28), dtype=np.uint8)
        encoder = pretrain_encoder(images, epochs=1, batch_size=128)
        features = embed(encoder, images)  # float32 (512, encoder.dim)
    """
    given = {"epochs": epochs, "batch_size": batch_size}
    p = PretrainParams(**{**overrides, "method": method, "seed": seed, "device": device,
                          **{k: v for k, v in given.items() if v is not None}})
    images = _as_nhwc(images)
    result = train(p, images, np.arange(len(images)), checkpoints="checkpoint_dir" in overrides)
    return result.encoder.eval()


def embed(encoder: Encoder, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Embeddings of images, computed on the device ``encoder`` is on; its train/eval mode is left as it was.

    Args:
        encoder: from :func:`pretrain_encoder` or :func:`sslvision.models.load_encoder`.
        images: uint8 ``(N, H, W)`` or ``(N, H, W, C)`` with the encoder's channel count; a memory-mapped array
            is read ``batch_size`` images at a time.
        batch_size: images per forward pass.

    Returns:
        float32 ``(N, D)``, ``D = encoder.dim``; row i embeds image i.

    Raises:
        ValueError: images of another dtype, shape or channel count, or ``batch_size < 1``.

    Example::

        encoder = pretrain_encoder(images, epochs=1, batch_size=128)
        features = embed(encoder, images, batch_size=512)
        features.dtype, features.shape  # float32, (len(images), encoder.dim)
    """
    images = _as_nhwc(images)
    if images.shape[-1] != encoder.config.in_chans:
        raise ValueError(f"images: {images.shape[-1]} channels, the encoder takes {encoder.config.in_chans}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return embed_features(encoder, images, batch_size, next(encoder.parameters()).device)
