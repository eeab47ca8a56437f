"""DVC stage ``pretrain``: self-supervised pretraining on the ingested images (never their labels).

Reads ``data/ingested/images.npy``, ``images.parquet`` and ``eval_labels.parquet`` (clean test labels,
for evaluation only, rows chosen by ``ssl_pool.parquet``); writes ``models/encoder/``, ``reports/pretrain/``
(metrics, per-epoch history, dvclive plots) and one MLflow run. Resumes from
``pretrain.checkpoint_dir`` when a checkpoint of the same params is there.

Run from the project root: ``dvc repro pretrain``, or on N processes of one machine (rendezvous on loopback,
see the README) ``torchrun --nproc_per_node=N --master_addr=127.0.0.1 --master_port=29500 -m sslvision.stages.pretrain``.
All logic is in ``sslvision.pretrain``.
"""

import sys

from sslvision.params import params_path, require_sections
from sslvision.pretrain import NonFiniteLossError, pretrain_cli
from sslvision.stages import check_code_version


def main() -> None:
    try:
        require_sections("pretrain", path=params_path())
        check_code_version()
        pretrain_cli(params=params_path())
    except (ValueError, OSError, NonFiniteLossError) as err:
        sys.exit(f"pretrain: error: {err}")


if __name__ == "__main__":
    main()
