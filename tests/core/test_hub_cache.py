"""Hub ids (``org/name``) as model and reward-model paths, found in a local Hugging Face cache laid out
as ``huggingface_hub`` lays it (``models--org--name/refs/main`` → ``snapshots/<commit>/``); never
downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import read_jsonl, save_classifier
from thresher.core.errors import ConfigError
from thresher.core.model import build_tiny_model, build_tiny_tokenizer
from thresher.scorers.local import load_reward_model

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_snapshot(hub: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the cache at ``hub``, with ``refs/main`` pointing at it."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_cached_hub_id_trains_and_an_uncached_one_says_how_to_fetch_it(tmp_path):
    hub = tmp_path / "hub"
    snapshot = cached_snapshot(hub, "someorg/tiny-llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=0).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}

    def train(model: str, *extra: str) -> subprocess.CompletedProcess:
        args = ["train", "tiny", "--set", f"model.path={model}", "--set", f"output.dir={tmp_path / 'run'}", *extra]
        return subprocess.run(
            [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
        )

    done = train("someorg/tiny-llama", "--set", "rs.max_steps=1", "-q")
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"] == [1]
    missing = train("someorg/not-cached", "--dry-run")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: model.path: 'someorg/not-cached' is not a directory, and the Hugging Face cache ({hub}) does not "
        "hold it; fetch it once with `hf download someorg/not-cached` (Thresher does not download)"
    )


def test_a_reward_model_named_by_its_hub_id_loads_from_the_cache(tmp_path, monkeypatch, tiny_tokenizer):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    save_classifier(cached_snapshot(hub, "someorg/tiny-rm"), tiny_tokenizer, num_labels=1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # what HF_HUB_CACHE sets at import
    model, tokenizer = load_reward_model("someorg/tiny-rm")
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    reference, _ = load_reward_model(str(hub / "models--someorg--tiny-rm" / "snapshots" / COMMIT))
    for (name, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, msg=name)
    with pytest.raises(ConfigError, match=r"scorer\.path: 'someorg/absent' is not a directory, and the Hugging Face"):
        load_reward_model("someorg/absent")
