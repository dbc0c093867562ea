"""The data that flows through a step, and the protocol each plugin kind satisfies.

A plugin class has a ``name`` (what configs refer to), a nested pydantic ``Config`` (its options,
validated from the config section), and is built as ``cls(config, context)``. ``context`` carries the
runtime objects some plugins need (the policy, its tokenizer, the device); plugins that need none
accept and ignore it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

from thresher.core.errors import PluginError

if TYPE_CHECKING:
    from thresher.core.config.sampling import SamplingParams

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Prompt:
    """One prompt of the dataset, rendered and tokenized once.

    ``index`` is the row in the dataset, ``text`` what the model sees (after any chat template),
    ``token_ids`` its tokens, and ``extra`` every other field of the row (a reference answer, say),
    which scorers receive. ``given`` is the prompt as the row gave it, before any template: its text,
    or its list of chat messages (reward functions written for TRL receive this as ``prompts``).
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    given: str | list[dict[str, Any]] | None = None


@dataclass
class Rollout:
    """One sampled response. ``response_ids`` are the tokens the model produced — training uses
    these, never a re-tokenization of ``text`` — including the EOS that ended it, if any.

    ``group`` is the prompt's position in the step's batch (the selector's grouping key: two equal
    prompts are two groups) and ``sample`` the rollout's position within its group.

    ``logprobs``: log π_old(token) of each response token under the policy that sampled it, at
    temperature 1 and without top-k/top-p (what the training pass computes, so the importance ratio
    π_θ/π_old of losses such as ``raft_pp`` starts at 1). Every built-in generator records them; a
    generator that leaves them None gets them recomputed before the step's first update.
    """

    prompt: Prompt
    group: int
    sample: int
    response_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] | None = None


@dataclass
class PluginContext:
    """Runtime objects handed to plugin constructors."""

    tokenizer: Any = None
    policy: torch.nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # True once the user asked the run to stop (Ctrl-C): long operations may end early; the engine
    # discards what they return.
    should_stop: Callable[[], bool] = lambda: False
    # The plugin registry, for plugins built from other plugins' sections (a selector chain).
    registry: Any = None
    # Loggers: the run directory (where a logger may write its files) and the step a resumed run
    # continues after (0 for a fresh run): records of later steps written before were discarded.
    run_dir: Path | None = None
    resumed_step: int = 0
    # Generators: the sampling parameters of the run (N, max_new_tokens, temperature, top-p/k), as the
    # core reads them from the generator's section (see thresher.core.config.sampling).
    sampling: SamplingParams | None = None


class Plugin(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]


