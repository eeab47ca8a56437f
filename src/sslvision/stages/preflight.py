"""Before a pipeline run: the paths its stages read that do not exist, named by their params key.

DVC checks a stage's dependencies only when it reaches that stage, so a missing production batch
(``drift_eval.batch``) would be reported after pretraining. The train flow (``sslvision run``) refuses
to start on these; the ``ingest`` stage, first under a plain ``dvc repro``, warns about them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

# A dependency written as one params reference: ``${ingest.source}``.
_PARAM_REF = re.compile(r"^\$\{\s*([\w.-]+)\s*\}$")


def missing_inputs(root: str | os.PathLike = ".") -> list[str]:
    """One message per dependency in ``root/dvc.yaml`` that no stage writes and that does not exist, e.g.
    ``params.yaml: drift_eval.batch: data/incoming/b1 does not exist (stage drift_eval reads it)``; a
    dependency written literally is named by its stage. Empty when all exist."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root)
    written = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    problems = []
    with Repo(str(root)) as repo:
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        made = [Path(o.fs_path) for s in stages for o in s.outs]
        for stage in stages:
            raw = (written.get(stage.name) or {}).get("deps") or []
            deps = [d for d in stage.deps if not isinstance(d, ParamsDependency)]
            for i, dep in enumerate(deps):
                path = Path(dep.fs_path)
                if dep.exists or any(path == out or path.is_relative_to(out) for out in made):
                    continue
                ref = _PARAM_REF.match(str(raw[i])) if i < len(raw) and len(raw) == len(deps) else None
                where = f"params.yaml: {ref.group(1)}: " if ref else f"dvc.yaml: stage {stage.name}: "
                problems.append(f"{where}{dep.def_path} does not exist (stage {stage.name} reads it)")
    return problems


class MissingInputs(ValueError):
    """Paths the pipeline reads do not exist; the message lists each with its params key."""


def check_inputs(root: str | os.PathLike = ".") -> None:
    """Raise :class:`MissingInputs` naming every missing input of :func:`missing_inputs`."""
    problems = missing_inputs(root)
    if problems:
        raise MissingInputs("the pipeline reads paths that do not exist (nothing ran):\n  " + "\n  ".join(problems))
