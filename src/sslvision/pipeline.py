"""Running the DVC pipeline stage by stage, as the Prefect flows and the CLI do.

The DAG is DVC's (``dvc.yaml``); nothing here re-declares it. A run holds a project-wide lock so two
runs (two triggers, a schedule and a person) never reproduce at once: the second waits up to
``wait_s`` seconds, then is refused with a clear message. Each stage is reproduced through DVC's
Python API, so DVC still skips what is up to date, and ``from_stage`` forces that stage and everything
downstream of it (``dvc repro --force --downstream STAGE``). A stage that fails raises ``StageFailed``
whose message is the cause in the stage's own words (its last error line), not DVC's "failed to reproduce".
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".sslvision-pipeline.lock"
# stderr is one per process: stages run from two threads (two projects) take turns at capturing it.
_STDERR_TAIL = threading.Lock()


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the project lock."""


class StageFailed(RuntimeError):
    """A stage's command failed; the message names the stage and the cause its script reported."""


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
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


@contextlib.contextmanager
def stderr_to(fd: int) -> Iterator[None]:
    """Point file descriptor 2 at ``fd`` for the block: this process's stderr and that of every process
    it starts (DVC runs a stage's command with the inherited descriptors, capturing nothing)."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def stderr_tail(limit: int = 64 * 1024) -> Iterator[bytearray]:
    """Pass everything written to stderr (this process's and its children's) through as it comes, keeping
    the last ``limit`` bytes: the cause of a failed stage is the last thing its script wrote there."""
    tail = bytearray()
    with _STDERR_TAIL:
        read, write = os.pipe()
        out = os.dup(2)

        def pump() -> None:
            while chunk := os.read(read, 65536):
                os.write(out, chunk)
                tail.extend(chunk)
                del tail[:-limit]

        thread = threading.Thread(target=pump, name="stderr-tail", daemon=True)
        thread.start()
        try:
            with stderr_to(write):
                os.close(write)  # fd 2 is now the pipe's only writer: the pump ends when it is restored
                yield tail
        finally:
            thread.join(timeout=5)  # longer only if a process the stage left behind still holds the pipe
            if not thread.is_alive():
                os.close(read)
                os.close(out)


def stage_error(stage: str, stderr: bytes, exit_message: str) -> str:
    """The cause of a failed stage command from its stderr: the ``STAGE: error: ...`` line the stage
    scripts exit with, else the last line written (a crash's traceback ends with the exception) beside
    DVC's ``exit_message`` (the command and its exit status)."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    prefix = f"{stage}: error: "
    reported = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
    if reported:
        return reported[-1]
    return f"{lines[-1]} ({exit_message})" if lines else exit_message


def reproduce_stage(stage: str, force: bool = False, root: str | os.PathLike = ".") -> bool:
    """Reproduce one stage (not its upstream); return True when DVC actually ran it.

    A failed stage raises ``StageFailed`` with the stage's own error line; DVC's errors that are not a
    stage failure (its lock is busy, say) pass through unchanged, so a caller can retry them."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageCmdFailedError

    python_first_on_path()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # the stages' progress (stdout) shows as it happens
    failure = None
    with Repo(str(root)) as repo, stderr_tail() as tail:
        try:
            ran = repo.reproduce(stage, single_item=True, force=force)
        except ReproductionError as err:
            failure = err
    if failure is None:
        return bool(ran)
    cause = failure.__cause__ or failure
    if isinstance(cause, StageCmdFailedError):  # the command ran: its own words, written by now
        raise StageFailed(f"stage {stage} failed: {stage_error(stage, bytes(tail), str(cause))}") from failure
    raise StageFailed(f"stage {stage} failed: {cause}") from failure  # DVC refused to run it (a missing dep)
