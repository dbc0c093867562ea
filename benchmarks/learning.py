"""Does it learn, and better than the alternatives? One task, one budget, one evaluator, several trainers.

    python benchmarks/learning.py --task arithmetic --seeds 3            # the table in docs/learning.md
    python benchmarks/learning.py --task demo --trainers thresher,random,trl
    python benchmarks/learning.py --task arithmetic --thresher "n16:rs.num_rollouts_per_prompt=16"
    python benchmarks/learning.py --task arithmetic --steps 2 --max-val 16 --trainers thresher   # plumbing

Every trainer trains in its own process on the same model, prompts, reward, sampling settings and
budget (prompts per step × N × steps, max new tokens, learning rate); then **one** evaluator, also a
process of its own, scores every resulting model (and the untrained one) on the held-out split:
greedy and one sampled answer per prompt, overall and per group (``level``), with the same prompt
formatting (the preset's: its chat template) for all. Trainers:

- ``thresher``: the task's preset as it is (top-1 per prompt, kept only if correct);
- ``random``: the matched baseline: the ``random`` selector keeps as many responses per prompt as
  the preset's selector would, chosen blindly;
- ``trl``: TRL's ``GRPOTrainer`` (``pip install -e '.[bench]'``) with the same completions per step
  (``per_device_train_batch_size`` = N, ``gradient_accumulation_steps`` = prompts per step, so one
  generation batch per optimizer step), ``beta`` and the loss at TRL's defaults, its reward function
  wrapping the same rule. TRL hands reward functions ``completion_ids`` cut *after* the first EOS,
  so a response counts as finished (not cut off) when its last id is an EOS id of the model;
- ``NAME:KEY=V,...`` (``--thresher``, repeatable): the preset with these overrides.

It prints one table — trainer, wall-clock, steps, seconds per step, generated tokens (and per kept
token), peak RSS, held-out greedy and sampled pass rate overall and per level — with mean ± spread
(min–max) over seeds, and writes ``results.json`` and the evaluator's per-prompt answers
(``eval_<trainer>_s<seed>.jsonl``) into ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"demo": "demo", "arithmetic": "arithmetic"}  # task -> preset
EVAL_SEED = 20_261_130  # one sampled answer per prompt, the same draw for every trainer's model
BUILTIN = ("thresher", "random", "trl")


# --- the parent: run every trainer, then the evaluator, then print the table ------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    parser.add_argument("--trainers", default="thresher,random,trl", help="Comma-separated: thresher, random, trl.")
    parser.add_argument("--thresher", action="append", default=[], metavar="NAME:KEY=V,...")
    parser.add_argument("--steps", type=int, help="Global steps (default: the preset's).")
    parser.add_argument("--lr", type=float, help="Learning rate (default: the preset's).")
    parser.add_argument("--seed", type=int, default=1, help="First seed.")
    parser.add_argument("--seeds", type=int, default=1, help="Seeds per trainer: seed, seed+1, ...")
    parser.add_argument("--max-val", type=int, help="Evaluate on the first N held-out prompts only.")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "learning")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V", help="Override for every trainer.")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Keep the trained models and evaluations already in --out (from an interrupted or earlier run of "
        "the same command) instead of running them again.",
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(json.loads(args._child))
        return
    trainers = parse_trainers(args.trainers, args.thresher)
    args.out.mkdir(parents=True, exist_ok=True)
    shared = {"task": args.task, "steps": args.steps, "lr": args.lr, "set": args.set, "max_val": args.max_val}
    results: list[dict[str, Any]] = []
    models = [("base", 0, None)]  # the untrained policy, evaluated like the others
    for name, overrides in trainers:
        for seed in range(args.seed, args.seed + args.seeds):
            out = args.out / f"{name}_s{seed}"
            job = {**shared, "role": "train", "trainer": name, "overrides": overrides, "seed": seed, "out": str(out)}
            summary = reused(out, args.reuse, f"{name} (seed {seed})")
            if summary is None:
                print(f"training {name} (seed {seed}) ...", flush=True)
                summary = run_child(job)
            summary.update(trainer=name, seed=seed)
            results.append(summary)
            models.append((name, seed, summary["final"]))
    for name, seed, final in models:
        job = {**shared, "role": "eval", "model": final, "out": str(args.out / f"eval_{name}_s{seed}.jsonl")}
        scores = reused(Path(job["out"]), args.reuse, f"the evaluation of {name} (seed {seed})")
        if scores is None:
            print(f"evaluating {name}" + (f" (seed {seed})" if final else " (the untrained policy)"), flush=True)
            scores = run_child(job)
        if final is None:
            results.append({"trainer": "base", "seed": 0, **scores})
        else:
            next(r for r in results if r["trainer"] == name and r["seed"] == seed).update(scores)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def parse_trainers(names: str, custom: list[str]) -> list[tuple[str, list[str]]]:
    trainers: list[tuple[str, list[str]]] = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in BUILTIN:
            raise SystemExit(f"--trainers: unknown {name!r}; known: {', '.join(BUILTIN)} (or --thresher NAME:K=V,...)")
        trainers.append((name, []))
    for spec in custom:
        name, sep, body = spec.partition(":")
        if not sep or not name or name in BUILTIN:
            raise SystemExit(f"--thresher {spec!r}: expected NAME:KEY=V,... with a NAME other than {BUILTIN}")
        trainers.append((name, [item for item in body.split(",") if item]))
    return trainers


def reused(out: Path, reuse: bool, what: str) -> dict[str, Any] | None:
    """With ``--reuse``, the summary an earlier run left for this training or evaluation (a training's
    only with its final model)."""
    summary_path = out.with_suffix(".summary.json")
    if not reuse or not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if "final" in summary and not Path(summary["final"]).exists():
        return None
    print(f"reusing {what}: {summary_path}", flush=True)
    return summary


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """One trainer or the evaluator in a fresh process; its own wall-clock and peak RSS measured."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--_child", json.dumps(job)], cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{job['role']} {job.get('trainer', '')} failed (exit {process.returncode})")
    summary_path = Path(job["out"]).with_suffix(".summary.json")
    result = json.loads(summary_path.read_text())
    if job["role"] == "train":
        result.update(wall_s=time.perf_counter() - started, peak_rss_mb=usage.ru_maxrss / 1024)
        summary_path.write_text(json.dumps(result))  # what --reuse finds again
    return result


