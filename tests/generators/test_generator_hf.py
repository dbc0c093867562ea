"""The `hf` generator on a real (tiny, random) transformers model."""

from __future__ import annotations

import pytest
import torch

from thresher.core.types import PluginContext, Prompt
from thresher.generators.hf import HFGenerator

PROMPT_TEXTS = ["What is 1 + 2?", "Hi", "A much longer prompt than the others, to force padding."]


def prompts_for(tokenizer, texts=PROMPT_TEXTS) -> list[Prompt]:
    return [Prompt(i, t, tuple(tokenizer(t)["input_ids"])) for i, t in enumerate(texts)]


def make_generator(model, tokenizer, **options) -> HFGenerator:
    return HFGenerator(HFGenerator.Config(**options), PluginContext(tokenizer=tokenizer, policy=model))


def test_n_rollouts_per_prompt_grouped_with_their_own_token_ids(tiny_model, tiny_tokenizer):
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=12, batch_size=2)
    prompts = prompts_for(tiny_tokenizer)
    rollouts = generator.generate(prompts, 4, seed=0)
    assert len(rollouts) == 12
    for i, r in enumerate(rollouts):
        assert (r.group, r.sample) == (i // 4, i % 4)
        assert r.prompt is prompts[i // 4]
        assert len(r.response_ids) == 12 if r.finish_reason == "length" else 1 <= len(r.response_ids) <= 12
        assert r.text == tiny_tokenizer.decode(r.response_ids, skip_special_tokens=True)
        eos = tiny_tokenizer.eos_token_id
        if r.finish_reason == "eos":
            assert r.response_ids[-1] == eos and eos not in r.response_ids[:-1]
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 12 and eos not in r.response_ids
    assert len({tuple(r.response_ids) for r in rollouts}) > 6  # sampled, not copies


def test_eos_ends_a_response_and_is_kept(tiny_model, tiny_tokenizer):
    # Make many characters count as EOS so that nearly every row stops early: exercises the eos path.
    stoppers = {tiny_tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789 "}
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, *sorted(stoppers)]
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=30)
    rollouts = generator.generate(prompts_for(tiny_tokenizer), 8, seed=1)
    ended = [r for r in rollouts if r.finish_reason == "eos"]
    assert len(ended) >= 20
    all_eos = stoppers | {tiny_tokenizer.eos_token_id}
    for r in ended:
        assert r.response_ids[-1] in all_eos
        assert not any(t in all_eos for t in r.response_ids[:-1])


def test_stop_strings_end_responses_where_the_string_completes(tiny_model, tiny_tokenizer):
    stop = ["a", "e", "o", " ", "1"]
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=40, stop=stop)
    rollouts = generator.generate(prompts_for(tiny_tokenizer), 8, seed=2)
    stopped = [r for r in rollouts if r.finish_reason == "stop"]
    assert len(stopped) >= 12
    for r in stopped:
        assert any(s in r.text for s in stop)
        before = tiny_tokenizer.decode(r.response_ids[:-1], skip_special_tokens=True)
        assert not any(s in before for s in stop)
        assert r.response_ids[-1] != tiny_tokenizer.pad_token_id


def test_trim_prefers_the_earliest_event_when_pad_is_eos(tiny_model, tiny_tokenizer):
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=6, stop=["b"])
    generator.pad_id = generator_eos = tiny_tokenizer.eos_token_id  # as in many chat models
    ids = [tiny_tokenizer.convert_tokens_to_ids(c) for c in "xab"]
    # "x a b" then padding (= EOS): the stop string completed at "b"; the EOS after it is padding
    assert generator._trim([*ids, generator_eos, generator_eos, generator_eos]) == (ids, "stop")
    assert generator._trim([ids[0], generator_eos, *ids[1:], 0, 0]) == ([ids[0], generator_eos], "eos")
    six = ids * 2
    assert generator._trim([t for t in six if t != ids[2]] + ids[:2]) == (
        [t for t in six if t != ids[2]] + ids[:2],
        "length",
    )


def test_same_seed_same_samples_other_seed_other_samples(tiny_model, tiny_tokenizer):
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=10)
    prompts = prompts_for(tiny_tokenizer)
    first = [r.response_ids for r in generator.generate(prompts, 3, seed=7)]
    torch.rand(100)  # unrelated use of the global RNG must not matter
    again = [r.response_ids for r in generator.generate(prompts, 3, seed=7)]
    other = [r.response_ids for r in generator.generate(prompts, 3, seed=8)]
    assert first == again
    assert first != other


def test_left_padded_batches_generate_what_each_prompt_generates_alone(tiny_model, tiny_tokenizer):
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=8, batch_size=3)
    prompts = prompts_for(tiny_tokenizer)
    batched = [r.response_ids for r in generator.generate(prompts, 1, seed=0, greedy=True)]
    alone = [generator.generate([p], 1, seed=0, greedy=True)[0].response_ids for p in prompts]
    assert batched == alone


def test_temperature_zero_is_greedy(tiny_model, tiny_tokenizer):
    prompts = prompts_for(tiny_tokenizer)
    greedy = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=8).generate(prompts, 2, seed=0, greedy=True)
    cold = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=8, temperature=0.0).generate(prompts, 2, seed=5)
    assert [r.response_ids for r in greedy] == [r.response_ids for r in cold]


def test_sampling_parameters_are_passed_one_to_one(tiny_model, tiny_tokenizer):
    generator = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3)
    config = generator._generation_config(greedy=False)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == (
        True,
        0.7,
        0.9,
        3,
        5,
    )
    # top_k=1 leaves one candidate: sampling must then equal greedy decoding
    prompts = prompts_for(tiny_tokenizer)
    top1 = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=8, top_k=1).generate(prompts, 2, seed=3)
    greedy = make_generator(tiny_model, tiny_tokenizer, max_new_tokens=8).generate(prompts, 2, seed=3, greedy=True)
    assert [r.response_ids for r in top1] == [r.response_ids for r in greedy]


def test_load_weights_from_another_module_copies_them(tiny_tokenizer):
    from thresher.core.model import build_tiny_model

    policy, other = build_tiny_model(tiny_tokenizer, seed=0), build_tiny_model(tiny_tokenizer, seed=1)
    generator = make_generator(other, tiny_tokenizer)
    generator.load_weights(policy)
    for a, b in zip(policy.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_generator_requires_a_policy():
    with pytest.raises(ValueError, match="needs the policy"):
        HFGenerator(HFGenerator.Config(), PluginContext())
