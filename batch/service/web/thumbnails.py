"""Previews of recorded media, cached on disk, made only for files that lie under the configured media roots.

A path is refused (None) on its text and on the file system's answer to `realpath` alone, before anything is
opened: relative paths, `..` components and any path whose real location (symlinks resolved) is outside
`spool.media_roots`. Accepted files are decoded in the decoding child (time limit, memory cap), scaled to a
small JPEG and kept under the cache folder, keyed by path, size, modification time and preview size. A file that
cannot be decoded is remembered as such (next to the cache entry) until it changes.

The cache writes and deletes only inside its own folder: below the cache folder (itself followed if it is a
symlink: the user or the default names it) every folder and entry is opened relative to its parent's descriptor
with O_NOFOLLOW. A symlink planted at a subfolder is refused (SymlinkRefused), one planted at an entry is taken
for a missing entry and replaced by the rename of the new one (never written through), and a preview is put into
a gallery folder (`link_into`) only from a regular file of this user's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from batch.cache_home import cache_home
from batch.errors import MediaError, VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.infer.media import media_kind
from batch.infer.settings import MediaSettings
from batch.infer.thumbnail import THUMBNAIL_VERSION
from batch.service.atomic_write import SymlinkRefused, write_fully
from batch.service.store.paths import decode_path

DEFAULT_EDGE = 320
DECODERS = min(2, os.cpu_count() or 1)  # previews made at once: one decoding child each
MAX_REASON = 4096  # bytes of a remembered failure read back
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_folder_at(dir_fd: int, name: str, shown: Path, create: bool = True) -> int:
    """The folder `name` inside the folder `dir_fd` (made first when `create`), opened without following a symlink.

    Raises SymlinkRefused when `name` is a symlink, NotADirectoryError when it is something else; `shown` is the
    path the errors name.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)
    try:
        return os.open(name, _FOLDER, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise SymlinkRefused(shown) from None
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(shown)) from None


def temp_name(name: str) -> str:
    """A hidden, unpredictable name beside `name` for writing it atomically."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


@contextlib.contextmanager
def replacing(dir_fd: int, name: str) -> Iterator[str]:
    """A temp name beside `name` in the folder `dir_fd` for the block to create; renamed over `name` when the block
    succeeds (a symlink there is replaced, never written through), removed when it fails."""
    tmp = temp_name(name)
    try:
        yield tmp
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_at(dir_fd: int, name: str, data: bytes | str, *, durable: bool = True) -> None:
    """Write `name` inside the folder `dir_fd` atomically: a new temp file (O_EXCL | O_NOFOLLOW), then a rename.

    The rename replaces whatever `name` was, a symlink included, without writing through it; readers see the old
    file or the whole new one. `durable` fsyncs the file first (the caller fsyncs the folder). Nothing is left
    behind when a step fails.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with replacing(dir_fd, name) as tmp:
        fd = os.open(tmp, _NEW, 0o666, dir_fd=dir_fd)  # 0o666 less the umask, as a plain open() creates
        write_fully(fd, payload, durable)


def fsync_folder(dir_fd: int) -> None:
    """Make the renames in a folder durable; some filesystems refuse fsync on a folder, which is fine."""
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


def _read_at(dir_fd: int, name: str, limit: int = -1) -> tuple[bytes, os.stat_result] | None:
    """A regular file's bytes (up to `limit`) and status, opened O_NOFOLLOW; None when missing or not one."""
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError:  # missing, or a symlink (ELOOP): no entry
        return None
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        return handle.read(limit), info


