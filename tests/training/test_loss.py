"""The loss against an independent computation, and gradient accumulation that does not depend on
the micro-batch size."""

from __future__ import annotations

import pytest
import torch

from thresher.core.training.trainer import TrainSequence, accumulate_gradients, collate, response_logprobs
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss


def make_batch(tokenizer, seed: int = 0) -> list[TrainSequence]:
    """Sequences of different prompt and response lengths; responses end with EOS or not."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    shapes = [(5, 3, True), (9, 1, True), (3, 7, False), (6, 4, True), (4, 10, False)]
    batch = []
    for prompt_len, response_len, ends_with_eos in shapes:
        prompt = torch.randint(4, vocab, (prompt_len,), generator=g).tolist()
        response = torch.randint(4, vocab, (response_len,), generator=g).tolist()
        if ends_with_eos:
            response[-1] = tokenizer.eos_token_id
        batch.append(TrainSequence(tuple(prompt), tuple(response)))
    return batch


def reference_loss(model, batch: list[TrainSequence], normalize: str) -> torch.Tensor:
    """Plain-torch loss, one sequence at a time: full log-softmax, gather, average."""
    per_sequence_means, token_sum, token_count = [], torch.zeros(()), 0
    for seq in batch:
        ids = torch.tensor([seq.prompt_ids + seq.response_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(seq.prompt_ids)
        # token at position t is predicted by the logits at position t - 1
        picked = torch.stack([logprobs[t - 1, ids[0, t]] for t in range(start, ids.shape[1])])
        per_sequence_means.append(picked.mean())
        token_sum = token_sum + picked.sum()
        token_count += len(picked)
    if normalize == "sequence":
        return -torch.stack(per_sequence_means).mean()
    return -token_sum / token_count


def test_response_mask_covers_exactly_the_response_including_eos(tiny_tokenizer):
    batch = make_batch(tiny_tokenizer)
    input_ids, attention_mask, response_mask = collate(batch, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    for row, seq in enumerate(batch):
        expected = [False] * len(seq.prompt_ids) + [True] * len(seq.response_ids)
        width = input_ids.shape[1]
        assert response_mask[row].tolist() == expected + [False] * (width - len(expected))
        assert attention_mask[row].sum() == len(seq)
        assert input_ids[row, len(seq) - 1] == seq.response_ids[-1]  # the EOS is inside the mask


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_loss_matches_independent_computation(tiny_model, tiny_tokenizer, normalize):
    batch = make_batch(tiny_tokenizer)
    loss_fn = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config(normalize=normalize))
    input_ids, attention_mask, response_mask = collate(batch, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    token_logprobs = response_logprobs(tiny_model, input_ids, attention_mask, response_mask)
    loss, _ = loss_fn(
        token_logprobs,
        response_mask,
        num_sequences=len(batch),
        num_tokens=sum(len(s.response_ids) for s in batch),
    )
    expected = reference_loss(tiny_model, batch, normalize)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # the two normalizations genuinely differ on this batch (lengths 3..10)
    other = reference_loss(tiny_model, batch, "token" if normalize == "sequence" else "sequence")
    assert abs(other.item() - expected.item()) > 1e-4


def test_response_only_projection_equals_full_logits(tiny_model, tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, seed=3)
    input_ids, attention_mask, response_mask = collate(batch, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    selective = response_logprobs(tiny_model, input_ids, attention_mask, response_mask)
    full = torch.log_softmax(tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits, dim=-1)
    gathered = torch.zeros_like(selective)
    gathered[:, 1:] = full[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    gathered = gathered * response_mask
    torch.testing.assert_close(selective, gathered, atol=1e-5, rtol=1e-5)
    assert (selective[~response_mask] == 0).all()


def test_response_at_position_zero_is_rejected(tiny_model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="position 0"):
        response_logprobs(tiny_model, ids, torch.ones_like(ids), torch.tensor([[True, True, False]]))


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_gradient_does_not_depend_on_micro_batch_size(tiny_model, tiny_tokenizer, normalize):
    batch = make_batch(tiny_tokenizer, seed=1)
    loss_fn = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config(normalize=normalize))
    gradients, losses = {}, {}
    for micro in (1, 2, len(batch)):
        tiny_model.zero_grad(set_to_none=True)
        losses[micro] = accumulate_gradients(
            tiny_model, loss_fn, batch, micro, tiny_tokenizer.pad_token_id, torch.device("cpu")
        )
        gradients[micro] = [p.grad.clone() for p in tiny_model.parameters()]
    expected_loss = reference_loss(tiny_model, batch, normalize).item()
    for micro in (1, 2):
        assert losses[micro] == pytest.approx(losses[len(batch)], abs=1e-6)
        for got, full in zip(gradients[micro], gradients[len(batch)], strict=True):
            torch.testing.assert_close(got, full, atol=1e-6, rtol=0)
    assert losses[len(batch)] == pytest.approx(expected_loss, rel=1e-5)
    # and the full-batch gradient is the gradient of the reference loss
    tiny_model.zero_grad(set_to_none=True)
    reference_loss(tiny_model, batch, normalize).backward()
    for got, ref in zip(gradients[len(batch)], [p.grad for p in tiny_model.parameters()], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fused", "loop"])
def test_every_adamw_kernel_makes_the_same_update(tiny_tokenizer, impl):
    """The fused kernel (the default where torch has it) and the one-parameter loop give the same
    weights as torch's default foreach AdamW after three steps with weight decay and clipping."""
    from thresher.core.config import OptimConfig
    from thresher.core.model import build_tiny_model
    from thresher.core.training.trainer import Trainer

    batch = make_batch(tiny_tokenizer, seed=2)
    weights = {}
    for name in ("foreach", impl):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        config = OptimConfig(lr=1e-2, weight_decay=0.1, micro_batch_size=2, grad_clip=0.5, adamw_impl=name)
        loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
        trainer = Trainer(
            model, loss, config, max_steps=3, pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu")
        )
        assert trainer.optimizer.defaults.get("fused") is (True if name == "fused" else None)
        for step in range(1, 4):
            trainer.train_step(step, batch)
        weights[name] = [p.detach().clone() for p in model.parameters()]
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(weights["foreach"], build_tiny_model(tiny_tokenizer).parameters(), strict=True)
    )
    assert moved > 1e-3  # the updates are not trivially zero
    for got, expected in zip(weights[impl], weights["foreach"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_auto_picks_the_fused_kernel_on_cpu(tiny_model):
    from thresher.core.config import OptimConfig
    from thresher.core.training.trainer import build_adamw

    assert build_adamw(list(tiny_model.parameters()), OptimConfig()).defaults["fused"] is True


def test_steps_count_from_one_in_the_learning_rate_schedule_and_the_trainer(tiny_tokenizer):
    """Global step 1 is the first step everywhere: metrics, checkpoints, the schedule, the trainer."""
    import math

    from thresher.core.config import OptimConfig
    from thresher.core.model import build_tiny_model
    from thresher.core.training.trainer import Trainer, learning_rate

    config = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
    rates = [learning_rate(config, step, max_steps=6) for step in range(1, 7)]
    # transformers' Trainer: step k takes the schedule at k-1: warm-up 0/2, 1/2, then a cosine over 4
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert rates == pytest.approx(expected)
    model = build_tiny_model(tiny_tokenizer, seed=0)
    loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
    trainer = Trainer(model, loss, config, max_steps=6, pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="global steps count from 1, got 0"):
        trainer.train_step(0, [])


def test_linear_schedule_warmup_ratio_and_the_trl_spelling_of_the_scheduler():
    import math

    from thresher.core.config import OptimConfig
    from thresher.core.training.trainer import learning_rate

    config = OptimConfig.model_validate({"lr": 2.0, "scheduler": "linear", "warmup_ratio": 0.25})
    assert config.schedule == "linear"
    warmup = math.ceil(0.25 * 10)  # 3 steps
    expected = [2.0 * k / warmup if k < warmup else 2.0 * (10 - k) / (10 - warmup) for k in range(10)]
    assert [learning_rate(config, step, max_steps=10) for step in range(1, 11)] == pytest.approx(expected)
    floor = OptimConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(floor, 5, max_steps=5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    with pytest.raises(ValueError, match=r"set optim\.warmup_steps or optim\.warmup_ratio, not both"):
        OptimConfig(warmup_steps=2, warmup_ratio=0.1)
