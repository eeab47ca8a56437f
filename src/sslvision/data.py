"""The on-disk contract between stages, and readers for it.

``data/ingested/`` (written by ingest, every file written atomically):

- ``images.npy``: uint8 array ``(N, H, W, C)``, opened with ``np.load(..., mmap_mode="r")``; later
  stages never decode image files again.
- ``images.parquet``: one row per image, in array order, with NO label information, so that a label
  change leaves it (and ``images.npy``) byte-identical and DVC does not re-run pretrain. Columns:
  ``index`` (row in images.npy), ``id`` (stable string id, independent of the label), ``split``
  (``train``, ``test`` or ``pool``: unlabeled or labeled production images that joined the SSL pool),
  ``batch`` (pool batch name, "" otherwise), ``content_hash`` (sha256 of the decoded, converted pixels),
  ``phash`` (64-bit perceptual hash as a 16-hex string), ``orig_width``, ``orig_height``, ``orig_mode``.
- ``ssl_pool.parquet``: ``id, split, batch, content_hash`` of the images self-supervised pretraining
  reads (train, test for its evaluation, and unlabeled pool batches; not labeled pool batches). It is
  pretrain's DVC dependency in place of images.npy: a labeled batch joining the data appends rows to
  images.npy, which re-runs the cheap ``embed`` stage and audit onwards, but not pretrain. Pretrain maps
  ids to rows through images.parquet and checks each row's content hash, so this fingerprint covers the
  pixels it trains on.
- ``eval_labels.parquet``: ``id, label, label_name`` for the ``test`` split (the clean evaluation labels).
- ``manifest.parquet``: ``images.parquet`` joined with every label: adds ``source_path`` (relative to the
  source root), ``label`` (int, -1 when unlabeled), ``label_name`` (None when unlabeled), and duplicate
  columns ``exact_duplicate_of`` / ``near_duplicate_of`` (id of the first image of the group or None).
- ``classes.json``: ``{"classes": [name, ...]}`` in label order.
- ``quarantine.parquet``: ``source_path, split, reason, detail`` for every file not taken.

``data/embeddings/`` (written by the ``embed`` stage with the pretrained encoder): ``embeddings.npy``
float32 ``(N, D)`` aligned with ``images.parquet`` (row i is image ``index == i``), and
``embeddings.json`` (encoder config, the ``images.parquet`` content hash it was computed from).

``models/encoder/`` (written by pretrain): safetensors weights + ``config.json``; load with
``sslvision.models.load_encoder(dir)`` (and ``load_decoder`` when the method kept an MAE decoder);
``sslvision.models.embed(encoder, uint8_images, batch_size)`` gives embeddings for new images.

``data/audit/manifest_clean.parquet`` (written by audit): the rows of ``manifest.parquet`` the next
stages train on (dropped rows removed), same columns, ``label``/``label_name`` possibly corrected,
plus ``label_given`` and ``audit_action`` (``keep`` | ``relabel``).

``data/synthetic/`` (written by synthesize): ``images.npy`` uint8 ``(M, H, W, C)`` with the ingest
shape, and ``manifest.parquet``: ``index`` (row in that array), ``id`` (``syn/<generator>/<n>``),
``label``, ``label_name``, ``split`` (= ``synthetic``), ``generator``, ``source_ids`` (list of ingested
ids it was made from), and the filter scores ``target_prob``, ``source_similarity``. Only kept images are
in it.

``models/classifier/`` (written by finetune): the classifier (safetensors + config) that the MLflow
registry also holds; ``sslvision.finetune.load_classifier(dir)`` rebuilds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# The stages' directories: the single definition the command line's defaults and the stage runners use.
# numpy and pandas are imported where they are used, so importing these paths (``sslvision --help``) is instant.
INGESTED = Path("data/ingested")
EMBEDDINGS = Path("data/embeddings")


@dataclass
class Ingested:
    """Ingested images (memory-mapped) with their manifest."""

    images: np.ndarray
    manifest: pd.DataFrame
    classes: list[str]

    @classmethod
    def load(cls, root: str | Path = INGESTED, manifest: str | Path | None = None) -> Ingested:
        import numpy as np
        import pandas as pd

        root = Path(root)
        for name in ("images.npy", "manifest.parquet", "classes.json"):
            if not (root / name).exists():
                raise FileNotFoundError(f"{root / name}: missing; run the ingest stage first (dvc repro ingest)")
        images = np.load(root / "images.npy", mmap_mode="r")
        df = pd.read_parquet(manifest or root / "manifest.parquet")
        classes = json.loads((root / "classes.json").read_text())["classes"]
        if len(df) and int(df["index"].max()) >= len(images):
            raise ValueError(f"{root}: manifest refers to row {int(df['index'].max())} but images.npy has "
                             f"{len(images)}")
        return cls(images=images, manifest=df, classes=classes)

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name]


def load_embeddings(root: str | Path = EMBEDDINGS) -> np.ndarray:
    import numpy as np

    path = Path(root) / "embeddings.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the pretrain stage first (dvc repro pretrain)")
    return np.load(path, mmap_mode="r")
