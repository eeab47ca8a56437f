"""Atomic output helpers.

Every stage output is written to a temporary sibling first and moved into place with ``os.replace``,
so a stage killed at any instant leaves either the old output or the new one, never half a file.
Temporary siblings are hidden and named after the host and process that writes them
(``.NAME.HOST-PID.XXXXXXXX.tmp``); the next write of the same output removes those of dead processes,
so a killed stage leaves no garbage behind once it is re-run.

A directory output (:func:`output_dir`) carries a marker file, ``.sslvision-output``, naming its kind; an
existing directory is replaced only when it is empty or an earlier output of the same kind, so pointing
``--out`` at a directory of one's own files is an error, never a deletion.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # pandas costs ~60 MiB per process: the pretrain workers never need it
    import pandas as pd


class OutputError(OSError):
    """An output could not be written (unwritable directory, full disk, ...); the message names the path.

    An ``OSError``, so every ``except OSError`` of the CLI and the stage scripts reports it in one line.
    """


def _describe_os_error(path: Path, err: OSError) -> str:
    why = {
        errno.ENOSPC: "no space left on the device",
        errno.EACCES: "permission denied",
        errno.EROFS: "read-only file system",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large (the file size limit, ulimit -f, was reached)",
        errno.ENOTDIR: "a parent of it is a file, not a directory",
        errno.EEXIST: "it or a parent of it is a file, where a directory is needed",
    }.get(err.errno, err.strerror or str(err))
    return f"cannot write {path}: {why}"


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Report an ``OSError`` of the body (which writes ``path``) as an ``OutputError`` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(_describe_os_error(Path(path), err)) from err


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; an ``OutputError`` naming ``path`` when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(_describe_os_error(path, err)) from err
    return path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temp_sibling(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create an empty, hidden, unique file next to ``path`` and return its name; first remove the
    temporary siblings of ``path`` that dead processes of this host left (a stage killed mid-write)."""
    path = Path(path)
    tag = f"{socket.gethostname()}-"
    mine = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(tag)}(\d+)\.")
    make_dir(path.parent)
    try:
        for old in path.parent.glob(f".{glob.escape(path.name)}.*"):
            m = mine.match(old.name)
            if m and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{tag}{os.getpid()}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(_describe_os_error(path, err)) from err
    return Path(tmp)


def open_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any = "uint8") -> Any:
    """A writable memory-mapped ``.npy`` at ``path`` whose disk blocks are reserved up front.

    Writing through a memory map to a full disk kills the process with SIGBUS (no exception, no
    message); reserving the blocks first turns that into an ``OSError`` (ENOSPC) before any work.
    """
    import numpy as np

    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate") and array.nbytes:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate on this file system
                del array
                raise
        finally:
            os.close(fd)
    return array


OUTPUT_MARKER = ".sslvision-output"
# What directory outputs written before the marker existed hold (the first name always): such a
# directory (from ``dvc repro`` or ``make demo`` of an earlier version) is still an output of its kind.
_UNMARKED_OUTPUTS = {
    "classifier": ("classifier.safetensors", "config.json"),
    "encoder": ("encoder.safetensors", "decoder.safetensors", "config.json"),
    "embeddings": ("embeddings.npy", "embeddings.json"),
    "synthetic": ("images.npy", "manifest.parquet"),
    "demo-data": ("scenario.json", "images", "incoming", "truth.parquet"),
}


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of sslvision output directory ``path`` is (from its marker), or None."""
    path = Path(path)
    try:
        kind = (path / OUTPUT_MARKER).read_text().strip()
    except OSError:
        kind = ""
    if not kind:
        names = _UNMARKED_OUTPUTS.items()
        with contextlib.suppress(OSError):
            entries = set(os.listdir(path))
            kind = next((k for k, known in names if known[0] in entries and entries <= set(known)), "")
    return kind or None


def check_replaceable(path: str | os.PathLike, kind: str | None) -> None:
    """Raise an ``OutputError`` naming ``path`` when it is a directory that writing an output of ``kind``
    there would destroy: anything but an empty directory or an earlier output of the same kind."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return
    try:
        empty = not any(os.scandir(path))
    except OSError as err:
        raise OutputError(_describe_os_error(path, err)) from err
    found = None if empty else output_kind(path)
    if empty or (kind is not None and found == kind):
        return
    what = f"an earlier {found} output" if found else f"not an sslvision output (no {OUTPUT_MARKER} file)"
    raise OutputError(f"{path}: refusing to replace this non-empty directory with {kind or 'a new'} output: "
                      f"it is {what}; move its files away or choose another directory")


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield a new empty directory next to ``path``; on success mark it as an output of ``kind`` and move
    it over ``path``. Refused up front (before any work) when ``path`` holds something else
    (:func:`check_replaceable`)."""
    check_replaceable(path, kind)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        yield tmp
        with writing(tmp):
            (tmp / OUTPUT_MARKER).write_text(kind + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``.

    Works for files and for directories (whatever the body creates at the yielded path). A directory
    replaces an existing non-empty one only when both are outputs of the same kind (see :func:`output_dir`).
    """
    path = Path(path)
    tmp_path = temp_sibling(path, suffix or ".tmp")
    tmp_path.unlink()  # the body creates a file or a directory there
    try:
        yield tmp_path
        if path.is_dir() and not path.is_symlink() and tmp_path.is_dir():
            check_replaceable(path, output_kind(tmp_path))
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(_describe_os_error(path, err)) from err
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def open_regular_file(path: str | os.PathLike) -> BinaryIO | None:
    """``path`` opened for reading when it is a regular file, never following a symbolic link; None for a
    link, a directory, a FIFO or device, or a file that cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: opening a FIFO must not hang
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a regular file's bytes (see :func:`open_regular_file`); None for anything else."""
    fh = open_regular_file(path)
    if fh is None:
        return None
    digest = hashlib.sha256()
    with fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
