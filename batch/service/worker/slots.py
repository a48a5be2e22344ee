"""Worker slots: at most `spool.max_workers` processes hold the model for one spool at once.

A `*/10` cron line whose run takes 25 minutes would otherwise start two more runs, each loading the model again
(NPU memory a board does not have). Each slot is a lock file under `<spool>/.slots/<model>/`, held with
`flock` for as long as the process lives: the kernel releases it when the process ends, however it ends.

`held_by_others` says which slots (of any model) other processes hold now: a vlbatch that would migrate the
database first makes sure no worker of an older version is running (batch/service/store/store.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SLOTS_FOLDER = ".slots"
_HELD_HERE: set[str] = set()  # the lock files this process holds (its own slots are never "another's")


@dataclass(frozen=True)
class HeldSlot:
    """A slot lock file that another process holds now; `pid` when the kernel says whose it is (Linux)."""

    path: Path
    pid: int | None

    @property
    def name(self) -> str:
        """`<model folder>/<n>`, as the slot is found under `<spool>/.slots/`."""
        return f"{self.path.parent.name}/{self.path.stem}"


class WorkerSlots:
    """The slots of one spool and model; `take()` holds one of them until `release()` or the process ends."""

    def __init__(self, spool_root: Path, model_id: str, count: int) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.split("@")[0])[:40]
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:12]
        self.folder = Path(spool_root) / SLOTS_FOLDER / f"{safe}-{digest}"
        self.count = count
        self.held: int | None = None
        self._fd: int | None = None
        self._path: str | None = None

    def take(self) -> bool:
        """Hold a free slot now; False when all of them are held by other processes."""
        if self._fd is not None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        for n in range(self.count):
            path = self.folder / f"{n}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd, self.held, self._path = fd, n, os.path.realpath(path)
            _HELD_HERE.add(self._path)
            return True
        return False

    def wait(self, stop: Callable[[], bool], interval: float = 1.0) -> bool:
        """Take a slot as soon as one is free; False when `stop()` turns true first."""
        while not stop():
            if self.take():
                return True
            time.sleep(interval)
        return False

    def release(self) -> None:
        if self._fd is not None:
            _HELD_HERE.discard(self._path or "")
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = self.held = self._path = None


def held_by_others(spool_root: Path) -> list[HeldSlot]:
    """The slot lock files under `<spool>/.slots/` (every model's) that another process holds now.

    Each is probed with a shared, non-blocking flock that is dropped at once: a holder's exclusive lock refuses
    it. For that instant a worker starting up finds the slot taken, as it would if another worker held it."""
    folder = Path(spool_root) / SLOTS_FOLDER
    if not folder.is_dir():
        return []
    owners: dict[tuple[int, int], int] | None = None
    held = []
    for path in sorted(folder.glob("*/*.lock")):
        if os.path.realpath(path) in _HELD_HERE:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not a lock file of ours
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                info = os.fstat(fd)
                owners = _flock_owners() if owners is None else owners
                pid = owners.get((info.st_dev, info.st_ino))
                if pid != os.getpid():
                    held.append(HeldSlot(path, pid))
        finally:
            os.close(fd)  # drops the probe's lock, if it got one
    return held


def _flock_owners() -> dict[tuple[int, int], int]:
    """(device, inode) -> pid of the flock holders the kernel lists in /proc/locks (empty where there is none)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return {}
    owners = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" marks a process waiting for the lock, not holding it
            continue
        try:
            major, minor, inode = fields[5].split(":")
            owners[(os.makedev(int(major, 16), int(minor, 16)), int(inode))] = int(fields[4])
        except ValueError:
            continue
    return owners
