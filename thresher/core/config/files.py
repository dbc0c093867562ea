"""Config files, presets and ``--set`` overrides: text in, raw data out (validated by :mod:`.resolve`)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import yaml

from thresher.core.config.resolve import resolve_config
from thresher.core.config.schema import PRESETS_DIR, RunConfig
from thresher.core.errors import ConfigError
from thresher.core.registry import PIPELINE_KINDS, Registry


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_config_file(source: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file, or a preset by name (``demo``, ``tiny``)."""
    source = str(source)
    path = _config_path(source)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"config file {source!r}: cannot read ({err})"]) from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKey as err:
        raise ConfigError([f"config file {source!r}: {err}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"config file {source!r}: invalid YAML{where}: {reason}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"config file {source!r}: invalid TOML: {err}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {source!r}: expected a mapping of sections at the top level"])
    if "data" in data and isinstance(data["data"], dict):
        _anchor_data_paths(data["data"], path.parent)
    return data


def _config_path(source: str) -> Path:
    """The file a config argument names: a file, a preset, or a run directory's own config.yaml
    (``thresher train runs/exp1 --resume``)."""
    path = Path(source).expanduser()
    if not path.exists() and "/" not in source and path.suffix == "" and source in preset_names():
        return PRESETS_DIR / f"{source}.yaml"
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / ".thresher-run").is_file():
            return path / "config.yaml"
        raise ConfigError([f"config file {source!r}: is a directory, not a config file (nor a Thresher run directory)"])
    if not path.is_file():
        hint = f" (presets: {', '.join(preset_names())})"
        raise ConfigError([f"config file {source!r}: not found{hint}"])
    return path


class DuplicateKey(yaml.YAMLError):
    """The same key twice in one mapping: YAML would silently keep the last one."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise DuplicateKey(f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _anchor_data_paths(data: dict[str, Any], base: Path) -> None:
    # Relative prompt files are relative to the config file, so a config works from any directory.
    for key in ("train", "validation"):
        value = data.get(key)
        if isinstance(value, str) and not value.startswith("builtin:") and not Path(value).is_absolute():
            data[key] = str((base / value).resolve()) if (base / value).exists() else value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars: 8, 1e-5, true, null, [1, 2]).

    Overriding a plugin section's ``type`` with another plugin starts that section afresh: the
    previous plugin's options would not apply to the new one.
    """
    raw = copy.deepcopy(raw)
    problems = []
    for kind, new_type in _type_overrides(overrides).items():
        section = raw.get(kind)
        if not isinstance(section, dict) or section.get("type") != new_type:
            raw[kind] = {}  # another plugin: the old plugin's options would not apply to it
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. rs.max_steps=20")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw


def _type_overrides(overrides: list[str]) -> dict[str, Any]:
    found = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if sep and len(parts) == 2 and parts[0] in PIPELINE_KINDS and parts[1] == "type":
            found[parts[0]] = text.strip()
    return found


def load_config(source: str | Path, overrides: list[str], registry: Registry) -> RunConfig:
    """File (or preset) + CLI overrides → validated :class:`RunConfig`.

    A run directory as the source (``thresher train runs/copy --resume``) is the directory the run
    writes, whatever ``output.dir`` its config recorded (a copied run would otherwise resume, and
    write into, the original).
    """
    raw = read_config_file(source)
    run_dir = run_directory(source)
    if run_dir is not None:
        output: dict[str, Any] = raw["output"] if isinstance(raw.get("output"), dict) else {}
        raw["output"] = {**output, "dir": str(source)}
    origin = config_origin(source)
    base_dir = Path(origin.removeprefix("file:")).parent if origin.startswith("file:") else None
    config = resolve_config(apply_overrides(raw, overrides), registry, base_dir)
    if run_dir is not None and Path(config.output.dir).expanduser().resolve() != run_dir.resolve():
        raise ConfigError(
            [
                f"output.dir: {config.output.dir!r} is not the run directory given ({str(source)!r}); a run "
                "directory is resumed and written in place (copy it first to continue elsewhere)"
            ]
        )
    config._origin = origin
    return config


def run_directory(source: str | Path) -> Path | None:
    """The Thresher run directory ``source`` names, or None for a config file or preset."""
    path = Path(str(source)).expanduser()
    config = _config_path(str(source))
    return path if path.is_dir() and config.parent == path else None


def config_origin(source: str | Path) -> str:
    """``preset:NAME`` for a preset, else ``file:`` and the file's absolute path."""
    path = _config_path(str(source))
    if path.parent == PRESETS_DIR and str(source) == path.stem:
        return f"preset:{path.stem}"
    return f"file:{path.resolve()}"


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
