"""One rejection-sampling step: Thresher vs the loops users build today, same model, prompts, N, seed.

    python benchmarks/rs_step.py --model smollm2     # prompts of 200+ tokens, N = 8
    python benchmarks/rs_step.py --model tiny

Contenders (each does generate → score → keep the best per prompt → one fine-tuning update):
1. sequential: the reference implementation's style: N separate sampling calls per prompt batch,
   blocking reward calls, and the loss over a full-sequence (sequence × vocabulary) log-softmax;
2. transformers loop: generate(num_return_sequences=N), scoring, then a transformers Trainer pass on
   the kept pairs, or TRL's SFTTrainer with ``--baseline2 trl`` (TRL installed with the pins in the
   README that keep numpy < 2 beside PyTriton);
3. Thresher: the engine's step (fast decode, response-only logits, length-sorted micro-batches).

Prints per phase wall time and tokens/s, the ratios baseline / Thresher, the training pass's
achieved FLOP/s (6 × parameters × tokens / s, the LM head counted only on the positions where it runs)
against this machine's measured fp32 matmul FLOP/s,
and the training pass's peak memory. Memory is measured in a fresh process per contender that loads
the model and runs only that contender's training pass on the same kept sequences (Thresher's), so
the process's peak RSS (VmHWM) is the training pass's peak; RSS sampled inside one long-lived
process is not comparable between contenders (the allocator reuses pages freed by earlier phases).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from thresher.core.config import load_config
from thresher.core.engine import Engine
from thresher.core.metrics import ConsoleReporter
from thresher.core.registry import build_registry
from thresher.core.trainer import TrainSequence, collate
from thresher.presets.rewards import addition_correct

FILLER = (
    "You are a careful assistant. Read the background, then answer the question at the end. Background: "
    "arithmetic is the branch of mathematics that studies numbers and the operations on them, such as "
    "addition, subtraction, multiplication and division. People have used it for trade, measurement and "
    "astronomy for thousands of years, and children learn to add small numbers long before they learn "
    "anything else about mathematics. "
)

USE_TRL = False  # set from --baseline2
ANSWER = "Answer with just the number."
# Takes the chat-formatted SmolLM2 prompts to 200+ tokens.
TAIL = "Now the question, which has one number as its answer. "


class PeakRSS:
    """Peak resident memory growth while the block runs (sampled every 5 ms), in MB."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.growth_mb = (self.peak - self.base) / 2**20


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that over from
    the parent across fork and exec, so a child would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def matmul_flops() -> float:
    """The machine's fp32 matmul rate: the best of 3 trials of 2048³ products (measured first, idle)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(3):
        start, reps = time.perf_counter(), 10
        for _ in range(reps):
            a @ b
        best = max(best, 2 * 2048**3 * reps / (time.perf_counter() - start))
    return best


def training_flops(model: torch.nn.Module, all_tokens: int, head_tokens: int) -> float:
    """Forward + backward ≈ 6 × parameters × tokens, with the LM head counted only where it runs."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - (0 if model.config.tie_word_embeddings else head)
    return 6 * (body - head) * all_tokens + 6 * head * head_tokens


