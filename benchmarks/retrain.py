"""What the degradation trigger saves: wall time of a partial re-run (from the stage that owns the
failed metric) against the full pipeline, same project, same machine, same run.

In a fresh project under ``--work`` (a clone of this repository's tracked files plus the demo scenario,
its own DVC cache and MLflow store), the Prefect ``train`` flow runs the whole pipeline once (``full``),
then, for each stage of ``--starts``, forces that stage and everything downstream of it, as the trigger
does (``train(from_stage=STAGE)`` = ``dvc repro --force --downstream STAGE``). Each row is the flow's
wall time including DVC's status checks and every stage's process start-up. A forced run recomputes
the same outputs (the stages are deterministic for their seeds), so every partial run starts from the
same state as the trigger's would.

    nice -n 10 .venv/bin/python benchmarks/retrain.py                      # ~20 min on 2 CPU cores
    .venv/bin/python benchmarks/retrain.py --starts finetune --work /tmp/rt  # reuse a built project
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _common import report  # noqa: E402

# which production event the trigger answers by re-running from each stage (DESIGN.md, README)
EVENT = {
    "pretrain": "drifted images join the pool",
    "audit": "a noisier labeled batch",
    "synthesize": "a rare class's recall falls",
    "finetune": "accuracy falls otherwise",
}


def build_project(work: Path) -> None:
    """A clone of the tracked files, DVC initialised by the clone, the demo scenario made once."""
    if not (work / "dvc.yaml").exists():
        work.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if not (work / "data" / "demo" / "scenario.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "sslvision"), "demo-data", "--out", "data/demo"],
                       cwd=work, env=env, check=True)
    (work / "data" / "pool").mkdir(parents=True, exist_ok=True)


def timed_train(work: Path, from_stage: str | None) -> tuple[float, list[str]]:
    from sslvision.flows.train import train

    t0 = time.perf_counter()
    ran = train(from_stage=from_stage, root=str(work))
    return time.perf_counter() - t0, [s for s, r in ran.items() if r]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="project directory (default: a temp dir, removed)")
    ap.add_argument("--starts", nargs="+", default=["finetune", "synthesize", "audit"], choices=list(EVENT),
                    help="stages to force from (pretrain is almost the full run; add it to measure it)")
    args = ap.parse_args(argv)

    tmp = None
    if args.work is None:
        tmp = Path(tempfile.mkdtemp(prefix="sslvision-retrain-"))
        args.work = tmp / "project"
    work = args.work.resolve()
    try:
        build_project(work)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # the project's own SQLite store
        rows = []
        full_s, ran = timed_train(work, "ingest")
        print(f"full pipeline: {full_s:.0f} s ({', '.join(ran)})", flush=True)
        rows.append({"system": "sslvision trigger", "metric": "wall time", "value": round(full_s, 1), "unit": "s",
                     "setting": "full pipeline (every stage forced)", "stages": ran})
        for start in args.starts:
            seconds, ran = timed_train(work, start)
            print(f"from {start}: {seconds:.0f} s ({', '.join(ran)})", flush=True)
            rows.append({"system": "sslvision trigger", "metric": "wall time", "value": round(seconds, 1),
                         "unit": "s", "setting": f"from {start} ({EVENT[start]})", "stages": ran})
            rows.append({"system": "sslvision trigger", "metric": "saved vs full", "value":
                         round(100 * (1 - seconds / full_s), 1), "unit": "%", "setting": f"from {start}"})
        report("retrain", rows)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
