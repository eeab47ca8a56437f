"""Parameter profiles: named sets of ``params.yaml`` overrides (``profiles/gpu.yaml``), validated against
every stage's params and turned into DVC's ``--set-param`` flags, so a profile runs as a DVC experiment:

    dvc exp run $(sslvision profile profiles/gpu.yaml)

A profile is a flat YAML mapping of dotted keys (``pretrain.epochs: 200``) to values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sslvision.params import (
    SECTIONS,
    ParamsError,
    _merge,
    load_yaml,
    params_path,
    read_params,
    section_class,
    validate_section,
)


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_profile(path: str | os.PathLike, params: str | os.PathLike | None = None) -> dict[str, Any]:
    """The profile's overrides, after checking that params.yaml with them applied is valid for every stage."""
    path = Path(path)
    try:
        overrides = load_yaml(path.read_text(), path) or {}
    except OSError as err:
        raise ParamsError(f"{path}: cannot read the profile: {err.strerror or err}") from err
    if not isinstance(overrides, dict):
        raise ParamsError(f"{path}: a profile is a mapping of section.key: value, got {type(overrides).__name__}")
    base = read_params(params)
    merged = {name: dict(base.get(name) or {}) for name in SECTIONS}
    for key, value in overrides.items():
        section = str(key).split(".", 1)[0]
        if section not in SECTIONS or "." not in str(key):
            raise ParamsError(f"{path}: {key}: not a section.key of params.yaml (sections: {', '.join(SECTIONS)})")
        merged[section] = _merge(merged[section], _nest(str(key).split(".", 1)[1], value))
    for section, raw in merged.items():
        validate_section(section, section_class(section), raw, source=f"{path} over {params_path(params)}")
    return overrides


def _hydra(value: Any) -> str:
    """A value in Hydra's override grammar (what ``dvc exp run -S key=value`` parses)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # quoted: a string stays a string ("1e-3", "true", paths)


def dvc_set_params(overrides: dict[str, Any]) -> list[str]:
    """``dvc exp run`` flags: ``-S key=value`` per override."""
    return [arg for k, v in overrides.items() for arg in ("-S", f"{k}={_hydra(v)}")]
