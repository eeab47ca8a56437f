"""DVC stage ``ingest`` of this repository's demo project: the stage runner is ``sslvision.stages.ingest``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.ingest``)."""

from sslvision.stages.ingest import main

if __name__ == "__main__":
    main()
