"""The ``local`` scorer: a transformers reward model run in-process.

The model is an ``AutoModelForSequenceClassification`` with one label (the usual reward-model head);
it reads the prompt text followed by the response text, exactly as the policy produced them.

Example config section::

    scorer: {type: local, path: models/my-reward-model, batch_size: 16}
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError

from thresher.core.config import Section
from thresher.core.errors import ConfigError
from thresher.core.hub_cache import local_model_dir
from thresher.core.model import DTYPES, damaged_weights, resolve_device
from thresher.core.types import PluginContext, Rollout


class LocalRewardModelScorer:
    name: ClassVar[str] = "local"

    class Config(Section):
        path: str = Field(..., description="Directory of a sequence-classification reward model.")
        batch_size: int = Field(16, ge=1, description="Responses per forward pass.")
        device: str | None = Field(None, description="Torch device; default: the policy's device.")
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        max_length: int | None = Field(None, ge=1, description="Truncate longer inputs (from the left).")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config
        self.device = resolve_device(config.device) if config.device else _context_device(context)
        self.model, self.tokenizer = load_reward_model(config.path, DTYPES[config.dtype])
        self.model.to(self.device).eval()

    @torch.no_grad()
    def score(self, rollouts: list[Rollout]) -> torch.Tensor:
        texts = [r.prompt.text + r.text for r in rollouts]
        return score_texts(self.model, self.tokenizer, texts, self.config.batch_size, self.config.max_length)

    def close(self) -> None:
        self.model.to("cpu")


def _context_device(context: PluginContext | None) -> torch.device:
    return context.device if context is not None else torch.device("cpu")


def load_reward_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """Load a one-label sequence classifier and its tokenizer from a local directory."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # Thresher reports its own phases
    directory = local_model_dir(path, "scorer.path")
    if not (directory / "config.json").is_file():
        raise ConfigError([f"scorer.path: {path!r} is not a model directory (no config.json)"])
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if getattr(config, "num_labels", None) != 1:
        raise ConfigError(
            [f"scorer.path: {path!r} is not a reward model: it has {config.num_labels} labels, expected 1"]
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except SafetensorError as err:  # a weights file cut short: name it, not safetensors' traceback
        raise ConfigError([damaged_weights(directory, "scorer.path", err)]) from None
    except RuntimeError as err:  # torch.load of a cut-short pytorch_model.bin (other RuntimeErrors: bugs)
        if "PytorchStreamReader" not in str(err):
            raise
        raise ConfigError([damaged_weights(directory, "scorer.path", err)]) from None
    except (OSError, ValueError) as err:
        raise ConfigError([f"scorer.path: cannot load {path!r} as a reward model: {err}"]) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # keep the response, which is what is being judged
    return model, tokenizer


@torch.no_grad()
def score_texts(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int | None
) -> torch.Tensor:
    """Rewards for ``texts`` in batches: the single logit of each, as float32 on the CPU."""
    device = next(model.parameters()).device
    rewards = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        logits = model(**encoded).logits
        rewards.append(logits[:, 0].float().cpu())
    return torch.cat(rewards) if rewards else torch.zeros(0)
