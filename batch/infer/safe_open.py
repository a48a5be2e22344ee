"""Opening media files safely: regular files only, never through a final symlink, never blocking on a FIFO."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from batch.errors import MediaError

# O_NONBLOCK: opening a FIFO with no writer returns at once instead of blocking forever (it is refused after fstat).
# O_NOCTTY: opening a terminal device never makes it our controlling terminal.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
BLOCK_SIZE = 1 << 20
SYMLINK_REASON = "is a symbolic link (refused: it may have been swapped after the job was checked)"

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def open_regular(path: str | os.PathLike[str]) -> int:
    """A blocking, close-on-exec, read-only fd on the regular file at `path`; the caller closes it.

    Raises MediaError for a missing or unreadable file, a symlink at the final component, or anything that is not
    a regular file (FIFO, device, socket, directory); no fd is left open when it raises.
    """
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        raise MediaError(path, _open_reason(path, exc)) from None
    try:
        _check_regular(path, fd)
        _clear_nonblock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def open_media(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """`open_regular` as a binary file object, closed on exit."""
    fd = open_regular(path)
    try:
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def fd_path(fd: int) -> str:
    """A path that names exactly the file open on `fd`, for libraries that only take a path (video decoders).

    `/proc/self/fd/N` where /proc is mounted (opening it reopens the same inode with its own offset, even if the
    name was swapped since), else `/dev/fd/N`. The fd must stay open for as long as the path is used, and the
    path means this fd only inside this process (the fd is close-on-exec, so a child process does not have it).
    Raises OSError (ENOTSUP) where the system offers neither.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return f"{folder}/{fd}"
    raise OSError(errno.ENOTSUP, "no /proc/self/fd or /dev/fd to name an open file by")


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of the regular file at `path`, read through `open_regular`; MediaError if refused."""
    digest = hashlib.sha256()
    with open_media(path) as fh:
        try:
            for block in iter(lambda: fh.read(BLOCK_SIZE), b""):
                digest.update(block)
        except OSError as exc:
            raise MediaError(path, f"cannot read ({exc.strerror})") from None
    return digest.hexdigest()


def _check_regular(path: str | os.PathLike[str], fd: int) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise MediaError(path, f"not a regular file ({_kind(mode)})")


def _clear_nonblock(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "an unknown kind")


def _open_reason(path: str | os.PathLike[str], exc: OSError) -> str:
    """The MediaError reason for a failed open."""
    if exc.errno == errno.ENOENT:
        return "file not found"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return SYMLINK_REASON if os.path.islink(path) else "too many levels of symbolic links"
    if exc.errno == errno.ENOTDIR:
        return "file not found (a component of its path is not a folder)"
    if exc.errno == errno.ENXIO:  # a socket, or a device with nothing behind it
        return f"not a regular file ({_lstat_kind(path)})"
    return f"cannot open ({exc.strerror})"


def _lstat_kind(path: str | os.PathLike[str]) -> str:
    try:
        return _kind(os.lstat(path).st_mode)
    except OSError:
        return "an unknown kind"
