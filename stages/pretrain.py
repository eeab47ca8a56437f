"""DVC stage ``pretrain`` of this repository's demo project: the stage runner is ``sslvision.stages.pretrain``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.pretrain``)."""

from sslvision.stages.pretrain import main

if __name__ == "__main__":
    main()
