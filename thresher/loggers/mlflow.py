"""The ``mlflow`` logger: the run's metrics in MLflow, with the config as parameters and each step's
best/worst kept responses and reward histogram as artifacts.

Metrics go under the names every tracker logger uses (``reward/mean``: :mod:`thresher.loggers.tags`)
at their global step. The store is ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else an SQLite file
in the run directory (``sqlite:///RUN/mlflow.db``, artifacts in ``RUN/mlflow-artifacts``): no server
needed, ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`` shows it. A resumed run continues the
same MLflow run (its id is kept in ``RUN/mlflow_run_id``) and rewrites the steps past its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, model_validator

from thresher.core.config import Section
from thresher.core.errors import PluginError
from thresher.core.types import PluginContext
from thresher.loggers.common import check_installed, run_dir_of
from thresher.loggers.tags import best_and_worst_kept, numeric, scalars

MISSING = "needs mlflow: pip install 'thresher[mlflow]' (mlflow-skinny, with SQLAlchemy for the SQLite store)"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value


class MlflowLogger:
    name: ClassVar[str] = "mlflow"

    class Config(Section):
        tracking_uri: str | None = Field(
            None, description="MLflow store (None: MLFLOW_TRACKING_URI, else sqlite:///RUN/mlflow.db)."
        )
        experiment: str = Field("thresher", description="MLflow experiment (created when missing).")
        run_name: str | None = Field(None, description="MLflow run name (None: the run directory's name).")
        samples: int = Field(1, ge=0, description="Best and worst kept responses saved as an artifact each step.")

        @model_validator(mode="after")
        def _installed(self) -> MlflowLogger.Config:
            check_installed("mlflow", MISSING)
            return self

    def __init__(self, config: Config, context: PluginContext):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise PluginError(f"logger mlflow: {MISSING}") from None
        run_dir = run_dir_of(context, self.name)
        self.config = config
        self._metric = Metric
        uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = (run_dir / "mlflow-artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            experiment_id = self.client.create_experiment(config.experiment, artifact_location=location)
        id_file = run_dir / "mlflow_run_id"
        if context.resumed_step and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=config.run_name or run_dir.name)
            self.run_id = run.info.run_id
            params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in _flat_config(run_dir).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])
            id_file.write_text(self.run_id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        if record.get("kind") == "stop":
            self.client.set_tag(self.run_id, "stopped", str(record.get("reason", "")))
            return
        stamp = int(float(record.get("time") or time.time()) * 1000)
        metrics = [self._metric(key, value, stamp, step) for key, value in scalars(record).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.config.samples:
            return
        best, worst = best_and_worst_kept(rows, self.config.samples)
        rewards = [row["reward"] for row in rows if numeric(row.get("reward")) is not None]
        summary = {"step": step, "rewards": rewards, "best_kept": best, "worst_kept": worst}
        self.client.log_text(self.run_id, json.dumps(summary, indent=1, default=str), f"samples/step_{step}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat_config(run_dir: Path) -> dict[str, Any]:
    """``config.yaml`` as MLflow parameters: ``optim.lr``, ``rs.max_steps``… (nested keys dotted)."""
    path = run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(inner, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = value

    walk(data if isinstance(data, dict) else {}, "")
    return out
