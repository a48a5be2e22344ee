"""Media decoding and preprocessing: images and video into normalised 448x448 tiles, the InternVL way.

This module owns everything between a file on disk and the float32 ``pixel_values`` the vision encoder eats:

* recognising media by suffix (:func:`media_kind`);
* decoding images with Pillow, honouring EXIF orientation and flattening every mode to 8-bit RGB
  (:func:`load_image`), and their upright size from the header alone (:func:`image_size`); HEIC/HEIF through the
  pillow-heif plugin, camera RAW files through the JPEG preview the camera embeds in them (rawpy, LibRaw);
* InternVL's dynamic tiling (``dynamic_preprocess`` / ``find_closest_aspect_ratio`` from OpenGVLab's
  reference code, reproduced exactly in :func:`closest_tile_grid` and :func:`tile_image`);
* ImageNet normalisation into ``(N, 3, S, S)`` arrays (:func:`to_pixel_values`);
* sampling video frames at segment midpoints (InternVL's ``get_index``, :func:`frame_indices`) and decoding them
  with decord, or PyAV where decord is missing (:func:`load_video_frames`).

Problems a user can fix (missing, corrupt or unsupported files) are raised as :class:`batch.errors.MediaError`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from batch.errors import MediaError
from batch.infer.safe_open import fd_path, open_media
from batch.infer.settings import DECODERS, MediaSettings

# raise when decoding, tiling or normalisation changes: stored answers made from other pixels are not reused
PREPROCESS_VERSION = 1

HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif", ".hif"})  # phones (.heic), Canon and Fujifilm (.hif)
# camera RAW (Adobe, Canon, Nikon, Sony, Olympus, Panasonic, Fujifilm, Pentax, Samsung), read through their previews
RAW_EXTENSIONS: frozenset[str] = frozenset(
    {".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".pef", ".srw"}
)
IMAGE_EXTENSIONS: frozenset[str] = (
    frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}) | HEIF_EXTENSIONS | RAW_EXTENSIONS
)
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"})

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# EXIF orientations that turn the picture a quarter (5-8): the upright image has width and height swapped
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_PNG_METADATA = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})  # where Pillow finds EXIF and XMP orientation
_PNG_MAX_CHUNKS = 1_000_000

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

HEIF_MISSING = "HEIC/HEIF images need pillow-heif, a dependency of vlbatch missing here: pip install 'pillow-heif>=1.8'"
RAW_MISSING = (
    "camera RAW files are read through the JPEG preview the camera embeds, with rawpy (LibRaw), which is not "
    "installed: pip install 'vlbatch[raw]'"
)
# where a RAW preview carries its file's orientation (LibRaw's `flip`, as an EXIF value) when the preview has none
_CAMERA_ORIENTATION = "vlbatch.camera_orientation"
_FLIP_TO_EXIF = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}  # dcraw's flip bits -> EXIF orientation
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ---------------------------------------------------------------------------------------------------------------
# Kinds


def media_kind(path: Path) -> str:
    """``"image"`` or ``"video"`` by the file's suffix (case-insensitive); MediaError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    raise MediaError(
        path,
        f"unsupported file type {suffix or '(no extension)'!r}; "
        f"images: {' '.join(sorted(IMAGE_EXTENSIONS))}; videos: {' '.join(sorted(VIDEO_EXTENSIONS))}",
    )


# ---------------------------------------------------------------------------------------------------------------
# Images


def load_image(path: Path | str, max_pixels: int | None = None, fit: int | None = None) -> Image.Image:
    """Decode an image file to an upright 8-bit RGB image (EXIF orientation applied, transparency over white).

    An image of more than ``max_pixels`` pixels is refused from its header, before anything is decoded. With
    ``fit``, a format that can decode at a reduced scale (JPEG: 1/2, 1/4, 1/8) does so, keeping at least
    ``fit`` pixels on the longer side: for previews, never for the model's input.
    """
    with _open_image(path, max_pixels) as img:
        return _decode_upright(Path(path), img, max_pixels, fit)


