"""Thresher: rejection-sampling training of language models, composed from plugins.

Drive a run from Python::

    import thresher

    with thresher.Run.from_config("tiny", overrides={"rs.max_steps": 2}) as run:
        history = run.train()

Write a plugin (see :mod:`thresher.plugin` for everything a plugin author needs)::

    @thresher.register
    class LengthPenalty: ...

or package it, with ``thresher.hookimpl`` and an entry point in the ``thresher`` group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thresher.core.hookspecs import hookimpl
from thresher.version import __version__

if TYPE_CHECKING:
    from thresher.core.config import RunConfig
    from thresher.core.registry import register, unregister
    from thresher.core.runner import Run

__all__ = ["Run", "RunConfig", "__version__", "hookimpl", "load_config", "register", "unregister"]

# Loaded on first use: `import thresher` (what a plugin package does for hookimpl) stays light.
_LAZY = {
    "Run": ("thresher.core.runner", "Run"),
    "RunConfig": ("thresher.core.config", "RunConfig"),
    "register": ("thresher.core.registry", "register"),
    "unregister": ("thresher.core.registry", "unregister"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'thresher' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def load_config(source: Any, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """A validated run config from a file, a preset name, a dict or a RunConfig, plus overrides
    (``{"rs.max_steps": 5}``); every problem is reported at once in a ``ConfigError``."""
    from thresher.core.registry import build_registry
    from thresher.core.runner import resolve_source

    return resolve_source(source, overrides, build_registry())
