"""DVC stage ``finetune``: train the classifier on the SSL encoder (params: ``finetune``), write
``models/classifier/`` and ``reports/finetune/``, log to MLflow, register the model as ``challenger``
and run the gated promotion (``finetune.registry``).

Run from the project root (``dvc repro finetune``), or a full fine-tune (``finetune.mode: finetune``)
on N processes of one machine (rendezvous on loopback, see the README):
``torchrun --nproc_per_node=N --master_addr=127.0.0.1 --master_port=29500 -m sslvision.stages.finetune``. All
logic is in ``sslvision.finetune`` and ``sslvision.registry``.
"""

import sys

from sslvision.finetune import finetune_cli
from sslvision.params import ParamsError, params_path, require_sections
from sslvision.stages import check_code_version


def main() -> None:
    try:
        require_sections("finetune", path=params_path())
        check_code_version()
        m = finetune_cli(params_path())
    except (ParamsError, ValueError, OSError) as err:
        sys.exit(f"finetune: error: {err}")
    if m is None:  # a torchrun worker: rank 0 reports
        sys.exit(0)
    print(f"finetune: test balanced accuracy {m['balanced_accuracy']:.4f}, worst class {m['worst_class']} "
          f"{m['worst_class_recall']:.4f}, ECE {m['ece']:.4f}; promotion: {m['promotion']['decision']}")


if __name__ == "__main__":
    main()
