"""Everything a plugin author imports, in one place.

A plugin is a class with a ``name`` (what configs call it), a nested ``Config`` (its options: a
:class:`Section`, so unknown keys are errors) and its kind's methods, built as ``cls(config, context)``::

    from thresher.plugin import PluginContext, Rollout, Section, hookimpl
    import torch

    class LengthPenalty:
        name = "length_penalty"

        class Config(Section):
            per_token: float = 0.01

        def __init__(self, config, context: PluginContext):
            self.config = config

        def score(self, rollouts: list[Rollout]) -> torch.Tensor:
            return torch.tensor([-self.config.per_token * len(r.response_ids) for r in rollouts])

        def close(self):
            pass

    @hookimpl
    def register_scorers(register):
        register(LengthPenalty)

What each kind must do is its protocol (:class:`Generator`, :class:`Scorer`, :class:`Selector`,
:class:`Loss`, :class:`Logger`); what a plugin may additionally do, the engine asks by these optional
protocols: :class:`GeneratesInChunks`, :class:`ReportsMetrics`, :class:`PlansMemory`, :class:`LogsRollouts`
(and ``remote = True`` on a
scorer, see :func:`is_remote`; a loss's optional inputs, :data:`LOSS_INPUTS`, and ``trains_on``, see
:func:`loss_inputs` and :func:`trains_on`). Thresher checks what every plugin returns and reports a mistake in
one line that names the plugin.
"""

from thresher.commands import user_errors
from thresher.core.build import build_nested
from thresher.core.config import Section
from thresher.core.config.sampling import SamplingConfig, SamplingParams
from thresher.core.errors import (
    ConfigError,
    DataError,
    GeneratorError,
    PluginError,
    ScorerError,
    ScoringInterrupted,
    ThresherError,
)
from thresher.core.hookspecs import Register, hookimpl
from thresher.core.registry import register, unregister
from thresher.core.training.memory import GenerationPlan, PlanItem
from thresher.core.types import (
    LOSS_INPUTS,
    FinishReason,
    GeneratesInChunks,
    Generator,
    Logger,
    LogsRollouts,
    Loss,
    PartRewards,
    PlansMemory,
    PluginContext,
    Prompt,
    ReportsMetrics,
    Rollout,
    Scorer,
    Selector,
    is_remote,
    loss_inputs,
    trains_on,
)

__all__ = [
    "LOSS_INPUTS",
    "ConfigError",
    "DataError",
    "FinishReason",
    "GeneratesInChunks",
    "GenerationPlan",
    "Generator",
    "GeneratorError",
    "Logger",
    "LogsRollouts",
    "Loss",
    "PartRewards",
    "PlanItem",
    "PlansMemory",
    "PluginContext",
    "PluginError",
    "Prompt",
    "Register",
    "ReportsMetrics",
    "Rollout",
    "SamplingConfig",
    "SamplingParams",
    "Scorer",
    "ScorerError",
    "ScoringInterrupted",
    "Section",
    "Selector",
    "ThresherError",
    "build_nested",
    "hookimpl",
    "is_remote",
    "loss_inputs",
    "register",
    "trains_on",
    "unregister",
    "user_errors",
]
