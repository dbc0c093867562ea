"""One rejection-sampling step: Thresher vs the loops users build today, same model, prompts, N, seed.

    python benchmarks/rs_step.py --model smollm2     # prompts of 200+ tokens, N = 8
    python benchmarks/rs_step.py --model tiny

Contenders (each does generate → score → keep the best per prompt → one fine-tuning update):
1. sequential: the reference implementation's style: N separate sampling calls per prompt batch,
   blocking reward calls, and the loss over a full-sequence (sequence × vocabulary) log-softmax;
2. the hand-built loop: generate(num_return_sequences=N), scoring, then TRL's SFTTrainer on the kept
   pairs (``pip install -e '.[bench]'``), or transformers' Trainer where TRL is not installed
   (``--baseline2`` picks one);
3. Thresher: the engine's step (fast decode with shared prefix attention, response-only logits,
   length-sorted micro-batches).

Each contender runs in its own fresh process, loads the model from the same files, runs a warm-up
step, then the measured step on the prompt batches Thresher's engine drew for its steps 1 and 2:
nothing one contender leaves behind (a trainer's autocast wrapper, allocator state, warmed caches)
can touch another's figures. All run in fp32.

Prints per phase wall time and tokens/s, the ratios baseline / Thresher, the training pass's
achieved FLOP/s (6 × parameters × tokens / s, the LM head counted only on the positions where it runs)
against this machine's fp32 matmul FLOP/s (the best 2048³ product rate, measured before and after the
contenders, the higher taken), and the training pass's peak memory. Memory is measured in a fresh
process per contender that loads the model and runs only that contender's training pass on the same
kept sequences (Thresher's), so the process's peak RSS (VmHWM) is the training pass's peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from thresher.core.config import load_config
from thresher.core.console import ConsoleReporter
from thresher.core.registry import build_registry
from thresher.core.runner import Run
from thresher.core.training.trainer import TrainSequence, collate
from thresher.presets.rewards import addition_correct

FILLER = (
    "You are a careful assistant. Read the background, then answer the question at the end. Background: "
    "arithmetic is the branch of mathematics that studies numbers and the operations on them, such as "
    "addition, subtraction, multiplication and division. People have used it for trade, measurement and "
    "astronomy for thousands of years, and children learn to add small numbers long before they learn "
    "anything else about mathematics. "
)
ANSWER = "Answer with just the number."
# Takes the chat-formatted SmolLM2 prompts to 200+ tokens.
TAIL = "Now the question, which has one number as its answer. "
CONTENDERS = ("thresher", "transformers", "sequential")


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
    """The machine's fp32 matmul rate: the best of 3 trials of 2048³ products."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(3):
        start, reps = time.perf_counter(), 10
        for _ in range(reps):
            a @ b
        best = max(best, 2 * 2048**3 * reps / (time.perf_counter() - start))
    return best


def training_flops(params: dict, all_tokens: int, head_tokens: int) -> float:
    """Forward + backward ≈ 6 × parameters × tokens, with the LM head counted only where it runs."""
    return 6 * params["body"] * all_tokens + 6 * params["head"] * head_tokens


def parameter_counts(model: torch.nn.Module) -> dict:
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    body = total - (0 if model.config.tie_word_embeddings else head) - head  # the embedding lookup is free
    return {"total": total, "body": body, "head": head}


