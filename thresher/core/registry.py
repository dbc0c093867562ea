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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel

from thresher.core import hookspecs
from thresher.core.errors import PluginError, guard_user_code
from thresher.core.types import KIND_PROTOCOLS

# The four stages of a step (one config section each), then loggers (a ``loggers:`` list).
PIPELINE_KINDS: tuple[str, ...] = ("generator", "scorer", "selector", "loss")
KINDS: tuple[str, ...] = (*PIPELINE_KINDS, "logger")
# A registered plugin class: its kind's protocol is checked when it is registered (its ``name``,
# ``Config`` and methods), so the registry hands classes out as ``type[Any]``.
PluginClass = type[Any]
HOOK_FOR_KIND = {
    "generator": "register_generators",
    "scorer": "register_scorers",
    "selector": "register_selectors",
    "loss": "register_losses",
    "logger": "register_loggers",
}
HOOK_NAMES = frozenset({*HOOK_FOR_KIND.values(), "register_commands"})
DEFAULT_PLUGINS: tuple[str, ...] = ("thresher.plugins.builtin",)
ENTRYPOINT_GROUP = "thresher"


def get_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build a fresh plugin manager: hook specs, built-ins, classes registered in this process
    (:func:`register`), then installed plugins.

    ``THRESHER_LOAD_PLUGINS`` (comma-separated entry-point names; empty for none) limits which
    installed plugins load; ``THRESHER_TRACE_PLUGINS=1`` prints every hook call to stderr. An
    installed plugin that cannot be imported or validated is left out and described in
    :func:`plugin_problems` (the CLI prints one line for it; ``thresher plugins`` lists it), so one
    broken package never stops Thresher itself.
    """
    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    pm.register(_InProcess(), name=IN_PROCESS)
    problems: list[str] = []
    if load_entrypoints:
        problems = _load_entrypoints(pm)
    pm.check_pending()
    pm.problems = problems
    if os.environ.get("THRESHER_TRACE_PLUGINS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus the installed plugins it had to leave out (one line each)."""

    problems: list[str]

    def __init__(self, project_name: str):
        super().__init__(project_name)
        self.problems = []


def plugin_problems(pm: pluggy.PluginManager) -> list[str]:
    """One line per installed plugin left out of ``pm`` (and per unknown THRESHER_LOAD_PLUGINS name)."""
    return list(getattr(pm, "problems", []))


def _load_entrypoints(pm: pluggy.PluginManager) -> list[str]:
    """Load each entry point on its own: an import error or a misspelled hook only drops that plugin."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRYPOINT_GROUP))
    allow = os.environ.get("THRESHER_LOAD_PLUGINS")
    problems = []
    if allow is not None:
        wanted = [n.strip() for n in allow.split(",") if n.strip()]
        installed = sorted(ep.name for ep in found)
        for name in wanted:
            if name not in installed:
                listing = ", ".join(installed) or "none"
                problems.append(
                    f"THRESHER_LOAD_PLUGINS names {name!r}, which no installed plugin is (installed: {listing})"
                )
        found = [ep for ep in found if ep.name in wanted]
    for ep in found:
        where = f"plugin {ep.name!r} ({ep.value}" + (f", from {ep.dist.name}" if ep.dist else "") + ")"
        try:
            # sys.exit() at import would end any thresher command (even `config validate`) with that
            # status and no output; it leaves the plugin out like any other import failure.
            with guard_user_code(lambda what: PluginError(f"its import {what}")):
                plugin = ep.load()
        except PluginError as err:
            problems.append(f"{where} was not loaded: {err}")
            continue
        except Exception as err:  # the plugin's own code failed: report it as theirs, in one line
            problems.append(f"{where} was not loaded: {type(err).__name__}: {_first_line(err)}")
            continue
        if pm.is_registered(plugin) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            pm.register(plugin, name=ep.name)
            pm.check_pending()  # a hook that matches no spec (register_scorer for register_scorers)
        except pluggy.PluginValidationError as err:
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            problems.append(f"{where} was not loaded: {_first_line(err)}{_hook_hint(plugin)}")
    return problems


def _hook_hint(plugin: object) -> str:
    names = [n for n in dir(plugin) if n.startswith("register") and callable(getattr(plugin, n))]
    wrong = [n for n in names if n not in HOOK_NAMES]
    return f" (hooks are: {', '.join(sorted(HOOK_NAMES))}; found {', '.join(wrong)})" if wrong else ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- classes registered in this process (notebooks, tests, scripts: no packaging needed) ----------

IN_PROCESS = "thresher.in_process"
_REGISTERED: dict[tuple[str, str], PluginClass] = {}


def register(cls: PluginClass, kind: str | None = None) -> PluginClass:
    """Make a plugin class available to runs in this process, as if a package registered it.

    ``kind`` (generator, scorer, selector, loss, logger) is inferred from the class's methods when only one
    kind fits. Registering a class again under its name replaces the earlier in-process one (a
    notebook cell run twice); a name a built-in or installed plugin already has is an error when a
    registry is built. Returns the class, so it also works as a decorator.
    """
    kind = kind or _infer_kind(cls)
    if kind not in KINDS:
        raise PluginError(f"register(): kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_plugin_class(kind, cls)
    _REGISTERED[(kind, cls.name)] = cls
    return cls


def unregister(cls: PluginClass) -> None:
    """Forget a class registered with :func:`register` (tests clean up with it)."""
    for key, registered in list(_REGISTERED.items()):
        if registered is cls:
            del _REGISTERED[key]


def _infer_kind(cls: PluginClass) -> str:
    fitting = [kind for kind in KINDS if not _missing_methods(cls, KIND_PROTOCOLS[kind])]
    if len(fitting) != 1:
        what = "several kinds: " + ", ".join(fitting) if fitting else "no kind's methods"
        raise PluginError(f"register({getattr(cls, '__qualname__', cls)!r}): it has {what}; pass kind=")
    return fitting[0]


def _forward_registered(kind: str) -> Callable[[Any, hookspecs.Register], None]:
    """The ``register_<kind>s`` hook of :class:`_InProcess`: hands over this kind's registered classes."""

    @hookspecs.hookimpl
    def hook(self: Any, register: hookspecs.Register) -> None:
        for (registered_kind, _), cls in _REGISTERED.items():
            if registered_kind == kind:
                register(cls)

    return hook


