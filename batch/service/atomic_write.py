"""Writing a file atomically: an unpredictable hidden temp name beside it, fsync, rename over, no leftovers.

The temp name is short and of fixed length whatever the target's name (`.vlbatch-XXXXXXXX.tmp`), so a target whose
name is at the file system's limit (255 bytes) can still be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".vlbatch-"  # + mkstemp's 8 random characters + ".tmp": 21 bytes, whatever the target's name


class SymlinkRefused(OSError):
    """The target of an atomic write is a symbolic link; it is left as it is (an OSError with errno ELOOP)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ELOOP, "is a symbolic link (refused to replace it)", str(path))


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    refuse_symlink: bool = True,
    mode: int | None = None,
    check: Callable[[Path], None] | None = None,
    durable: bool = True,
) -> None:
    """Write `data` (str as UTF-8; a file name's bytes that are not UTF-8 kept as they are) to `path` so readers
    see the old file or the whole new one, never a part.

    The data goes to `.vlbatch-<8 random characters>.tmp` in the same folder (created O_EXCL by mkstemp, so a
    planted file or symlink there cannot be followed), is fsynced, optionally passed to `check(temp_path)`, then
    renamed over `path`; the folder is fsynced, best effort. `mode` defaults to what a plain open() would create
    (0o666 less the umask). `durable=False` skips both fsyncs: for caches that can be made again, whose readers
    must take an entry cut short by a power loss for a missing one.
    Raises SymlinkRefused when `path` is a symlink and `refuse_symlink`, or the OSError of the failing
    step (ENOSPC, EACCES, ...); any error, including one raised by `check`, removes the temp file first.
    """
    path = Path(path)
    if refuse_symlink and path.is_symlink():
        raise SymlinkRefused(path)
    payload = _utf8(data) if isinstance(data, str) else bytes(data)
    mode = _default_mode() if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        _fill(fd, payload, mode, durable)  # closes fd, also when it fails
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_folder_at(path.parent)


def _utf8(text: str) -> bytes:
    """Text as UTF-8; a file name in it that is not UTF-8 (surrogateescape) keeps its own bytes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "replace")


def write_fully(fd: int, payload: bytes, durable: bool) -> None:
    """Write every byte to `fd`, fsync it (when durable) and close it (closed even when a step fails)."""
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fill(fd: int, payload: bytes, mode: int, durable: bool) -> None:
    """Set the mode, then write_fully (`fd` is closed even when a step fails)."""
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    write_fully(fd, payload, durable)


def _default_mode() -> int:
    """0o666 less the process umask, read without changing it where /proc says it (Linux 4.7+)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_folder_at(folder: Path) -> None:
    """Make the rename durable; some filesystems refuse fsync on a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
