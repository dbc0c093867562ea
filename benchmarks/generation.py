"""Generation speed: transformers' generate() vs Thresher's fast decode loop, same prompts, N and seed.

    python benchmarks/generation.py                     # SmolLM2-135M, the demo's prompts, N = 8
    python benchmarks/generation.py --model tiny --n 16 --tokens 64

Prints wall time, real tokens/s (tokens the responses really have) and the decode slots computed, for
`generate` and for the fast path with shared prefill and batch compaction switched on and off.
"""

from __future__ import annotations

import argparse
import time

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
    args = parser.parse_args()
    model, tokenizer = load_policy(f"builtin:{args.model}")
    model.eval()
    chat = "auto" if args.model == "smollm2" else "never"
    prompts = load_prompts("builtin:addition_train", tokenizer, chat_template=chat)[0][: args.prompts]
    variants = {
        "transformers generate()": {"decode": "generate"},
        "fast: shared prefill + compaction": {},
        "fast: compaction only": {"shared_prefill": False},
        "fast: shared prefill only": {"compaction": False},
    }
    print(
        f"model {args.model}: {len(prompts)} prompts x N={args.n}, <= {args.tokens} new tokens, "
        f"{torch.get_num_threads()} threads, mean of {args.repeats} runs after a warm-up"
    )
    print(f"{'variant':<36} {'wall s':>7} {'real tok/s':>10} {'speed-up':>8}")
    base = None
    for label, options in variants.items():
        generator = HFGenerator(
            HFGenerator.Config(max_new_tokens=args.tokens, batch_size=len(prompts), **options),
            PluginContext(tokenizer=tokenizer, policy=model),
        )
        generator.generate(prompts[:2], 2, seed=0)  # warm-up
        start = time.perf_counter()
        for repeat in range(args.repeats):
            rollouts = generator.generate(prompts, args.n, seed=repeat)
        wall = (time.perf_counter() - start) / args.repeats
        tokens = sum(len(r.response_ids) for r in rollouts)
        base = base or wall
        print(f"{label:<36} {wall:>7.2f} {tokens / wall:>10.1f} {base / wall:>7.2f}x")


if __name__ == "__main__":
    main()
