"""The run directory: what a run writes, written so that a crash never leaves a file a later run
would trust.

Rollout files and the final model are written to a temporary name and renamed into place; the
metrics file is append-only and flushed per line, and a torn last line (a kill mid-write) is ignored
when a resumed run reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from thresher.core.errors import ConfigError, OutputError
from thresher.core.model import save_pretrained_as
from thresher.core.run.checkpoint import WRITE_ERRORS
from thresher.version import __version__

SPACE_MARGIN = 1.1
MARKER = ".thresher-run"  # JSON written into every run directory Thresher creates
LOCK = ".thresher.lock"  # flock()ed by the process that owns the run (released when it exits)
# Every file and folder Thresher wrote in the run directory, one relative path a line, appended as
# they are written: ``overwrite`` removes exactly these and nothing else (a user's notes in final/, a
# file named like a checkpoint, stay where they are).
MANIFEST = ".thresher-manifest"


class RunDir:
    """One run's directory: owned by one process at a time, recognised by its marker."""

    def __init__(self, path: Path):
        self.path = path
        self.metrics = path / "metrics.jsonl"
        self.rollouts = path / "rollouts"
        self.checkpoints = path / "checkpoints"
        self.final = path / "final"
        self._lock_handle: Any = None

    def prepare(self, *, resume: bool, overwrite: bool, origin: str = "") -> None:
        """Take the directory for this process, or fail before anything is written or loaded.

        A fresh run needs an empty (or new) directory, or a Thresher run directory with
        ``overwrite`` (then only Thresher's own outputs are removed); a preset (``origin``
        ``preset:NAME``) overwrites only a run of the same preset. ``resume`` needs a Thresher run.
        Nothing is written here but the lock, the marker and the (empty) rollouts folder: the
        config is written by :meth:`write_config` once the resume check has passed.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise OutputError(f"output.dir {str(self.path)!r}: not writable ({err.strerror or err})") from None
        self.lock()
        kind = self.kind()
        where = f"output.dir: {str(self.path)!r}"
        if kind == "foreign":
            raise ConfigError(
                [f"{where} is not empty and is not a Thresher run directory (no {MARKER}); choose a new or empty one"]
            )
        if resume:
            if kind != "run":
                raise ConfigError([f"--resume: {str(self.path)!r} holds no Thresher run to resume"])
            return
        if kind == "run" and self._has_outputs():
            if not (self.path / MANIFEST).is_file():
                raise ConfigError(
                    [
                        f"{where} holds a run written by an earlier Thresher that kept no list of its files "
                        f"({MANIFEST}), so overwrite cannot tell them from yours: remove it yourself or choose "
                        "another directory"
                    ]
                )
            previous = self.marker().get("origin", "")
            if not overwrite:
                raise ConfigError(
                    [
                        f"{where} already holds a run; use --resume, set output.overwrite=true, or choose "
                        "another directory"
                    ]
                )
            if origin.startswith("preset:") and previous != origin:
                made_by = previous.removeprefix("file:") or "an earlier Thresher"
                raise ConfigError(
                    [
                        f"{where} holds a run made by {made_by}; the {origin.removeprefix('preset:')} preset "
                        "overwrites only its own runs: choose another output.dir"
                    ]
                )
            self._remove_outputs()
        self.write_atomic(self.path / MARKER, json.dumps({"thresher": __version__, "origin": origin}) + "\n")
        if not self.rollouts.exists():
            self.guarded(lambda: self.rollouts.mkdir(), "rollouts/")
            self.record(self.rollouts)
        self.record(self.metrics)  # the run's metrics writer appends to it from the first step on

    def write_config(self, config_yaml: str) -> None:
        self.write_atomic(self.path / "config.yaml", config_yaml)

    def lock(self) -> None:
        """One process owns a run directory: an OS lock (flock), so a killed owner leaves none behind."""
        import fcntl

        if self._lock_handle is not None:
            return
        path = self.path / LOCK
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise OutputError(
                f"output.dir {str(self.path)!r} is in use by another Thresher process (PID {owner}); wait for it "
                "to finish or stop it, or choose another output.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def release(self) -> None:
        """Give the directory up (the process keeps running: a Python session may start another run)."""
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the descriptor releases the flock
            self._lock_handle = None

    def kind(self) -> str:
        """``empty``, ``run`` (a Thresher run directory: it has the marker) or ``foreign`` (anything
        else, left alone: without the marker nothing in it is Thresher's to touch)."""
        names = {p.name for p in self.path.iterdir()} - {LOCK, ".write-test"}
        if not names:
            return "empty"
        return "run" if MARKER in names else "foreign"

    def marker(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _has_outputs(self) -> bool:
        """Whether a run happened here (metrics or checkpoints), not merely started and failed."""
        return self.metrics.exists() or any(self.checkpoints.glob("step_*"))

    def record(self, *paths: Path) -> None:
        """Add ``paths`` (inside the run directory) to the manifest of what Thresher wrote."""
        lines = "".join(f"{path.relative_to(self.path).as_posix()}\n" for path in paths)
        if lines:
            self.guarded(lambda: _append(self.path / MANIFEST, lines), MANIFEST)

    def recorded(self) -> list[Path]:
        """The manifest's paths that lie inside the run directory (an edited line pointing elsewhere,
        with ``..`` or an absolute path, is ignored: it cannot make Thresher delete outside)."""
        try:
            lines = (self.path / MANIFEST).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        root = self.path.resolve()
        paths = []
        for line in dict.fromkeys(lines):
            relative = Path(line)
            if not line or relative.is_absolute() or ".." in relative.parts:
                continue
            path = self.path / relative
            if path.parent.resolve().is_relative_to(root):  # no folder of it is a link leading out
                paths.append(path)
        return paths

    def _remove_outputs(self) -> None:
        """Remove what a previous run wrote, as its manifest lists it, so nothing stale (an old
        checkpoint, a later step's rollouts) can be mistaken for this run's. Files first, then each
        listed folder that is empty by then: anything else in the directory stays."""

        def remove() -> None:
            recorded = self.recorded()
            for path in recorded:
                if path.is_symlink() or path.is_file():
                    path.unlink()
            for path in sorted(recorded, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                    path.rmdir()
            for stale in [*self.path.glob(".tmp-final*"), *self.checkpoints.glob(".tmp-step_*")]:
                shutil.rmtree(stale, ignore_errors=True)  # half-written by Thresher: never a user's
            (self.path / MANIFEST).unlink(missing_ok=True)

        self.guarded(remove, "")

    def check_space(self, checkpoint_bytes: int, final_bytes: int) -> None:
        """Refuse to start when the disk cannot take one checkpoint and the final model."""
        needed = int((checkpoint_bytes + final_bytes) * SPACE_MARGIN)
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise OutputError(
                f"output.dir {str(self.path)!r}: {_size(free)} free, but a checkpoint and the final model of "
                f"this policy need about {_size(needed)}; free some space or choose another directory"
            )

    def guarded(self, action: Any, what: str) -> Any:
        try:
            return action()
        except WRITE_ERRORS as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise OutputError(f"cannot write {self.path / what} ({reason})") from None

    def write_atomic(self, path: Path, text: str) -> None:
        def write() -> None:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)

        self.guarded(write, str(path.relative_to(self.path)))
        if path.name not in (MARKER, MANIFEST):
            self.record(path)

    def write_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({"step": step, **row}) + "\n" for row in rows)
        self.write_atomic(self.rollouts / f"step_{step}.jsonl", text)

    def save_final(self, model: torch.nn.Module, tokenizer: Any, weights: dict[str, torch.Tensor], dtype: str) -> None:
        """An HF ``from_pretrained`` directory of ``weights`` (the trained masters) cast to ``dtype``."""

        def write(folder: Path) -> None:
            save_pretrained_as(model, folder, weights, dtype)
            tokenizer.save_pretrained(folder)

        self._replace_final(write)

    def save_final_adapter(
        self,
        peft_model: Any,
        tokenizer: Any,
        dtype: str,
        model: torch.nn.Module,
        merged: dict[str, torch.Tensor] | None,
    ) -> None:
        """``final/`` as a peft adapter directory (``PeftModel.from_pretrained``), and with ``merged``
        also ``final/merged/``, a plain HF model with the adapters merged in."""
        from thresher.core.training.lora import save_adapter

        def write(folder: Path) -> None:
            save_adapter(peft_model, folder, dtype)
            tokenizer.save_pretrained(folder)
            if merged is not None:
                save_pretrained_as(model, folder / "merged", merged, dtype)
                tokenizer.save_pretrained(folder / "merged")

        self._replace_final(write)

    def _replace_final(self, write: Callable[[Path], None]) -> None:
        """``write`` a folder beside ``final/``, then swap it in: a crash leaves the old one or the new.

        What the old ``final/`` holds that Thresher did not write (a user's notes) moves into the new
        one first; a name the new model also uses is refused rather than overwritten.
        """

        def save() -> None:
            tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".tmp-final"))
            try:
                write(tmp)
                written = sorted(tmp.rglob("*"))
                if self.final.exists():
                    self._carry_over_user_files(tmp)
                    shutil.rmtree(self.final)
                os.replace(tmp, self.final)
                _usual_permissions(self.final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.record(self.final, *(self.final / p.relative_to(tmp) for p in written))

        self.guarded(save, "final/")

    def _carry_over_user_files(self, new_final: Path) -> None:
        recorded = set(self.recorded())
        for path in sorted(self.final.rglob("*")):
            if path in recorded or (path.is_dir() and not path.is_symlink()):
                continue
            target = new_final / path.relative_to(self.final)
            if target.exists() or target.is_symlink():
                raise OutputError(
                    f"cannot replace {self.final}: {path.relative_to(self.final)} there is not Thresher's and the "
                    "new model writes the same name; move it elsewhere"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Metrics lines written so far; a torn last line (the process was killed mid-write) is dropped."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics(self, last_step: int) -> list[dict[str, Any]]:
        """Keep the lines of steps up to ``last_step`` (those after it will run again)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        self.write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        return kept


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _usual_permissions(root: Path) -> None:
    """``mkdtemp`` makes a 0700 directory: give what it became the permissions the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"
