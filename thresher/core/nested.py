"""Plugin sections inside a plugin's config: a chain's stages, a band's inner rule, a combined
scorer's parts.

With a registry in the validation context (as when a run config is resolved), a nested section is
validated like a top-level one and its problems are reported with their full path
(``selector.stages[1].top_n_rollouts: ...``), every bad one at once. Without one, only its shape is
checked.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo

from thresher.core.config import resolve_plugin_section
from thresher.core.errors import ConfigError

EXAMPLES = {"selector": "{type: topk, top_n_rollouts: 1}", "scorer": "{type: rule, function: module:function}"}


def _check_section(kind: str, value: Any, info: ValidationInfo, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(f"expected a {kind} section with a `type`, e.g. {EXAMPLES.get(kind, '{type: NAME}')}")
    registry = (info.context or {}).get("registry")
    if registry is None:
        return value
    return resolve_plugin_section(kind, value, registry, where).to_section()


def _where(info: ValidationInfo) -> str:
    return f"{(info.context or {}).get('where', 'section')}.{info.field_name}"


def plugin_section(kind: str) -> Any:
    """An annotation for one nested ``kind`` section (``None`` allowed where the field's type says so)."""

    def check(value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _check_section(kind, value, info, _where(info))

    return Annotated[dict[str, Any], BeforeValidator(check)]


def plugin_sections(kind: str) -> Any:
    """An annotation for a non-empty list of nested ``kind`` sections; every problem is reported."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of {kind} sections")
        sections, problems = [], []
        for i, section in enumerate(value):
            try:
                sections.append(_check_section(kind, section, info, f"{_where(info)}[{i}]"))
            except ConfigError as err:
                problems.extend(err.problems)
            except ValueError as err:
                problems.append(f"{_where(info)}[{i}]: {err}")
        if problems:
            raise ConfigError(problems)
        return sections

    return Annotated[list[dict[str, Any]], BeforeValidator(check)]


SelectorSection = plugin_section("selector")
SelectorSections = plugin_sections("selector")
ScorerSection = plugin_section("scorer")
