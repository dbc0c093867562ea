"""What a plugin author runs into: packaging mistakes are one line and never break Thresher, a
plugin's wrong output is one line naming it, loss metrics reach metrics.jsonl, selectors can see the
rollouts. Installed plugins are real distributions (dist-info + entry points) on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import thresher
from tests.helpers import IdleGenerator, install
from thresher.core.training.memory import ROLLOUT_BYTES, ROLLOUT_BYTES_PER_TOKEN
from thresher.plugin import Section

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broken_site(tmp_path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "noimport", "import a_module_that_is_not_installed\n")
    install(
        site,
        "misspelled",
        """
        import thresher

        @thresher.hookimpl
        def register_scorer(register):  # the hook is register_scorers
            pass
        """,
    )
    return site


def thresher_cli(*args: str, site: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "THRESHER_LOAD_PLUGINS"}
    environment.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=120, env=environment,
        cwd=ROOT,
    )  # fmt: skip


def test_broken_plugins_do_not_break_thresher_and_each_is_one_line(broken_site):
    help_text = thresher_cli("--help", site=broken_site)
    assert help_text.returncode == 0 and "train" in help_text.stdout and "Traceback" not in help_text.stderr
    dry = thresher_cli("train", "tiny", "--dry-run", site=broken_site)
    assert dry.returncode == 0, dry.stderr
    warnings = [line for line in dry.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, dry.stderr
    noimport = next(w for w in warnings if "'noimport'" in w)
    assert (
        "(thresher_noimport, from thresher-noimport) was not loaded: ModuleNotFoundError: No module named" in noimport
    )
    misspelled = next(w for w in warnings if "'misspelled'" in w)
    assert "was not loaded: unknown hook 'register_scorer'" in misspelled and "found register_scorer" in misspelled
    listing = thresher_cli("plugins", "--json", site=broken_site)
    assert listing.returncode == 0
    assert len(json.loads(listing.stdout)["not_loaded"]) == 2


def test_an_allow_list_naming_no_installed_plugin_warns(broken_site):
    result = thresher_cli("train", "tiny", "--dry-run", site=broken_site, env={"THRESHER_LOAD_PLUGINS": "not-a-plugin"})
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "THRESHER_LOAD_PLUGINS names 'not-a-plugin', which no installed plugin is (installed: " in warning
    assert "misspelled" in warning and "noimport" in warning


def test_piped_plugin_listing_never_cuts_a_name(broken_site):
    result = thresher_cli("plugins", site=broken_site)
    assert result.returncode == 0
    names = {line.split("\t")[1] for line in result.stdout.splitlines() if not line.startswith("not loaded")}
    assert {"masked_mean_logprob", "global_top_fraction", "hf", "vllm", "rule"} <= names
    assert "…" not in result.stdout


class OneColumnSelector:
    """A selector returning a [P, 1] mask: once, this silently kept every rollout."""

    name = "one_column"

    class Config(Section):
        pass

    def __init__(self, config, context=None):
        pass

    def select(self, rewards, valid):
        return torch.ones((rewards.shape[0], 1), dtype=torch.bool)


class DiverseSelector:
    """Keeps, per prompt, the first rollout whose text no earlier rollout of the prompt has."""

    name = "diverse"
    seen_rollouts = 0

    class Config(Section):
        pass

    def __init__(self, config, context=None):
        pass

    def select(self, rewards, valid, rollouts):
        type(self).seen_rollouts += sum(len(group) for group in rollouts)
        keep = torch.zeros_like(valid)
        for p, group in enumerate(rollouts):
            assert all(r.group == p for r in group)
            keep[p, 0] = True
        return keep


class EntropyLoss:
    """A loss with its own metric: it must reach metrics.jsonl as loss_response_tokens."""

    name = "counting_loss"

    class Config(Section):
        pass

    def __init__(self, config, context=None):
        pass

    def __call__(self, token_logprobs, response_mask, *, num_sequences, num_tokens):
        mask = response_mask.to(token_logprobs.dtype)
        loss = -(token_logprobs * mask).sum() / num_tokens
        return loss, {"response_tokens": float(mask.sum())}


@pytest.fixture
def author_plugins():
    for cls in (OneColumnSelector, DiverseSelector, EntropyLoss):
        thresher.register(cls)
    yield
    for cls in (OneColumnSelector, DiverseSelector, EntropyLoss):
        thresher.unregister(cls)


def small_run(tmp_path: Path, **overrides) -> thresher.Run:
    base = {
        "rs.max_steps": 1, "rs.prompts_per_step": 4, "rs.num_rollouts_per_prompt": 4, "data.validation": None,
        "output.dir": str(tmp_path / "run"),
    }  # fmt: skip
    return thresher.Run.from_config("tiny", overrides={**base, **overrides}, quiet=True)


def test_a_selector_returning_the_wrong_shape_is_one_line_naming_it(tmp_path, author_plugins):
    with (
        small_run(tmp_path, **{"selector": {"type": "one_column"}}) as run,
        pytest.raises(
            thresher.plugin.PluginError,
            match=r"^selector 'one_column' returned a mask of shape \[4, 1\] for rewards of shape \[4, 4\]",
        ),
    ):
        run.train()


def test_selectors_that_ask_for_rollouts_get_them_grouped_by_prompt(tmp_path, author_plugins):
    DiverseSelector.seen_rollouts = 0
    with small_run(tmp_path, **{"selector": {"type": "chain", "stages": [{"type": "diverse"}]}}) as run:
        (record,) = run.train()
    assert DiverseSelector.seen_rollouts == 16 and record["kept"] == 4


def test_a_loss_plugins_metrics_reach_metrics_jsonl(tmp_path, author_plugins):
    with small_run(tmp_path, **{"loss": {"type": "counting_loss"}, "optim.micro_batch_size": 1}) as run:
        (record,) = run.train()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    kept_tokens = record["train_tokens"] / record["updates"]  # per update: one per epoch
    # one sequence per micro-batch: the mean over micro-batches is the mean response length kept
    assert line["loss_response_tokens"] == pytest.approx(kept_tokens / record["kept"])
    with small_run(tmp_path / "builtin") as run:
        (builtin,) = run.train()
    assert builtin["loss_token_logprob_mean"] < 0  # the built-in loss reports its mean token log-prob


def test_band_hands_its_inner_selector_the_rollouts_and_checks_its_mask(tmp_path, author_plugins):
    """A band's inner selector goes through the same checked call as any selector: one that asks for
    rollouts gets them (once, this failed), and a wrong mask is one line naming the inner selector."""
    DiverseSelector.seen_rollouts = 0
    band = {"type": "band", "drop_uniform": False, "inner": {"type": "diverse"}}
    with small_run(tmp_path / "a", selector=band) as run:
        (record,) = run.train()
    assert DiverseSelector.seen_rollouts == 16 and record["kept"] == 4
    band["inner"] = {"type": "one_column"}
    with (
        small_run(tmp_path / "b", selector=band) as run,
        pytest.raises(thresher.plugin.PluginError, match=r"^selector 'one_column' returned a mask of shape \[4, 1\]"),
    ):
        run.train()


class SamplingWatcher(IdleGenerator):
    """A generator that only records the sampling parameters the core hands it."""

    name = "sampling_watcher"
    seen: ClassVar[list[thresher.plugin.SamplingParams | None]] = []

    class Config(thresher.plugin.SamplingConfig):
        engine_option: int = 3

    def __init__(self, config, context):
        type(self).seen.append(context.sampling)


class NamesItsOwnLength(IdleGenerator):
    """A generator whose Config names the response length its own way: the core cannot plan with it."""

    name = "own_names"

    class Config(Section):
        response_tokens: int = 64

    def __init__(self, config, context):
        pass


def test_generators_receive_the_runs_sampling_parameters(tmp_path):
    thresher.register(SamplingWatcher)
    try:
        SamplingWatcher.seen.clear()
        overrides = {"generator": {"type": "sampling_watcher", "max_new_tokens": 12, "temperature": 0.7, "top_k": 5}}
        with small_run(tmp_path, **overrides) as run:
            plan = run.plan(training=True)
            run.setup(training=False)
    finally:
        thresher.unregister(SamplingWatcher)
    (sampling,) = SamplingWatcher.seen
    assert sampling == thresher.plugin.SamplingParams(
        n=4, max_new_tokens=12, temperature=0.7, top_p=1.0, top_k=5, stop=(), ignore_eos=False
    )
    # the plan counts the rollouts the generator's own max_new_tokens makes: 4 prompts × N=4 × 12 tokens
    (rollouts,) = [item for item in plan.items if item.name == "rollouts"]
    assert rollouts.bytes == 16 * (12 * ROLLOUT_BYTES_PER_TOKEN + ROLLOUT_BYTES)


def test_a_generator_whose_config_is_not_a_sampling_config_is_refused_in_one_line(tmp_path):
    """Once, the core read max_new_tokens back by name: a generator calling it otherwise was planned
    with 0 new tokens, silently."""
    thresher.register(NamesItsOwnLength)
    try:
        with pytest.raises(thresher.plugin.ConfigError) as caught:
            small_run(tmp_path, generator={"type": "own_names"})
    finally:
        thresher.unregister(NamesItsOwnLength)
    (problem,) = caught.value.problems
    assert problem.startswith("generator.type: the generator 'own_names' has a Config (Config) that does not subclass")
    assert "thresher.plugin.SamplingConfig" in problem
