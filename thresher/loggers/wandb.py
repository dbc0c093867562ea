"""The ``wandb`` logger: the run's metrics, reward histograms and best/worst kept responses in
Weights & Biases.

Metrics go under the names every tracker logger uses (``reward/mean``, ``validation/reward_greedy``:
:mod:`thresher.loggers.tags`), each at its global step; the run's ``config.yaml`` becomes the W&B run's
config. W&B's files go to ``RUN/wandb``. Offline (``mode: offline`` or ``WANDB_MODE=offline``) nothing
touches the network; ``wandb sync RUN/wandb/offline-run-*`` uploads it later. A resumed Thresher run
continues the same W&B run (its id is kept in ``RUN/wandb/thresher_run_id``); W&B ignores steps it
already has, so the steps a killed run logged past its checkpoint keep their first values there.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, model_validator

from thresher.core.config import Section
from thresher.core.errors import PluginError
from thresher.core.types import PluginContext
from thresher.loggers.common import check_installed, run_dir_of
from thresher.loggers.tags import best_and_worst_kept, numeric, scalars

MISSING = "needs the wandb package: pip install 'thresher[wandb]'"
SAMPLE_COLUMNS: list[str | int] = ["reward", "prompt", "response", "prompt_index", "sample", "finish_reason"]


class WandbLogger:
    name: ClassVar[str] = "wandb"

    class Config(Section):
        project: str = Field("thresher", description="W&B project.")
        entity: str | None = Field(None, description="W&B team or user (None: your default).")
        run_name: str | None = Field(None, description="W&B run name (None: the run directory's name).")
        mode: Literal["online", "offline", "disabled"] | None = Field(
            None, description="None: WANDB_MODE, else online. offline writes RUN/wandb only (wandb sync uploads it)."
        )
        tags: list[str] = Field(default_factory=list, description="W&B run tags.")
        samples: int = Field(1, ge=0, description="Best and worst kept responses logged as a table each step.")
        histograms: bool = Field(True, description="Histograms of each step's rewards (all, kept).")

        @model_validator(mode="after")
        def _installed(self) -> WandbLogger.Config:
            check_installed("wandb", MISSING)
            return self

    def __init__(self, config: Config, context: PluginContext):
        try:
            import wandb
        except ImportError:
            raise PluginError(f"logger wandb: {MISSING}") from None
        run_dir = run_dir_of(context, self.name)
        self.config = config
        self.wandb = wandb
        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "thresher_run_id"
        resuming = bool(context.resumed_step) and id_file.is_file()
        run_id = id_file.read_text().strip() if resuming else _new_run_id()
        self.run = wandb.init(
            project=config.project,
            entity=config.entity,
            name=config.run_name or run_dir.name,
            dir=str(run_dir),
            config=_run_config(run_dir),
            mode=config.mode,
            tags=config.tags or None,
            id=run_id,
            resume="allow" if resuming else None,
            reinit="create_new",
        )
        id_file.write_text(run_id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        if record.get("kind") == "stop":
            self.run.summary["stopped"] = str(record.get("reason", ""))
            return
        self.run.log(scalars(record), step=step)

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        data: dict[str, Any] = {}
        if self.config.histograms:
            rewards = [r["reward"] for r in rows if numeric(r.get("reward")) is not None]
            kept = [r["reward"] for r in rows if r.get("kept") and numeric(r.get("reward")) is not None]
            for tag, values in (("reward/all", rewards), ("reward/kept", kept)):
                if values:
                    data[tag] = self.wandb.Histogram(values)
        if self.config.samples:
            best, worst = best_and_worst_kept(rows, self.config.samples)
            for tag, chosen in (("samples/best_kept", best), ("samples/worst_kept", worst)):
                if chosen:
                    table = [[row.get(str(column)) for column in SAMPLE_COLUMNS] for row in chosen]
                    data[tag] = self.wandb.Table(columns=SAMPLE_COLUMNS, data=table)
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


def _new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as W&B makes them), chosen here so it can be kept."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``, written before the loggers open)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}
