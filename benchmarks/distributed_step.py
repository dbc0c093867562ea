"""Step time with 1 process vs K processes (torchrun, gloo on CPU / NCCL on GPU), same global batch.

    python benchmarks/distributed_step.py                  # SmolLM2-135M, 8 prompts x 4, 3 steps
    python benchmarks/distributed_step.py --model tiny --steps 5

Runs `thresher train` with --nproc 1 and --nproc K on the same config and prints the mean wall time
of steps 2..N (step 1 includes warm-up) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def mean_step_time(nproc: int, args: argparse.Namespace, scratch: Path) -> tuple[float, dict]:
    run = scratch / f"run{nproc}"
    overrides = [
        f"output.dir={run}",
        f"rs.max_steps={args.steps}",
        f"rs.prompts_per_step={args.prompts}",
        f"rs.num_rollouts_per_prompt={args.n}",
        f"generator.max_new_tokens={args.tokens}",
        "generator.batch_size=4",
        "data.validation=null",
        "rs.save_every=0",
        "output.save_final=false",
    ]
    if args.model == "tiny":
        overrides.append("model.path=builtin:tiny")
    command = [sys.executable, "-m", "thresher", "train", "demo", "-q", "--nproc", str(nproc)]
    command += [a for o in overrides for a in ("--set", o)]
    subprocess.run(command, check=True)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"][1:]
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in ("time_step", "time_generate", "time_train")}
    return mean["time_step"], mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = {k: mean_step_time(k, args, Path(scratch)) for k in (1, args.nproc)}
    print(
        f"\nmodel {args.model}: {args.prompts} prompts x {args.n} rollouts x <= {args.tokens} tokens per step, "
        f"mean of steps 2-{args.steps}"
    )
    print(f"{'processes':>9} {'step s':>8} {'generate s':>11} {'train s':>8}")
    for k, (_, m) in results.items():
        print(f"{k:>9} {m['time_step']:>8.2f} {m['time_generate']:>11.2f} {m['time_train']:>8.2f}")
    print(f"ratio 1/{args.nproc}: {results[1][0] / results[args.nproc][0]:.2f}x")


if __name__ == "__main__":
    main()
