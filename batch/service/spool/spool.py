"""The spool folder: inbox/ -> work/ (claimed, with a lease) -> done/, failed/, rejected/ or cancelled/.

A job is claimed by an atomic rename from inbox/ into work/ under a unique name; the lease file beside it
says which worker holds it and until when. A live worker renews its lease; a job whose lease expired, or
whose worker process is gone from this host, goes back to the inbox. Every move is a rename within one
filesystem, so a job file is always in exactly one place.

A file in the inbox is claimed only once it is complete (batch.service.spool.settle): no process holds it open for
writing, where Linux can tell, and its size, mtime and inode have not changed for settle_seconds. A rejected file
whose bytes change afterwards (the rest of a slow copy, a fix made in rejected/) goes back to the inbox.

The inbox is taken highest `priority` first, then oldest first. The priority is read from the top-level
`priority:` line of the file's first PRIORITY_HEAD bytes (no YAML parse) and kept per file signature, so a rescan
of a large inbox reads no file twice; a file whose priority cannot be read that way sorts as 0 (the worker's full
parse rejects it properly when it takes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from batch.service.atomic_write import write_atomic
from batch.service.logs import event
from batch.service.spool.settle import SettleTracker, Verdict, is_partial_name
from batch.service.spool.states import JobState

log = logging.getLogger("batch.service.spool.spool")

JOB_SUFFIXES = (".yaml", ".yml")
FOLDERS = ("inbox", "work", *(state.value for state in JobState if state.finished))
LEASE = ".lease"
SEPARATOR = "--"
REASON_SUFFIX = ".reason.txt"
RECORD_SUFFIX = ".rejected.json"  # rejected/.<name>.rejected.json: what the rejected file was when it was judged
HASH_LIMIT = 1 << 20  # a rejected file larger than this is compared by size, mtime and inode alone
FRESH_HEAD = 4  # pending() asks the kernel afresh about a writer for this many of the oldest ready files
RECONSIDER_SECONDS = 1.0  # rejected/ is looked through at most this often (sooner when a changed file is due)
PRIORITY_LIMIT = 1000  # a job's `priority` runs from -PRIORITY_LIMIT to PRIORITY_LIMIT (jobfile checks it)
PRIORITY_HEAD = 16 * 1024  # the bytes of a job file searched for its `priority:` line when the inbox is sorted
# a top-level `priority: N` line (a comment may follow); an indented one belongs to another value
_PRIORITY_LINE = re.compile(rb"^priority[ \t]*:[ \t]+([-+]?(?:0|[1-9][0-9]{0,5}))[ \t]*(?:#[^\n]*)?\r?$", re.MULTILINE)

Signature = tuple[int, int, int]  # size, mtime_ns, inode


def is_job_name(name: str) -> bool:
    """Only finished job files: not hidden, not a temp or partial name (settle.is_partial_name), a YAML suffix."""
    if is_partial_name(name):
        return False
    return name.lower().endswith(JOB_SUFFIXES)


def signature(st: os.stat_result) -> Signature:
    """What says a file changed without reading it: size, mtime in ns, inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def content_sha256(path: Path) -> str | None:
    """SHA-256 of a regular file of at most HASH_LIMIT bytes (never through a symlink); None for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > HASH_LIMIT:
            return None
        data = fh.read(HASH_LIMIT + 1)
    return hashlib.sha256(data).hexdigest() if len(data) <= HASH_LIMIT else None


def free_path(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.N.suffix with the first N that is not taken."""
    target = folder / name
    stem, dot, suffix = name.rpartition(".")
    n = 1
    while target.exists() or target.is_symlink():
        target = folder / f"{stem}.{n}{dot}{suffix}"
        n += 1
    return target


def read_priority(path: str | os.PathLike[str]) -> int:
    """A job file's priority for ordering, from the `priority:` line of its head; 0 when there is none, it is not
    a plain integer within the limits, or the file cannot be read (it is judged properly when it is taken)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        head = os.read(fd, PRIORITY_HEAD)
    except OSError:
        return 0
    finally:
        os.close(fd)
    if len(head) == PRIORITY_HEAD:  # a longer file: its last, maybe cut, line is left out
        head = head[: head.rfind(b"\n") + 1]
    found = _PRIORITY_LINE.findall(head)
    if len(found) != 1:  # none, or a duplicate key (rejected when taken)
        return 0
    value = int(found[0])
    return value if -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT else 0


class Priorities:
    """Job files' priorities, each read once per version of the file (its size, mtime and inode)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[Signature, int]] = {}

    def of(self, path: str | os.PathLike[str], st: os.stat_result | None = None) -> int:
        key = os.fspath(path)
        if st is None:
            try:
                st = os.lstat(key)
            except OSError:
                return 0
        sig = signature(st)
        known = self._known.get(key)
        if known is not None and known[0] == sig:
            return known[1]
        value = read_priority(key)
        self._known[key] = (sig, value)
        return value

    def known(self, path: str | os.PathLike[str]) -> int:
        """The priority found at the last look (0 for a file not looked at)."""
        known = self._known.get(os.fspath(path))
        return 0 if known is None else known[1]

    def retain(self, paths: Iterable[str]) -> None:
        """Forget every file but these (the ones still there, each looked at by `of` in this scan)."""
        keep = set(paths)
        if len(self._known) > len(keep):  # every file kept was looked at: only gone ones make the cache larger
            self._known = {key: value for key, value in self._known.items() if key in keep}

    def ordered(self, paths: Iterable[Path]) -> list[Path]:
        """Highest priority first, then by name (standing jobs' order among their passes)."""
        return sorted(paths, key=lambda path: (-self.of(path), path.name))


