"""Checkpoints: a plain directory per step, written atomically, loaded without unpickling code.

``checkpoints/step_N/`` holds ``model.safetensors`` (policy weights), ``optimizer.pt`` (tensors and
numbers only, loaded with ``weights_only=True``) and ``state.json`` (step, data position, config).
It is written to a temporary directory, fsynced, then renamed: a crash mid-write leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from thresher.core.errors import ThresherError

STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-step_"))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_untie(weights), tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1), encoding="utf-8")
        for path in tmp.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied embeddings): store independent copies.
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in weights.items():
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if key in seen else tensor
        seen.setdefault(key, name)
    return out


def latest_checkpoint(root: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name))]
    complete = [(s, p) for s, p in steps if (p / "state.json").is_file()]
    return max(complete)[1] if complete else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not (path / "state.json").is_file():
        raise ThresherError(f"{path}: not a checkpoint directory (no state.json)")
    model.load_state_dict(load_file(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