@runtime_checkable
class Generator(Protocol):
    """Samples responses: ``len(prompts) * n`` rollouts, grouped by prompt, in order.

    ``seed`` fixes the sampling (the engine derives it from the run seed and the step);
    ``greedy`` asks for deterministic decoding (validation).
    """

    name: ClassVar[str]

    def generate(self, prompts: list[Prompt], n: int, *, seed: int, greedy: bool = False) -> list[Rollout]: ...

    # Optional: ``generate_chunks(prompts, n, *, seed, greedy=False) -> Iterator[list[Rollout]]``
    # yields the same rollouts in pieces; the engine then scores a piece while the next is generated.

    def load_weights(self, policy: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from the trained ``policy``."""

    def close(self) -> None: ...


@dataclass
class PartRewards:
    """What a scorer made of named parts (``combine``) returns: the rewards, and each part's own, so
    every rollout's record keeps them and the step's metrics compare them."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


@runtime_checkable
class Scorer(Protocol):
    """Rewards rollouts: one finite float32 per rollout, in order (a tensor, or :class:`PartRewards`)."""

    name: ClassVar[str]

    # Optional class attribute ``remote = True``: the scorer computes elsewhere (a server), so the
    # engine may score one chunk while generating the next (``rs.overlap_scoring: auto``).

    def score(self, rollouts: list[Rollout]) -> torch.Tensor: ...

    def close(self) -> None: ...


@runtime_checkable
class Selector(Protocol):
    """Chooses rollouts to train on: ``rewards`` and ``valid`` are [prompts, N]; returns a bool mask
    of the same shape. A selector that declares a ``rollouts`` parameter also gets the rollouts,
    grouped by prompt (``rollouts[p][s]``), to decide by their text or tokens (diversity, say)."""

    name: ClassVar[str]

    def select(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Loss(Protocol):
    """Training objective on the response tokens of the step's training sequences.

    Called once per micro-batch with per-token log-probs [B, T] and the response mask [B, T]; returns
    this micro-batch's *share* of the global loss (already divided by the global ``num_sequences`` /
    ``num_tokens``), so gradients accumulated over micro-batches do not depend on their size.

    Optional inputs: a loss that declares any of :data:`LOSS_INPUTS` as a keyword parameter of
    ``__call__`` (or ``**inputs``) gets it — ``old_logprobs`` [B, T] (log π_old of each response token,
    under the policy that generated it), ``rewards``, ``kept`` (bool), ``groups`` (the prompt's index in
    the step), ``group_reward_mean`` and ``group_reward_std`` (over the valid rollouts of the
    sequence's prompt), each [B]. A loss that declares none gets none: losses written before these
    existed work unchanged.

    Optional class attribute ``trains_on``: ``"kept"`` (the default: the selector's kept rollouts) or
    ``"groups"`` (every valid rollout of each prompt the selector kept any rollout of, rejected ones
    included, with ``kept`` telling them apart).
    """

    name: ClassVar[str]

    def __call__(
        self,
        token_logprobs: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        num_sequences: int,
        num_tokens: int,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@runtime_checkable
class Logger(Protocol):
    """Receives every record ``metrics.jsonl`` gets (train steps, validations, stops), on the main
    process only, in order. Each record has ``kind``, ``step`` and the wall-clock ``time``; a value
    is None where it is undefined that step. ``close`` is called once, at the end of the run."""

    name: ClassVar[str]

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


# --- optional capabilities: a plugin has them or not; the engine asks with isinstance() -------------


@runtime_checkable
class LogsRollouts(Protocol):
    """A logger that also gets each step's rollouts, as the rows of ``rollouts/step_N.jsonl``
    (prompt, response, reward, kept, finish_reason, …), before that step's metrics record."""

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None: ...


@runtime_checkable
class GeneratesInChunks(Protocol):
    """A generator that can hand its rollouts over in pieces, so a remote scorer scores one piece while
    the next is generated (``rs.overlap_scoring``). Same seed, same rollouts as ``generate``."""

    def generate_chunks(
        self, prompts: list[Prompt], n: int, *, seed: int, greedy: bool = False
    ) -> Iterator[list[Rollout]]: ...


@runtime_checkable
class ReportsMetrics(Protocol):
    """A plugin with numbers for ``metrics.jsonl`` (prefixed with its kind: ``generator_…``,
    ``selector_…``): called once per step. Under torchrun a scorer's numbers from every rank (each
    scored its share) are combined: ints (counts) summed, floats averaged."""

    def metrics(self) -> dict[str, float]: ...


@runtime_checkable
class PlansMemory(Protocol):
    """A generator that tells the memory plan what it holds: a classmethod
    ``memory_items(config, run: GenerationPlan) -> list[PlanItem]``
    (see :mod:`thresher.core.training.memory`)."""

    @classmethod
    def memory_items(cls, config: Any, run: Any) -> list[Any]: ...


def reads_rollouts(selector: Selector) -> bool:
    """A selector that declares a ``rollouts`` parameter in ``select`` (the one way to ask for them):
    it then gets the rollouts grouped by prompt, ``rollouts[p][s]``. A Protocol cannot tell a
    parameter apart, so this one capability is read from the signature, here and nowhere else."""
    return "rollouts" in inspect.signature(selector.select).parameters


LOSS_INPUTS = ("old_logprobs", "rewards", "kept", "groups", "group_reward_mean", "group_reward_std")


def loss_inputs(loss: Loss | type[Any]) -> frozenset[str]:
    """The optional inputs (:data:`LOSS_INPUTS`) a loss (or its class) declares in its ``__call__``."""
    parameters = inspect.signature(loss.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return frozenset(LOSS_INPUTS)
    return frozenset(name for name in LOSS_INPUTS if name in parameters)


def trains_on(loss: Loss | type[Any]) -> Literal["kept", "groups"]:
    """What a loss (or its class) trains on: the kept rollouts (default), or whole groups, rejected
    rollouts included."""
    value = getattr(loss, "trains_on", "kept")
    if value == "groups":
        return "groups"
    if value != "kept":
        name = getattr(loss, "name", type(loss).__name__)
        raise PluginError(f"loss {name!r}: trains_on must be 'kept' or 'groups', not {value!r}")
    return "kept"


def is_remote(scorer: object) -> bool:
    """A scorer computing elsewhere (class attribute ``remote = True``): overlapping it with
    generation is worth it, where one computing on the same cores would only slow both."""
    return bool(getattr(scorer, "remote", False))


KIND_PROTOCOLS: dict[str, type] = {
    "generator": Generator,
    "scorer": Scorer,
    "selector": Selector,
    "loss": Loss,
    "logger": Logger,
}
