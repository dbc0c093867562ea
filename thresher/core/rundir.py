"""The run directory: what a run writes, written so that a crash never leaves a file a later run
would trust.

Rollout files and the final model are written to a temporary name and renamed into place; the
metrics file is append-only and flushed per line, and a torn last line (a kill mid-write) is ignored
when a resumed run reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from thresher.core.checkpoint import WRITE_ERRORS
from thresher.core.errors import ConfigError, OutputError
from thresher.core.model import save_pretrained_as

RUN_OUTPUTS = ("metrics.jsonl", "rollouts", "checkpoints", "final")
SPACE_MARGIN = 1.1


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.metrics = path / "metrics.jsonl"
        self.rollouts = path / "rollouts"
        self.checkpoints = path / "checkpoints"
        self.final = path / "final"

    def prepare(self, *, resume: bool, overwrite: bool, config_yaml: str) -> None:
        """Fail before any model loads if the directory is unusable or holds another run."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise OutputError(f"output.dir {str(self.path)!r}: not writable ({err.strerror or err})") from None
        if self.metrics.exists() and not resume and not overwrite:
            raise ConfigError(
                [
                    f"output.dir: {str(self.path)!r} already holds a run; use --resume, set "
                    "output.overwrite=true, or choose another directory"
                ]
            )
        if not resume:
            # A fresh run replaces the previous run's outputs (only the names Thresher writes), so
            # nothing stale — an old checkpoint, a later step's rollouts — can be mistaken for ours.
            for name in RUN_OUTPUTS:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.guarded(lambda: self.rollouts.mkdir(exist_ok=True), "rollouts/")
        self.write_atomic(self.path / "config.yaml", config_yaml)

    def check_space(self, checkpoint_bytes: int, final_bytes: int) -> None:
        """Refuse to start when the disk cannot take one checkpoint and the final model."""
        needed = int((checkpoint_bytes + final_bytes) * SPACE_MARGIN)
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise OutputError(
                f"output.dir {str(self.path)!r}: {_size(free)} free, but a checkpoint and the final model of "
                f"this policy need about {_size(needed)}; free some space or choose another directory"
            )

    def guarded(self, action: Any, what: str) -> Any:
        try:
            return action()
        except WRITE_ERRORS as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise OutputError(f"cannot write {self.path / what} ({reason})") from None

    def write_atomic(self, path: Path, text: str) -> None:
        def write() -> None:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)

        self.guarded(write, str(path.relative_to(self.path)))

    def write_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({"step": step, **row}) + "\n" for row in rows)
        self.write_atomic(self.rollouts / f"step_{step}.jsonl", text)

    def save_final(self, model: torch.nn.Module, tokenizer: Any, weights: dict[str, torch.Tensor], dtype: str) -> None:
        """An HF ``from_pretrained`` directory of ``weights`` (the trained masters) cast to ``dtype``."""

        def save() -> None:
            tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".tmp-final"))
            try:
                save_pretrained_as(model, tmp, weights, dtype)
                tokenizer.save_pretrained(tmp)
                if self.final.exists():
                    shutil.rmtree(self.final)
                os.replace(tmp, self.final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        self.guarded(save, "final/")

    def save_final_adapter(
        self,
        peft_model: Any,
        tokenizer: Any,
        dtype: str,
        model: torch.nn.Module,
        merged: dict[str, torch.Tensor] | None,
    ) -> None:
        """``final/`` as a peft adapter directory (``PeftModel.from_pretrained``), and with ``merged``
        also ``final/merged/``, a plain HF model with the adapters merged in."""
        from thresher.core.training.lora import save_adapter

        def save() -> None:
            tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".tmp-final"))
            try:
                save_adapter(peft_model, tmp, dtype)
                tokenizer.save_pretrained(tmp)
                if merged is not None:
                    save_pretrained_as(model, tmp / "merged", merged, dtype)
                    tokenizer.save_pretrained(tmp / "merged")
                if self.final.exists():
                    shutil.rmtree(self.final)
                os.replace(tmp, self.final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        self.guarded(save, "final/")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Metrics lines written so far; a torn last line (the process was killed mid-write) is dropped."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics(self, last_step: int) -> list[dict[str, Any]]:
        """Keep the lines of steps up to ``last_step`` (those after it will run again)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        self.write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"
