"""Synthetic media for tests: patterned images and mp4 clips written with PyAV."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with a few sharp shapes, so every tile differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    rgb = np.stack([127 + 120 * np.sin(x / (17 + 9 * c) + y / (23 + 5 * c) + phase[c]) for c in range(3)], -1)
    for _ in range(6):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(4, max(5, min(width, height) // 4))
        rgb[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int = 10, gop: int = 12, b_frames: int = 0) -> Path:
    """An mp4 (mpeg4, yuv420p) of the given (H, W, 3) uint8 frames, at a bit rate high enough to keep them."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 5_000_000
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        for i, image in enumerate(frames):
            if i == 0:
                stream.height, stream.width = image.shape[:2]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_media(folder: Path, images: Sequence[tuple[str, tuple[int, int], int]]) -> Path:
    """Photos given as (name, (width, height), seed), plus clip.mp4: 40 frames of a moving pattern whose
    brightness rises with the frame number."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h), seed in images:
        synthetic_image(w, h, seed).save(folder / name)
    frames = (np.asarray(synthetic_image(96, 64, seed=i)) * 0.5 + 4 * i for i in range(40))
    write_video(folder / "clip.mp4", (f.clip(0, 255).astype(np.uint8) for f in frames))
    return folder


DEMO_PHOTOS = [
    ("beach.jpg", (800, 600), 1),
    ("street.png", (640, 960), 2),
    ("market.jpg", (1280, 480), 3),
    ("harbor.png", (448, 448), 4),
]


def write_demo_media(folder: Path) -> Path:
    """The demo's media: four photos of different shapes and one short clip."""
    return write_media(folder, DEMO_PHOTOS)


if __name__ == "__main__":
    import sys

    write_demo_media(Path(sys.argv[1]))
