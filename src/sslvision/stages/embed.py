"""DVC stage ``embed``: embeddings of every ingested image with the pretrained encoder.

Reads ``models/encoder/`` and ``data/ingested/images.npy``; writes ``data/embeddings/`` (see
``sslvision.data``). All logic is in ``sslvision.pretrain.embed_ingested``.
"""

import sys

from sslvision.params import load_section, params_path, require_sections
from sslvision.pretrain import PretrainParams, embed_ingested
from sslvision.stages import check_code_version


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
