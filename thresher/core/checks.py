"""What every plugin returns is checked where it is used: a plugin's mistake becomes one line that
names the plugin and what was wrong, never a traceback or, worse, a silently wrong result (a
selector's ``[P, 1]`` mask once kept all 64 of 64 rollouts)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from thresher.core.errors import PluginError, ScorerError
from thresher.core.types import Loss, Rollout


def check_generated(rollouts: list[Rollout], prompts: int, n: int, name: str = "generator") -> None:
    if len(rollouts) != prompts * n:
        raise PluginError(f"generator {name!r} returned {len(rollouts)} rollouts for {prompts} prompts × N={n}")
    for i, r in enumerate(rollouts):
        if (r.group, r.sample) != (i // n, i % n):
            raise PluginError(
                f"generator {name!r} returned rollouts out of order at {i}: (group, sample) = "
                f"({r.group}, {r.sample}), expected ({i // n}, {i % n})"
            )


def as_rewards(value: Any, expected: int, name: str = "scorer") -> torch.Tensor:
    """A scorer's output as float32 rewards on the CPU, one per response."""
    rewards = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
    if rewards.numel() != expected:
        raise ScorerError(f"scorer {name!r} returned {rewards.numel()} rewards for {expected} responses")
    return rewards


def call_selector(
    selector: Any, rewards: torch.Tensor, valid: torch.Tensor, rollouts: list[Rollout] | None, name: str
) -> torch.Tensor:
    """The selector's mask, checked: a bool-like tensor of the rewards' shape [P, N]. Selectors that
    declare a ``rollouts`` parameter get the rollouts too, grouped by prompt ([P][N])."""
    kwargs: dict[str, Any] = {}
    if rollouts is not None and "rollouts" in inspect.signature(selector.select).parameters:
        n = rewards.shape[1]
        kwargs["rollouts"] = [rollouts[i : i + n] for i in range(0, len(rollouts), n)]
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
