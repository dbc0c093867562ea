"""Plugin discovery and the name → class registry.

Built-ins and third-party plugins go through the same hooks: built-ins are modules listed in
``DEFAULT_PLUGINS``, third parties expose an entry point in the ``thresher`` group. The registry
owns the rules: a class must have a ``name``, a pydantic ``Config`` and its kind's methods, and a
name may be registered once per kind (configs refer to plugins by name, so silently renaming a
duplicate would train with the wrong component).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import pluggy
from pydantic import BaseModel

from thresher.core import hookspecs
from thresher.core.errors import PluginError
from thresher.core.types import KIND_PROTOCOLS

KINDS: tuple[str, ...] = ("generator", "scorer", "selector", "loss")
HOOK_FOR_KIND = {
    "generator": "register_generators",
    "scorer": "register_scorers",
    "selector": "register_selectors",
    "loss": "register_losses",
}
DEFAULT_PLUGINS: tuple[str, ...] = ("thresher.plugins.builtin",)
ENTRYPOINT_GROUP = "thresher"


def get_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build a fresh plugin manager: hook specs, built-ins, then installed plugins.

    ``THRESHER_LOAD_PLUGINS`` (comma-separated entry-point names; empty for none) limits which
    installed plugins load; ``THRESHER_TRACE_PLUGINS=1`` prints every hook call to stderr.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints:
        _load_entrypoints(pm)
    pm.check_pending()
    if os.environ.get("THRESHER_TRACE_PLUGINS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    allow = os.environ.get("THRESHER_LOAD_PLUGINS")
    if allow is None:
        pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP)
        return
    for name in filter(None, (n.strip() for n in allow.split(","))):
        pm.load_setuptools_entrypoints(ENTRYPOINT_GROUP, name=name)


@dataclass
class Registry:
    """Registered plugin classes by kind and name."""

    plugins: dict[str, dict[str, type]] = field(default_factory=lambda: {k: {} for k in KINDS})
    origins: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, kind: str, cls: type) -> None:
        _check_plugin_class(kind, cls)
        origin = f"{cls.__module__}.{cls.__qualname__}"
        if cls.name in self.plugins[kind]:
            first = self.origins[(kind, cls.name)]
            raise PluginError(f"duplicate {kind} name {cls.name!r}: registered by {first} and again by {origin}")
        self.plugins[kind][cls.name] = cls
        self.origins[(kind, cls.name)] = origin

    def get(self, kind: str, name: str) -> type:
        try:
            return self.plugins[kind][name]
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = ", ".join(sorted(self.plugins[kind])) or "none"
        return f"unknown {kind} {name!r}; available: {available}"

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])


def build_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Call every ``register_*`` hook and collect the classes into a :class:`Registry`."""
    pm = pm or get_plugin_manager()
    registry = Registry()
    for kind in KINDS:
        hook = getattr(pm.hook, HOOK_FOR_KIND[kind])
        hook(register=lambda cls, _kind=kind: registry.add(_kind, cls))
    return registry


def _check_plugin_class(kind: str, cls: object) -> None:
    where = f"{kind} plugin {getattr(cls, '__qualname__', cls)!r}"
    if not isinstance(cls, type):
        raise PluginError(f"{where}: register() takes a class, got {type(cls).__name__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where}: needs a non-empty string class attribute `name`")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(f"{where}: needs a nested pydantic `Config` model")
    missing = _missing_methods(cls, KIND_PROTOCOLS[kind])
    if missing:
        raise PluginError(f"{where}: missing {kind} method(s): {', '.join(missing)}")


def _missing_methods(cls: type, protocol: type) -> Iterable[str]:
    wanted = [m for m in protocol.__dict__ if not m.startswith("_") and callable(protocol.__dict__[m])]
    if "__call__" in protocol.__dict__:
        wanted.append("__call__")
    return [m for m in wanted if not callable(getattr(cls, m, None))]
