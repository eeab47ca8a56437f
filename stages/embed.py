"""DVC stage ``embed`` of this repository's demo project: the stage runner is ``sslvision.stages.embed``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.embed``)."""

from sslvision.stages.embed import main

if __name__ == "__main__":
    main()
