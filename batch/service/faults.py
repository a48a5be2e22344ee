"""Passing faults of the machine (a full disk, an I/O error, a locked database) told apart from the rest.

The worker waits such faults out with a capped exponential backoff instead of dying; only a corrupt database
(or a second stop signal) ends it. `vlbatch run` gives up after a while with its own exit code.
"""

from __future__ import annotations

import errno
import sqlite3

from batch.errors import VlbatchError

# errors of the disk, the file system or the process's limits, which go away when an operator fixes the machine
_PASSING_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ESTALE,
    }
)


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


def is_passing(exc: BaseException) -> bool:
    """A fault of the machine that may go away: full disk, I/O error, locked or unwritable database.

    SQLite reports these and mistakes in SQL alike as OperationalError; only the messages tell them apart.
    """
    if isinstance(exc, sqlite3.OperationalError):
        return any(text in str(exc).lower() for text in _PASSING_SQLITE)
    return isinstance(exc, OSError) and exc.errno in _PASSING_ERRNOS


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
