"""Config validation through the real CLI: one line per problem, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import install
from thresher.core.config import apply_overrides, load_config, resolve_config
from thresher.core.errors import ConfigError
from thresher.core.registry import build_registry, get_plugin_manager


def errors_of(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line.removeprefix("error: ") for line in result.output.splitlines() if line.startswith("error: ")]


def test_valid_config_resolves_plugin_sections(tiny_config, write_config, cli):
    result = cli("config", "validate", write_config(tiny_config))
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["selector"] == {"type": "topk", "top_n_rollouts": 1, "min_reward": None}
    assert resolved["generator"]["top_p"] == 1.0  # plugin defaults filled in


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["generator"].update(type="nope"), "generator.type: unknown generator 'nope'; available: hf"),
        (lambda c: c["rs"].update(max_steps="many"), "rs.max_steps: Input should be a valid integer"),
        (lambda c: c["optim"].update(lr=-1), "optim.lr: Input should be greater than 0"),
        (lambda c: c["optim"].update(learning_rate=1e-4), "optim.learning_rate: unknown key"),
        (lambda c: c["selector"].update(k=2), "selector.k: unknown key"),
        (lambda c: c["selector"].update(top_n_rollouts="two"), "selector.top_n_rollouts: Input should be a valid"),
        (lambda c: c.pop("scorer"), "scorer: section is required (choose one of: combine, local, rule, triton)"),
        (lambda c: c["scorer"].pop("function"), "scorer.function: Field required"),
        (lambda c: c["scorer"].update(function="no_colon"), "scorer.function: expected module:function"),
        (lambda c: c.update(extra_section={}), "extra_section: unknown key"),
        (lambda c: c["data"].pop("train"), "data.train: Field required"),
        (
            lambda c: c["optim"].update(warmup_steps=2, warmup_ratio=0.1),
            "optim: set optim.warmup_steps or optim.warmup_ratio, not both",
        ),
    ],
)
def test_each_mistake_gives_its_one_line_message(tiny_config, write_config, cli, edit, expected):
    edit(tiny_config)
    result = cli("config", "validate", write_config(tiny_config))
    assert result.exit_code == 2
    errors = errors_of(result)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # TRL's names for settings Thresher has under another
        ("optim.learning_rate=1e-4", "optim.learning_rate: unknown key; did you mean optim.lr?"),
        ("rs.num_generations=8", "rs.num_generations: unknown key; did you mean rs.num_rollouts_per_prompt?"),
        (
            "generator.max_completion_length=32",
            "generator.max_completion_length: unknown key; did you mean generator.max_new_tokens?",
        ),
        ("optim.per_device_train_batch_size=4", "did you mean optim.micro_batch_size?"),
        ("report_to=wandb", "report_to: unknown key; did you mean loggers (a list, e.g. [{type: tensorboard}])?"),
        # near spellings, at the top, in a core section and in a plugin's section (its own keys and
        # the framework's options around it)
        ("outptu.dir=x", "outptu: unknown key; did you mean output?"),
        ("generator.tempurature=0.5", "generator.tempurature: unknown key; did you mean generator.temperature?"),
        ("selector.top_n_rollout=2", "selector.top_n_rollout: unknown key; did you mean selector.top_n_rollouts?"),
        ("selector.normalise=rank", "selector.normalise: unknown key; did you mean selector.normalize?"),
        # nothing close: no guess
        ("optim.zzz=1", "optim.zzz: unknown key"),
    ],
)
def test_an_unknown_key_suggests_the_key_meant(cli, override, expected):
    result = cli("config", "validate", "tiny", "--set", override)
    assert result.exit_code == 2
    (error,) = errors_of(result)
    assert error.endswith(expected), error
    if "did you mean" not in expected:
        assert "did you mean" not in error


def test_all_problems_are_reported_at_once(tiny_config, write_config, cli):
    tiny_config["generator"]["type"] = "nope"
    tiny_config["rs"]["num_rollouts_per_prompt"] = 0
    tiny_config["selector"]["bogus"] = True
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 2
    errors = errors_of(result)
    assert sorted(e.split(":")[0] for e in errors) == ["generator.type", "rs.num_rollouts_per_prompt", "selector.bogus"]


def test_user_text_in_errors_is_not_taken_for_markup(tmp_path, cli):
    odd = tmp_path / "[red]odd[/]" / "run.yaml"
    result = cli("train", odd)
    assert result.exit_code == 2
    assert errors_of(result) == [f"config file '{odd}': not found (presets: arithmetic, demo, tiny)"]


def test_missing_file_and_bad_yaml(tmp_path, cli):
    result = cli("train", tmp_path / "missing.yaml")
    assert result.exit_code == 2
    missing = tmp_path / "missing.yaml"
    assert errors_of(result) == [f"config file '{missing}': not found (presets: arithmetic, demo, tiny)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rs:\n  max_steps: [1, 2\n")
    result = cli("config", "validate", bad)
    assert result.exit_code == 2
    (error,) = errors_of(result)
    assert error.startswith(f"config file '{bad}': invalid YAML at line 3")


def test_overrides_win_over_the_file_and_parse_as_yaml(tiny_config, write_config, registry):
    path = write_config(tiny_config)
    config = load_config(
        path,
        [
            "rs.num_rollouts_per_prompt=6",
            "selector.type=threshold",
            "selector.threshold=0.5",
            "optim.grad_clip=null",
            'generator.stop=["\\n"]',
        ],
        registry,
    )
    assert config.rs.num_rollouts_per_prompt == 6
    assert config.selector.type == "threshold" and config.selector.config.threshold == 0.5
    assert config.optim.grad_clip is None
    assert config.generator.config.stop == ["\n"]


def test_override_of_a_plugin_type_revalidates_its_section(tiny_config, write_config, cli):
    result = cli("config", "validate", write_config(tiny_config), "--set", "selector.type=threshold")
    assert result.exit_code == 2
    # the old plugin's options are dropped with it; the new one's required option is reported
    assert errors_of(result) == ["selector.threshold: Field required"]


def test_malformed_override_names_itself(cli, tiny_config, write_config):
    result = cli("config", "validate", write_config(tiny_config), "--set", "rs.max_steps")
    assert result.exit_code == 2
    assert errors_of(result) == ["--set 'rs.max_steps': expected KEY.PATH=VALUE, e.g. rs.max_steps=20"]
    with pytest.raises(ConfigError, match="'max_steps' is not a section"):
        apply_overrides({"rs": {"max_steps": 3}}, ["rs.max_steps.x=1"])


def test_toml_configs_are_accepted(tmp_path, registry):
    path = tmp_path / "run.toml"
    path.write_text(
        '[data]\ntrain = "builtin:addition_train"\n[scorer]\ntype = "rule"\n'
        'function = "thresher.presets.rewards:digit_share"\n[selector]\ntype = "topk"\ntop_n_rollouts = 2\n'
    )
    config = load_config(path, [], registry)
    assert config.selector.config.top_n_rollouts == 2 and config.generator.type == "hf"


def test_presets_are_valid(registry):
    for preset in ("demo", "arithmetic", "tiny"):
        assert load_config(preset, [], registry).scorer.type == "rule"


def test_resolved_config_round_trips(tiny_config, registry):
    config = resolve_config(tiny_config, registry)
    assert resolve_config(config.to_dict(), registry) == config


def test_schema_lists_core_and_plugin_sections(cli):
    import json

    result = cli("config", "schema")
    schema = json.loads(result.output)
    assert {"model", "data", "rs", "optim", "output"} <= set(schema["run"]["properties"])
    assert "top_n_rollouts" in schema["plugins"]["selector"]["topk"]["properties"]


THIRD_PARTY_SCORER = """
import torch
from pydantic import BaseModel
import thresher

