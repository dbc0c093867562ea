"""What every tracker logger checks the same way: its package at config time, its folder at start."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from thresher.core.types import PluginContext


def check_installed(package: str, missing: str) -> None:
    """Raise ``ValueError(missing)`` when ``package`` is not installed: called by a logger's config
    validator, so the mistake is found when the config is checked, not hours later when training starts."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(missing)


def run_dir_of(context: PluginContext, logger: str) -> Path:
    """The run directory a logger writes into (the engine always passes it)."""
    if context.run_dir is None:
        raise ValueError(f"the {logger} logger needs the run directory in its context")
    return context.run_dir
