"""Is this file complete? For files that other programs write into a watched folder (job files, media).

A writer may copy slowly (scp, a network share, an editor saving in two writes), so a file that exists is not yet a
file that is finished. Three rules, all cheap and none of them reading the file:

- `is_partial_name`: names that are never finished files (hidden, `.tmp`, `.part`, editor swap and lock files);
- `open_for_writing`: whether any process holds the file open for writing, asked of the Linux kernel (a read lease
  cannot be taken while a writer has the file open); None where that cannot be known (other systems, network and
  FUSE file systems, a file of another user without CAP_LEASE);
- `SettleTracker`: a file is complete when its size, mtime and inode stayed the same for `settle_seconds` of this
  process's monotonic clock (a share's skewed clock cannot fool it) and no writer holds it open; a file found with
  timestamps far in the past and no writer is complete at first sight.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

try:
    import fcntl
except ImportError:  # not a POSIX system: nothing can be asked of the kernel
    fcntl = None  # type: ignore[assignment]

# suffixes of names that download tools, copy tools and editors give a file while they write it
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".filepart", ".swp", "~")

# fcntl's Linux names (Python has F_SETLEASE/F_GETLEASE/F_SETSIG from 3.9 on Linux; the numbers are the kernel's)
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
_LEASES = fcntl is not None and sys.platform.startswith("linux")
# A writer that opens the file during the microseconds a lease is held breaks it, and the kernel signals the lease
# holder: SIGIO by default, whose default action ends the process. SIGURG's default action is to ignore it.
_BREAK_SIGNAL = int(getattr(signal, "SIGURG", 23))

HELD_POLL_MIN_SECONDS = 0.05  # a file held open is looked at again after held_for/4, within these bounds
HELD_POLL_MAX_SECONDS = 0.5
OLD_SECONDS_FLOOR = 60.0  # timestamps this far in the past (and more than settle_seconds) count as old


def is_partial_name(name: str) -> bool:
    """True for names never taken as finished files: hidden ones (which covers rsync's `.name.XXXXXX` and Emacs'
    `.#name` locks), `*.tmp`, `*.part`, `*.partial`, `*.crdownload`, `*.download`, `*.filepart` (WinSCP),
    `*.swp` and `*~` (any case)."""
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


def open_for_writing(path: str | os.PathLike[str]) -> bool | None:
    """Whether any process holds the regular file `path` open for writing (this one included), without reading it.

    Asks the Linux kernel: a read lease (F_SETLEASE F_RDLCK) is refused with EAGAIN while any writer has the file
    open. The lease is released at once; a writer opening the file in those microseconds waits for no longer
    than that (one that opens it O_NONBLOCK gets EWOULDBLOCK once) and is counted as a writer. None where it cannot
    be known: not Linux, not a regular file, a symlink, a file this process cannot open, a file of another user
    without CAP_LEASE (EACCES), a file system without leases such as NFS or FUSE (EINVAL), leases switched off
    (/proc/sys/fs/leases-enable 0), or a write lease another program holds (Samba's oplocks).
    """
    if not _LEASES:
        return None
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never open a FIFO or a device file, never follow a link
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the lstat and the open
            return None
        fcntl.fcntl(fd, _F_SETSIG, _BREAK_SIGNAL)  # before the lease: a break must never send SIGIO
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            return True if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) else None
        try:
            broken = fcntl.fcntl(fd, _F_GETLEASE) != fcntl.F_RDLCK  # a writer opened it in the meantime
        finally:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return True if broken else False
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops a lease that F_UNLCK could not


COMPLETE = "complete"
CHANGING = "changing"  # seen changing, or not yet unchanged for settle_seconds
WRITING = "open_for_writing"  # unchanged, but a process holds it open for writing


@dataclass(frozen=True)
class Verdict:
    """What one look at a file found."""

    complete: bool
    state: str  # COMPLETE, CHANGING or WRITING
    retry_in: float | None  # seconds until another look may find it complete; None when complete or past wait_limit
    held_for: float = 0.0  # seconds it has been found open for writing (0 when it was not)
    newly_held: bool = False  # the first look of this episode that found a writer: worth one log line
    newly_overdue: bool = False  # the first look that found it held open longer than wait_limit


@dataclass
class _Entry:
    signature: tuple[int, int, int]  # size, mtime_ns, inode
    since: float  # monotonic time this signature was first seen
    old: bool  # first seen with timestamps far in the past: complete at once where no writer holds it
    lease: bool | None = None  # the last open_for_writing answer
    lease_signature: tuple[int, int, int] | None = None  # the signature it was asked for
    lease_at: float = float("-inf")  # monotonic time it was asked
    held_since: float | None = None  # monotonic time a writer was first found (reset when one is not)
    overdue: bool = False  # newly_overdue was reported


class SettleTracker:
    """Decides, look after look, whether each file of a folder is complete; remembers only files it is shown.

    `check()` each file at every scan of the folder (`fresh=True` for the ones about to be taken) and `retain()`
    the paths seen, so files gone are forgotten.
    A file is complete when no process holds it open for writing (`open_for_writing` is not True) and either its
    size, mtime and inode have been the same for `settle_seconds` of the monotonic clock, or it was first seen with
    mtime and ctime older than `old_seconds` (by the wall clock, default max(settle_seconds, 60 s)) and the kernel
    says no writer has it (so a file on a share, where that cannot be asked, always waits settle_seconds).
    `wait_limit`: after a writer has held the file open this long, `retry_in` is None (stop polling for it; it is
    found complete at a later look, such as after the writer's close event or the next rescan).
    """

    def __init__(
        self,
        settle_seconds: float,
        *,
        old_seconds: float | None = None,
        wait_limit: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle_seconds = max(0.0, float(settle_seconds))
        self.old_seconds = max(self.settle_seconds, OLD_SECONDS_FLOOR) if old_seconds is None else old_seconds
        self.wait_limit = wait_limit
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def check(
        self,
        path: str | os.PathLike[str],
        st: os.stat_result | None = None,
        *,
        now: float | None = None,
        fresh: bool = False,
    ) -> Verdict:
        """One look at `path` (`st`: its lstat, when the caller has it; FileNotFoundError when it is gone).

        `now`: the wall clock, for the old-timestamp rule. `fresh`: ask the kernel again whether a writer holds
        it, for a file about to be taken; otherwise a "no writer" answer stands while the file does not change
        (so a folder of many complete files is not opened again at every look).
        """
        key = os.fspath(path)
        st = os.lstat(key) if st is None else st
        now = time.time() if now is None else now
        mono = self._clock()
        signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        entry = self._entries.get(key)
        if entry is None:
            old = now - max(st.st_mtime, st.st_ctime) >= self.old_seconds
            entry = self._entries[key] = _Entry(signature, mono, old)
        elif entry.signature != signature:
            entry.signature, entry.since, entry.old = signature, mono, False
        stable_for = mono - entry.since
        settled = stable_for >= self.settle_seconds
        if not settled and not entry.old:  # still changing: no need to ask the kernel yet
            return Verdict(False, CHANGING, self.settle_seconds - stable_for, self._held_for(entry, mono))
        lease = self._lease(key, entry, mono, fresh)
        if lease:
            return self._held(entry, mono)
        entry.held_since, entry.overdue = None, False
        if settled or lease is False:
            return Verdict(True, COMPLETE, None)
        entry.old = False  # old timestamps, but nothing says no writer has it (a share): wait as for any file
        return Verdict(False, CHANGING, self.settle_seconds - stable_for)

    def retain(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Forget every file but these (the ones the last scan saw): memory stays bounded by the folder."""
        keep = {os.fspath(p) for p in paths}
        for key in [key for key in self._entries if key not in keep]:
            del self._entries[key]

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Forget one file (taken, moved away)."""
        self._entries.pop(os.fspath(path), None)

    def _lease(self, key: str, entry: _Entry, mono: float, fresh: bool) -> bool | None:
        """open_for_writing, asked again only when its last answer may be out of date."""
        if entry.lease_signature is not None:
            same_inode = entry.lease_signature[2] == entry.signature[2]
            age = mono - entry.lease_at
            if entry.lease is None and same_inode:
                return None  # cannot be known for this file (its file system, its owner): no need to ask again
            if entry.lease_signature == entry.signature:
                if entry.lease and age < self._held_poll(entry, mono):
                    return True  # a writer had it a moment ago (and our own open and close just woke the caller)
                if entry.lease is False and not fresh:
                    return False
        entry.lease = open_for_writing(key)
        entry.lease_signature, entry.lease_at = entry.signature, mono
        return entry.lease

    def _held(self, entry: _Entry, mono: float) -> Verdict:
        newly_held = entry.held_since is None
        if newly_held:
            entry.held_since = mono
        held_for = self._held_for(entry, mono)
        retry_in: float | None = max(0.0, entry.lease_at + self._held_poll(entry, mono) - mono)
        newly_overdue = False
        if self.wait_limit is not None and held_for > self.wait_limit:
            retry_in = None
            newly_overdue, entry.overdue = not entry.overdue, True
        return Verdict(False, WRITING, retry_in, held_for, newly_held, newly_overdue)

    @staticmethod
    def _held_for(entry: _Entry, mono: float) -> float:
        return 0.0 if entry.held_since is None else mono - entry.held_since

    def _held_poll(self, entry: _Entry, mono: float) -> float:
        """How often a file held open is asked about: soon after a writer was found, then every half second."""
        return min(HELD_POLL_MAX_SECONDS, max(HELD_POLL_MIN_SECONDS, self._held_for(entry, mono) / 4))
