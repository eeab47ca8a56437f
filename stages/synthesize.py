"""DVC stage ``synthesize`` of this repository's demo project: the stage runner is ``sslvision.stages.synthesize``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.synthesize``)."""

from sslvision.stages.synthesize import main

if __name__ == "__main__":
    main()
