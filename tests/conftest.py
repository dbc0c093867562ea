"""Shared fixtures: the real tiny tokenizer/model (built in-process), fresh plugin registries, the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The README's test command runs two pytest-xdist workers on a two-core machine: each worker, and the
# processes its tests start, computes on one thread (two workers with two OpenMP threads each would
# oversubscribe the cores, and idle OpenMP threads spin). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from thresher.cli import build_app
from thresher.core.model import build_tiny_model, build_tiny_tokenizer
from thresher.core.registry import build_registry, get_plugin_manager

PRESETS = Path(__file__).resolve().parent.parent / "thresher" / "presets"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=0)


@pytest.fixture
def plugin_manager():
    return get_plugin_manager(load_entrypoints=False)


@pytest.fixture
def registry(plugin_manager):
    return build_registry(plugin_manager)


@pytest.fixture
def tiny_config(tmp_path) -> dict[str, Any]:
    """The tiny preset as data, writing into a temporary run directory, few steps."""
    config = yaml.safe_load((PRESETS / "tiny.yaml").read_text())
    config["output"]["dir"] = str(tmp_path / "run")
    config["rs"].update(max_steps=3, prompts_per_step=4, num_rollouts_per_prompt=4, val_max_prompts=4)
    return config


@pytest.fixture
def write_config(tmp_path):
    def write(config: dict[str, Any], name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def cli(plugin_manager):
    """Invoke the real typer app (built on a fresh plugin manager); returns the click Result."""
    from typer.testing import CliRunner

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(build_app(plugin_manager), [str(a) for a in args], catch_exceptions=False)

    return invoke
