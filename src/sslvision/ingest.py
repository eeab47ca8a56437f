"""Ingest: decode every image once, convert it, quarantine what cannot be used.

Sources (``list_source`` detects which from the path):

- an **ImageFolder** directory: ``train/`` and ``test/`` split directories of class directories
  (class directories sort in label order), or class directories directly (all ``train``);
- a **CSV or Parquet manifest** with columns ``path,label[,split]``; paths are relative to the
  manifest's directory, which is the data root (a path resolving outside it is quarantined);
  labels are class names, or integers (named by ``class_names`` or ``"0"``, ``"1"``, ...);
- an **IDX directory** (MNIST format): ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``.

Plus the **pool**: each directory under ``pool`` is one production batch that joined the SSL pool
(split ``pool``, batch = directory name); flat image files are unlabeled, class subdirectories labeled.

Classes are those of the ``train`` split (named labels), or ``0..max label`` (integer labels that look
like class indices: at most half of that range unused; other integer labels are each a class, by
value); a test or pool label outside them is an "unknown label". More than ``ingest.max_classes``
classes stops the stage.

Every listed file ends in exactly one of two places: a row of ``manifest.parquet`` or a row of
``quarantine.parquet`` with its reason (``REASONS``) and what Pillow said. Decoding runs in chunks on a
process pool and writes straight into a memory-mapped ``.npy`` on disk, so memory stays bounded by
``chunk_size`` whatever the dataset size. A content-hash cache (file bytes + conversion) makes
re-ingesting after a new pool batch decode only the new files.

The files written and their columns are the contract of ``sslvision.data`` (read its docstring).
An image file's id is its split (and pool batch), its file name without suffix and the start of the
sha256 of its bytes (``train/IMG_0001-3fa2b9c1``; ``assign_ids``): never the class directory or the label,
and distinct for distinct files even when every class directory uses the same names. Rows are ordered
by split, batch and id, so changing a label (moving a file to another class directory, editing a
manifest's label) leaves ``images.npy``, ``images.parquet`` and ``ssl_pool.parquet`` byte-identical and
DVC does not re-run pretrain.

:func:`run_ingest` takes its source and output directory as arguments and writes there and in the decode
cache (``cache_dir``) only; the DVC stage (its paths, reports, dataset card, MLflow run) is
:mod:`sslvision.stages.ingest`.
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import logging
import os
import re
import time
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from sslvision import io
from sslvision.params import Section

log = logging.getLogger(__name__)

UNREADABLE = "unreadable"
TRUNCATED = "truncated"
EMPTY = "empty"
NOT_IMAGE = "not an image"
UNKNOWN_LABEL = "unknown label"
MISSING = "missing file"
OUTSIDE = "path outside the data root"
TOO_LARGE = "too large"
DUPLICATE_ID = "duplicate id"
REASONS = (UNREADABLE, TRUNCATED, EMPTY, NOT_IMAGE, UNKNOWN_LABEL, MISSING, OUTSIDE, TOO_LARGE, DUPLICATE_ID)

SPLIT_ORDER = {"train": 0, "test": 1, "pool": 2}
# Files that describe a directory rather than being data: never listed.
METADATA_FILES = {"batch.json"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Signatures of image formats: a file that starts like an image but cannot be identified is truncated.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
# Most classes a source may have unless ingest.max_classes says otherwise: one stray integer label
# (100000000) must not make that many classes, each with its metrics, plot row and MLflow entries.
MAX_CLASSES = 1000


class IngestParams(Section):
    """The ``ingest`` stage: decode every image once, convert it, quarantine what cannot be used (with the
    reason)."""

    source: str = Field("data/raw", description=(
        "ImageFolder dir (train/ and test/ of class dirs, or class dirs = all train), CSV/Parquet manifest "
        "(path,label[,split]; paths relative to manifest_root), or a directory of MNIST-format IDX files "
        "(train-images-idx3-ubyte[.gz], ...)"))
    manifest_root: str = Field("", description=(
        "the directory a manifest's paths are resolved against and must stay inside (\"\" = the manifest's own "
        "directory): a project's manifest (`sslvision init`) lists the user's files where they are"))
    pool: str = Field("data/pool", description=(
        "directory of production batches that joined the SSL pool, one directory per batch (flat images = "
        "unlabeled, class subdirectories = labeled); must exist (empty is fine) because dvc.yaml tracks it"))
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB; every image is converted to this")
    size: int = Field(28, gt=0, le=4096, description=(
        "every image is resized (bilinear) to size x size (Fashion-MNIST native: 28); larger sizes grow "
        "images.npy and every later stage quadratically"))
    max_file_bytes: int = Field(20_000_000, gt=0, le=2**31, description=(
        'larger files are quarantined as "too large" without being read'))
    max_pixels: int = Field(40_000_000, gt=0, le=1_000_000_000, description=(
        'images with more pixels are quarantined as "too large" before decoding (decompression-bomb guard; '
        "Pillow's own limit is set to this too)"))
    chunk_size: int = Field(1024, gt=0, le=65536, description=(
        "images per chunk sent to a worker; memory is about 2 x workers x chunk_size x decoded image size, "
        "whatever the dataset size"))
    workers: int = Field(2, ge=0, le=256, description=(
        "decoding processes (use the cores you have; 0 or 1 = in this process)"))
    near_duplicate_bits: int = Field(0, ge=0, le=16, description=(
        "64-bit perceptual hashes within this Hamming distance are near-duplicates (0 = equal hashes; 4-8 also "
        "catches re-encoded/slightly edited copies but flags look-alikes on tiny images such as Fashion-MNIST "
        "trousers)"))
    min_class_count: int = Field(1, ge=0, le=1_000_000, description=(
        "train classes with fewer images are counted in metrics.rare_classes (kept)"))
    class_names: list[str] = Field(default_factory=list, description=(
        'names for integer labels (IDX files, integer manifests), in label order; empty = "0", "1", ...; for an '
        "ImageFolder they must match the class dirs"))
    max_classes: int = Field(MAX_CLASSES, ge=1, le=100_000, description=(
        "a source with more classes stops ingest (one stray integer label such as 100000000 would otherwise make "
        "that many classes); raise it for real ones"))
    cache_dir: str = Field("data/.ingest_cache", description=(
        "decoded images keyed by file-content hash + conversion, so re-ingesting after a new pool batch decodes "
        'only the new files; "" disables; not a DVC output (delete it to reclaim space; a damaged cache is '
        "ignored and rebuilt)"))


# --- listing ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Item:
    """One image to decode: a file (``path``) or a row of an IDX array (``pixels``).

    A listed file's ``id`` is ``<split>/[<batch>/]<file name without suffix>``; ``assign_ids`` appends
    the start of ``digest`` (the sha256 of the file's bytes) to make it the image's id.
    """

    id: str
    split: str
    batch: str
    source_path: str
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None
    digest: str | None = None


@dataclass
class Listing:
    """What a source holds before decoding: the items, the files refused already, the classes."""

    layout: str
    classes: list[str]
    items: list[Item] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    def refuse(self, source_path: str, split: str, reason: str, detail: str) -> None:
        self.quarantine.append({"source_path": source_path, "split": split, "reason": reason, "detail": detail})


def check_source(source: str | os.PathLike) -> Path:
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(
            f"{source}: source not found (expected an ImageFolder directory, a CSV/Parquet manifest "
            "with columns path,label[,split], or a directory of MNIST-format IDX files)")
    return source


def list_source(source: str | os.PathLike, class_names: list[str] | None = None,
                max_classes: int = MAX_CLASSES, manifest_root: str | os.PathLike | None = None) -> Listing:
    """List every image of ``source`` (ImageFolder dir, CSV/Parquet manifest or IDX dir); more than
    ``max_classes`` classes is an error. ``manifest_root``: the data root of a manifest's paths (default:
    its directory)."""
    source = check_source(source)
    _check_class_count(len(class_names or []), "ingest.class_names", max_classes)
    if source.is_file():
        if source.suffix.lower() in (".csv", ".parquet", ".pq"):
            return _list_manifest(source, class_names or [], max_classes, manifest_root)
        raise ValueError(f"{source}: unknown source layout: a file source must be a .csv or .parquet "
                         "manifest with columns path,label[,split]")
    if _find_idx(source, IDX_FILES["train"][0]):
        return _list_idx(source, class_names or [], max_classes)
    subdirs = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if "train" in subdirs or "test" in subdirs:
        splits = {s: source / s for s in ("train", "test") if s in subdirs}
        ignored = [d for d in subdirs if d not in splits]
        if ignored:
            log.warning("%s: ignoring directories %s (only train/ and test/ are splits)", source, ignored)
        return _list_image_folder(source, splits, class_names, max_classes)
    if subdirs:
        return _list_image_folder(source, {"train": source}, class_names, max_classes)
    files = sum(1 for e in source.iterdir() if not e.name.startswith("."))
    if files:
        raise ValueError(f"{source}: unknown source layout: {files} file(s) and no class directories: put "
                         "each class's images in a directory named after the class (an ImageFolder), or list "
                         "them in a CSV manifest with columns path,label")
    raise ValueError(f"{source}: empty source directory: no train/ or test/ split directories, no class "
                     "directories and no IDX files (train-images-idx3-ubyte[.gz]) in it")


def _files_under(directory: Path) -> Iterator[os.DirEntry]:
    """Every non-hidden file below ``directory``, in sorted order (symlinks included, not followed into)."""
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _files_under(Path(e.path))
        else:
            yield e


def _relative(path: str, root: str | Path) -> str:
    """``path`` relative to ``root`` (a prefix of it when listed from it; os.path.relpath is slow)."""
    prefix = os.path.join(root, "")
    rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
    return rel.replace(os.sep, "/")


def _check_class_count(n: int, where: str | Path, max_classes: int) -> None:
    if n > max_classes:
        raise ValueError(f"{where}: {n} classes, more than ingest.max_classes ({max_classes}); raise "
                         "ingest.max_classes if the data really has that many")


def _some(names: list[str], n: int = 10) -> str:
    """``names`` for a message: a long class list is not repeated in every quarantine row."""
    return str(names) if len(names) <= n else f"{str(names[:n])[:-1]}, ... ({len(names)} in all)]"


def _clip(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _refused_link(path: str, root: Path) -> tuple[str, str] | None:
    """The reason and detail for refusing the symlink ``path`` (a loop, a target outside ``root``), or None."""
    try:
        target = Path(path).resolve()
    except RuntimeError:  # a loop (Python 3.13 returns the path instead, and decoding reports the loop)
        return UNREADABLE, "symlink loop: the link leads back to itself"
    if not target.is_relative_to(root):
        return OUTSIDE, f"symlink to {target}, outside {root}"
    return None


def _stem(rel: str) -> str:
    """The file name of ``rel`` without its suffix (``2019/IMG_0001.jpg`` -> ``IMG_0001``)."""
    name = rel.rpartition("/")[2]
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def _list_image_folder(root: Path, splits: dict[str, Path], class_names: list[str] | None,
                       max_classes: int) -> Listing:
    class_split = splits.get("train", splits.get("test"))
    classes = sorted(d.name for d in class_split.iterdir() if d.is_dir() and not d.name.startswith("."))
    _check_class_count(len(classes), class_split, max_classes)
    if class_names:
        if sorted(class_names) != classes:
            raise ValueError(f"{class_split}: class directories {classes} differ from params class_names "
                             f"{class_names}")
        classes = list(class_names)
    listing = Listing(layout="imagefolder", classes=classes)
    real_root = root.resolve()
    for split, split_dir in splits.items():
        _list_class_dirs(listing, split_dir, split, "", root, real_root)
    return listing


def _list_class_dirs(listing: Listing, directory: Path, split: str, batch: str, shown_root: Path,
                     real_root: Path) -> None:
    """List ``directory``: files in class subdirectories are labeled by the subdirectory's name; files
    directly in it are unlabeled in the pool and refused elsewhere."""
    index = {c: i for i, c in enumerate(listing.classes)}
    prefix = f"{split}/{batch}/" if batch else f"{split}/"
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if not e.name.startswith(".") and e.name not in METADATA_FILES),
                         key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            label = index.get(entry.name, -2)
            files = _files_under(Path(entry.path))
        else:
            label = -1 if split == "pool" else -2
            files = iter([entry])
        for f in files:
            shown = _relative(f.path, shown_root)
            if label == -2:
                why = (f"class directory {entry.name!r} is not a class of the train split {_some(listing.classes)}"
                       if entry.is_dir() else "file directly in the split directory, not in a class directory")
                listing.refuse(shown, split, UNKNOWN_LABEL, why)
            elif f.is_symlink() and (refused := _refused_link(f.path, real_root)):
                listing.refuse(shown, split, *refused)
            else:
                listing.items.append(Item(id=prefix + _stem(f.name), split=split,
                                          batch=batch, source_path=shown, label=label, path=f.path))


def list_pool(pool: str | os.PathLike, listing: Listing) -> None:
    """Add each batch directory under ``pool`` to ``listing`` (split ``pool``, batch = directory name)."""
    pool = Path(pool)
    real_root = pool.resolve()
    for batch in sorted(d for d in pool.iterdir() if d.is_dir() and not d.name.startswith(".")):
        _list_class_dirs(listing, batch, "pool", batch.name, pool.parent, real_root)


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as err:  # pandas/pyarrow raise many types for a malformed file
        raise ValueError(f"{path}: cannot read the manifest: {err}") from err
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}; expected path,label[,split] "
                         f"(found {list(df.columns)})")
    return df


def _label_text(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    s = str(v).strip()
    return s or None


def _integer_classes(values: set[int], path: Path) -> list[str]:
    """Classes of integer labels: ``0..max`` when the labels look like class indices (at most half of that
    range unused), else each distinct value, so that one stray label cannot make millions of empty classes."""
    if not values:
        return []
    top = max(values)
    if top < 2 * len(values):
        return [str(i) for i in range(top + 1)]
    log.warning("%s: the %d distinct integer labels (up to %d) are not class indices 0..K-1; each value is a class",
                path, len(values), top)
    return [str(v) for v in sorted(values)]


def _list_manifest(path: Path, class_names: list[str], max_classes: int,
                   root: str | os.PathLike | None = None) -> Listing:
    df = _read_manifest(path)
    labels = [_label_text(v) for v in df["label"]]
    splits = ([str(s).strip().lower() or "train" for s in df["split"]] if "split" in df.columns
              else ["train"] * len(df))
    for row, s in enumerate(splits):
        if s not in ("train", "test"):
            raise ValueError(f"{path}: row {row + 2}: unknown split {_clip(s)!r} (expected train or test)")
    known = [lab for lab in labels if lab is not None]
    integer = bool(known) and all(re.fullmatch(r"-?\d{1,18}", lab) for lab in known)
    train_labels = [lab for lab, s in zip(labels, splits, strict=True) if lab is not None and s == "train"] or known
    if class_names:
        classes = list(class_names)
    elif integer:
        classes = _integer_classes({int(lab) for lab in known if int(lab) >= 0}, path)
    else:
        classes = sorted(set(train_labels))
    _check_class_count(len(classes), path, max_classes)
    names = {c: i for i, c in enumerate(classes)}

    def label_of(lab: str | None) -> int | None:
        if lab is None:
            return None
        if integer and class_names:  # integer labels index the class names
            return int(lab) if 0 <= int(lab) < len(classes) else None
        return names.get(str(int(lab)) if integer else lab)

    listing = Listing(layout="manifest", classes=classes)
    root = Path(root).resolve() if root else path.parent.resolve()
    for row, (raw_path, lab, split) in enumerate(zip(df["path"], labels, splits, strict=True)):
        shown = str(raw_path)
        try:
            resolved = (root / shown).resolve()  # an absolute path stays itself
            is_file = resolved.is_file()
        except (OSError, RuntimeError, ValueError) as err:  # a name too long, a symlink loop, a NUL byte
            listing.refuse(shown.replace("\0", "\\0"), split, UNREADABLE,
                           f"{path.name} row {row + 2}: {type(err).__name__}: {err}")
            continue
        if not resolved.is_relative_to(root):
            listing.refuse(shown, split, OUTSIDE, f"{shown} resolves to {resolved}, outside {root}")
            continue
        rel = resolved.relative_to(root).as_posix()
        label = label_of(lab)
        if label is None:
            listing.refuse(rel, split, UNKNOWN_LABEL, "no label" if lab is None
                           else f"label {_clip(lab)!r} is not one of the classes {_some(classes)}")
            continue
        if not is_file:
            listing.refuse(rel, split, MISSING,
                           f"{resolved}: " + ("is a directory" if resolved.is_dir() else "no such file"))
            continue
        listing.items.append(Item(id=f"{split}/{_stem(rel)}", split=split, batch="", source_path=rel,
                                  label=label, path=str(resolved)))
    return listing


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _list_idx(directory: Path, class_names: list[str], max_classes: int) -> Listing:
    from sslvision.idx import read_idx

    arrays: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images_file = _find_idx(directory, images_stem)
        if images_file is None:
            continue
        labels_file = _find_idx(directory, labels_stem)
        if labels_file is None:
            raise FileNotFoundError(f"{directory / labels_stem}[.gz]: missing labels for {images_file}")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{images_file}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"{labels_file}: {labels.shape} labels for {len(images)} images in {images_file}")
        arrays[split] = (images, labels.astype(np.int64), images_file.name)
    n_classes = max(int(labels.max(initial=-1)) for _, labels, _ in arrays.values()) + 1
    if not class_names:
        _check_class_count(n_classes, directory, max_classes)
    classes = list(class_names) or [str(i) for i in range(n_classes)]
    listing = Listing(layout="idx", classes=classes)
    for split, (images, labels, name) in arrays.items():
        for i in range(len(images)):
            shown = f"{name}#{i}"
            if not 0 <= labels[i] < len(classes):
                listing.refuse(shown, split, UNKNOWN_LABEL,
                               f"label {int(labels[i])} is not one of the classes {_some(classes)}")
                continue
            listing.items.append(Item(id=f"{split}/{i:05d}", split=split, batch="", source_path=shown,
                                      label=int(labels[i]), pixels=images[i]))
    return listing


def file_digest(path: str, max_bytes: int) -> str | None:
    """sha256 of the file's bytes; None for a file decoding refuses without reading it (empty, or more than
    ``max_bytes``: a FIFO is never opened) or cannot read (decoding then says why)."""
    try:
        size = os.stat(path).st_size
        if size == 0 or size > max_bytes:
            return None
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _digests(paths: list[str], max_bytes: int, workers: int) -> list[str | None]:
    """``file_digest`` of each path, on ``workers`` threads (hashlib releases the GIL), in order."""
    def run(chunk: list[str]) -> list[str | None]:
        return [file_digest(p, max_bytes) for p in chunk]

    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]  # a few futures, not one per file
    if workers <= 1:
        return [d for chunk in chunks for d in run(chunk)]
    with ThreadPoolExecutor(workers) as ex:
        return [d for done in ex.map(run, chunks) for d in done]


def assign_ids(listing: Listing, max_file_bytes: int = 20_000_000, workers: int = 1) -> None:
    """Give every listed file its image id, order the items by split, batch and id, and refuse a file
    listed twice in one split (a repeated manifest row: ``DUPLICATE_ID``).

    A file's id is ``<split>/[<batch>/]<file name without suffix>-<8 hex digits of the sha256 of its
    bytes>`` (``train/IMG_0001-3fa2b9c1``). It holds neither the class directory nor the label, so a
    relabel (a file moved to another class directory, a label edited in a manifest) keeps the id and the
    row order; the digest keeps ``cat/IMG_0001.jpg`` and ``dog/IMG_0001.jpg`` (what cameras and scrapers
    write), or ``a.png`` beside ``a.jpg``, apart, and, unlike a suffix added only on a clash, leaves
    every id as it was when another file of the same name arrives. Byte-identical files of the same
    name in one split (the same image in two class directories) are both kept, as ``...-<digest>`` and
    ``...-<digest>~2`` in the order of their paths; their rows are identical, so that order cannot change
    ``images.npy``. A file decoding will refuse unread (empty, over ``max_file_bytes``, unreadable) has no
    digest and keeps the bare name. IDX rows keep ``<split>/<row>``.

    Costs one read of every file, on ``workers`` threads; decoding then finds an unchanged file in its
    cache by this digest without reading it again.
    """
    files = [it for it in listing.items if it.path is not None]
    t0 = time.perf_counter()
    for it, digest in zip(files, _digests([it.path for it in files], max_file_bytes, workers), strict=True):
        it.digest = digest
    if files:
        log.info("hashed %d files in %.1f s", len(files), time.perf_counter() - t0)
    listing.items.sort(key=lambda it: (SPLIT_ORDER[it.split], it.batch, it.id, it.digest or "", it.source_path))
    listed: set[tuple[str, str, str]] = set()
    taken: set[str] = set()
    kept = []
    for it in listing.items:
        where = (it.split, it.batch, it.source_path)
        if where in listed:
            listing.refuse(it.source_path, it.split, DUPLICATE_ID,
                           f"the same file is already listed in the {it.split} split")
            continue
        listed.add(where)
        base = f"{it.id}-{it.digest[:8]}" if it.digest else it.id
        it.id, n = base, 1
        while it.id in taken:
            n += 1
            it.id = f"{base}~{n}"
        taken.add(it.id)
        kept.append(it)
    listing.items = sorted(kept, key=lambda it: (SPLIT_ORDER[it.split], it.batch, it.id))


# --- decoding (runs in the worker processes) -------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """How every image is converted; part of the cache key."""

    channels: int
    size: int
    max_file_bytes: int
    max_pixels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    @property
    def tag(self) -> str:
        # Bump the version when decode_one, convert_image or perceptual_hash change what they return.
        return f"v5-c{self.channels}-s{self.size}-p{self.max_pixels}"


def convert_image(im: Image.Image, channels: int, size: int) -> np.ndarray:
    """The one conversion every image gets: first frame, turned upright as its EXIF orientation says (as
    image viewers show it), 16-bit samples scaled to 8 bits, to L or RGB (CMYK by Pillow's (255-C)(255-K)
    formula), bilinear resize to size x size.

    A JPEG ``im`` not loaded yet is decoded at 1/2, 1/4 or 1/8 scale while that stays at least twice
    ``size`` (libjpeg's DCT scaling, as ``Image.thumbnail`` does): a 6000x4000 photo then costs 750x500
    pixels of memory, and its pixels differ from a full decode's by a fraction of a grey level. Pass
    images unloaded, so that every caller gets the same pixels.
    """
    im.seek(0)
    im.draft(None, (2 * size, 2 * size))
    im = ImageOps.exif_transpose(im)
    if im.mode == "I" or im.mode.startswith("I;16"):  # Pillow's own conversion clips these at 255: white
        im = Image.fromarray((np.clip(np.asarray(im), 0, 65535) >> 8).astype(np.uint8))
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8).reshape(size, size, channels)


@functools.lru_cache(maxsize=8)
def _phash_operator(size: int) -> np.ndarray:
    """``A`` (8 x size) such that ``A @ gray @ A.T`` is the 8x8 lowest-frequency block of the orthonormal
    DCT-II of the image resized (Lanczos) to 32x32: the resize and the DCT are both linear, so they fold
    into one small matrix and the hash costs two tiny matrix products."""
    # Pillow resamples float ("F") images linearly; resizing the identity gives the resampling matrix.
    resample = np.asarray(Image.fromarray(np.eye(size, dtype=np.float32), "F")
                          .resize((size, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    k, x = np.arange(8)[:, None], np.arange(32)[None, :]
    dct = np.cos(np.pi * (2 * x + 1) * k / 64) * np.sqrt(2 / 32)
    dct[0] /= np.sqrt(2)
    return dct @ resample


_GRAY = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as Pillow's "L" conversion


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit perceptual hash (pHash as the ``imagehash`` package defines it): the 8x8 lowest
    frequencies of the DCT of a 32x32 grayscale thumbnail, thresholded at their median.

    Computed in floating point (the thumbnail is not rounded to uint8), so a hash can differ from
    imagehash's by a bit or so. On Fashion-MNIST it collides ten times less often than a difference
    hash (dHash) of the same size.
    """
    gray = pixels[..., 0] if pixels.shape[-1] == 1 else pixels @ _GRAY
    low = (_phash_operator(gray.shape[0]) @ gray @ _phash_operator(gray.shape[1]).T).ravel()
    ordered = np.sort(low)
    bits = low > (ordered[31] + ordered[32]) / 2
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


_CACHED: frozenset[str] = frozenset()  # cache keys known to the worker process (set by _init_worker)


def _init_worker(cached_keys: frozenset[str], max_pixels: int) -> None:
    global _CACHED
    _CACHED = cached_keys
    Image.MAX_IMAGE_PIXELS = max_pixels


def _bad(reason: str, detail: str) -> tuple:
    return ("bad", reason, detail)


def _pillow_said(err: Exception) -> str:
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(file content)", f"{type(err).__name__}: {err}")


def read_file(path: str, conv: Conversion) -> tuple:
    """The bytes of the file ``path`` as ``("ok", data)``, or ``("bad", reason, detail)`` (missing,
    unreadable, empty or larger than ``conv.max_file_bytes``: checked before reading, so a FIFO, whose
    size is 0, is never opened: that would wait for a writer forever). Never raises."""
    try:
        nbytes = os.stat(path).st_size
        if nbytes == 0:
            return _bad(EMPTY, "0 bytes")
        if nbytes > conv.max_file_bytes:
            return _bad(TOO_LARGE, f"{nbytes} bytes > max_file_bytes {conv.max_file_bytes}")
        with open(path, "rb") as fh:
            return ("ok", fh.read())
    except FileNotFoundError as err:
        return _bad(MISSING, str(err))
    except OSError as err:
        return _bad(UNREADABLE, f"{type(err).__name__}: {err}")


def decode_bytes(data: bytes, conv: Conversion) -> tuple:
    """Decode the encoded image ``data`` with :func:`convert_image` to ``("ok", pixels, (orig_width,
    orig_height, orig_mode, format))``, or ``("bad", reason, detail)``. Never raises for bad bytes.

    The image is opened twice: ``verify`` checks the whole stream (CRCs, a missing end), ``load`` decodes it.
    What every decoder of sslvision uses (ingest, monitoring, ``sslvision predict``, the served model),
    so an image is converted the same way wherever it comes from.
    """
    if not data:
        return _bad(EMPTY, "0 bytes")
    if len(data) > conv.max_file_bytes:
        return _bad(TOO_LARGE, f"{len(data)} bytes > max_file_bytes {conv.max_file_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > conv.max_pixels:
                    return _bad(TOO_LARGE, f"{width}x{height} pixels > max_pixels {conv.max_pixels}")
                im.verify()
            with Image.open(_io.BytesIO(data)) as im:
                mode, fmt = im.mode, im.format
                pixels = convert_image(im, conv.channels, conv.size)  # loads it, after the JPEG draft
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return _bad(TOO_LARGE, _pillow_said(err))
    except UnidentifiedImageError as err:
        if data.startswith(IMAGE_MAGIC):
            return _bad(TRUNCATED, f"{_pillow_said(err)}; the file starts like an image ({len(data)} bytes)")
        # never the bytes themselves: the reason reaches reports and MLflow (a link could point anywhere)
        return _bad(NOT_IMAGE, f"{_pillow_said(err)}; no image format signature ({len(data)} bytes)")
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        said = _pillow_said(err)
        return _bad(TRUNCATED if "truncat" in said.lower() else UNREADABLE, said)
    return ("ok", pixels, (width, height, mode, fmt))


def _file_key(conv: Conversion, digest: str) -> str:
    """The decode cache key of a file whose bytes have the sha256 ``digest``."""
    return hashlib.sha256(f"{conv.tag}:{digest}".encode()).hexdigest()


def decode_one(path: str | None, raw: bytes | None, shape: tuple | None, conv: Conversion,
               cached: frozenset[str] = frozenset(), digest: str | None = None) -> tuple:
    """Decode one file (:func:`read_file`, :func:`decode_bytes`) or IDX row to ``("ok", key, pixels,
    meta)``, ``("cached", key)`` when its key is in ``cached``, or ``("bad", reason, detail)``. Never
    raises for a bad file.

    ``meta`` is ``(orig_width, orig_height, orig_mode, content_hash, phash)``. ``digest``, the file's
    sha256 when ``assign_ids`` hashed it, finds a cached file without reading it again.
    """
    if raw is None:
        if digest is not None and (key := _file_key(conv, digest)) in cached:
            return ("cached", key)
        read = read_file(path, conv)
        if read[0] == "bad":
            return read
        data = read[1]
        key = _file_key(conv, hashlib.sha256(data).hexdigest())
        if key in cached:
            return ("cached", key)
        decoded = decode_bytes(data, conv)
        if decoded[0] == "bad":
            return decoded
        pixels, (width, height, mode, _) = decoded[1], decoded[2]
    else:
        key = hashlib.sha256(conv.tag.encode() + b"idx" + repr(shape).encode() + raw).hexdigest()
        if key in cached:
            return ("cached", key)
        im = Image.fromarray(np.frombuffer(raw, dtype=np.uint8).reshape(shape))
        mode, (width, height) = im.mode, im.size
        pixels = convert_image(im, conv.channels, conv.size)
    meta = (width, height, mode, hashlib.sha256(pixels.tobytes()).hexdigest(), perceptual_hash(pixels))
    return ("ok", key, pixels, meta)


def _decode_chunk(tasks: list[tuple], conv: Conversion,
                  cached: frozenset[str] | None = None) -> tuple[np.ndarray, list[tuple]]:
    """Decode a chunk; the pixels come back stacked (one array per chunk, cheap to send)."""
    results, stack = [], []
    for path, raw, shape, digest in tasks:
        r = decode_one(path, raw, shape, conv, _CACHED if cached is None else cached, digest)
        if r[0] == "ok":
            stack.append(r[2])
            r = ("ok", r[1], r[3])
        results.append(r)
    pixels = np.stack(stack) if stack else np.zeros((0, *conv.shape), np.uint8)
    return pixels, results


def _ordered_map(chunks: list[list[tuple]], conv: Conversion, workers: int,
                 cached: frozenset[str]) -> Iterator[tuple[np.ndarray, list[tuple]]]:
    """``_decode_chunk`` over ``chunks`` in order, at most 2 chunks per worker in flight (bounded memory)."""
    if workers <= 1:
        for tasks in chunks:
            yield _decode_chunk(tasks, conv, cached)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cached, conv.max_pixels)) as ex:
        it = iter(chunks)
        pending = deque(ex.submit(_decode_chunk, t, conv) for t in islice(it, 2 * workers))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(_decode_chunk, nxt, conv))
            yield result


