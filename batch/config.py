"""`config.yaml`: where the model lives and the default generation and media settings, parsed by strict_yaml.

Where the file comes from (`find_config`): `--config FILE`, else `$VLBATCH_CONFIG`, else `./config.yaml` when it
exists, else `$XDG_CONFIG_HOME/vlbatch/config.yaml` (`~/.config/vlbatch/config.yaml`) when it exists, else
`/etc/vlbatch/config.yaml` (SYSTEM_CONFIG) when it exists, else the built-in defaults. Every setting can then be
overridden by an environment variable `VLBATCH_<SECTION>_<KEY>` (`env_variables()` lists them all, derived from
the dataclasses below); command-line flags override both. Values are checked as they are read; `check_config`
then checks that the folders they name are there, before a command starts any work. Every refusal is a
ConfigError of one line: where the value came from (file or variable), the key (`section.key`) and the problem.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from batch import strict_yaml
from batch.errors import VlbatchError
from batch.huge_pages import OFF_SWITCH
from batch.infer.runtime.native_attention import CACHE_VARIABLE as NATIVE_CACHE
from batch.infer.runtime.native_attention import SWITCH as FUSED_ATTENTION_SWITCH
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.model.export.manifest import MAX_ROWS

ENV_VAR = "VLBATCH_CONFIG"
ENV_PREFIX = "VLBATCH_"
DEFAULT_FILE = "config.yaml"
XDG_SUBPATH = Path("vlbatch") / DEFAULT_FILE  # under $XDG_CONFIG_HOME, default ~/.config
SYSTEM_CONFIG = Path("/etc/vlbatch/config.yaml")  # the last file looked for (tests point it elsewhere)
DEFAULTS_ORIGIN = "(built-in defaults)"  # where a value came from when no file and no variable set it


class ConfigError(VlbatchError):
    """config.yaml is unreadable or holds a value of the wrong kind."""

    def __init__(self, message: str) -> None:
        # one line, whatever a key, value or folder name holds (a newline in a quoted YAML key, say)
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


# answers decoded together by default: on a 2-core Zen 4 with the int4+int8 export (bench/photos_per_hour.py, 20
# one-tile photos), 8 gave 1,655 photos per hour, 4 gave 1,530-1,564 and 1 gave 1,152; more rows slow each answer's
# own stream (15.6 tokens/s at 8 against 41 alone) for little more throughput
DEFAULT_BATCH = 8
MAX_BATCH = MAX_ROWS


@dataclass(frozen=True)
class ModelConfig:
    """Which model answers, on which runtime, and how many answers it decodes at once; or the model server that
    answers instead (`backend: openai`, see docs/servers.md)."""

    dir: Path | None = None  # an exported ONNX folder, or the prebuilt axmodel folder
    backend: str = "auto"  # auto | onnxruntime | axengine | openai (an OpenAI-compatible server at model.url)
    hf_dir: Path | None = None  # config and tokenizer for an axmodel folder
    threads: int | None = None  # onnxruntime threads; null = every core this process may use
    providers: tuple[str, ...] = ()  # axengine execution providers, in order; [] = the runtime's default
    device_id: int | None = None  # axengine device (an AXCL card) the providers run on; null = the default
    npu_io: str = "copy"  # axengine decoder layers: copy (run() feeds the whole K/V cache), resident, auto
    batch: int = DEFAULT_BATCH  # answers decoded together (onnxruntime exports of format 2 on; the NPU decodes one)
    url: str | None = None  # backend openai: the server, e.g. http://127.0.0.1:8080 (its /v1 API)
    name: str | None = None  # backend openai: the served model to ask; null = the server's only model
    api_key_env: str | None = None  # backend openai: the variable holding the API key (never stored or logged)
    concurrency: int = 4  # backend openai: requests in flight at once (the server's parallel slots)
    timeout_seconds: float = 300.0  # backend openai: connecting, the first token, and between two tokens

    def __post_init__(self) -> None:
        batch = self.batch
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be an integer from 1 to {MAX_BATCH}, got {batch!r}")
        if self.backend not in ("auto", "onnxruntime", "axengine", "openai"):
            raise ValueError(f"backend must be auto, onnxruntime, axengine or openai, got {self.backend!r}")
        if self.url is not None and not str(self.url).startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// address, got {self.url!r}")
        concurrency = self.concurrency
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
            raise ValueError(f"concurrency must be an integer from 1 to 256, got {concurrency!r}")
        timeout = self.timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout_seconds must be a positive number of seconds, got {timeout!r}")
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
        if self.npu_io not in ("copy", "resident", "auto"):
            raise ValueError(f"npu_io must be copy, resident or auto, got {self.npu_io!r}")


# SpoolConfig's durations that 0 makes no sense for, with what 0 would do
_POSITIVE_SECONDS = {
    "lease_seconds": " (0 would take every job back from its worker at once)",
    "heartbeat_seconds": " (0 would make every worker write its heartbeat without a pause)",
    "rescan_seconds": " (0 would make an idle `watch` rescan the inbox without a pause, at 100% CPU)",
    "give_up_seconds": " (0 would make `run` give up at the first fault)",
    "database_timeout_seconds": " (0 would fail every write that meets another process's lock)",
}


@dataclass(frozen=True)
class SpoolConfig:
    """The spool folder and the database, and how workers claim, retry and wait."""

    dir: Path = Path("jobs")  # holds inbox/, work/, done/, failed/, rejected/
    database: Path = Path("vlbatch.db")
    media_roots: tuple[Path, ...] = ()  # media must lie here or in the job file's own folder
    lease_seconds: float = 30.0  # a claim not renewed for this long is taken back
    rescan_seconds: float = 5.0  # full inbox rescan period (events can be lost)
    heartbeat_seconds: float = 5.0  # a worker writes its liveness this often; silent for 2 beats = gone
    settle_seconds: float = 0.5  # a job file must be unmodified this long before it is read
    polling: bool = False  # PollingObserver (network shares) instead of the native watcher
    max_attempts: int = 3  # starts before a job whose worker keeps dying is failed
    database_timeout_seconds: float = 30.0  # a write waits this long for another process's lock, then backs off
    give_up_seconds: float = 300.0  # `vlbatch run` exits 3 after this long of unbroken faults (watch never does)
    max_workers: int = 1  # worker slots per spool and model: `run`/`watch` processes that may hold the model at once

    def __post_init__(self) -> None:
        for name in (*_POSITIVE_SECONDS, "settle_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
            if name == "settle_seconds" and value < 0:
                raise ValueError(f"settle_seconds must be 0 or more, got {value!r}")
            if name in _POSITIVE_SECONDS and value <= 0:
                raise ValueError(f"{name} must be more than 0, got {value!r}{_POSITIVE_SECONDS[name]}")
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
    in_flight_per_actor: int = 2  # units at each actor at least (it holds model.batch + 1): busy, never a flood
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
    # "section.key" -> where its value came from: the file, a VLBATCH_* variable or a command-line flag
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def origin(self, key: str) -> str:
        """Where the value of `key` ("section.key") came from, as an error message names it."""
        return self.origins.get(key) or (str(self.source) if self.source else DEFAULTS_ORIGIN)

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
# VLBATCH_* names that are not settings: the config file itself, the huge pages switch (read at start-up, before
# any configuration: batch/huge_pages.py), and the fused attention's switch and folder (read as a model loads:
# batch/infer/runtime/native_attention.py)
_NOT_SETTINGS = (ENV_VAR, OFF_SWITCH, FUSED_ATTENTION_SWITCH, NATIVE_CACHE)

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
    exists, else $XDG_CONFIG_HOME/vlbatch/config.yaml (XDG_CONFIG_HOME defaulting to ~/.config) when it exists,
    else SYSTEM_CONFIG (/etc/vlbatch/config.yaml) when it exists.
    A file named by --config or $VLBATCH_CONFIG must exist: ConfigError otherwise, never a silent fallback.
    """
    if explicit is not None:
        return _must_exist(Path(explicit), "--config")
    if os.environ.get(ENV_VAR):
        return _must_exist(Path(os.environ[ENV_VAR]), f"${ENV_VAR}")
    local = Path(DEFAULT_FILE)
    if local.is_file():
        return local
    for candidate in (_xdg_config_home() / XDG_SUBPATH, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


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
        data = _read_file(path)
    where = path or Path(DEFAULTS_ORIGIN)
    sections = {name: _section(where, data, name, cls) for name, cls in _CLASSES.items()}
    model, spool = sections["model"], sections["spool"]
    sections["model"] = replace(model, dir=_resolve(base, model.dir), hf_dir=_resolve(base, model.hf_dir))
    sections["spool"] = replace(
        spool,
        dir=_resolve(base, spool.dir),
        database=_resolve(base, spool.database),
        media_roots=tuple(_resolve(base, p) for p in spool.media_roots),
    )
    origins = {key: str(where) for key in env_variables(aliases=False).values()}
    for name, values in _env_overrides(environ).items():
        sections[name] = _override(name, sections[name], values)
        origins.update({f"{name}.{key}": var for key, (var, _) in values.items()})
    return Config(**sections, source=None if path is None else path.resolve(), origins=origins)


def _read_file(path: Path) -> dict[str, Any]:
    """The config file's mapping of sections; ConfigError for a file that cannot be read or parsed."""
    try:
        data = strict_yaml.load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (strict_yaml.StrictYAMLError, yaml.YAMLError) as exc:
        raise ConfigError(_yaml_problem(path, exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}) at the top level")
    unknown = sorted(str(name) for name in set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: {', '.join(unknown)}: {_unknown('section', unknown, SECTIONS)}")
    return data


def _yaml_problem(path: Path, exc: Exception) -> str:
    """A YAML error of the file in one line: FILE:LINE:COLUMN: problem (FILE: problem without a position)."""
    where = strict_yaml.position(exc)
    prefix = f"{path}:{where[0]}:{where[1]}" if where else str(path)
    kind = "" if isinstance(exc, strict_yaml.StrictYAMLError) else "not valid YAML: "
    return f"{prefix}: {kind}{strict_yaml.describe(exc)}"


def _unknown(kind: str, names: list[str], known: typing.Iterable[str]) -> str:
    """Says "unknown key (did you mean top_k?)" for one name, "unknown keys (known: a, b)" for several or no match."""
    known = list(known)
    close = difflib.get_close_matches(names[0], known, n=1) if len(names) == 1 else []
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
    return f"unknown {kind}{'s' if len(names) > 1 else ''} ({hint})"


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
            f"unknown environment variable(s) {', '.join(hints)}; docs/configuration.md lists the known ones"
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
        out.setdefault(section, {})[key] = (var, _parse(var, dotted, environ[var], hints_by_section[section][key]))
    return out


def _override(section: str, current: Any, values: dict[str, tuple[str, Any]]) -> Any:
    """`current` with the parsed environment values; the dataclass checks them, and a refusal names the variable."""
    try:
        return replace(current, **{key: value for key, (_, value) in values.items()})
    except (TypeError, ValueError, OverflowError) as exc:
        for key, (var, value) in values.items():
            try:
                replace(current, **{key: value})
            except (TypeError, ValueError, OverflowError) as refusal:
                raise ConfigError(f"{var}: {section}.{key}: {_problem(refusal, key)}") from exc
        names = ", ".join(var for var, _ in values.values())
        raise ConfigError(f"{names}: {section}: {exc}") from exc


def _problem(refusal: Exception, key: str) -> str:
    """A dataclass's refusal without the key it starts with ("max_tiles must be ..." -> "must be ...")."""
    text = str(refusal)
    for lead in (f"{key} ", f"media setting `{key}` "):
        if text.startswith(lead):
            return text[len(lead) :]
    return text


def _parse(var: str, dotted: str, text: str, hint: Any) -> Any:
    """An environment value read as the field's type; ConfigError naming the variable, key and expected type."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if text.strip().lower() in _NONE:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:  # tuple[Path, ...]: os.pathsep-separated, empty pieces skipped
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_parse(var, dotted, piece, item) for piece in text.split(os.pathsep) if piece.strip())
    value = text.strip()
    expected = {bool: "true or false", int: "an integer", float: "a number", Path: "a path", str: "text"}
    if hint not in expected:  # a field type this reader does not know: fail loudly in the tests, not silently
        raise TypeError(f"{var}: no environment reader for type {hint!r}")
    kind = expected[hint] + (" or null" if optional else "")
    where = f"{var}: {dotted}"
    if hint is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(f"{where}: expected {kind} (true/false, 1/0, yes/no), got {text!r}")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind}, got {text!r}") from None
    if hint is float:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind}, got {text!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected {kind} (finite), got {text!r}")
        return number
    if not value:
        raise ConfigError(f"{where}: expected {kind}, got an empty value")
    if hint is Path:
        return _resolve(Path.cwd(), value)
    return value


def _resolve(base: Path, value: Any) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(os.path.expanduser(str(value)))  # not Path.expanduser: `~nosuchuser` stays as written, no RuntimeError
    return p if p.is_absolute() else base / p


def _section(path: Path, data: dict[str, Any], name: str, cls: type) -> Any:
    """One section of the file as its dataclass; a refusal names the file and the key (`section.key`)."""
    raw = data.get(name) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {name}: must be a mapping of settings, got {raw!r}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(key) for key in set(raw) - set(known))
    if unknown:
        keys = ", ".join(f"{name}.{key}" for key in unknown)
        raise ConfigError(f"{path}: {keys}: {_unknown('key', unknown, known)}")
    try:
        return cls(**raw)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int too large for a float field
        for key, value in raw.items():
            try:
                cls(**{key: value})
            except (TypeError, ValueError, OverflowError) as refusal:
                raise ConfigError(f"{path}: {name}.{key}: {_problem(refusal, key)}") from exc
        raise ConfigError(f"{path}: {name}: {exc}") from exc


# checks before a command starts --------------------------------------------------------------------------------


def check_config(config: Config, needs_model: bool, needs_spool: bool = True) -> None:
    """Refuse a configuration whose folders are not there, before a command starts any work.

    `needs_model` (run, watch, ask, estimate): model.dir and model.hf_dir, when set, must be folders.
    `needs_spool` (every command that uses the spool or the database): spool.dir and the database's folder
    must exist or be creatable in a folder that exists, and each spool.media_roots entry must be a folder
    (a typo or an unmounted share must not pass silently). The first problem is a ConfigError of one line.
    """
    problems = config_problems(config, needs_model=needs_model, needs_spool=needs_spool)
    if problems:
        raise ConfigError(problems[0])


def config_problems(config: Config, needs_model: bool, needs_spool: bool = True) -> list[str]:
    """Every problem `check_config` would refuse, each as "ORIGIN: section.key: problem"."""
    found: list[tuple[str, str | None]] = []
    if config.model.backend == "openai" and not config.model.url:
        found.append(("model.url", "backend openai needs the server's address here (http://host:port)"))
    if needs_model and config.model.backend != "openai":  # a server needs no model folder here
        found += [
            ("model.dir", _folder_problem(config.model.dir)),
            ("model.hf_dir", _folder_problem(config.model.hf_dir)),
        ]
    if needs_spool:
        found.append(("spool.dir", _creatable_folder_problem(config.spool.dir)))
        found.append(("spool.database", _database_problem(config.spool.database)))
        found += [("spool.media_roots", _folder_problem(root)) for root in config.spool.media_roots]
    return [f"{config.origin(key)}: {key}: {problem}" for key, problem in found if problem]


def _kind(path: Path) -> str:
    """ "folder", "file", "missing", or why it cannot be looked at (e.g. "cannot be read (Permission denied)")."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror})"
    except ValueError as exc:  # a NUL character in the path
        return f"cannot be looked at ({exc})"
    return "folder" if stat.S_ISDIR(mode) else "file"


def _folder_problem(path: Path | None) -> str | None:
    """None when `path` is unset or a folder; else what is wrong with it."""
    if path is None:
        return None
    kind = _kind(path)
    if kind == "folder":
        return None
    if kind == "missing":
        return f"{path} does not exist"
    if kind == "file":
        return f"{path} is not a folder"
    return f"{path} {kind}"


def _creatable_folder_problem(path: Path) -> str | None:
    """None when `path` is a folder, or is missing from a folder it can be created in; else what is wrong."""
    kind = _kind(path)
    if kind != "missing":
        return _folder_problem(path)
    parent = _kind(path.parent)
    if parent == "folder":
        return None
    if parent == "missing":
        return f"{path} does not exist, nor does {path.parent} to create it in"
    return f"{path} cannot be created: {_folder_problem(path.parent)}"


def _database_problem(database: Path) -> str | None:
    """None when the database file is there, or its folder is (or can be created); else what is wrong."""
    kind = _kind(database)
    if kind == "folder":
        return f"{database} is a folder, not a database file"
    if kind == "file":
        return None
    if kind != "missing":
        return f"{database} {kind}"
    problem = _creatable_folder_problem(database.parent)
    return None if problem is None else f"{database}: its folder {problem}"
