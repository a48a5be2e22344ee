"""A unit's media as image files for a model server: what an OpenAI-style request carries as `data:` URLs.

Runs where the decoders run (the decoding child, under its time limit and memory cap). An image the server can
read as it is (JPEG, PNG or WebP, upright, no larger than the caps) is sent byte for byte; any other image (HEIC,
camera RAW, TIFF, a rotated or an oversized one) is decoded upright, as the local model sees it, scaled to fit
MAX_EDGE and sent as JPEG. A video becomes its sampled frames (`video_frames`, the segments' midpoints, as the
local pipeline samples them), each a JPEG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from batch.infer.media import image_size, load_image, load_video_frames
from batch.infer.safe_open import open_media
from batch.infer.settings import MediaSettings

ENCODE_VERSION = 1  # bump when the same file would be sent differently
MAX_EDGE = 4096  # pixels on the longer side of an image re-encoded for a server (InternVL tiles 12 x 448 at most)
MAX_BYTES = 8 * 1024 * 1024  # an image file larger than this is re-encoded, not sent as it is
JPEG_QUALITY = 92
_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def encode_media(
    paths: Sequence[Path], kind: Literal["image", "video"], settings: MediaSettings
) -> list[tuple[str, bytes]]:
    """(MIME type, bytes) of every image, or of every sampled frame of the one video, in order."""
    if kind == "video":
        frames = load_video_frames(paths[0], settings.video_frames, settings.decoder)
        return [("image/jpeg", _jpeg(frame)) for frame in frames]
    return [_image(Path(p), settings) for p in paths]


def _image(path: Path, settings: MediaSettings) -> tuple[str, bytes]:
    image_size(path, settings.max_image_pixels)  # refuses an image over the pixel limit before it is decoded
    with open_media(path) as handle:  # a regular file, read once (never a FIFO or a device swapped in)
        data = handle.read(MAX_BYTES + 1)
    mime = None
    if len(data) <= MAX_BYTES:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.getexif().get(0x0112, 1) in (0, 1) and max(img.size) <= MAX_EDGE:
                    mime = _AS_IS.get(img.format or "")
        except Exception:  # HEIC, RAW and the rest: load_image reads them (or says why it cannot)
            mime = None
    if mime:
        return mime, data
    picture = load_image(path, settings.max_image_pixels, fit=MAX_EDGE)
    picture.thumbnail((MAX_EDGE, MAX_EDGE), resample=3)
    return "image/jpeg", _jpeg(picture)


def _jpeg(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
