"""Exact semantics of the built-in selectors on hand-made reward tables."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from thresher.selectors.threshold import ThresholdSelector
from thresher.selectors.topk import TopKSelector


def topk(k: int, min_reward: float | None = None) -> TopKSelector:
    return TopKSelector(TopKSelector.Config(top_n_rollouts=k, min_reward=min_reward))


def mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_topk_keeps_the_k_best_per_prompt():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.7], [3.0, -1.0, 2.0, 0.0]])
    kept = topk(2).select(rewards, torch.ones_like(rewards, dtype=torch.bool))
    assert kept.tolist() == mask([[0, 1, 0, 1], [1, 0, 1, 0]]).tolist()


def test_topk_ties_break_to_the_lower_rollout_index():
    rewards = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    assert topk(1).select(rewards, valid).tolist() == mask([[0, 1, 0, 0, 0]]).tolist()
    assert topk(2).select(rewards, valid).tolist() == mask([[0, 1, 1, 0, 0]]).tolist()
    all_equal = torch.zeros(1, 4)
    assert topk(3).select(all_equal, torch.ones(1, 4, dtype=torch.bool)).tolist() == mask([[1, 1, 1, 0]]).tolist()


def test_topk_with_k_larger_than_n_keeps_every_valid_rollout():
    rewards = torch.tensor([[0.3, 0.2, 0.1]])
    valid = mask([[1, 0, 1]])
    assert topk(10).select(rewards, valid).tolist() == mask([[1, 0, 1]]).tolist()


def test_topk_groups_by_prompt_position_not_by_content():
    # two identical prompts (same rewards) are two groups: each keeps its own best
    rewards = torch.tensor([[0.2, 0.8], [0.2, 0.8]])
    kept = topk(1).select(rewards, torch.ones_like(rewards, dtype=torch.bool))
    assert kept.tolist() == mask([[0, 1], [0, 1]]).tolist()


def test_topk_never_keeps_invalid_and_respects_min_reward():
    rewards = torch.tensor([[5.0, 1.0, 0.2], [0.1, 0.4, 0.3]])
    valid = mask([[0, 1, 1], [1, 1, 1]])
    kept = topk(1, min_reward=0.5).select(rewards, valid)
    # row 0: the 5.0 is invalid, best valid is 1.0 (>= 0.5); row 1: best is 0.4 < 0.5 → nothing
    assert kept.tolist() == mask([[0, 1, 0], [0, 0, 0]]).tolist()


def test_threshold_keeps_everything_at_or_above_the_bar():
    rewards = torch.tensor([[1.0, 0.99, 1.5], [0.0, 1.0, 1.0]])
    selector = ThresholdSelector(ThresholdSelector.Config(threshold=1.0))
    kept = selector.select(rewards, torch.ones_like(rewards, dtype=torch.bool))
    assert kept.tolist() == mask([[1, 0, 1], [0, 1, 1]]).tolist()


def test_threshold_cap_keeps_the_best_with_deterministic_ties():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    valid[1, 0] = False
    selector = ThresholdSelector(ThresholdSelector.Config(threshold=1.0, max_per_prompt=2))
    kept = selector.select(rewards, valid)
    assert kept.tolist() == mask([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]]).tolist()


def test_all_rejected_gives_an_empty_mask():
    rewards = torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    selector = ThresholdSelector(ThresholdSelector.Config(threshold=0.5))
    assert not selector.select(rewards, torch.ones_like(rewards, dtype=torch.bool)).any()


def test_selector_configs_reject_nonsense():
    with pytest.raises(ValidationError, match="top_n_rollouts"):
        TopKSelector.Config(top_n_rollouts=0)
    with pytest.raises(ValidationError, match="max_per_prompt"):
        ThresholdSelector.Config(threshold=1.0, max_per_prompt=0)