# --- content-hash cache ----------------------------------------------------------------------------


class DecodeCache:
    """Decoded pixels keyed by sha256(conversion + file bytes), under ``root/<conversion tag>/``.

    ``index.parquet`` maps each key to a row of a ``shard-*.npy`` (one shard per run that decoded
    something new). Anything unreadable (corrupt index, missing or malformed shard, pixels whose hash
    does not match) is ignored: the image is decoded again and the cache rebuilt. Delete the directory
    to reclaim its space; it is not a DVC output.
    """

    COLUMNS: ClassVar[list[str]] = ["key", "shard", "row", "orig_width", "orig_height", "orig_mode", "content_hash",
                                    "phash"]

    def __init__(self, root: Path | None, conv: Conversion):
        self.dir = root / conv.tag if root else None
        self.conv = conv
        self.index = pd.DataFrame(columns=self.COLUMNS)
        self.shards: dict[str, np.ndarray] = {}
        if self.dir and (self.dir / "index.parquet").exists():
            self._load()
        self.lookup = {k: i for i, k in enumerate(self.index["key"])}
        self._shard = self.index["shard"].tolist()
        self._row = self.index["row"].to_numpy(np.int64)
        self._meta = list(zip(self.index["orig_width"].astype(int), self.index["orig_height"].astype(int),
                              self.index["orig_mode"], self.index["content_hash"],
                              (int(h, 16) for h in self.index["phash"]), strict=True))

    def _load(self) -> None:
        try:
            index = pd.read_parquet(self.dir / "index.parquet")
            if list(index.columns) != self.COLUMNS:
                raise ValueError(f"columns {list(index.columns)}")
        except Exception as err:  # noqa: BLE001 - any damage means: start again
            log.warning("%s: ignoring the unreadable decode cache (%s)", self.dir, err)
            return
        good = []
        for name, rows in index.groupby("shard")["row"]:
            try:
                arr = np.load(self.dir / name, mmap_mode="r")
                ok = arr.dtype == np.uint8 and arr.shape[1:] == self.conv.shape and int(rows.max()) < len(arr)
            except Exception as err:  # noqa: BLE001 - a damaged shard is dropped, its images decoded again
                log.warning("%s: ignoring cache shard %s (%s)", self.dir, name, err)
                continue
            if ok:
                self.shards[name] = arr
                good.append(name)
        self.index = index[index["shard"].isin(good)].reset_index(drop=True)

    def keys(self) -> frozenset[str]:
        return frozenset(self.lookup)

    def get(self, key: str) -> tuple[np.ndarray, tuple] | None:
        """Pixels and meta for ``key``, or None when the cached pixels do not match their hash."""
        i = self.lookup[key]
        pixels = np.asarray(self.shards[self._shard[i]][self._row[i]])
        if hashlib.sha256(pixels.tobytes()).hexdigest() != self._meta[i][3]:
            return None
        return pixels, self._meta[i]

    def add(self, new: list[tuple[str, int, tuple]], images: np.ndarray) -> None:
        """Store the freshly decoded rows ``images[row]`` of ``new = [(key, row, meta), ...]``."""
        if not self.dir or not new:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"shard-{uuid.uuid4().hex[:12]}.npy"
            with io.atomic_path(self.dir / name, suffix=".npy") as tmp:
                shard = io.open_npy(tmp, (len(new), *self.conv.shape))
                for start in range(0, len(new), 4096):
                    rows = [row for _, row, _ in new[start:start + 4096]]
                    shard[start:start + len(rows)] = images[rows]
                shard.flush()
                del shard
            added = pd.DataFrame(
                [(key, name, i, m[0], m[1], m[2], m[3], f"{m[4]:016x}") for i, (key, _, m) in enumerate(new)],
                columns=self.COLUMNS)
            index = added if self.index.empty else pd.concat([self.index, added], ignore_index=True)
            io.write_parquet(self.dir / "index.parquet", index.drop_duplicates("key", keep="last"))
        except (OSError, io.OutputError) as err:
            log.warning("%s: could not update the decode cache (%s); the next run decodes again", self.dir, err)


