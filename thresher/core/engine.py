"""The rejection-sampling recipe: generate → score → select → train → refresh, once per global step.

One helper per phase, in the order they run; plugins are found through the registry, so this module
imports no plugin. Sampling seeds are derived from ``(rs.seed, step)``, which makes a step's rollouts
independent of what ran before it (and a resumed run sample exactly what an uninterrupted one would).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thresher.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from thresher.core.config import RunConfig, dump_config
from thresher.core.data import PromptStream, load_prompts
from thresher.core.errors import ConfigError, ScorerError, ThresherError
from thresher.core.metrics import ConsoleReporter, MetricsWriter
from thresher.core.model import load_policy, resolve_device
from thresher.core.registry import Registry
from thresher.core.trainer import Trainer, TrainSequence
from thresher.core.types import PluginContext, Prompt, Rollout

VALIDATION_SEED_OFFSET = 7_919
RUN_OUTPUT_DIRS = ("rollouts", "checkpoints", "final")


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def instantiate(registry: Registry, kind: str, spec: Any, context: PluginContext) -> Any:
    """Build the plugin a resolved config section names: ``cls(config, context)``."""
    return registry.get(kind, spec.type)(spec.config, context)


@dataclass
class ScoredStep:
    """A step's rollouts with their rewards [P, N], validity and the selector's decision."""

    rollouts: list[Rollout]
    rewards: torch.Tensor | None  # None when scoring failed (the rollouts are still written)
    valid: torch.Tensor | None
    kept: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)

    def kept_rollouts(self) -> list[Rollout]:
        flat = self.kept.flatten().tolist()
        return [r for r, keep in zip(self.rollouts, flat, strict=True) if keep]


class Engine:
    """Runs one configured experiment. ``run()`` trains; ``produce()`` only makes best-of-N data."""

    def __init__(self, config: RunConfig, registry: Registry, reporter: ConsoleReporter | None = None):
        self.config = config
        self.registry = registry
        self.reporter = reporter or ConsoleReporter()
        self.run_dir = Path(config.output.dir)
        self.history: list[dict[str, Any]] = []
        self.validation_history: list[dict[str, Any]] = []
        self.start_step = 0

    # --- setup -------------------------------------------------------------------------------

    def setup(self, *, training: bool = True, resume: str | bool | None = None) -> None:
        cfg = self.config
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        if training:
            self._prepare_run_dir(resume=bool(resume))
        self.device = resolve_device(cfg.model.device)
        self.reporter.phase(f"loading model {cfg.model.path}")
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_policy(cfg.model.path, cfg.model.dtype, seed=cfg.rs.seed)
        self.model.to(self.device)
        self.reporter.info(
            f"model {cfg.model.path}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters "
            f"on {self.device} ({time.perf_counter() - t0:.1f}s)"
        )
        self.reporter.phase("reading prompts")
        self.train_prompts, skipped = self._load(cfg.data.train)
        self.val_prompts = self._load(cfg.data.validation)[0] if cfg.data.validation else []
        if cfg.rs.val_max_prompts is not None:
            self.val_prompts = self.val_prompts[: cfg.rs.val_max_prompts]
        self.skipped_long_prompts = skipped
        self.stream = PromptStream(self.train_prompts, seed=cfg.rs.seed, shuffle=cfg.data.shuffle)
        context = PluginContext(tokenizer=self.tokenizer, policy=self.model, device=self.device, seed=cfg.rs.seed)
        self.reporter.phase("starting plugins")
        self.generator = instantiate(self.registry, "generator", cfg.generator, context)
        self.scorer = instantiate(self.registry, "scorer", cfg.scorer, context)
        self.selector = instantiate(self.registry, "selector", cfg.selector, context)
        self.loss = instantiate(self.registry, "loss", cfg.loss, context)
        self.trainer = Trainer(
            self.model,
            self.loss,
            cfg.optim,
            max_steps=cfg.rs.max_steps,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            seed=cfg.rs.seed,
        )
        if resume:
            self._resume(resume)
        self.reporter.done()

    def _load(self, source: str) -> tuple[list[Prompt], int]:
        d = self.config.data
        return load_prompts(
            source,
            self.tokenizer,
            field=d.field,
            chat_template=d.chat_template,
            max_prompt_tokens=d.max_prompt_tokens,
            on_long_prompt=d.on_long_prompt,
        )

    def _prepare_run_dir(self, resume: bool) -> None:
        """Fail before any model loads if the run directory is unusable or holds another run."""
        run_dir = self.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ThresherError(f"output.dir {str(run_dir)!r}: not writable ({err.strerror})") from None
        if (run_dir / "metrics.jsonl").exists() and not resume and not self.config.output.overwrite:
            raise ConfigError(
                [
                    f"output.dir: {str(run_dir)!r} already holds a run; use --resume, set "
                    "output.overwrite=true, or choose another directory"
                ]
            )
        if not resume:
            # A fresh run replaces the previous run's outputs (only the names Thresher writes), so
            # nothing stale — an old checkpoint, a later step's rollouts — can be mistaken for ours.
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            for stale in RUN_OUTPUT_DIRS:
                shutil.rmtree(run_dir / stale, ignore_errors=True)
        (run_dir / "rollouts").mkdir(exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")

    def _resume(self, resume: str | bool) -> None:
        path = latest_checkpoint(self.run_dir / "checkpoints") if resume is True else Path(str(resume))
        if path is None:
            raise ThresherError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        state = load_checkpoint(path, self.model, self.trainer.optimizer)
        self.stream.load_state_dict(state["data"])
        self.start_step = int(state["step"])
        # Lines written after the checkpoint belong to steps that will run again: drop them.
        kept_lines = [r for r in _read_jsonl(self.run_dir / "metrics.jsonl") if r["step"] <= self.start_step]
        (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept_lines))
        self.history = [r for r in kept_lines if r.get("kind") == "train"]
        self.validation_history = [r for r in kept_lines if r.get("kind") == "validation"]
        self.reporter.info(f"resumed from {path} at step {self.start_step}")

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Train for ``rs.max_steps`` global steps; returns the per-step metrics."""
        cfg = self.config.rs
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
        try:
            if self.val_prompts and self.start_step == 0:
                self._validate(0, metrics)
            for step in range(self.start_step + 1, cfg.max_steps + 1):
                record = self.step(step)
                metrics.write(record)
                self.history.append(record)
                self.reporter.step(record, cfg.max_steps)
                last = step == cfg.max_steps
                if self.val_prompts and ((cfg.val_every and step % cfg.val_every == 0) or last):
                    self._validate(step, metrics)
                if (cfg.save_every and step % cfg.save_every == 0) or last:
                    self._checkpoint(step)
            if self.config.output.save_final:
                self._save_final()
        finally:
            metrics.close()
            self.reporter.done()
        self.reporter.curve(self.history, self.validation_history)
        return self.history

    def step(self, step: int) -> dict[str, Any]:
        """One global step. Returns its metrics record (also the rollouts file is written)."""
        t0 = time.perf_counter()
        prompts = self.stream.next_batch(self.config.rs.prompts_per_step)
        scored = self.sample_and_select(prompts, step, label=self._step_label(step))
        self._write_rollouts(step, scored)
        kept = scored.kept_rollouts()
        record = {"kind": "train", "step": step, **step_statistics(scored)}
        record["prompts_consumed"] = self.stream.consumed
        if kept:
            self.reporter.phase(f"step {step}: training on {len(kept)} responses")
            sequences = [TrainSequence(r.prompt.token_ids, tuple(r.response_ids)) for r in kept]
            record.update(self.trainer.train_step(step - 1, sequences))
            self.reporter.phase(f"step {step}: refreshing generator weights")
            self.generator.load_weights(self.model)
            record["skipped"] = None
        else:
            record.update(loss=None, grad_norm=None, time_train=0.0, train_tokens=0)
            record["skipped"] = "no rollout selected"
        record.update(scored.timings)
        record["time_step"] = time.perf_counter() - t0
        return record

    def _step_label(self, step: int) -> str:
        """``step 3/15`` plus the last step's rewards, for the live status line."""
        label = f"step {step}/{self.config.rs.max_steps}"
        if self.history:
            last = self.history[-1]
            label += f" (last: reward {last['reward_mean']:.3f}, kept {last['reward_kept_mean'] or 0:.3f})"
        return label

    def sample_and_select(self, prompts: list[Prompt], step: int, label: str) -> ScoredStep:
        n = self.config.rs.num_rollouts_per_prompt
        self.reporter.phase(f"{label}: generating {len(prompts)}×{n} responses")
        t0 = time.perf_counter()
        rollouts = self.generator.generate(prompts, n, seed=step_seed(self.config.rs.seed, step))
        t_generate = time.perf_counter() - t0
        _check_generated(rollouts, len(prompts), n)
        self.reporter.phase(f"{label}: scoring {len(rollouts)} responses")
        t1 = time.perf_counter()
        try:
            flat = _as_rewards(self.scorer.score(rollouts), len(rollouts))
        except ThresherError:
            self._write_rollouts(step, ScoredStep(rollouts, None, None, None))  # nothing generated is lost
            raise
        t_score = time.perf_counter() - t1
        rewards = flat.view(len(prompts), n)
        valid = torch.isfinite(rewards)
        if not bool(valid.all()) and self.config.rs.on_nonfinite_reward == "error":
            self._write_rollouts(step, ScoredStep(rollouts, rewards, valid, torch.zeros_like(valid)))
            bad = int((~valid).sum())
            raise ScorerError(
                f"scorer returned {bad} non-finite reward(s) at step {step} (rollouts saved; set "
                "rs.on_nonfinite_reward=drop to skip such responses)"
            )
        kept = self.selector.select(rewards, valid).to(torch.bool) & valid
        tokens = sum(len(r.response_ids) for r in rollouts)
        timings = {
            "time_generate": t_generate,
            "time_score": t_score,
            "generated_tokens": tokens,
            "tokens_per_s_generate": tokens / t_generate if t_generate > 0 else 0.0,
        }
        return ScoredStep(rollouts, rewards, valid, kept, timings)

    def _validate(self, step: int, metrics: MetricsWriter) -> None:
        self.reporter.phase(f"validating on {len(self.val_prompts)} prompts (greedy)")
        t0 = time.perf_counter()
        seed = step_seed(self.config.rs.seed, step) + VALIDATION_SEED_OFFSET
        rollouts = self.generator.generate(self.val_prompts, 1, seed=seed, greedy=True)
        rewards = _as_rewards(self.scorer.score(rollouts), len(rollouts))
        finite = rewards[torch.isfinite(rewards)]
        record = {
            "kind": "validation",
            "step": step,
            "val_prompts": len(rollouts),
            "val_reward_mean": float(finite.mean()) if len(finite) else float("nan"),
            "val_response_len_mean": sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts)),
            "time_validate": time.perf_counter() - t0,
        }
        metrics.write(record)
        self.validation_history.append(record)
        self.reporter.validation(record)

    def _checkpoint(self, step: int) -> None:
        self.reporter.phase(f"step {step}: writing checkpoint")
        state = {"data": self.stream.state_dict(), "config": self.config.to_dict()}
        save_checkpoint(self.run_dir / "checkpoints", step, self.model, self.trainer.optimizer, state)

    def _save_final(self) -> None:
        self.reporter.phase("writing final model")
        final = self.run_dir / "final"
        self.model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)
        self.reporter.info(f"final model: {final} (load with from_pretrained)")

    def _write_rollouts(self, step: int, scored: ScoredStep) -> None:
        path = self.run_dir / "rollouts" / f"step_{step}.jsonl"
        rewards = scored.rewards.flatten().tolist() if scored.rewards is not None else None
        kept = scored.kept.flatten().tolist() if scored.kept is not None else None
        with path.open("w", encoding="utf-8") as handle:
            for i, r in enumerate(scored.rollouts):
                reward = rewards[i] if rewards is not None else None
                row = rollout_record(r, reward, kept[i] if kept is not None else None)
                handle.write(json.dumps({"step": step, **row}) + "\n")

    # --- best-of-N data production (no training) ---------------------------------------------

    def produce(self, out: Path, *, limit: int | None = None, write_all: bool = False) -> dict[str, int]:
        """Generate, score and select for every training prompt (once); write the kept pairs."""
        prompts = self.train_prompts[:limit] if limit else self.train_prompts
        per_batch = self.config.rs.prompts_per_step
        counts = {"prompts": 0, "rollouts": 0, "kept": 0}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with tmp.open("w", encoding="utf-8") as handle:
            for batch_number, start in enumerate(range(0, len(prompts), per_batch), start=1):
                batch = prompts[start : start + per_batch]
                label = f"prompts {start + 1}-{start + len(batch)}/{len(prompts)}"
                scored = self.sample_and_select(batch, batch_number, label=label)
                rewards, kept = scored.rewards.flatten().tolist(), scored.kept.flatten().tolist()
                for r, reward, keep in zip(scored.rollouts, rewards, kept, strict=True):
                    if keep or write_all:
                        row = rollout_record(r, reward, keep)
                        handle.write(json.dumps({**r.prompt.extra, **row}) + "\n")
                counts["prompts"] += len(batch)
                counts["rollouts"] += len(scored.rollouts)
                counts["kept"] += int(scored.kept.sum())
                self.reporter.info(f"{label}: kept {int(scored.kept.sum())}/{len(scored.rollouts)}")
        tmp.replace(out)
        self.reporter.done()
        return counts

    def close(self) -> None:
        for plugin in (getattr(self, "generator", None), getattr(self, "scorer", None)):
            if plugin is not None:
                plugin.close()


