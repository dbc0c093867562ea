"""The run configuration: one YAML/TOML file (or a preset) plus ``--set`` overrides, validated into
a :class:`RunConfig`. ``schema`` holds the sections, ``resolve`` the validation of plugin sections,
``files`` the reading of files, presets and overrides."""

from thresher.core.config.files import (
    apply_overrides,
    config_origin,
    dump_config,
    load_config,
    preset_names,
    read_config_file,
)
from thresher.core.config.resolve import config_directory, resolve_config, resolve_plugin_section
from thresher.core.config.schema import (
    PRESETS_DIR,
    DataConfig,
    DistributedConfig,
    GuardrailsConfig,
    LoraOptions,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    PluginSpec,
    RSConfig,
    RunConfig,
    Section,
)

__all__ = [
    "PRESETS_DIR",
    "DataConfig",
    "DistributedConfig",
    "GuardrailsConfig",
    "LoraOptions",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "PluginSpec",
    "RSConfig",
    "RunConfig",
    "Section",
    "apply_overrides",
    "config_directory",
    "config_origin",
    "dump_config",
    "load_config",
    "preset_names",
    "read_config_file",
    "resolve_config",
    "resolve_plugin_section",
]
