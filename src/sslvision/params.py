"""Reading ``params.yaml``: one section per stage, validated with pydantic; and writing it.

Every key's default and its help live once, in its section's settings class (a :class:`Section`:
``Field(default, description=...)``); :func:`render_params` writes ``params.yaml`` from them, each key
commented with its description (the repository's demo project and ``sslvision init``'s projects alike).

A malformed value stops the stage before any work with a message that names the file, the key and
the problem (``params.yaml: ingest.size: Input should be greater than 0 (got -3)``).

A small file must not cost much to read: YAML aliases may expand to at most ``MAX_YAML_VALUES`` values
(a "billion laughs" file of nested anchors is refused before it is expanded), values echoed in an
error are shortened, and every size-like key has an upper bound far above real use.
"""

from __future__ import annotations

import difflib
import importlib
import os
import reprlib
import textwrap
from collections.abc import Iterable, Mapping, Sequence
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

# params.yaml's sections in file order (pipeline order): name -> "module:class" of its settings. Imported by
# name when used: every one of those modules imports this one.
SECTIONS: dict[str, str] = {
    "demo": "sslvision.demo:DemoParams",
    "ingest": "sslvision.ingest:IngestParams",
    "pretrain": "sslvision.pretrain:PretrainParams",
    "audit": "sslvision.audit:AuditParams",
    "synthesize": "sslvision.synthesize:SynthesizeParams",
    "finetune": "sslvision.finetune:FinetuneParams",
    "drift_eval": "sslvision.drift:DriftParams",
    "monitor": "sslvision.flows.monitor:MonitorParams",
}
# Layout of a rendered params.yaml: comments start at this column and lines end by this width.
COMMENT_COLUMN = 28
WIDTH = 120

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


# --- writing params.yaml -----------------------------------------------------------------------------


def section_class(name: str) -> type[Section]:
    """The settings class of params.yaml section ``name`` (a key of :data:`SECTIONS`); KeyError otherwise."""
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def section_defaults(name: str) -> dict[str, Any]:
    """Section ``name``'s defaults as params.yaml holds them (params.yaml key names, JSON types)."""
    return section_class(name)().model_dump(mode="json", by_alias=True)


def comment(text: str, indent: str = "") -> list[str]:
    """``text`` as ``# `` comment lines at ``indent``, wrapped at :data:`WIDTH`."""
    return textwrap.wrap(text, WIDTH, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                         break_long_words=False, break_on_hyphens=False)


def render_params(sections: Iterable[str] = tuple(SECTIONS), *, values: Mapping[str, Mapping[str, Any]] | None = None,
                  notes: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                  header: Sequence[str] = ()) -> str:
    """The text of a params.yaml: ``header`` (lines as they are), then each of ``sections`` (names in
    :data:`SECTIONS`) after a comment that is its settings class's docstring, each key in field order with
    its value and, as its comment, its field's description (wrapped at :data:`WIDTH`).

    Args:
        values: per section, the keys whose value differs from the field's default (params.yaml names;
            a nested section's keys as a nested mapping); every other key gets its default.
        notes: per section, comment lines written above a key (``"key"``, or ``"key.subkey"`` in a nested
            section): why a value departs from the default.

    Raises:
        ParamsError: a value that its section refuses (the message names the key).
        KeyError: a section name not in :data:`SECTIONS`.
    """
    values, notes = values or {}, notes or {}
    lines = list(header)
    for name in sections:
        cls = section_class(name)
        data = cls().model_dump(mode="json", by_alias=True)
        data = _override(cls, data, dict(values.get(name) or {}))
        validate_section(name, cls, data, source="render_params")
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`")
        where = f"{cls.__module__}.{cls.__name__}"
        lines += ["", *comment(f"{doc} ({where})" if doc else where), f"{name}:"]
        lines += _render_fields(cls, data, "  ", notes.get(name) or {}, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _override(cls: type[BaseModel], data: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    fields = {f.alias or n: f for n, f in cls.model_fields.items()}
    for key, value in over.items():
        if key not in fields:
            raise ParamsError(f"render_params: {key}: not a key of {cls.__name__}")
        sub = _section_of(fields[key])
        data[key] = _override(sub, dict(data[key]), dict(value)) if sub and isinstance(value, Mapping) else value
    return data


def _section_of(field: Any) -> type[Section] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, Section) else None


def _render_fields(cls: type[BaseModel], data: dict[str, Any], indent: str,
                   notes: Mapping[str, Sequence[str]], prefix: str) -> list[str]:
    lines: list[str] = []
    for name, field in cls.model_fields.items():
        key = field.alias or name
        value = data[key]
        for note in notes.get(prefix + key, ()):
            lines += comment(note, indent)
        sub = _section_of(field)
        if sub is not None:
            lines += _keyed(f"{indent}{key}:", field.description)
            lines += _render_fields(sub, value, indent + "  ", notes, f"{prefix}{key}.")
        elif isinstance(value, dict) and value:
            lines += _keyed(f"{indent}{key}:", field.description)
            block = yaml.safe_dump(value, default_flow_style=None, sort_keys=False, width=10**6, allow_unicode=True)
            lines += [f"{indent}  {line}" for line in block.splitlines()]
        else:
            lines += _keyed(f"{indent}{key}: {yaml_flow(value)}", field.description)
    return lines


def _keyed(head: str, description: str | None) -> list[str]:
    """``head`` (``key: value``) with ``description`` as its comment from :data:`COMMENT_COLUMN` on."""
    if not description:
        return [head]
    first = head.ljust(COMMENT_COLUMN) if len(head) + 2 <= COMMENT_COLUMN else head + "  "
    if len(first) > WIDTH // 2:  # no room beside a long value: the comment goes below it
        return [head, *comment(description, " " * COMMENT_COLUMN)]
    return textwrap.wrap(description, WIDTH, initial_indent=first + "# ",
                         subsequent_indent=" " * COMMENT_COLUMN + "# ", break_long_words=False, break_on_hyphens=False)


def yaml_flow(value: Any) -> str:
    """A value on one line as YAML writes it (flow style for lists and mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()
