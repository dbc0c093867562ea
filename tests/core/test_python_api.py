"""The Python front door: thresher.Run, thresher.load_config, thresher.register."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import thresher
from thresher.core.errors import ConfigError
from thresher.plugin import PluginContext, Rollout, Section


def test_the_front_door_offers_what_the_docs_name():
    names = {"Run", "RunConfig", "load_config", "register", "unregister", "hookimpl", "__version__"}
    assert names <= set(dir(thresher))


def test_a_run_from_a_preset_with_overrides_trains_and_writes_its_directory(tmp_path):
    overrides = {"rs.max_steps": 2, "rs.prompts_per_step": 4, "output.dir": str(tmp_path / "run")}
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        history = run.train()
    assert [record["step"] for record in history] == [1, 2]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    assert history[0]["reward_mean"] == lines[1]["reward_mean"]  # lines[0]: validation before step 1
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_run_from_a_dict_or_a_run_config_and_best_of_n_production(tmp_path):
    config = thresher.load_config("tiny", ["rs.prompts_per_step=4", f"output.dir={tmp_path / 'unused'}"])
    assert isinstance(config, thresher.RunConfig) and config.rs.prompts_per_step == 4
    as_data = config.to_dict()
    for source in (as_data, config):
        with thresher.Run.from_config(source, overrides={"rs.num_rollouts_per_prompt": 2}, quiet=True) as run:
            counts = run.produce(tmp_path / "pairs.jsonl", limit=4)
        assert counts == {"prompts": 4, "rollouts": 8, "kept": 4}  # topk 1 of each prompt's 2
        rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(row["kept"] for row in rows)


def test_config_mistakes_are_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        thresher.load_config("tiny", {"rs.max_steps": 0, "optim.lr": -1, "selector.type": "nope"})
    problems = "\n".join(caught.value.problems)
    assert "rs.max_steps: Input should be greater than or equal to 1" in problems
    assert "optim.lr: Input should be greater than 0" in problems
    assert "selector.type: unknown selector 'nope'" in problems


class ShortIsBetter:
    """An in-process scorer: no package, no entry point."""

    name = "short_is_better"
    calls = 0

    class Config(Section):
        scale: float = 1.0

    def __init__(self, config, context: PluginContext):
        self.config = config

    def score(self, rollouts: list[Rollout]) -> torch.Tensor:
        type(self).calls += 1
        return torch.tensor([-self.config.scale * len(r.response_ids) for r in rollouts], dtype=torch.float32)

    def close(self) -> None:
        pass


@pytest.fixture
def registered_scorer():
    thresher.register(ShortIsBetter)
    yield ShortIsBetter
    thresher.unregister(ShortIsBetter)


def test_a_class_registered_in_process_is_used_by_a_run(tmp_path, registered_scorer):
    overrides = {
        "scorer": {"type": "short_is_better", "scale": 2.0},
        "rs.max_steps": 1,
        "rs.prompts_per_step": 4,
        "data.validation": None,
        "output.dir": str(tmp_path / "run"),
    }
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        (record,) = run.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert [row["reward"] for row in rows] == [-2.0 * len(row["response_ids"]) for row in rows]
    kept = [row for row in rows if row["kept"]]
    for row in kept:  # the shortest response of each prompt was kept
        assert len(row["response_ids"]) == min(len(r["response_ids"]) for r in rows if r["group"] == row["group"])
    assert registered_scorer.calls == 1 and record["kept"] == 4


def test_register_infers_the_kind_and_replaces_a_rerun_definition(registered_scorer):
    class ShortIsBetterAgain(ShortIsBetter):  # a notebook cell run again: same name, new class
        name = "short_is_better"

    thresher.register(ShortIsBetterAgain)
    try:
        registry = thresher.Run.from_config("tiny", quiet=True).registry
        assert registry.get("scorer", "short_is_better") is ShortIsBetterAgain
    finally:
        thresher.unregister(ShortIsBetterAgain)
    with pytest.raises(thresher.plugin.PluginError, match="it has no kind's methods; pass kind="):
        thresher.register(type("Nothing", (), {"name": "nothing", "Config": Section}))


def print_plan_like_dry_run(run: thresher.Run) -> bool:
    """``str(run.plan())`` is the table ``--dry-run`` prints."""
    plan = run.plan()
    return str(plan) == plan.render() and "peak" in str(plan)


def test_a_run_steps_one_at_a_time(tmp_path):
    overrides = {"rs.prompts_per_step": 4, "data.validation": None, "output.dir": str(tmp_path / "run")}
    run = thresher.Run.from_config("tiny", overrides=overrides, quiet=True)
    try:
        first, second = run.step(), run.step()
    finally:
        run.close()
    assert (first["step"], second["step"]) == (1, 2) and run.history == [first, second]
    assert not Path(tmp_path / "run" / "checkpoints").exists()  # steps alone write no checkpoint
    # ... but their metrics, as train() does: `thresher report` reads a run made step by step
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in written] == [first, second]
    assert print_plan_like_dry_run(run)
