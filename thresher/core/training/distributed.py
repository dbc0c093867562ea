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

import math
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


# Elements per fp64 copy while summing squares: bounds the temporary (128 MiB) for huge gradients.
_NORM_CHUNK = 1 << 24


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm``; return the norm before.

    This replaces ``torch.nn.utils.clip_grad_norm_`` because that one's fp32 norm depends on how the
    sum of squares is split: whole gradients (one process, DDP) are summed one way, FSDP's shards
    another (partial norms per rank, all-reduced), and the number of threads changes the split again.
    The norms then differ in their last bit, so does the clip coefficient, so do the fp32 masters
    after AdamW; under a bf16 policy an ulp of a master now and then rounds the weight to the
    neighbouring bf16 value (a 0.4% change), and the runs drift apart (issue #21). Here squares are
    summed in fp64 — an fp32 square is exact there and the sum's error (~1e-16) is ~9 orders below
    fp32's step — and the coefficient is rounded to fp32 once, so every split of the sum gives the
    same coefficient and the same clipped gradients, bit for bit.

    Under FSDP (gradients that are DTensors sharded over a 1-D mesh) each rank sums its own shard and
    one all-reduce adds the parts, so every rank must call this (the trainer does, every update).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    whole = torch.zeros((), dtype=torch.float64, device=_local(grads[0]).device)
    partial: dict[Any, torch.Tensor] = {}  # process group → this rank's share of the sum (in order)
    for grad in grads:
        if isinstance(grad, DTensor):
            if grad.device_mesh.ndim == 1 and grad.placements[0].is_shard():
                group = grad.device_mesh.get_group()
                local = grad.to_local()
                partial[group] = partial.get(group, torch.zeros_like(whole)) + _sum_of_squares(local)
                continue
            grad = grad.full_tensor()  # replicated or multi-dimensional: every rank holds it whole
        whole += _sum_of_squares(grad)
    for group, share in partial.items():
        dist.all_reduce(share, op=dist.ReduceOp.SUM, group=group)
        whole += share
    norm = float(whole.sqrt())
    coefficient = float(torch.tensor(max_norm / (norm + 1e-6), dtype=torch.float32))
    if math.isfinite(norm) and coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return norm


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    """Σ x² in fp64 (see :func:`clip_grad_norm` for why not fp32)."""
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for chunk in tensor.detach().reshape(-1).split(_NORM_CHUNK):
        wide = chunk.double()
        total += torch.dot(wide, wide)
    return total


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
