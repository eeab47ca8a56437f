"""Reading ``params.yaml``: one section per stage, validated with pydantic.

A malformed value stops the stage before any work with a message that names the file, the key and
the problem (``params.yaml: ingest.size: Input should be greater than 0 (got -3)``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PARAMS = "params.yaml"

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
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{p}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_section(name: str, model: type[M], path: str | os.PathLike | None = None,
                 overrides: dict[str, Any] | None = None) -> M:
    """Validate section ``name`` of the params file against ``model``.

    ``overrides`` (already nested, e.g. ``{"size": 32}``) win over the file, for CLI flags and tests.
    """
    p = params_path(path)
    data = read_params(p)
    if name not in data:  # every key has a default, but a misspelt section name must not pass silently
        near = difflib.get_close_matches(name, [str(k) for k in data], n=1, cutoff=0.8)
        if near:
            raise ParamsError(f"{p}: {name}: section missing; is {near[0]!r} a misspelling of it?")
    raw = data.get(name, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{p}: {name}: must be a mapping, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides)
    return validate_section(name, model, raw, source=str(p))


def validate_section(name: str, model: type[M], raw: dict[str, Any], source: str = DEFAULT_PARAMS) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join([name, *(str(x) for x in e["loc"])])
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append(f"{source}: {key}: {e['msg']}{shown}")
        raise ParamsError("\n".join(problems)) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
