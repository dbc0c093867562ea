"""What makes a policy fit: activation checkpointing, and a memory plan computed before loading.

The plan counts the model's parameters exactly by building it on PyTorch's ``meta`` device (no
memory, no weights read; LoRA adapters are injected there too), then adds up what a run holds:

- persistent: the weights (``model.dtype``), fp32 master weights of a 16-bit policy, AdamW's two
  moments (fp32 with masters);
- while training: the gradients (fp32 with masters, plus the largest 16-bit gradient in flight) and
  the activations autograd keeps for one micro-batch of the longest sequences;
- while generating (the ``hf`` generator): the KV cache of one decode batch, each prompt's KV stored
  once for its N samples, and the sampling buffers.

Activations per token and decoder layer, in bytes, for a Llama-style block run with SDPA attention,
counted from the tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``) and fitted
exactly over 8 shapes: ``s·(4h + 2q + 2kv + 4I) + 8h + 4·heads + 8`` with ``s`` the dtype's bytes,
``h`` the hidden size, ``q`` = heads × head_dim, ``kv`` = kv_heads × head_dim, ``I`` the MLP's
intermediate size (the two RMSNorms keep their input in fp32: 8h; attention keeps q, k, v, its
output and a log-sum-exp per head); LoRA changes it (:func:`layer_activation_bytes`). With
activation checkpointing a layer keeps only its input (``s·h``) and the backward rebuilds one layer
at a time. The response-only LM head keeps ``R·V`` fp32 log-softmax outputs for the ``R`` response
tokens of the micro-batch.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from thresher.core.config.sampling import sampling_params
from thresher.core.model import CausalLM
from thresher.core.types import PlansMemory

if TYPE_CHECKING:
    from thresher.core.config import OutputConfig, RunConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROLLOUT_BYTES_PER_TOKEN = 48  # a list slot and an int object per token id, the decoded text, the JSON record
ROLLOUT_BYTES = 512
MASTER_BYTES = 4  # fp32 master weights, gradients and AdamW moments
GiB = 2**30


def enable_activation_checkpointing(model: CausalLM) -> None:
    """Recompute each decoder layer's activations during the backward (transformers' gradient
    checkpointing, non-reentrant: it needs no input that requires grad, so frozen embeddings under
    LoRA work, and it composes with ``torch.no_grad`` generation, where it is inactive)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a cache is useless while training; generation passes use_cache itself


def checkpoint_sizes(
    model: torch.nn.Module, trained: list[torch.nn.Parameter], output: OutputConfig, lora: bool
) -> tuple[int, int]:
    """Bytes of one checkpoint (trained weights at training precision + AdamW's two moments) and of
    ``final/`` (the trained weights, or with LoRA the adapters plus an optional merged model)."""
    weights = sum(p.numel() * p.element_size() for p in trained)
    final_each = BYTES[output.final_dtype]
    final = sum(p.numel() for p in trained) * final_each
    if lora and output.merge_lora:
        final += sum(p.numel() for p in model.parameters() if not p.requires_grad) * final_each
    return 3 * weights, final if output.save_final else 0


# --- the model's shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts (exact) and the dimensions the activation estimate needs."""

    parameters: int
    trainable: int
    adapters: int  # LoRA parameters (fp32); 0 without LoRA
    largest: int  # elements of the largest trainable parameter
    adapted_per_layer: int  # LoRA: adapted linear modules per decoder layer
    adapted_weights: int  # LoRA: elements of the adapted linears' (frozen) weights
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def model_shape(model_config: Any, lora: Any = None) -> ModelShape:
    """Count parameters by building the model on the ``meta`` device (nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    adapted, adapted_weights = 0, 0
    if lora is not None:
        from thresher.core.training.lora import apply_lora, lora_layers

        apply_lora(model, lora)
        layers_found = lora_layers(model).values()
        adapted = len(layers_found)
        adapted_weights = sum(m.base_layer.weight.numel() for m in layers_found)
    trainable = [p for p in model.parameters() if p.requires_grad]
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = int(text.num_attention_heads)
    layers = int(text.num_hidden_layers)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable),
        adapters=sum(p.numel() for p in trainable) if lora is not None else 0,
        largest=max((p.numel() for p in trainable), default=0),
        adapted_per_layer=adapted // max(1, layers),
        adapted_weights=adapted_weights,
        layers=layers,
        hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab=int(text.vocab_size),
    )


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: int
    detail: str
    shrink: str = ""  # the setting that makes this item smaller
    persistent: bool = False  # a generator's item held while training too (a static cache, say)


@dataclass(frozen=True)
class GenerationPlan:
    """What a generator's ``memory_items`` classmethod is told about the run."""

    shape: ModelShape
    model_type: str
    prompt_tokens: int  # the longest prompt
    prompts_per_step: int
    n: int
    dtype_bytes: int
    device: torch.device
    validation: bool  # validation prompts are generated too (N = 1, greedy)


