"""Selector sections inside a selector's config (a chain's stages, a band's inner rule).

With a registry in the validation context (as when a run config is resolved), a nested section is
validated like a top-level one and its problems are reported with their full path
(``selector.stages[1].top_n_rollouts: ...``). Without one, only its shape is checked.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo

from thresher.core.config import resolve_plugin_section
from thresher.core.errors import ConfigError


def _check_section(value: Any, info: ValidationInfo, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError("expected a selector section with a `type`, e.g. {type: topk, top_n_rollouts: 1}")
    registry = (info.context or {}).get("registry")
    if registry is None:
        return value
    return resolve_plugin_section("selector", value, registry, where).to_section()


def _where(info: ValidationInfo) -> str:
    return f"{(info.context or {}).get('where', 'selector')}.{info.field_name}"


def _one(value: Any, info: ValidationInfo) -> Any:
    return None if value is None else _check_section(value, info, _where(info))


def _many(value: Any, info: ValidationInfo) -> Any:
    """Every stage is checked, and every problem of every stage reported at once."""
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of selector sections")
    sections, problems = [], []
    for i, section in enumerate(value):
        try:
            sections.append(_check_section(section, info, f"{_where(info)}[{i}]"))
        except ConfigError as err:
            problems.extend(err.problems)
        except ValueError as err:
            problems.append(f"{_where(info)}[{i}]: {err}")
    if problems:
        raise ConfigError(problems)
    return sections


SelectorSection = Annotated[dict[str, Any], BeforeValidator(_one)]
SelectorSections = Annotated[list[dict[str, Any]], BeforeValidator(_many)]
