"""DVC stage ``audit`` of this repository's demo project: the stage runner is ``sslvision.stages.audit``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.audit``)."""

from sslvision.stages.audit import main

if __name__ == "__main__":
    main()
