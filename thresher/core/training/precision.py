"""Mixed precision done right: a 16-bit policy, updated through fp32 master weights.

With ``model.dtype: bfloat16`` the policy's weights are bf16, so generation and the
forward/backward run at 16-bit speed and memory. AdamW must not update those weights directly: an
update of lr × ~1 (1e-5) on a weight of ~0.02 is far below bf16's resolution (8 bits of mantissa,
a step of ~1e-4 there) and rounds to nothing — the run trains, the loss does not move, no error.

So the optimizer owns an fp32 copy of every trainable 16-bit parameter (the *master* weights) and
keeps its moments in fp32. Each backward adds the 16-bit gradient into the master's fp32 gradient
as soon as it is accumulated (a post-accumulate-grad hook) and frees the 16-bit one, so gradients
summed over micro-batches are summed in fp32 too. After ``optimizer.step()`` the 16-bit weights are
rounded from the masters (:meth:`MasterWeights.copy_to_model`): what the generator samples from is
the master, rounded once, never the sum of rounded updates.

Parameters that are already fp32 (LoRA adapters in a bf16 model, say) are their own masters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
MasterMode = Literal["auto", "fp32", "none"]

NO_MASTER_WARNING = (
    "optim.master_weights=none with a {dtype} policy: AdamW updates the {dtype} weights directly, and "
    "updates smaller than the weights' rounding step (lr 1e-5 on weights ~0.02 in bf16) are lost"
)


def wants_master_weights(mode: MasterMode, dtype: torch.dtype) -> bool:
    """``auto``: fp32 masters exactly when the policy is 16-bit; ``fp32`` forces them; ``none`` never."""
    if mode == "none":
        return False
    return mode == "fp32" or dtype in HALF_DTYPES


class MasterWeights:
    """fp32 master copies of a model's 16-bit trainable parameters; the optimizer updates these.

    ``params`` are the parameters the optimizer should see, in the model's parameter order: the
    fp32 master for each 16-bit parameter, the parameter itself for an fp32 one.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]):
        self.names: list[str] = []
        self.model_params: list[torch.nn.Parameter] = []
        self.params: list[torch.nn.Parameter] = []
        self._hooks = []
        for name, param in named_parameters:
            if not param.requires_grad:
                continue
            self.names.append(name)
            self.model_params.append(param)
            if param.dtype in HALF_DTYPES:
                master = torch.nn.Parameter(param.detach().to(torch.float32, copy=True))
                self._hooks.append(param.register_post_accumulate_grad_hook(_accumulate_into(master)))
                self.params.append(master)
            else:
                self.params.append(param)

    @property
    def count(self) -> int:
        """How many parameters have a separate fp32 master (0: nothing is 16-bit)."""
        return sum(m is not p for m, p in zip(self.params, self.model_params, strict=True))

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the updated masters into the model's 16-bit parameters."""
        for master, param in zip(self.params, self.model_params, strict=True):
            if master is not param:
                param.copy_(master)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set the masters to the model's current weights (after the model was reset to a base)."""
        for master, param in zip(self.params, self.model_params, strict=True):
            if master is not param:
                master.copy_(param)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set masters (and the model's copies) from a checkpoint's fp32 weights, by parameter name."""
        for name, master, param in zip(self.names, self.params, self.model_params, strict=True):
            if master is not param and name in state:
                master.copy_(state[name].to(master.device))
                param.copy_(master)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every 16-bit trainable weight replaced by its fp32 master.

        Tied weights (an LM head sharing the embedding) appear under several names in the state dict
        but are one parameter: each name gets the master.
        """
        by_storage = {
            p.untyped_storage().data_ptr(): m for m, p in zip(self.params, self.model_params, strict=True) if m is not p
        }
        return {
            name: by_storage.get(tensor.untyped_storage().data_ptr(), tensor).detach()
            for name, tensor in model.state_dict().items()
        }


def _accumulate_into(master: torch.nn.Parameter):
    """A hook that moves a 16-bit parameter's fresh gradient into ``master.grad`` (fp32), then frees it."""

    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if master.grad is None:
            master.grad = grad.to(torch.float32)
        else:
            master.grad.add_(grad)
        param.grad = None

    return hook


def check_trainable_precision(dtype: str, master_mode: MasterMode) -> str | None:
    """Refuse what would train wrongly; return a warning for what trains at the user's risk."""
    from thresher.core.errors import ConfigError

    if dtype == "float16":
        raise ConfigError(
            [
                "model.dtype: float16 training needs loss scaling, which Thresher does not do (fp16 gradients "
                "underflow); use bfloat16 (same memory, float32's range) or float32"
            ]
        )
    if dtype == "bfloat16" and master_mode == "none":
        return NO_MASTER_WARNING.format(dtype=dtype)
    return None
