"""sslvision: self-supervised learning for messy, real-world image datasets, run as an MLOps workflow."""

__version__ = "0.1.0"
