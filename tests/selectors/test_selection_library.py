"""Issue 7: the selector library's exact semantics, composition, the random baseline, dedup, pooling,
restart-from-base, and guardrails that catch reward hacking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import MEASURED, read_jsonl
from thresher.core.config import load_config
from thresher.core.registry import build_registry
from thresher.core.selection import distinct_n, duplicate_mask
from thresher.core.types import PluginContext, Prompt, Rollout
from thresher.selectors.band import BandSelector
from thresher.selectors.chain import ChainSelector
from thresher.selectors.global_top_fraction import GlobalTopFractionSelector
from thresher.selectors.random_baseline import RandomSelector


def context() -> PluginContext:
    return PluginContext(registry=build_registry())


def build(cls, **options):
    return cls(cls.Config.model_validate(options), context())


def mask(rows) -> list[list[bool]]:
    return torch.tensor(rows, dtype=torch.bool).tolist()


ALL = torch.ones(2, 3, dtype=torch.bool)


def test_global_top_fraction_keeps_the_best_of_the_whole_step_with_ties_to_the_earlier():
    rewards = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.9, 0.2]])
    kept = build(GlobalTopFractionSelector, fraction=0.5).select(rewards, ALL)  # ceil(0.5 × 6) = 3
    assert kept.tolist() == mask([[1, 0, 0], [1, 1, 0]])
    two = build(GlobalTopFractionSelector, fraction=0.3).select(rewards, ALL)  # ceil(1.8) = 2: the two 0.9s
    assert two.tolist() == mask([[1, 0, 0], [0, 1, 0]])
    one = build(GlobalTopFractionSelector, fraction=0.1).select(rewards, ALL)  # tie at 0.9: the earlier one
    assert one.tolist() == mask([[1, 0, 0], [0, 0, 0]])


def test_global_top_fraction_cap_and_validity():
    rewards = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    capped = build(GlobalTopFractionSelector, fraction=0.5, max_per_prompt=2).select(rewards, ALL)
    # budget 3, but prompt 0 may give only two: the next best comes from prompt 1
    assert capped.tolist() == mask([[1, 1, 0], [0, 0, 1]])
    one_each = build(GlobalTopFractionSelector, fraction=0.5, max_per_prompt=1).select(rewards, ALL)
    assert one_each.tolist() == mask([[1, 0, 0], [0, 0, 1]])  # the cap can leave the budget unspent
    valid = torch.tensor([[False, True, True], [True, True, True]])
    kept = build(GlobalTopFractionSelector, fraction=0.4).select(rewards, valid)  # ceil(0.4 × 5) = 2
    assert kept.tolist() == mask([[0, 1, 1], [0, 0, 0]])


def test_band_drops_uniform_and_out_of_band_prompts_then_applies_inner():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    band = build(BandSelector, hi=0.5)
    kept = band.select(rewards, valid)
    assert kept.tolist() == mask([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert band.metrics() == {"band_prompts_dropped_fraction": 0.75}
    with_inner = build(BandSelector, lo=0.1, inner={"type": "topk", "top_n_rollouts": 1})
    assert with_inner.select(rewards, valid).tolist() == mask([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0] * 4])
    assert with_inner.metrics()["band_prompts_dropped_fraction"] == 0.5  # the all-1 and all-0 prompts


def test_chain_is_band_then_topk():
    rewards = torch.tensor([[0.2, 0.7, 0.7], [0.5, 0.5, 0.5], [0.9, 0.1, 0.3]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    chain = build(ChainSelector, stages=[{"type": "band"}, {"type": "topk", "top_n_rollouts": 1}])
    expected = build(BandSelector, inner={"type": "topk", "top_n_rollouts": 1}).select(rewards, valid)
    assert chain.select(rewards, valid).tolist() == expected.tolist() == mask([[0, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert chain.metrics()["band_prompts_dropped_fraction"] == pytest.approx(1 / 3)


def test_random_baseline_matches_the_counts_of_the_selector_it_imitates():
    torch.manual_seed(0)
    rewards = torch.rand(6, 8)
    valid = torch.rand(6, 8) > 0.2
    like = {"type": "threshold", "threshold": 0.5}
    reference = build(ChainSelector, stages=[like]).select(rewards, valid)
    baseline = build(RandomSelector, like=like, seed=3)
    kept = baseline.select(rewards, valid)
    assert kept.sum(dim=1).tolist() == reference.sum(dim=1).tolist()
    assert not (kept & ~valid).any()
    assert kept.tolist() == baseline.select(rewards, valid).tolist()  # same inputs, same choice (resume-safe)
    others = [build(RandomSelector, like=like, seed=seed).select(rewards, valid).tolist() for seed in range(4, 9)]
    assert any(other != kept.tolist() for other in others)
    assert kept.tolist() != reference.tolist()  # random, not the threshold's own choice


def test_nested_sections_are_validated_with_their_full_path():
    registry = build_registry()
    with pytest.raises(Exception, match=r"selector\.stages\[1\]\.k: unknown key"):
        load_config("tiny", ["selector.type=chain", "selector.stages=[{type: band}, {type: topk, k: 1}]"], registry)
    with pytest.raises(Exception, match=r"selector\.inner\.type: unknown selector 'best'"):
        load_config("tiny", ["selector.type=band", "selector.inner={type: best}"], registry)
    with pytest.raises(Exception, match=r"selector\.like: Field required"):
        load_config("tiny", ["selector.type=random"], registry)


def rollout(group: int, sample: int, text: str, ids=(5,)) -> Rollout:
    return Rollout(Prompt(group, "p", (1,)), group, sample, list(ids), text, "eos")


def test_duplicate_mask_exact_and_whitespace():
    rollouts = [rollout(0, 0, "a b"), rollout(0, 1, "a b"), rollout(0, 2, " a   b\n"), rollout(1, 0, "a b")]
    assert duplicate_mask(rollouts, (2, 3), "exact").tolist() == [[False, True, False], [False, False, False]]
    assert duplicate_mask(rollouts, (2, 3), "whitespace").tolist() == [[False, True, True], [False, False, False]]
    assert not duplicate_mask(rollouts, (2, 3), "none").any()


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4
    assert distinct_n([[7, 7, 7, 7]], 2) == 1 / 3


def test_dedup_makes_identical_responses_count_once(tiny_config, write_config, cli):
    tiny_config["generator"].update(temperature=0.05, max_new_tokens=4)  # near-greedy: many duplicates
    tiny_config["selector"] = {"type": "threshold", "threshold": 0.0, "dedup": "exact"}
    tiny_config["rs"]["max_steps"] = 1
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    run = Path(tiny_config["output"]["dir"])
    rows = read_jsonl(run / "rollouts" / "step_1.jsonl")
    for group in range(4):
        mine = [r for r in rows if r["group"] == group]
        assert sum(r["kept"] for r in mine) == len({r["response"] for r in mine})
    (m,) = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    assert m["duplicates_not_selectable"] == 16 - m["kept"] > 0


def hack_reward(tmp_path: Path) -> str:
    path = tmp_path / "hack.py"
    path.write_text("def sevens(responses):\n    return [r.count('7') / len(r) if r else 0.0 for r in responses]\n")
    return f"{path}:sevens"


def train_on_hackable_reward(cli, tmp_path: Path, run: Path, *settings: str):
    overrides = [
        f"output.dir={run}",
        f"scorer.function={hack_reward(tmp_path)}",
        "optim.lr=0.01",
        "data.validation=null",
        "guardrails.min_kept_distinct_2=0.3",
        *settings,
    ]
    return cli("train", "tiny", *[a for o in overrides for a in ("--set", o)])


def test_a_hackable_reward_trips_the_diversity_guardrail(tmp_path, cli):
    """Rewarding the share of '7's collapses the tiny model to '777…' (measured: kept distinct-2
    0.99 at step 1, 0.24 at step 8, 0.18 at step 9): the guardrail stops the run there."""
    run = tmp_path / "hacked"
    result = train_on_hackable_reward(cli, tmp_path, run, "rs.max_steps=15", "guardrails.diversity_patience=2")
    assert result.exit_code == 0, result.output
    assert "stopped early after step" in result.output and "diversity guardrail" in result.output
    lines = read_jsonl(run / "metrics.jsonl")
    train = [m for m in lines if m["kind"] == "train"]
    stop = lines[-1]
    assert stop["kind"] == "stop" and stop["step"] == train[-1]["step"] < 15
    assert train[-1]["kept_distinct_2"] < 0.3 and train[-2]["kept_distinct_2"] < 0.3
    assert train[0]["kept_distinct_2"] > 0.9
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "checkpoints" / f"step_{stop['step']}").is_dir()


def test_warn_only_diversity_guardrail_keeps_running(tmp_path, cli):
    run = tmp_path / "warned"
    result = train_on_hackable_reward(cli, tmp_path, run, "rs.max_steps=12", "guardrails.on_diversity_collapse=warn")
    assert result.exit_code == 0
    assert "warning: diversity guardrail" in result.output
    assert len([m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]) == 12


def test_validation_greedy_sampled_and_heldout_scorer_with_early_stopping(tiny_config, write_config, cli):
    tiny_config["validation_scorer"] = {"type": "rule", "function": "thresher.presets.rewards:addition_correct"}
    tiny_config["rs"].update(max_steps=6, val_every=1)
    tiny_config["optim"]["lr"] = 1e-9  # nothing improves: early stopping must end the run
    tiny_config["guardrails"] = {"early_stop_metric": "val_heldout_reward_greedy", "early_stop_patience": 2}
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 0, result.output
    assert "early stop: val_heldout_reward_greedy has not improved" in result.output
    lines = read_jsonl(Path(tiny_config["output"]["dir"]) / "metrics.jsonl")
    validations = [m for m in lines if m["kind"] == "validation"]
    assert [v["step"] for v in validations] == [0, 1, 2]  # best at 0, no improvement at 1 and 2
    for v in validations:
        assert {
            "val_reward_greedy",
            "val_reward_sampled",
            "val_heldout_reward_greedy",
            "val_heldout_reward_sampled",
            "val_distinct_2_greedy",
        } <= set(v)
    assert {k: v for k, v in lines[-1].items() if k != "time"} == {
        "kind": "stop",
        "step": 2,
        "reason": lines[-1]["reason"],
    }


def test_early_stop_needs_what_it_watches(registry):
    with pytest.raises(Exception, match="needs a validation_scorer section"):
        load_config("tiny", ["guardrails.early_stop_metric=val_heldout_reward_greedy"], registry)


def test_pool_trains_on_the_best_response_ever_seen_per_prompt(tiny_config, write_config, cli):
    tiny_config["data"]["shuffle"] = False
    tiny_config["rs"].update(max_steps=4, prompts_per_step=4, pool_best=True)
    tiny_config["data"]["train"] = "builtin:addition_val"
    tiny_config["optim"]["epochs_per_step"] = 1
    tiny_config["data"]["validation"] = None
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    run = Path(tiny_config["output"]["dir"])
    best: dict[int, tuple[float, int]] = {}
    for m in [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]:
        rows = read_jsonl(run / "rollouts" / f"step_{m['step']}.jsonl")
        for r in rows:
            if r["kept"] and (r["prompt_index"] not in best or r["reward"] > best[r["prompt_index"]][0]):
                best[r["prompt_index"]] = (r["reward"], len(r["response_ids"]))
        step_prompts = {r["prompt_index"] for r in rows}
        assert m["train_tokens"] == sum(best[p][1] for p in step_prompts if p in best)
        assert m["pool_size"] == len(best)


def test_pool_reuses_an_earlier_better_response(tmp_path, tiny_config, write_config, cli):
    # one prompt, seen every step: the pool keeps the best response across steps
    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?"}\n')
    tiny_config["data"].update(train=str(data), validation=None)
    tiny_config["rs"].update(max_steps=5, prompts_per_step=1, pool_best=True)
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    run = Path(tiny_config["output"]["dir"])
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    best_so_far = -1.0
    for m in train:
        kept = [r for r in read_jsonl(run / "rollouts" / f"step_{m['step']}.jsonl") if r["kept"]]
        step_best = max(r["reward"] for r in kept)
        reused = best_so_far >= step_best
        assert m["trained_from_earlier_steps"] == int(reused)
        best_so_far = max(best_so_far, step_best)
    assert any(m["trained_from_earlier_steps"] for m in train)  # the pool did reuse an older response


def test_restart_from_base_trains_the_base_model_on_everything_kept(tiny_config, write_config, cli):
    from safetensors.torch import load_file

    from thresher.core.config import load_config as load
    from thresher.core.model import build_tiny_model, build_tiny_tokenizer
    from thresher.core.training.trainer import Trainer, TrainSequence
    from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

    tiny_config["rs"].update(max_steps=2, restart_from_base=True)
    tiny_config["data"]["validation"] = None
    path = write_config(tiny_config)
    assert cli("train", path, "-q").exit_code == 0
    run = Path(tiny_config["output"]["dir"])
    sequences = []
    for step in (1, 2):
        for r in read_jsonl(run / "rollouts" / f"step_{step}.jsonl"):
            if r["kept"]:
                prompt = [p for p in build_tiny_tokenizer()(r["prompt"])["input_ids"]]
                sequences.append(TrainSequence(tuple(prompt), tuple(r["response_ids"])))
    (m1, m2) = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    assert (m1["kept_so_far"], m2["kept_so_far"]) == (4, 8)
    # independently: the base model, a fresh AdamW, one step (2 epochs) on all 8 kept pairs
    config = load(path, [], build_registry())
    model = build_tiny_model(build_tiny_tokenizer(), seed=config.rs.seed)
    trainer = Trainer(
        model,
        MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config()),
        config.optim,
        max_steps=2,
        pad_id=0,
        device=torch.device("cpu"),
        seed=config.rs.seed,
    )
    trainer.train_step(2, sequences)  # the run's step 2
    final = load_file(run / "final" / "model.safetensors")  # tied lm_head is stored once
    expected = model.state_dict()
    assert len(final) >= len(expected) - 1
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_resume_with_a_pool_and_guardrails_matches_an_uninterrupted_run(tmp_path, tiny_config, write_config, cli):
    """The pool, the kept-so-far set and the guardrail counters travel in the checkpoint."""
    tiny_config["rs"].update(max_steps=4, pool_best=True)
    tiny_config["guardrails"] = {"min_kept_distinct_2": 0.01, "on_diversity_collapse": "warn"}
    runs = {}
    for name, parts in (("whole", [[]]), ("parted", [["--set", "rs.max_steps=2"], ["--resume"]])):
        tiny_config["output"]["dir"] = str(tmp_path / name)
        path = write_config(tiny_config, f"{name}.yaml")
        for extra in parts:
            assert cli("train", path, "-q", *extra).exit_code == 0
        metrics = [m for m in read_jsonl(tmp_path / name / "metrics.jsonl") if m["kind"] == "train"]
        runs[name] = [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in metrics]
    assert runs["whole"] == runs["parted"]
    assert [m["pool_size"] for m in runs["whole"]] == [4, 8, 12, 16]
