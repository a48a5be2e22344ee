"""The job file format: parsing and validating one YAML job into a :class:`Job`, resolving its media safely.

A job file is a small YAML mapping (``prompt``, ``inputs`` and optional overrides). Parsing never trusts it:
the file is read with a size cap and without following a symlink, YAML is loaded with the strict safe loader of
:mod:`batch.strict_yaml` only (no duplicate keys, bounded nesting and aliases), every key and type is
checked, and every input is resolved to real paths that must lie under an allowed media folder (or the job's own
folder), within caps on the number of inputs and of media files. Media are recognised by suffix only; nothing is
decoded here. Every problem, an unexpected error while parsing included, becomes a :class:`JobRejected` whose
reason tells the author what to fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import glob
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml

from batch import strict_yaml
from batch.errors import MediaError, VlbatchError
from batch.infer.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_kind
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.spool import PRIORITY_LIMIT  # higher is taken first from the inbox: the spool orders by it

MAX_JOB_BYTES = 256 * 1024
MAX_TOGETHER = 4
MAX_INPUTS = 1_000  # entries in `inputs`
MAX_MEDIA_FILES = 100_000  # media files matched by all the inputs of one job together
MAX_YAML_DEPTH = strict_yaml.MAX_DEPTH  # levels of nested mappings and lists in a job file
MODES = ("each", "together")
SIDECAR_FORMATS = ("txt", "xmp")  # `sidecar: true` is txt; see batch/service/worker/sidecars.py

_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
_MEDIA_KEYS = ("video_frames", "max_tiles")
_MAX_ID_CHARS = 128
_GLOB_MAGIC = re.compile(r"[*?[]")
_TAG_PREFIX = "tag:yaml.org,2002:"


class JobRejected(VlbatchError):
    """A job file that cannot run as written: unreadable, malformed, invalid, or pointing at forbidden media."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Invalid(Exception):
    """Internal: a rejection reason, turned into JobRejected (with the job's path) by parse_job."""


@dataclass(frozen=True)
class Job:
    """One validated job: what to ask, about which media files, with which settings."""

    id: str
    source: Path
    prompt: str
    mode: str = "each"
    media: tuple[Path, ...] = ()
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    media_settings: MediaSettings = field(default_factory=MediaSettings)
    sidecar: str | None = None  # "txt", "xmp" (SIDECAR_FORMATS), or None: no sidecar
    sidecar_overwrite: bool = False
    tags: list[str] | dict[str, Any] = field(default_factory=list)
    content_sha256: str = ""
    inputs: tuple[str, ...] = ()
    remove_gone_sidecars: bool = False  # standing jobs: delete the sidecar vlbatch wrote for a file that is gone
    priority: int = 0  # higher is taken first from the inbox (and among standing passes); see spool.Spool.pending

    def units(self) -> list[tuple[Path, ...]]:
        """The units of work: one per media file in mode each, a single one with every file in mode together.

        A text-only job (no inputs) has exactly one unit, with no media.
        """
        if not self.inputs and not self.media:
            return [()]
        if self.mode == "together":
            return [tuple(self.media)] if self.media else []
        return [(path,) for path in self.media]


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def parse_job(
    path: Path,
    *,
    allowed_roots: Sequence[Path],
    generation: GenerationSettings,
    media: MediaSettings,
    base_dir: Path | None = None,
    standing: bool = False,
    resolve_media: bool = True,
) -> Job:
    """Read, validate and resolve one job file; JobRejected (with a specific reason) for anything wrong.

    Relative inputs resolve against ``base_dir`` (default: the job file's folder). Media must really lie (after
    following every symlink) under one of ``allowed_roots``, ``base_dir`` or the job file's own folder.
    ``generation`` and ``media`` are the defaults the job's overrides are merged over.

    A ``standing`` job (spool/standing/) answers its folders as files come: an input that matches nothing yet is
    fine, a job without inputs is refused. ``resolve_media=False`` checks everything but the inputs' files
    (``media`` stays empty), for a pass that looks only at the files that changed.
    """
    path = Path(path)
    with _rejecting(path):
        data, mapping = load_job_text(path)
        source = path.resolve()
        base = Path(base_dir).resolve() if base_dir is not None else source.parent
        job = _build_job(path, source, base, data, mapping, allowed_roots, generation, media, standing, resolve_media)
        return job


