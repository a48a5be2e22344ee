"""Turning a unit's media files into tiles: in this process, or in a killable child process with limits.

Decoders (Pillow, decord, PyAV) are untrusted code reading untrusted files. The worker runs them in a child
process with a time limit per unit and an address-space cap; a child that crashes, hangs or runs out of memory
is killed and replaced, and only that unit fails. Only uint8 tile arrays cross the process boundary.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from batch.errors import MediaError
from batch.infer.media import choose_tile_cap, load_image, load_video_frames, tile_image
from batch.infer.settings import MediaSettings

Kind = Literal["image", "video"]


@dataclass(frozen=True)
class DecodedMedia:
    """A unit's tiles, ready to normalise: every image's (or frame's) tiles in order."""

    kind: Kind
    tiles: np.ndarray  # (N, S, S, 3) uint8
    per_item: tuple[int, ...]  # tiles per image, or per frame (1 each)
    cap: int  # the per-image tile cap used (settings.max_tiles unless lowered to fit)


def decode_media(paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int) -> DecodedMedia:
    """Decode and tile; images get the largest tile cap whose tiles, all images together, fit max_total_tiles."""
    size = settings.image_size
    if kind == "video":
        frames = load_video_frames(paths[0], settings.video_frames, settings.decoder)
        items = [tile_image(frame, 1, size, use_thumbnail=False) for frame in frames]
        cap = 1
    else:
        images = [load_image(p, settings.max_image_pixels) for p in paths]
        cap = choose_tile_cap([im.size for im in images], settings, max_total_tiles)
        items = [tile_image(im, cap, size, settings.use_thumbnail) for im in images]
    tiles = np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for item in items for t in item])
    return DecodedMedia(kind, tiles, tuple(len(item) for item in items), cap)


class MediaDecoder(Protocol):
    def decode(
        self, paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int
    ) -> DecodedMedia: ...

    def close(self) -> None: ...


class InProcessDecoder:
    """Decoding in the calling process: for `vlbatch ask`, tests and benchmarks."""

    def decode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int) -> DecodedMedia:
        return decode_media(paths, kind, settings, max_total_tiles)

    def close(self) -> None:
        pass


class IsolatedDecoder:
    """Decoding in one long-lived child process, restarted whenever it crashes, hangs or exceeds its memory cap."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        self._process: Any = None
        self._conn: Any = None
        self._memory_mb: int | None = None
        self._lock = threading.Lock()
        self.restarts = 0

    def decode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int) -> DecodedMedia:
        names = ", ".join(str(p) for p in paths)
        with self._lock:
            self._ensure(settings.decode_memory_mb)
            try:
                self._conn.send(([str(p) for p in paths], kind, settings, max_total_tiles))
                ready = self._conn.poll(settings.decode_timeout_seconds)
            except (OSError, EOFError):  # the child died between two units
                ready = True
            if not ready:
                self._kill()
                raise MediaError(names, f"decoding timed out after {settings.decode_timeout_seconds:g} s")
            try:
                status, payload = self._conn.recv()
            except (OSError, EOFError):
                raise MediaError(names, self._death_reason()) from None
        if status == "ok":
            return payload
        if status == "memory":
            self.close()  # a MemoryError can leave the child's heap in a poor state: start afresh
            raise MediaError(names, f"decoding exceeded the {settings.decode_memory_mb} MiB memory cap")
        path, reason = payload
        raise MediaError(path, reason)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def _ensure(self, memory_mb: int) -> None:
        if self._process is not None and self._process.is_alive() and self._memory_mb == memory_mb:
            return
        if self._process is not None:
            self.restarts += 1
        self.close()
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=serve, args=(child, memory_mb), name="vlbatch-decode", daemon=True)
        self._process.start()
        child.close()
        self._conn, self._memory_mb = parent, memory_mb

    def _death_reason(self) -> str:
        self._process.join(5)
        code = self._process.exitcode
        self.close()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"decoder crashed ({name})"
        return f"decoder process exited unexpectedly (exit code {code})"

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
        self._process = self._conn = None


def serve(conn: Any, memory_mb: int) -> None:
    """The child's loop: one request in, one reply out, until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which decides what stops
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            paths, kind, settings, max_total_tiles = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", decode_media([Path(p) for p in paths], kind, settings, max_total_tiles))
        except MediaError as exc:
            reply = ("error", (exc.path, exc.reason))
        except MemoryError:
            reply = ("memory", None)
        except Exception as exc:  # a decoder bug: this unit fails, the child lives on
            reply = ("error", (", ".join(paths), f"cannot decode ({type(exc).__name__}: {exc})"))
        conn.send(reply)
