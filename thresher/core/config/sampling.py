"""The sampling contract between the core and generators.

The core depends on a few sampling settings itself — the longest response (to limit prompt length and
plan memory), the temperature (a greedy run's N responses are identical), and N — so they are defined
once, here: a generator's ``Config`` subclasses :class:`SamplingConfig` (its YAML keys live in the
``generator:`` section, as always), and the core reads them back as :class:`SamplingParams`, which
generators also receive in ``PluginContext.sampling``. A generator whose ``Config`` does not subclass
:class:`SamplingConfig` is refused when the config is read, never silently planned with a 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from thresher.core.config.schema import Section

if TYPE_CHECKING:
    from thresher.core.config.schema import RunConfig


class SamplingConfig(Section):
    """The sampling options every generator accepts (each engine maps them one to one), so switching
    engines never changes what a config asks for. Subclass it for a generator's ``Config``."""

    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    top_k: int = Field(0, ge=0, description="Sample from the k likeliest tokens (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (kept in the response).")
    ignore_eos: bool = Field(
        False, description="Never stop at EOS: every response is max_new_tokens long (benchmarks of fixed length)."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        # "" occurs in every text: each response would stop after its first token, and train on that.
        for i, text in enumerate(value):
            if text == "":
                raise ValueError(f"stop[{i}] is empty: an empty stop string matches at once and ends every response")
        return value


@dataclass(frozen=True)
class SamplingParams:
    """What one training step samples with: ``n`` responses per prompt, each at most
    ``max_new_tokens`` long, at ``temperature`` / ``top_p`` / ``top_k`` (0 and 1 mean off)."""

    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class NoSamplingConfig(ValueError):
    """A generator plugin's ``Config`` does not declare the sampling options the core relies on."""


def sampling_params(config: RunConfig) -> SamplingParams:
    """The run's sampling parameters, from the generator's section and ``rs.num_rollouts_per_prompt``."""
    options = config.generator.config
    if not isinstance(options, SamplingConfig):
        raise NoSamplingConfig(sampling_contract_problem(config.generator.type, type(options).__name__))
    return SamplingParams(
        n=config.rs.num_rollouts_per_prompt,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        stop=tuple(options.stop),
        ignore_eos=options.ignore_eos,
    )


def sampling_contract_problem(generator: str, config_class: str) -> str:
    return (
        f"generator.type: the generator {generator!r} has a Config ({config_class}) that does not subclass "
        "thresher.plugin.SamplingConfig, so Thresher cannot read its max_new_tokens and temperature (it "
        "limits prompt length and plans memory with them); make its Config subclass SamplingConfig"
    )