@dataclass
class MemoryPlan:
    device: str
    items: list[PlanItem]
    training_peak: int
    generation_peak: int
    available: int | None
    notes: list[str] = field(default_factory=list)
    host_needed: int = 0  # a GPU run's host memory for one step's rollouts
    host_available: int | None = None
    micro_batch_size: int | None = None  # what optim.micro_batch_size: auto resolved to

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.generation_peak)

    @property
    def fits(self) -> bool:
        return self._device_fits and self._host_fits

    @property
    def _device_fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    @property
    def _host_fits(self) -> bool:
        return self.host_available is None or self.host_needed <= self.host_available

    def biggest(self) -> PlanItem:
        return max((i for i in self.items if i.shrink), key=lambda i: i.bytes)

    def __str__(self) -> str:
        """The table ``thresher train --dry-run`` prints: ``print(run.plan())`` shows the same."""
        return self.render()

    def render(self) -> str:
        width = max(len("peak while generating"), *(len(i.name) for i in self.items))
        lines = [f"memory plan on {self.device}:"]
        for item in self.items:
            lines.append(f"  {item.name:<{width}}  {format_bytes(item.bytes):>9}  {item.detail}")
        lines.append(f"  {'peak while training':<{width}}  {format_bytes(self.training_peak):>9}")
        lines.append(f"  {'peak while generating':<{width}}  {format_bytes(self.generation_peak):>9}")
        if self.available is None:
            lines.append(f"  {'available':<{width}}  {'unknown':>9}")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {'available':<{width}}  {format_bytes(self.available):>9}  {verdict}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def refusal(self) -> str:
        """One line: what does not fit, the biggest item and what shrinks it."""
        if not self._host_fits:
            return (
                f"memory plan: one step's rollouts need about {format_bytes(self.host_needed)} of host memory but "
                f"{format_bytes(self.host_available or 0)} is available: lower rs.prompts_per_step or "
                "rs.num_rollouts_per_prompt (model.memory_check=false starts anyway)"
            )
        big = self.biggest()
        return (
            f"memory plan: this run needs about {format_bytes(self.peak)} on {self.device} but "
            f"{format_bytes(self.available or 0)} is available; the biggest item is {big.name} "
            f"({format_bytes(big.bytes)}): {big.shrink} (see `thresher train CONFIG --dry-run`; "
            "model.memory_check=false starts anyway)"
        )


