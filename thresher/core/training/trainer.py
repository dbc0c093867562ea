"""The policy update: kept (prompt, response) pairs → micro-batches → AdamW steps.

Two things here are easy to get wrong and are pinned by tests:

- log-probs are computed for response positions only: the decoder runs once, then the LM head and
  the softmax run on the hidden states that predict response tokens, never on the whole
  (sequence × vocabulary) grid;
- the loss of an optimizer step is normalized by that step's global sequence/token count, so
  gradients accumulated over micro-batches equal the full-batch gradient whatever the micro-batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import get_scheduler

from thresher.core.checks import check_loss_result
from thresher.core.config import OptimConfig
from thresher.core.errors import ConfigError, ThresherError
from thresher.core.faults import failpoint
from thresher.core.model import CausalLM
from thresher.core.training.distributed import Distributed, clip_grad_norm
from thresher.core.training.precision import MasterWeights, wants_master_weights
from thresher.core.training.sharding import is_sharded
from thresher.core.types import Loss, loss_inputs

# Configs that change logits after the LM head; response-only projection would skip that step.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


class TrainingDiverged(ThresherError):
    """Too many consecutive updates with a NaN/inf loss or gradient."""

    exit_code = 5


@dataclass(frozen=True)
class TrainSequence:
    """One rollout as training data: the prompt's tokens and the response's tokens, and what a loss
    may ask for (see :class:`~thresher.core.types.Loss`): the response's log-probs under the policy
    that generated it (None: recomputed before the step's first update), its reward, whether the
    selector kept it, its group (prompt) and that group's reward mean and standard deviation."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    old_logprobs: tuple[float, ...] | None = None
    reward: float = math.nan
    kept: bool = True
    group: int = 0
    group_reward_mean: float = math.nan
    group_reward_std: float = math.nan

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def collate(sequences: list[TrainSequence], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-pad into ``(input_ids, attention_mask, response_mask)``; the mask marks response tokens."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids = seq.prompt_ids + seq.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, len(seq.prompt_ids) : len(ids)] = True
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def loss_input_tensors(
    sequences: list[TrainSequence], wanted: frozenset[str], width: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The optional loss inputs ``wanted`` (see :data:`~thresher.core.types.LOSS_INPUTS`) for a
    micro-batch collated to ``width``: ``old_logprobs`` [B, width] at the response positions (zero
    elsewhere, like the current log-probs), the rest one value per sequence [B]."""
    out: dict[str, torch.Tensor] = {}
    if "old_logprobs" in wanted:
        old = torch.zeros((len(sequences), width), dtype=torch.float32)
        for row, seq in enumerate(sequences):
            if seq.old_logprobs is None or len(seq.old_logprobs) != len(seq.response_ids):
                raise ValueError("a training sequence has no generation-time log-probs for its response")
            start = len(seq.prompt_ids)
            old[row, start : start + len(seq.response_ids)] = torch.tensor(seq.old_logprobs, dtype=torch.float32)
        out["old_logprobs"] = old.to(device)
    per_sequence = {
        "rewards": ([s.reward for s in sequences], torch.float32),
        "kept": ([s.kept for s in sequences], torch.bool),
        "groups": ([s.group for s in sequences], torch.long),
        "group_reward_mean": ([s.group_reward_mean for s in sequences], torch.float32),
        "group_reward_std": ([s.group_reward_std for s in sequences], torch.float32),
    }
    for name, (values, dtype) in per_sequence.items():
        if name in wanted:
            out[name] = torch.tensor(values, dtype=dtype, device=device)
    return out


def response_logprobs(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    entropy_sink: list[float] | None = None,
) -> torch.Tensor:
    """log π(token_t | tokens_<t) at every response position (zero elsewhere), shape [B, L].

    The first token of a sequence cannot be a response token (nothing predicts it), so a response
    mask must start at position 1 or later. ``entropy_sink`` gets ``[sum, count]`` of the policy's
    entropy over the response positions (no gradient): the figure whose collapse signals a policy
    that stopped exploring.
    """
    if bool(response_mask[:, 0].any()):
        raise ValueError("a response token at position 0 has no context to be predicted from")
    rows, cols = response_mask.nonzero(as_tuple=True)
    targets = input_ids[rows, cols]
    if _can_project_selectively(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[rows, cols - 1])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, cols - 1]
    picked = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    if entropy_sink is not None:
        entropy_sink.extend([token_entropy_sum(logits.detach()), float(len(rows))])
    out = torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device)
    return out.index_put((rows, cols), picked)


@torch.no_grad()
def token_entropy_sum(logits: torch.Tensor, chunk: int = 128) -> float:
    """Σ over rows of the entropy of softmax(row), in chunks of rows so the temporaries stay small."""
    total = 0.0
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk].float()
        logp = part.log_softmax(dim=-1)
        total += float(-(logp.exp() * logp).sum())
    return total


def _can_project_selectively(model: CausalLM) -> bool:
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_POSTPROCESSING):
        return False
    if is_sharded(model):  # FSDP gathers the root's weights (the LM head) only in the root's own forward
        return False
    base = getattr(model, "base_model", None)
    return base is not None and base is not model and model.get_output_embeddings() is not None


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine_with_min_lr"}


def warmup_steps(config: OptimConfig, max_steps: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of the run's steps rounded up (as transformers' Trainer)."""
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * max_steps)
    return config.warmup_steps


def lr_multiplier(config: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The schedule as a pure function of the 0-based update index, taken from
    ``transformers.get_scheduler`` (built once on a probe optimizer). Pure, so a resumed run needs no
    scheduler state: the step is the state."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    options = {"min_lr_rate": config.min_lr_ratio} if config.schedule == "cosine" else None
    scheduler = get_scheduler(
        SCHEDULERS[config.schedule],
        probe,
        num_warmup_steps=warmup_steps(config, max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=options,
    )
    return scheduler.lr_lambdas[0]


def learning_rate(config: OptimConfig, step: int, max_steps: int) -> float:
    """LR for global step ``step`` (counted from 1, like every step in Thresher). As in transformers'
    Trainer, step ``k`` takes the schedule's value at ``k - 1``: with a warm-up the first step's LR
    is 0, and the last warm-up step's is ``lr · (W-1)/W``."""
    return config.lr * lr_multiplier(config, max_steps)(step - 1)


def build_adamw(parameters: list[torch.nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the kernel ``config.adamw_impl`` names.

    ``auto`` takes the fused kernel where torch has one for these parameters (CPU and CUDA floats):
    torch's default (foreach) materializes full-size temporaries, which set the training pass's peak
    memory for small batches, and is several times slower on CPU (measured in README, Performance).
    """
    options: dict[str, Any] = {
        "lr": config.lr,
        "betas": config.betas,
        "eps": config.eps,
        "weight_decay": config.weight_decay,
    }
    impl = config.adamw_impl
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(parameters, fused=True, **options)
        except (RuntimeError, ValueError) as err:  # a device or dtype without a fused kernel
            if impl == "fused":
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ConfigError([f"optim.adamw_impl: fused AdamW is not available here: {reason}"]) from None
    return torch.optim.AdamW(parameters, foreach=impl != "loop", **options)


class Trainer:
    """Owns the optimizer; ``train_step`` runs one global step's update on the kept sequences."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Loss,
        config: OptimConfig,
        *,
        max_steps: int,
        pad_id: int,
        device: torch.device,
        seed: int = 0,
        interrupt_check: Callable[[], None] = lambda: None,
        dist: Distributed | None = None,
        on_micro_batch: Callable[[], None] | None = None,
    ):
        if config.micro_batch_size == "auto":
            raise ValueError("Trainer needs a micro-batch size: the memory plan resolves optim.micro_batch_size auto")
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.micro_batch_size: int = config.micro_batch_size
        self.max_steps = max_steps
        self.pad_id = pad_id
        self.device = device
        self.seed = seed
        dtype = next(model.parameters()).dtype
        # A 16-bit policy is updated through fp32 masters (see training.precision); under FSDP the
        # sharded copy is already fp32 (the holder's mixed-precision policy), so nothing is copied.
        self.master = (
            MasterWeights(model.named_parameters()) if wants_master_weights(config.master_weights, dtype) else None
        )
        self.params = self.master.params if self.master else [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self.params, config)
        self.lr_multiplier = lr_multiplier(config, max_steps)  # see learning_rate
        self.wanted = loss_inputs(loss_fn)  # the optional inputs the loss declares
        self.interrupt_check = interrupt_check
        self.on_micro_batch = on_micro_batch  # progress: called after each of this rank's micro-batches
        self.dist = dist or Distributed()
        self.nonfinite_in_a_row = 0
        self.loss_metrics: dict[str, list[float]] = {}
        self.policy_metrics: dict[str, list[float]] = {}
        self.sharded = is_sharded(model)

    def reset_optimizer(self) -> None:
        """Forget AdamW's moments and take the model's current weights as the masters (training
        restarts from the base model, just loaded into it)."""
        self.optimizer.state.clear()
        if self.master is not None:
            self.master.copy_from_model()

    def weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict at training precision: fp32 masters where the model is 16-bit."""
        return self.master.state_dict(self.model) if self.master is not None else self.model.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Take the masters from a checkpoint's (fp32) weights; the model was loaded from it already."""
        if self.master is not None:
            self.master.load(state)

    def train_step(self, step: int, sequences: list[TrainSequence], abandonable: bool = True) -> dict[str, float]:
        """Update the policy on one global step's kept sequences (``step`` counts from 1)."""
        if step < 1:
            raise ValueError(f"train_step: global steps count from 1, got {step}")
        self.step_number = step
        lr = self.config.lr * self.lr_multiplier(step - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        start = time.perf_counter()
        losses: list[float] = []
        norms: list[float] = []
        skipped, tokens, all_tokens = 0, 0, 0
        self.loss_metrics, self.policy_metrics = {}, {}
        missing = sum(s.old_logprobs is None for s in sequences) if "old_logprobs" in self.wanted else 0
        if missing:
            sequences = self._with_old_logprobs(sequences)
        for epoch in range(self.config.epochs_per_step):
            for batch in self._optimizer_batches(sequences, step, epoch):
                # An interrupt abandons the step only while the weights are still those of the last
                # step; once an update is applied, the step finishes so a checkpoint can describe it.
                first = not losses and not skipped
                loss, grad_norm, batch_tokens = self._update(batch, abandonable=abandonable and first, first=first)
                tokens += batch_tokens
                all_tokens += sum(len(s) for s in batch)
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    losses.append(loss)
                    norms.append(grad_norm)
                    self.nonfinite_in_a_row = 0
                else:
                    skipped += 1
                    self.nonfinite_in_a_row += 1
                    if self.nonfinite_in_a_row >= self.config.max_nonfinite_updates:
                        raise TrainingDiverged(
                            f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
                            f"(optim.max_nonfinite_updates={self.config.max_nonfinite_updates}); the weights are "
                            "those before them — lower optim.lr or check the loss"
                        )
        elapsed = time.perf_counter() - start
        return {
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
            "lr": lr,
            "updates": len(losses),
            "nonfinite_updates_skipped": skipped,
            "train_tokens": tokens,
            "train_sequence_tokens": all_tokens,
            "time_train": elapsed,
            "tokens_per_s_train": tokens / elapsed if elapsed > 0 else 0.0,
            "old_logprobs_recomputed": missing,
            **self._policy_metrics(),
            **self._loss_metrics(),
        }

    @torch.no_grad()
    def _with_old_logprobs(self, sequences: list[TrainSequence]) -> list[TrainSequence]:
        """Sequences from a generator that records no log-probs get them from the policy now, before
        the step's first update: the policy that generated them. Every rank computes all of them in
        the same micro-batches (FSDP needs the same forwards on every rank)."""
        missing = [i for i, s in enumerate(sequences) if s.old_logprobs is None]
        out = list(sequences)
        micro = self.micro_batch_size
        for start in range(0, len(missing), micro):
            chunk = [sequences[i] for i in missing[start : start + micro]]
            input_ids, attention_mask, response_mask = collate(chunk, self.pad_id, self.device)
            logprobs = response_logprobs(self.model, input_ids, attention_mask, response_mask).cpu()
            for row, index in enumerate(missing[start : start + micro]):
                seq, begin = chunk[row], len(chunk[row].prompt_ids)
                values = tuple(logprobs[row, begin : begin + len(seq.response_ids)].tolist())
                out[index] = replace(seq, old_logprobs=values)
        return out

    def micro_batch_count(self, num_sequences: int) -> int:
        """How many micro-batches this rank runs for a step of ``num_sequences`` (a progress total)."""
        size = min(self.config.batch_size or num_sequences, num_sequences) or 1
        batches = [min(size, num_sequences - i) for i in range(0, num_sequences, size)]
        shares = [len(range(self.dist.rank, n, self.dist.world_size)) for n in batches]
        per_epoch = sum(-(-share // self.micro_batch_size) for share in shares)
        return per_epoch * self.config.epochs_per_step

    def _loss_metrics(self) -> dict[str, float]:
        """The loss plugin's metrics over every micro-batch of the step (on all ranks): a name ending
        in ``_max`` takes the largest value, ``_min`` the smallest, ``_count`` the sum over one pass
        of the step's sequences (the sum over epochs / ``epochs_per_step``), any other the mean."""
        values = self._gathered(self.loss_metrics)
        out = {f"loss_{key}": combine_metric(key, v) for key, v in values.items() if v}
        for key in out:
            if key.endswith("_count"):
                out[key] /= self.config.epochs_per_step
        return out

    def _policy_metrics(self) -> dict[str, float]:
        """The policy's mean entropy on the trained tokens, and the largest and mean gap between the
        log-probs recorded at generation and the training pass's, before the step's first update."""
        values = {
            key: sum(v) if not key.endswith("_max") else max(v)
            for key, v in self._gathered(self.policy_metrics).items()
            if v
        }
        out: dict[str, float] = {}
        if values.get("entropy_tokens"):
            out["policy_entropy"] = values["entropy_sum"] / values["entropy_tokens"]
        if values.get("gap_tokens"):
            out["generation_logprob_gap_mean"] = values["gap_sum"] / values["gap_tokens"]
            out["generation_logprob_gap_max"] = values["gap_max"]
        return out

    def _gathered(self, sink: dict[str, list[float]]) -> dict[str, list[float]]:
        parts = self.dist.gather(sink)
        keys = sorted({key for part in parts for key in part})
        return {key: [v for part in parts for v in part.get(key, [])] for key in keys}

    def _zero_grad(self) -> None:
        # The model's own (16-bit) gradients too: an error mid-backward can leave some behind.
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def _optimizer_batches(self, sequences: list[TrainSequence], step: int, epoch: int) -> list[list[TrainSequence]]:
        size = self.config.batch_size
        if size is None or size >= len(sequences):
            return [sequences]
        # (step - 1): the shuffle of step 1 is the one runs have always had
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (step - 1) * 101 + epoch)
        order = torch.randperm(len(sequences), generator=generator).tolist()
        shuffled = [sequences[i] for i in order]
        return [shuffled[i : i + size] for i in range(0, len(shuffled), size)]

    def _update(self, batch: list[TrainSequence], abandonable: bool, first: bool = False) -> tuple[float, float, int]:
        """Accumulate the whole batch's gradient over micro-batches, then clip and step once.

        A non-finite loss or gradient skips the step: the weights and AdamW's moments stay as they were.
        """
        self._zero_grad()
        check = self.interrupt_check if abandonable else None
        # Under torchrun every rank holds the whole batch and works on every world_size-th sequence of
        # it (by length, so shards stay balanced); the loss keeps the whole batch's counts, and the
        # gradients are summed over ranks: the update is the one a single process would make.
        counts = {"num_sequences": len(batch), "num_tokens": sum(len(s.response_ids) for s in batch)}
        ordered = sorted(batch, key=len, reverse=True)
        mine = ordered[self.dist.rank :: self.dist.world_size]
        # FSDP gathers parameters in every forward and reduces gradients in every backward, so every
        # rank must run as many micro-batches as the busiest one (extra ones count zero).
        micro = self.micro_batch_size
        passes = max(-(-len(ordered[r :: self.dist.world_size]) // micro) for r in range(self.dist.world_size))
        filler = ordered[0] if self.sharded else None
        try:
            local = accumulate_gradients(
                self.model,
                self.loss_fn,
                mine,
                micro,
                self.pad_id,
                self.device,
                check,
                **counts,
                min_passes=passes if self.sharded else 0,
                filler=filler,
                metrics_sink=self.loss_metrics,
                on_micro_batch=self.on_micro_batch,
                policy_sink=self.policy_metrics,
                measure_gap=first,
            )
        except BaseException:
            self._zero_grad()
            raise
        if not self.sharded:  # FSDP has reduce-scattered (summed) the gradients already
            self.dist.sum_gradients(self.params)
        total = self.dist.sum(local)
        if abandonable:
            self.interrupt_check()
        failpoint("train", self.step_number)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        # Not torch's clip_grad_norm_: its fp32 norm differs in the last bit between FSDP's shards and
        # whole gradients, which a bf16 policy amplifies (see clip_grad_norm).
        grad_norm = clip_grad_norm(self.params, max_norm)
        if math.isfinite(total) and math.isfinite(grad_norm):
            self.optimizer.step()
            if self.master is not None:
                self.master.copy_to_model()
        self._zero_grad()
        return total, grad_norm, sum(len(s.response_ids) for s in batch)


def combine_metric(name: str, values: list[float]) -> float:
    """One step's figure from per-micro-batch values: max for ``*_max``, min for ``*_min``, sum for
    ``*_count``, mean otherwise."""
    if name.endswith("_max"):
        return max(values)
    if name.endswith("_min"):
        return min(values)
    if name.endswith("_count"):
        return sum(values)
    return sum(values) / len(values)


def accumulate_gradients(
    model: torch.nn.Module,
    loss_fn: Loss,
    batch: list[TrainSequence],
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    interrupt_check: Callable[[], None] | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    min_passes: int = 0,
    filler: TrainSequence | None = None,
    metrics_sink: dict[str, list[float]] | None = None,
    on_micro_batch: Callable[[], None] | None = None,
    policy_sink: dict[str, list[float]] | None = None,
    measure_gap: bool = False,
) -> float:
    """Backpropagate the loss of ``batch`` in micro-batches; returns the batch's loss. The loss
    plugin's own metrics of each micro-batch are appended to ``metrics_sink``; the policy's entropy
    on the trained tokens to ``policy_sink`` (and, with ``measure_gap``, before any update of the
    step, how far the generation-time log-probs are from the training pass's).

    Every micro-batch is normalized by the counts of the *whole* batch, so the accumulated
    gradient equals the full-batch gradient for any ``micro_batch_size``. ``min_passes`` pads the
    number of forward/backward passes with ``filler`` weighted zero (FSDP needs equal counts per rank).
    """
    # Normalize by the whole optimizer batch's counts (``batch`` may be this rank's share of it).
    num_sequences = num_sequences if num_sequences is not None else len(batch)
    num_tokens = num_tokens if num_tokens is not None else sum(len(s.response_ids) for s in batch)
    # Length-sorted micro-batches waste less padding; the sum of their losses does not depend on order.
    ordered = sorted(batch, key=len, reverse=True)
    wanted = loss_inputs(loss_fn)
    total = 0.0
    for i in range(0, len(ordered), micro_batch_size):
        if interrupt_check is not None:
            interrupt_check()
        micro = ordered[i : i + micro_batch_size]
        input_ids, attention_mask, response_mask = collate(micro, pad_id, device)
        entropy: list[float] | None = [] if policy_sink is not None else None
        token_logprobs = response_logprobs(model, input_ids, attention_mask, response_mask, entropy)
        inputs = loss_input_tensors(micro, wanted, input_ids.shape[1], device)
        result = loss_fn(token_logprobs, response_mask, num_sequences=num_sequences, num_tokens=num_tokens, **inputs)
        loss, metrics = check_loss_result(result, loss_fn)
        loss.backward()
        total += float(loss.detach())
        if metrics_sink is not None:
            for key, value in metrics.items():
                metrics_sink.setdefault(key, []).append(float(value))
        if policy_sink is not None and entropy:
            policy_sink.setdefault("entropy_sum", []).append(entropy[0])
            policy_sink.setdefault("entropy_tokens", []).append(entropy[1])
            if measure_gap and all(s.old_logprobs is not None for s in micro):
                old = loss_input_tensors(micro, frozenset({"old_logprobs"}), input_ids.shape[1], device)
                gap = (token_logprobs.detach() - old["old_logprobs"])[response_mask].abs()
                policy_sink.setdefault("gap_sum", []).append(float(gap.sum()))
                policy_sink.setdefault("gap_max", []).append(float(gap.max()) if gap.numel() else 0.0)
                policy_sink.setdefault("gap_tokens", []).append(float(gap.numel()))
        if on_micro_batch is not None:
            on_micro_batch()
    for _ in range(min_passes - -(-len(ordered) // micro_batch_size)):
        if filler is None:
            raise ValueError("padding the passes needs a filler sequence")
        input_ids, attention_mask, response_mask = collate([filler], pad_id, device)
        token_logprobs = response_logprobs(model, input_ids, attention_mask, response_mask)
        (token_logprobs.sum() * 0.0).backward()
    return total
