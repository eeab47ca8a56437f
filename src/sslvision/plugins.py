"""Plugins: SSL methods and synthesis generators that other installed packages add to the registries.

A DVC stage runs as ``python -m sslvision.stages.<name>`` and never imports a project's own code, so a method
registered with :func:`sslvision.ssl.register_method` (or a generator with
:func:`sslvision.synthesize.register_generator`) in that code is unknown to ``params.yaml``. A package makes it
known the way pytest plugins do: an entry point in its ``pyproject.toml``, naming the module whose decorators
register it::

    [project.entry-points."sslvision.ssl_methods"]
    my_method = "my_package.ssl"

    [project.entry-points."sslvision.generators"]
    my_generator = "my_package.generators"

:func:`load_plugins` imports every entry point of both groups, once, before a name is validated or looked up
(``PretrainParams.method``, ``SynthesizeParams.generator``, :func:`~sslvision.ssl.build_method`,
:func:`~sslvision.synthesize.make_generator`). A plugin that fails to import, or that registers a name already
registered, stops the run with a :class:`PluginError` naming the entry point and its distribution.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

SSL_METHODS_GROUP = "sslvision.ssl_methods"
GENERATORS_GROUP = "sslvision.generators"
GROUPS = (SSL_METHODS_GROUP, GENERATORS_GROUP)

_loaded = False  # every group's entry points were imported without error
_loading = False  # load_plugins is running (a plugin that validates params at import time must not recurse)


class PluginError(RuntimeError):
    """An entry-point plugin failed to import, or registered a name that was already registered."""


_WATCHED: dict[str, dict[str, Any]] = {}  # what a registry names ("SSL method") -> the registry


def watch(kind: str, registry: dict[str, Any]) -> None:
    """Have :func:`load_plugins` check ``registry`` (``kind`` names its entries in messages): a plugin may add to
    it, never replace a name. The registries call this where they are defined (sslvision.ssl.base,
    sslvision.synthesize), so this module imports neither and a stage depends only on the registries it uses."""
    _WATCHED[kind] = registry


def _describe(ep: EntryPoint) -> str:
    dist = ep.dist
    where = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"entry point {ep.name!r} = {ep.value!r} of group {ep.group!r} (distribution {where})"


def load_plugins(reload: bool = False) -> None:
    """Import every entry point of the groups :data:`GROUPS`; their modules' decorators register what they add.

    Runs once per process (again with ``reload=True``, or after a call that raised).

    Raises:
        PluginError: an entry point failed to import (the message names it, its distribution and the
            exception), or it registered a name that was already registered (built-in or another plugin's).
    """
    global _loaded, _loading
    if (_loaded and not reload) or _loading:
        return
    _loading = True
    try:
        registries = dict(_WATCHED)  # the built-ins first: a plugin's name is checked against them
        for group in GROUPS:
            for ep in entry_points(group=group):
                _load_one(ep, registries)
        _loaded = True
    finally:
        _loading = False


def _load_one(ep: EntryPoint, registries: dict[str, dict[str, Any]]) -> None:
    before = {kind: dict(reg) for kind, reg in registries.items()}
    try:
        ep.load()
    except Exception as err:
        raise PluginError(f"sslvision plugin {_describe(ep)} failed to import: {type(err).__name__}: {err}") from err
    for kind, reg in registries.items():
        replaced = sorted(name for name, cls in before[kind].items() if reg.get(name) is not cls)
        if replaced:
            for name in replaced:  # undo the replacement: the earlier registration stands
                reg[name] = before[kind][name]
            raise PluginError(f"sslvision plugin {_describe(ep)} registered the {kind} name(s) "
                              f"{', '.join(map(repr, replaced))}, already registered: choose another name")


def require_registered(name: str, kind: str, registry: dict[str, Any], group: str) -> str:
    """``name`` if it is a key of ``registry`` (call after :func:`load_plugins`); else ValueError naming the choices.

    Args:
        name: the value to check (``pretrain.method``, ``synthesize.generator``).
        kind: what it names, for the message (``SSL method``).
        registry: the registry (``SSL_METHODS``, ``GENERATORS``).
        group: the entry-point group that adds to it.
    """
    if name not in registry:
        raise ValueError(f"{name!r} is not a registered {kind} ({', '.join(registry)}; plugins: entry points of "
                         f"group {group})")
    return name
