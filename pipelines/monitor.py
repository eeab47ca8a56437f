"""Prefect flow ``monitor`` of this repository's demo project (``prefect.yaml``: ``pipelines/monitor.py:monitor``;
``python pipelines/monitor.py BATCH``): the flow is ``sslvision.flows.monitor`` (a project made by
``sslvision init`` names that module as its entrypoint)."""

from sslvision.flows.monitor import main, monitor

__all__ = ["monitor"]

if __name__ == "__main__":
    main()
