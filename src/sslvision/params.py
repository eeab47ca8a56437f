"""Reading ``params.yaml``: one section per stage, validated with pydantic.

A malformed value stops the stage before any work with a message that names the file, the key and
the problem (``params.yaml: ingest.size: Input should be greater than 0 (got -3)``).

A small file must not cost much to read: YAML aliases may expand to at most ``MAX_YAML_VALUES`` values
(a "billion laughs" file of nested anchors is refused before it is expanded), values echoed in an
error are shortened, and every size-like key has an upper bound far above real use.
"""

from __future__ import annotations

import difflib
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

DEFAULT_PARAMS = "params.yaml"
# Values a params file may hold once its aliases are expanded: the shipped file holds a few hundred.
MAX_YAML_VALUES = 100_000
# Longest echo of a bad value in an error message, and most problems listed in one.
MAX_SHOWN_CHARS = 200
MAX_PROBLEMS = 20

# A random seed: numpy's generators take 0 <= seed < 2**32.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def _not_test(splits: Any) -> Any:
    if isinstance(splits, list) and "test" in splits:
        raise ValueError("test is the held-out golden split every model is scored on; learning from its labels "
                         "(or changing them) leaks the answers into the score: use train and/or pool")
    return splits


# Splits whose labels a stage learns from or changes: never ``test``, said before the type check so the
# message names the leak rather than listing the allowed values.
TrainingSplits = Annotated[list[Literal["train", "pool"]], BeforeValidator(_not_test)]

M = TypeVar("M", bound=BaseModel)


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds an invalid value."""


class Section(BaseModel):
    """Base of every stage's params: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def params_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("SSLVISION_PARAMS", DEFAULT_PARAMS))


def read_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole params file as a dict."""
    p = params_path(path)
    if not p.exists():
        raise ParamsError(f"{p}: file not found (run from the project root or set SSLVISION_PARAMS)")
    data = load_yaml(p.read_text(), p) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_yaml(text: str, source: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of ``text``, refusing aliases that expand to more than ``MAX_YAML_VALUES`` values.

    Aliases share one object, so loading is cheap, but everything after it (validation, an error
    message echoing the value) walks the expanded tree: 35 KB of nested anchors would need gigabytes.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, {}, set()) > MAX_YAML_VALUES:
            raise ParamsError(f"{source}: YAML aliases (*name) expand to more than {MAX_YAML_VALUES} values; "
                              "write the values out instead")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ParamsError(f"{source}: not valid YAML: {err}") from err
    except RecursionError:
        raise ParamsError(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_values(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` holds with every alias expanded (capped just past ``MAX_YAML_VALUES``)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:  # an alias inside the value it names: endless
        return MAX_YAML_VALUES + 1
    open_.add(id(node))
    children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total = min(total + _expanded_values(child, sizes, open_), MAX_YAML_VALUES + 1)
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def load_section(name: str, model: type[M], path: str | os.PathLike | None = None,
                 overrides: dict[str, Any] | None = None) -> M:
    """Validate section ``name`` of the params file against ``model``.

    ``overrides`` (already nested, e.g. ``{"size": 32}``) win over the file, for CLI flags and tests.
    A missing section means all defaults here; the DVC stages refuse it first (:func:`require_sections`).
    """
    p = params_path(path)
    data = read_params(p)
    _check_present(name, data, p, required=False)
    raw = data.get(name, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{p}: {name}: must be a mapping, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides)
    return validate_section(name, model, raw, source=str(p))


def require_sections(*names: str, path: str | os.PathLike | None = None) -> None:
    """Refuse a params file that lacks any of ``names``: a DVC stage runs on its section of params.yaml
    (dvc.yaml lists it), so a missing one is a mistake, not a wish for the defaults."""
    p = params_path(path)
    data = read_params(p)
    for name in names:
        _check_present(name, data, p, required=True)


def _check_present(name: str, data: dict[str, Any], p: Path, required: bool) -> None:
    if name in data:
        return
    # Every key has a default, but a misspelt section name must not pass silently.
    near = difflib.get_close_matches(name, [str(k) for k in data], n=1, cutoff=0.8)
    if near:
        raise ParamsError(f"{p}: {name}: section missing; is {near[0]!r} a misspelling of it?")
    if required:
        raise ParamsError(f"{p}: {name}: section missing; the stage reads its settings from it "
                          f"(write `{name}: {{}}` to run on the defaults)")


def validate_section(name: str, model: type[M], raw: dict[str, Any], source: str = DEFAULT_PARAMS) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join([name, *(str(x) for x in e["loc"])])
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_shorten(got)})"
            problems.append(f"{source}: {key}: {e['msg']}{shown}")
        if len(problems) > MAX_PROBLEMS:
            problems[MAX_PROBLEMS:] = [f"{source}: {name}: ... and {len(problems) - MAX_PROBLEMS} more problems"]
        raise ParamsError("\n".join(problems)) from None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 10, 80, 80


def _shorten(value: Any) -> str:
    """``repr(value)``, cut to ``MAX_SHOWN_CHARS``: an error message must not repeat a whole input."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 3] + "..."


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
