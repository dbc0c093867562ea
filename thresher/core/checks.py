"""What every plugin returns is checked where it is used: a plugin's mistake becomes one line that
names the plugin and what was wrong, never a traceback or, worse, a silently wrong result (a
selector's ``[P, 1]`` mask once kept all 64 of 64 rollouts)."""

from __future__ import annotations

from typing import Any

import torch

from thresher.core.errors import PluginError, ScorerError
from thresher.core.types import Loss, PartRewards, Rollout, Selector, reads_rollouts


def check_generated(rollouts: list[Rollout], prompts: int, n: int, name: str = "generator") -> None:
    if len(rollouts) != prompts * n:
        raise PluginError(f"generator {name!r} returned {len(rollouts)} rollouts for {prompts} prompts × N={n}")
    for i, r in enumerate(rollouts):
        if (r.group, r.sample) != (i // n, i % n):
            raise PluginError(
                f"generator {name!r} returned rollouts out of order at {i}: (group, sample) = "
                f"({r.group}, {r.sample}), expected ({i // n}, {i % n})"
            )


def as_scored(results: list[Any], expected: int, name: str = "scorer") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A scorer's results over a step's chunks (tensors, or :class:`PartRewards`) as one reward
    vector and each part's vector (no parts: an empty dict)."""
    totals = [r.total if isinstance(r, PartRewards) else r for r in results]
    flat = as_rewards(torch.cat([torch.as_tensor(t, dtype=torch.float32).flatten() for t in totals]), expected, name)
    named = [r.parts for r in results if isinstance(r, PartRewards)]
    if not named:
        return flat, {}
    if len(named) != len(results) or any(list(p) != list(named[0]) for p in named):
        raise PluginError(f"scorer {name!r} returned different parts for different chunks of one step")
    parts = {
        key: torch.cat([torch.as_tensor(p[key], dtype=torch.float32).flatten() for p in named]) for key in named[0]
    }
    for key, values in parts.items():
        as_rewards(values, expected, f"{name}.{key}")
    return flat, parts


def as_rewards(value: Any, expected: int, name: str = "scorer") -> torch.Tensor:
    """A scorer's output as float32 rewards on the CPU, one per response."""
    rewards = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
    if rewards.numel() != expected:
        raise ScorerError(f"scorer {name!r} returned {rewards.numel()} rewards for {expected} responses")
    return rewards


def call_selector(
    selector: Selector, rewards: torch.Tensor, valid: torch.Tensor, rollouts: list[Rollout] | None, name: str
) -> torch.Tensor:
    """The selector's mask, checked: a bool-like tensor of the rewards' shape [P, N]. Selectors that
    declare a ``rollouts`` parameter get the rollouts too, grouped by prompt (``[P][s]``: a prompt
    sampled until accepted may have fewer than N, its missing cells invalid)."""
    kwargs: dict[str, Any] = {}
    if rollouts is not None and reads_rollouts(selector):
        grouped: list[list[Rollout]] = [[] for _ in range(rewards.shape[0])]
        for r in rollouts:  # by prompt, in sample order (prompts sampled until accepted have fewer)
            grouped[r.group].append(r)
        kwargs["rollouts"] = grouped
    mask = selector.select(rewards, valid, **kwargs)
    if not isinstance(mask, torch.Tensor):
        raise PluginError(
            f"selector {name!r} returned {type(mask).__name__}; expected a bool tensor of shape {list(rewards.shape)}"
        )
    if tuple(mask.shape) != tuple(rewards.shape):
        raise PluginError(
            f"selector {name!r} returned a mask of shape {list(mask.shape)} for rewards of shape "
            f"{list(rewards.shape)} (prompts × N); it must mark every rollout"
        )
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise PluginError(f"selector {name!r} returned a {mask.dtype} mask; expected torch.bool")
    return mask.to(torch.bool)


def check_loss_result(result: Any, loss_fn: Loss) -> tuple[torch.Tensor, dict[str, float]]:
    """A loss plugin returns ``(scalar tensor, {name: number})``; anything else is its mistake, in one line."""
    name = getattr(loss_fn, "name", type(loss_fn).__name__)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise PluginError(f"loss {name!r} returned {type(result).__name__}; expected (loss tensor, metrics dict)")
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise PluginError(f"loss {name!r} returned {got} as its loss; expected a scalar tensor")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float, torch.Tensor)) for v in metrics.values()):
        raise PluginError(f"loss {name!r} returned metrics that are not a dict of numbers: {metrics!r}")
    return loss, {str(k): float(v) for k, v in metrics.items()}
