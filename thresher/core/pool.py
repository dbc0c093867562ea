"""The prompt pool (``rs.prompt_pool``): what each training prompt's visits showed, and what follows.

A prompt whose every response passed for ``skip_solved_after`` visits in a row teaches nothing new
(N − K of its responses are thrown away); one whose every response failed for
``skip_hopeless_after`` visits yields nothing to keep. Both rest: the prompt stream passes over them
(counted as skipped) until ``revisit_every`` epochs have gone by, then visits them once more in case
the model has forgotten, or learnt, them. "Every response passed/failed" means the visit's rewards
are all equal (within ``equal_within``: zero variance, continuous rewards too) and on one side of
``pass_reward``; a visit with a single valid response is no evidence either way (it neither
extends nor breaks a streak).

``allocate: by_pass_rate`` shares a step's budget (prompts × N responses) by each prompt's pass rate
at its last visit, p̂ = (passes + ½) / (responses + 1); a prompt never seen takes the same over the
last visits of the prompts of its ``data.group_field`` group (a difficulty level: what the step learnt
of its neighbours), or ½ without one. Prompt i gets
n_i responses maximising Σ_i (1 − p̂_i) · (1 − (1 − p̂_i)^n_i), the expected number of prompts that
yield a passing response, each weighted by how far the model still is from solving it. The k-th
response of prompt i adds (1 − p̂_i) · p̂_i · (1 − p̂_i)^(k−1), which falls with k, so handing out one
response at a time to the largest gain is optimal. Nearly solved prompts get few (a pass is likely
but not new), prompts the model fails at get many (a pass is rare, and is what RS trains on),
prompts with no pass in a long while get few, within ``[min_rollouts, max_rollouts]``.

The state is a handful of integers per prompt, saved in the checkpoint with the stream's position:
a resumed run rests, revisits and allocates exactly as an uninterrupted one. Every rank updates it
from the same gathered rewards, so ranks agree.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import torch

from thresher.core.config.schema import PromptPoolConfig

ACTIVE, SOLVED, HOPELESS = 0, 1, 2
RESTING_NAMES = {SOLVED: "solved", HOPELESS: "hopeless"}
# the per-prompt counters, saved as one list each
COUNTERS = (
    "visits", "responses", "passes", "kept", "last_responses", "last_passes",
    "solved_streak", "hopeless_streak", "resting", "rested_epoch", "visited_epoch",
)  # fmt: skip


@dataclass
class Visit:
    """One visit's outcome for a prompt: its valid rewards and how many the selector kept."""

    rewards: list[float]
    kept: int


