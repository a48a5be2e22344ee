"""Synthetic media for tests: patterned images, mp4 clips written with PyAV, HEIC photos and minimal DNG files."""

from __future__ import annotations

import io
import struct
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


def write_heic(path: Path, image: Image.Image, orientation: int = 1) -> Path:
    """A HEIC (HEVC in HEIF) written by pillow-heif; an EXIF `orientation` other than 1 is stored the HEIF way too
    (the pixels as the sensor saw them, and an `irot`/`imir` transform that turns them upright)."""
    import pillow_heif

    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    heif = pillow_heif.from_pillow(image.convert("RGB"))
    heif.save(path, quality=90, exif=exif.tobytes() if orientation != 1 else None)
    return path


_SHORT, _LONG, _ASCII, _BYTE, _SRATIONAL = 3, 4, 2, 1, 10


def _ifd(entries: list[tuple[int, int, object]], start: int, next_ifd: int = 0) -> bytes:
    """A little-endian TIFF IFD at offset `start`, its values longer than 4 bytes stored right after it."""
    entries = sorted(entries, key=lambda entry: entry[0])
    table, extra = bytearray(struct.pack("<H", len(entries))), bytearray()
    data_start = start + 2 + 12 * len(entries) + 4
    for tag, kind, values in entries:
        if kind == _ASCII:
            data = str(values).encode("ascii") + b"\0"
            count = len(data)
        else:
            flat = [x for v in values for x in (v if isinstance(v, tuple) else (v,))]  # type: ignore[union-attr]
            data = struct.pack("<" + {_SHORT: "H", _LONG: "I", _BYTE: "B", _SRATIONAL: "i"}[kind] * len(flat), *flat)
            count = len(flat) // 2 if kind == _SRATIONAL else len(flat)
        if len(data) <= 4:
            table += struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0")
        else:
            table += struct.pack("<HHII", tag, kind, count, data_start + len(extra))
            extra += data + b"\0" * (len(data) % 2)
    return bytes(table + struct.pack("<I", next_ifd) + extra)


def write_dng(
    path: Path,
    preview: Image.Image,
    orientation: int = 1,
    preview_exif: Image.Exif | None = None,
    raw_size: tuple[int, int] = (64, 48),
) -> Path:
    """A minimal DNG 1.4 as a camera writes one: IFD0 holds a small 16-bit RGGB sensor image (uncompressed) and the
    file's `orientation`, its SubIFD a baseline JPEG preview of `preview`. With `preview_exif`, the preview starts
    with that EXIF segment, as cameras write it (no JFIF segment before it)."""
    jpeg = io.BytesIO()
    preview.convert("RGB").save(jpeg, "JPEG", quality=90, **({"exif": preview_exif} if preview_exif else {}))
    if preview_exif is not None:
        data = jpeg.getvalue()
        assert data[2:4] == b"\xff\xe0"  # Pillow's JFIF APP0 segment, dropped
        jpeg = io.BytesIO(data[:2] + data[4 + struct.unpack(">H", data[4:6])[0] :])
    width, height = raw_size
    sensor = (np.arange(width * height, dtype=np.uint32).reshape(height, width) * 37 % 4096).astype("<u2").tobytes()
    out = bytearray(b"II*\0\0\0\0\0") + sensor
    jpeg_at = len(out)
    out += jpeg.getvalue() + b"\0" * (len(jpeg.getvalue()) % 2)
    main = [
        (254, _LONG, [0]),  # NewSubfileType: the full-resolution image
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [16]),
        (259, _SHORT, [1]),  # uncompressed
        (262, _SHORT, [32803]),  # colour filter array
        (271, _ASCII, "Vlbatch"),
        (272, _ASCII, "Synthetic"),
        (273, _LONG, [8]),
        (274, _SHORT, [orientation]),
        (277, _SHORT, [1]),
        (278, _LONG, [height]),
        (279, _LONG, [len(sensor)]),
        (284, _SHORT, [1]),
        (330, _LONG, [0]),  # SubIFDs: filled in below
        (33421, _SHORT, [2, 2]),  # CFARepeatPatternDim
        (33422, _BYTE, [0, 1, 1, 2]),  # CFAPattern: RGGB
        (50706, _BYTE, [1, 4, 0, 0]),  # DNGVersion
        (50707, _BYTE, [1, 1, 0, 0]),  # DNGBackwardVersion
        (50708, _ASCII, "Vlbatch Synthetic"),  # UniqueCameraModel
        (50721, _SRATIONAL, [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]),  # ColorMatrix1
        (50778, _SHORT, [21]),  # CalibrationIlluminant1: D65
    ]
    main_at = len(out)
    sub_at = main_at + len(_ifd(main, main_at))
    main = [(330, _LONG, [sub_at]) if tag == 330 else (tag, kind, value) for tag, kind, value in main]
    out += _ifd(main, main_at)
    out += _ifd(
        [
            (254, _LONG, [1]),  # a reduced-resolution image: the preview
            (256, _LONG, [preview.width]),
            (257, _LONG, [preview.height]),
            (258, _SHORT, [8, 8, 8]),
            (259, _SHORT, [7]),  # JPEG
            (262, _SHORT, [6]),  # YCbCr
            (273, _LONG, [jpeg_at]),
            (277, _SHORT, [3]),
            (278, _LONG, [preview.height]),
            (279, _LONG, [len(jpeg.getvalue())]),
        ],
        sub_at,
    )
    struct.pack_into("<I", out, 4, main_at)
    path.write_bytes(bytes(out))
    return path


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
