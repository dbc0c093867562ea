"""LoRA through peft: adapters start as a no-op, only they train, and what a run writes loads back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_loss import make_batch
from thresher.core.config import LoraOptions, OptimConfig
from thresher.core.model import build_tiny_model
from thresher.core.training.lora import apply_lora, has_lora, merged_state_dict
from thresher.core.training.trainer import Trainer
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

pytest.importorskip("peft")


def adapted_tiny(tokenizer, dtype=torch.float32, **options):
    model = build_tiny_model(tokenizer, seed=0).to(dtype)
    apply_lora(model, LoraOptions(**options))
    return model


def test_at_step_0_the_adapted_policy_equals_the_base_model(tiny_tokenizer):
    base = build_tiny_model(tiny_tokenizer, seed=0)
    model = adapted_tiny(tiny_tokenizer, r=8)
    assert has_lora(model) and not has_lora(base)
    ids = torch.randint(4, len(tiny_tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)


def test_only_adapter_tensors_get_gradients_and_optimizer_state(tiny_tokenizer):
    from thresher.core.training.trainer import accumulate_gradients

    model = adapted_tiny(tiny_tokenizer, r=4)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
    batch = make_batch(tiny_tokenizer)
    accumulate_gradients(model, loss, batch, 2, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in adapters), name
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    model.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model, loss, OptimConfig(lr=1e-2, micro_batch_size=2), max_steps=1, pad_id=tiny_tokenizer.pad_token_id,
        device=torch.device("cpu"),
    )  # fmt: skip
    # AdamW holds state for exactly the adapters: adapter-sized, not model-sized.
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in adapters}
    trainer.train_step(1, batch)
    moments = sum(s["exp_avg"].numel() for s in trainer.optimizer.state.values())
    assert moments == sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    for name, param in model.named_parameters():
        if name not in adapters:
            assert torch.equal(param, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".lora_B." in n)


def test_adapters_of_a_bf16_policy_stay_fp32_and_are_their_own_masters(tiny_tokenizer):
    model = adapted_tiny(tiny_tokenizer, dtype=torch.bfloat16, r=4)
    loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
    trainer = Trainer(model, loss, OptimConfig(), max_steps=1, pad_id=tiny_tokenizer.pad_token_id, device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert trainer.master is not None and trainer.master.count == 0  # nothing 16-bit is trained


def test_merged_state_dict_is_a_plain_model_computing_the_adapted_policy(tiny_tokenizer):
    model = adapted_tiny(tiny_tokenizer, r=4, alpha=16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)  # as if trained: B != 0
    plain = build_tiny_model(tiny_tokenizer, seed=5)
    state = merged_state_dict(model)
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    ids = torch.randint(4, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # the merge computed W + (alpha / r)·B·A, checked by hand for one layer
    layer = model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + 4.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(state["model.layers.0.self_attn.q_proj.weight"], expected)


def test_a_lora_run_writes_an_adapter_and_a_merged_model_that_load_back(tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from thresher.core.model import build_tiny_tokenizer

    run = tmp_path / "run"
    result = cli(
        "train", "tiny", "-q", "--set", "model.lora.r=4", "--set", "output.merge_lora=true",
        "--set", "rs.max_steps=2", "--set", f"output.dir={run}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = load_file(run / "checkpoints" / "step_2" / "model.safetensors")
    assert checkpoint and all(".lora_" in name for name in checkpoint)  # adapters only
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(tokenizer, seed=1234)  # the tiny preset's base model (seeded by rs.seed)
    adapted = PeftModel.from_pretrained(base, run / "final")
    merged = AutoModelForCausalLM.from_pretrained(run / "final" / "merged")
    ids = torch.randint(4, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert (merged(ids).logits - build_tiny_model(tokenizer, seed=1234)(ids).logits).abs().max() > 1e-3


def test_lora_with_fsdp_is_refused_in_one_line(tmp_path, cli):
    result = cli(
        "train", "tiny", "--set", "model.lora.r=4", "--set", "optim.strategy=fsdp", "--set",
        f"output.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error: model.lora: not with optim.strategy=fsdp" in result.output


def test_a_lora_target_that_matches_nothing_is_a_config_error(tmp_path, cli):
    result = cli(
        "train", "tiny", "--set", "model.lora.target_modules=[no_such_proj]", "--set",
        f"output.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: model.lora.target_modules:")