def _whole_jpeg_at(dir_fd: int, name: str) -> bool:
    """A cached preview that is all there (it ends with the JPEG end marker): not cut short by a power loss, and a
    regular file (a symlink planted there is no preview)."""
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError:
        return False
    with open(fd, "rb") as handle:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            handle.seek(-2, os.SEEK_END)
            return handle.read(2) == b"\xff\xd9"
        except OSError:
            return False


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vlbatch/thumbnails (~/.cache/vlbatch/thumbnails)."""
    return cache_home("thumbnails")


@dataclass(frozen=True)
class Preview:
    """A cached preview: the JPEG file, or the reason there is none."""

    file: Path | None
    error: str | None = None


class Thumbnails:
    """Previews for one set of media roots; `preview` may be called from several threads (one decoder each)."""

    def __init__(
        self,
        media_roots: Sequence[Path],
        cache_dir: Path,
        settings: MediaSettings,
        edge: int = DEFAULT_EDGE,
        decoder_factory: Callable[[], MediaDecoder] = IsolatedDecoder,
        decoders: int = DECODERS,
    ) -> None:
        if not media_roots:
            raise VlbatchError("no spool.media_roots are configured: previews are only made for files under them")
        self.roots = tuple(Path(os.path.realpath(root)) for root in media_roots)
        self.cache_dir = Path(cache_dir)
        self.decoders = [decoder_factory() for _ in range(decoders)]
        self._free: queue.SimpleQueue[MediaDecoder] = queue.SimpleQueue()
        for decoder in self.decoders:
            self._free.put(decoder)
        self.settings = settings
        self.edge = edge

    def allowed(self, path: str) -> Path | None:
        """The file's real path if a preview of it may be made, else None (decided without opening anything).

        `path` is a path as the database stores it (batch.service.store.paths: any name, escaped)."""
        path = decode_path(path) if path else path
        if not path or "\x00" in path or not os.path.isabs(path) or ".." in Path(path).parts:
            return None
        real = Path(os.path.realpath(path))
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            return None
        try:
            media_kind(real)
        except MediaError:
            return None
        return real

    def _entry_folder(self, name: str, create: bool = True) -> int:
        """The cache's subfolder `name`, opened O_NOFOLLOW inside the cache folder (made as needed)."""
        if create:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        top = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_folder_at(top, name, self.cache_dir / name, create)
        finally:
            os.close(top)

    def preview(self, real: Path) -> Preview:
        """The preview of an allowed file (see `allowed`), made now unless the cache holds it."""
        try:
            info = os.stat(real)
        except OSError as exc:
            return Preview(None, f"cannot read the file ({exc.strerror})")
        key = f"{THUMBNAIL_VERSION}|{self.edge}|{real}|{info.st_size}|{info.st_mtime_ns}"
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        jpeg, failed = f"{digest}.jpg", f"{digest}.err"
        folder = self._entry_folder(digest[:2])
        try:
            if _whole_jpeg_at(folder, jpeg):
                return Preview(self.cache_dir / digest[:2] / jpeg)
            remembered = _read_at(folder, failed, MAX_REASON)
            if remembered is not None:
                return Preview(None, remembered[0].decode("utf-8", errors="replace"))
            decoder = self._free.get()  # waits while every decoder is busy; each decode has its own time limit
            try:
                data = decoder.thumbnail(real, media_kind(real), self.edge, self.settings)  # type: ignore[arg-type]
            except MediaError as exc:
                write_at(folder, failed, exc.reason, durable=False)
                return Preview(None, exc.reason)
            finally:
                self._free.put(decoder)
            write_at(folder, jpeg, data, durable=False)  # a cache: written without fsync, checked when read
            return Preview(self.cache_dir / digest[:2] / jpeg)
        finally:
            os.close(folder)

    def link_into(self, preview: Preview, dir_fd: int, name: str) -> None:
        """Put a cached preview into the folder `dir_fd` as `name`: a hard link where the two share a filesystem,
        else a copy; either way through a temp name and a rename inside `dir_fd`.

        The cache entry is opened O_NOFOLLOW and must be a regular file of this user's (SymlinkRefused or
        PermissionError otherwise); the link is checked to be that very file (inode) before it is renamed in.
        """
        if preview.file is None:
            raise ValueError("no preview to place")
        folder = self._entry_folder(preview.file.parent.name, create=False)
        try:
            try:
                src = os.open(preview.file.name, _READ, dir_fd=folder)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise SymlinkRefused(preview.file) from None
                raise
            with open(src, "rb") as handle:
                info = os.fstat(src)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                    raise PermissionError(errno.EPERM, "not a preview this cache wrote", str(preview.file))
                with replacing(dir_fd, name) as tmp:
                    if not self._link(folder, preview.file.name, dir_fd, tmp, info):
                        _copy_to(handle, dir_fd, tmp)
        finally:
            os.close(folder)

    @staticmethod
    def _link(src_fd: int, src: str, dst_fd: int, tmp: str, info: os.stat_result) -> bool:
        """Hard-link `src` (never a symlink it may have become) as `tmp`; False when it cannot, or it is not the
        file opened (swapped meanwhile)."""
        try:
            os.link(src, tmp, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        except OSError:  # another filesystem, or one without hard links
            return False
        linked = os.stat(tmp, dir_fd=dst_fd, follow_symlinks=False)
        if (linked.st_dev, linked.st_ino) == (info.st_dev, info.st_ino) and stat.S_ISREG(linked.st_mode):
            return True
        os.unlink(tmp, dir_fd=dst_fd)
        return False

    def close(self) -> None:
        for decoder in self.decoders:
            decoder.close()


def _copy_to(handle: BinaryIO, dir_fd: int, tmp: str) -> None:
    """Copy an open file's bytes into a new file `tmp` (O_EXCL | O_NOFOLLOW) inside `dir_fd`."""
    out = os.open(tmp, _NEW, 0o666, dir_fd=dir_fd)
    with open(out, "wb") as target:
        handle.seek(0)
        shutil.copyfileobj(handle, target)
