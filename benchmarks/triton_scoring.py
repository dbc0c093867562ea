"""Reward scoring through Triton vs in-process, and what overlapping scoring with generation saves.

    python benchmarks/triton_scoring.py                 # reward model: SmolLM2-135M body + a 1-label head
    python benchmarks/triton_scoring.py --rm tiny       # a small random reward model (fast)

Prints rollouts scored per second for the in-process `local` scorer and for the `triton` scorer over
gRPC and HTTP at concurrency 1 and 4 (the same model, served by `thresher serve-rm`), then the mean
wall time of a training step (tiny policy) with and without overlap, in two settings: the reward model
served on this same machine (it competes with generation for the same cores), and a served reward
with a fixed per-request latency and no local compute (standing in for a reward model on other GPUs).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from thresher.core.config import load_config
from thresher.core.console import ConsoleReporter
from thresher.core.model import build_tiny_tokenizer, load_policy, smollm2_cache_dir
from thresher.core.registry import build_registry
from thresher.core.runner import Run
from thresher.core.types import Prompt, Rollout
from thresher.scorers.local import LocalRewardModelScorer
from thresher.scorers.triton import TritonScorer


def build_reward_model(kind: str, directory: Path) -> None:
    """Save a one-label sequence classifier: SmolLM2's body with a new head, or a small random model."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    if kind == "smollm2":
        load_policy("builtin:smollm2")  # makes sure the safetensors cache exists
        source = smollm2_cache_dir()
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, local_files_only=True)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    else:
        tokenizer = build_tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def sample_rollouts(count: int) -> list[Rollout]:
    prompts = [
        Prompt(i, f"What is {i % 12 + 1} + {i % 7 + 2}? Answer with just the number.", (1,), {}) for i in range(count)
    ]
    answers = ["12", "The answer is 9.", "7 + 5 = 12", "I think it is eleven", "13"]
    return [Rollout(p, i, 0, [1], answers[i % len(answers)] * (1 + i % 3), "eos") for i, p in enumerate(prompts)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(source: list[str], max_batch_size: int) -> tuple[subprocess.Popen, int, int]:
    """`thresher serve-rm SOURCE...` on free loopback ports; returns once it is ready."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "thresher",
        "serve-rm",
        *source,
        "--max-batch-size",
        str(max_batch_size),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    while True:
        line = process.stdout.readline()
        if line.startswith("ready"):
            return process, http_port, grpc_port
        if not line and process.poll() is not None:
            raise SystemExit("serve-rm failed to start")


def rate(scorer, rollouts: list[Rollout], repeats: int) -> float:
    scorer.score(rollouts[:8])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        scorer.score(rollouts)
    return repeats * len(rollouts) / (time.perf_counter() - start)


def step_time(config_path: str, overrides: list[str]) -> float:
    registry = build_registry()
    config = load_config(config_path, overrides, registry)
    with Run(config, registry=registry, reporter=ConsoleReporter(quiet=True)) as run:
        history = run.train()
    return sum(r["time_step"] for r in history[1:]) / max(1, len(history) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rm", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rollouts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="server max batch size = scorer request size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--latency-ms", type=int, default=200, help="latency of the remote-like served reward")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "rm"
        build_reward_model(args.rm, model_dir)
        rollouts = sample_rollouts(args.rollouts)
        print(
            f"reward model: {args.rm}; {args.rollouts} rollouts, batches of {args.batch}; "
            f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()} per process"
        )
        local = LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(model_dir), batch_size=args.batch))
        results = [("in-process (local)", rate(local, rollouts, args.repeats))]
        del local
        server, http_port, grpc_port = start_server(["--model", str(model_dir)], args.batch)
        try:
            for protocol, port in (("grpc", grpc_port), ("http", http_port)):
                for concurrency in (1, 4):
                    scorer = TritonScorer(
                        TritonScorer.Config(url=f"{protocol}://127.0.0.1:{port}", concurrency=concurrency)
                    )
                    results.append(
                        (f"triton {protocol}, concurrency {concurrency}", rate(scorer, rollouts, args.repeats))
                    )
                    scorer.close()
            print(f"\n{'scorer':<32} {'rollouts/s':>10}")
            for label, value in results:
                print(f"{label:<32} {value:>10.1f}")
            local_rm = overlap_times(scratch, grpc_port, args.steps)
        finally:
            server.terminate()
            server.wait(timeout=60)

        latency_rule = Path(scratch) / "remote_like.py"
        latency_rule.write_text(
            "import time\n"
            "def reward(responses):\n"
            f"    time.sleep({args.latency_ms / 1000})  # a reward model busy on other hardware\n"
            "    return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]\n"
        )
        server, _, grpc_port = start_server(["--rule", f"{latency_rule}:reward"], args.batch)
        try:
            remote = overlap_times(scratch, grpc_port, args.steps)
        finally:
            server.terminate()
            server.wait(timeout=60)
        print(
            f"\ntraining step (tiny policy, 8 prompts x 8 rollouts, 4 generation chunks), mean of steps 2-{args.steps}:"
        )
        print(f"{'reward served':<44} {'then score':>10} {'overlapped':>10} {'saved':>6}")
        for label, times in (
            (f"{args.rm} RM on this machine (shares the cores)", local_rm),
            (f"rule with {args.latency_ms} ms latency per request", remote),
        ):
            print(f"{label:<44} {times[False]:>9.2f}s {times[True]:>9.2f}s {1 - times[True] / times[False]:>6.0%}")


def overlap_times(scratch: str, grpc_port: int, steps: int) -> dict[bool, float]:
    base = [
        f"output.dir={Path(scratch) / 'run'}",
        f"rs.max_steps={steps}",
        "rs.prompts_per_step=8",
        "rs.num_rollouts_per_prompt=8",
        "generator.batch_size=2",
        "generator.max_new_tokens=32",
        "data.validation=null",
        "rs.save_every=0",
        "output.save_final=false",
        "scorer.type=triton",
        f"scorer.url=grpc://127.0.0.1:{grpc_port}",
    ]
    return {
        overlap: step_time("tiny", [*base, f"rs.overlap_scoring={str(overlap).lower()}"]) for overlap in (False, True)
    }


if __name__ == "__main__":
    main()