@dataclass
class PromptPool:
    """Per-prompt history over the run, the resting decisions and the budget allocation."""

    config: PromptPoolConfig
    size: int
    counters: dict[str, list[int]] = field(default_factory=dict)
    groups: list[str] | None = None  # each prompt's data.group_field value: the prior of an unseen prompt

    def __post_init__(self) -> None:
        if not self.counters:
            self.counters = {name: [0] * self.size for name in COUNTERS}
            self.counters["rested_epoch"] = [-1] * self.size
            self.counters["visited_epoch"] = [-1] * self.size

    def resting(self, prompt: int, epoch: int) -> str | None:
        """Why ``prompt`` is passed over in ``epoch`` (``solved``/``hopeless``), or None: visit it."""
        state = self.counters["resting"][prompt]
        if state == ACTIVE:
            return None
        every = self.config.revisit_every
        if every is not None and epoch - self.counters["rested_epoch"][prompt] >= every:
            return None  # due for a revisit
        return RESTING_NAMES[state]

    def visiting(self, prompt: int, epoch: int) -> None:
        """The stream hands ``prompt`` out in ``epoch`` (a rest that follows is counted from here)."""
        self.counters["visited_epoch"][prompt] = epoch

    def next_revisit_epoch(self) -> int | None:
        """The first epoch in which a resting prompt is due again (None: nothing ever comes back)."""
        every = self.config.revisit_every
        rested = [e for e, state in zip(self.counters["rested_epoch"], self.counters["resting"], strict=True) if state]
        if every is None or not rested:
            return None
        return min(rested) + every

    def all_resting(self) -> bool:
        return all(self.counters["resting"])

    def record(self, prompt: int, visit: Visit) -> None:
        """Book a visit: counts, the last pass rate, the streaks, and whether the prompt now rests."""
        c, cfg = self.counters, self.config
        c["visits"][prompt] += 1
        c["kept"][prompt] += visit.kept
        if not visit.rewards:  # every reward was dropped (non-finite): nothing learnt about it
            return
        passes = sum(reward >= cfg.pass_reward for reward in visit.rewards)
        c["responses"][prompt] += len(visit.rewards)
        c["passes"][prompt] += passes
        c["last_responses"][prompt], c["last_passes"][prompt] = len(visit.rewards), passes
        if len(visit.rewards) < 2:  # one response is "all equal" by itself: no evidence either way
            return
        equal = max(visit.rewards) - min(visit.rewards) <= cfg.equal_within
        solved, hopeless = equal and passes == len(visit.rewards), equal and passes == 0
        c["solved_streak"][prompt] = c["solved_streak"][prompt] + 1 if solved else 0
        c["hopeless_streak"][prompt] = c["hopeless_streak"][prompt] + 1 if hopeless else 0
        state = ACTIVE
        if cfg.skip_solved_after is not None and c["solved_streak"][prompt] >= cfg.skip_solved_after:
            state = SOLVED
        elif cfg.skip_hopeless_after is not None and c["hopeless_streak"][prompt] >= cfg.skip_hopeless_after:
            state = HOPELESS
        c["resting"][prompt] = state
        if state != ACTIVE:
            c["rested_epoch"][prompt] = c["visited_epoch"][prompt]

    def pass_rate(self, prompt: int, by_group: dict[str, tuple[int, int]] | None = None) -> float:
        """p̂ at the last visit, smoothed: (passes + ½) / (responses + 1). A prompt never seen: the same
        over its group's last visits (``by_group``: :meth:`group_history`), else ½."""
        passes, responses = self.counters["last_passes"][prompt], self.counters["last_responses"][prompt]
        if not responses and self.groups is not None:
            passes, responses = (by_group or self.group_history()).get(self.groups[prompt], (0, 0))
        return (passes + 0.5) / (responses + 1)

    def group_history(self) -> dict[str, tuple[int, int]]:
        """Each group's (passes, responses) summed over its prompts' last visits."""
        totals: dict[str, tuple[int, int]] = {}
        if self.groups is None:
            return totals
        for group, passes, responses in zip(
            self.groups, self.counters["last_passes"], self.counters["last_responses"], strict=True
        ):
            if responses:
                before = totals.get(group, (0, 0))
                totals[group] = (before[0] + passes, before[1] + responses)
        return totals

    def allocate(self, prompts: list[int], budget: int, least: int, most: int) -> list[int]:
        """Responses for each of ``prompts`` (a step's batch, repeats allowed), ``budget`` in all
        unless every prompt reaches ``most``; each in ``[least, most]``. Greedy on the falling gains
        (see the module's docstring); ties go to the earlier prompt of the batch."""
        counts = [least] * len(prompts)
        by_group = self.group_history()
        rates = [self.pass_rate(p, by_group) for p in prompts]

        def gain(i: int) -> float:
            p = rates[i]
            return (1 - p) * p * (1 - p) ** counts[i]  # what the next, (counts[i] + 1)-th, response adds

        heap = [(-gain(i), i) for i in range(len(prompts)) if counts[i] < most]
        heapq.heapify(heap)
        left = budget - least * len(prompts)
        while left > 0 and heap:
            _, i = heapq.heappop(heap)
            counts[i] += 1
            left -= 1
            if counts[i] < most:
                heapq.heappush(heap, (-gain(i), i))
        return counts

    def metrics(self) -> dict[str, Any]:
        """How many prompts rest now, by reason (for the step's record)."""
        resting = self.counters["resting"]
        return {"prompts_resting_solved": resting.count(SOLVED), "prompts_resting_hopeless": resting.count(HOPELESS)}

    def state_dict(self) -> dict[str, list[int]]:
        return {name: list(values) for name, values in self.counters.items()}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        missing = [name for name in COUNTERS if len(state.get(name, [])) != self.size]
        if missing:
            raise ValueError(f"prompt pool state does not fit {self.size} prompts ({', '.join(missing)})")
        self.counters = {name: [int(v) for v in state[name]] for name in COUNTERS}


def visits_of(rewards: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor) -> list[Visit]:
    """Each prompt's visit from a step's [P, W] rewards, validity and kept mask."""
    return [
        Visit(rewards=row[ok].tolist(), kept=int(keep.sum()))
        for row, ok, keep in zip(rewards, valid, kept, strict=True)
    ]
