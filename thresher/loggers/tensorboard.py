"""The ``tensorboard`` logger: the run's metrics as TensorBoard scalars, histograms and text.

Event files go to ``RUN/tensorboard`` (``tensorboard --logdir runs/`` shows every run beside the
others). Scalars are grouped by what they describe (``reward/``, ``selection/``, ``diversity/``,
``generation/``, ``train/``, ``time/``, ``validation/``), each at its step and at the wall-clock time
``metrics.jsonl`` recorded. Each step also gets histograms of its rewards (all and kept) and, as
text, its best and worst kept responses: reading them is how reward hacking is caught.

A resumed run starts its event file with a purge at the step after its checkpoint, so the steps a
killed run logged past that point are dropped, as ``metrics.jsonl`` drops them: no duplicate steps.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from thresher.core.errors import PluginError
from thresher.core.types import PluginContext

LOG_DIR = "tensorboard"
MISSING = "needs the tensorboard package: pip install 'thresher[tensorboard]' (scripts/install.sh installs it)"
NOT_SCALARS = frozenset({"kind", "step", "time"})
SELECTION = frozenset(
    {"prompts", "rollouts", "kept", "accept_rate", "prompts_without_kept", "prompts_without_kept_fraction",
     "nonfinite_rewards", "duplicates_not_selectable"}
)  # fmt: skip
GENERATION_PREFIXES = ("response_len", "finished_", "generated_tokens", "generator_", "prompts_")


def scalar_tag(key: str, kind: str) -> str:
    """Where a metric goes in TensorBoard: ``reward/reward_mean``, ``validation/val_reward_greedy``…"""
    if kind == "validation":
        return f"validation/{key}"
    if key.startswith(("reward", "scorer_")):
        group = "reward"
    elif key in SELECTION or key.startswith("selector_"):
        group = "selection"
    elif "distinct" in key:
        group = "diversity"
    elif key.startswith(("time_", "tokens_per_s")):
        group = "time"
    elif key.startswith(GENERATION_PREFIXES):
        group = "generation"
    else:
        group = "train"  # loss, grad_norm, lr, tokens trained, memory, the loss plugin's own metrics
    return f"{group}/{key}"


def numeric(value: Any) -> float | None:
    """The value as a finite float, or None (text, null, bool, NaN are not scalars)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class TensorBoardLogger:
    name: ClassVar[str] = "tensorboard"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        samples: int = Field(1, ge=0, description="Best and worst kept responses shown as text each step.")
        histograms: bool = Field(True, description="Histograms of each step's rewards (all, kept).")

        @model_validator(mode="after")
        def _installed(self) -> TensorBoardLogger.Config:
            # At config validation, not hours later when training starts.
            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError(MISSING)
            return self

    def __init__(self, config: Config, context: PluginContext):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PluginError(f"logger tensorboard: {MISSING}") from None
        if context.run_dir is None:
            raise ValueError("the tensorboard logger needs the run directory in its context")
        self.config = config
        self.log_dir = context.run_dir / LOG_DIR
        purge = context.resumed_step + 1 if context.resumed_step else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        kind, step, walltime = record.get("kind"), int(record.get("step", 0)), record.get("time")
        if kind == "stop":
            self.writer.add_text("run/stopped", str(record.get("reason", "")), step, walltime=walltime)
        else:
            for key, value in record.items():
                number = numeric(value)
                if key not in NOT_SCALARS and number is not None:
                    self.writer.add_scalar(scalar_tag(key, str(kind)), number, step, walltime=walltime)
        self.writer.flush()  # a step is seconds to minutes: show it now, lose nothing to a kill

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        scored = [row for row in rows if numeric(row.get("reward")) is not None]
        kept = sorted((row for row in scored if row.get("kept")), key=lambda row: row["reward"], reverse=True)
        if self.config.histograms:
            import numpy as np

            for tag, group in (("reward/all", scored), ("reward/kept", kept)):
                if group:
                    self.writer.add_histogram(tag, np.array([row["reward"] for row in group]), step)
        if self.config.samples and kept:
            count = self.config.samples
            self.writer.add_text("samples/best_kept", _as_markdown(kept[:count]), step)
            self.writer.add_text("samples/worst_kept", _as_markdown(kept[::-1][:count]), step)

    def close(self) -> None:
        self.writer.close()


def _as_markdown(rows: list[dict[str, Any]]) -> str:
    """Prompt, reward and response; the texts indented as code, so markup in them shows as written."""
    blocks = []
    for row in rows:
        prompt = _code(str(row.get("prompt", "")))
        response = _code(str(row.get("response", "")))
        blocks.append(
            f"**reward {row['reward']:.4g}** (prompt {row.get('prompt_index')}, sample {row.get('sample')}, "
            f"{row.get('finish_reason')})\n\nprompt:\n\n{prompt}\n\nresponse:\n\n{response}"
        )
    return "\n\n---\n\n".join(blocks)


def _code(text: str) -> str:
    return "\n".join("    " + line for line in (text.splitlines() or [""]))
