"""The prompt pool (issue 24, part 2) without a model: what a visit counts as, resting and revisits
in the prompt stream, a dry pool, the budget allocation against a brute-force optimum, and its
state round trip."""

from __future__ import annotations

import itertools

import pytest
import torch

from thresher.core.config.schema import PromptPoolConfig
from thresher.core.data import PromptStream
from thresher.core.pool import PromptPool, Visit, visits_of
from thresher.core.types import Prompt


def pool(size: int = 4, **config) -> PromptPool:
    return PromptPool(PromptPoolConfig(**config), size)


def prompts(count: int) -> list[Prompt]:
    return [Prompt(i, f"p{i}", (1, 2)) for i in range(count)]


@pytest.mark.parametrize(
    ("rewards", "solved", "hopeless"),
    [
        ([1.0, 1.0, 1.0], 1, 0),  # 0/1 rule, every response right
        ([0.0, 0.0, 0.0], 0, 1),  # every response wrong
        ([0.8, 0.8, 0.8000001], 1, 0),  # continuous, zero variance (within equal_within), above pass_reward
        ([0.3, 0.3, 0.3], 0, 1),  # continuous, zero variance, below pass_reward: no reward for anyone
        ([0.3, 0.31, 0.3], 0, 0),  # some variance: informative, whatever the values
        ([1.0, 0.0, 1.0], 0, 0),
        ([1.0], 0, 0),  # one response: no evidence
    ],
)
def test_a_visit_counts_as_solved_or_hopeless_only_when_all_rewards_are_equal(rewards, solved, hopeless):
    p = pool(skip_solved_after=5, skip_hopeless_after=5)
    p.record(0, Visit(rewards, kept=1))
    assert p.counters["solved_streak"][0] == solved
    assert p.counters["hopeless_streak"][0] == hopeless
    assert p.counters["passes"][0] == sum(r >= 0.5 for r in rewards)
    assert p.counters["responses"][0] == len(rewards)


def test_a_streak_rests_a_prompt_and_a_different_visit_breaks_it():
    p = pool(skip_solved_after=2, skip_hopeless_after=3)
    p.record(0, Visit([1.0, 1.0], 1))
    assert p.resting(0, 0) is None  # one solved visit of two
    p.record(0, Visit([1.0, 0.0], 1))  # breaks the streak
    p.record(0, Visit([1.0, 1.0], 1))
    assert p.resting(0, 0) is None
    p.record(0, Visit([1.0, 1.0], 1))
    assert p.resting(0, 5) == "solved"  # never revisited without revisit_every
    for _ in range(3):
        p.record(1, Visit([0.0, 0.0, 0.0], 0))
    assert p.resting(1, 0) == "hopeless"
    p.record(2, Visit([float(i % 2) for i in range(4)], 1))
    assert p.resting(2, 0) is None
    assert p.metrics() == {"prompts_resting_solved": 1, "prompts_resting_hopeless": 1}


def test_the_stream_passes_over_resting_prompts_and_revisits_them_every_e_epochs():
    """6 prompts, no shuffle, batches of 2; prompts 0 and 1 rest (solved) after their visit in epoch 0
    and come back in epoch 2 (revisit_every=2), then rest again as long as they stay solved."""
    stream = PromptStream(prompts(6), seed=0, shuffle=False, pool=pool(6, skip_solved_after=1, revisit_every=2))
    seen = []
    for _ in range(9):
        batch = stream.next_batch(2)
        indices = [p.index for p in batch]
        seen.append((stream.epoch, indices, dict(stream.skipped)))
        solved = [1.0 if p.index < 2 else float(s % 2) for p in batch for s in range(2)]
        rewards = torch.tensor(solved).view(len(batch), 2)
        stream.record(batch, rewards, torch.ones_like(rewards, dtype=torch.bool), rewards > 0.5)
    assert [indices for _, indices, _ in seen] == [
        [0, 1],
        [2, 3],
        [4, 5],  # epoch 0: all
        [2, 3],
        [4, 5],  # epoch 1: 0 and 1 rest
        [0, 1],
        [2, 3],
        [4, 5],  # epoch 2: revisited
        [2, 3],  # epoch 3: resting again
    ]
    assert seen[3][2] == {"solved": 2, "hopeless": 0}  # passed over while filling the 4th batch
    assert seen[5][2] == {"solved": 0, "hopeless": 0}
    assert seen[8][2] == {"solved": 2, "hopeless": 0}
    assert stream.pool is not None and stream.pool.counters["visits"][:2] == [2, 2]


