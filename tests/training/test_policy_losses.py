"""The losses that read more than the kept responses (issue 25): RAFT++ and Reinforce-Rej against an
independent computation, the importance ratio at 1 before a step's first update, the new inputs
reaching only losses that ask for them, and whole groups as training data."""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import pytest
import torch

from tests.training.test_loss import make_batch
from thresher.core.config import OptimConfig
from thresher.core.run.records import ScoredStep
from thresher.core.training.trainer import Trainer, TrainSequence, accumulate_gradients, collate, response_logprobs
from thresher.core.trainset import KeptThisStep, group_statistics
from thresher.core.types import LOSS_INPUTS, PluginContext, Prompt, Rollout, loss_inputs
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss
from thresher.losses.raft_pp import RaftPlusPlusLoss
from thresher.losses.reinforce_rej import ReinforceRejLoss

EPSILON = 0.2


def sequence_logprobs(model, seq: TrainSequence) -> torch.Tensor:
    """log π(y_t) of each response token, one sequence at a time with the full log-softmax."""
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(seq.prompt_ids)
    return torch.stack([logprobs[t - 1, ids[0, t]] for t in range(start, ids.shape[1])])


def with_extras(model, batch: list[TrainSequence], seed: int = 0) -> list[TrainSequence]:
    """The batch with π_old = π_θ + noise (so ratios spread on both sides of the clip range), rewards
    0/1 and two groups, and each group's reward statistics."""
    g = torch.Generator().manual_seed(seed)
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0]
    groups = [0, 0, 0, 1, 1]
    rewards[3] = 1.0  # group 1: one right, one wrong
    out = []
    for seq, reward, group in zip(batch, rewards, groups, strict=True):
        with torch.no_grad():
            current = sequence_logprobs(model, seq)
        old = current + 0.4 * torch.randn(current.shape, generator=g)
        members = [r for r, gr in zip(rewards, groups, strict=True) if gr == group]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))
        out.append(
            TrainSequence(seq.prompt_ids, seq.response_ids, tuple(old.tolist()), reward, reward > 0.5, group, mean, std)
        )
    return out


def reference_objective(model, batch: list[TrainSequence], advantages: list[float]) -> torch.Tensor:
    """PPO's clipped surrogate written out per sequence and token: −mean over sequences of the
    per-token mean of min(r·A, clip(r)·A)."""
    per_sequence = []
    for seq, a in zip(batch, advantages, strict=True):
        logprobs = sequence_logprobs(model, seq)
        terms = []
        for lp, old in zip(logprobs, seq.old_logprobs, strict=True):
            r = torch.exp(lp - old)
            terms.append(torch.minimum(r * a, torch.clamp(r, 1 - EPSILON, 1 + EPSILON) * a))
        per_sequence.append(torch.stack(terms).mean())
    return -torch.stack(per_sequence).mean()


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["raft_pp", "reinforce_rej"])
def test_loss_and_gradient_match_an_independent_computation(tiny_model, tiny_tokenizer, loss_name):
    batch = with_extras(tiny_model, make_batch(tiny_tokenizer))
    if loss_name == "raft_pp":
        loss_fn = RaftPlusPlusLoss(RaftPlusPlusLoss.Config(epsilon=EPSILON))
        advantages = [1.0] * len(batch)
    else:
        loss_fn = ReinforceRejLoss(ReinforceRejLoss.Config(epsilon=EPSILON))
        advantages = [s.reward - s.group_reward_mean for s in batch]
    assert any(a < 0 for a in advantages) or loss_name == "raft_pp"

    tiny_model.zero_grad()
    expected = reference_objective(tiny_model, batch, advantages)
    expected.backward()
    reference = gradients(tiny_model)

    tiny_model.zero_grad()
    sink: dict[str, list[float]] = {}
    total = accumulate_gradients(
        tiny_model, loss_fn, batch, 2, tiny_tokenizer.pad_token_id, torch.device("cpu"), metrics_sink=sink
    )
    assert total == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    got = gradients(tiny_model)
    assert got.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4)
    assert max(sink["clip_fraction"]) > 0  # the clipping really was exercised by this batch
    assert max(sink["ratio_max"]) > 1 + EPSILON and min(sink["ratio_min"]) < 1 - EPSILON


