"""DVC stage ``embed``: embeddings of every ingested image with the pretrained encoder.

Reads ``models/encoder/`` and ``data/ingested/images.npy``; writes ``data/embeddings/`` (see
``sslvision.data``). Separate from pretraining so that images joining without re-training (a labeled
batch) get embeddings from a forward pass, not a new pretrain.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sslvision.data import EMBEDDINGS, INGESTED
from sslvision.io import output_dir
from sslvision.models import embed, load_encoder
from sslvision.params import load_section, params_path, require_sections
from sslvision.pretrain import PretrainParams, resolve_device
from sslvision.stages import check_code_version

ENCODER = Path("models/encoder")  # the pretrain stage's output


def embed_ingested(encoder_dir: str | Path = ENCODER, ingested: str | Path = INGESTED,
                   embeddings_dir: str | Path = EMBEDDINGS, batch_size: int = 512,
                   device: str = "cpu") -> dict[str, Any]:
    """Embeddings of EVERY ingested image with the saved encoder, written atomically to ``embeddings_dir``.

    Returns:
        What ``embeddings.json`` records: the encoder config, ``dim``, ``rows``, the ``images.parquet``
        hash the embeddings belong to, and ``embed_img_s``.
    """
    encoder = load_encoder(encoder_dir)
    images = np.load(Path(ingested) / "images.npy", mmap_mode="r")
    t0 = time.perf_counter()
    features = embed(encoder, images, batch_size, resolve_device(device), progress=True)
    seconds = time.perf_counter() - t0
    images_hash = hashlib.sha256((Path(ingested) / "images.parquet").read_bytes()).hexdigest()
    info = {"encoder": vars(encoder.config), "dim": int(features.shape[1]), "rows": int(features.shape[0]),
            "images_parquet_sha256": images_hash, "embed_img_s": len(images) / seconds if seconds else 0.0}
    with output_dir(embeddings_dir, "embeddings") as tmp:
        np.save(tmp / "embeddings.npy", features)
        (tmp / "embeddings.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    try:
        require_sections("pretrain", path=params_path())
        check_code_version()
        p = load_section("pretrain", PretrainParams, params_path())
        info = embed_ingested(batch_size=p.embed_batch_size, device=p.device)
    except (ValueError, OSError) as err:
        sys.exit(f"embed: error: {err}")
    print(f"embed: {info['rows']} images -> {info['dim']}-d embeddings ({info['embed_img_s']:.0f} img/s)")


if __name__ == "__main__":
    main()