def plan_memory(
    config: RunConfig,
    shape: ModelShape,
    prompt_tokens: int,
    device: torch.device,
    runtime_bytes: int = 0,
    available: int | None = None,
    training: bool = True,
    world_size: int = 1,
    generator_items: list[PlanItem] | None = None,
    host_available: int | None = None,
) -> MemoryPlan:
    """The bytes a run of ``config`` holds, by item; ``prompt_tokens`` is the longest prompt.
    ``training=False`` (best-of-N data production) plans the weights and generation only.
    ``generator_items`` come from the generator plugin (``memory_items``); None: not counted."""
    s = BYTES[config.model.dtype]
    lora = config.model.lora is not None
    half = config.model.dtype != "float32"
    masters = half and config.optim.master_weights != "none" and not lora  # adapters are fp32 already
    train_bytes = s if half and not masters and not lora else MASTER_BYTES
    base = shape.parameters - shape.adapters
    items = [
        PlanItem(
            "weights",
            base * s + shape.adapters * MASTER_BYTES,
            f"{_count(base)} × {s} B ({config.model.dtype})"
            + (f" + {_count(shape.adapters)} adapters × 4 B" if lora else ""),
            "a 16-bit model.dtype (bfloat16) halves it" if not half else "",
        ),
        PlanItem(
            "master weights",
            shape.trainable * MASTER_BYTES if masters else 0,
            "fp32 copies of the 16-bit weights the optimizer updates" if masters else "none needed",
            "model.lora trains adapters only",
        ),
    ]
    shards = world_size if config.optim.strategy == "fsdp" and world_size > 1 else 1
    shard_note = f" / {shards} ranks (FSDP)" if shards > 1 else ""
    if shards > 1:  # FSDP trains a sharded copy at training precision, next to the full one
        items[1] = PlanItem(
            "master weights",
            shape.trainable * train_bytes // shards,
            f"the sharded training copy: {_count(shape.trainable)} × {train_bytes} B{shard_note}",
            "more ranks",
        )
    grads = shape.trainable * train_bytes // shards + (shape.largest * s if masters and shards == 1 else 0)
    items.append(
        PlanItem(
            "gradients",
            grads,
            f"{_count(shape.trainable)} × {train_bytes} B{shard_note}",
            "model.lora trains adapters only",
        )
    )
    items.append(
        PlanItem(
            "optimizer state",
            2 * shape.trainable * train_bytes // shards,
            f"AdamW's 2 moments × {_count(shape.trainable)} × {train_bytes} B{shard_note}",
            "model.lora trains adapters only" if shards == 1 else "more ranks",
        )
    )
    rollouts = _rollouts(config)
    if device.type == "cpu":  # held through the step, in the same memory as everything else
        items.append(rollouts)
    if training:
        items.append(_activations(config, shape, prompt_tokens, s, world_size))
    else:
        items = [item if item.name == "weights" else PlanItem(item.name, 0, "not training") for item in items]
        items.append(PlanItem("activations", 0, "not training"))
    items.extend(generator_items or [])
    if runtime_bytes:
        items.append(PlanItem("runtime", runtime_bytes, "this process before loading (torch, transformers, data)"))
    by_name = {i.name: i.bytes for i in items}
    held = sum(i.bytes for i in generator_items or [] if i.persistent) + by_name.get("rollouts", 0)
    persistent = by_name["weights"] + by_name["master weights"] + by_name["optimizer state"] + runtime_bytes + held
    training_peak = persistent + by_name["gradients"] + by_name["activations"]
    generation_peak = persistent + sum(i.bytes for i in generator_items or [] if not i.persistent)
    notes = []
    if generator_items is None:
        notes.append(f"the {config.generator.type} generator's own memory is not counted (it plans none)")
    plan = MemoryPlan(str(device), items, training_peak, generation_peak, available, notes)
    if device.type != "cpu":
        plan.host_needed, plan.host_available = rollouts.bytes, host_available
        plan.notes.append(f"host memory for one step's rollouts: {format_bytes(rollouts.bytes)}")
    return plan


def _rollouts(config: RunConfig) -> PlanItem:
    """One step's rollouts in host memory: token ids as Python ints, the decoded text, the record."""
    new_tokens = sampling_params(config).max_new_tokens
    count = config.rs.prompts_per_step * config.rs.num_rollouts_per_prompt
    return PlanItem(
        "rollouts",
        count * (new_tokens * ROLLOUT_BYTES_PER_TOKEN + ROLLOUT_BYTES),
        f"{count} responses of one step (token ids, text, records)",
        "rs.prompts_per_step or rs.num_rollouts_per_prompt",
    )


