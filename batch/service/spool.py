"""The spool folder: inbox/ -> work/ (claimed, with a lease) -> done/, failed/ or rejected/.

A job is claimed by an atomic rename from inbox/ into work/ under a unique name; the lease file beside it
says which worker holds it and until when. A live worker renews its lease; a job whose lease expired, or
whose worker process is gone from this host, goes back to the inbox. Every move is a rename within one
filesystem, so a job file is always in exactly one place.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from batch.service.atomic_write import write_atomic
from batch.service.states import JobState

JOB_SUFFIXES = (".yaml", ".yml")
IGNORED_SUFFIXES = (".tmp", ".part")
FOLDERS = ("inbox", "work", *(state.value for state in JobState if state.finished))
LEASE = ".lease"
SEPARATOR = "--"


def is_job_name(name: str) -> bool:
    """Only finished job files: not hidden, not a temp or partial name, a YAML suffix."""
    if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
        return False
    return name.lower().endswith(JOB_SUFFIXES)


def free_path(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.N.suffix with the first N that is not taken."""
    target = folder / name
    stem, dot, suffix = name.rpartition(".")
    n = 1
    while target.exists() or target.is_symlink():
        target = folder / f"{stem}.{n}{dot}{suffix}"
        n += 1
    return target


@dataclass(frozen=True)
class Claim:
    """A job file this worker holds in work/."""

    path: Path  # work/<token>--<name>
    name: str  # the name it had in the inbox

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

    def ensure(self) -> Spool:
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        return self

    # the inbox ----------------------------------------------------------------------------------
    def pending(self, now: float | None = None) -> tuple[list[Path], float | None]:
        """Job files ready to claim, oldest first, and when the next still-settling one will be ready.

        A file modified less than settle_seconds ago may still be being written; it waits.
        """
        now = time.time() if now is None else now
        ready: list[tuple[float, str, Path]] = []
        next_ready: float | None = None
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                if not is_job_name(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # claimed by another worker meanwhile
                    continue
                settled_at = mtime + self.settle_seconds
                if settled_at > now:
                    next_ready = settled_at if next_ready is None else min(next_ready, settled_at)
                    continue
                ready.append((mtime, entry.name, Path(entry.path)))
        ready.sort()
        return [path for _, _, path in ready], next_ready

    def claim(self, path: Path) -> Claim | None:
        """Take a job from the inbox; None when another worker took it first."""
        token = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        target = self.work / f"{token}{SEPARATOR}{path.name}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        claim = Claim(target, path.name)
        try:
            self.renew(claim)
        except OSError:  # no lease could be written (a full disk): put the file back as it was
            os.rename(target, path)
            raise
        return claim

    # leases -------------------------------------------------------------------------------------
    def renew(self, claim: Claim) -> None:
        lease = {"host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + self.lease_seconds}
        write_atomic(claim.lease_path, json.dumps(lease))

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
        """Move a job to done/, failed/ or rejected/; a reason goes beside it as <name>.reason.txt."""
        state = JobState(outcome)
        assert state.finished, state
        folder = self.root / state.value
        target = self._move(claim, folder)
        if reason:
            write_atomic(target.with_name(target.name + ".reason.txt"), reason.rstrip() + "\n")
        return target

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