def load_job_text(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The job file's bytes and its YAML mapping; JobRejected for a symlink, oversize, non-UTF-8 or bad YAML."""
    path = Path(path)
    with _rejecting(path):
        data = _read_job_bytes(path)
        return data, _load_mapping(_decode(data))


@contextlib.contextmanager
def _rejecting(path: Path) -> Iterator[None]:
    """Turn every problem raised inside into JobRejected: _Invalid with its reason, anything unexpected named.

    A job file must never take the worker down, whatever it holds; only MemoryError (the process, not the job)
    goes through.
    """
    try:
        yield
    except JobRejected:
        raise
    except _Invalid as exc:
        raise JobRejected(path, str(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise JobRejected(path, f"cannot parse the job file ({type(exc).__name__}: {detail})") from exc


def _build_job(
    path: Path,
    source: Path,
    base: Path,
    data: bytes,
    mapping: dict[str, Any],
    allowed_roots: Sequence[Path],
    generation: GenerationSettings,
    media: MediaSettings,
    standing: bool = False,
    resolve_media: bool = True,
) -> Job:
    _check_keys(mapping)  # everything that needs no file system first, so a bad job touches no media folder
    job_id, prompt, inputs, mode = _job_id(mapping, path), _prompt(mapping), _inputs(mapping), _mode(mapping)
    gen_settings, media_settings = _generation(mapping, generation), _media_settings(mapping, media)
    sidecar = _sidecar(mapping)
    sidecar_overwrite = _optional(mapping, "sidecar_overwrite", _is_bool, "true or false", False)
    if sidecar and mode == "together":
        raise _Invalid(
            f"sidecar: {_written(mapping['sidecar'])} needs mode each (a together answer covers several files, not one)"
        )
    if sidecar and not inputs:
        raise _Invalid(
            f"sidecar: {_written(mapping['sidecar'])} needs inputs (a text-only job has no file to write one beside)"
        )
    tags = _tags(mapping)
    remove_gone_sidecars = _optional(mapping, "remove_gone_sidecars", _is_bool, "true or false", False)
    priority = _priority(mapping)
    if standing and not inputs:
        raise _Invalid(
            "a standing job answers the files of its inputs as they come, and this one has no inputs; "
            "put a text-only job into the inbox instead"
        )
    if remove_gone_sidecars and not standing:
        raise _Invalid("remove_gone_sidecars is for standing jobs (spool/standing/), whose files can go")
    resolver = _Resolver(_roots([*allowed_roots, base, source.parent]), base, allow_empty=standing)
    files = resolver.resolve_all(inputs) if resolve_media else ()
    if mode == "together":
        _check_together(files)
    return Job(
        id=job_id,
        source=source,
        prompt=prompt,
        mode=mode,
        media=files,
        generation=gen_settings,
        media_settings=media_settings,
        sidecar=sidecar,
        sidecar_overwrite=sidecar_overwrite,
        tags=tags,
        content_sha256=hashlib.sha256(data).hexdigest(),
        inputs=inputs,
        remove_gone_sidecars=remove_gone_sidecars,
        priority=priority,
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading and YAML


def _read_job_bytes(path: Path) -> bytes:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise _Invalid("job file not found") from None
    except OSError as exc:
        raise _Invalid(f"cannot read the job file ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise _Invalid("job file is a symlink; put the job file itself in the folder")
    if not stat.S_ISREG(info.st_mode):
        raise _Invalid("job file is not a regular file")
    _check_size(info.st_size)
    try:  # O_NOFOLLOW: a symlink swapped in after the lstat above is refused, not followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_JOB_BYTES + 1)
    except OSError as exc:
        raise _Invalid(f"cannot read the job file ({exc.strerror})") from None
    _check_size(len(data))
    return data


def _check_size(size: int) -> None:
    if size > MAX_JOB_BYTES:
        raise _Invalid(f"job file is too large ({size} bytes; the limit is {MAX_JOB_BYTES} bytes)")


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(
            f"job file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _load_mapping(text: str) -> dict[str, Any]:
    try:
        loaded = strict_yaml.load(text, max_depth=MAX_YAML_DEPTH)
    except strict_yaml.StrictYAMLError as exc:
        raise _Invalid(str(exc)) from None
    except yaml.constructor.ConstructorError as exc:
        raise _Invalid(_constructor_reason(exc)) from None
    except yaml.MarkedYAMLError as exc:
        raise _Invalid(f"malformed YAML{_where(exc.problem_mark)}: {_yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise _Invalid(f"malformed YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        raise _Invalid("job file is empty; it needs at least `prompt:` and `inputs:`")
    if not isinstance(loaded, dict):
        raise _Invalid(f"job file must be a YAML mapping of keys to values, got {_describe(loaded)}")
    return loaded


def _constructor_reason(exc: yaml.MarkedYAMLError) -> str:
    match = re.search(r"tag '([^']*)'", exc.problem or "")
    if match is None:
        return f"malformed YAML{_where(exc.problem_mark)}: {_yaml_problem(exc)}"
    tag = match.group(1)
    tag = "!!" + tag.removeprefix(_TAG_PREFIX) if tag.startswith(_TAG_PREFIX) else tag
    return f"unsupported YAML tag '{tag}'{_where(exc.problem_mark)}; job files take plain values only"


def _where(mark: Any) -> str:
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    parts = [exc.problem or "", f"({exc.context})" if exc.context else ""]
    return " ".join(part for part in parts if part) or "cannot parse"


# ---------------------------------------------------------------------------------------------------------------
# Keys and values


def _check_keys(mapping: dict[Any, Any]) -> None:
    known = (
        *("id", "prompt", "inputs", "mode", *_GENERATION_KEYS, *_MEDIA_KEYS),
        *("sidecar", "sidecar_overwrite", "remove_gone_sidecars", "tags", "priority"),
    )
    problems = []
    for key in mapping:
        if key in known and isinstance(key, str):
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
        problems.append(f"unknown key '{key}'{hint}")
    if problems:
        raise _Invalid("; ".join(problems))


def _describe(value: Any) -> str:
    """A YAML author's name for a value's type, with the value when short."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"text ({shown!r})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__} ({value})"


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


_VALUE_TYPES: dict[str, tuple[Any, str]] = {
    "max_new_tokens": (_is_int, "an integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "top_k": (_is_int, "an integer"),
    "seed": (lambda v: v is None or _is_int(v), "an integer or null"),
    "video_frames": (_is_int, "an integer"),
    "max_tiles": (_is_int, "an integer"),
}


def _optional(mapping: dict[str, Any], key: str, check: Any, expected: str, default: Any) -> Any:
    if key not in mapping:
        return default
    value = mapping[key]
    if not check(value):
        hint = "; quote it to keep it as text" if expected == "text" and _is_number(value) else ""
        raise _Invalid(f"'{key}' must be {expected}, got {_describe(value)}{hint}")
    return value


def _sidecar(mapping: dict[str, Any]) -> str | None:
    """The sidecar format: true (= txt), txt or xmp; false or no key: None."""
    value = mapping.get("sidecar", False)
    if value is True:
        return "txt"
    if value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in SIDECAR_FORMATS:
        return value.strip().lower()
    raise _Invalid(
        f"'sidecar' must be true, false, txt or xmp (true = txt: <name>.txt; xmp: <file name>.xmp, the caption "
        f"for photo managers), got {_describe(value)}"
    )


def _priority(mapping: dict[str, Any]) -> int:
    """`priority`: an integer from -PRIORITY_LIMIT to PRIORITY_LIMIT (default 0); higher runs first."""
    expected = f"an integer from -{PRIORITY_LIMIT} to {PRIORITY_LIMIT} (higher runs first)"
    value = _optional(mapping, "priority", _is_int, expected, 0)
    if not -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT:
        raise _Invalid(f"'priority' must be {expected}, got {value}")
    return value


def _written(value: Any) -> str:
    """A YAML value as a job file author wrote it (true, xmp)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _prompt(mapping: dict[str, Any]) -> str:
    if "prompt" not in mapping:
        raise _Invalid("missing required key 'prompt' (the question or instruction for every media file)")
    prompt = _optional(mapping, "prompt", _is_str, "text", "")
    if not prompt.strip():
        raise _Invalid("'prompt' is empty")
    return prompt.strip()


def _inputs(mapping: dict[str, Any]) -> tuple[str, ...]:
    if "inputs" not in mapping:  # a text-only job: one answer to the prompt alone
        return ()
    value = mapping["inputs"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        shown = next((item for item in items if not isinstance(item, str)), None) if isinstance(items, list) else value
        raise _Invalid(f"'inputs' must be text or a list of text (paths, folders, globs), got {_describe(shown)}")
    if not items:  # `inputs: []`: a text-only job, as with no `inputs` key
        return ()
    if len(items) > MAX_INPUTS:
        raise _Invalid(
            f"'inputs' has {len(items)} entries; a job takes at most {MAX_INPUTS}: split it into several job files"
        )
    if any(not item.strip() for item in items):
        raise _Invalid("'inputs' holds an empty entry")
    return tuple(items)


def _mode(mapping: dict[str, Any]) -> str:
    mode = _optional(mapping, "mode", _is_str, "text", "each")
    if mode not in MODES:
        raise _Invalid(f"'mode' must be 'each' or 'together', got {mode!r}")
    return mode


def _job_id(mapping: dict[str, Any], path: Path) -> str:
    job_id = _optional(mapping, "id", _is_str, "text", None)
    where = "'id'" if job_id is not None else f"the job's file name {path.stem!r} (used as its id)"
    job_id = path.stem if job_id is None else job_id
    if not job_id or job_id != job_id.strip():
        raise _Invalid(f"{where} must be non-empty, without leading or trailing spaces")
    if len(job_id) > _MAX_ID_CHARS:
        raise _Invalid(f"{where} is longer than {_MAX_ID_CHARS} characters")
    if job_id.startswith(".") or any(ch in "/\\" or not ch.isprintable() for ch in job_id):
        raise _Invalid(f"{where} must not start with '.' or hold slashes or control characters")
    return job_id


def _generation(mapping: dict[str, Any], defaults: GenerationSettings) -> GenerationSettings:
    overrides = _overrides(mapping, _GENERATION_KEYS)
    temperature = overrides.get("temperature", 0)
    if temperature < 0:
        raise _Invalid(f"'temperature' must be 0 (greedy) or more, got {temperature}")
    try:
        return dataclasses.replace(defaults, **overrides)
    except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: an int too large for a float setting
        raise _Invalid(f"invalid generation setting: {exc}") from None


def _media_settings(mapping: dict[str, Any], defaults: MediaSettings) -> MediaSettings:
    try:
        return dataclasses.replace(defaults, **_overrides(mapping, _MEDIA_KEYS))
    except (ValueError, TypeError) as exc:
        raise _Invalid(f"invalid media setting: {exc}") from None


def _overrides(mapping: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        if key in mapping:
            check, expected = _VALUE_TYPES[key]
            out[key] = _optional(mapping, key, check, expected, None)
    return out


def _tags(mapping: dict[str, Any]) -> list[str] | dict[str, Any]:
    tags = mapping.get("tags", [])
    if isinstance(tags, list):
        return [_tag_item(item) for item in tags]
    if isinstance(tags, dict):
        return {_tag_key(key): _tag_value(key, value) for key, value in tags.items()}
    raise _Invalid(f"'tags' must be a list of text or a mapping of names to values, got {_describe(tags)}")


def _tag_item(item: Any) -> str:
    # Unquoted YAML turns `2024` into a number and `2024-06-01` into a date: keep them as the text written.
    if isinstance(item, str):
        return item
    if isinstance(item, (datetime.date, datetime.datetime)):
        return item.isoformat()
    if _is_number(item):
        return str(item)
    raise _Invalid(f"'tags' list entries must be text, got {_describe(item)}")


def _tag_key(key: Any) -> str:
    if not isinstance(key, str):
        raise _Invalid(f"'tags' mapping keys must be text, got {_describe(key)}")
    return key


def _tag_value(key: str, value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise _Invalid(f"tag '{key}' must be a single value (text, number, true/false or null), got {_describe(value)}")


# ---------------------------------------------------------------------------------------------------------------
# Media


def _roots(paths: Iterable[Path]) -> tuple[Path, ...]:
    unique: dict[Path, None] = {}
    for root in paths:
        unique[Path(os.path.realpath(os.path.expanduser(root)))] = None
    return tuple(unique)


def is_glob(spec: str, candidate: Path) -> bool:
    """Whether an input is a glob: it has a wildcard and names no file (`photo[1].jpg` that exists is a file)."""
    return bool(_GLOB_MAGIC.search(spec)) and not os.path.lexists(candidate)


def is_media_name(path: str) -> bool:
    """Whether a path names an image or a video, by its suffix (nothing is opened)."""
    suffix = os.path.splitext(path)[1].lower()
    return suffix in IMAGE_EXTENSIONS or suffix in VIDEO_EXTENSIONS


def _check_together(files: tuple[Path, ...]) -> None:
    videos = [path for path in files if media_kind(path) == "video"]
    if videos:
        raise _Invalid(f"mode together takes images only, but the inputs include the video {videos[0].name!r}")
    if len(files) > MAX_TOGETHER:
        raise _Invalid(f"mode together takes at most {MAX_TOGETHER} images, but the inputs match {len(files)}")


class _Resolver:
    """Turns input strings (files, folders, globs) into real media paths inside the allowed roots.

    Every media file found counts towards MAX_MEDIA_FILES as it is found, so a folder or glob over a huge tree
    is refused as soon as the job passes the cap, without first collecting every match.
    """

    def __init__(self, roots: tuple[Path, ...], base: Path, allow_empty: bool = False) -> None:
        self.roots = roots
        self.base = base
        self.allow_empty = allow_empty  # a standing job's folder or glob may match nothing yet
        self.found: set[Path] = set()

    def resolve_all(self, inputs: Iterable[str]) -> tuple[Path, ...]:
        for spec in inputs:
            try:
                self.resolve(spec)
            except OSError as exc:  # a folder we may not list or stat, say
                raise _Invalid(f"input {spec!r}: cannot read {exc.filename or 'it'} ({exc.strerror})") from None
        return tuple(sorted(self.found, key=lambda p: p.parts))

    def _add(self, path: Path, spec: str) -> Path:
        """Count one media file of the job; rejected once the job's files pass MAX_MEDIA_FILES."""
        self.found.add(path)
        if len(self.found) > MAX_MEDIA_FILES:
            raise _Invalid(
                f"the inputs match more than {MAX_MEDIA_FILES} media files (passed while reading {spec!r}); "
                f"a job takes at most {MAX_MEDIA_FILES}: split it into several job files"
            )
        return path

    def resolve(self, spec: str) -> list[Path]:
        candidate = self.base / os.path.expanduser(spec)
        if is_glob(spec, candidate):
            return self._glob(spec)
        real = self._inside(candidate, spec)
        if not real.exists():
            raise _Invalid(f"input {spec!r} not found (looked for {candidate})")
        if real.is_dir():
            return self._folder(real, spec)
        if not real.is_file():
            raise _Invalid(f"input {spec!r} is not a regular file or folder")
        try:
            media_kind(real)
        except MediaError as exc:
            raise _Invalid(f"input {spec!r}: {exc.reason}") from None
        return [self._add(real, spec)]

    def _inside(self, path: Path | str, spec: str) -> Path:
        """The real path, after every symlink and '..'; rejected unless it lies under an allowed root."""
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.roots):
            shown = "" if str(path) == str(self.base / spec) else f" ({path})"
            allowed = ", ".join(str(root) for root in self.roots)
            raise _Invalid(f"input {spec!r}{shown} is outside the allowed media folders ({allowed})")
        return real

    def _folder(self, folder: Path, spec: str) -> list[Path]:
        files = [self._add(path, spec) for path in self._walk(folder, spec)]
        if not files and not self.allow_empty:
            raise _Invalid(f"folder {spec!r} holds no images or videos")
        return files

    def _walk(self, folder: Path, spec: str) -> Iterator[Path]:
        """Media files under a folder, recursively; hidden names skipped, symlinks followed but checked."""
        pending, seen = [folder], {folder}
        while pending:
            current = pending.pop()
            try:  # entries are read as they come, not listed first: the cap may stop a huge folder early
                with os.scandir(current) as entries:
                    for entry in entries:
                        if entry.name.startswith("."):
                            continue
                        target = Path(os.path.realpath(entry.path))
                        if target.is_dir():
                            if target not in seen:  # a link back to a folder already walked (or a loop)
                                seen.add(self._inside(entry.path, spec))
                                pending.append(target)
                        elif is_media_name(str(target)) and target.is_file():
                            yield self._inside(entry.path, spec)
            except OSError as exc:
                raise _Invalid(f"input {spec!r}: cannot list folder {current} ({exc.strerror})") from None

    def _glob(self, spec: str) -> list[Path]:
        pattern = os.path.expanduser(spec)
        self._inside(self.base / literal_prefix(pattern), spec)  # never scan outside the roots
        parts = PurePath(pattern).parts
        wild = next((i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part)), len(parts))
        if ".." in parts[wild:]:  # `*/../../**` would climb out of the roots and walk the whole file system
            raise _Invalid(f"glob {spec!r} has '..' after a wildcard; name the folder it climbs to instead")
        root_dir = None if os.path.isabs(pattern) else self.base
        matched, files = False, []
        for match in glob.iglob(pattern, root_dir=root_dir, recursive=True):  # lazily: the cap may stop it early
            matched = True
            path = self.base / match
            if path.name.startswith(".") or not is_media_name(os.path.realpath(path)) or path.is_dir():
                continue
            real = self._inside(path, spec)
            if real.is_file():
                files.append(self._add(real, spec))
        if not matched and not self.allow_empty:
            raise _Invalid(f"glob {spec!r} matches nothing")
        if not files and not self.allow_empty:
            raise _Invalid(f"glob {spec!r} matches no images or videos")
        return files


def literal_prefix(pattern: str) -> str:
    """The leading path components of a glob that hold no wildcard (the folder it searches)."""
    parts = []
    for part in PurePath(pattern).parts:
        if _GLOB_MAGIC.search(part):
            break
        parts.append(part)
    return str(PurePath(*parts)) if parts else "."
