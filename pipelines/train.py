"""Prefect flow ``train`` of this repository's demo project (``prefect.yaml``: ``pipelines/train.py:train``;
``python pipelines/train.py --from audit``): the flow is ``sslvision.flows.train`` (a project made by
``sslvision init`` names that module as its entrypoint)."""

from sslvision.flows.train import main, train

__all__ = ["train"]

if __name__ == "__main__":
    main()
