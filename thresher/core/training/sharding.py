"""How the trained policy is held across ranks: whole on every rank, or sharded with FSDP.

``optim.strategy: ddp`` (the default) keeps the whole model on every rank and sums gradients
explicitly (see ``Trainer``). ``optim.strategy: fsdp`` shards parameters, gradients and AdamW state
over the ranks with torch's FSDP2 (``fully_shard``): each decoder block is one unit, the rest (the
embeddings, tied LM head, final norm) the root unit.

Everything but the update works on a plain, unsharded copy of the weights (``full_model``):
generation, validation, checkpoints and the final model. Generation under FSDP would have to run the
same number of forward passes on every rank (each pass gathers parameters collectively), which
sampling with early stopping cannot promise; a full copy needs no communication while generating. It
is refreshed once per step, after the update (one all-gather of the weights), which is also what an
engine such as vLLM needs. The price is one more copy of the weights per rank, on top of the shards
of weights, gradients and AdamW moments, which is where FSDP saves memory.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from thresher.core.training.distributed import Distributed

Strategy = Literal["ddp", "fsdp"]


class PolicyHolder:
    """The policy as the trainer updates it (``train_model``) and as everything else reads it
    (``full_model``). Without FSDP both are the same module and every method is free."""

    def __init__(self, model: torch.nn.Module, dist: Distributed, strategy: Strategy, master_weights: bool = False):
        self.sharded = strategy == "fsdp" and dist.enabled
        self.full_model = model
        self.train_model = model
        if self.sharded:
            self.train_model = copy.deepcopy(model)
            compute_dtype = next(model.parameters()).dtype
            if master_weights and compute_dtype != torch.float32:
                # The sharded copy is the fp32 master; FSDP casts each unit's gathered weights to the
                # policy's 16-bit dtype for the forward/backward and reduces gradients in fp32.
                self.train_model.float()
            shard(self.train_model, compute_dtype)

    def sync_full(self) -> None:
        """Copy the trained weights into ``full_model`` (a collective: every rank must call it)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.train_model, options=StateDictOptions(full_state_dict=True))
            self.full_model.load_state_dict(full)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained (sharded) model's whole state dict, at its precision (fp32 masters when the
        policy is 16-bit), on the CPU of every rank (a collective: every rank must call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = get_model_state_dict(self.train_model, options=options)
        return state

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Set both views of the policy to ``state`` (every rank passes the same full state dict)."""
        self.full_model.load_state_dict(state)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full: dict[str, Any] = dict(state)
            set_model_state_dict(self.train_model, full, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state, gathered under FSDP (a collective: every rank must call it)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.train_model, optimizer, options=options)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.train_model, optimizer, state, options=options)


def shard(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2-wrap ``model`` in place: one unit per decoder block (the classes transformers lists as
    ``_no_split_modules``), then the root. Gradients are summed over ranks, not averaged: the loss
    is already normalized by the global batch. Parameters stored in fp32 are computed with in
    ``compute_dtype`` (FSDP's mixed precision), gradients reduced in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    stored = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    options: dict[str, Any] = {"mp_policy": policy} if compute_dtype != stored else {}
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