def _activations(config: RunConfig, shape: ModelShape, prompt_tokens: int, s: int, world_size: int) -> PlanItem:
    new_tokens = sampling_params(config).max_new_tokens
    configured = config.optim.micro_batch_size
    if configured == "auto":
        raise ValueError("plan_memory needs a micro-batch size: plan_run_memory resolves optim.micro_batch_size auto")
    # A micro-batch never holds more than a rank's share of one optimizer batch (micro-batches are
    # cut from it, not padded up to the size): planning the configured size would over-plan small runs.
    batch = min(configured, micro_batch_cap(config, world_size))
    length = prompt_tokens + new_tokens
    tokens = batch * length
    per_layer = layer_activation_bytes(shape, s, config.model.lora)
    outside_layers = (s + 4) * shape.hidden
    head = batch * new_tokens * (shape.vocab * (8 + s) + shape.hidden * s)  # log-softmax outputs and their gradient
    checkpointing = config.optim.activation_checkpointing
    if checkpointing:
        # Each layer keeps its input; the backward rebuilds one layer at a time (its activations and
        # their gradients) after the LM head's outputs are freed: the larger of the two is held.
        total = tokens * (shape.layers * s * shape.hidden + outside_layers) + max(head, 2 * tokens * per_layer)
    else:
        total = tokens * (shape.layers * per_layer + outside_layers) + head
    detail = f"{batch} sequences × {length} tokens, {shape.layers} layers"
    detail += ", checkpointed" if checkpointing else ""
    shrink = "optim.micro_batch_size (smaller) or data.max_prompt_tokens / generator.max_new_tokens"
    if not checkpointing:
        shrink = "optim.activation_checkpointing=true, or a smaller optim.micro_batch_size"
    whole = f": all a step can hold, under micro_batch_size {configured}" if batch < configured else ""
    return PlanItem("activations", total, f"{detail} (one micro-batch{whole})", shrink)


def plan_run_memory(
    config: RunConfig,
    model_config: Any,
    prompts: list[Any],
    device: torch.device,
    training: bool,
    world_size: int = 1,
    generator_cls: type | None = None,
) -> MemoryPlan:
    """The plan of one process of a run: from the config, the model's config and the prompts only.
    The generator plugin's class plans its own memory (optional classmethod ``memory_items``).

    On the CPU the memory the OS reports available is shared by the ranks of this machine."""
    shape = model_shape(model_config, config.model.lora)
    longest = max((len(p.token_ids) for p in prompts), default=0)
    generator_items = None
    if generator_cls is not None and isinstance(generator_cls, type) and issubclass(generator_cls, PlansMemory):
        about = GenerationPlan(
            shape=shape,
            model_type=str(getattr(model_config, "model_type", "")),
            prompt_tokens=longest,
            prompts_per_step=config.rs.prompts_per_step,
            n=config.rs.num_rollouts_per_prompt,
            dtype_bytes=BYTES[config.model.dtype],
            device=device,
            validation=bool(config.data.validation),
        )
        generator_items = generator_cls.memory_items(config.generator.config, about)
    available = available_memory(device)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if available is not None and device.type == "cpu" and local_ranks > 1:
        available //= local_ranks
    if config.model.memory_limit_gb is not None:
        available = int(config.model.memory_limit_gb * GiB)
    runtime = current_rss() if device.type == "cpu" else 0
    host = available_memory(torch.device("cpu")) if device.type != "cpu" else None

    def plan_for(run_config: RunConfig) -> MemoryPlan:
        return plan_memory(
            run_config, shape, longest, device, runtime, available, training, world_size, generator_items, host
        )

    if config.optim.micro_batch_size == "auto":
        return plan_auto_micro_batch(config, plan_for, world_size)
    return plan_for(config)


def with_micro_batch(config: RunConfig, size: int) -> RunConfig:
    """``config`` with ``optim.micro_batch_size`` set to ``size`` (an ``auto`` resolved)."""
    return config.model_copy(update={"optim": config.optim.model_copy(update={"micro_batch_size": size})})


