"""Every DVC stage depends on all the library code it runs, so changing that code makes the stage out of date.

A stage's code is what its script imports, followed transitively through ``sslvision``, including the
imports inside function bodies (most of the library imports its siblings where it uses them, so
importing the script alone would miss them). Read from the source with ``ast``, nothing is executed:
a new import anywhere in the library shows up here without editing this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` when it is part of ``sslvision``; None for anything else."""
    if name.split(".")[0] != "sslvision":
        return None
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package(path: Path) -> str:
    """The package a relative import in ``path`` starts from (stage scripts are in none)."""
    if not path.is_relative_to(SRC):
        return ""
    return ".".join(path.relative_to(SRC).parent.parts)


def _imported_names(path: Path) -> set[str]:
    """Every module an import statement anywhere in ``path`` loads: its parent packages (whose
    ``__init__`` runs first) and, for ``from package import name``, the submodule ``name`` if it is one."""
    package = _package(path)
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # ``if TYPE_CHECKING:`` imports never run: drop them before walking
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from .x import y`` inside sslvision
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    parents = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    return names | parents


def library_code(script: Path) -> set[Path]:
    """The ``sslvision`` source files that running ``script`` may import, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in _imported_names(todo.pop()):
            path = _module_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def _scripts(cmd: str) -> list[Path]:
    return [REPO / word for word in cmd.split() if word.endswith(".py")]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_depends_on_all_library_code_it_imports(stage):
    spec = STAGES[stage]
    scripts = _scripts(spec["cmd"])
    assert scripts, f"stage {stage}: no Python script in its cmd {spec['cmd']!r}"
    needed = {str(p.relative_to(REPO)) for s in scripts for p in {s} | library_code(s)}
    missing = sorted(needed - set(spec["deps"]))
    assert not missing, f"dvc.yaml: stage {stage} runs code it does not depend on; add to its deps: {missing}"


def test_import_walk_sees_imports_inside_functions():
    """pretrain's stage runner imports tracking only inside pretrain_cli (mlflow logging); it counts too."""
    code = {p.name for p in library_code(REPO / "stages/pretrain.py")}
    assert {"params.py", "pretrain.py", "models.py", "io.py", "tracking.py", "__init__.py"} <= code
    assert "report.py" not in code and "cli.py" not in code
