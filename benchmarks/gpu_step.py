"""RS steps on realistic shapes with random weights, through Thresher's engine: where a step's time
and memory go on a GPU, without downloading a model.

    python benchmarks/gpu_step.py --shape 1b                       # H100/H200: bf16, 64 prompts × N=8 × 128
    python benchmarks/gpu_step.py --shape 8b-4layers --lora --checkpointing
    python benchmarks/gpu_step.py --shape 8b --lora --checkpointing --micro-batch auto
    python benchmarks/gpu_step.py --shape 8b --lora --checkpointing --micro-batch auto --plan-gb 80   # any machine
    python benchmarks/gpu_step.py --shape tiny --device cpu        # a smoke test: well under a minute on a CPU

The workload defaults to the GPU figures' (64 prompts × N=8 × 128 tokens, micro-batch 16, 3 steps);
``--shape tiny`` defaults to a smoke-sized one (4 prompts × N=2 × 8 tokens, micro-batch 4, 2 steps).
Any of ``--prompts --n --tokens --micro-batch --steps`` given wins.

Builds a random-weight Llama of the shape (``benchmarks/shapes.py``; SmolLM2's tokenizer), runs
``--steps`` full RS steps (generate → score with a rule reward → keep the best response of each
prompt → train → refresh) on the demo's addition prompts, and prints per step: the phase times,
generation tokens/s, training tokens/s (prompt + response tokens of the kept sequences), the
training FLOP/s as a share of the measured matmul peak (bf16 8192³ on CUDA, fp32 2048³ on CPU), and
the peak device memory against the memory plan's estimate (the plan itself is printed first). The
first step pays one-time costs (kernel selection, compilation); the summary line is the mean of the
later steps. ``--micro-batch auto`` lets the memory plan pick the micro-batch
(``optim.micro_batch_size: auto``). ``--plan-gb G`` only prints the plan for a card of G GiB (CUDA,
nothing loaded, no GPU needed) and whether the run fits it; a run the plan refuses prints the plan
and its one-line refusal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import SHAPES, tokenizer_source, write_shape

GPU_WORKLOAD = {"prompts": 64, "n": 8, "tokens": 128, "micro_batch": 16, "steps": 3}
SMOKE_WORKLOAD = {"prompts": 4, "n": 2, "tokens": 8, "micro_batch": 4, "steps": 2}


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """The measured matmul rate (FLOP/s): the median of 10 timed products after warm-up."""
    if device.type == "cuda":
        n, dtype, label = 8192, torch.bfloat16, "bf16 8192³"
    else:
        n, dtype, label = 2048, torch.float32, "fp32 2048³"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2], label


def micro_batch(value: str) -> int | str:
    """``--micro-batch``: a whole number, or auto (the memory plan picks)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {value!r}") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops(model: torch.nn.Module, record: dict, lora: bool, checkpointing: bool) -> float:
    """Matmul FLOPs of the step's training: per token, 2 × weights forward, 2 × backward to the inputs,
    2 × backward to the weights (not for frozen weights under LoRA), 2 × more with checkpointing;
    the LM head only at response positions; attention's two products (causal) per layer."""
    config = model.config
    head = config.hidden_size * config.vocab_size
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    body = weights - (0 if config.tie_word_embeddings else head)
    per_weight = (4 if lora else 6) + (2 if checkpointing else 0)
    tokens, responses = record["train_sequence_tokens"], record["train_tokens"]
    sequences = max(1, record["kept"])
    length = tokens / sequences
    q = config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    attention = 2 * length * q * config.num_hidden_layers * tokens * (3 + (1 if checkpointing else 0))
    return per_weight * body * tokens + (4 if lora else 6) * head * responses + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (r 16, all linear layers)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default: 64; tiny: 4)")
    parser.add_argument("--n", type=int, default=None, help="responses per prompt (default: 8; tiny: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="max new tokens (default: 128; tiny: 8)")
    parser.add_argument("--micro-batch", type=micro_batch, default=None, help="a number or auto (default: 16; tiny: 4)")
    parser.add_argument("--steps", type=int, default=None, help="default: 3; tiny: 2")
    parser.add_argument("--decode", default=None, help="generator.decode (default: the generator's)")
    parser.add_argument("--no-merge", action="store_true", help="LoRA: decode through the adapters, not merged weights")
    parser.add_argument("--compile-step", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--tokenizer", default=None, help="a directory with SmolLM2's tokenizer files")
    parser.add_argument("--plan-gb", type=float, default=None, help="only print the plan for a CUDA card of GiB")
    args = parser.parse_args()
    workload = SMOKE_WORKLOAD if args.shape == "tiny" else GPU_WORKLOAD
    for name, value in workload.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    from thresher.core.runner import Run

    if args.plan_gb is not None:
        args.device = "cuda"
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    scratch = Path(tempfile.mkdtemp(prefix="thresher-gpu-step-"))
    model_path = write_shape(args.shape, scratch / "model", tokenizer_source(args.tokenizer))
    generator = {"type": "hf", "max_new_tokens": args.tokens, "batch_size": args.prompts}
    if args.decode:
        generator["decode"] = args.decode
    if args.no_merge:
        generator["merge_lora"] = False
    if args.compile_step:
        generator["compile_step"] = True
    raw = {
        "model": {"path": model_path, "dtype": dtype, "device": str(device)},
        "data": {"train": "builtin:addition_train", "chat_template": "auto"},
        "rs": {"max_steps": args.steps, "prompts_per_step": args.prompts, "num_rollouts_per_prompt": args.n, "seed": 1},
        "generator": generator,
        "scorer": {"type": "rule", "function": "thresher.presets.rewards:digit_share"},
        "selector": {"type": "topk", "top_n_rollouts": 1},
        "optim": {"lr": 1e-5, "micro_batch_size": args.micro_batch, "activation_checkpointing": args.checkpointing},
        "output": {"dir": str(scratch / "run"), "save_final": False},
    }
    if args.lora:
        raw["model"]["lora"] = {"r": 16}
    if args.plan_gb is not None:
        raw["model"]["memory_limit_gb"] = args.plan_gb
        plan = Run.from_config(raw, quiet=True).plan()
        print(f"shape {args.shape}, {dtype}, planned for a {args.plan_gb:g} GiB CUDA card:\n{plan.render()}")
        return
    run = Run.from_config(raw, quiet=True)
    plan = run.plan()
    print(plan.render())
    if not plan.fits:
        print(f"not run: {plan.refusal()}")
        return
    peak, peak_label = matmul_peak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run.setup(training=True)
    setup_s = time.perf_counter() - t0
    model = run.model
    params = sum(p.numel() for p in model.parameters())
    print(
        f"shape {args.shape}: {params / 1e6:.0f}M parameters, {dtype}, {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
        f"{', LoRA r16' if args.lora else ''}{', checkpointing' if args.checkpointing else ''}; "
        f"{args.prompts} prompts × N={args.n} × {args.tokens} new tokens; micro-batch "
        f"{run.session.trainer.micro_batch_size}{' (auto)' if args.micro_batch == 'auto' else ''}; "
        f"{peak_label} matmul peak {peak / 1e12:.1f} TFLOP/s; setup {setup_s:.1f} s"
    )
    header = f"{'step':>4} {'gen s':>7} {'gen tok/s':>10} {'score s':>8} {'train s':>8} {'train tok/s':>12}"
    header += f" {'train TFLOP/s':>14} {'% peak':>7} {'step s':>7} {'peak GB':>8} {'plan GB':>8}"
    print(header)
    rows = []
    try:
        for step in range(1, args.steps + 1):
            record = run.step()
            _sync(device)
            flops = training_flops(model, record, args.lora, args.checkpointing)
            row = {
                "gen": record["time_generate"],
                "gen_tps": record["tokens_per_s_generate"],
                "score": record["time_score"],
                "train": record["time_train"] or 0.0,
                "train_tps": record["train_sequence_tokens"] / record["time_train"] if record["time_train"] else 0.0,
                "tflops": flops / record["time_train"] / 1e12 if record["time_train"] else 0.0,
                "step": record["time_step"],
                "peak_gb": record["memory_peak_mb"] / 1024,
                "plan_gb": record["memory_planned_peak_mb"] / 1024,
            }
            rows.append(row)
            print(_format(str(step), row, peak))
    finally:
        run.close()
    later = rows[1:] or rows
    mean = {key: sum(r[key] for r in later) / len(later) for key in later[0]}
    mean["peak_gb"] = max(r["peak_gb"] for r in rows)
    print(_format("mean" if len(rows) > 1 else "only", mean, peak) + "   (steps 2+; peak over all steps)")
    ratio = mean["plan_gb"] / mean["peak_gb"] if mean["peak_gb"] else float("nan")
    print(f"memory plan / measured peak: {ratio:.2f}")


def _format(label: str, row: dict, peak: float) -> str:
    return (
        f"{label:>4} {row['gen']:>7.2f} {row['gen_tps']:>10.0f} {row['score']:>8.3f} {row['train']:>8.2f}"
        f" {row['train_tps']:>12.0f} {row['tflops']:>14.1f} {100 * row['tflops'] * 1e12 / peak:>6.0f}%"
        f" {row['step']:>7.2f} {row['peak_gb']:>8.2f} {row['plan_gb']:>8.2f}"
    )


if __name__ == "__main__":
    main()
