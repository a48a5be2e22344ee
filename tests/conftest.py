"""Shared fixtures: the tiny random InternVL model (both layouts), its ONNX export, and synthetic media."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.export.exporter import export
from batch.tinymodel import convert_to_native, make_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_MEDIA = REPO.parent / "shared" / "media"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the original InternVL layout."""
    return make_model(tmp_path_factory.mktemp("tiny_hf"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_native(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in the transformers-native layout."""
    return convert_to_native(tiny_hf, tmp_path_factory.mktemp("tiny_native"))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_onnx")
    export(tiny_hf, out)
    return out


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


def write_video(path: Path, frames: int = 40, size: tuple[int, int] = (96, 64), fps: int = 10) -> Path:
    """An mp4 whose frame i is a moving pattern with brightness rising with i (PyAV, mpeg4)."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.asarray(synthetic_image(width, height, seed=i), dtype=np.float32) * 0.5 + 4 * i
            frame = av.VideoFrame.from_ndarray(image.clip(0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic images of several shapes and an 8+-frame video."""
    folder = tmp_path_factory.mktemp("media")
    for name, (w, h), seed in [
        ("square.png", (448, 448), 1),
        ("wide.png", (1344, 448), 2),
        ("tall.jpg", (300, 700), 3),
        ("small.png", (200, 150), 4),
        ("photo.jpg", (640, 480), 5),
    ]:
        synthetic_image(w, h, seed).save(folder / name)
    write_video(folder / "clip.mp4")
    return folder
