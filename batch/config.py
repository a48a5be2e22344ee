"""`config.yaml`: where the model lives and the default generation and media settings, parsed by strict_yaml."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from batch.errors import VlbatchError
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service import strict_yaml

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
class SpoolConfig:
    dir: Path = Path("jobs")  # holds inbox/, work/, done/, failed/, rejected/
    database: Path = Path("vlbatch.db")
    media_roots: tuple[Path, ...] = ()  # media must lie here or in the job file's own folder
    lease_seconds: float = 30.0  # a claim not renewed for this long is taken back
    rescan_seconds: float = 5.0  # full inbox rescan period (events can be lost)
    settle_seconds: float = 0.5  # a job file must be unmodified this long before it is read
    polling: bool = False  # PollingObserver (network shares) instead of the native watcher
    max_attempts: int = 3  # starts before a job whose worker keeps dying is failed
    database_timeout_seconds: float = 30.0  # a write waits this long for another process's lock, then backs off
    give_up_seconds: float = 300.0  # `vlbatch run` exits 3 after this long of unbroken faults (watch never does)

    def __post_init__(self) -> None:
        for name in (
            "lease_seconds",
            "rescan_seconds",
            "settle_seconds",
            "give_up_seconds",
            "database_timeout_seconds",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive integer, got {self.max_attempts!r}")
        if not isinstance(self.polling, bool):
            raise ValueError(f"polling must be true or false, got {self.polling!r}")
        if isinstance(self.media_roots, str) or not isinstance(self.media_roots, list | tuple):
            raise ValueError(f"media_roots must be a list of folders, got {self.media_roots!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    source: Path | None = None  # the file it came from

    def to_dict(self) -> dict[str, Any]:
        """The effective settings as plain data (paths as strings)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            return value

        return {
            section: {f.name: plain(getattr(getattr(self, section), f.name)) for f in fields(getattr(self, section))}
            for section in SECTIONS
        }


SECTIONS = ("model", "generation", "media", "spool")
# environment variables that override single settings: name -> (section, key)
ENV_OVERRIDES = {
    "VLBATCH_MODEL_DIR": ("model", "dir"),
    "VLBATCH_HF_DIR": ("model", "hf_dir"),
    "VLBATCH_BACKEND": ("model", "backend"),
    "VLBATCH_SPOOL_DIR": ("spool", "dir"),
    "VLBATCH_DATABASE": ("spool", "database"),
}


def find_config(explicit: Path | None = None) -> Path | None:
    """--config, else $VLBATCH_CONFIG, else ./config.yaml when it exists."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    local = Path(DEFAULT_FILE)
    return local if local.is_file() else None


def load_config(path: Path | None) -> Config:
    """Read a config file, then apply the VLBATCH_* environment overrides.

    Relative paths in the file are taken from the file's own folder; relative paths from the environment
    and the defaults without a file, from the current folder.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        base = path.resolve().parent
        try:
            data = strict_yaml.load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except strict_yaml.StrictYAMLError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    where = path or Path("(defaults)")
    sections = {name: _section(where, data, name, cls) for name, cls in _CLASSES.items()}
    model, spool = sections["model"], sections["spool"]
    sections["model"] = replace(model, dir=_resolve(base, model.dir), hf_dir=_resolve(base, model.hf_dir))
    sections["spool"] = replace(
        spool,
        dir=_resolve(base, spool.dir),
        database=_resolve(base, spool.database),
        media_roots=tuple(_resolve(base, p) for p in spool.media_roots),
    )
    for var, (section, key) in ENV_OVERRIDES.items():
        value = os.environ.get(var)
        if value:
            value = value if key == "backend" else _resolve(Path.cwd(), value)
            sections[section] = replace(sections[section], **{key: value})
    return Config(**sections, source=path)


def _resolve(base: Path, value: Any) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationSettings,
    "media": MediaSettings,
    "spool": SpoolConfig,
}


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
