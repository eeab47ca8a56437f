"""Running the DVC pipeline stage by stage, as the Prefect flows and the CLI do.

The DAG is DVC's (``dvc.yaml``); nothing here re-declares it. A run holds a project-wide lock so two
runs (two triggers, a schedule and a person) never reproduce at once: the second waits up to
``wait_s`` seconds, then is refused with a clear message. Each stage is reproduced through DVC's
Python API, so DVC still skips what is up to date, and ``from_stage`` forces that stage and everything
downstream of it (``dvc repro --force --downstream STAGE``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".sslvision-pipeline.lock"


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the project lock."""


def stage_order(root: str | os.PathLike = ".") -> list[str]:
    """Stage names of ``dvc.yaml`` in dependency order (DVC's own graph, ties broken by file order)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = [s for s in graph.nodes if hasattr(s, "cmd") and s.cmd]
        file_order = {s.name: i for i, s in enumerate(repo.index.stages)}
        # DVC's edges point from a stage to the stages it depends on.
        sub = graph.subgraph(stages).reverse(copy=True)
        order = nx.lexicographical_topological_sort(sub, key=lambda s: f"{file_order.get(s.name, 0):05d}")
        return [s.name for s in order]


def downstream_of(stage: str, root: str | os.PathLike = ".") -> list[str]:
    """``stage`` and every stage after it that depends on it, in run order."""
    import networkx as nx
    from dvc.repo import Repo

    order = stage_order(root)
    if stage not in order:
        raise ValueError(f"dvc.yaml has no stage {stage!r}; stages: {', '.join(order)}")
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        by_name = {s.name: s for s in graph.nodes if hasattr(s, "cmd")}
        affected = {s.name for s in nx.ancestors(graph, by_name[stage])} | {stage}
    return [s for s in order if s in affected]


@contextlib.contextmanager
def pipeline_lock(root: str | os.PathLike = ".", wait_s: float = 0) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(root) / LOCK_NAME))
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise PipelineBusy(
            f"another sslvision pipeline run holds {Path(root) / LOCK_NAME}; waited {wait_s:.0f}s "
            "(it is refused rather than run concurrently; retry when the other run ends)") from None
    try:
        yield
    finally:
        lock.release()


def python_first_on_path() -> None:
    """Stage commands in dvc.yaml call ``python``: make it this interpreter (the project's venv)."""
    import sys

    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def reproduce_stage(stage: str, force: bool = False, root: str | os.PathLike = ".") -> bool:
    """Reproduce one stage (not its upstream); return True when DVC actually ran it."""
    from dvc.repo import Repo

    python_first_on_path()
    with Repo(str(root)) as repo:
        ran = repo.reproduce(stage, single_item=True, force=force)
    return bool(ran)
