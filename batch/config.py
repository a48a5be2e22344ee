"""`config.yaml`: where the model lives and the default generation and media settings, parsed by strict_yaml.

Where the file comes from (`find_config`): `--config FILE`, else `$VLBATCH_CONFIG`, else `./config.yaml` when it
exists, else `$XDG_CONFIG_HOME/vlbatch/config.yaml` (`~/.config/vlbatch/config.yaml`) when it exists, else the
built-in defaults. Every setting can then be overridden by an environment variable `VLBATCH_<SECTION>_<KEY>`
(`env_variables()` lists them all, derived from the dataclasses below); command-line flags override both.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from batch.errors import VlbatchError
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service import strict_yaml

ENV_VAR = "VLBATCH_CONFIG"
ENV_PREFIX = "VLBATCH_"
DEFAULT_FILE = "config.yaml"
XDG_SUBPATH = Path("vlbatch") / DEFAULT_FILE  # under $XDG_CONFIG_HOME, default ~/.config


class ConfigError(VlbatchError):
    """config.yaml is unreadable or holds a value of the wrong kind."""


@dataclass(frozen=True)
class ModelConfig:
    dir: Path | None = None  # an exported ONNX folder, or the prebuilt axmodel folder
    backend: str = "auto"  # auto | onnxruntime | axengine
    hf_dir: Path | None = None  # config and tokenizer for an axmodel folder
    threads: int | None = None  # onnxruntime threads; None = every core this process may use
    providers: tuple[str, ...] = ()  # axengine execution providers, in order; () = the runtime's default
    device_id: int | None = None  # axengine device (an AXCL card) the providers run on; None = the default

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "onnxruntime", "axengine"):
            raise ValueError(f"backend must be auto, onnxruntime or axengine, got {self.backend!r}")
        threads = self.threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or null, got {threads!r}")
        providers = self.providers
        if (
            isinstance(providers, str)
            or not isinstance(providers, list | tuple)
            or not all(isinstance(p, str) and p.strip() and "," not in p for p in providers)
        ):
            raise ValueError(
                f"providers must be a list of axengine provider names (e.g. [AXCLRTExecutionProvider]), "
                f"got {providers!r}"
            )
        object.__setattr__(self, "providers", tuple(p.strip() for p in providers))  # YAML gives a list
        device_id = self.device_id
        if device_id is not None and (isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0):
            raise ValueError(f"device_id must be a non-negative integer or null, got {device_id!r}")


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
    max_workers: int = 1  # worker slots per spool and model: `run`/`watch` processes that may hold the model at once

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
        for name in ("max_attempts", "max_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.polling, bool):
            raise ValueError(f"polling must be true or false, got {self.polling!r}")
        if isinstance(self.media_roots, str) or not isinstance(self.media_roots, list | tuple):
            raise ValueError(f"media_roots must be a list of folders, got {self.media_roots!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """`run --ray` / `watch --ray`: units answered by Ray actors, one loaded model each, on the cluster's nodes."""

    ray_address: str | None = None  # --ray with no address: this, else "auto" (the cluster `ray start` made here)
    actors: int = 0  # 0 = one per unit of `resource` in the cluster, or per `cpus_per_actor` CPUs without one
    resource: str | None = None  # a custom Ray resource each actor takes one of, e.g. npu (ray start --resources)
    cpus_per_actor: int = 1  # Ray CPUs each actor reserves; also its onnxruntime threads
    media: str = "shared"  # shared: actors read the head's paths (through path_map) | bytes: the head sends the files
    bytes_nodes: tuple[str, ...] = ()  # nodes (host name or IP) that get bytes whatever `media` says
    path_map: tuple[str, ...] = ()  # HEAD_PREFIX=NODE_PREFIX: where nodes see the head's media and model folders
    in_flight_per_actor: int = 2  # units queued at each actor: enough to keep it busy, never a flood
    actor_start_seconds: float = 300.0  # an actor not ready this long after it was asked for (model load) is given up

    def __post_init__(self) -> None:
        for name in ("actors", "cpus_per_actor", "in_flight_per_actor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "actors" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'actors' else 'positive'} integer")
        if self.media not in ("shared", "bytes"):
            raise ValueError(f"media must be shared or bytes, got {self.media!r}")
        value = self.actor_start_seconds
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"actor_start_seconds must be a positive number, got {value!r}")
        for name in ("bytes_nodes", "path_map"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ValueError(f"{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(str(v) for v in value))  # YAML gives a list
        for entry in self.path_map:
            head, eq, node = entry.partition("=")
            if not eq or not head.startswith("/") or not node.startswith("/"):
                raise ValueError(f"path_map entries are /HEAD/PREFIX=/NODE/PREFIX, got {entry!r}")

    def node_path(self, path: Path | str) -> str:
        """`path` as the nodes see it: the longest matching head prefix of path_map replaced."""
        text = str(path)
        best = ("", "")
        for entry in self.path_map:
            head, _, node = entry.partition("=")
            head = head.rstrip("/")
            if (text == head or text.startswith(head + "/")) and len(head) > len(best[0]):
                best = (head, node.rstrip("/"))
        return best[1] + text[len(best[0]) :] if best[0] else text


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None  # the file it came from (absolute); None = built-in defaults

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


SECTIONS = ("model", "generation", "media", "spool", "cluster")
_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationSettings,
    "media": MediaSettings,
    "spool": SpoolConfig,
    "cluster": ClusterConfig,
}

# older short names, still honoured: alias -> the derived name it stands for
# (VLBATCH_MODEL_DIR and VLBATCH_SPOOL_DIR were already the derived names)
ENV_ALIASES = {
    "VLBATCH_HF_DIR": "VLBATCH_MODEL_HF_DIR",
    "VLBATCH_BACKEND": "VLBATCH_MODEL_BACKEND",
    "VLBATCH_DATABASE": "VLBATCH_SPOOL_DATABASE",
}
_NOT_SETTINGS = (ENV_VAR,)  # VLBATCH_* names that are not settings: the config file itself

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_NONE = ("", "null")


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides `section.key`: VLBATCH_<SECTION>_<KEY>, upper-cased."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def env_variables(aliases: bool = True) -> dict[str, str]:
    """Every VLBATCH_* variable that overrides a setting: name -> "section.key", in config.yaml order.

    Derived from the config dataclasses, so a new field gets its variable without further code; the older
    short names (ENV_ALIASES) follow at the end unless `aliases` is False.
    """
    names = {env_name(section, f.name): f"{section}.{f.name}" for section, cls in _CLASSES.items() for f in fields(cls)}
    if aliases:
        names.update({alias: names[target] for alias, target in ENV_ALIASES.items()})
    return names


def unknown_env_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """The VLBATCH_* variables in `environ` (default os.environ) that vlbatch does not know, sorted."""
    environ = os.environ if environ is None else environ
    known = env_variables()
    return sorted(
        name for name in environ if name.startswith(ENV_PREFIX) and name not in known and name not in _NOT_SETTINGS
    )


def find_config(explicit: Path | None = None) -> Path | None:
    """The config file to read, or None for the built-in defaults.

    `explicit` (--config), else $VLBATCH_CONFIG (an empty value counts as unset), else ./config.yaml when it
    exists, else $XDG_CONFIG_HOME/vlbatch/config.yaml (XDG_CONFIG_HOME defaulting to ~/.config) when it exists.
    A file named by --config or $VLBATCH_CONFIG must exist: ConfigError otherwise, never a silent fallback.
    """
    if explicit is not None:
        return _must_exist(Path(explicit), "--config")
    if os.environ.get(ENV_VAR):
        return _must_exist(Path(os.environ[ENV_VAR]), f"${ENV_VAR}")
    local = Path(DEFAULT_FILE)
    if local.is_file():
        return local
    user = _xdg_config_home() / XDG_SUBPATH
    return user if user.is_file() else None


def _xdg_config_home() -> Path:
    # the XDG spec: an unset, empty or relative $XDG_CONFIG_HOME means ~/.config
    value = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(value) if value and Path(value).is_absolute() else Path.home() / ".config"


def _must_exist(path: Path, origin: str) -> Path:
    path = path.expanduser()
    if not path.exists():
        raise ConfigError(f"{origin} {path}: no such config file")
    if not path.is_file():
        raise ConfigError(f"{origin} {path}: not a file")
    return path


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read a config file (None: the defaults), then apply the VLBATCH_* environment overrides.

    Relative paths in the file are taken from the file's own folder; relative paths from the environment
    and the defaults without a file, from the current folder. An unknown VLBATCH_* variable (a typo) is a
    ConfigError, since an override that is silently ignored is worse than a refusal.
    """
    environ = os.environ if environ is None else environ
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
    for name, values in _env_overrides(environ).items():
        sections[name] = _override(sections[name], values)
    return Config(**sections, source=None if path is None else path.resolve())


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, tuple[str, Any]]]:
    """The settings the environment overrides: section -> key -> (variable, parsed value)."""
    unknown = unknown_env_variables(environ)
    if unknown:
        known = list(env_variables()) + [ENV_VAR]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(hints)}; README, Configuration, lists the known ones"
        )
    for alias, target in ENV_ALIASES.items():
        if alias in environ and target in environ and environ[alias] != environ[target]:
            raise ConfigError(f"{alias} and {target} set the same setting to different values; unset one")
    hints_by_section = {name: typing.get_type_hints(cls) for name, cls in _CLASSES.items()}
    out: dict[str, dict[str, tuple[str, Any]]] = {}
    for var, dotted in env_variables().items():
        if var not in environ:
            continue
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = (var, _parse(var, environ[var], hints_by_section[section][key]))
    return out


def _override(current: Any, values: dict[str, tuple[str, Any]]) -> Any:
    """`current` with the parsed environment values; the dataclass checks them, and a refusal names the variable."""
    try:
        return replace(current, **{key: value for key, (_, value) in values.items()})
    except (TypeError, ValueError) as exc:
        culprits = []
        for key, (var, value) in values.items():
            try:
                replace(current, **{key: value})
            except (TypeError, ValueError):
                culprits.append(var)
        names = ", ".join(culprits or [var for var, _ in values.values()])
        raise ConfigError(f"{names}: {exc}") from exc


def _parse(var: str, text: str, hint: Any) -> Any:
    """An environment value read as the field's type; ConfigError naming the variable and the expected type."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if text.strip().lower() in _NONE:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:  # tuple[Path, ...]: os.pathsep-separated, empty pieces skipped
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_parse(var, piece, item) for piece in text.split(os.pathsep) if piece.strip())
    value = text.strip()
    expected = {bool: "true or false", int: "an integer", float: "a number", Path: "a path", str: "text"}
    if hint not in expected:  # a field type this reader does not know: fail loudly in the tests, not silently
        raise TypeError(f"{var}: no environment reader for type {hint!r}")
    kind = expected[hint] + (" or null" if optional else "")
    if hint is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(f"{var}={text!r}: expected {kind} (true/false, 1/0, yes/no)")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{var}={text!r}: expected {kind}") from None
    if hint is float:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{var}={text!r}: expected {kind}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{var}={text!r}: expected {kind} (finite)")
        return number
    if not value:
        raise ConfigError(f"{var} is empty: expected {kind}")
    if hint is Path:
        return _resolve(Path.cwd(), value)
    return value


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
