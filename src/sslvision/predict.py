"""Predict on image files: what ``sslvision predict`` runs.

Inputs (:func:`list_inputs`): image files, folders (every non-hidden file below them, recursively; linked
folders are not entered) and CSV/Parquet manifests (a ``path`` column, relative paths from the
manifest's folder, as ingest reads them). Each file is converted exactly as ingest converted the
training images: the conversion is the model's own (``config.json``'s ``conversion``, read by
:func:`sslvision.finetune.load_classifier`), never today's ``params.yaml``, and the decoding is ingest's
(:func:`sslvision.ingest.read_file`, :func:`sslvision.ingest.decode_bytes`: EXIF orientation, 16-bit
scaling, size limits).

Output (:func:`predict_files`): one row per file, in input order: ``path``, ``label`` (the predicted class
name), ``confidence`` (its calibrated probability), ``top1``/``top1_prob`` ... ``topK``/``topK_prob``, and
``error``: a file that cannot be read or decoded gets its row with the reason (ingest's quarantine
reasons) and the others are still predicted. Files are read, decoded and predicted ``batch_size`` at a
time, so memory does not grow with the number of files (beyond one row of results each).

Served traffic as a production batch (:class:`InboxBatch`): the files predicted (regular files only: a
symbolic link is read, never copied) are copied, byte for byte as they were read, into one new batch
directory of the monitor's inbox, ``predict-<UTC time>``, written under a hidden name and renamed into
place when complete, so the scheduled monitor never sees half a batch and evaluates what production sent.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".csv", ".parquet"}
NOT_REGULAR = "not a regular file"
# File name suffix for an image whose name has none the monitor reads (batches.IMAGE_SUFFIXES), by Pillow format.
FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
                 "WEBP": ".webp"}


# --- inputs ----------------------------------------------------------------------------------------

def _files_below(folder: Path) -> Iterator[str]:
    """Every non-hidden file below ``folder``, sorted; a linked folder is listed (its row will say it is
    not a file), never entered."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        yield from (os.path.join(root, f) for f in sorted(files + links) if not f.startswith("."))


def _manifest_paths(manifest: Path) -> list[str]:
    """The ``path`` column of a CSV/Parquet manifest, relative paths joined to the manifest's folder; an
    empty cell stays an empty path (its row then says so)."""
    try:
        df = pd.read_parquet(manifest) if manifest.suffix.lower() == ".parquet" else pd.read_csv(manifest, dtype=str)
    except Exception as err:  # noqa: BLE001 - pandas and pyarrow raise many types for a bad file
        raise ValueError(f"{manifest}: not a readable {manifest.suffix[1:]} manifest: "
                         f"{type(err).__name__}: {err}") from None
    if "path" not in df.columns:
        raise ValueError(f"{manifest}: manifest without a 'path' column (columns: {list(df.columns)[:10]})")
    return ["" if pd.isna(p) or not str(p) else os.path.join(manifest.parent, str(p)) for p in df["path"]]


def list_inputs(paths: list[str | os.PathLike]) -> list[str]:
    """The files to predict on, in order: files as given (a missing one too: its row says so), folders
    expanded recursively, manifests (``.csv``/``.parquet`` files) replaced by the files they list."""
    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(_files_below(path))
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            out.extend(_manifest_paths(path))
        else:
            out.append(str(raw))
    return out


# --- the model -------------------------------------------------------------------------------------

def parse_model_uri(uri: str) -> tuple[str, str, str] | None:
    """``models:/NAME@ALIAS`` -> (NAME, "alias", ALIAS), ``models:/NAME/VERSION`` -> (NAME, "version",
    VERSION); None for anything else (a local classifier directory)."""
    if not uri.startswith("models:/"):
        return None
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return (name, "alias", alias) if name and alias else None
    name, _, version = rest.rpartition("/")
    return (name, "version", version) if name and version.isdigit() else None


def load_model(uri: str) -> tuple[Any, dict[str, Any]]:
    """The classifier at ``uri`` and where it came from.

    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: from the MLflow registry (``MLFLOW_TRACKING_URI``,
    else the project's ``mlflow.db``), its files checked against the digests recorded at registration
    (:func:`sslvision.registry.load_registered_classifier`); only its weights and config are read, by this
    installed sslvision. Anything else: a classifier directory (``models/classifier``)."""
    from sslvision import registry, tracking
    from sslvision.finetune import load_classifier

    parsed = parse_model_uri(uri)
    if parsed is None:
        if uri.startswith("models:/"):
            raise ValueError(f"{uri}: not a model URI sslvision reads (models:/NAME@ALIAS or models:/NAME/VERSION)")
        return load_classifier(uri), {"source": "file", "path": str(uri)}
    if not os.environ.get("MLFLOW_TRACKING_URI") and not Path("mlflow.db").exists():
        raise FileNotFoundError(f"mlflow.db: no MLflow store in {Path.cwd()} to read {uri} from: run in the "
                                "project's root or set MLFLOW_TRACKING_URI")
    import mlflow

    tracking.setup()
    name, kind, ref = parsed
    version = registry.alias_version(mlflow.MlflowClient(), name, ref) if kind == "alias" else ref
    if version is None:
        raise registry.RegistryError(f"{uri}: model {name!r} has no {ref!r} version (none promoted yet? "
                                     "sslvision promote, or name a classifier directory with --model)")
    classifier = registry.load_registered_classifier(name, version)
    return classifier, {"source": "registry", "uri": uri, "name": name, "version": version}


# --- the batch for the monitor ---------------------------------------------------------------------

