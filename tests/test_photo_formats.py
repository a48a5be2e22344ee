"""The photos people have: HEIC/HEIF from phones (pillow-heif) and camera RAW files (their embedded JPEG preview, read
with rawpy/LibRaw), answered like JPEGs: upright, through the decoding child, with the pixel cap and previews."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from spool_env import SpoolEnv
from synthetic import synthetic_image, write_dng, write_heic

from batch.errors import MediaError
from batch.infer.decode import InProcessDecoder, IsolatedDecoder
from batch.infer.media import RAW_MISSING, image_size, load_image, media_kind, normalize_tiles, tile_count
from batch.infer.pipeline import Pipeline
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.jobfile import parse_job
from batch.service.web.thumbnails import Thumbnails

RED, GRAY = (255, 0, 0), (128, 128, 128)
ORIENTATION = 0x0112
REPO = Path(__file__).resolve().parents[1]


def marked(width: int = 60, height: int = 40) -> Image.Image:
    """Gray, with a red square in the stored top-left corner: where it lands shows how the picture was turned."""
    image = Image.new("RGB", (width, height), GRAY)
    image.paste(RED, (0, 0, width // 6, height // 4))
    return image


# (EXIF orientation, upright size, a point inside the red corner once upright): as tests/test_media.py checks JPEGs
TURNS = [(1, (60, 40), (5, 5)), (3, (60, 40), (54, 34)), (6, (40, 60), (34, 5)), (8, (40, 60), (5, 54))]


def is_red(pixel: tuple[int, ...]) -> bool:
    return pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def assert_upright(image: Image.Image, size: tuple[int, int], red_at: tuple[int, int]) -> None:
    assert image.mode == "RGB" and image.size == size
    assert is_red(image.getpixel(red_at)), image.getpixel(red_at)
    corners = [(5, 5), (size[0] - 6, 5), (5, size[1] - 6), (size[0] - 6, size[1] - 6)]
    assert sum(is_red(image.getpixel(point)) for point in corners) == 1  # the red corner, and only it


def zero_mdat(path: Path) -> Path:
    """The HEIF's coded picture (its `mdat` box) overwritten: the header still reads, the pixels no longer decode."""
    data, at = bytearray(path.read_bytes()), 0
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"mdat":
            data[at + 8 : at + size] = b"\xff" * (size - 8)
        at += size
    broken = path.with_name("broken-" + path.name)
    broken.write_bytes(bytes(data))
    return broken


# ---------------------------------------------------------------------------------------------------------------
# HEIC / HEIF


def test_heic_is_recognised_by_suffix() -> None:
    for name in ("IMG_0001.HEIC", "a.heic", "b.heif", "canon.HIF"):
        assert media_kind(Path(name)) == "image"


@pytest.mark.parametrize(("orientation", "size", "red_at"), TURNS)
def test_heic_is_decoded_upright(
    tmp_path: Path, orientation: int, size: tuple[int, int], red_at: tuple[int, int]
) -> None:
    path = write_heic(tmp_path / f"phone{orientation}.heic", marked(), orientation)
    assert pillow_heif.open_heif(path).mimetype == "image/heic"  # a real HEIC (HEVC in HEIF)
    assert_upright(load_image(path), size, red_at)
    assert image_size(path) == size  # from the header, turned as the decode turns it


def test_a_heic_named_jpg_is_read_by_its_content(tmp_path: Path) -> None:
    path = write_heic(tmp_path / "exported.heic", marked(), 6)
    renamed = tmp_path / "exported.jpg"
    os.rename(path, renamed)
    assert_upright(load_image(renamed), (40, 60), (34, 5))


def test_the_pixel_cap_refuses_a_heic_from_its_header(tmp_path: Path) -> None:
    path = write_heic(tmp_path / "large.heic", synthetic_image(640, 480, 1))
    broken = zero_mdat(path)  # decoding it fails; reading its header does not
    decoder = IsolatedDecoder()  # the worker's decoding child, with its limits
    try:
        settings = MediaSettings(max_image_pixels=640 * 480)
        assert decoder.probe([broken], settings) == ((640, 480),)  # the header alone: no pixel decoded
        with pytest.raises(MediaError, match=r"broken-large\.heic: corrupt or truncated image data"):
            decoder.decode([broken], "image", settings, 64)
        capped = MediaSettings(max_image_pixels=640 * 480 - 1)
        over = r"large\.heic: image is 640x480 \(0\.3 Mpx\), over the 0\.307199 Mpx limit \(media\.max_image_pixels\)"
        for target in (path, broken):  # refused before decoding: the broken pixels are never reached
            with pytest.raises(MediaError, match=over):
                decoder.probe([target], capped)
            with pytest.raises(MediaError, match=over):
                decoder.decode([target], "image", capped, 64)
        assert decoder.decode([path], "image", settings, 64).tiles.shape[1:] == (448, 448, 3)
    finally:
        decoder.close()


