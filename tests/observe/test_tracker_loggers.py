"""The wandb and mlflow loggers, for real: W&B in offline mode (its run file read back record by
record) and MLflow on its SQLite store (read back with ``MlflowClient``), against ``metrics.jsonl``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import thresher
from tests.helpers import read_jsonl
from thresher.loggers.tags import metric_tag


def test_tracker_names_say_their_group_once():
    assert metric_tag("reward_mean", "train") == "reward/mean"
    assert metric_tag("reward_kept_mean", "train") == "reward/kept_mean"
    assert metric_tag("scorer_correct_mean", "train") == "reward/scorer_correct_mean"
    assert metric_tag("time_generate", "train") == "time/generate"
    assert metric_tag("tokens_per_s_generate", "train") == "time/tokens_per_s_generate"
    assert metric_tag("accept_rate", "train") == "selection/accept_rate"
    assert metric_tag("loss", "train") == "train/loss"
    assert metric_tag("val_reward_greedy", "validation") == "validation/reward_greedy"


def train_tiny(tmp_path: Path, logger: dict) -> list[dict]:
    overrides = {
        "rs.max_steps": 2,
        "rs.prompts_per_step": 4,
        "rs.num_rollouts_per_prompt": 4,
        "output.dir": str(tmp_path / "run"),
        "loggers": [logger],
    }
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        run.train()
    return read_jsonl(tmp_path / "run" / "metrics.jsonl")


def wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB's log format (32 KiB blocks;
    each record a CRC, a little-endian length, a type: 1 whole, 2 first, 3 middle, 4 last part)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, parts, records = 7, 32768, [], []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            position += left
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            parts = [payload]
        elif kind == 3:
            parts.append(payload)
        elif kind == 4:
            records.append(b"".join([*parts, payload]))
    return records


def test_wandb_offline_holds_the_metrics_histograms_samples_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = train_tiny(tmp_path, {"type": "wandb", "project": "thresher-test"})
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[int, dict[str, str]] = {}
    config = None
    for raw in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
        elif kind == "run":
            config = {item.key or "/".join(item.nested_key): item.value_json for item in record.run.config.update}
    train = [m for m in metrics if m["kind"] == "train"]
    validation = [m for m in metrics if m["kind"] == "validation"]
    assert [m["step"] for m in train] == [1, 2] and [v["step"] for v in validation] == [0, 2]
    for m in train:
        logged = history[m["step"]]
        assert json.loads(logged["reward/mean"]) == pytest.approx(m["reward_mean"])
        assert json.loads(logged["selection/accept_rate"]) == pytest.approx(m["accept_rate"])
        assert json.loads(logged["train/loss"]) == pytest.approx(m["loss"])
        assert json.loads(logged["reward/all/_type"]) == "histogram"
        assert sum(json.loads(logged["reward/all/values"])) == m["rollouts"]
        assert json.loads(logged["samples/best_kept/_type"]) == "table-file"
    for v in validation:
        assert json.loads(history[v["step"]]["validation/reward_greedy"]) == pytest.approx(v["val_reward_greedy"])
    assert config is not None and json.loads(config["optim"])["lr"] == 3.0e-3


def test_mlflow_on_its_sqlite_store_holds_the_metrics_params_and_samples(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    metrics = train_tiny(tmp_path, {"type": "mlflow", "experiment": "thresher-test"})
    run_dir = tmp_path / "run"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["rs.max_steps"] == "2"
    train = [m for m in metrics if m["kind"] == "train"]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "reward/mean")}
    assert logged == pytest.approx({m["step"]: m["reward_mean"] for m in train})
    greedy = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "validation/reward_greedy")}
    assert greedy == pytest.approx({m["step"]: m["val_reward_greedy"] for m in metrics if m["kind"] == "validation"})
    samples = json.loads(
        (run_dir / "mlflow-artifacts" / run.info.run_id / "artifacts" / "samples" / "step_2.json").read_text()
    )
    rollouts = read_jsonl(run_dir / "rollouts" / "step_2.jsonl")
    best = max(r["reward"] for r in rollouts if r["kept"])
    assert samples["best_kept"][0]["reward"] == pytest.approx(best) and len(samples["rewards"]) == len(rollouts)