class InboxBatch:
    """The files a prediction saw, as one new production batch in the monitor's ``inbox``.

    Use as a context manager around :func:`predict_files`: files are written into a hidden directory as
    they are predicted, and only a block that ends normally moves it into place as ``predict-<UTC time>``
    (with ``batch.json``: where each file came from, and the model). Nothing is left when the block fails
    or no file was added. ``path`` is the batch written, else None.
    """

    def __init__(self, inbox: str | os.PathLike, model: dict[str, Any] | None = None):
        self.inbox = Path(inbox)
        if not self.inbox.is_dir():
            raise FileNotFoundError(f"{self.inbox}: the monitor inbox does not exist (params.yaml monitor.inbox)")
        self.model = model or {}
        self.files: dict[str, str] = {}
        self.path: Path | None = None

    def __enter__(self) -> InboxBatch:
        from sslvision import io

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._target, n = self.inbox / f"predict-{stamp}", 1
        while self._target.exists():
            n += 1
            self._target = self.inbox / f"predict-{stamp}-{n}"
        self._tmp = io.temp_sibling(self._target)  # hidden: the monitor skips it
        self._tmp.unlink()
        self._tmp.mkdir()
        return self

    def add(self, source: str, data: bytes, image_format: str | None) -> None:
        """Copy the bytes ``data`` read from ``source`` (flat: the monitor reads subfolders as class labels)."""
        from sslvision.batches import IMAGE_SUFFIXES

        name = f"{len(self.files):06d}-{Path(source).name}"
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            name += FORMAT_SUFFIX.get(image_format or "", ".img")
        (self._tmp / name).write_bytes(data)
        self.files[name] = source

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        import shutil

        try:
            if kind is None and self.files:
                (self._tmp / "batch.json").write_text(json.dumps({
                    "name": self._target.name, "source": "sslvision predict", "model": self.model,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": self.files},
                    indent=2) + "\n")
                os.rename(self._tmp, self._target)  # atomic; refuses a target made meanwhile
                self.path = self._target
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


# --- prediction ------------------------------------------------------------------------------------

def _read(path: str, conv: Any) -> tuple:
    """``("ok", data, regular)`` or ``("bad", reason, detail)``: ingest's read, refusing a FIFO or device
    up front (reading one would block or never end); ``regular``: a regular file, not a link to one."""
    from sslvision.ingest import MISSING, UNREADABLE, read_file

    if not path:
        return ("bad", MISSING, "empty path in the manifest")
    try:
        st, lst = os.stat(path), os.lstat(path)
    except FileNotFoundError as err:
        return ("bad", MISSING, str(err))
    except OSError as err:
        return ("bad", UNREADABLE, f"{type(err).__name__}: {err}")
    if not stat.S_ISREG(st.st_mode):
        return ("bad", NOT_REGULAR, "a directory, FIFO or device")
    read = read_file(path, conv)
    return (*read, stat.S_ISREG(lst.st_mode)) if read[0] == "ok" else read


def _rows(paths: list[str], probs: np.ndarray, errors: list[str | None], classes: list[str], top_k: int) -> dict:
    """The output columns of one chunk; ``probs`` rows of failed files are NaN."""
    order = np.argsort(-np.nan_to_num(probs, nan=-1.0), axis=1, kind="stable")[:, :top_k]
    top = np.take_along_axis(probs, order, axis=1)
    ok = [e is None for e in errors]
    names = [[classes[c] if good else None for c in row] for row, good in zip(order.tolist(), ok, strict=True)]

    def text(values: list[str | None]) -> pd.Series:  # None stays None (pandas would make it NaN)
        return pd.Series(values, dtype=object)

    cols: dict[str, Any] = {"path": text(paths), "label": text([n[0] for n in names]), "confidence": top[:, 0]}
    for k in range(top_k):
        cols[f"top{k + 1}"] = text([n[k] for n in names])
        cols[f"top{k + 1}_prob"] = top[:, k]
    cols["error"] = text(errors)
    return cols


def predict_files(paths: list[str], classifier: Any, *, batch_size: int = 64, top_k: int = 3,
                  batch: InboxBatch | None = None, progress: bool = False) -> pd.DataFrame:
    """Predict ``classifier`` (a :class:`~sslvision.finetune.Classifier`) on each file of ``paths`` (as
    :func:`list_inputs` gives them): the frame described in the module docstring, one row per path.

    ``batch_size`` files are decoded and predicted at a time; ``top_k`` (at most the number of classes)
    classes are listed per file; ``batch``: copy every file predicted into that :class:`InboxBatch`;
    ``progress``: show a progress bar on stderr when there is more than one batch of files.
    """
    from sslvision.ingest import decode_bytes

    conv, classes = classifier.conversion, list(classifier.classes)
    top_k = max(1, min(top_k, len(classes)))
    parts = []
    bar = _progress(progress and len(paths) > batch_size)
    with bar:
        task = bar.add_task("predict", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            pixels, errors = [], []
            for path in chunk:
                read = _read(path, conv)
                decoded = decode_bytes(read[1], conv) if read[0] == "ok" else read
                if decoded[0] == "ok":
                    pixels.append(decoded[1])
                    errors.append(None)
                    if batch is not None and read[2]:
                        batch.add(path, read[1], decoded[2][3])
                else:
                    errors.append(f"{decoded[1]}: {decoded[2]}")
            probs = np.full((len(chunk), len(classes)), np.nan)
            ok = [i for i, e in enumerate(errors) if e is None]
            if ok:
                probs[ok] = classifier.predict_proba(np.stack(pixels), batch_size)
            parts.append(pd.DataFrame(_rows(chunk, probs, errors, classes, top_k)))
            bar.advance(task, len(chunk))
    if not parts:
        return pd.DataFrame(_rows([], np.zeros((0, len(classes))), [], classes, top_k))
    return pd.concat(parts, ignore_index=True)


def _progress(show: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not show)
