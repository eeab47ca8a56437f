"""DVC stage ``finetune`` of this repository's demo project: the stage runner is ``sslvision.stages.finetune``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.finetune``)."""

from sslvision.stages.finetune import main

if __name__ == "__main__":
    main()