def test_reinforce_rej_scaled_by_std_divides_the_advantage(tiny_model, tiny_tokenizer):
    batch = with_extras(tiny_model, make_batch(tiny_tokenizer))
    loss_fn = ReinforceRejLoss(ReinforceRejLoss.Config(epsilon=EPSILON, scale="std"))
    advantages = [(s.reward - s.group_reward_mean) / (s.group_reward_std + 1e-6) for s in batch]
    expected = reference_objective(tiny_model, batch, advantages)
    total = accumulate_gradients(tiny_model, loss_fn, batch, 5, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert total == pytest.approx(expected.item(), rel=1e-5)


def test_at_ratio_one_raft_pp_has_the_gradient_of_masked_mean_logprob(tiny_model, tiny_tokenizer):
    """Before a step's first update π_old = π_θ: RAFT++'s first update is RAFT's."""
    batch = make_batch(tiny_tokenizer)
    with torch.no_grad():
        batch = [TrainSequence(s.prompt_ids, s.response_ids, tuple(sequence_logprobs(tiny_model, s).tolist()))
                 for s in batch]  # fmt: skip
    device, pad = torch.device("cpu"), tiny_tokenizer.pad_token_id
    tiny_model.zero_grad()
    accumulate_gradients(tiny_model, MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config()), batch, 2, pad, device)
    plain = gradients(tiny_model)
    tiny_model.zero_grad()
    sink: dict[str, list[float]] = {}
    loss = RaftPlusPlusLoss(RaftPlusPlusLoss.Config())
    accumulate_gradients(tiny_model, loss, batch, 2, pad, device, metrics_sink=sink)
    for name, grad in plain.items():
        torch.testing.assert_close(gradients(tiny_model)[name], grad, atol=1e-6, rtol=1e-4)
    assert max(sink["ratio_max"]) == pytest.approx(1.0, abs=1e-5) and max(sink["clip_fraction"]) == 0.0


# --- the recorded log-probs: what every generator records is what the training pass computes -------


