"""Turning a unit's media files into tiles: in this process, or in a killable child process with limits.

Decoders (Pillow with pillow-heif's libheif, LibRaw through rawpy, decord, PyAV) are untrusted code reading
untrusted files. The worker runs them in a child process with a time limit per unit and an address-space cap; a
child that crashes, hangs or runs out of memory is killed and replaced, and only that unit fails. Only uint8 tile
arrays cross the process boundary.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from batch.errors import MediaError
from batch.infer.encode import encode_media
from batch.infer.media import choose_tile_cap, image_size, load_image, load_video_frames, tile_image
from batch.infer.settings import MediaSettings
from batch.infer.thumbnail import thumbnail_jpeg

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


def probe_images(paths: Sequence[Path], settings: MediaSettings) -> tuple[tuple[int, int], ...]:
    """Each image's upright (width, height) as decode_media() would see it, from the file headers alone."""
    return tuple(image_size(p, settings.max_image_pixels) for p in paths)


# what the child may be asked to do: a fixed set of functions, named in each request
TASKS = {"decode": decode_media, "probe": probe_images, "thumbnail": thumbnail_jpeg, "encode": encode_media}


class MediaDecoder(Protocol):
    def decode(
        self, paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int
    ) -> DecodedMedia: ...

    def probe(self, paths: Sequence[Path], settings: MediaSettings) -> tuple[tuple[int, int], ...]: ...

    def thumbnail(self, path: Path, kind: Kind, edge: int, settings: MediaSettings) -> bytes: ...

    def encode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings) -> list[tuple[str, bytes]]: ...

    def close(self) -> None: ...


class _ChildDied(Exception):
    """The decoding child process ended while it held a request."""


class InProcessDecoder:
    """Decoding in the calling process: for `vlbatch ask`, tests and benchmarks."""

    def decode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int) -> DecodedMedia:
        return decode_media(paths, kind, settings, max_total_tiles)

    def probe(self, paths: Sequence[Path], settings: MediaSettings) -> tuple[tuple[int, int], ...]:
        return probe_images(paths, settings)

    def thumbnail(self, path: Path, kind: Kind, edge: int, settings: MediaSettings) -> bytes:
        return thumbnail_jpeg(path, kind, edge, settings)

    def encode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings) -> list[tuple[str, bytes]]:
        return encode_media(paths, kind, settings)

    def close(self) -> None:
        pass


class IsolatedDecoder:
    """Decoding in one long-lived child process, restarted whenever it crashes, hangs or exceeds its memory cap."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._conn: Any = None
        self._memory_mb: int | None = None
        self._lock = threading.Lock()
        self._closed = False

    def decode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings, max_total_tiles: int) -> DecodedMedia:
        """Decode in the child. A child that dies is replaced and the unit tried once more (it may have been
        killed from outside); a second death, a time-out or the memory cap fails the unit with a MediaError."""
        return self._run("decode", ([Path(p) for p in paths], kind, settings, max_total_tiles), paths, settings)

    def probe(self, paths: Sequence[Path], settings: MediaSettings) -> tuple[tuple[int, int], ...]:
        """Image sizes read from the headers in the child, under the same time limit and memory cap as a decode."""
        return self._run("probe", ([Path(p) for p in paths], settings), paths, settings)

    def thumbnail(self, path: Path, kind: Kind, edge: int, settings: MediaSettings) -> bytes:
        """A JPEG preview of an image or a video's middle frame, made in the child under the same limits."""
        return self._run("thumbnail", (Path(path), kind, edge, settings), [path], settings)

    def encode(self, paths: Sequence[Path], kind: Kind, settings: MediaSettings) -> list[tuple[str, bytes]]:
        """The unit's images (or a video's sampled frames) as image files for a model server, made in the child."""
        return self._run("encode", ([Path(p) for p in paths], kind, settings), paths, settings)

    def _run(self, task: str, args: tuple, paths: Sequence[Path], settings: MediaSettings) -> Any:
        names = ", ".join(str(p) for p in paths)
        with self._lock:
            for tries_left in (1, 0):
                try:
                    status, payload = self._ask((task, args), names, settings)
                    break
                except _ChildDied as death:
                    if not tries_left:
                        raise MediaError(names, str(death)) from None
        if status == "ok":
            return payload
        if status == "memory":
            self._stop_child()  # a MemoryError can leave the child's heap in a poor state: start afresh
            raise MediaError(names, f"decoding exceeded the {settings.decode_memory_mb} MiB memory cap")
        path, reason = payload
        raise MediaError(path, reason)

    def _ask(self, request: tuple, names: str, settings: MediaSettings) -> tuple[str, Any]:
        self._ensure(settings.decode_memory_mb)
        try:
            self._conn.send(request)
            ready = self._conn.poll(settings.decode_timeout_seconds)
        except (OSError, EOFError):  # the child died between two units
            ready = True
        if not ready:
            self._stop_child()
            raise MediaError(names, f"decoding timed out after {settings.decode_timeout_seconds:g} s")
        try:
            return self._conn.recv()
        except (OSError, EOFError):
            raise _ChildDied(self._death_reason()) from None

    def _ensure(self, memory_mb: int) -> None:
        if self._closed:
            raise _ChildDied("the decoder was shut down")
        if self._process is not None and self._process.poll() is None and self._memory_mb == memory_mb:
            return
        self._stop_child()
        # a fresh interpreter (no inherited threads, locks or model) speaking over two pipes of its own
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "batch.infer.decode", str(from_parent), str(to_parent), str(memory_mb)],
                pass_fds=(from_parent, to_parent),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C goes to the worker, which decides what stops
            )
        finally:
            os.close(from_parent)
            os.close(to_parent)
        self._conn = _Channel(from_child, to_child)
        self._memory_mb = memory_mb

    def _death_reason(self) -> str:
        assert self._process is not None
        try:
            code = self._process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self._stop_child()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"decoder crashed ({name})"
        return f"decoder process exited unexpectedly (exit code {code})"

    def close(self) -> None:
        """Stop the child for good (a decode still running in another thread ends with a MediaError)."""
        self._closed = True
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()  # a decode waiting in another thread sees the child end and gives up
        if self._lock.acquire(timeout=5):
            try:
                self._stop_child()
            finally:
                self._lock.release()

    def _stop_child(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
        self._process = self._conn = None


class _Channel:
    """Pickled messages over a pair of pipes (the child's end of the same protocol is a Connection too)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = Connection(read_fd, writable=False)
        self.writer = Connection(write_fd, readable=False)

    def send(self, message: Any) -> None:
        self.writer.send(message)

    def poll(self, timeout: float) -> bool:
        return self.reader.poll(timeout)

    def recv(self) -> Any:
        return self.reader.recv()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def serve(conn: Any, memory_mb: int) -> None:
    """The child's loop: one request in, one reply out, until the parent closes the pipe."""
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            task, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", TASKS[task](*args))
        except MediaError as exc:
            reply = ("error", (exc.path, exc.reason))
        except MemoryError:
            reply = ("memory", None)
        except Exception as exc:  # a decoder bug: this unit fails, the child lives on
            paths = args[0] if isinstance(args[0], list) else [args[0]]
            reply = ("error", (", ".join(map(str, paths)), f"cannot decode ({type(exc).__name__}: {exc})"))
        conn.send(reply)


if __name__ == "__main__":  # the child: python -m batch.infer.decode READ_FD WRITE_FD MEMORY_MB
    from batch.infer import decode  # replies must pickle as batch.infer.decode.DecodedMedia, not __main__'s

    decode.serve(decode._Channel(int(sys.argv[1]), int(sys.argv[2])), int(sys.argv[3]))
