"""Checkpoints: a plain directory per step, written atomically, loaded without unpickling code.

``checkpoints/step_N/`` holds

- ``model.safetensors``: the policy's weights at training precision (the fp32 master weights of a
  16-bit policy);
- ``optimizer.pt``: AdamW's state (tensors and numbers only, loaded with ``weights_only=True``);
- ``rng.pt``: torch's CPU (and CUDA) generator states;
- ``state.json``: the step, the data position (prompts consumed), Python's and NumPy's RNG states and
  the config the run was started with;
- ``checksums.json``: the size and CRC-32 of each file above, written last: a checkpoint damaged
  after it was written (a truncated file, flipped bytes) is recognised, reported in one line and
  passed over for the previous one.

The learning rate is a pure function of the step (``trainer.learning_rate``), so the step *is* the
scheduler state. A checkpoint is written to a temporary directory, fsynced, then renamed into place:
a crash mid-write leaves the previous checkpoint as the latest complete one, and old checkpoints are
pruned only after a new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from thresher.core.errors import ConfigError, OutputError, ThresherError
from thresher.core.faults import failpoint

STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKSUMS = "checksums.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")
# A full disk surfaces as OSError from Python, SafetensorError from safetensors, RuntimeError from torch.save.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)

# Config fields a resumed run may change: they do not alter what the remaining steps compute.
RESUME_MAY_CHANGE = (
    "rs.max_steps",
    "rs.val_every",
    "rs.val_max_prompts",
    "rs.save_every",
    "rs.keep_last",
    "rs.on_nonfinite_reward",
    "optim.max_nonfinite_updates",
    "optim.adamw_impl",
    "optim.micro_batch_headroom",  # auto resumes with the checkpoint's micro-batch
    "model.memory_limit_gb",
    "scorer.cache",
    "scorer.dedup",
    "model.device",
    "model.threads",
    "data.validation",
    "data.group_field",
    "loggers",
    "output.",
    "distributed.",
)


def save_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``root/step_{step}`` atomically, then prune to the ``keep_last`` newest."""
    final = root / f"step_{step}"
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-step_"))
        weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(_untie(weights), tmp / "model.safetensors")
        failpoint("checkpoint", step)
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(torch_rng_state(), tmp / "rng.pt")
        payload = {**state, "step": step, "rng": python_rng_state()}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        sums = {path.name: file_checksum(path) for path in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():
            _clear_for_replacement(final, tmp)
        os.replace(tmp, final)
        _fsync(root)
    except WRITE_ERRORS as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure_reason(err, root)
        raise OutputError(
            f"checkpoint of step {step}: cannot write to {root} ({reason}); earlier checkpoints are intact"
        ) from None
    if keep_last is not None:
        prune(root, keep_last)
    return final


def _torch_save(obj: Any, path: Path) -> None:
    # Through a handle we close ourselves: on a full disk torch's writer keeps its file open until
    # garbage collection, which holds the file system busy (and the space taken).
    with path.open("wb") as handle:
        torch.save(obj, handle)


def write_failure_reason(err: BaseException, where: Path) -> str:
    """Why a write failed, in words: torch reports a full disk as ``[enforce fail at
    inline_container.cc:…] unexpected pos …``, safetensors as an I/O error string."""
    if getattr(err, "errno", None) == errno.ENOSPC or _disk_is_full(where):
        return "no space left on device"
    return getattr(err, "strerror", None) or str(err).strip().splitlines()[0]


def _disk_is_full(where: Path) -> bool:
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _clear_for_replacement(old: Path, new: Path) -> None:
    """Make room for a checkpoint written again (a resumed step): its own files go; anything else
    that was put in the folder moves into the new one."""
    for file in checkpoint_files(old):
        file.unlink(missing_ok=True)
    for leftover in sorted(old.iterdir()):
        if not (new / leftover.name).exists():
            os.replace(leftover, new / leftover.name)
    old.rmdir()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the ``keep_last`` newest complete checkpoints, and leftovers of crashed writes.

    Only the files a checkpoint's ``checksums.json`` lists (and that file) are removed, then the
    folder if that emptied it: a file someone put beside them stays.
    """
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for _, path in sorted(complete_checkpoints(root))[:-keep_last]:
        for file in checkpoint_files(path):
            file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()  # fails, and stays, when something not the checkpoint's is left in it


def checkpoint_files(path: Path) -> list[Path]:
    """The files Thresher wrote into a checkpoint folder: those its checksums list, and the list."""
    try:
        names = list(json.loads((path / CHECKSUMS).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        names = list(CHECKPOINT_FILES)
    return [path / name for name in [*names, CHECKSUMS] if "/" not in name and name not in ("..", ".")]


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied embeddings): store independent copies.
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name))]
    return [(s, p) for s, p in steps if (p / "state.json").is_file()]


def file_checksum(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file, read in 16 MB pieces (fast enough for a checkpoint of any size)."""
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint directory (a missing, truncated or altered file), or None."""
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():  # written before checksums existed: only state.json can be checked
        try:
            json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"state.json is unreadable ({type(err).__name__})"
        return None
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if file_checksum(file)["crc32"] != expected["crc32"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(root: Path, warn: Callable[[str], None], below: int | None = None) -> Path | None:
    """The newest checkpoint (before step ``below``) whose files match their checksums; each damaged
    newer one is reported."""
    for step, path in sorted(complete_checkpoints(root), reverse=True):
        if below is not None and step >= below:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"checkpoint {path.name} is damaged ({problem}); trying the one before it")
    return None


def load_checkpoint(
    path: Path,
    load_weights: Callable[[dict[str, torch.Tensor]], None],
    load_optimizer: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states; returns ``state.json``'s contents.

    The weights and optimizer state go through callbacks, so a sharded (FSDP) policy can scatter them.
    """
    if not (path / "state.json").is_file():
        raise ThresherError(f"{path}: not a checkpoint directory (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        load_weights(load_file(path / "model.safetensors"))
        optimizer_state = _load_pickled(path / "optimizer.pt")
        rng_state = _load_pickled(path / "rng.pt")
        load_optimizer(optimizer_state)
        set_torch_rng_state(rng_state)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise DamagedCheckpoint(f"{path}: unreadable checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    set_python_rng_state(state["rng"])
    return state


class DamagedCheckpoint(ThresherError):
    """A checkpoint whose files cannot be read back (the run can fall back to the one before)."""


def _load_pickled(path: Path) -> Any:
    """``torch.load`` with ``weights_only``: a damaged or foreign file is a ValueError naming it,
    never torch's multi-line advice to load arbitrary code with ``weights_only=False``."""
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError):
        raise
    except Exception as err:  # UnpicklingError, EOFError, KeyError…: what a damaged pickle raises
        raise ValueError(f"{path.name} is damaged ({type(err).__name__})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# --- RNG states --------------------------------------------------------------------------------


def torch_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        return state
    numpy_state: Any = np.random.get_state()  # the legacy tuple form (typed as str | tuple upstream)
    kind, keys, pos, has_gauss, cached = numpy_state
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_python_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- resuming with a changed config --------------------------------------------------------------


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields whose change would make the resumed run differ from the one checkpointed."""
    before, after = _flatten(saved), _flatten(current)
    conflicts = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(RESUME_MAY_CHANGE) or before.get(key) == after.get(key):
            continue
        conflicts.append(f"{key}: {before.get(key)!r} in the checkpoint, {after.get(key)!r} now")
    return conflicts


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    conflicts = resume_conflicts(saved, current)
    if conflicts:
        raise ConfigError(
            [f"--resume: {path} was made with a different config (start a new run to change these):"]
            + [f"  {line}" for line in conflicts]
        )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out
