"""Small JPEG previews of media files: an image turned upright, or a video's middle frame.

Made by the same decoders, with the same limits, as the model's input (`load_image`, `load_video_frames`), so a
preview shows exactly the picture the model saw; the caller runs this in the decoding child like any decode.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

from batch.infer.media import load_image, load_video_frames
from batch.infer.settings import MediaSettings

THUMBNAIL_VERSION = 1  # bump when a preview of the same file would come out differently
JPEG_QUALITY = 82


def thumbnail_jpeg(path: Path, kind: Literal["image", "video"], edge: int, settings: MediaSettings) -> bytes:
    """The file scaled to fit an ``edge`` x ``edge`` box (never enlarged), as JPEG bytes."""
    if kind == "video":
        picture = load_video_frames(path, 1, settings.decoder)[0]  # one segment: its midpoint is the middle frame
    else:
        # JPEGs (a RAW file's embedded preview too) decode at a reduced scale; HEIC and the rest in full
        picture = load_image(path, settings.max_image_pixels, fit=edge)
    picture.thumbnail((edge, edge), resample=3)  # bicubic
    out = io.BytesIO()
    picture.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()