class _InProcess:
    """The pluggy plugin through which :func:`register`'s classes reach a registry (pluggy matches
    hooks by attribute name, so each kind's hook is an attribute named after it)."""


for _kind, _hook_name in HOOK_FOR_KIND.items():
    setattr(_InProcess, _hook_name, _forward_registered(_kind))


@dataclass
class Registry:
    """Registered plugin classes by kind and name."""

    plugins: dict[str, dict[str, PluginClass]] = field(default_factory=lambda: {k: {} for k in KINDS})
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # installed plugins that could not be loaded

    def add(self, kind: str, cls: PluginClass) -> None:
        _check_plugin_class(kind, cls)
        origin = f"{cls.__module__}.{cls.__qualname__}"
        if cls.name in self.plugins[kind]:
            first = self.origins[(kind, cls.name)]
            raise PluginError(f"duplicate {kind} name {cls.name!r}: registered by {first} and again by {origin}")
        self.plugins[kind][cls.name] = cls
        self.origins[(kind, cls.name)] = origin

    def get(self, kind: str, name: str) -> PluginClass:
        try:
            return self.plugins[kind][name]
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = ", ".join(sorted(self.plugins[kind])) or "none"
        broken = (
            f" ({len(self.problems)} installed plugin(s) failed to load: see `thresher plugins`)"
            if self.problems
            else ""
        )
        return f"unknown {kind} {name!r}; available: {available}{broken}"

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])


def build_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Call every ``register_*`` hook and collect the classes into a :class:`Registry`."""
    pm = pm or get_plugin_manager()
    registry = Registry(problems=plugin_problems(pm))
    for kind in KINDS:
        hook = getattr(pm.hook, HOOK_FOR_KIND[kind])
        call_plugin_hook(hook, register=lambda cls, _kind=kind: registry.add(_kind, cls))
    return registry


def call_plugin_hook(hook: Any, **kwargs: Any) -> list[Any]:
    """Call a pluggy hook so that a plugin's ``sys.exit()`` (or its own ``KeyboardInterrupt``) in it
    is a :class:`PluginError` naming the plugin and the hook, not the silent end of the command."""
    culprit = ["a plugin"]

    def fail(what: str) -> PluginError:
        return PluginError(f"{culprit[0]}: its {hook.name} hook {what}")

    with guard_user_code(fail):
        try:
            return hook(**kwargs)
        except (SystemExit, KeyboardInterrupt) as err:
            culprit[0] = _plugin_in_traceback(hook, err) or culprit[0]
            raise


def _plugin_in_traceback(hook: Any, err: BaseException) -> str | None:
    """``plugin 'NAME'`` for the innermost hook implementation in ``err``'s traceback."""
    owners = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in hook.get_hookimpls()}
    found = None
    frame = err.__traceback__
    while frame is not None:
        found = owners.get(frame.tb_frame.f_code, found)
        frame = frame.tb_next
    return f"plugin {found!r}" if found is not None else None


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


def _missing_methods(cls: PluginClass, protocol: type) -> Iterable[str]:
    wanted = [m for m in protocol.__dict__ if not m.startswith("_") and callable(protocol.__dict__[m])]
    if "__call__" in protocol.__dict__:
        wanted.append("__call__")

    def has(method: str) -> bool:
        if method == "__call__":  # every class is callable: the instances must be
            return any("__call__" in vars(base) for base in cls.__mro__ if base is not object)
        return callable(getattr(cls, method, None))

    return [m for m in wanted if not has(m)]
