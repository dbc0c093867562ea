"""Running under ``torchrun``: which rank this is, and the few collectives the engine needs.

Each rank generates and scores a disjoint, contiguous shard of the step's prompts. The rollouts and
rewards are then gathered on every rank, so selection, statistics and the training set are exactly
those a single process would compute, including selectors that need the whole step's rewards.
Training splits every optimizer batch across ranks and sums the gradients with one all-reduce; the
loss is normalized by the batch's global counts, so K ranks make the same update as one process.
(torch's DDP wrapper needs the same number of backward passes on every rank; rejection sampling keeps
a different number of responses on each, so gradients are all-reduced explicitly instead.)

Rank 0 alone writes metrics, rollouts, checkpoints and the final model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Distributed:
    """This process's place in the job; a single process is rank 0 of 1 (every call a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_bounds(self, count: int) -> tuple[int, int]:
        """This rank's contiguous slice of ``count`` items (sizes differ by at most one)."""
        return count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over ranks (one flattened all-reduce)."""
        if not self.enabled:
            return
        grads = []
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(timeout_s: float) -> Distributed:
    """Join the job torchrun started (WORLD_SIZE > 1), or return the single-process default.

    gloo on CPU, NCCL when each rank has a GPU. ``timeout_s`` bounds every collective: a rank that
    hangs (rather than dies, which torchrun notices at once) fails the others after that long.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)
