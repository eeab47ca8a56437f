"""Reading a production batch: the images the monitor and the ``drift_eval`` stage evaluate.

A batch is a directory of images (flat files are unlabeled, files in a subdirectory named after a class
carry that class, as the demo's ``incoming/`` batches) or an already ingested directory (``images.npy``
and ``manifest.parquet``). Every image is converted exactly as ingest converts training images
(:func:`sslvision.ingest.decode_one`), so a batch is compared with the training data pixel for pixel.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from sslvision.ingest import Conversion, IngestParams, decode_one
from sslvision.io import file_sha256

log = logging.getLogger(__name__)

# The file name suffixes read as images (any other file in a batch is ignored).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_batch(path: str | os.PathLike, classes: list[str], channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of :func:`read_batch_files`, without the record of the files."""
    images, labels, _ = read_batch_files(path, classes, channels, size)
    return images, labels


def read_batch_files(path: str | os.PathLike, classes: list[str], channels: int,
                     size: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """The images of a production batch as uint8 ``(N, size, size, channels)``, their labels (``-1`` =
    unlabeled), converted exactly as ingest converts training images, and the files they came from.

    ``path`` is a batch directory (flat image files are unlabeled; files in a subdirectory named after
    a class carry that class; other subdirectories are an error naming them) or an ingested directory
    (``images.npy`` + ``manifest.parquet``). Files ingest would quarantine are skipped with a warning,
    and so are symbolic links (never followed: a link can point anywhere outside the batch).

    The files: ``{path relative to the batch: sha256}`` of every file decoded, its bytes the same
    before and after decoding; what admitting the batch to the pool may copy (``trigger.admit_batch``),
    so a file written to the batch during or after its evaluation never joins unevaluated. Empty for
    an ingested directory.

    Raises FileNotFoundError when ``path`` is not a directory, ValueError for a subdirectory that is not
    a class, an ingested batch of another image shape, or a batch with no decodable image.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: production batch directory not found")
    if (path / "images.npy").exists():
        return (*_read_ingested_batch(path, channels, size), {})
    index = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    links = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            links.append(entry.name)
        elif entry.is_dir():
            if entry.name not in index:
                raise ValueError(f"{entry}: subdirectory is not a class of the training data {classes}")
            for f in sorted(entry.rglob("*")):  # rglob does not descend into linked directories
                if f.is_symlink():
                    links.append(str(f.relative_to(path)))
                elif f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append((f, index[entry.name]))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            files.append((entry, -1))
    if links:
        log.warning("%s: %d symbolic link(s) skipped, never followed (%s%s)", path, len(links), ", ".join(links[:3]),
                    ", ..." if len(links) > 3 else "")
    if not files:
        raise ValueError(f"{path}: no image files in the batch")
    limits = IngestParams()  # the same size guards as ingest's defaults
    conv = Conversion(channels, size, limits.max_file_bytes, limits.max_pixels)
    images, labels, bad, evaluated = [], [], [], {}
    for f, label in files:
        before = file_sha256(f)
        r = decode_one(str(f), None, None, conv)
        if r[0] == "ok":
            images.append(r[2])
            labels.append(label)
            if before is not None and file_sha256(f) == before:
                evaluated[f.relative_to(path).as_posix()] = before
        else:
            bad.append(f"{f.name}: {r[1]}")
    if bad:
        log.warning("%s: %d file(s) skipped (%s%s)", path, len(bad), "; ".join(bad[:3]),
                    ", ..." if len(bad) > 3 else "")
    if not images:
        raise ValueError(f"{path}: none of the {len(files)} image files could be decoded")
    return np.stack(images), np.asarray(labels, dtype=np.int64), evaluated


def _read_ingested_batch(path: Path, channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.load(path / "images.npy", mmap_mode="r")
    if images.shape[1:] != (size, size, channels):
        raise ValueError(f"{path / 'images.npy'}: images of shape {images.shape[1:]}, the training data's are "
                         f"{(size, size, channels)}")
    manifest = path / "manifest.parquet"
    if manifest.exists():
        df = pd.read_parquet(manifest, columns=["index", "label"]).sort_values("index")
        labels = df["label"].to_numpy(np.int64)
        images = images[df["index"].to_numpy()]
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    return np.asarray(images), labels


def held_out_files(batch: str | Path, evaluated: dict[str, str], held_out_hashes: set[str], channels: int,
                   size: int) -> dict[str, str]:
    """The evaluated files of ``batch`` whose pixels, converted as ingest converts them, are identical to a
    held-out image (``held_out_hashes``: the test split's ``content_hash`` column): ``{path: why}``. Such a
    file must never join the pool: pretraining on it would leak the test split into every later
    evaluation."""
    limits = IngestParams()
    conv = Conversion(channels, size, limits.max_file_bytes, limits.max_pixels)
    out = {}
    for rel in evaluated:
        r = decode_one(str(Path(batch) / rel), None, None, conv)
        if r[0] == "ok" and r[3][3] in held_out_hashes:
            out[rel] = "identical to an image of the held-out test split (never pooled: it would leak the test set)"
    return out