def image_size(path: Path | str, max_pixels: int | None = None) -> tuple[int, int]:
    """The (width, height) of the image load_image() returns, read from the file's header without decoding it.

    EXIF orientation is applied as load_image() applies it, and the same files are refused for the same reasons
    (an unreadable header, more than ``max_pixels`` pixels). A PNG whose metadata comes after its pixel data
    (where Pillow reads it only with the pixels) is decoded, so its orientation is never missed.
    """
    path = Path(path)
    with _open_image(path, max_pixels) as img:
        _check_pixels(path, img, max_pixels)
        if isinstance(img, PngImagePlugin.PngImageFile) and _png_metadata_after_pixels(img.fp):
            img.load()
        orientation = _orientation(img)
        return (img.height, img.width) if orientation in _SWAPS_SIDES else (img.width, img.height)


@contextlib.contextmanager
def _open_image(path: Path | str, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image file opened by Pillow (header read, nothing decoded); every failure inside is a MediaError."""
    path = Path(path)
    if max_pixels is not None:
        # Pillow's own bomb check follows the configured limit: it warns above it (the check below names the
        # size and the setting instead) and refuses twice as much before even reading the header through
        Image.MAX_IMAGE_PIXELS = max_pixels
    heif_missing = not _heif_registered()
    suffix = path.suffix.lower()
    try:
        with open_media(path) as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore" if max_pixels else "error", Image.DecompressionBombWarning)
            with _raw_preview(path, handle) if suffix in RAW_EXTENSIONS else Image.open(handle) as img:
                yield img
    except (MediaError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(path, f"image is too large to decode safely ({exc}; see media.max_image_pixels)") from exc
    except UnidentifiedImageError as exc:
        if heif_missing and suffix in HEIF_EXTENSIONS:
            raise MediaError(path, HEIF_MISSING) from exc
        raise MediaError(
            path, "not a readable image (corrupt file, or its extension does not match its format)"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(path, f"corrupt or truncated image data ({exc}); re-export or re-download the file") from exc
    except Exception as exc:  # malformed metadata (EXIF) and other decoder failures: one bad file, not a crash
        raise MediaError(path, f"cannot decode the image ({type(exc).__name__}: {exc})") from exc


def _check_pixels(path: Path, img: Image.Image, max_pixels: int | None) -> None:
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise MediaError(
            path,
            f"image is {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} Mpx), over the "
            f"{max_pixels / 1e6:g} Mpx limit (media.max_image_pixels)",
        )


def _decode_upright(path: Path, img: Image.Image, max_pixels: int | None, fit: int | None = None) -> Image.Image:
    """Check the size from the header, then decode (reduced to `fit` if asked), turn upright, convert to RGB."""
    _check_pixels(path, img, max_pixels)
    if fit is not None and max(img.size) > fit:
        scale = fit / max(img.size)
        img.draft(img.mode, (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    img.load()
    upright = ImageOps.exif_transpose(img)
    camera = img.info.get(_CAMERA_ORIENTATION, 1)
    if camera in _TRANSPOSE and Image.Image.getexif(img).get(ExifTags.Base.Orientation) is None:
        upright = upright.transpose(_TRANSPOSE[camera])
    return to_rgb(upright)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation the image is shown with: its own tag, else (a RAW preview) its RAW file's."""
    # Image.getexif reads the metadata already parsed from the header (PNG's own getexif would decode)
    tag = Image.Image.getexif(img).get(ExifTags.Base.Orientation)
    return img.info.get(_CAMERA_ORIENTATION, 1) if tag is None else tag


@functools.cache
def _heif_registered() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once); False where pillow-heif is not installed.

    Registered for every image, not by suffix: a phone's HEIC saved as .jpg opens too. Thumbnails, depth maps and
    auxiliary images stay unread; the primary image is decoded with libheif's own transformations (rotation,
    mirroring) applied, and pillow-heif resets the EXIF orientation it carries to 1, so nothing turns it twice.
    """
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Camera RAW: the embedded preview


def _raw_preview(path: Path, handle: BinaryIO) -> Image.Image:
    """The JPEG (or bitmap) preview a camera embeds in its RAW file, opened lazily like any image file.

    LibRaw reads the RAW container and copies the largest preview out; the RAW sensor data is never decoded. The
    preview's own EXIF orientation applies, else the RAW file's (LibRaw adds it to previews without EXIF).
    """
    try:
        import rawpy
    except ImportError:
        raise MediaError(path, RAW_MISSING) from None
    try:
        with rawpy.imread(fd_path(handle.fileno())) as raw:
            orientation = _FLIP_TO_EXIF.get(raw.sizes.flip, 1)
            thumb = raw.extract_thumb()
    except rawpy.LibRawError as exc:
        raise _raw_error(path, rawpy, exc) from None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            img = Image.open(io.BytesIO(thumb.data), formats=["JPEG"])  # nothing else is a preview
        except UnidentifiedImageError:
            raise MediaError(path, "the RAW file's embedded preview is not a readable JPEG") from None
    else:
        img = _bitmap_image(path, np.asarray(thumb.data))
    img.info[_CAMERA_ORIENTATION] = orientation
    return img


def _bitmap_image(path: Path, data: np.ndarray) -> Image.Image:
    """An uncompressed preview (H, W, 3) or (H, W) of 8 or 16 bits as a Pillow image."""
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] != 3) or data.dtype not in (np.uint8, np.uint16):
        raise MediaError(path, f"the RAW file's embedded preview has an unusual layout ({data.dtype}, {data.shape})")
    if data.dtype == np.uint16:
        data = (data >> 8).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(data))


def _raw_error(path: Path, rawpy: Any, exc: Exception) -> Exception:
    """The MediaError (or MemoryError) for a LibRaw failure, saying what the user can do about it."""

    def kind(*names: str) -> bool:
        return isinstance(exc, tuple(getattr(rawpy, name) for name in names if hasattr(rawpy, name)))

    message = exc.args[0] if exc.args else ""
    detail = (message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)).strip()
    detail = detail or type(exc).__name__
    if kind("LibRawUnsufficientMemoryError"):
        return MemoryError(detail)
    if kind("LibRawNoThumbnailError"):
        reason = "the RAW file has no embedded preview, which is what vlbatch reads of a RAW file"
    elif kind("LibRawUnsupportedThumbnailError"):
        reason = "the RAW file's embedded preview is in a format LibRaw cannot extract"
    elif kind("LibRawFileUnsupportedError"):
        return MediaError(path, "not a RAW file LibRaw can read (a camera it does not know, or a corrupt file)")
    elif kind("LibRawTooBigError", "LibRawMemPoolOverflowError"):
        return MediaError(path, f"the RAW file is too large for LibRaw to read safely ({detail})")
    elif kind("LibRawIOError", "LibRawDataError"):
        return MediaError(path, f"corrupt or truncated RAW data ({detail}); copy the file from the camera again")
    else:
        return MediaError(path, f"cannot read the RAW file ({type(exc).__name__}: {detail})")
    return MediaError(path, f"{reason}; convert it to JPEG or TIFF first (darktable, RawTherapee, the camera's app)")


def _png_metadata_after_pixels(fp: BinaryIO) -> bool:
    """Whether a PNG has text or EXIF chunks after its first image data chunk (read by walking chunk headers)."""
    start = fp.tell()
    try:
        fp.seek(8)  # the signature
        seen_pixels = False
        for _ in range(_PNG_MAX_CHUNKS):
            header = fp.read(8)
            if len(header) < 8:
                return False
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                return False
            if kind in (b"IDAT", b"fdAT"):
                seen_pixels = True
            elif seen_pixels and kind in _PNG_METADATA:
                return True
            fp.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
        return True  # too many chunks to walk: decode, to be sure
    finally:
        fp.seek(start)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited over white, 16-bit scaled down, palettes and CMYK converted."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _over_white(img)
    return img.convert("RGB")


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    values = np.asarray(img)
    if img.mode == "I":
        values = np.clip(values, 0, 65535)
    eight = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(eight, "L").convert("RGB")


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Tiling (InternVL dynamic_preprocess)


@functools.lru_cache(maxsize=64)
def _target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    # Built as a set and then sorted by tile count, exactly like the reference: the order of grids with the same
    # tile count comes from set iteration, which is deterministic for int tuples and decides some ties.
    ratios = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return sorted(ratios, key=lambda r: r[0] * r[1])


def closest_tile_grid(
    width: int, height: int, max_tiles: int, min_tiles: int = 1, image_size: int = 448
) -> tuple[int, int]:
    """The (cols, rows) grid InternVL picks for an image: closest aspect ratio, ties to more tiles if large enough."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    aspect_ratio = width / height
    area = width * height
    best_ratio_diff = float("inf")
    best = (1, 1)
    for ratio in _target_ratios(min_tiles, max_tiles):
        target_aspect = ratio[0] / ratio[1]
        diff = abs(aspect_ratio - target_aspect)
        if diff < best_ratio_diff:
            best_ratio_diff = diff
            best = ratio
        elif diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def tile_count(width: int, height: int, max_tiles: int, image_size: int = 448, use_thumbnail: bool = True) -> int:
    """How many tiles tile_image() makes of a width x height image, without resizing anything."""
    cols, rows = closest_tile_grid(width, height, max_tiles, 1, image_size)
    return cols * rows + (1 if use_thumbnail and cols * rows != 1 else 0)