def make_data(directory: Path, count: int, repeats: int, tail: str = TAIL) -> Path:
    path = directory / "long_prompts.jsonl"
    rows = [
        {"prompt": f"{FILLER * repeats}{tail}What is {a} + {b}? {ANSWER}", "answer": a + b}
        for a, b in [(3 + i % 9, 2 + (i * 5) % 11) for i in range(count)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def thresher_step(args: argparse.Namespace, data: Path, scratch: Path) -> dict:
    registry = build_registry()
    overrides = [
        f"data.train={data}",
        "data.validation=null",
        f"rs.prompts_per_step={args.prompts}",
        f"rs.num_rollouts_per_prompt={args.n}",
        f"generator.max_new_tokens={args.tokens}",
        f"generator.batch_size={args.prompts}",
        "rs.max_steps=2",
        "rs.save_every=0",
        "output.save_final=false",
        f"output.dir={scratch / 'thresher'}",
        "selector.min_reward=null",
        "optim.batch_size=null",
        f"optim.micro_batch_size={args.micro}",
    ]
    if args.model == "tiny":
        overrides += ["model.path=builtin:tiny", "data.chat_template=never"]
    config = load_config("demo", overrides, registry)
    engine = Engine(config, registry, ConsoleReporter(quiet=True))
    engine.setup()
    engine.step(1)  # warm-up (same work as the measured step)
    memory = PeakRSS()
    train_step = engine.trainer.train_step

    def measured(*a, **k):  # the peak memory of the training pass alone, like the baselines'
        with memory:
            return train_step(*a, **k)

    engine.trainer.train_step = measured
    record = engine.step(2)
    # tokens the training pass processed: prompt + response of every kept rollout
    rollouts_file = scratch / "thresher" / "rollouts" / "step_2.jsonl"
    rows = [json.loads(line) for line in rollouts_file.read_text().splitlines()]
    lengths = {p.index: len(p.token_ids) for p in engine.train_prompts}
    trained = sum(lengths[r["prompt_index"]] + len(r["response_ids"]) for r in rows if r["kept"])
    head_tokens = sum(len(r["response_ids"]) for r in rows if r["kept"])  # response-only LM head
    prompt_ids = {p.index: list(p.token_ids) for p in engine.train_prompts}
    kept = [[prompt_ids[r["prompt_index"]], r["response_ids"]] for r in rows if r["kept"]]
    return {
        "generate": record["time_generate"],
        "score": record["time_score"],
        "train": record["time_train"],
        "step": record["time_step"],
        "gen_tokens": record["generated_tokens"],
        "train_tokens": trained,
        "head_tokens": head_tokens,
        "kept": record["kept"],
        "mem": memory.growth_mb,
        "kept_sequences": kept,
        "model": engine.model,
        "tokenizer": engine.tokenizer,
        "prompts": engine.train_prompts[: args.prompts],
    }


def baseline_step(kind: str, args: argparse.Namespace, model, tokenizer, prompts) -> dict:
    """The sequential reference-style loop (kind='sequential') or the transformers loop ('transformers')."""
    model.train(False)
    texts = [p.text for p in prompts]
    answers = [p.extra["answer"] for p in prompts]
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    common = {
        "max_new_tokens": args.tokens,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        if kind == "sequential":  # N separate calls over the prompt batch
            outs = [model.generate(**encoded, **common) for _ in range(args.n)]
            rows = [out[i] for i in range(len(prompts)) for out in outs]
        else:
            out = model.generate(**encoded, num_return_sequences=args.n, **common)
            rows = list(out)
    t_generate = time.perf_counter() - start
    width = encoded["input_ids"].shape[1]
    responses, reasons, response_ids = [], [], []
    for row in rows:
        ids = row[width:].tolist()
        if tokenizer.eos_token_id in ids:
            ids, reason = ids[: ids.index(tokenizer.eos_token_id) + 1], "eos"
        else:
            reason = "length"
        response_ids.append(ids)
        responses.append(tokenizer.decode(ids, skip_special_tokens=True))
        reasons.append(reason)
    start = time.perf_counter()
    rewards = []
    for i in range(len(responses)):  # one blocking reward call per response (sequential) or per batch
        if kind == "sequential":
            rewards += addition_correct([responses[i]], [answers[i // args.n]], [reasons[i]])
    if kind != "sequential":
        rewards = addition_correct(responses, [answers[i // args.n] for i in range(len(responses))], reasons)
    t_score = time.perf_counter() - start
    kept = []
    for p in range(len(prompts)):
        group = rewards[p * args.n : (p + 1) * args.n]
        best = max(range(args.n), key=lambda s: (group[s], -s))
        prompt_ids = tokenizer(texts[p], add_special_tokens=False)["input_ids"]
        kept.append(TrainSequence(tuple(prompt_ids), tuple(response_ids[p * args.n + best])))
    model.train(True)
    with PeakRSS() as memory:
        start = time.perf_counter()
        if kind == "sequential":
            _full_softmax_update(model, kept, tokenizer.pad_token_id, args)
        else:
            _trainer_update(model, kept, tokenizer.pad_token_id, args, tokenizer)
        t_train = time.perf_counter() - start
    return {
        "generate": t_generate,
        "score": t_score,
        "train": t_train,
        "step": t_generate + t_score + t_train,
        "gen_tokens": sum(len(r) for r in response_ids),
        "train_tokens": sum(len(s) for s in kept),
        "head_tokens": sum(len(s) for s in kept),  # full logits: the LM head runs on every position
        "kept": len(kept),
        "mem": memory.growth_mb,
    }


def _full_softmax_update(model, kept, pad_id, args) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.zero_grad(set_to_none=True)
    for i in range(0, len(kept), args.micro):
        ids, attention, response = collate(kept[i : i + args.micro], pad_id, torch.device("cpu"))
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
        picked = logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * response[:, 1:]
        loss = -(picked.sum(1) / response[:, 1:].sum(1)).sum() / len(kept)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _sft_examples(kept) -> list[dict]:
    """Pre-tokenized pairs, loss on the response only (prompt labels -100)."""
    return [
        {"input_ids": [*s.prompt_ids, *s.response_ids], "labels": [-100] * len(s.prompt_ids) + list(s.response_ids)}
        for s in kept
    ]


def _trainer_update(model, kept, pad_id, args, tokenizer=None) -> None:
    """Baseline 2's fine-tuning pass: TRL's SFTTrainer if TRL is installed, else transformers' Trainer."""
    if USE_TRL and tokenizer is not None:
        _trl_update(model, kept, tokenizer, args)
        return
    from transformers import Trainer, TrainingArguments

    examples = _sft_examples(kept)

    def collate_fn(batch):
        width = max(len(b["input_ids"]) for b in batch)
        return {
            "input_ids": torch.tensor([b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]),
            "attention_mask": torch.tensor(
                [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
            ),
            "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
        }

    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.micro,
            num_train_epochs=1,
            learning_rate=1e-5,
            max_grad_norm=1.0,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            gradient_accumulation_steps=max(1, len(kept) // args.micro),
        )
        Trainer(model=model, args=arguments, train_dataset=examples, data_collator=collate_fn).train()


def _trl_update(model, kept, tokenizer, args) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.micro,
            gradient_accumulation_steps=max(1, len(kept) // args.micro),
            num_train_epochs=1,
            learning_rate=1e-5,
            max_grad_norm=1.0,
            max_length=None,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            # TRL turns activation checkpointing on by default (slower, less memory); the other contenders
            # do not checkpoint, and it would stay switched on in the shared model afterwards.
            gradient_checkpointing=False,
        )
        dataset = Dataset.from_list(_sft_examples(kept))
        SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train()


def baseline_2_name() -> str:
    return "TRL SFT loop" if USE_TRL else "transformers loop"


def training_pass_process(kind: str, args: argparse.Namespace, kept_file: Path) -> dict:
    """Run one contender's training pass alone in a fresh process; returns its peak and its time."""
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--micro",
        str(args.micro),
        "--baseline2",
        args.baseline2,
    ]
    command += ["--train-pass", kind, "--kept", str(kept_file)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_pass_only(args: argparse.Namespace) -> None:
    """The child side of :func:`training_pass_process`: load, train once, print peak RSS as JSON."""
    from thresher.core.config import OptimConfig
    from thresher.core.model import load_policy
    from thresher.core.trainer import Trainer
    from thresher.core.types import PluginContext
    from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

    model, tokenizer = load_policy(f"builtin:{args.model}")
    kept = [TrainSequence(tuple(p), tuple(r)) for p, r in json.loads(Path(args.kept).read_text())]
    loaded_mb = _rss() / 2**20
    model.train(True)
    start = time.perf_counter()
    if args.train_pass == "thresher":
        loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config(), PluginContext())
        optim = OptimConfig(lr=1e-5, micro_batch_size=args.micro, grad_clip=1.0)
        Trainer(model, loss, optim, max_steps=1, pad_id=tokenizer.pad_token_id, device=torch.device("cpu")).train_step(
            0, kept
        )
    elif args.train_pass == "transformers":
        _trainer_update(model, kept, tokenizer.pad_token_id, args, tokenizer)
    else:
        _full_softmax_update(model, kept, tokenizer.pad_token_id, args)
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss() / 2**20
    print(json.dumps({"peak_mb": peak_mb, "loaded_mb": loaded_mb, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--train-pass", choices=["thresher", "transformers", "sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--kept", help=argparse.SUPPRESS)
    parser.add_argument("--baseline2", choices=["trainer", "trl"], default="trainer", help="baseline 2's SFT pass")
    args = parser.parse_args()
    global USE_TRL
    USE_TRL = args.baseline2 == "trl"
    if USE_TRL and importlib.util.find_spec("trl") is None:
        parser.error("--baseline2 trl needs TRL (see the README for the pins that keep numpy < 2)")
    if args.train_pass:
        train_pass_only(args)
        return
    peak = matmul_flops()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        smollm2 = args.model == "smollm2"  # 200+ tokens; the tiny model's characters must fit its 512
        data = make_data(scratch, args.prompts * 4, repeats=2 if smollm2 else 1, tail=TAIL if smollm2 else "")
        ours = thresher_step(args, data, scratch)
        model, tokenizer, prompts = ours.pop("model"), ours.pop("tokenizer"), ours.pop("prompts")
        params = sum(p.numel() for p in model.parameters())
        prompt_len = sum(len(p.token_ids) for p in prompts) / len(prompts)
        results = {"thresher": ours}
        for kind in ("transformers", "sequential"):
            baseline_step(kind, args, model, tokenizer, prompts)  # warm-up
            results[kind] = baseline_step(kind, args, model, tokenizer, prompts)
        kept_file = scratch / "kept.json"
        kept_file.write_text(json.dumps(ours.pop("kept_sequences")))
        memory = {kind: training_pass_process(kind, args, kept_file) for kind in results}
    print(
        f"\nmodel {args.model} ({params / 1e6:.1f}M params): {args.prompts} prompts of ~{prompt_len:.0f} tokens x "
        f"N={args.n}, <= {args.tokens} new tokens; {torch.get_num_threads()} threads; "
        f"measured fp32 matmul {peak / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{'':<18}{'generate s':>11}{'gen tok/s':>10}{'score s':>9}{'train s':>9}{'train %peak':>12}"
        f"{'step s':>8}{'step ratio':>11}"
    )
    for name, r in results.items():
        flops = training_flops(model, r["train_tokens"], r["head_tokens"]) / r["train"] if r["train"] > 0 else 0
        ratio = r["step"] / results["thresher"]["step"]
        print(
            f"{_label(name):<18}{r['generate']:>11.2f}{r['gen_tokens'] / r['generate']:>10.1f}{r['score']:>9.3f}"
            f"{r['train']:>9.2f}{100 * flops / peak:>11.0f}%{r['step']:>8.2f}{ratio:>10.2f}x"
        )
    ours = results["thresher"]
    print(
        f"\ntraining pass alone, each in a fresh process, on the same {ours['kept']} kept sequences "
        f"({ours['train_tokens']} tokens):"
    )
    print(f"{'':<18}{'train s':>9}{'train %peak':>12}{'peak RSS MB':>12}{'above loaded model MB':>23}")
    for name, m in memory.items():
        head = ours["head_tokens"] if name == "thresher" else ours["train_tokens"]
        flops = training_flops(model, ours["train_tokens"], head) / m["seconds"]
        print(
            f"{_label(name):<18}{m['seconds']:>9.2f}{100 * flops / peak:>11.0f}%{m['peak_mb']:>12.0f}"
            f"{m['peak_mb'] - m['loaded_mb']:>23.0f}"
        )


def _label(kind: str) -> str:
    return baseline_2_name() if kind == "transformers" else kind


if __name__ == "__main__":
    main()