def test_without_pillow_heif_a_heic_names_what_to_install(tmp_path: Path) -> None:
    path = write_heic(tmp_path / "phone.heic", marked())
    script = (
        "import sys; sys.modules['pillow_heif'] = None\n"  # `import pillow_heif` now raises ImportError
        "from batch.errors import MediaError\nfrom batch.infer.media import load_image\n"
        f"try:\n    load_image({str(path)!r})\nexcept MediaError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and not done.stderr, done.stderr
    expected = "HEIC/HEIF images need pillow-heif, a dependency of vlbatch missing here: pip install 'pillow-heif>=1.8'"
    assert done.stdout.strip() == f"{path}: {expected}"


# ---------------------------------------------------------------------------------------------------------------
# Camera RAW


def test_raw_files_are_recognised_by_suffix() -> None:
    for name in ("a.dng", "IMG_1.CR2", "b.cr3", "DSC_1.NEF", "c.arw", "d.orf", "e.rw2", "f.raf", "g.pef", "h.srw"):
        assert media_kind(Path(name)) == "image"


@pytest.mark.parametrize(("orientation", "size", "red_at"), TURNS)
def test_a_dng_is_answered_from_its_embedded_preview_upright(
    tmp_path: Path, orientation: int, size: tuple[int, int], red_at: tuple[int, int]
) -> None:
    path = write_dng(tmp_path / f"camera{orientation}.dng", marked(), orientation)
    assert_upright(load_image(path), size, red_at)
    assert image_size(path) == size
    assert load_image(path, fit=30).size == (size[0] // 2, size[1] // 2)  # a JPEG preview decodes at a reduced scale


def test_a_preview_without_its_own_orientation_takes_the_raw_files(tmp_path: Path) -> None:
    rawpy = pytest.importorskip("rawpy")
    exif = Image.Exif()
    exif[0x010F] = "Vlbatch"  # EXIF without an orientation: LibRaw leaves such a preview's EXIF as it is
    path = write_dng(tmp_path / "turned.dng", marked(), 6, preview_exif=exif)
    with rawpy.imread(str(path)) as raw:
        preview = Image.open(io.BytesIO(raw.extract_thumb().data))
        assert raw.sizes.flip == 6 and ORIENTATION not in preview.getexif()
    assert_upright(load_image(path), (40, 60), (34, 5))
    assert image_size(path) == (40, 60)


def test_unreadable_raw_files_fail_with_a_reason(tmp_path: Path) -> None:
    pytest.importorskip("rawpy")
    (tmp_path / "notes.nef").write_text("not a raw file")
    whole = write_dng(tmp_path / "whole.dng", marked())
    (tmp_path / "cut.dng").write_bytes(whole.read_bytes()[:2000])
    data = bytearray(whole.read_bytes())
    start = data.index(b"\xff\xd8\xff")
    data[start : start + 200] = bytes(200)  # the preview's JPEG header wiped
    (tmp_path / "blank.dng").write_bytes(bytes(data))
    expected = {
        "notes.nef": "corrupt or truncated RAW data",
        "cut.dng": "not a RAW file LibRaw can read",
        "blank.dng": "embedded preview is in a format LibRaw cannot extract; convert it to JPEG or TIFF first",
    }
    for name, reason in expected.items():
        for read in (load_image, image_size):
            with pytest.raises(MediaError) as info:
                read(tmp_path / name)
            assert info.value.path == str(tmp_path / name) and reason in info.value.reason, info.value.reason


def test_without_rawpy_a_raw_file_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dng(tmp_path / "camera.dng", marked())
    monkeypatch.setitem(sys.modules, "rawpy", None)  # `import rawpy` now raises ImportError
    for read in (load_image, image_size):
        with pytest.raises(MediaError) as info:
            read(path)
        assert str(info.value) == f"{path}: {RAW_MISSING}"
        assert "pip install 'vlbatch[raw]'" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Through the pipeline, into jobs, and as previews


@pytest.fixture(scope="module")
def camera_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a phone and a camera leave: a HEIC, a DNG, a JPEG, and the camera's own clutter."""
    card = tmp_path_factory.mktemp("DCIM")
    write_heic(card / "IMG_0001.HEIC", synthetic_image(320, 240, 1), 6)
    write_dng(card / "DSC_0002.DNG", synthetic_image(300, 200, 2), 8)
    synthetic_image(200, 150, 3).save(card / "DSC_0003.JPG")
    (card / "DSC_0003.XMP").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    return card


def test_heic_and_dng_are_answered_through_the_pipeline(tiny_onnx: Path, camera_card: Path) -> None:
    settings = MediaSettings(max_tiles=2)
    pipeline = Pipeline.open(tiny_onnx, media=settings, decoder=IsolatedDecoder())  # decoded in the child
    try:
        for name, upright in (("IMG_0001.HEIC", (240, 320)), ("DSC_0002.DNG", (200, 300))):
            path = camera_card / name
            assert image_size(path) == upright  # portrait: both were stored sideways
            request = pipeline.prepare("Describe the photo.", [path])
            budget = pipeline.prompts.tile_budget("Describe the photo.", "image", 1)
            here = InProcessDecoder().decode([path], "image", settings, budget)
            assert here.per_item == (tile_count(*upright, 2),)
            np.testing.assert_allclose(request.pixels, normalize_tiles(here.tiles), atol=1e-6)  # the same pixels
            result = pipeline.answer(request, GenerationSettings(max_new_tokens=4, ignore_eos=True))
            assert result.output_tokens == 4 and result.text
    finally:
        pipeline.close()


def test_a_folder_job_over_a_camera_card_takes_every_photo(camera_card: Path, tmp_path: Path) -> None:
    job = tmp_path / "card.yaml"
    job.write_text(f"prompt: Caption.\ninputs: {camera_card}\n")
    parsed = parse_job(job, allowed_roots=[camera_card], generation=GenerationSettings(), media=MediaSettings())
    assert [p.name for p in parsed.media] == ["DSC_0002.DNG", "DSC_0003.JPG", "IMG_0001.HEIC"]


def test_previews_of_heic_and_raw_files(camera_card: Path, tmp_path: Path) -> None:
    thumbs = Thumbnails([camera_card], tmp_path / "cache", MediaSettings(), edge=100, decoders=1)
    try:
        for name, size in (("IMG_0001.HEIC", (75, 100)), ("DSC_0002.DNG", (67, 100))):
            real = thumbs.allowed(str(camera_card / name))
            assert real is not None
            preview = thumbs.preview(real)
            assert preview.error is None and preview.file is not None
            with Image.open(preview.file) as jpeg:
                assert jpeg.format == "JPEG" and jpeg.size == size  # upright (portrait), scaled to the box
                expected = load_image(camera_card / name).resize(size, Image.Resampling.BICUBIC)
                diff = np.abs(np.asarray(jpeg.convert("RGB"), np.int16) - np.asarray(expected, np.int16))
                assert diff.mean() < 12  # the same picture (JPEG and scaling differ a little)
    finally:
        thumbs.close()


@pytest.mark.slow
def test_without_the_raw_reader_a_camera_card_fails_per_file_with_the_reason(tiny_onnx: Path, tmp_path: Path) -> None:
    """A real `vlbatch run` whose decoding child cannot import rawpy: the RAW files fail with the reason, the rest
    of the card is answered, nothing crashes and no traceback is recorded."""
    env = SpoolEnv(tmp_path, tiny_onnx)
    env.write_config()
    card = env.media / "card"
    card.mkdir(parents=True)
    write_heic(card / "IMG_0001.HEIC", synthetic_image(160, 120, 1))
    write_dng(card / "DSC_0002.DNG", synthetic_image(160, 120, 2))
    write_dng(card / "DSC_0004.NEF", synthetic_image(160, 120, 4))  # any RAW suffix goes the same way
    synthetic_image(160, 120, 3).save(card / "DSC_0003.JPG")
    hidden = tmp_path / "no-rawpy"
    (hidden / "rawpy").mkdir(parents=True)
    (hidden / "rawpy" / "__init__.py").write_text("raise ImportError('rawpy is hidden by this test')\n")
    env.drop("card.yaml", "prompt: Caption.\ninputs: ../../media/card/\n")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(env.cli("run"), capture_output=True, text=True, timeout=300, env=environ)
    assert done.returncode == 1, done.stderr  # a job with failures
    assert "Traceback" not in done.stderr
    rows = {
        Path(json.loads(r["media_paths"])[0]).name: r
        for r in env.db().query("select media_paths, answer, error from results where job_id = 'card'")
    }
    assert set(rows) == {"IMG_0001.HEIC", "DSC_0002.DNG", "DSC_0004.NEF", "DSC_0003.JPG"}
    for name in ("IMG_0001.HEIC", "DSC_0003.JPG"):
        assert rows[name]["answer"] and rows[name]["error"] is None
    for name in ("DSC_0002.DNG", "DSC_0004.NEF"):
        assert rows[name]["answer"] is None
        assert rows[name]["error"] == f"{card.resolve() / name}: {RAW_MISSING}"
    job = env.job("card")
    assert job["state"] == "failed" and job["traceback"] is None
    reason = (env.jobs / "failed" / "card.yaml.reason.txt").read_text()
    assert "DSC_0002.DNG" in reason and "pip install 'vlbatch[raw]'" in reason