def rollout_record(r: Rollout, reward: float | None, kept: bool | None) -> dict[str, Any]:
    return {
        "prompt_index": r.prompt.index,
        "group": r.group,
        "sample": r.sample,
        "prompt": r.prompt.text,
        "response": r.text,
        "response_ids": r.response_ids,
        "finish_reason": r.finish_reason,
        "reward": reward if reward is None or math.isfinite(reward) else None,
        "kept": kept,
    }


def step_statistics(scored: ScoredStep) -> dict[str, Any]:
    """Reward and length statistics of all and of kept rollouts (what metrics.jsonl records)."""
    rewards, valid, kept = scored.rewards, scored.valid, scored.kept
    finite = rewards[valid]
    kept_rewards = rewards[kept]
    lengths = torch.tensor([len(r.response_ids) for r in scored.rollouts], dtype=torch.float)
    kept_lengths = lengths[kept.flatten()]
    reasons = [r.finish_reason for r in scored.rollouts]
    return {
        "prompts": rewards.shape[0],
        "rollouts": len(scored.rollouts),
        "kept": int(kept.sum()),
        "accept_rate": float(kept.float().mean()),
        "prompts_without_kept": int((~kept.any(dim=1)).sum()),
        "nonfinite_rewards": int((~valid).sum()),
        "reward_mean": _stat(finite, "mean"),
        "reward_std": _stat(finite, "std"),
        "reward_min": _stat(finite, "min"),
        "reward_max": _stat(finite, "max"),
        "reward_kept_mean": _stat(kept_rewards, "mean"),
        "response_len_mean": float(lengths.mean()),
        "response_len_kept_mean": _stat(kept_lengths, "mean"),
        "finished_eos": reasons.count("eos") / len(reasons),
        "finished_stop": reasons.count("stop") / len(reasons),
        "finished_length": reasons.count("length") / len(reasons),
    }


def _stat(values: torch.Tensor, name: str) -> float:
    if values.numel() == 0 or (name == "std" and values.numel() < 2):
        return float("nan")
    return float(getattr(values.float(), name)())


def _as_rewards(value: Any, expected: int) -> torch.Tensor:
    rewards = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
    if rewards.numel() != expected:
        raise ScorerError(f"scorer returned {rewards.numel()} rewards for {expected} responses")
    return rewards


def _check_generated(rollouts: list[Rollout], prompts: int, n: int) -> None:
    if len(rollouts) != prompts * n:
        raise ThresherError(f"generator returned {len(rollouts)} rollouts for {prompts} prompts × N={n}")
    for i, r in enumerate(rollouts):
        if (r.group, r.sample) != (i // n, i % n):
            raise ThresherError(
                f"generator returned rollouts out of order at {i}: (group, sample) = "
                f"({r.group}, {r.sample}), expected ({i // n}, {i % n})"
            )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
