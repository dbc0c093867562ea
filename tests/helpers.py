"""Helpers shared by tests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (metrics.jsonl, rollouts/step_N.jsonl), blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def small_llama_config(tokenizer, *, hidden: int = 32, heads: int = 4, kv_heads: int | None = None, **extra):
    """A 2-layer LlamaConfig sized to ``tokenizer`` (``kv_heads`` < ``heads``: grouped-query attention)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def save_classifier(path, tokenizer, num_labels: int):
    """A real (tiny, random) LlamaForSequenceClassification saved with ``tokenizer`` to ``path``."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(small_llama_config(tokenizer, num_labels=num_labels))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


# Metrics fields that measure the machine (durations, rates, memory), not what the run computed.
MEASURED = ("time", "tokens_per_s", "memory_")


def install(site: Path, name: str, module_source: str) -> None:
    """A distribution ``thresher-<name>`` with one entry point ``<name>`` in the ``thresher`` group,
    as pip would lay it out in ``site`` (put ``site`` on the path to have it found)."""
    (site / f"thresher_{name}.py").write_text(textwrap.dedent(module_source))
    dist = site / f"thresher_{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: thresher-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[thresher]\n{name} = thresher_{name}\n")


def cli_errors(result, exit_code: int) -> list[str]:
    """The ``error:`` lines of a CliRunner result, after checking its exit code and that no
    traceback was printed (a user mistake is one line, never a traceback)."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


class IdleGenerator:
    """A generator's methods, doing nothing: for tests that only look at how a generator is built
    or registered."""

    def generate(self, prompts, n, *, seed, greedy=False):
        return []

    def load_weights(self, policy):
        pass

    def close(self):
        pass


def assert_same_rollouts_and_weights(one: Path, two: Path, steps: int, atol: float = 1e-5) -> None:
    """Two runs (one process and several ranks, say) sampled the same rollouts in every step and
    ended on the same weights, within ``atol``."""
    from safetensors.torch import load_file

    for step in range(1, steps + 1):
        name = f"step_{step}.jsonl"
        assert read_jsonl(one / "rollouts" / name) == read_jsonl(two / "rollouts" / name), name
    other = load_file(two / "final" / "model.safetensors")
    for name, tensor in load_file(one / "final" / "model.safetensors").items():
        torch.testing.assert_close(other[name], tensor, atol=atol, rtol=0)
