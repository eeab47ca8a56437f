"""DVC stage ``drift_eval`` of this repository's demo project: the stage runner is ``sslvision.stages.drift_eval``
(a project made by ``sslvision init`` runs the same code as ``python -m sslvision.stages.drift_eval``)."""

from sslvision.stages.drift_eval import main

if __name__ == "__main__":
    main()
