"""Encoders (timm backbones) and the heads SSL methods put on top of them.

An :class:`Encoder` wraps any timm ResNet or ViT built with ``pretrained=False`` and maps a batch of
images to one vector per image (``forward_features`` then the model's own pooling). Small inputs
work: a ResNet gets a 3x3 stem with a configurable stride and no max-pool (a 28x28 image keeps its
resolution into the first stage instead of shrinking to 7x7), and a ViT takes its ``img_size``,
``patch_size`` and ``in_chans`` from the config (and accepts smaller crops, for DINO's local views).

Images travel as uint8 ``(N, H, W, C)`` arrays (the ingest contract) and become network input only
in :func:`to_input`, so data-loader workers ship a quarter of the bytes float32 would need.

On disk (``models/encoder/``): ``encoder.safetensors`` (+ ``decoder.safetensors`` for MAE, which the
synthesis stage reuses) and ``config.json``; :func:`load_encoder` rebuilds the network from the JSON
and loads the tensors: no pickles anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sslvision.io import output_dir

MEAN, STD = 0.5, 0.5


@dataclass
class EncoderConfig:
    """How to build an encoder; stored as JSON next to its weights."""

    backbone: str = "resnet18"  # a timm factory name: resnet*, vit_*
    img_size: int = 28
    in_chans: int = 1
    patch_size: int = 4  # ViT only: 28 / 4 = 7x7 tokens
    stem_stride: int = 1  # ResNet only: 1 keeps full resolution into layer1 (best for 28x28), 2 is 4x cheaper
    backbone_args: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (channels, embed_dim, depth...)


@dataclass
class DecoderConfig:
    """The MAE decoder (kept with the encoder; the synthesis stage reconstructs images with it)."""

    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 4


def to_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` -> normalised float32 ``(B, C, H, W)``, a channels-last view (no copy of the
    layout): convolutions then take oneDNN's / cuDNN's NHWC fast path. Measured on 2 CPU cores, a ResNet-18
    SimCLR step at 28x28 runs at 27 img/s from this input and at 25 img/s from an NCHW-contiguous copy;
    converting the weights to channels_last as well adds nothing (27.4 vs 27.3 img/s)."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0).sub_(MEAN).div_(STD)


class Encoder(nn.Module):
    """A timm backbone whose output is one pooled feature vector per image."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, in_chans=config.in_chans)
        if config.backbone.startswith("vit"):
            kwargs.update(img_size=config.img_size, patch_size=config.patch_size, dynamic_img_size=True)
        kwargs.update(config.backbone_args)
        try:
            self.backbone = timm.create_model(config.backbone, **kwargs)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"cannot build timm backbone {config.backbone!r} with {kwargs}: {err}") from err
        self.is_vit = isinstance(self.backbone, VisionTransformer)
        if self.is_vit:
            if not self.backbone.has_class_token:
                raise ValueError(f"{config.backbone}: ViT backbones need a class token")
        elif hasattr(self.backbone, "conv1") and hasattr(self.backbone, "maxpool"):
            self._adapt_stem_to_small_inputs()
        else:
            raise ValueError(f"unsupported backbone {config.backbone!r}: use a timm resnet* or vit_* model")
        self.dim: int = self.backbone.num_features

    def _adapt_stem_to_small_inputs(self) -> None:
        """3x3 stem conv with ``stem_stride`` and no max-pool (as SimCLR does for CIFAR)."""
        stride = self.config.stem_stride
        conv1 = self.backbone.conv1
        if isinstance(conv1, nn.Sequential):  # deep stems (resnet10t, ...): only the first conv strides
            first = conv1[0]
            conv1[0] = nn.Conv2d(first.in_channels, first.out_channels, 3, stride, 1, bias=False)
        else:
            self.backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride, 1, bias=False)
        self.backbone.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    @property
    def num_patches(self) -> int:
        return (self.config.img_size // self.config.patch_size) ** 2

    def forward_masked(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE encoder pass on a random subset of patches (ViT only).

        Returns the encoded tokens (class token first), the mask (1 = hidden patch) and the indices
        that restore the original patch order.
        """
        if not self.is_vit:
            raise ValueError("masked image modelling needs a ViT backbone (set pretrain.backbone to vit_*)")
        vit = self.backbone
        x = vit.patch_embed(imgs)
        if x.ndim == 4:  # dynamic_img_size keeps the token grid
            x = x.flatten(1, 2)
        pos = vit.pos_embed
        x = x + pos[:, vit.num_prefix_tokens:]
        x, mask, ids_restore = random_masking(x, mask_ratio)
        cls = (vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = vit.norm_pre(vit.pos_drop(torch.cat([cls, x], dim=1)))
        x = vit.norm(vit.blocks(x))
        return x, mask, ids_restore


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - mask_ratio`` share of the tokens of each sample (per-sample shuffling)."""
    n, length, dim = x.shape
    keep = max(1, int(round(length * (1 - mask_ratio))))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)``, patches in row-major order (as the ViT tokens)."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, length, _ = x.shape
    p, g = patch_size, int(round(length**0.5))
    x = x.reshape(b, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, g * p, g * p)


class MAEDecoder(nn.Module):
    """A small transformer that predicts the pixels of hidden patches from the visible tokens."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_size: int, in_chans: int,
                 config: DecoderConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.embed = nn.Linear(encoder_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, config.num_heads, mlp_ratio=4.0) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(d)
        self.pred = nn.Linear(d, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """Projection/expander MLP: (Linear-BN-ReLU) x (layers-1), then Linear (SimCLR, VICReg heads)."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class DINOHead(nn.Module):
    """DINO's head: MLP to a bottleneck, L2-normalise, weight-normalised linear layer to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False  # norm_last_layer=True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


def save_encoder(directory: str | Path, encoder: Encoder, decoder: MAEDecoder | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """Write ``encoder.safetensors`` (+ ``decoder.safetensors``) and ``config.json`` atomically."""
    with output_dir(directory, "encoder") as tmp:
        save_file(_contiguous(encoder.state_dict()), tmp / "encoder.safetensors")
        config: dict[str, Any] = {"encoder": asdict(encoder.config), "dim": encoder.dim, "decoder": None}
        if decoder is not None:
            save_file(_contiguous(decoder.state_dict()), tmp / "decoder.safetensors")
            config["decoder"] = asdict(decoder.config)
        config.update(extra or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the pretrain stage first (dvc repro pretrain)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def load_weights(module: nn.Module, path: Path) -> None:
    """Load the safetensors file ``path`` into ``module``: tensors only, nothing is ever unpickled. A
    file that is not safetensors (e.g. a pickled ``.pt`` renamed) or does not fit ``module`` is a
    ``ValueError`` naming it."""
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a safetensors weights file ({err})") from err
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the model its config.json describes "
                         f"({str(err).splitlines()[0]})") from err


# What a config.json may ask for, checked before any network is built from it: a network's size follows
# from these numbers, so a corrupt or hostile file (``in_chans: 10**9``) would otherwise allocate
# gigabytes before anything fails. Generous for any real image model.
ENCODER_BOUNDS = {"img_size": (1, 4096), "in_chans": (1, 64), "patch_size": (1, 4096), "stem_stride": (1, 16)}
MAX_CONFIG_INT = 65536  # any other size in a config (backbone_args widths and depths, decoder dims...)
MAX_CLASSES = 100_000


def check_sizes(value: Any, path: Path, key: str, low: int = 0, high: int = MAX_CONFIG_INT) -> None:
    """Refuse any integer in ``value`` (recursively through lists and objects) outside ``[low, high]``,
    naming the file and the key."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_sizes(v, path, f"{key}.{k}" if key else str(k), low, high)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_sizes(v, path, f"{key}[{i}]", low, high)
    elif isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
        raise ValueError(f"{path}: {key} = {str(value)[:40]} is out of bounds [{low}, {high}]")


def encoder_config(config: dict[str, Any], path: Path) -> EncoderConfig:
    """The ``encoder`` object of the config.json ``path`` as an :class:`EncoderConfig`, checked first: known
    keys only, each size within :data:`ENCODER_BOUNDS` / :data:`MAX_CONFIG_INT` (the error names the key)."""
    raw = config.get("encoder") if isinstance(config, dict) else None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: no 'encoder' object")
    unknown = sorted(set(raw) - {f.name for f in fields(EncoderConfig)})
    if unknown:
        raise ValueError(f"{path}: encoder.{unknown[0][:80]}: unknown key")
    for key, (low, high) in ENCODER_BOUNDS.items():
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
            raise ValueError(f"{path}: encoder.{key} must be an integer")
        check_sizes(raw.get(key), path, f"encoder.{key}", low, high)
    if not isinstance(raw.get("backbone", ""), str) or not isinstance(raw.get("backbone_args", {}), dict):
        raise ValueError(f"{path}: encoder.backbone must be a name and encoder.backbone_args an object")
    check_sizes(raw.get("backbone_args", {}), path, "encoder.backbone_args")
    return EncoderConfig(**raw)


def build_for_weights(build: Callable[[], nn.Module], weights: Path, config: Path) -> nn.Module:
    """``build()`` the network ``config`` describes, once on the meta device (which allocates nothing) to
    check that it has exactly the tensors of the safetensors file ``weights`` (names and shapes, read
    from the file's header alone), then for real: a config that does not fit its weights is refused
    before any memory is spent on it."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{weights}: not a safetensors weights file ({err})") from err
    if shapes != stored:
        key = next(k for k in sorted(set(shapes) | set(stored)) if shapes.get(k) != stored.get(k))
        raise ValueError(f"{config}: describes a network that does not fit {weights.name} (tensor {key}: "
                         f"{shapes.get(key)} in the network, {stored.get(key)} in the file)")
    return build()


def load_encoder(directory: str | Path) -> Encoder:
    """Rebuild the encoder from ``config.json`` (checked: :func:`encoder_config`, :func:`build_for_weights`)
    and load its safetensors weights (eval mode)."""
    directory = Path(directory)
    config = _read_config(directory)
    cfg = encoder_config(config, directory / "config.json")
    encoder = build_for_weights(lambda: Encoder(cfg), directory / "encoder.safetensors", directory / "config.json")
    load_weights(encoder, directory / "encoder.safetensors")
    return encoder.eval()


def load_decoder(directory: str | Path) -> MAEDecoder:
    """The MAE decoder saved with an encoder (``pretrain.method: mae`` or ``cl_mim``)."""
    directory = Path(directory)
    config = _read_config(directory)
    if not config.get("decoder"):
        raise ValueError(f"{directory}: this encoder was trained without an MAE decoder (method mae or cl_mim)")
    enc = encoder_config(config, directory / "config.json")
    check_sizes({"dim": config.get("dim"), "decoder": config["decoder"]}, directory / "config.json", "", low=1)
    decoder = build_for_weights(
        lambda: MAEDecoder(config["dim"], (enc.img_size // enc.patch_size) ** 2, enc.patch_size, enc.in_chans,
                           DecoderConfig(**config["decoder"])),
        directory / "decoder.safetensors", directory / "config.json")
    load_weights(decoder, directory / "decoder.safetensors")
    return decoder.eval()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


@torch.no_grad()
def embed(encoder: Encoder, images: np.ndarray, batch_size: int = 512, device: str | torch.device = "cpu",
          progress: bool = False) -> np.ndarray:
    """Features of every image of a uint8 ``(N, H, W, C)`` array (memory-mapped is fine), float32 ``(N, D)``.

    Reads the array chunk by chunk, so memory stays bounded whatever ``N``.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"embed expects uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    was_training = encoder.training
    encoder.eval().to(device)
    out = np.empty((len(images), encoder.dim), dtype=np.float32)
    starts = range(0, len(images), batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description="embedding", total=len(starts))
    for s in starts:
        chunk = torch.from_numpy(np.array(images[s:s + batch_size])).to(device)  # a writable copy of the chunk
        out[s:s + len(chunk)] = encoder(to_input(chunk)).float().cpu().numpy()
    encoder.train(was_training)
    return out