# --- decoding a source -----------------------------------------------------------------------------


def _progress(done: int, total: int, state: dict) -> None:
    step = max(total // 10, 1)
    if done >= state.get("next", 0) or done == total:
        log.info("decoded %d/%d images (%.0f img/s)", done, total, done / max(time.perf_counter() - state["t0"], 1e-9))
        state["next"] = done + step


def decode_all(items: list[Item], conv: Conversion, workers: int, chunk_size: int, out_npy: Path,
               cache: DecodeCache) -> tuple[list[tuple], list[dict], dict]:
    """Decode ``items`` into ``out_npy`` (written atomically); return (kept, refused, stats).

    ``kept`` holds ``(item, meta)`` in array order, ``refused`` the quarantine rows. Rows go straight
    into a memory-mapped array on disk; refused files leave no row.
    """
    n = len(items)
    kept: list[tuple] = []
    refused: list[dict] = []
    new: list[tuple] = []  # (cache key, row, meta) of the images decoded in this run
    hits = 0
    chunks = [items[i:i + chunk_size] for i in range(0, n, chunk_size)]
    state = {"t0": time.perf_counter()}
    partial = io.temp_sibling(out_npy, ".partial.npy")
    try:
        with io.writing(out_npy):
            images = io.open_npy(partial, (max(n, 1), *conv.shape))
        done = 0
        decoded = _ordered_map(map(_tasks, chunks), conv, workers, cache.keys())
        for chunk, (pixels, results) in zip(chunks, decoded, strict=True):
            j = 0
            for item, r in zip(chunk, results, strict=True):
                k = len(kept)
                if r[0] == "cached":
                    got = cache.get(r[1])
                    if got is None:  # a damaged cache entry: decode the file here instead
                        path, raw, shape, _ = _tasks([item])[0]
                        r = decode_one(path, raw, shape, conv)
                        if r[0] == "ok":
                            r = ("ok", r[1], r[3], r[2])
                    else:
                        images[k], meta = got
                        hits += 1
                        kept.append((item, meta))
                        continue
                elif r[0] == "ok":
                    r = (*r, pixels[j])
                    j += 1
                if r[0] == "bad":
                    refused.append({"source_path": item.source_path, "split": item.split, "reason": r[1],
                                    "detail": r[2]})
                    continue
                images[k] = r[3]
                new.append((r[1], k, r[2]))
                kept.append((item, r[2]))
            done += len(chunk)
            _progress(done, n, state)
        seconds = time.perf_counter() - state["t0"]
        k = len(kept)
        if k:
            images.flush()
            cache.add(new, images)
            if k == len(images):
                del images
                with io.writing(out_npy):
                    os.replace(partial, out_npy)
            else:  # some files were refused: copy the kept rows into an array of the final length
                with io.atomic_path(out_npy, suffix=".npy") as tmp:
                    final = io.open_npy(tmp, (k, *conv.shape))
                    for start in range(0, k, 8192):
                        final[start:start + 8192] = images[start:min(start + 8192, k)]
                    final.flush()
                    del final
                del images
    finally:
        partial.unlink(missing_ok=True)
    stats = {"listed": n, "decoded": len(new), "cache_hits": hits, "seconds": round(seconds, 3),
             "images_per_s": round(n / seconds, 1) if seconds > 0 else None}
    return kept, refused, stats


def _tasks(chunk: list[Item]) -> list[tuple]:
    return [(it.path, None if it.pixels is None else it.pixels.tobytes(),
             None if it.pixels is None else it.pixels.shape, it.digest) for it in chunk]


def find_duplicates(manifest: pd.DataFrame, near_bits: int) -> tuple[pd.DataFrame, dict]:
    """Flag exact (same pixels) and near (perceptual hash within ``near_bits``) duplicates.

    Fills ``exact_duplicate_of`` / ``near_duplicate_of`` (id of the group's first image, in array order)
    and returns the duplicate report: one row per member of each group, with whether the group has
    conflicting labels and whether it spans train and test (leakage).
    """
    ids = manifest["id"].to_numpy()
    exact_root = manifest.groupby("content_hash", sort=False)["index"].transform("min").to_numpy()
    near_root = _near_groups(np.array([int(h, 16) for h in manifest["phash"]], dtype=np.uint64), near_bits)
    is_exact_dup = exact_root != np.arange(len(manifest))
    manifest["exact_duplicate_of"] = np.where(is_exact_dup, ids[exact_root], None)
    # A near group only counts when it holds different pixels (otherwise it is just an exact group).
    n_hashes = manifest.groupby(near_root)["content_hash"].transform("nunique").to_numpy()
    is_near = (near_root != np.arange(len(manifest))) & (n_hashes > 1)
    manifest["near_duplicate_of"] = np.where(is_near, ids[near_root], None)

    groups = []
    for kind, root, member in (("exact", exact_root, is_exact_dup), ("near", near_root, is_near)):
        in_group = np.isin(np.arange(len(manifest)), root[member])
        rows = manifest[member | in_group].assign(kind=kind, group=lambda d, r=root: ids[r[d.index]])
        groups.append(rows)
    report = pd.concat(groups, ignore_index=True)
    cols = ["kind", "group", "id", "split", "batch", "label", "label_name", "source_path"]
    if report.empty:
        report = pd.DataFrame(columns=[*cols, "conflicting_labels", "leakage"])
    else:
        report = report[cols]
        by = report.groupby(["kind", "group"])
        report["conflicting_labels"] = by["label"].transform(lambda s: s[s >= 0].nunique() > 1)
        report["leakage"] = by["split"].transform(lambda s: {"train", "test"} <= set(s))
    groups_of = report.drop_duplicates(["kind", "group"])
    leaked = report[report["leakage"] & (report["split"] == "test")].drop_duplicates("id")
    stats = {
        "exact": int(is_exact_dup.sum()),
        "exact_groups": int((groups_of["kind"] == "exact").sum()),
        "near": int((is_near & ~is_exact_dup).sum()),
        "near_groups": int((groups_of["kind"] == "near").sum()),
        "conflicting_label_groups": int(groups_of["conflicting_labels"].sum()),
        "leakage_groups": int(groups_of["leakage"].sum()),
        "leaked_test_images": len(leaked),
    }
    return report.reset_index(drop=True), stats


def _near_groups(hashes: np.ndarray, bits: int) -> np.ndarray:
    """Index of each image's group root (its first member) under Hamming distance <= ``bits``.

    With ``bits`` = 0 the groups are equal hashes. Otherwise, by the pigeonhole principle, two hashes
    within ``bits`` agree exactly on one of ``bits + 1`` bands, so only images sharing a band value are
    compared (multi-index hashing), and close pairs are joined with a union-find.
    """
    n = len(hashes)
    order = pd.Series(np.arange(n))
    if bits == 0 or n == 0:
        return order.groupby(hashes).transform("min").to_numpy()
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    width = -(-64 // (bits + 1))
    for shift in range(0, 64, width):
        mask = np.uint64((1 << min(width, 64 - shift)) - 1)
        values = (hashes >> np.uint64(shift)) & mask
        for members in order.groupby(values).indices.values():
            for a in range(len(members) - 1):
                rest = members[a + 1:]
                xor = (hashes[rest] ^ hashes[members[a]]).view(np.uint8).reshape(-1, 8)
                for b in rest[np.unpackbits(xor, axis=1).sum(1) <= bits]:
                    ra, rb = find(int(members[a])), find(int(b))
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def _class_counts(manifest: pd.DataFrame, classes: list[str], split: str) -> dict[str, int]:
    counts = Counter(manifest.loc[(manifest["split"] == split) & (manifest["label"] >= 0), "label"])
    return {name: int(counts.get(i, 0)) for i, name in enumerate(classes)}


COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}


def data_warnings(class_counts: dict[str, dict[str, int]], orig_modes: dict[str, int], channels: int) -> list[str]:
    """What the ingested data lacks for the stages after ingest, in words: fewer than 2 classes with train
    images (nothing to classify: audit and finetune refuse), a class with a single train or test image
    (audit's cross-validation and pretrain's 2-fold evaluation need 2 per class), colour images made
    grey by ``channels`` 1. Ingest still writes its outputs: a pool batch, a class still being
    collected, may be what completes the data."""
    warnings_ = []
    train = class_counts["train"]
    present = [c for c, n in train.items() if n > 0]
    if len(present) < 2:
        warnings_.append(f"{len(present)} class(es) with train images {_some(present)}: a classifier needs at "
                         "least 2; audit and finetune cannot run (add a class directory, or manifest rows with "
                         "another label)")
    for split, needs in (("train", "audit's cross-validation"), ("test", "pretrain's evaluation")):
        single = [c for c, n in class_counts[split].items() if n == 1]
        if single:
            warnings_.append(f"{len(single)} class(es) with a single {split} image {_some(single)}: "
                             f"{needs} needs at least 2 per class")
    colour = sum(n for m, n in orig_modes.items() if m in COLOUR_MODES)
    if channels == 1 and colour:
        warnings_.append(f"{colour} colour images converted to grey (ingest.channels is 1; 3 keeps colour)")
    return warnings_


def run_ingest(params: IngestParams, source: str | os.PathLike, out: str | os.PathLike,
               pool: str | os.PathLike | None = None) -> dict:
    """Ingest ``source`` (+ the batches under ``pool``) into ``out``; return the metrics.

    Writes, each atomically: images.npy, images.parquet, ssl_pool.parquet, eval_labels.parquet, manifest.parquet,
    classes.json, quarantine.parquet, duplicates.parquet (see ``sslvision.data`` for the columns).
    """
    source, out = Path(source), Path(out)
    listing = list_source(source, params.class_names, params.max_classes, params.manifest_root or None)
    if pool is not None and Path(pool).is_dir():
        list_pool(pool, listing)
    n_listed = len(listing.items) + len(listing.quarantine)
    if n_listed == 0:
        where = (f": the class directories {_some(listing.classes)} are empty"
                 if listing.layout == "imagefolder" and listing.classes else "")
        raise ValueError(f"{source}: empty dataset: no image files found ({listing.layout} layout){where}")
    assign_ids(listing, params.max_file_bytes, params.workers)
    log.info("%s: %d files listed (%s layout, %d classes), %d refused before decoding",
             source, n_listed, listing.layout, len(listing.classes), len(listing.quarantine))

    conv = Conversion(params.channels, params.size, params.max_file_bytes, params.max_pixels)
    cache = DecodeCache(Path(params.cache_dir) if params.cache_dir else None, conv)
    io.make_dir(out)
    kept, refused, decode_stats = decode_all(listing.items, conv, params.workers, params.chunk_size,
                                             out / "images.npy", cache)
    quarantine = pd.DataFrame(listing.quarantine + refused, columns=["source_path", "split", "reason", "detail"])
    if not kept:
        reasons = dict(Counter(quarantine["reason"]))
        examples = "; ".join(f"{r.source_path}: {r.reason}: {_clip(r.detail, 200)}"
                             for r in quarantine.head(3).itertuples())
        raise ValueError(f"{source}: empty dataset: none of the {n_listed} files could be used "
                         f"(quarantined by reason: {reasons}), e.g. {examples}")

    images = pd.DataFrame({
        "index": np.arange(len(kept), dtype=np.int64),
        "id": [it.id for it, _ in kept],
        "split": [it.split for it, _ in kept],
        "batch": [it.batch for it, _ in kept],
        "content_hash": [m[3] for _, m in kept],
        "phash": [f"{m[4]:016x}" for _, m in kept],
        "orig_width": np.array([m[0] for _, m in kept], dtype=np.int32),
        "orig_height": np.array([m[1] for _, m in kept], dtype=np.int32),
        "orig_mode": [m[2] for _, m in kept],
    })
    labels = np.array([it.label for it, _ in kept], dtype=np.int64)
    manifest = images.assign(
        source_path=[it.source_path for it, _ in kept],
        label=labels,
        label_name=[listing.classes[lab] if lab >= 0 else None for lab in labels],
    )
    duplicates, dup_stats = find_duplicates(manifest, params.near_duplicate_bits)
    eval_labels = manifest.loc[manifest["split"] == "test", ["id", "label", "label_name"]]
    # What self-supervised pretraining reads: train, test (its evaluation) and UNLABELED pool batches.
    # Pretrain depends on this fingerprint, not on images.npy, so a labeled batch joining the data (which
    # appends rows to images.npy) re-runs embed/audit and after, but not pretrain.
    ssl_rows = (manifest["split"] != "pool") | (manifest["label"] < 0)
    ssl_pool = images.loc[ssl_rows, ["id", "split", "batch", "content_hash"]]

    io.write_parquet(out / "images.parquet", images)
    io.write_parquet(out / "ssl_pool.parquet", ssl_pool)
    io.write_parquet(out / "eval_labels.parquet", eval_labels)
    io.write_parquet(out / "manifest.parquet", manifest)
    io.write_json(out / "classes.json", {"classes": listing.classes})
    io.write_parquet(out / "quarantine.parquet", quarantine)
    io.write_parquet(out / "duplicates.parquet", duplicates)

    class_counts = {s: _class_counts(manifest, listing.classes, s) for s in ("train", "test")}
    train_counts = class_counts["train"]
    present = [c for c in train_counts.values() if c > 0]
    orig_modes = {str(m): int(n) for m, n in sorted(Counter(manifest["orig_mode"]).items())}
    metrics = {
        "source": str(source),
        "layout": listing.layout,
        "listed": n_listed,
        "images": len(manifest),
        "by_split": {s: int((manifest["split"] == s).sum()) for s in SPLIT_ORDER},
        "pool_batches": int(manifest.loc[manifest["split"] == "pool", "batch"].nunique()),
        "classes": len(listing.classes),
        "class_counts": class_counts,
        "imbalance_ratio": round(max(present) / min(present), 3) if present else None,
        "rare_classes": sum(c < params.min_class_count for c in train_counts.values()),
        "quarantined": len(quarantine),
        "quarantine": {r: int((quarantine["reason"] == r).sum()) for r in REASONS},
        "duplicates": dup_stats,
        "decode": decode_stats,
        "orig_modes": orig_modes,
        "warnings": data_warnings(class_counts, orig_modes, params.channels),
    }
    assert metrics["images"] + metrics["quarantined"] == n_listed, "an image was lost without a trace"
    for warning in metrics["warnings"]:
        log.warning("%s: %s", source, warning)
    log.info("%d images kept, %d quarantined, %d decoded, %d from the cache", len(manifest), len(quarantine),
             decode_stats["decoded"], decode_stats["cache_hits"])
    return metrics