# --- the children -----------------------------------------------------------------------------------


def child(job: dict[str, Any]) -> None:
    out = Path(job["out"])
    if job["role"] == "eval":
        summary = evaluate(job)
    elif job["trainer"] == "trl":
        summary = train_trl(job)
    else:
        summary = train_thresher(job)
    out.with_suffix(".summary.json").write_text(json.dumps(summary))


def overrides_for(job: dict[str, Any]) -> list[str]:
    items = list(job["set"])
    if job.get("steps"):
        items.append(f"rs.max_steps={job['steps']}")
    if job.get("lr"):
        items.append(f"optim.lr={job['lr']}")
    if job.get("max_val"):
        items.append(f"rs.val_max_prompts={job['max_val']}")
    return items


def train_thresher(job: dict[str, Any]) -> dict[str, Any]:
    from thresher.core.runner import Run

    preset = TASKS[job["task"]]
    items = [*overrides_for(job), f"rs.seed={job['seed']}", f"output.dir={job['out']}", "output.overwrite=true"]
    if job["trainer"] == "random":
        like = Run.from_config(preset, items).config.to_dict()["selector"]
        items.append(f"selector={json.dumps({'type': 'random', 'like': like})}")
    items += job["overrides"]
    started = time.perf_counter()
    with Run.from_config(preset, items, quiet=True) as run:
        history = run.train()
    steps = len(history)  # rs.max_steps, or fewer with rs.max_generated_tokens
    final = [r for r in json_lines(Path(job["out"]) / "metrics.jsonl") if r.get("kind") == "validation"]
    entropy = [r["policy_entropy"] for r in history if r.get("policy_entropy") is not None]
    return {
        "final": str(Path(job["out"]) / "final"),
        "train_s": time.perf_counter() - started,
        "steps": steps,
        "generated_tokens": int(sum(r.get("generated_tokens", 0) for r in history)),
        "kept_tokens": int(sum(r.get("kept_tokens") or 0 for r in history)),
        "own_final_val_reward_greedy": final[-1].get("val_reward_greedy") if final else None,
        **first_and_last(entropy),
    }


def first_and_last(entropy: list[float]) -> dict[str, float]:
    """The policy's entropy at the first and the last step (its fall is the collapse to watch)."""
    return {"entropy_first": entropy[0], "entropy_last": entropy[-1]} if entropy else {}


