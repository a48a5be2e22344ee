"""Standing jobs: job files kept in `<spool>/standing/` that run again on every pass, answering only what changed.

A standing job is an ordinary job file (prompt, inputs, settings) placed in its own folder instead of the inbox.
It never moves: `vlbatch run` (cron) runs each one once per invocation, `vlbatch watch` runs it whenever a file
in its input folders changes (and on every rescan), and each pass answers only the files that are new or changed
since the last one. Adding, editing or deleting the file is the whole interface: no restart, no resubmission.

This module owns the folder and the decisions that need no model:
- `StandingFolder`: the job files, a rejection's reason beside its file, and the lock that lets one worker at a
  time run a job (an exclusive `flock` on `standing/.locks/<name>.lock`; the kernel releases it however the
  holder ends, so a crashed worker never blocks a job, and two workers never run the same job at once);
- `plan_pass`: which of a job's files need the model (new, changed, or failed and asked to retry), which are
  unchanged (skipped without reading a byte), gone, or still being written;
- `covers`: whether a file event concerns a job (a media file under one of its folders, or one of its files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.service.atomic_write import write_atomic
from batch.service.spool.jobfile import is_glob, is_media_name, literal_prefix
from batch.service.spool.spool import is_job_name
from batch.service.store.paths import decode_path, encode_path

FOLDER = "standing"
LOCKS = ".locks"
REASON_SUFFIX = ".reason.txt"
CLAIM_PREFIX = FOLDER + "/"  # jobs.claim of a standing job's run: standing/<file name>


class StandingFolder:
    """`<spool>/standing/`: the standing job files, their locks and the reasons of those that cannot run."""

    def __init__(self, spool_root: Path) -> None:
        self.dir = Path(spool_root) / FOLDER
        self.locks = self.dir / LOCKS

    def ensure(self) -> StandingFolder:
        self.locks.mkdir(parents=True, exist_ok=True)
        return self

    def job_files(self) -> list[Path]:
        """The standing job files, by name: regular files with a job name (hidden and temp names skipped)."""
        if not self.dir.is_dir():
            return []
        out = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                try:
                    if is_job_name(entry.name) and entry.is_file(follow_symlinks=False):
                        out.append(Path(entry.path))
                except OSError:  # gone meanwhile
                    continue
        return sorted(out)

    @staticmethod
    def claim_of(path: Path) -> str:
        return CLAIM_PREFIX + path.name

    @contextmanager
    def hold(self, path: Path) -> Iterator[bool]:
        """Hold the job's lock for the block; yields False (at once, without waiting) when another worker holds it."""
        self.ensure()
        fd = os.open(self.locks / (path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def is_held(self, claim: str) -> bool:
        """Whether a live worker runs the standing job of this claim now (its lock is taken)."""
        name = claim.removeprefix(CLAIM_PREFIX)
        lock = self.locks / (name + ".lock")
        if not lock.exists():
            return False
        with self.hold(self.dir / name) as free:
            return not free

    def reason_path(self, path: Path) -> Path:
        return path.with_name(path.name + REASON_SUFFIX)

    def set_reason(self, path: Path, reason: str | None) -> None:
        """Write (or, with None, remove) the reason a standing job cannot run, beside its file."""
        target = self.reason_path(path)
        if reason is None:
            target.unlink(missing_ok=True)
        else:
            write_atomic(target, reason.rstrip() + "\n")


@dataclass
class PassPlan:
    """What one pass of a standing job does with each file it looked at."""

    changed: dict[Path, os.stat_result] = field(default_factory=dict)  # to hash, then answer or relink
    unchanged: int = 0  # answered (or failed) before with the same size, mtime and settings: not read at all
    gone: list[dict[str, Any]] = field(default_factory=list)  # tracked files no longer there (index rows)
    waiting: list[Path] = field(default_factory=list)  # still being written: looked at again later
    next_check: float | None = None  # when the earliest waiting file is worth another look (time.monotonic)

    @property
    def needs_run(self) -> bool:
        return bool(self.changed or self.gone)


# (path, its stat) -> None when the file is complete, else the monotonic time to look at it again
Completeness = Callable[[Path, os.stat_result], "float | None"]


def plan_pass(
    candidates: Iterable[Path],
    index: dict[str, dict[str, Any]],
    basis: str,
    complete: Completeness,
    retry_failed: bool = False,
    vanished: Iterable[str] = (),
) -> PassPlan:
    """Sort a standing job's files: `candidates` exist now (all of them on a full pass, those events named on
    a targeted one); `vanished` are tracked paths (stored names, `paths.encode_path`) found missing. `basis`
    fingerprints the job's prompt and settings (a file answered under other settings is changed for this job)."""
    plan = PassPlan()
    for path in candidates:
        try:
            info = os.stat(path)
        except OSError:  # gone between the listing and now: a later pass sees it
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        entry = index.get(encode_path(path))  # tracked by stored name (paths.py)
        if entry is not None and _unchanged(entry, info, basis, retry_failed):
            plan.unchanged += 1
            continue
        retry_at = complete(path, info)
        if retry_at is not None:
            plan.waiting.append(path)
            plan.next_check = retry_at if plan.next_check is None else min(plan.next_check, retry_at)
            continue
        plan.changed[path] = info
    for path in vanished:
        entry = index.get(path)
        if entry is not None and entry["state"] != "gone" and not os.path.lexists(decode_path(path)):
            plan.gone.append(entry)
    return plan


def _unchanged(entry: dict[str, Any], info: os.stat_result, basis: str, retry_failed: bool) -> bool:
    if entry["state"] == "gone" or entry["basis"] != basis:
        return False
    if entry["state"] == "failed" and retry_failed:
        return False
    return entry["size"] == info.st_size and entry["mtime_ns"] == info.st_mtime_ns


def vanished_paths(index: dict[str, dict[str, Any]], present: Iterable[Path]) -> list[str]:
    """Tracked paths (stored names, not already gone) that a full listing no longer holds."""
    seen = {encode_path(p) for p in present}
    return [path for path, entry in index.items() if entry["state"] != "gone" and path not in seen]


# ---------------------------------------------------------------------------------------------------------------
# which files an event concerns


@dataclass(frozen=True)
class InputSpecs:
    """A standing job's inputs as paths to match events against, and the folders to watch for them."""

    folders: tuple[Path, ...]  # real folders whose media files (recursively) belong to the job
    files: tuple[Path, ...]  # single files named by the job
    globs: tuple[re.Pattern[str], ...]  # absolute glob patterns, as regular expressions
    glob_roots: tuple[Path, ...]  # the folders those globs search (their literal prefixes)

    @property
    def watch_folders(self) -> tuple[Path, ...]:
        """Folders to watch recursively: every folder input, each glob's root, each single file's folder."""
        folders = [*self.folders, *self.glob_roots, *(f.parent for f in self.files)]
        unique: dict[Path, None] = {}
        for folder in sorted(folders, key=lambda p: len(p.parts)):
            if not any(folder.is_relative_to(kept) for kept in unique):
                unique[folder] = None
        return tuple(unique)


def input_specs(inputs: Iterable[str], base: Path) -> InputSpecs:
    """The job's input strings (relative to `base`) as matchable paths; names that do not exist yet are kept."""
    folders, files, globs, roots = [], [], [], []
    for spec in inputs:
        candidate = base / os.path.expanduser(spec)
        if is_glob(spec, candidate):
            pattern = str(candidate)
            globs.append(re.compile(_glob_regex(pattern)))
            roots.append(Path(os.path.realpath(literal_prefix(pattern))))
            continue
        real = Path(os.path.realpath(candidate))
        (files if real.is_file() else folders).append(real)
    return InputSpecs(tuple(folders), tuple(files), tuple(globs), tuple(roots))


def covers(specs: InputSpecs, path: Path) -> bool:
    """Whether a media file at `path` (as an event names it) is one of the job's inputs."""
    if not is_media_name(path.name) or path.name.startswith("."):
        return False
    real = Path(os.path.realpath(path))
    if real in specs.files:
        return True
    for folder in specs.folders:
        if real.is_relative_to(folder) and not any(p.startswith(".") for p in real.relative_to(folder).parts):
            return True
    return any(pattern.fullmatch(str(path)) or pattern.fullmatch(str(real)) for pattern in specs.globs)


def _glob_regex(pattern: str) -> str:
    """A glob (with `**` for any depth, as glob.glob(recursive=True)) as a regular expression over whole paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            body = body.replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)
