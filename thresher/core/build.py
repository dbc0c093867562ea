"""Building plugins from resolved config sections, including sections nested in a plugin's config."""

from __future__ import annotations

from typing import Any

from thresher.core.config import PluginSpec, resolve_plugin_section
from thresher.core.registry import Registry
from thresher.core.types import PluginContext


def instantiate(registry: Registry, kind: str, spec: PluginSpec, context: PluginContext) -> Any:
    """Build the plugin a resolved section names: ``cls(config, context)``."""
    return registry.get(kind, spec.type)(spec.config, context)


def build_nested(kind: str, section: dict[str, Any], context: PluginContext | None) -> Any:
    """Build a plugin from a section nested in another plugin's config (a chain's stage, say).

    The nested section was validated with the run config; this resolves it again against the
    registry in ``context`` and builds it.
    """
    if context is None or context.registry is None:
        raise ValueError(f"building a nested {kind} needs the registry in the plugin context")
    return instantiate(context.registry, kind, resolve_plugin_section(kind, section, context.registry), context)