class ExtraScorer:
    name = "extra_third_party"
    class Config(BaseModel):
        pass
    def __init__(self, config, context=None):
        self.config = config
    def score(self, rollouts):
        return torch.zeros(len(rollouts))
    def close(self):
        pass

@thresher.hookimpl
def register_scorers(register):
    register(ExtraScorer)
"""


@pytest.mark.parametrize("plugins", ["as installed", "plus a third-party scorer"])
def test_real_console_script_exits_2_without_traceback(tmp_path, monkeypatch, plugins):
    env = dict(os.environ)
    if plugins == "plus a third-party scorer":
        site = tmp_path / "site"
        site.mkdir()
        install(site, "extra_scorer", THIRD_PARTY_SCORER)
        monkeypatch.syspath_prepend(str(site))  # this process's registry sees what the script sees
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x.jsonl}\nscorer: {type: nope}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "thresher", "config", "validate", str(bad)], capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # The scorers this environment offers, third-party plugins included, as the console script finds them
    registry = build_registry(get_plugin_manager())
    scorers = registry.names("scorer")
    assert {"combine", "local", "rule", "triton"} <= set(scorers)  # the built-ins are always among them
    assert ("extra_third_party" in scorers) == (plugins == "plus a third-party scorer")
    broken = f" ({len(registry.problems)} installed plugin(s) failed to load: see `thresher plugins`)"
    expected = f"error: scorer.type: unknown scorer 'nope'; available: {', '.join(scorers)}"
    expected += broken if registry.problems else ""
    *warnings, error = proc.stderr.strip().splitlines()
    assert error == expected
    assert len(warnings) == len(registry.problems)  # one line per installed plugin that failed to load
    assert all(line.startswith("warning: ") for line in warnings), warnings
