"""sslvision: self-supervised learning for messy, real-world image datasets, run as an MLOps workflow.

The library works on arrays (no params file, no paths, no MLflow)::

    import sslvision
    encoder = sslvision.pretrain_encoder(images, method="simclr", epochs=2)   # uint8 (N, H, W[, C]), no labels
    emb = sslvision.embed(encoder, images)                                    # float32 (N, D)
    issues = sslvision.find_label_issues(emb, labels)                         # one row per image
    drift = sslvision.detect_drift(emb_reference, emb_batch)                  # MMD permutation test

The DVC stages that run it on a project (``sslvision.stages``), the Prefect flows (``sslvision.flows``) and the
CLI (``sslvision --help``) are built on these functions. Names are imported lazily: ``import sslvision`` stays
cheap (no torch) until one is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "pretrain_encoder": "sslvision.pretrain",
    "embed": "sslvision.pretrain",
    "find_label_issues": "sslvision.audit",
    "synthesize_images": "sslvision.synthesize",
    "detect_drift": "sslvision.drift",
    "estimate_class_prior": "sslvision.drift",
    "SSL_METHODS": "sslvision.ssl",
    "register_method": "sslvision.ssl",
    "GENERATORS": "sslvision.synthesize",
    "register_generator": "sslvision.synthesize",
    "load_encoder": "sslvision.models",
    "fit_classifier": "sslvision.finetune",
}

__all__ = [
    "GENERATORS", "SSL_METHODS", "__version__", "detect_drift", "embed", "estimate_class_prior", "find_label_issues",
    "fit_classifier", "load_encoder", "metrics", "pretrain_encoder", "register_generator", "register_method",
    "synthesize_images",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name == "metrics":
        return importlib.import_module("sslvision.metrics")
    raise AttributeError(f"module 'sslvision' has no attribute {name!r}")


assert set(__all__) == set(_EXPORTS) | {"metrics", "__version__"}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from sslvision import metrics
    from sslvision.audit import find_label_issues
    from sslvision.drift import detect_drift, estimate_class_prior
    from sslvision.finetune import fit_classifier
    from sslvision.models import load_encoder
    from sslvision.pretrain import embed, pretrain_encoder
    from sslvision.ssl import SSL_METHODS, register_method
    from sslvision.synthesize import GENERATORS, register_generator, synthesize_images
