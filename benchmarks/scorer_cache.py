"""What scoring each distinct response once saves, against a slow remote reward.

    python benchmarks/scorer_cache.py                 # the demo (SmolLM2-135M, addition), 3 steps
    python benchmarks/scorer_cache.py --model tiny    # seconds, for a smoke run

Serves the demo's addition reward through `thresher serve-rm` with 200 ms of latency per request and
a batch size of 1 (so a request is one response: the cost of a remote judge called per answer), then
runs the same steps twice with the `triton` scorer: `scorer.dedup: false` (every response sent) and
the default (each distinct response of a call sent once). Prints the time spent scoring, the
responses sent and the cache hits per step. Same seed, same rollouts: the rewards are compared too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scorers.triton_servers import serving  # the same server helper the tests use

SLOW_RULE = """
import time
from thresher.presets.rewards import addition_correct

def reward(responses, answer, finish_reasons):
    time.sleep({latency} * len(responses))
    return addition_correct(responses, answer, finish_reasons)
"""


def run_steps(url: str, scratch: Path, name: str, dedup: bool, args: argparse.Namespace) -> list[dict]:
    import thresher

    overrides = {
        "scorer": {"type": "triton", "url": url, "dedup": dedup, "concurrency": 1},
        "rs.max_steps": args.steps,
        "rs.overlap_scoring": False,
        "data.validation": None,
        "output.dir": str(scratch / name),
        "output.save_final": False,
    }
    if args.model == "tiny":
        overrides.update({"model.path": "builtin:tiny", "data.chat_template": "never"})
    with thresher.Run.from_config("demo", overrides=overrides, quiet=True) as run:
        return run.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--latency-ms", type=int, default=200)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="thresher-cache-"))
    rule = scratch / "slow_addition.py"
    rule.write_text(SLOW_RULE.format(latency=args.latency_ms / 1000))
    with serving(["--rule", f"{rule}:reward", "--max-batch-size", "1"]) as server:
        results = {}
        for name, dedup in (("every response", False), ("distinct once", True)):
            start = time.perf_counter()
            results[name] = run_steps(server.grpc_url, scratch, name.replace(" ", "_"), dedup, args)
            print(f"{name}: {time.perf_counter() - start:.1f} s in all", file=sys.stderr)
    print(
        f"{args.model}, demo prompts, N=8, {args.steps} steps, {args.latency_ms} ms per remote request "
        f"(one response each); {subprocess.check_output(['nproc']).decode().strip()} CPU cores"
    )
    print(f"{'step':>4} {'':>16} {'score s':>8} {'sent':>5} {'hits':>5} {'reward mean':>12}")
    for name, history in results.items():
        for record in history:
            hits = int(record.get("scorer_cache_hits", 0))
            print(
                f"{record['step']:>4} {name:>16} {record['time_score']:>8.2f} {record['rollouts'] - hits:>5} {hits:>5}"
                f" {record['reward_mean']:>12.3f}"
            )
    plain, deduped = (sum(r["time_score"] for r in h) for h in results.values())
    same = [a["reward_mean"] for a in results["every response"]] == [b["reward_mean"] for b in results["distinct once"]]
    print(f"scoring time: {plain:.1f} s → {deduped:.1f} s ({plain / deduped:.2f}×); same rewards: {same}")


if __name__ == "__main__":
    main()
