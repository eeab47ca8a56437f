"""Atomic output helpers.

Every stage output is written to a temporary sibling first and moved into place with ``os.replace``,
so a stage killed at any instant leaves either the old output or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


class OutputError(RuntimeError):
    """An output could not be written (unwritable directory, full disk, ...)."""


def _describe_os_error(path: Path, err: OSError) -> str:
    import errno

    why = {
        errno.ENOSPC: "no space left on the device",
        errno.EACCES: "permission denied",
        errno.EROFS: "read-only file system",
        errno.EDQUOT: "disk quota exceeded",
    }.get(err.errno, err.strerror or str(err))
    return f"cannot write {path}: {why}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``.

    Works for files and for directories (whatever the body creates at the yielded path).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OutputError(_describe_os_error(path, err)) from err
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir() and not path.is_symlink() and tmp_path.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    except OSError as err:
        raise OutputError(_describe_os_error(path, err)) from err
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


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