def make_data(directory: Path, count: int, repeats: int, tail: str = TAIL) -> Path:
    path = directory / "long_prompts.jsonl"
    rows = [
        {"prompt": f"{FILLER * repeats}{tail}What is {a} + {b}? {ANSWER}", "answer": a + b}
        for a, b in [(3 + i % 9, 2 + (i * 5) % 11) for i in range(count)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def thresher_step(args: argparse.Namespace, scratch: Path) -> dict:
    """Thresher's engine: a warm-up step, then the measured one. Writes the prompt batches it drew
    (for the baselines) and its kept sequences (for the memory passes) to ``scratch``."""
    registry = build_registry()
    overrides = [
        f"data.train={scratch / 'long_prompts.jsonl'}",
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
    run = Run(config, registry=registry, reporter=ConsoleReporter(quiet=True))
    run.step()  # warm-up (same work as the measured step)
    record = run.step()
    steps = {
        step: [json.loads(line) for line in (scratch / "thresher" / "rollouts" / f"step_{step}.jsonl").open()]
        for step in (1, 2)
    }
    batches = [sorted({r["prompt_index"] for r in rows}) for rows in steps.values()]
    (scratch / "batches.json").write_text(json.dumps(batches))
    prompt_ids = {p.index: list(p.token_ids) for p in run.session.inputs.train_prompts}
    kept = [[prompt_ids[r["prompt_index"]], r["response_ids"]] for r in steps[2] if r["kept"]]
    (scratch / "kept.json").write_text(json.dumps(kept))
    return {
        "generate": record["time_generate"],
        "score": record["time_score"],
        "train": record["time_train"],
        "step": record["time_step"],
        "gen_tokens": record["generated_tokens"],
        "train_tokens": sum(len(p) + len(r) for p, r in kept),
        "head_tokens": sum(len(r) for _, r in kept),  # response-only LM head
        "kept": record["kept"],
        "params": parameter_counts(run.model),
        "prompt_tokens": sum(len(prompt_ids[i]) for i in batches[1]) / len(batches[1]),
    }


def baseline_run(kind: str, args: argparse.Namespace, scratch: Path) -> dict:
    """A baseline in its own process: the same model files and the prompt batches Thresher drew."""
    from thresher.core.data import load_prompts
    from thresher.core.model import load_policy

    model, tokenizer = load_policy(f"builtin:{args.model}")
    chat = "auto" if args.model == "smollm2" else "never"
    prompts = {p.index: p for p in load_prompts(str(scratch / "long_prompts.jsonl"), tokenizer, chat_template=chat)[0]}
    warm_up, measured = ([prompts[i] for i in batch] for batch in json.loads((scratch / "batches.json").read_text()))
    baseline_step(kind, args, model, tokenizer, warm_up)
    return baseline_step(kind, args, model, tokenizer, measured)


def baseline_step(kind: str, args: argparse.Namespace, model, tokenizer, prompts) -> dict:
    """The sequential reference-style loop (kind='sequential') or the hand-built loop ('transformers')."""
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
        kept.append(TrainSequence(tuple(prompts[p].token_ids), tuple(response_ids[p * args.n + best])))
    model.train(True)
    start = time.perf_counter()
    if kind == "sequential":
        _full_softmax_update(model, kept, tokenizer.pad_token_id, args)
    else:
        _sft_update(model, kept, tokenizer, args)
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


def _sft_update(model, kept, tokenizer, args) -> None:
    """Baseline 2's fine-tuning pass: TRL's SFTTrainer, or transformers' Trainer (``--baseline2``)."""
    if args.baseline2 == "trl":
        _trl_update(model, kept, tokenizer, args)
    else:
        _trainer_update(model, kept, tokenizer.pad_token_id, args)


def _trainer_update(model, kept, pad_id, args) -> None:
    from transformers import Trainer, TrainingArguments

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
        Trainer(model=model, args=arguments, train_dataset=_sft_examples(kept), data_collator=collate_fn).train()


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
            # SFTConfig defaults to bf16 autocast, which this CPU (AVX2, no bf16 units) runs through a
            # reference GEMM ~10x slower than fp32: every contender runs fp32.
            bf16=False,
            # TRL turns activation checkpointing on by default (slower, less memory); the other contenders
            # do not checkpoint.
            gradient_checkpointing=False,
        )
        dataset = Dataset.from_list(_sft_examples(kept))
        SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train()


def _child(args: argparse.Namespace, *extra: str) -> dict:
    """Run this script in a fresh process with ``extra`` arguments; returns the JSON it prints last."""
    command = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts), "--n", str(args.n)]
    command += ["--tokens", str(args.tokens), "--micro", str(args.micro), "--baseline2", args.baseline2, *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_pass_only(args: argparse.Namespace, scratch: Path) -> dict:
    """One contender's training pass alone (the child of the memory measurement): load, train once."""
    from thresher.core.config import OptimConfig
    from thresher.core.model import load_policy
    from thresher.core.training.trainer import Trainer
    from thresher.core.types import PluginContext
    from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

    model, tokenizer = load_policy(f"builtin:{args.model}")
    kept = [TrainSequence(tuple(p), tuple(r)) for p, r in json.loads((scratch / "kept.json").read_text())]
    loaded_mb = _rss() / 2**20
    model.train(True)
    start = time.perf_counter()
    if args.train_pass == "thresher":
        loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config(), PluginContext())
        optim = OptimConfig(lr=1e-5, micro_batch_size=args.micro, grad_clip=1.0)
        Trainer(model, loss, optim, max_steps=1, pad_id=tokenizer.pad_token_id, device=torch.device("cpu")).train_step(
            1, kept
        )
    elif args.train_pass == "transformers":
        _sft_update(model, kept, tokenizer, args)
    else:
        _full_softmax_update(model, kept, tokenizer.pad_token_id, args)
    seconds = time.perf_counter() - start
    return {"peak_mb": _peak_rss() / 2**20, "loaded_mb": loaded_mb, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument(
        "--baseline2",
        choices=["auto", "trl", "trainer"],
        default="auto",
        help="baseline 2's SFT pass: TRL's SFTTrainer, transformers' Trainer, or auto (TRL when installed)",
    )
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--train-pass", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    has_trl = importlib.util.find_spec("trl") is not None
    if args.baseline2 == "auto":
        args.baseline2 = "trl" if has_trl else "trainer"
    if args.baseline2 == "trl" and not has_trl:
        parser.error("--baseline2 trl needs TRL: pip install -e '.[bench]'")
    if args.contender or args.train_pass:  # a child process
        scratch = Path(args.scratch)
        if args.train_pass:
            result = train_pass_only(args, scratch)
        elif args.contender == "thresher":
            result = thresher_step(args, scratch)
        else:
            result = baseline_run(args.contender, args, scratch)
        print(json.dumps(result))
        return
    peak_before = matmul_flops()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        smollm2 = args.model == "smollm2"  # 200+ tokens; the tiny model's characters must fit its 512
        make_data(scratch, args.prompts * 4, repeats=2 if smollm2 else 1, tail=TAIL if smollm2 else "")
        results = {}
        for kind in CONTENDERS:  # Thresher first: it draws the prompt batches the baselines then use
            print(f"running {_label(kind, args)} ...", file=sys.stderr, flush=True)
            results[kind] = _child(args, "--contender", kind, "--scratch", scratch_dir)
        memory = {}
        for kind in CONTENDERS:
            print(f"training pass alone: {_label(kind, args)} ...", file=sys.stderr, flush=True)
            memory[kind] = _child(args, "--train-pass", kind, "--scratch", scratch_dir)
    report(args, results, memory, max(peak_before, matmul_flops()), peak_before)


def report(args: argparse.Namespace, results: dict, memory: dict, peak: float, peak_before: float) -> None:
    """Print the per-phase table, the baseline / Thresher ratios and the training-pass-alone table."""
    ours = results["thresher"]
    params = ours["params"]
    print(
        f"\nmodel {args.model} ({params['total'] / 1e6:.1f}M params): {args.prompts} prompts of "
        f"~{ours['prompt_tokens']:.0f} tokens x N={args.n}, <= {args.tokens} new tokens; "
        f"{torch.get_num_threads()} threads; fp32 matmul {peak / 1e9:.0f} GFLOP/s "
        f"(before {peak_before / 1e9:.0f})"
    )
    print(
        f"{'':<18}{'generate s':>11}{'gen tok/s':>10}{'score s':>9}{'train s':>9}{'train tok/s':>12}"
        f"{'train %peak':>12}{'step s':>8}"
    )
    for name, r in results.items():
        flops = training_flops(params, r["train_tokens"], r["head_tokens"]) / r["train"] if r["train"] > 0 else 0
        print(
            f"{_label(name, args):<18}{r['generate']:>11.2f}{r['gen_tokens'] / r['generate']:>10.1f}"
            f"{r['score']:>9.3f}{r['train']:>9.2f}{r['train_tokens'] / r['train']:>12.1f}"
            f"{100 * flops / peak:>11.0f}%{r['step']:>8.2f}"
        )
    print(f"\nbaseline / Thresher{'generate':>11}{'score':>9}{'train':>9}{'step':>9}")
    for name, r in results.items():
        if name != "thresher":
            ratios = [_ratio(r[phase], ours[phase]) for phase in ("generate", "score", "train", "step")]
            print(f"{_label(name, args):<19}{ratios[0]:>11}{ratios[1]:>9}{ratios[2]:>9}{ratios[3]:>9}")
    print(
        f"\ntraining pass alone, each in a fresh process, on the same {ours['kept']} kept sequences "
        f"({ours['train_tokens']} tokens):"
    )
    print(f"{'':<18}{'train s':>9}{'train %peak':>12}{'peak RSS MB':>12}{'above loaded model MB':>23}")
    for name, m in memory.items():
        head = ours["head_tokens"] if name == "thresher" else ours["train_tokens"]
        flops = training_flops(params, ours["train_tokens"], head) / m["seconds"]
        print(
            f"{_label(name, args):<18}{m['seconds']:>9.2f}{100 * flops / peak:>11.0f}%{m['peak_mb']:>12.0f}"
            f"{m['peak_mb'] - m['loaded_mb']:>23.0f}"
        )


def _ratio(baseline: float, ours: float) -> str:
    """``baseline / ours`` as ``2.50x``; ``-`` where Thresher's time is too small to divide by (< 1 ms)."""
    return f"{baseline / ours:.2f}x" if ours >= 1e-3 else "-"


def _label(kind: str, args: argparse.Namespace) -> str:
    if kind == "transformers":
        return "TRL SFT loop" if args.baseline2 == "trl" else "transformers loop"
    return kind


if __name__ == "__main__":
    main()