def generation_gap(model, tokenizer, rollouts: list[Rollout]) -> float:
    """Largest |recorded − recomputed| log-prob over every response token."""
    sequences = [TrainSequence(r.prompt.token_ids, tuple(r.response_ids)) for r in rollouts]
    input_ids, attention_mask, response_mask = collate(sequences, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        current = response_logprobs(model, input_ids, attention_mask, response_mask)
    gap = 0.0
    for row, (r, seq) in enumerate(zip(rollouts, sequences, strict=True)):
        assert r.logprobs is not None and len(r.logprobs) == len(r.response_ids)
        start = len(seq.prompt_ids)
        recomputed = current[row, start : start + len(r.response_ids)]
        gap = max(gap, float((recomputed - torch.tensor(r.logprobs)).abs().max()))
    return gap


@pytest.mark.parametrize("decode", ["fast", "generate", "static"])
def test_every_decode_path_records_the_log_probs_training_computes(tiny_tokenizer, decode):
    """Sampled at temperature 0.7 with top-k 20 — the recorded π_old is still the raw distribution's
    (temperature 1, nothing filtered), as the training pass computes it, so the ratio starts at 1."""
    from tests.generators.test_static_decode import gqa_model
    from thresher.generators.hf import HFGenerator

    model = gqa_model(tiny_tokenizer)
    config = HFGenerator.Config(decode=decode, max_new_tokens=12, temperature=0.7, top_k=20, batch_size=2)
    generator = HFGenerator(config, PluginContext(tokenizer=tiny_tokenizer, policy=model))
    prompts = [Prompt(i, t, tuple(tiny_tokenizer(t)["input_ids"])) for i, t in enumerate(["1 + 2 =", "Hi there", "7"])]
    rollouts = generator.generate(prompts, 3, seed=5)
    assert generation_gap(model, tiny_tokenizer, rollouts) < 1e-4  # measured: ~5e-7 (fp32, CPU)
    # and they are not the sampling distribution's (temperature 0.7, top-k), which would differ
    assert any(lp < math.log(0.5) for r in rollouts for lp in r.logprobs)


# --- which losses get what -------------------------------------------------------------------------


class OldStyleLoss:
    """A third-party loss written against the first protocol: no optional inputs."""

    name = "old_style"

    def __call__(self, token_logprobs, response_mask, *, num_sequences, num_tokens):
        mask = response_mask.float()
        return -(token_logprobs * mask).sum() / num_tokens, {"seen": 1.0}


class GreedyLoss(OldStyleLoss):
    """One that takes every optional input (``**inputs``)."""

    received: ClassVar[dict[str, torch.Tensor]] = {}

    def __call__(self, token_logprobs, response_mask, *, num_sequences, num_tokens, **inputs):
        GreedyLoss.received = inputs
        return super().__call__(token_logprobs, response_mask, num_sequences=num_sequences, num_tokens=num_tokens)


def test_a_loss_gets_exactly_the_inputs_it_declares(tiny_model, tiny_tokenizer):
    assert loss_inputs(OldStyleLoss()) == frozenset()
    assert loss_inputs(GreedyLoss()) == frozenset(LOSS_INPUTS)
    assert loss_inputs(RaftPlusPlusLoss(RaftPlusPlusLoss.Config())) == {"old_logprobs"}
    batch = with_extras(tiny_model, make_batch(tiny_tokenizer))
    device, pad = torch.device("cpu"), tiny_tokenizer.pad_token_id
    accumulate_gradients(tiny_model, OldStyleLoss(), batch, 5, pad, device)  # no unexpected keyword: it works
    accumulate_gradients(tiny_model, GreedyLoss(), batch, 5, pad, device)
    got = GreedyLoss.received
    assert set(got) == set(LOSS_INPUTS)
    ordered = sorted(batch, key=len, reverse=True)  # micro-batches are length-sorted
    assert got["rewards"].tolist() == [s.reward for s in ordered]
    assert got["kept"].tolist() == [s.kept for s in ordered]
    assert got["groups"].tolist() == [s.group for s in ordered]
    for row, seq in enumerate(ordered):
        start = len(seq.prompt_ids)
        row_old = got["old_logprobs"][row]
        assert row_old[start : start + len(seq.response_ids)].tolist() == pytest.approx(list(seq.old_logprobs))
        assert row_old[:start].abs().sum() == 0 and row_old[start + len(seq.response_ids) :].abs().sum() == 0


def test_missing_generation_log_probs_are_recomputed_before_the_first_update(tiny_model, tiny_tokenizer):
    """A generator that records none: the trainer computes them from the policy before updating it,
    so the step trains exactly as with recorded ones."""
    recorded = make_batch(tiny_tokenizer)
    with torch.no_grad():
        recorded = [TrainSequence(s.prompt_ids, s.response_ids, tuple(sequence_logprobs(tiny_model, s).tolist()))
                    for s in recorded]  # fmt: skip
    bare = [TrainSequence(s.prompt_ids, s.response_ids) for s in recorded]
    config = OptimConfig(lr=1e-2, micro_batch_size=2, batch_size=2, epochs_per_step=2)
    records = []
    for sequences in (recorded, bare):
        trainer = Trainer(copy.deepcopy(tiny_model), RaftPlusPlusLoss(RaftPlusPlusLoss.Config()), config, max_steps=1,
                          pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"))  # fmt: skip
        if sequences is bare:  # what the step computes first, from the untouched policy
            filled = trainer._with_old_logprobs(bare)
            for got, expected in zip(filled, recorded, strict=True):
                assert got.old_logprobs == pytest.approx(expected.old_logprobs, abs=1e-5)
        records.append(trainer.train_step(1, sequences))
    assert records[0]["old_logprobs_recomputed"] == 0 and records[1]["old_logprobs_recomputed"] == len(bare)
    # recomputed in batches, recorded one sequence at a time: the same to ~1e-7
    assert records[1]["loss"] == pytest.approx(records[0]["loss"], rel=1e-4)
    assert records[0]["loss_clip_fraction"] > 0  # 3 updates after the first: the policy moved off π_old
    assert records[0]["generation_logprob_gap_max"] < 1e-5
    assert 0 < records[0]["policy_entropy"] < math.log(len(tiny_tokenizer))


# --- whole groups: every rollout of a selected prompt, with its reward and group statistics ------


def scored_step(rewards: list[list[float]], kept: list[list[bool]]) -> ScoredStep:
    rows = []
    for p, prompt_rewards in enumerate(rewards):
        prompt = Prompt(p, f"p{p}", (1, 2 + p))
        for s, _ in enumerate(prompt_rewards):
            rows.append(Rollout(prompt, p, s, [10 + p, 20 + s], "x", "eos", [-0.5 - p, -0.25 - s]))
    values = torch.tensor(rewards)
    return ScoredStep(rows, values, torch.isfinite(values), torch.tensor(kept))


def test_whole_groups_train_every_valid_rollout_of_a_prompt_with_a_kept_one():
    nan = float("nan")
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, nan, 0.5, 0.0]]
    kept = [[True, False, False, True], [False, False, False, False], [True, False, False, False]]
    scored = scored_step(rewards, kept)
    record: dict = {}
    sequences = KeptThisStep(whole_groups=True).sequences(1, [], scored, record)
    # prompt 1 has nothing kept: out; prompt 2's NaN reward: out
    assert [(s.group, s.response_ids[1] - 20) for s in sequences] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (2, 0),
        (2, 2),
        (2, 3),
    ]
    assert [s.kept for s in sequences] == [True, False, False, True, True, False, False]
    assert record["trained_rejected"] == 4
    group0 = [1.0, 0.0, 0.0, 1.0]
    group2 = [1.0, 0.5, 0.0]
    for s in sequences:
        values = group0 if s.group == 0 else group2
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert s.group_reward_mean == pytest.approx(mean) and s.group_reward_std == pytest.approx(std, rel=1e-6)
        assert s.old_logprobs == (-0.5 - s.group, -0.25 - (s.response_ids[1] - 20))
    only_kept = KeptThisStep().sequences(1, [], scored, {})
    assert [(s.group, s.kept) for s in only_kept] == [(0, True), (0, True), (2, True)]


def test_group_statistics_of_a_single_valid_rollout_have_zero_spread():
    mean, std = group_statistics(torch.tensor([[2.0, float("nan")]]), torch.tensor([[True, False]]))
    assert mean.tolist() == [2.0] and std.tolist() == [0.0]


def test_a_loss_needing_this_steps_groups_is_refused_with_a_pool(tiny_config, write_config, cli):
    tiny_config["loss"] = {"type": "reinforce_rej"}
    tiny_config["rs"]["pool_best"] = True
    result = cli("train", str(write_config(tiny_config)), "--dry-run")
    assert result.exit_code != 0
    assert "loss.type: 'reinforce_rej' needs every rollout of a group" in result.output
    assert "rs.pool_best" in result.output and "Traceback" not in result.output


def test_a_loss_declaring_an_unknown_training_set_is_named_in_one_line():
    from thresher.core.errors import PluginError
    from thresher.core.types import trains_on

    class Everything(OldStyleLoss):
        trains_on = "everything"

    with pytest.raises(PluginError, match=r"loss 'old_style': trains_on must be 'kept' or 'groups', not 'everything'"):
        trains_on(Everything())
    assert trains_on(OldStyleLoss()) == "kept" and trains_on(ReinforceRejLoss) == "groups"