def choose_tile_cap(sizes: Sequence[tuple[int, int]], settings: MediaSettings, max_total_tiles: int) -> int:
    """The largest per-image tile cap (up to settings.max_tiles) whose tiles for all images fit max_total_tiles.

    1 when even that does not fit (the caller then reports the prompt as too long).
    """
    for cap in range(settings.max_tiles, 1, -1):
        total = sum(tile_count(w, h, cap, settings.image_size, settings.use_thumbnail) for w, h in sizes)
        if total <= max_total_tiles:
            return cap
    return 1


def tile_image(
    image: Image.Image, max_tiles: int, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Resize to the chosen grid and cut it into row-major tiles, plus a whole-image thumbnail when tiled."""
    cols, rows = closest_tile_grid(image.width, image.height, max_tiles, 1, image_size)
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        left, top = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(tiles: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 tiles to float32 ``(N, 3, S, S)``, normalised as to_pixel_values() does."""
    unit = tiles.astype(np.float32) / np.float32(255)
    return ((unit - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy()


def to_pixel_values(tiles: Sequence[Image.Image], image_size: int = 448) -> np.ndarray:
    """Tiles to float32 ``(N, 3, S, S)``: RGB / 255, then ImageNet mean and std (torchvision's ToTensor+Normalize)."""
    out = np.empty((len(tiles), 3, image_size, image_size), dtype=np.float32)
    for k, tile in enumerate(tiles):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.Resampling.BICUBIC)
        unit = np.asarray(tile, dtype=np.float32) / np.float32(255)
        out[k] = ((unit - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def preprocess_image(path: Path | str, settings: MediaSettings) -> np.ndarray:
    """An image file to its normalised tiles, ``(tiles, 3, S, S)``."""
    tiles = tile_image(load_image(path), settings.max_tiles, settings.image_size, settings.use_thumbnail)
    return to_pixel_values(tiles, settings.image_size)


# ---------------------------------------------------------------------------------------------------------------
# Video (InternVL load_video with max_num=1: one tile per frame)


def frame_indices(num_frames_in_clip: int, segments: int) -> np.ndarray:
    """Midpoints of ``segments`` equal segments of the clip (InternVL's ``get_index`` with no time bound)."""
    if segments < 1:
        raise ValueError(f"segments must be positive, got {segments}")
    if num_frames_in_clip < 1:
        raise ValueError(f"the clip has no frames ({num_frames_in_clip})")
    max_frame, first_idx = num_frames_in_clip - 1, 0
    start, end = -100000, 100000  # bound=None in the reference; with fps >= 1e-5 these span the whole clip
    start_idx = max(first_idx, start)
    end_idx = min(end, max_frame)
    seg_size = float(end_idx - start_idx) / segments
    indices = np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(segments)])
    return np.clip(indices, 0, max_frame).astype(np.int64)


def load_video_frames(path: Path | str, segments: int, decoder: str | None = None) -> list[Image.Image]:
    """``segments`` RGB frames sampled at segment midpoints; decord if importable, else PyAV (or the one forced)."""
    path = Path(path)
    if decoder is not None and decoder not in DECODERS:
        raise ValueError(f"unknown video decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    with open_media(path) as handle:  # decoders read exactly this regular file, through its descriptor
        source = fd_path(handle.fileno())
        if decoder is not None:
            return _DECODE[decoder](path, source, segments, _import_decoder(path, decoder))
        try:
            module = _import_decoder(path, "decord")
        except MediaError:
            return _read_pyav(path, source, segments, _import_decoder(path, "pyav"))
        try:
            return _read_decord(path, source, segments, module)
        except MediaError as decord_error:
            try:
                pyav = _import_decoder(path, "pyav")
            except MediaError:
                raise decord_error from None
            return _read_pyav(path, source, segments, pyav)


def preprocess_video(path: Path | str, settings: MediaSettings) -> np.ndarray:
    """A video file to ``(frames, 3, S, S)``: each sampled frame one tile, no dynamic tiling."""
    frames = load_video_frames(path, settings.video_frames, settings.decoder)
    tiles = [tile_image(frame, 1, settings.image_size, use_thumbnail=False)[0] for frame in frames]
    return to_pixel_values(tiles, settings.image_size)


def _import_decoder(path: Path, name: str) -> Any:
    try:
        if name == "decord":
            import decord

            return decord
        import av

        return av
    except ImportError as exc:
        package = "decord" if name == "decord" else "av"
        raise MediaError(path, f"video decoder {name} is not installed (pip install {package})") from exc


def _read_decord(path: Path, source: str, segments: int, decord: Any) -> list[Image.Image]:
    try:
        reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
        count = len(reader)
        if count < 1:
            raise MediaError(path, "the video has no frames")
        batch = reader.get_batch(frame_indices(count, segments).tolist()).asnumpy()
    except (MediaError, MemoryError):
        raise
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        raise MediaError(path, f"cannot decode the video with decord ({_first_line(exc)})") from exc
    return [Image.fromarray(frame).convert("RGB") for frame in batch]


def _read_pyav(path: Path, source: str, segments: int, av: Any) -> list[Image.Image]:
    try:
        count = _count_pyav_packets(path, source, av)
        if count < 1:
            raise MediaError(path, "the video has no frames")
        frames, decoded = _decode_pyav(source, av, frame_indices(count, segments))
        if frames is None:  # fewer frames decode than packets: sample again over what really decodes
            if decoded < 1:
                raise MediaError(path, "no frame of the video could be decoded")
            frames, _ = _decode_pyav(source, av, frame_indices(decoded, segments))
        if frames is None:
            raise MediaError(path, "the video decodes inconsistently (frame count changed between passes)")
    except (MediaError, MemoryError):
        raise
    except Exception as exc:  # av.error.FFmpegError and friends
        raise MediaError(path, f"cannot decode the video with PyAV ({_first_line(exc)})") from exc
    return frames


def _count_pyav_packets(path: Path, source: str, av: Any) -> int:
    """Frames in the first video stream, counted by demuxing (stream.frames is often 0 or approximate)."""
    with av.open(source) as container:
        if not container.streams.video:
            raise MediaError(path, "the file has no video stream")
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _decode_pyav(source: str, av: Any, indices: np.ndarray) -> tuple[list[Image.Image] | None, int]:
    """Decode frames in order up to the last wanted one, keeping RGB copies of those at ``indices``.

    Returns the frames in ``indices`` order (None when the stream ended first) and how many frames were decoded.
    """
    wanted = {int(i) for i in indices}
    last = max(wanted)
    kept: dict[int, Image.Image] = {}
    decoded = 0
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            decoded = position + 1
            if position in wanted:
                kept[position] = Image.fromarray(frame.to_ndarray(format="rgb24"))
            if position == last:
                return [kept[int(i)] for i in indices], decoded
    return None, decoded


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without decord's ``[hh:mm:ss] file.cc:123:`` prefix."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else ""
    return text or type(exc).__name__


_DECODE = {"decord": _read_decord, "pyav": _read_pyav}