def test_a_dry_pool_hands_out_what_it_found_and_then_nothing():
    """5 prompts, batches of 4, every visit solved, no revisits: the second batch crosses into epoch 1
    (where 0-3 rest) and takes prompt 4 again; then every prompt rests for good: the stream is dry."""
    stream = PromptStream(prompts(5), seed=0, shuffle=False, pool=pool(5, skip_solved_after=1))

    def visit(batch):
        rewards = torch.ones(len(batch), 2)
        stream.record(batch, rewards, torch.ones_like(rewards, dtype=torch.bool), rewards > 0.5)

    first = stream.next_batch(4)
    visit(first)
    second = stream.next_batch(4)
    assert [p.index for p in second] == [4, 4, 4, 4]  # 4 has not rested yet: the next prompts are it
    assert not stream.dry and stream.skipped["solved"] >= 4
    visit(second)
    assert stream.next_batch(4) == [] and stream.dry


def test_a_pool_that_rests_everything_jumps_to_the_first_revisit():
    stream = PromptStream(prompts(3), seed=0, shuffle=False, pool=pool(3, skip_hopeless_after=1, revisit_every=5))
    batch = stream.next_batch(3)
    rewards = torch.zeros(3, 2)
    stream.record(batch, rewards, torch.ones_like(rewards, dtype=torch.bool), rewards > 0.5)
    again = stream.next_batch(3)
    assert [p.index for p in again] == [0, 1, 2] and stream.epoch == 5


def test_an_empty_pool_config_hands_out_exactly_the_plain_streams_batches():
    plain = PromptStream(prompts(7), seed=3)
    pooled = PromptStream(prompts(7), seed=3, pool=pool(7))
    for size in (3, 5, 2, 7, 4, 1):
        assert [p.index for p in pooled.next_batch(size)] == [p.index for p in plain.next_batch(size)]
        assert (pooled.epoch, pooled.position) == (plain.epoch, plain.position)


def expected_value(rates: list[float], counts: tuple[int, ...]) -> float:
    """The allocation's objective, written out: Σ (1 − p)(1 − (1 − p)^n)."""
    return sum((1 - p) * (1 - (1 - p) ** n) for p, n in zip(rates, counts, strict=True))


@pytest.mark.parametrize("history", [
    [(8, 8), (0, 8), (4, 8), None],  # (passes, responses) at the last visit; None: never seen
    [(1, 8), (1, 2), (7, 8), (0, 2)],
    [None, None, (2, 4), (3, 4)],
])  # fmt: skip
def test_by_pass_rate_maximises_its_stated_objective_over_every_allocation(history):
    p = pool(4)
    for prompt, last in enumerate(history):
        if last is not None:
            passes, responses = last
            p.record(prompt, Visit([1.0] * passes + [0.0] * (responses - passes), 0))
    rates = [(last[0] + 0.5) / (last[1] + 1) if last else 0.5 for last in history]
    assert [p.pass_rate(i) for i in range(4)] == pytest.approx(rates)
    budget, least, most = 16, 1, 8
    counts = p.allocate(list(range(4)), budget, least, most)
    assert sum(counts) == budget and all(least <= n <= most for n in counts)
    best = max(
        expected_value(rates, c) for c in itertools.product(range(least, most + 1), repeat=4) if sum(c) == budget
    )
    assert expected_value(rates, tuple(counts)) == pytest.approx(best, abs=1e-12)


def test_allocation_stops_at_the_most_per_prompt():
    assert pool(2).allocate([0, 1], budget=20, least=2, most=6) == [6, 6]


def test_the_pool_state_round_trips_and_refuses_a_state_of_another_size():
    p = pool(3, skip_solved_after=1)
    p.visiting(1, 4)
    p.record(1, Visit([1.0, 1.0], 1))
    q = pool(3, skip_solved_after=1)
    q.load_state_dict(p.state_dict())
    assert q.counters == p.counters and q.resting(1, 9) == "solved"
    with pytest.raises(ValueError, match="does not fit 4 prompts"):
        pool(4).load_state_dict(p.state_dict())


def test_visits_of_reads_only_the_valid_cells():
    rewards = torch.tensor([[1.0, float("nan"), 0.0], [0.5, 0.5, float("nan")]])
    valid = torch.isfinite(rewards)
    kept = torch.tensor([[True, False, False], [False, False, False]])
    assert visits_of(rewards, valid, kept) == [Visit([1.0, 0.0], 1), Visit([0.5, 0.5], 0)]


def test_an_unseen_prompt_takes_its_groups_pass_rate_and_the_budget_follows():
    """Prompts 0-1 are level "easy", 2-3 "hard"; 0 passed 7 of 8, 2 passed 1 of 8. Unseen 1 and 3
    start from their level's history, so 3 (likely failed, a pass is news) gets more than 1."""
    p = PromptPool(PromptPoolConfig(), 4, groups=["easy", "easy", "hard", "hard"])
    p.record(0, Visit([1.0] * 7 + [0.0], 1))
    p.record(2, Visit([1.0] + [0.0] * 7, 1))
    assert p.pass_rate(1) == pytest.approx(7.5 / 9) and p.pass_rate(3) == pytest.approx(1.5 / 9)
    assert PromptPool(PromptPoolConfig(), 4).pass_rate(1) == 0.5  # no groups: ½
    few, many = p.allocate([1, 3], budget=8, least=2, most=6)
    assert few < many and few + many == 8
