"""The SSL method registry and what every method shares: the base class, fp32 losses, per-step schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn

from sslvision.models import Encoder, MAEDecoder
from sslvision.plugins import load_plugins, watch

if TYPE_CHECKING:  # annotations only: sslvision.pretrain imports this package at run time
    from sslvision.pretrain import PretrainParams

class SSLMethod(nn.Module):
    """An encoder plus whatever heads a method needs; ``forward(views, step)`` returns the loss.

    A method registered with :func:`register_method` is built by :meth:`build`, by default as
    ``cls(encoder, p)`` with ``p`` the ``pretrain`` params.
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.decoder: MAEDecoder | None = None

    @classmethod
    def build(cls, encoder: Encoder, p: PretrainParams, total_steps: int, steps_per_epoch: int) -> SSLMethod:
        """The method for a run of ``total_steps`` steps (``steps_per_epoch`` per epoch): ``cls(encoder, p)``;
        methods with per-step schedules override it to pass the run's length."""
        return cls(encoder, p)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after each optimiser step (EMA teachers)."""

    def scheduled(self, step: int) -> dict[str, float]:
        """The values of the method's own per-step schedules at ``step`` (SimCLR: ``temperature``), which the
        per-epoch history records; none by default."""
        return {}


# pretrain.method -> its class; filled by register_method (the built-in methods in sslvision.ssl.methods)
SSL_METHODS: dict[str, type[SSLMethod]] = {}
watch("SSL method", SSL_METHODS)  # a plugin may add a method, never replace one
T = TypeVar("T", bound=SSLMethod)


def register_method(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register an :class:`SSLMethod` subclass as the method ``name`` (``pretrain.method``).

    Args:
        name: the name :func:`build_method` looks up.

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        TypeError: the decorated object is not an :class:`SSLMethod` subclass.
        ValueError: ``name`` is already registered to another class.
    """
    def add(cls: type[T]) -> type[T]:
        if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
            raise TypeError(f"register_method({name!r}): {cls!r} is not a subclass of SSLMethod")
        if SSL_METHODS.get(name, cls) is not cls:
            raise ValueError(f"SSL method {name!r} is already registered ({SSL_METHODS[name].__qualname__})")
        SSL_METHODS[name] = cls
        return cls

    return add


def build_method(p: PretrainParams, encoder: Encoder, total_steps: int, steps_per_epoch: int) -> SSLMethod:
    """The SSL method ``p.method`` around ``encoder``, for a run of ``total_steps`` steps.

    Raises:
        ValueError: ``p.method`` is not registered (the message lists the registered names).
    """
    load_plugins()
    cls = SSL_METHODS.get(p.method)
    if cls is None:
        raise ValueError(f"pretrain.method={p.method!r} is not a registered SSL method; registered: "
                         f"{', '.join(sorted(SSL_METHODS))}")
    return cls.build(encoder, p, total_steps, steps_per_epoch)


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


def cosine_schedule(start: float, end: float, steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Per-step values: linear warm-up from 0 to ``start``, then cosine from ``start`` to ``end``."""
    warm = np.linspace(0, start, warmup_steps, endpoint=False)
    t = np.arange(max(steps - warmup_steps, 1)) / max(steps - warmup_steps, 1)
    return np.concatenate([warm, end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))])


def cosine_cycle(high: float, low: float, steps: int, period: int) -> np.ndarray:
    """Per-step values of a periodic cosine between ``high`` and ``low``, ``steps`` long (at least 1).

    ``value(t) = low + (high - low) * (1 + cos(2 pi t / period)) / 2``: ``high`` at step 0 and at every
    multiple of ``period``, ``low`` half a period later (the temperature schedule of Kukleva et al., ICLR 2023).

    Raises:
        ValueError: ``period < 1`` or ``low > high``.
    """
    if period < 1:
        raise ValueError(f"cosine_cycle: period must be >= 1 step, got {period}")
    if low > high:
        raise ValueError(f"cosine_cycle: low ({low}) must not exceed high ({high})")
    t = np.arange(max(steps, 1))
    return low + 0.5 * (high - low) * (1 + np.cos(2 * np.pi * t / period))
