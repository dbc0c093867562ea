#!/usr/bin/env bash
# Prepare what a bare GPU machine without a package index needs to run scripts/gpu_check.sh:
# .gpu-carry/wheels (pydantic and friends, gguf: the packages such a machine was found to lack,
# ../shared/ENVIRONMENT.md) and .gpu-carry/tokenizer (SmolLM2's tokenizer files, 3.5 MB; the random-
# weight shapes use it). Run here, with a package index; then carry .gpu-carry to the GPU machine
# (git ignores it) and run `bash scripts/gpu_check.sh` there, which finds and uses it.
#
#   PYVER=3.12   the GPU machine's Python (its wheels are downloaded for that version)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PYVER=${PYVER:-3.12}
rm -rf .gpu-carry/wheels && mkdir -p .gpu-carry/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 -d .gpu-carry/wheels \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 gguf==0.19.0
HF_HUB_OFFLINE=1 PYTHONPATH="$PWD" "$PY" -c "
from thresher.core.model import load_tokenizer
load_tokenizer('builtin:smollm2').save_pretrained('.gpu-carry/tokenizer')"
du -sh .gpu-carry | cut -f1 | xargs -I{} echo ".gpu-carry ready ({}): carry it, then run bash scripts/gpu_check.sh"
