"""Mixed precision: a bf16 policy is updated through fp32 master weights, so small updates are not
rounded away; fp16 training is refused; checkpoints and final/ hold the masters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_loss import make_batch
from thresher.core.config import OptimConfig
from thresher.core.model import build_tiny_model
from thresher.core.training.trainer import Trainer
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss


def trained_delta(tokenizer, dtype: torch.dtype, master_weights: str, steps: int = 3) -> list[torch.Tensor]:
    """Δ = after − before of every weight (in fp32) after ``steps`` updates on one fixed batch at lr 1e-5.

    Every policy starts from the same bf16-representable weights, so only the update differs."""
    model = build_tiny_model(tokenizer, seed=0).to(torch.bfloat16).to(dtype)
    before = [p.detach().float().clone() for p in model.parameters()]
    config = OptimConfig(lr=1e-5, micro_batch_size=2, grad_clip=None, master_weights=master_weights)
    loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
    trainer = Trainer(model, loss, config, max_steps=steps, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    batch = make_batch(tokenizer, seed=3)
    for step in range(1, steps + 1):
        trainer.train_step(step, batch)
    after = trainer.weights()  # the masters, for a bf16 policy
    names = [name for name, _ in model.named_parameters()]
    return [after[name].float() - b for name, b in zip(names, before, strict=True)]


def relative_difference(delta: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """mean |Δ − Δref| / mean |Δref| over all weights."""
    diff = torch.cat([(d - r).abs().flatten() for d, r in zip(delta, reference, strict=True)]).mean()
    return float(diff / torch.cat([r.abs().flatten() for r in reference]).mean())


def test_bf16_policy_master_weights_move_as_fp32_weights_move(tiny_tokenizer):
    reference = trained_delta(tiny_tokenizer, torch.float32, "auto")
    assert torch.cat([r.flatten() for r in reference]).abs().mean() > 5e-6  # the updates are real
    assert relative_difference(trained_delta(tiny_tokenizer, torch.bfloat16, "auto"), reference) < 0.1


def test_without_master_weights_bf16_updates_round_away(tiny_tokenizer):
    """What the masters fix: AdamW on bf16 weights loses most of an lr 1e-5 update."""
    reference = trained_delta(tiny_tokenizer, torch.float32, "auto")
    no_master = trained_delta(tiny_tokenizer, torch.bfloat16, "none")
    assert relative_difference(no_master, reference) > 0.5
    unchanged = sum(int((d == 0).sum()) for d in no_master) / sum(d.numel() for d in no_master)
    assert unchanged > 0.5


def test_the_bf16_copy_is_the_master_rounded(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16)
    config = OptimConfig(lr=1e-3, micro_batch_size=2)
    loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
    trainer = Trainer(model, loss, config, max_steps=2, pad_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"))
    assert trainer.master is not None and trainer.master.count == len(list(model.parameters()))
    trainer.train_step(1, make_batch(tiny_tokenizer))
    masters = trainer.weights()
    for name, param in model.named_parameters():
        assert masters[name].dtype == torch.float32
        assert torch.equal(param.detach(), masters[name].to(torch.bfloat16))
        assert param.grad is None  # the 16-bit gradient was moved into the master's and freed
    # AdamW's moments live on the fp32 masters
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())


def test_gradients_accumulate_in_fp32_whatever_the_micro_batch_size(tiny_tokenizer):
    """Two micro-batch sizes give the same update: gradients are summed in fp32, not bf16."""
    deltas = []
    for micro in (1, 5):
        model = build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16)
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        config = OptimConfig(lr=1e-5, micro_batch_size=micro, grad_clip=None)
        loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
        trainer = Trainer(model, loss, config, max_steps=1, pad_id=tiny_tokenizer.pad_token_id, device="cpu")
        trainer.train_step(1, make_batch(tiny_tokenizer))
        deltas.append([trainer.weights()[n] - b for n, b in before.items()])
    assert relative_difference(deltas[0], deltas[1]) < 0.05


def test_bf16_run_changes_nearly_every_weight_between_first_checkpoint_and_final(tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "train", "tiny", "-q", "--set", "model.dtype=bfloat16", "--set", "optim.lr=1e-5",
        "--set", f"output.dir={run}", "--set", "rs.keep_last=100", "--set", "rs.max_steps=6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first = load_file(run / "checkpoints" / "step_1" / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in first.values())  # checkpoints hold the fp32 masters
    assert all(t.dtype == torch.float32 for t in final.values())  # so does final/ by default
    changed = sum(int((first[k] != v).sum()) for k, v in final.items())
    assert changed / sum(v.numel() for v in final.values()) >= 0.9


def test_final_dtype_exports_16_bit_weights_and_says_so(tmp_path, cli):
    import json

    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    args = ["--set", "model.dtype=bfloat16", "--set", "output.final_dtype=bfloat16", "--set", "rs.max_steps=1"]
    assert cli("train", "tiny", "-q", "--set", f"output.dir={run}", *args).exit_code == 0
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(run / "final" / "model.safetensors").values())
    masters = load_file(run / "checkpoints" / "step_1" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), masters[name].to(torch.bfloat16))


def test_fp16_training_is_refused_in_one_line(tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", "tiny", "--set", "model.dtype=float16", "--set", f"output.dir={run}")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.dtype: float16 training needs loss scaling" in lines[0]
    assert not run.exists()  # refused before anything was written


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_master_weights_none_warns_about_rounding(tmp_path, cli, dtype):
    run = tmp_path / "run"
    result = cli(
        "train", "tiny", "--set", f"model.dtype={dtype}", "--set", "optim.master_weights=none",
        "--set", "rs.max_steps=1", "--set", f"output.dir={run}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: optim.master_weights=none with a bfloat16 policy" in " ".join(result.output.split())
