"""Passing faults of the machine (a full disk, an I/O error, a locked database) told apart from the rest.

The worker waits such faults out with a capped exponential backoff instead of dying; only a corrupt database
(or a second stop signal) ends it. `vlbatch run` gives up after a while with its own exit code.

Which errors pass depends on what was being done (`is_passing(exc, spool=...)`):

- ENOSPC, EDQUOT, EIO, EMFILE, ENFILE, ENOMEM, EAGAIN, EBUSY, and a share gone away (ESTALE, ENOTCONN,
  EHOSTDOWN, EHOSTUNREACH, ETIMEDOUT, ENODEV): passing everywhere, waited out;
- EACCES, EPERM, EROFS: passing for the spool folders and the database file (`spool=True`: the machine's state,
  a remount or an ownership fix); permanent for a job's own media files and sidecars: that file fails, or its
  sidecar is skipped, with the reason;
- everything else (ENAMETOOLONG, EISDIR, ENOTDIR, ELOOP, EINVAL, ENOENT ...): permanent (they describe a name or a
  file, not the machine).

A permission problem on one media folder is the file's problem, not the machine's: it does not go away by
waiting, so `watch` would retry the job forever. On the worker's own spool folder or database file it is the
machine's state, which an operator fixes, and is waited out. SQLite's own messages ("readonly database",
"unable to open database file") are always the database's, so always passing.
"""

from __future__ import annotations

import errno
import sqlite3

from batch.errors import PassingFault, VlbatchError

# errors of the disk, the file system, a network share or the process's limits, which go away when an operator
# fixes the machine (or by themselves), whatever the operation
_PASSING_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.ENODEV,
    }
)

# permission and read-only errors: passing for the spool and the database (the machine's state), permanent for a
# job's media files and sidecars (a folder the worker may not write does not change by waiting)
ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


# SQLite's messages for faults of the machine (not for mistakes such as "no such column")
_PASSING_SQLITE = (
    "database is locked",
    "database table is locked",
    "database or disk is full",
    "disk i/o error",
    "unable to open database file",
    "readonly database",
)


class InfrastructureError(VlbatchError):
    """`vlbatch run` met passing faults for longer than spool.give_up_seconds and stopped (exit code 3)."""


class DatabaseCorrupt(VlbatchError):
    """The results database is damaged (exit code 4): restore it or move it aside before starting again."""


def is_corrupt_database(exc: BaseException) -> bool:
    message = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and ("malformed" in message or "not a database" in message)


def is_passing(exc: BaseException, spool: bool = False) -> bool:
    """A fault of the machine that may go away: full disk, I/O error, a share gone away, locked or unwritable
    database. With `spool` (the error came from the spool folders or the database, not from a job's own files),
    EACCES, EPERM and EROFS count as passing too.

    SQLite reports these and mistakes in SQL alike as OperationalError; only the messages tell them apart.
    """
    if isinstance(exc, PassingFault):  # a model server down, busy or cut off
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return any(text in str(exc).lower() for text in _PASSING_SQLITE)
    if not isinstance(exc, OSError):
        return False
    return exc.errno in _PASSING_ERRNOS or (spool and exc.errno in ACCESS_ERRNOS)


def describe(exc: BaseException) -> str:
    """One line for the log: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class Backoff:
    """Capped exponential delays: first, 2*first, 4*first ... up to cap; reset() after a success."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