def micro_batch_cap(config: RunConfig, world_size: int = 1) -> int:
    """The most sequences one rank's micro-batch can ever hold: its share of one optimizer batch
    (``optim.batch_size``, or every response a step can produce); a larger one would only be padding."""
    rs = config.rs
    per_prompt = rs.pool_max_rollouts() if rs.prompt_pool is not None else rs.max_rollouts()
    batch = config.optim.batch_size or rs.prompts_per_step * per_prompt
    return max(1, -(-batch // max(1, world_size)))


def plan_auto_micro_batch(
    config: RunConfig, plan_for: Callable[[RunConfig], MemoryPlan], world_size: int = 1
) -> MemoryPlan:
    """``optim.micro_batch_size: auto``: the plan of the largest micro-batch whose training peak leaves
    ``optim.micro_batch_headroom`` of the available memory free (the plan is an estimate: within
    about 10% of the measured peak on GPU, 25% on CPU). The training peak grows with the micro-batch
    (its activations), so a bisection over 1..cap finds it. With the memory unknown (a dry run for a
    GPU this machine lacks) it plans 8 (or the cap, if smaller); when not even 1 fits, 1, and the plan
    refuses the run as any other would."""
    cap = micro_batch_cap(config, world_size)
    smallest = plan_for(with_micro_batch(config, 1))
    if smallest.available is None:
        size = min(8, cap)
        plan = plan_for(with_micro_batch(config, size))
        plan.notes.append(f"optim.micro_batch_size auto: {size} (the available memory is unknown)")
    else:
        budget = (1 - config.optim.micro_batch_headroom) * smallest.available
        low, high = 1, cap  # invariant: low fits (or is 1); everything above high does not
        while low < high:
            middle = (low + high + 1) // 2
            if plan_for(with_micro_batch(config, middle)).training_peak <= budget:
                low = middle
            else:
                high = middle - 1
        size = low
        plan = plan_for(with_micro_batch(config, size))
        room = f"{1 - config.optim.micro_batch_headroom:.0%} of {format_bytes(smallest.available)}"
        if smallest.training_peak > budget:
            why = f"the smallest: not even 1 sequence keeps the training peak within {room}"
        elif size == cap:
            why = f"a whole optimizer batch; its training peak fits in {room}"
        else:
            why = f"the largest whose training peak fits in {room}; a whole optimizer batch is {cap}"
        plan.notes.append(f"optim.micro_batch_size auto: {size} ({why})")
    plan.micro_batch_size = size
    return plan


def layer_activation_bytes(shape: ModelShape, s: int, lora: Any) -> int:
    """Bytes autograd keeps per token and decoder layer (see the module docstring).

    Full fine-tuning: ``s·(4h + 2q + 2kv + 4I) + 8h + 4·heads + 8``. Under LoRA a frozen linear
    keeps no input, but each adapter keeps its input cast to fp32 and its rank-r output; fitted the
    same way for ``all-linear`` targets: ``16h + 8q + 8kv + 16I`` (fp32) or ``28h + 8q + 4kv + 10I``
    (16-bit), ``+ 4·heads + 8 + 4·r`` per adapted module (other targets are approximated by it).
    Every coefficient was fitted with zero residual over 8 Llama shapes (h ≠ heads × head_dim)."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    kv, inter = shape.kv_heads * shape.head_dim, shape.intermediate
    common = 4 * shape.heads + 8
    if lora is None:
        return s * (4 * h + 2 * q + 2 * kv + 4 * inter) + 8 * h + common
    adapters = 4 * lora.r * shape.adapted_per_layer
    if s == 4:
        return 16 * h + 8 * q + 8 * kv + 16 * inter + common + adapters
    return 28 * h + 8 * q + 4 * kv + 10 * inter + common + adapters


HOST_MMAP_THRESHOLD = 16 * 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_frees_to_the_os() -> bool:
    """Serve host allocations of 16 MiB and more (activations, logits, attention scores) from
    their own mappings, so freeing one returns it to the OS at once (glibc ``mallopt``).

    Why: glibc raises its mmap threshold to the size of the last large block freed (up to 32 MiB),
    after which a step's activations live in the heap, and a backward's frees and re-allocations of
    slightly different sizes fragment it. Measured on SmolLM2-135M with activation checkpointing
    (8 sequences of 518 tokens): peak RSS 3.6–4.2 GB (varying with the machine's load) against 2.7 GB
    with a fixed 16 MiB threshold, at the same speed; the memory plan counts live bytes, which is
    what the peak then is. A ``MALLOC_MMAP_THRESHOLD_`` the user set is left alone; on a C library
    other than glibc this does nothing. Returns whether the threshold was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(HOST_MMAP_THRESHOLD)))


def available_memory(device: torch.device) -> int | None:
    """Free memory for this run: a CUDA device's free bytes, or on CPU the memory the OS reports
    available plus what this process already holds (its runtime is an item of the plan)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():  # a plan for a GPU this machine does not have
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
    except (OSError, ValueError, IndexError):
        return None
    return info.get("MemAvailable", 0) + current_rss()


def peak_memory(device: torch.device) -> int:
    """The most memory this run has held so far: the CUDA caching allocator's peak of allocated
    bytes on a GPU; this process's peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def current_rss() -> int:
    """This process's resident memory now (bytes); 0 where /proc is not there."""
    try:
        with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
