"""Previews of recorded media, cached on disk, made only for files that lie under the configured media roots.

A path is refused (None) on its text and on the file system's answer to `realpath` alone, before anything is
opened: relative paths, `..` components and any path whose real location (symlinks resolved) is outside
`spool.media_roots`. Accepted files are decoded in the decoding child (time limit, memory cap), scaled to a
small JPEG and kept under the cache folder, keyed by path, size, modification time and preview size. A file that
cannot be decoded is remembered as such (next to the cache entry) until it changes.
"""

from __future__ import annotations

import hashlib
import os
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from batch.errors import MediaError, VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.infer.media import media_kind
from batch.infer.settings import MediaSettings
from batch.infer.thumbnail import THUMBNAIL_VERSION
from batch.service.atomic_write import write_atomic

DEFAULT_EDGE = 320
DECODERS = min(2, os.cpu_count() or 1)  # previews made at once: one decoding child each


def _whole_jpeg(path: Path) -> bool:
    """A cached preview that is all there (it ends with the JPEG end marker): not cut short by a power loss."""
    try:
        with open(path, "rb") as handle:
            handle.seek(-2, os.SEEK_END)
            return handle.read(2) == b"\xff\xd9"
    except OSError:
        return False


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vlbatch/thumbnails (~/.cache/vlbatch/thumbnails)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlbatch" / "thumbnails"


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
        """The file's real path if a preview of it may be made, else None (decided without opening anything)."""
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

    def preview(self, real: Path) -> Preview:
        """The preview of an allowed file (see `allowed`), made now unless the cache holds it."""
        try:
            info = os.stat(real)
        except OSError as exc:
            return Preview(None, f"cannot read the file ({exc.strerror})")
        key = f"{THUMBNAIL_VERSION}|{self.edge}|{real}|{info.st_size}|{info.st_mtime_ns}"
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        jpeg = self.cache_dir / digest[:2] / f"{digest}.jpg"
        failed = jpeg.with_suffix(".err")
        if _whole_jpeg(jpeg):
            return Preview(jpeg)
        if failed.is_file():
            return Preview(None, failed.read_text(encoding="utf-8", errors="replace"))
        jpeg.parent.mkdir(parents=True, exist_ok=True)
        decoder = self._free.get()  # waits while every decoder is busy; each decode has its own time limit
        try:
            data = decoder.thumbnail(real, media_kind(real), self.edge, self.settings)  # type: ignore[arg-type]
        except MediaError as exc:
            write_atomic(failed, exc.reason, durable=False)
            return Preview(None, exc.reason)
        finally:
            self._free.put(decoder)
        write_atomic(jpeg, data, durable=False)  # a cache: written without fsync, checked when read
        return Preview(jpeg)

    def close(self) -> None:
        for decoder in self.decoders:
            decoder.close()