def train_trl(job: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same model, prompts, reward and budget."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from thresher.core.config import load_config
    from thresher.core.data import use_chat_template
    from thresher.core.datasource import read_rows, resolve_data_path
    from thresher.core.model import load_policy, load_tokenizer
    from thresher.core.registry import build_registry
    from thresher.scorers.rules import load_callable

    config = load_config(TASKS[job["task"]], overrides_for(job), build_registry())
    rs, gen = config.rs, config.generator.config
    torch.manual_seed(job["seed"])
    tokenizer = load_tokenizer(config.model.path)
    model, tokenizer = load_policy(config.model.path, "float32", job["seed"], tokenizer, torch.device("cpu"))
    data = config.data
    rows = read_rows(str(resolve_data_path(data.train)), field=data.field, messages_field=data.messages_field)
    chat = use_chat_template(data.chat_template, tokenizer)  # the formatting Thresher's runs use

    def prompt(text: str) -> Any:
        return [{"role": "user", "content": text}] if chat else text

    dataset = Dataset.from_list([{**row, "prompt": prompt(row[data.field])} for _, row in rows])
    rule = load_callable(config.scorer.config.function, "scorer.function")
    eos_ids = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                  else [model.generation_config.eos_token_id]) | {tokenizer.eos_token_id}  # fmt: skip
    generated: list[int] = []

    accepted = inspect.signature(rule).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())

    def reward(completions: list[Any], completion_ids: list[list[int]], **columns: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        reasons = ["eos" if ids and ids[-1] in eos_ids else "length" for ids in completion_ids]
        generated.extend(len(ids) for ids in completion_ids)
        offered = {"finish_reasons": reasons, **{k: v for k, v in columns.items() if k in dataset.column_names}}
        kwargs = {k: v for k, v in offered.items() if takes_any or k in accepted}  # what the rule asks for
        return [float(r) for r in rule(texts, **kwargs)]

    out = Path(job["out"])
    args = GRPOConfig(
        output_dir=str(out / "trl"),
        max_steps=rs.max_steps,
        learning_rate=config.optim.lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=rs.num_rollouts_per_prompt,
        gradient_accumulation_steps=rs.prompts_per_step,
        num_generations=rs.num_rollouts_per_prompt,
        max_completion_length=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_grad_norm=config.optim.grad_clip or 0.0,
        seed=job["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # TRL's default recomputes activations; Thresher's CPU runs keep them
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    # TRL's entropy is over every completion token of the step (Thresher's: over the trained ones)
    entropy = [float(log["entropy"]) for log in trainer.state.log_history if "entropy" in log]
    return {
        "final": str(out / "final"),
        "train_s": train_s,
        "steps": rs.max_steps,
        "generated_tokens": sum(generated),
        **first_and_last(entropy),
    }


def evaluate(job: dict[str, Any]) -> dict[str, Any]:
    """Greedy and one sampled answer per held-out prompt, through the preset's own generator and
    scorer (what a Thresher run's validation does), so a Thresher run's greedy score here equals its
    own final validation."""
    from thresher.core.runner import Run

    items = overrides_for(job)
    if job["model"]:
        items.append(f"model.path={job['model']}")
    with Run.from_config(TASKS[job["task"]], items, quiet=True) as run:
        run.setup(training=False)
        session, group = run.session, run.config.data.group_field
        generator, scorer, prompts = session.plugins.generator, session.plugins.scorer, session.inputs.val_prompts
        rows: list[dict[str, Any]] = []
        scores: dict[str, Any] = {}
        for mode in ("greedy", "sampled"):
            rollouts = generator.generate(prompts, 1, seed=EVAL_SEED, greedy=mode == "greedy")
            rewards = [float(r) for r in scorer.score(rollouts)]
            scores[f"{mode}"] = statistics.fmean(rewards)
            for rollout, value in zip(rollouts, rewards, strict=True):
                level = str(rollout.prompt.extra.get(group, "all")) if group else "all"
                scores.setdefault(f"{mode}_{level}", []).append(value)
                rows.append({"mode": mode, "prompt": rollout.prompt.text, "level": level, "response": rollout.text,
                             "finish_reason": rollout.finish_reason, "reward": value})  # fmt: skip
    Path(job["out"]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {key: statistics.fmean(v) if isinstance(v, list) else v for key, v in scores.items()}


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the table ------------------------------------------------------------------------------------


def print_table(results: list[dict[str, Any]]) -> None:
    levels = sorted({k.removeprefix("greedy_") for r in results for k in r if k.startswith("greedy_")})
    columns = ["wall_s", "steps", "s_per_step", "generated_tokens", "gen_per_kept", "peak_rss_mb", "entropy_first",
               "entropy_last", "greedy", "sampled"]  # fmt: skip
    columns += [f"greedy_{level}" for level in levels if level != "all"]
    print("| trainer | seeds | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name in dict.fromkeys(r["trainer"] for r in results):
        runs = [r for r in results if r["trainer"] == name]
        for r in runs:
            if r.get("steps"):
                r["s_per_step"] = r["train_s"] / r["steps"]
            if r.get("kept_tokens"):  # Thresher's runs: generated tokens per kept (trained-on) token
                r["gen_per_kept"] = r["generated_tokens"] / r["kept_tokens"]
        cells = [spread([r[c] for r in runs if r.get(c) is not None], c) for c in columns]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


def spread(values: list[float], column: str) -> str:
    """``mean`` for one value, ``mean (min–max)`` for several; blank where not measured."""
    if not values:
        return ""
    whole = ("wall_s", "steps", "generated_tokens", "peak_rss_mb")
    digits = 0 if column in whole else (1 if column in ("s_per_step", "gen_per_kept") else 3)
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"


if __name__ == "__main__":
    main()
