"""`config.yaml`: where the model lives and the default generation and media settings, parsed with safe_load."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from batch.errors import VlbatchError
from batch.generate import GenerationSettings
from batch.media import MediaSettings

ENV_VAR = "VLBATCH_CONFIG"
DEFAULT_FILE = "config.yaml"


class ConfigError(VlbatchError):
    """config.yaml is unreadable or holds a value of the wrong kind."""


@dataclass(frozen=True)
class ModelConfig:
    dir: Path | None = None  # an exported ONNX folder, or the prebuilt axmodel folder
    backend: str = "auto"  # auto | onnxruntime | axengine
    hf_dir: Path | None = None  # config and tokenizer for an axmodel folder
    threads: int | None = None  # onnxruntime threads; None = every core this process may use


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    source: Path | None = None  # the file it came from


def find_config(explicit: Path | None = None) -> Path | None:
    """--config, else $VLBATCH_CONFIG, else ./config.yaml when it exists."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    local = Path(DEFAULT_FILE)
    return local if local.is_file() else None


def load_config(path: Path | None) -> Config:
    """Read a config file; relative model paths are taken from the file's own folder."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(data) - {"model", "generation", "media"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    model = _section(path, data, "model", ModelConfig)
    base = path.parent
    model = replace(
        model,
        dir=_resolve(base, model.dir),
        hf_dir=_resolve(base, model.hf_dir),
    )
    return Config(
        model=model,
        generation=_section(path, data, "generation", GenerationSettings),
        media=_section(path, data, "media", MediaSettings),
        source=path,
    )


def _resolve(base: Path, value: Any) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _section(path: Path, data: dict[str, Any], name: str, cls: type) -> Any:
    raw = data.get(name) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: `{name}` must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) in `{name}`: {', '.join(sorted(unknown))} (known: {', '.join(known)})"
        )
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: bad value in `{name}`: {exc}") from exc