@dataclass(frozen=True)
class Claim:
    """A job file this worker holds in work/."""

    path: Path  # work/<token>--<name>
    name: str  # the name it had in the inbox
    # size, mtime_ns and inode when it was claimed, before it was read (None for a claim found in work/)
    signature: Signature | None = field(default=None, compare=False)

    @property
    def lease_path(self) -> Path:
        return self.path.with_name(self.path.name + LEASE)


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    expires: float  # epoch seconds

    def holder_is_gone(self) -> bool:
        """True when the lease was taken on this host by a process that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class Spool:
    def __init__(self, root: Path, lease_seconds: float = 30.0, settle_seconds: float = 0.5) -> None:
        self.root = Path(root)
        self.lease_seconds = lease_seconds
        self.settle_seconds = settle_seconds
        for name in FOLDERS:
            setattr(self, name, self.root / name)
        self.inbox: Path
        self.work: Path
        self.done: Path
        self.failed: Path
        self.rejected: Path
        self.cancelled: Path
        # a writer holding a job file open longer than a claim's lease is not waited for by `vlbatch run`
        self._settle = SettleTracker(settle_seconds, wait_limit=lease_seconds)
        self._rejected_settle = SettleTracker(settle_seconds, wait_limit=lease_seconds)
        self._records: dict[str, tuple[int | None, dict]] = {}  # rejected name -> (its record's inode, record)
        self._reconsider_at = float("-inf")  # monotonic time of the next look through rejected/
        self._rejected_fault: str | None = None
        self.priorities = Priorities()  # the inbox files' priorities, by path

    def ensure(self) -> Spool:
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        return self

    # the inbox ----------------------------------------------------------------------------------
    def pending(self, now: float | None = None) -> tuple[list[Path], float | None]:
        """Job files ready to claim, highest priority first, then oldest first, and when (time.time()) a file not
        ready yet is worth another look.

        Ready means complete (batch.service.spool.settle): no process holds it open for writing, where Linux can tell,
        and its size, mtime and inode have not changed for settle_seconds of this process's clock (or it was found
        with timestamps more than a minute old and no writer). A file a writer has held open for longer than
        lease_seconds no longer sets the next look (`vlbatch run` leaves it for the next run); it is still taken
        at a later look once it is closed. `now`: the wall clock, for the old-timestamp rule.
        """
        found: list[tuple[int, float, str, str, os.stat_result]] = []
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                if not is_job_name(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # claimed by another worker meanwhile
                    continue
                found.append((-self.priorities.of(entry.path, st), st.st_mtime, entry.name, entry.path, st))
        found.sort(key=lambda item: item[:3])
        self._settle.retain(path for *_, path, _ in found)
        self.priorities.retain(path for *_, path, _ in found)
        ready: list[Path] = []
        retry: float | None = None
        for _, _, name, path, st in found:
            verdict = self._settle.check(path, st, now=now, fresh=len(ready) < FRESH_HEAD)
            if verdict.complete:
                ready.append(Path(path))
                continue
            self._note_waiting(name, verdict)
            if verdict.retry_in is not None:
                retry = verdict.retry_in if retry is None else min(retry, verdict.retry_in)
        return ready, None if retry is None else time.time() + retry

    def _note_waiting(self, name: str, verdict: Verdict) -> None:
        """One log line when a writer is first found holding a job file open, one when it is no longer waited for."""
        if verdict.newly_held:
            event(log, "job.waiting", file=name, reason="another process holds it open for writing; read once closed")
        if verdict.newly_overdue:
            event(
                log,
                "job.still_open",
                logging.WARNING,
                file=name,
                waited_s=verdict.held_for,
                reason=f"still open for writing after {self.lease_seconds:g} s (spool.lease_seconds): not waited for "
                "any longer; read once it is closed (by vlbatch watch, or the next vlbatch run)",
            )

    def claim(self, path: Path) -> Claim | None:
        """Take a job from the inbox; None when another worker took it first."""
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        target = self.work / f"{token}{SEPARATOR}{path.name}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        self._settle.forget(path)
        try:
            judged: Signature | None = signature(os.lstat(target))
        except OSError:
            judged = None
        claim = Claim(target, path.name, judged)
        try:
            self.renew(claim)
        except OSError:  # no lease could be written (a full disk): put the file back as it was
            os.rename(target, path)
            raise
        return claim

    # leases -------------------------------------------------------------------------------------
    def renew(self, claim: Claim) -> None:
        """Extend the lease; none is written once the claimed file is gone: another worker took the job back after
        this one was suspended past its lease, and an orphan lease would only mislead."""
        if not os.path.lexists(claim.path):
            return
        lease = {"host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + self.lease_seconds}
        write_atomic(claim.lease_path, json.dumps(lease))

    def orphan_leases(self, now: float | None = None) -> list[Path]:
        """Expired lease files whose claim is gone (a suspended worker renewed after losing its claim): removed."""
        now = time.time() if now is None else now
        removed = []
        for path in self.work.glob("*" + LEASE):
            claim = Claim(path.with_name(path.name[: -len(LEASE)]), "")
            lease = self.read_lease(claim)
            if not os.path.lexists(claim.path) and (lease is None or lease.expires < now):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def read_lease(self, claim: Claim) -> Lease | None:
        try:
            data = json.loads(claim.lease_path.read_text())
            return Lease(str(data["host"]), int(data["pid"]), float(data["expires"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def claims(self) -> list[Claim]:
        """Every job in work/, whoever holds it."""
        out = []
        for path in sorted(self.work.iterdir()):
            if path.name.endswith(LEASE) or path.name.startswith(".") or SEPARATOR not in path.name:
                continue
            out.append(Claim(path, path.name.split(SEPARATOR, 1)[1]))
        return out

    def abandoned(self, now: float | None = None) -> list[Claim]:
        """Claims whose lease ran out or whose worker is gone from this host; never a live worker's."""
        now = time.time() if now is None else now
        return [claim for claim in self.claims() if self._is_abandoned(claim, now)]

    def is_held(self, claim_name: str) -> bool:
        """True while work/<claim_name> exists and its worker holds it (lease current, process alive)."""
        path = self.work / claim_name
        if not claim_name or not path.exists():
            return False
        return not self._is_abandoned(Claim(path, claim_name.split(SEPARATOR, 1)[-1]), time.time())

    def _is_abandoned(self, claim: Claim, now: float) -> bool:
        lease = self.read_lease(claim)
        if lease is None:
            # between the claim's rename and its first lease write: give it a full lease period
            try:
                return now - claim.path.stat().st_ctime > self.lease_seconds
            except FileNotFoundError:
                return False
        return lease.expires < now or lease.holder_is_gone()

    # moves --------------------------------------------------------------------------------------
    def release(self, claim: Claim) -> Path:
        """Hand a job back to the inbox under its own name (or a free variant of it)."""
        return self._move(claim, self.inbox)

    def finish(self, claim: Claim, outcome: JobState | str, reason: str | None = None) -> Path:
        """Move a job to done/, failed/ or rejected/; a reason goes beside it as <name>.reason.txt.

        For rejected/, a hidden record of what was judged (the claim's size, mtime and inode, and the SHA-256 of
        the bytes when they are still those) lets reconsider_rejected() see whether the file changes later.
        """
        state = JobState(outcome)
        assert state.finished, state
        folder = self.root / state.value
        target = self._move(claim, folder)
        if reason:
            write_atomic(target.with_name(target.name + REASON_SUFFIX), reason.rstrip() + "\n")
        if state is JobState.REJECTED:
            with contextlib.suppress(OSError):  # without a record, what is there at the next look counts as judged
                now = signature(os.lstat(target))
                judged = claim.signature or now
                self._write_record(target, judged, content_sha256(target) if now == judged else None)
        return target

    # rejected files that change ----------------------------------------------------------------
    def reconsider_rejected(self) -> list[Path]:
        """Move rejected job files whose bytes changed since they were judged back into the inbox, once complete.

        A changed file is complete by the same rules as one in the inbox; its stale reason and record are removed
        and `event=job.reconsidered` is logged. A file that does not change is never read again: only its size,
        mtime and inode are compared with the record (the bytes, when those differ). Returns the inbox paths.
        Looks through rejected/ at most once a RECONSIDER_SECONDS (sooner when a changed file is due).
        """
        mono = time.monotonic()
        if mono < self._reconsider_at:
            return []
        self._reconsider_at = mono + RECONSIDER_SECONDS
        try:
            with os.scandir(self.rejected) as it:
                entries = list(it)
        except FileNotFoundError:
            return []
        except OSError as exc:  # an unreadable rejected/ must not stop the worker: say so once
            self._rejected_problem(str(exc))
            return []
        jobs = {e.name: e for e in entries if is_job_name(e.name)}
        records = {
            e.name[1 : -len(RECORD_SUFFIX)]: e
            for e in entries
            if e.name.startswith(".") and e.name.endswith(RECORD_SUFFIX)
        }
        moved: list[Path] = []
        changed: list[str] = []
        for name, entry in sorted(jobs.items()):
            try:
                st = entry.stat(follow_symlinks=False)
                if not self._changed_since_rejected(Path(entry.path), st, records.get(name)):
                    continue
                changed.append(entry.path)
                verdict = self._rejected_settle.check(entry.path, st)
                if verdict.complete:
                    moved.append(self._reconsider(Path(entry.path)))
                elif verdict.retry_in is not None:
                    self._reconsider_at = min(self._reconsider_at, mono + verdict.retry_in)
            except FileNotFoundError:  # moved or deleted meanwhile (another worker reconsidered it)
                continue
            except OSError as exc:
                self._rejected_problem(f"{name}: {exc}")
        self._rejected_settle.retain(changed)
        for name, entry in records.items():
            if name not in jobs:  # its file was deleted, or taken back by another worker
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        self._records = {name: record for name, record in self._records.items() if name in jobs}
        return moved

    def _changed_since_rejected(self, path: Path, st: os.stat_result, record_entry: os.DirEntry | None) -> bool:
        """Whether the rejected file's bytes differ from those judged (a record is made for a file without one)."""
        record = self._read_record(path.name, record_entry)
        now = signature(st)
        if record is None:  # rejected before records were kept, or its record was lost: take it as it is now
            self._write_record(path, now, content_sha256(path))
            return False
        if list(now) == record["signature"]:
            return False
        if record["sha256"] is not None and content_sha256(path) == record["sha256"]:
            self._write_record(path, now, record["sha256"])  # touched or copied over with the same bytes
            return False
        return True

    def _reconsider(self, path: Path) -> Path:
        target = free_path(self.inbox, path.name)
        os.rename(path, target)
        self._rejected_settle.forget(path)
        self._records.pop(path.name, None)
        for stale in (path.with_name(path.name + REASON_SUFFIX), self._record_path(path)):
            with contextlib.suppress(OSError):
                os.unlink(stale)
        event(
            log,
            "job.reconsidered",
            file=path.name,
            **({"inbox_name": target.name} if target.name != path.name else {}),
            reason="it changed after it was rejected: back in the inbox to be read again",
        )
        return target

    @staticmethod
    def _record_path(path: Path) -> Path:
        return path.with_name(f".{path.name}{RECORD_SUFFIX}")

    def _write_record(self, path: Path, judged: Signature, sha256: str | None) -> None:
        """Keep the record beside the file (and here: one that cannot be written is still not hashed again)."""
        record = {"signature": list(judged), "sha256": sha256}
        self._records[path.name] = (None, record)
        target = self._record_path(path)
        data = {"size": judged[0], "mtime_ns": judged[1], "inode": judged[2], "sha256": sha256}
        write_atomic(target, json.dumps(data) + "\n", durable=False)
        with contextlib.suppress(OSError):
            self._records[path.name] = (os.lstat(target).st_ino, record)

    def _read_record(self, name: str, entry: os.DirEntry | None) -> dict | None:
        """The record of rejected/<name> as {"signature": [size, mtime_ns, inode], "sha256": ...}, or None."""
        cached = self._records.get(name)
        if entry is None:  # none on disk: one this process could not write, or none at all
            return cached[1] if cached is not None and cached[0] is None else None
        inode = entry.inode()
        if cached is not None and cached[0] == inode:  # records are replaced whole: a new one has a new inode
            return cached[1]
        try:
            data = json.loads(Path(entry.path).read_text(encoding="utf-8"))
            record = {
                "signature": [int(data["size"]), int(data["mtime_ns"]), int(data["inode"])],
                "sha256": None if data.get("sha256") is None else str(data["sha256"]),
            }
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._records[name] = (inode, record)
        return record

    def _rejected_problem(self, problem: str) -> None:
        if problem != self._rejected_fault:
            self._rejected_fault = problem
            event(log, "rejected.unreadable", logging.WARNING, error=problem, reason="rejected files not looked at")

    def _move(self, claim: Claim, folder: Path) -> Path:
        target = free_path(folder, claim.name)
        os.rename(claim.path, target)
        claim.lease_path.unlink(missing_ok=True)
        return target

    def counts(self) -> dict[str, int]:
        out = {}
        for name in FOLDERS:
            folder = self.root / name
            if not folder.is_dir():
                out[name] = 0
            elif name == "work":
                out[name] = len(self.claims())
            else:
                out[name] = sum(1 for e in os.scandir(folder) if is_job_name(e.name))
        return out
