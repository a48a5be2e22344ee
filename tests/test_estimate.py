"""`vlbatch estimate`: units, tiles and prompt tokens counted as the pipeline and the worker will meet them, and
the wall time from the rates that apply (a benchmark report, the stored answers, a calibration, the built-in
figures for InternVL3-2B's shape only), decode priced by the context it runs at."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile
from spool_env import SpoolEnv
from synthetic import synthetic_image, write_video

from batch.cli import main
from batch.errors import PromptTooLongError
from batch.infer.media import image_size, load_image, tile_count
from batch.infer.pipeline import Pipeline
from batch.model.checkpoint import read_config
from batch.model.export.exporter import export
from batch.model.tinymodel import PRESETS
from batch.service.reports import calibrate, planning
from batch.service.reports import estimate as planner
from batch.service.reports.calibrate import Calibration, DecodeSample, PrefillSample
from batch.service.reports.estimate import (
    REFERENCE_SHAPE,
    ContextRates,
    architecture,
    duration,
    estimate,
    estimate_dict,
    fit_decode,
)
from batch.service.reports.planning import Rates, rates_from_bench
from batch.service.spool.jobfile import JobRejected, parse_job

DOUBLES = Path(__file__).parent / "doubles"
sys.path.insert(0, str(DOUBLES))
from axmodel_folder import build_axmodel_folder  # noqa: E402

SHAPES = {  # name: (width, height) of images of every aspect the tiler meets
    "square.png": (448, 448),
    "wide.png": (1344, 448),
    "tall.jpg": (300, 700),
    "small.png": (200, 150),
    "panorama.jpg": (2000, 300),
    "photo.jpg": (1600, 1200),
}
HAND_RATES = Rates(100.0, 200.0, 20.0, 50.0, source="hand-made figures", measured=False)


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config()
    return e


@pytest.fixture(autouse=True)
def calibration_cache(tmp_path, monkeypatch) -> Path:
    """No calibration of the caller's is found: the cache is this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "vlbatch" / "calibration"


@pytest.fixture
def tiny_shape_is_reference(monkeypatch):
    """The built-in figures made to hold for the tiny model's shape, as they hold for InternVL3-2B's."""
    monkeypatch.setattr(planner, "REFERENCE_SHAPE", architecture(PRESETS["tiny"]))


@pytest.fixture
def no_builtin_cpu_rates(monkeypatch, tiny_shape_is_reference):
    """The built-in CPU figures as they are before any are filled in: none."""
    monkeypatch.setattr(planning, "CPU_REFERENCE_RATES", {})


@pytest.fixture
def hand_cpu_rates(monkeypatch, tiny_shape_is_reference):
    """Built-in CPU figures for fp32 exports of the tiny model's shape, known by hand."""
    monkeypatch.setattr(planning, "CPU_REFERENCE_RATES", {"fp32": HAND_RATES})


@pytest.fixture(scope="module")
def pipeline(tiny_onnx: Path):
    p = Pipeline.open(tiny_onnx)
    yield p
    p.close()


@pytest.fixture(scope="module")
def small_onnx(tiny_hf: Path, tmp_path_factory) -> Path:
    """The tiny model exported to prefill at most 1,099 tokens: about three tiles besides the text."""
    out = tmp_path_factory.mktemp("small_onnx")
    export(tiny_hf, out, kv_capacity=1100)
    return out


def cli(*args: object, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


def photos(env: SpoolEnv, folder: str = "photos") -> Path:
    """Images of every aspect in media/<folder>, one of them a JPEG stored on its side (EXIF orientation 6)."""
    for seed, (name, size) in enumerate(SHAPES.items()):
        env.image(f"{folder}/{name}", seed, size)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 700x300, shown 300x700
    synthetic_image(700, 300, seed=9).save(env.media / folder / "turned.jpg", exif=exif)
    return env.media / folder


def plan(env: SpoolEnv, name: str, text: str) -> Path:
    """A job file outside the spool, as a user writes it before submitting it."""
    path = env.root / "plans" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def clip(env: SpoolEnv, name: str = "clip.mp4") -> Path:
    env.media.mkdir(parents=True, exist_ok=True)
    return write_video(env.media / name, (np.asarray(synthetic_image(96, 64, seed=i)) for i in range(20)))


def units_of(result, job: int = 0):
    return result.jobs[job].units


# ---------------------------------------------------------------------------------------------------------------
# Counting as the pipeline counts


def test_tiles_and_prompt_tokens_are_what_the_pipeline_makes(env, pipeline, hand_cpu_rates):
    photos(env)
    clip(env)
    job_file = plan(env, "mixed.yaml", "prompt: Describe it.\ninputs: [../media/photos/, ../media/clip.mp4]\n")
    text_file = plan(env, "text.yaml", "prompt: What is the capital of France?\n")
    result = estimate(env.config(), [job_file, text_file])
    units = units_of(result)
    assert len(units) == len(SHAPES) + 2 and all(u.status == "answer" for u in units)
    job = result.jobs[0].job
    for unit in units:
        request = pipeline.prepare(job.prompt, unit.files, job.media_settings)
        tiles = request.pixels.shape[0]
        assert (unit.tiles, unit.prompt_tokens) == (tiles, len(request.ids)), unit.files
    turned = next(u for u in units if u.files[0].name == "turned.jpg")
    assert turned.tiles == tile_count(300, 700, 12)  # upright, as the model sees it
    video = next(u for u in units if u.kind == "video")
    assert video.tiles == 8  # media.video_frames frames of one tile each
    (text_unit,) = units_of(result, 1)
    assert text_unit.kind is None and text_unit.tiles == 0
    assert text_unit.prompt_tokens == len(pipeline.prepare("What is the capital of France?").ids)
    figures = estimate_dict(result)["jobs"][0]
    assert figures["tiles"] == sum(u.tiles for u in units) and figures["images"] == len(SHAPES) + 1
    assert not env.db_path.exists()  # an estimate never creates the database


def test_a_video_unit_takes_the_jobs_frame_count(env, pipeline, hand_cpu_rates):
    video = clip(env)
    job_file = plan(env, "clip.yaml", "prompt: What happens?\ninputs: ../media/clip.mp4\nvideo_frames: 5\n")
    result = estimate(env.config(), [job_file])
    (unit,) = units_of(result)
    request = pipeline.prepare("What happens?", [video], result.jobs[0].job.media_settings)
    assert (unit.kind, unit.tiles, unit.prompt_tokens) == ("video", 5, len(request.ids))
    assert request.pixels.shape[0] == 5


def test_max_tiles_lowered_to_fit_a_small_capacity_as_prepare_lowers_it(env, small_onnx, hand_cpu_rates):
    env.model = small_onnx
    env.write_config()
    photos(env)
    clip(env)
    each = plan(env, "each.yaml", "prompt: Describe it.\ninputs: ../media/photos/\n")
    pair_text = "prompt: Compare.\ninputs: [../media/photos/wide.png, ../media/photos/photo.jpg]\nmode: together\n"
    pair = plan(env, "pair.yaml", pair_text)
    video = plan(env, "video.yaml", "prompt: What happens?\ninputs: ../media/clip.mp4\n")
    result = estimate(env.config(), [each, pair, video])
    assert result.model.capacity == 1099
    small = Pipeline.open(small_onnx)
    try:
        lowered = 0
        for job_estimate in result.jobs[:2]:
            job = job_estimate.job
            for unit in job_estimate.units:
                request = small.prepare(job.prompt, unit.files, job.media_settings)
                assert (unit.tiles, unit.prompt_tokens) == (request.pixels.shape[0], len(request.ids)), unit.files
                assert unit.prompt_tokens <= 1099
                full = sum(tile_count(*image_size(p), 12) for p in unit.files)
                lowered += unit.tiles < full
        assert lowered >= 2  # the wide image alone, and the pair together, had to take fewer tiles
        (too_long,) = result.jobs[2].units
        assert too_long.status == "too_long"
        with pytest.raises(PromptTooLongError) as err:
            small.prepare("What happens?", too_long.files, result.jobs[2].job.media_settings)
        assert too_long.reason == str(err.value)  # the worker's own reason
    finally:
        small.close()
    figures = estimate_dict(result)["jobs"][2]
    assert (figures["too_long"], figures["to_answer"], figures["seconds"]["total"]) == (1, 0, 0)


def test_unreadable_images_are_counted_with_their_reason(env, hand_cpu_rates):
    env.write_config(media={"max_image_pixels": 500_000})
    env.image("mixed/good.png", 1)
    env.image("mixed/huge.png", 2, (1000, 600))  # 0.6 Mpx, over the limit: refused from its header
    (env.media / "mixed" / "notes.jpg").write_text("not a picture at all")
    job_file = plan(env, "mixed.yaml", "prompt: Describe it.\ninputs: ../media/mixed/\n")
    result = cli("--config", env.config_path, "estimate", job_file, "--json")
    figures = json.loads(result.stdout)["jobs"][0]
    assert (figures["units"], figures["unreadable"], figures["to_answer"]) == (3, 2, 1)
    reasons = {Path(p["files"][0]).name: p["reason"] for p in figures["problems"]}
    assert (
        "not a readable image" in reasons["notes.jpg"]
        and str(env.media / "mixed" / "notes.jpg") in reasons["notes.jpg"]
    )
    assert "over the 0.5 Mpx limit" in reasons["huge.png"]
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    assert "unreadable       2" in text and "notes.jpg: not a readable image" in text


def test_image_sizes_come_from_the_header_with_orientation_as_load_image_turns_it(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 8
    picture = synthetic_image(120, 40, seed=3)
    picture.save(tmp_path / "turned.jpg", exif=exif)
    picture.save(tmp_path / "turned.png", exif=exif)
    (tmp_path / "trailing.png").write_bytes(_exif_after_pixels((tmp_path / "turned.png").read_bytes()))
    picture.save(tmp_path / "plain.png")
    expected = {name: load_image(tmp_path / name).size for name in ("turned.jpg", "turned.png", "trailing.png")}
    assert set(expected.values()) == {(40, 120)}
    with monkeypatch.context() as m:  # header only: decoding would fail here
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"{self.filename or 'an image'} was decoded"))
        for name in ("turned.jpg", "turned.png", "plain.png"):
            assert image_size(tmp_path / name) == expected.get(name, (120, 40)), name
    assert image_size(tmp_path / "trailing.png") == (40, 120)  # metadata after the pixels: read with them


def _exif_after_pixels(png: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved after the image data (where Pillow reads it only on decoding)."""
    chunks, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append(png[pos : pos + 12 + length])
        pos += 12 + length
    exif = next(c for c in chunks if c[4:8] == b"eXIf")
    chunks.remove(exif)
    last_data = max(i for i, c in enumerate(chunks) if c[4:8] == b"IDAT")
    chunks.insert(last_data + 1, exif)
    assert zlib.crc32(exif[4:-4]) == struct.unpack(">I", exif[-4:])[0]
    return png[:8] + b"".join(chunks)


# ---------------------------------------------------------------------------------------------------------------
# Job files


def test_a_bad_job_file_is_named_and_the_good_one_beside_it_still_estimated(env, hand_cpu_rates, tmp_path):
    env.image("one.png", 1)
    (tmp_path / "elsewhere").mkdir()
    synthetic_image(64, 64).save(tmp_path / "elsewhere" / "x.png")
    typo = plan(env, "typo.yaml", "promt: Describe.\ninputs: ../media/one.png\n")
    outside = plan(env, "outside.yaml", "prompt: Describe.\ninputs: ../elsewhere/x.png\n")
    good = plan(env, "good.yaml", "prompt: Describe.\ninputs: ../media/one.png\n")
    beside = plan(env, "beside.yaml", "prompt: Describe.\ninputs: beside.png\n")
    synthetic_image(64, 64).save(beside.parent / "beside.png")  # fine for parse_job, but not where the worker reads
    missing = env.root / "plans" / "missing.yaml"
    result = cli("--config", env.config_path, "estimate", typo, good, missing, outside, beside, code=1)
    config = env.config()
    with pytest.raises(JobRejected) as err:
        parse_job(typo, allowed_roots=config.spool.media_roots, generation=config.generation, media=config.media)
    assert f"vlbatch: error: {err.value}" in result.stderr
    assert f"{missing}: job file not found" in result.stderr
    assert f"{outside}: input " in result.stderr and "outside the allowed media folders" in result.stderr
    assert f"{beside}: input {beside.parent / 'beside.png'} is outside the allowed media folders" in result.stderr
    assert f"{good} (job good, mode each)" in result.stdout and "to answer        1" in result.stdout
    assert "4 rejected" in result.stdout
    as_json = json.loads(cli("--config", env.config_path, "estimate", "--json", typo, good, code=1).stdout)
    assert [j["id"] for j in as_json["jobs"]] == ["good"] and as_json["rejected"][0]["file"] == str(typo)


def test_stored_answers_are_reused_and_their_timings_become_the_rates(env):
    for i in range(3):
        env.image(f"batch/{i}.png", i, (320 + 100 * i, 240))
    env.drop("batch.yaml", "prompt: Caption it.\ninputs: ../../media/batch/\n")
    cli("--config", env.config_path, "run")
    job_file = plan(env, "again.yaml", "prompt: Caption it.\ninputs: ../media/batch/\n")
    before = env.db_path.read_bytes()

    report = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    job = report["jobs"][0]
    assert (job["units"], job["reused"], job["to_answer"], job["seconds"]["total"]) == (3, 3, 0, 0)
    rates = report["rates"]
    assert rates["measured"] and f"the last 3 answers of {env.model.name}@" in rates["source"]
    assert str(env.db_path) in rates["source"] and rates["vit_ms_per_tile"] > 0
    answers = [row["output_tokens"] for row in env.db().query("select output_tokens from results")]
    assert job["output_tokens_from"] == "stored answers" and job["output_tokens_answers"] == 3
    assert job["output_tokens_per_answer"] == max(1, round(sum(answers) / 3))

    forced = json.loads(cli("--config", env.config_path, "estimate", "--json", "--force", job_file).stdout)["jobs"][0]
    assert (forced["reused"], forced["to_answer"]) == (0, 3) and forced["seconds"]["total"] > 0

    env.image("batch/3.png", 7)  # a new photo in the folder: only it costs model time
    (env.media / "batch" / "copy.png").write_bytes((env.media / "batch" / "3.png").read_bytes())
    grown = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)["jobs"][0]
    assert (grown["units"], grown["reused"], grown["to_answer"]) == (5, 4, 1)  # the copy reuses the new answer
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    assert "rates   measured: the last 3 answers" in text and "already answered 4 (reused" in text
    assert env.db_path.read_bytes() == before  # read only


def test_an_empty_database_holds_nothing_and_a_damaged_one_is_named(env, hand_cpu_rates):
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    env.db_path.write_bytes(b"")  # created, never migrated
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    assert report["rates"]["source"] == "hand-made figures" and report["total"]["to_answer"] == 1
    env.db_path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    damaged = cli("--config", env.config_path, "estimate", job_file, code=4)
    assert f"{env.db_path}: the database is damaged" in damaged.stderr


def test_rates_from_a_benchmark_report(env, no_builtin_cpu_rates):
    report = {
        "machine": {"cpu": "Test CPU 9000", "cores": 4, "threads": 2},
        "model": "real-shape (InternVL3-2B dimensions), random weights",
        "int4": {
            "vit_ms_per_tile": 300.0,
            "cases": {
                "0 images": {"prompt_tokens": 128, "prefill_ms": 200.0, "decode_ms_per_token": 40.0},
                "1 image": {"prompt_tokens": 384, "prefill_ms": 700.0, "decode_ms_per_token": 44.0},
                "4 images": {"prompt_tokens": 640, "prefill_ms": 1200.0, "decode_ms_per_token": 46.0},
            },
        },
    }
    bench = env.root / "bench.json"
    bench.write_text(json.dumps(report))
    job_file = plan(env, "ask.yaml", "prompt: Tell me a joke.\nmax_new_tokens: 30\n")
    wrong = cli("--config", env.config_path, "estimate", "--rates", bench, job_file, code=1)
    assert "no figures for fp32 weights" in wrong.stderr and "it has int4 (--weights)" in wrong.stderr
    result = json.loads(cli("--config", env.config_path, "estimate", "--rates", bench, "--weights", "int4", "--json",
                            job_file).stdout)  # fmt: skip
    rates = result["rates"]
    assert rates["source"].startswith(f"{bench}: bench/run_bench.py int4") and "Test CPU 9000" in rates["source"]
    assert rates["measured"] and rates["origin"] == "rates file"
    # decode 40, 44, 46 ms/token at 128, 384, 640 positions: fitted as a line, 38.8 ms + 11.7 ms per 1,000 positions
    assert (rates["decode_ms_per_token"], rates["decode_ms_per_1k_context"]) == (
        pytest.approx(38.83, abs=0.01),
        pytest.approx(11.72, abs=0.01),
    )
    prompt = result["jobs"][0]["prompt_tokens"]
    flat = rates_from_bench(report, "int4").unit(0, prompt, 30)
    decode_ms = sum(rates["decode_ms_per_token"] + rates["decode_ms_per_1k_context"] * (prompt + k) / 1e3
                    for k in range(29))  # fmt: skip
    assert result["jobs"][0]["seconds"]["decode"] == pytest.approx(decode_ms / 1e3)
    assert result["total"]["seconds"]["total"] == pytest.approx((flat.vit_ms + flat.prefill_ms + decode_ms) / 1e3)


def test_a_report_with_one_decode_figure_prices_decode_flat_and_says_so(env, no_builtin_cpu_rates):
    report = {
        "machine": {"cpu": "Test CPU 9000", "threads": 2},
        "int4": {
            "vit_ms_per_tile": 300.0,
            "cases": {"0 images": {"prompt_tokens": 128, "prefill_ms": 200.0, "decode_ms_per_token": 40.0}},
        },
    }
    bench = env.root / "bench.json"
    bench.write_text(json.dumps(report))
    job_file = plan(env, "ask.yaml", "prompt: Tell me a joke.\nmax_new_tokens: 30\n")
    args = ("--config", env.config_path, "estimate", "--rates", bench, "--weights", "int4")
    result = json.loads(cli(*args, "--json", job_file).stdout)
    assert (result["rates"]["decode_ms_per_token"], result["rates"]["decode_ms_per_1k_context"]) == (40.0, 0.0)
    assert result["jobs"][0]["seconds"]["decode"] == pytest.approx(40.0 * 29 / 1e3)
    text = cli(*args, job_file).stdout
    assert "decode flat: the report's cases hold decode figures at one context length only" in text


def test_without_any_figures_the_report_counts_and_says_how_to_get_some(env, no_builtin_cpu_rates):
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    result = cli("--config", env.config_path, "estimate", job_file)  # exit 0: counted, not priced
    said = " ".join(result.stdout.split())
    assert "no speed figures for tiny_onnx" in said
    assert "the built-in ones have none for onnxruntime with fp32 weights" in said
    assert "--calibrate" in said and "--rates bench.json" in said
    assert "to answer        1" in result.stdout and "wall time        unknown" in result.stdout
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    assert report["rates"] is None and "--calibrate" in report["no_figures"]
    assert report["jobs"][0]["seconds"] is None and report["total"]["seconds"] is None


def test_builtin_cpu_figures_apply_before_any_answer_is_stored(env, hand_cpu_rates):
    job_file = plan(env, "ask.yaml", "prompt: Hello?\nmax_new_tokens: 11\n")
    result = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    assert result["rates"]["source"] == "hand-made figures" and result["jobs"][0]["output_tokens_per_answer"] == 11
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    assert "rates   computed, not measured here: hand-made figures" in text
    assert "11 per answer (max_new_tokens: an upper bound)" in text


# ---------------------------------------------------------------------------------------------------------------
# The NPU folder


def test_an_axmodel_folder_gets_the_published_npu_figures_computed_not_measured(
    env, tiny_onnx_npu, tiny_hf, tmp_path, axengine, tiny_shape_is_reference
):
    folder = build_axmodel_folder(tiny_onnx_npu, tmp_path / "ax", chunk=128, prefill_chunks=5, kv=1023)
    env.model = folder
    env.write_config()
    config_text = env.config_path.read_text().replace("model:\n", f"model:\n  hf_dir: {tiny_hf}\n")
    env.config_path.write_text(config_text)
    env.image("wide.png", 1, (1344, 448))
    job_file = plan(env, "wide.yaml", "prompt: Describe.\ninputs: ../media/wide.png\n")

    result = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    assert [name for name, _ in axengine.sessions] == ["qwen2_p128_l0_together.axmodel"]  # layer 0 only
    assert not axengine.calls  # and nothing run
    assert result["model"]["backend"] == "axengine" and result["model"]["prefill_capacity"] == 128 * 5
    assert result["model"]["weights"] is None
    rates = result["rates"]
    assert not rates["measured"] and "published AX650N timings" in rates["source"] and rates["whole_chunks"]
    ax = Pipeline.open(folder, hf_dir=tiny_hf)
    try:
        request = ax.prepare("Describe.", [env.media / "wide.png"])
    finally:
        ax.close()
    job = result["jobs"][0]
    assert (job["tiles"], job["prompt_tokens"]) == (request.pixels.shape[0], len(request.ids))
    expected = planning.ax650n_rates().unit(job["tiles"], job["prompt_tokens"], job["output_tokens_per_answer"])
    assert job["seconds"]["total"] == pytest.approx(expected.total_ms / 1e3)
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    assert "rates   computed, not measured here: computed from the published AX650N timings" in text


def test_an_axmodel_folder_calibrates_through_axengine_in_whole_chunks(env, tiny_onnx_npu, tiny_hf, tmp_path, axengine):
    env.model = build_axmodel_folder(tiny_onnx_npu, tmp_path / "ax", chunk=128, prefill_chunks=5, kv=1023)
    env.write_config()
    env.config_path.write_text(env.config_path.read_text().replace("model:\n", f"model:\n  hf_dir: {tiny_hf}\n"))
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    assert json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)["rates"] is None
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", "--calibrate", job_file).stdout)
    assert axengine.calls  # the model ran, on the NPU runtime
    assert report["rates"]["origin"] == "calibration" and report["rates"]["whole_chunks"] is True
    assert report["calibration"]["machine"]["backend"] == "axengine"
    assert report["calibration"]["machine"]["threads"] is None and report["jobs"][0]["seconds"]["total"] > 0


def test_a_published_axmodel_folder_is_estimated_without_axengine(env, tiny_onnx_npu, tiny_hf, tmp_path, monkeypatch):
    built = build_axmodel_folder(tiny_onnx_npu, tmp_path / "ax", chunk=128, prefill_chunks=5, kv=1023)
    folder = shutil.move(built, tmp_path / "ax" / "InternVL3-2B_axmodel_chunk_128")
    monkeypatch.setitem(sys.modules, "axengine", None)  # as on a PC without the NPU runtime
    env.model = Path(folder)
    env.write_config()
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    result = cli("--config", env.config_path, "estimate", "--hf-dir", tiny_hf, job_file)
    assert "prompts up to 1,152 tokens (that of the published *chunk_128 folders" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic and output


def test_the_time_is_the_rates_cost_model_by_hand():
    # 5 tiles, 384 prompt tokens (3 chunks of 128), 11 output tokens (10 decode steps after the first)
    unit = HAND_RATES.unit(5, 384, 11)
    assert unit.vit_ms == 5 * 100.0
    assert unit.prefill_ms == 200.0 * 3 + 20.0 * 3 * 2 / 2
    assert unit.decode_ms == 50.0 * 10
    assert unit.total_ms == 500 + 660 + 500
    npu = Rates(100.0, 200.0, 20.0, 50.0, source="hand", whole_chunks=True)
    assert npu.unit(0, 300, 1).prefill_ms == 660  # a started chunk costs a whole one; one output token: no decode
    assert npu.unit(0, 300, 1).decode_ms == 0


def test_each_job_sums_its_units_at_the_rates(env, hand_cpu_rates, monkeypatch):
    monkeypatch.setenv("VLBATCH_MODEL_BATCH", "1")  # one answer at a time: decode is the plain sum
    photos(env)
    job_file = plan(env, "photos.yaml", "prompt: Describe it.\ninputs: ../media/photos/\nmax_new_tokens: 21\n")
    result = estimate(env.config(), [job_file])
    units = units_of(result)
    expected_ms = sum(u.tiles * 100.0 for u in units)
    expected_ms += sum(HAND_RATES.prefill_ms(u.prompt_tokens) for u in units) + len(units) * 50.0 * 20
    figures = estimate_dict(result)["jobs"][0]
    assert figures["seconds"]["total"] == pytest.approx(expected_ms / 1e3)
    assert figures["seconds_per_unit"] == pytest.approx(expected_ms / 1e3 / len(units))
    assert figures["units_per_hour"] == pytest.approx(3600 / (expected_ms / 1e3 / len(units)))


@pytest.mark.parametrize(("batch", "speedup"), [("1", 1.0), ("2", 1.5), ("3", 2.0), ("8", 2.5)])
def test_answers_decoded_together_cost_one_step_for_all(env, tiny_shape_is_reference, monkeypatch, batch, speedup):
    rates = Rates(100.0, 200.0, 20.0, 50.0, "hand", measured=False, batch_speedup=((2, 1.5), (4, 2.5)))
    monkeypatch.setattr(planning, "CPU_REFERENCE_RATES", {"fp32": rates})
    monkeypatch.setenv("VLBATCH_MODEL_BATCH", batch)
    photos(env)
    job_file = plan(env, "photos.yaml", "prompt: Describe it.\ninputs: ../media/photos/\nmax_new_tokens: 21\n")
    result = estimate(env.config(), [job_file])
    units = units_of(result)
    assert result.model.batch == int(batch) and result.jobs[0].rows == min(int(batch), len(units))
    assert result.jobs[0].time.decode_ms == pytest.approx(
        len(units) * 50.0 * 20 / speedup
    )  # batch 8 over 7 photos: 7 rows, flat past 4
    assert result.jobs[0].time.vit_ms == sum(u.tiles * 100.0 for u in units)  # each answer's own ViT and prompt
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    assert ("decode of up to" in text) == (batch != "1")


def test_stored_answers_decoded_together_are_read_as_one_answers_speed():
    alone = planning.single_stream_ms(1000.0, 1.0)
    assert alone == 1000.0 and planning.single_stream_ms(1000.0, None) == 1000.0
    four = planning.speedup_at(planning.BATCH_SPEEDUP, 4)
    assert planning.single_stream_ms(1000.0, 4.0) == pytest.approx(1000.0 * four / 4)
    rows = [
        {"tiles": 1, "vit_ms": 10.0, "prompt_tokens": 300, "prefill_ms": 30.0, "output_tokens": 11,
         "decode_ms": 1000.0, "decode_rows": 4.0},
    ] * 3  # fmt: skip
    rates = planning.rates_from_results(rows, "stored")
    assert rates.decode_ms_per_token == pytest.approx(100.0 * four / 4)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0.0 s"), (4.24, "4.2 s"), (38.2, "38 s"), (60, "1 min"), (725, "12 min 5 s"), (8040, "2 h 14 min"),
     (7200, "2 h"), (3 * 86400 + 4 * 3600, "3 d 4 h")],
)  # fmt: skip
def test_durations_read_as_people_say_them(seconds, text):
    assert duration(seconds) == text


def test_json_holds_each_job_the_totals_and_the_rates(env, hand_cpu_rates):
    photos(env)
    clip(env)
    first = plan(env, "photos.yaml", "prompt: Describe it.\ninputs: ../media/photos/\n")
    second = plan(env, "clip.yaml", "prompt: What happens?\ninputs: ../media/clip.mp4\n")
    result = json.loads(cli("--config", env.config_path, "estimate", "--json", first, second).stdout)
    assert set(result) == {"model", "rates", "no_figures", "calibration", "jobs", "rejected", "total"}
    assert set(result["model"]) == {
        "dir",
        "id",
        "backend",
        "weights",
        "vit_weights",
        "prefill_weights",
        "prefill_capacity",
        "prefill_capacity_from",
        "shape",
        "reference_shape",
        "batch",
    }
    assert "@" in result["model"]["id"] and result["model"]["backend"] == "onnxruntime"
    assert result["model"]["vit_weights"] == "fp32" and result["model"]["prefill_weights"] == "same"
    assert result["rates"]["source"] == "hand-made figures" and result["rates"]["measured"] is False
    assert result["rates"]["origin"] == "built-in" and result["no_figures"] is None and result["calibration"] is None
    job_keys = {"file", "id", "mode", "units", "images", "videos", "text_only", "reused", "unreadable", "too_long",
                "to_answer", "tiles", "prompt_tokens", "output_tokens_per_answer", "output_tokens_from",
                "output_tokens_answers", "seconds", "seconds_per_unit", "units_per_hour", "problems"}  # fmt: skip
    assert all(set(job) == job_keys for job in result["jobs"])
    assert set(result["jobs"][0]["seconds"]) == {"vit", "prefill", "decode", "total"}
    total = result["total"]
    for key in ("units", "images", "videos", "to_answer", "tiles", "prompt_tokens"):
        assert total[key] == sum(job[key] for job in result["jobs"]), key
    assert total["jobs"] == 2 and total["seconds"]["total"] == pytest.approx(
        sum(job["seconds"]["total"] for job in result["jobs"])
    )
    text = cli("--config", env.config_path, "estimate", first, second).stdout
    assert "total   2 jobs, 8 units, 8 to answer" in text and "units per hour" in text


def test_help_has_an_example_and_says_only_calibrate_runs_the_model():
    result = cli("estimate", "--help")
    assert "vlbatch estimate jobs/examples/*.yaml" in result.stdout and "--rates" in result.stdout
    assert "vlbatch estimate --calibrate jobs/examples/*.yaml" in result.stdout
    assert "Only --calibrate runs the model" in " ".join(result.stdout.split())


def test_an_export_with_int8_stages_is_named_and_priced_with_their_figures(
    tmp_path, tiny_hf, monkeypatch, tiny_shape_is_reference
):
    fast = tmp_path / "fast"
    export(tiny_hf, fast, vit_weights="int8", prefill_weights="int8")
    int8_rates = Rates(10.0, 20.0, 2.0, 50.0, source="int8 hand figures", measured=False)
    monkeypatch.setattr(planning, "CPU_REFERENCE_RATES", {"fp32": HAND_RATES, "fp32+int8": int8_rates})
    (tmp_path / "spool").mkdir()
    env = SpoolEnv(tmp_path / "spool", fast)
    env.write_config()
    photos(env)
    job = plan(env, "photos.yaml", "prompt: Describe it.\ninputs: ../media/photos/\n")
    text = cli("--config", env.config_path, "estimate", job).stdout
    assert "fp32 weights, int8 ViT and prompt layers" in text and "int8 hand figures" in text
    result = json.loads(cli("--config", env.config_path, "estimate", "--json", job).stdout)
    assert (result["model"]["vit_weights"], result["model"]["prefill_weights"]) == ("int8", "int8")
    assert result["rates"]["vit_ms_per_tile"] == 10.0


# ---------------------------------------------------------------------------------------------------------------
# Whose figures: the built-in ones hold for InternVL3-2B's shape only

# InternVL3-2B's config.json as published (original InternVL layout), the keys its shape is read from
INTERNVL3_2B_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "template": "internvl2_5",
    "downsample_ratio": 0.5,
    "force_image_size": 448,
    "max_dynamic_patch": 12,
    "use_thumbnail": True,
    "ps_version": "v2",
    "select_layer": -1,
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 448,
        "patch_size": 14,
        "norm_type": "layer_norm",
        "qkv_bias": True,
        "qk_normalization": False,
    },
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "vocab_size": 151674,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
    },
}


def config_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_reference_shape_is_internvl3_2b_as_published_and_as_the_real_shape_preset(tmp_path):
    _, _, published = read_config(config_folder(tmp_path / "published", INTERNVL3_2B_CONFIG))
    assert architecture(published) == REFERENCE_SHAPE
    assert architecture(PRESETS["real-shape"]) == REFERENCE_SHAPE
    assert architecture(PRESETS["tiny"]) != REFERENCE_SHAPE
    one_billion = json.loads(json.dumps(INTERNVL3_2B_CONFIG))  # InternVL3-1B's language model: Qwen2.5-0.5B
    one_billion["llm_config"].update(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14)  # fmt: skip
    _, _, smaller = read_config(config_folder(tmp_path / "1b", one_billion))
    assert architecture(smaller) != REFERENCE_SHAPE
    assert planner.shape_differences(architecture(smaller)) == "hidden size 896, not 1,536; layers 24, not 28; ..."


def real_shape_folder(tiny_onnx: Path, folder: Path) -> Path:
    """A folder an estimate reads as an fp32 export of InternVL3-2B's shape: the tiny export with the published
    config.json (an estimate never loads the weights)."""
    shutil.copytree(tiny_onnx, folder)
    return config_folder(folder, INTERNVL3_2B_CONFIG)


def test_a_model_of_the_reference_shape_is_priced_with_the_builtin_figures(env, tiny_onnx, tmp_path):
    env.model = real_shape_folder(tiny_onnx, tmp_path / "InternVL3-2B-onnx")
    env.write_config()
    env.image("photo.jpg", 1, (2048, 1536))
    job_file = plan(env, "photo.yaml", "prompt: Write a caption for this photo.\ninputs: ../media/photo.jpg\n"
                                       "max_new_tokens: 64\n")  # fmt: skip
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    assert report["model"]["reference_shape"] is True and report["no_figures"] is None
    builtin = planning.CPU_REFERENCE_RATES["fp32"]
    assert report["rates"]["origin"] == "built-in" and report["rates"]["source"] == builtin.source
    job = report["jobs"][0]
    assert job["tiles"] == 13
    assert job["seconds"]["total"] == pytest.approx(builtin.unit(13, job["prompt_tokens"], 64).total_ms / 1e3)
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    assert "real-shape fp32 export" in text and "2 min" in text  # 122.5 s per photo in docs/performance.md's table


def test_the_tiny_model_without_figures_is_counted_and_offered_calibrate_not_priced_as_internvl3_2b(env):
    env.image("one.png", 1, (640, 480))
    job_file = plan(env, "one.yaml", "prompt: Describe it.\ninputs: ../media/one.png\n")
    result = cli("--config", env.config_path, "estimate", job_file)
    assert "no speed figures for tiny_onnx" in result.stdout
    assert "the built-in ones are for InternVL3-2B's shape (this model's differs: hidden size 64, not 1,536;" in (
        " ".join(result.stdout.split())
    )
    assert "vlbatch estimate --calibrate" in " ".join(result.stdout.split())
    assert "real-shape" not in result.stdout and "per unit" not in result.stdout and "per hour" not in result.stdout
    assert "to answer        1" in result.stdout and "wall time        unknown" in result.stdout
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", job_file).stdout)
    assert report["rates"] is None and report["model"]["reference_shape"] is False
    assert report["total"]["to_answer"] == 1 and report["total"]["seconds"] is None


# ---------------------------------------------------------------------------------------------------------------
# Decode priced by the context it runs at


def calibration_of(env: SpoolEnv, decode: list[tuple[float, float]]) -> Calibration:
    """A calibration of the env's model on this machine with the decode timings given (position, ms/token)."""
    config = env.config()
    return Calibration(
        model_id=planner.model_identity(env.model),
        machine=calibrate.this_machine(config.model),
        measured_utc="2026-11-30T09:15:00+00:00",
        load_s=0.5,
        seconds=2.0,
        chunk_tokens=128,
        whole_chunks=False,
        vit_ms_per_tile=10.0,
        prefill=(PrefillSample(128, 20.0), PrefillSample(512, 90.0), PrefillSample(1024, 200.0)),
        decode=tuple(DecodeSample(p, 32, ms) for p, ms in decode),
    )


def test_a_longer_prompt_costs_more_per_decoded_token_when_the_figures_grow_with_the_context(env):
    calibrate.save(calibration_of(env, [(150.0, 1.0), (2100.0, 3.0), (4050.0, 5.0)]))  # +1.0256 ms per 1,000
    short = plan(env, "short.yaml", "prompt: Hi?\nmax_new_tokens: 30\n")
    long = plan(
        env, "long.yaml", "prompt: " + "Tell me about the harbour and its boats. " * 150 + "\nmax_new_tokens: 30\n"
    )
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", short, long).stdout)
    rates = report["rates"]
    assert rates["origin"] == "calibration" and rates["decode_ms_per_1k_context"] == pytest.approx(1.0256, rel=1e-3)
    per_token = [job["seconds"]["decode"] * 1e3 / 29 for job in report["jobs"]]
    prompts = [job["prompt_tokens"] for job in report["jobs"]]
    assert prompts[1] > prompts[0] + 1000 and per_token[1] > per_token[0] + 1.0
    fitted = ContextRates(**{k: v for k, v in rates.items()})
    for prompt, cost in zip(prompts, per_token, strict=True):
        assert cost == pytest.approx(sum(fitted.decode_ms_at(prompt + k) for k in range(29)) / 29)
    text = cli("--config", env.config_path, "estimate", short).stdout
    assert "calibrated on 2026-11-30 09:15 UTC" in text and "ms per 1,000 tokens of context" in text


def test_flat_decode_figures_price_every_context_alike(env):
    calibrate.save(calibration_of(env, [(150.0, 2.0), (2100.0, 2.0), (4050.0, 1.9)]))  # no growth: flat
    short = plan(env, "short.yaml", "prompt: Hi?\nmax_new_tokens: 30\n")
    long = plan(env, "long.yaml", "prompt: " + "Tell me about the harbour. " * 150 + "\nmax_new_tokens: 30\n")
    report = json.loads(cli("--config", env.config_path, "estimate", "--json", short, long).stdout)
    assert report["rates"]["decode_ms_per_1k_context"] == 0
    assert "show no growth with the context" in report["rates"]["decode_note"]
    assert [job["seconds"]["decode"] for job in report["jobs"]] == [pytest.approx(1.9667 * 29 / 1e3, rel=1e-3)] * 2


def test_stored_answers_fit_decode_against_the_position_each_answer_decoded_at():
    # 2 ms per token at position 0, +1 ms per 1,000 positions: an answer of n tokens after p prompt tokens decodes
    # its n - 1 steps at positions p .. p + n - 2
    rows = [
        {"prompt_tokens": p, "output_tokens": n, "decode_ms": sum(2.0 + (p + k) / 1e3 for k in range(n - 1))}
        for p, n in [(100, 65), (900, 33), (2000, 129), (3500, 65)]
    ]
    fit = planner._history_decode(rows)
    assert fit is not None and fit.note is None
    assert (fit.ms_per_token, fit.ms_per_1k_context) == (pytest.approx(2.0), pytest.approx(1.0))
    close = planner._history_decode([{**row, "prompt_tokens": 100 + i} for i, row in enumerate(rows[:2])])
    assert close is not None and close.ms_per_1k_context == 0 and "too close together" in (close.note or "")


def test_fit_decode_weights_each_figure_by_its_steps():
    fit = fit_decode([(100.0, 1.0, 100), (3000.0, 4.0, 100), (1500.0, 50.0, 1)], "these")
    assert fit is not None and fit.ms_per_1k_context == pytest.approx(1.03, abs=0.1)  # the outlier barely counts
    assert fit_decode([], "these") is None
    steep = fit_decode([(1000.0, 0.5, 10), (3000.0, 3.0, 10)], "these")  # a line through them is below 0 at 0
    assert steep is not None and steep.ms_per_token == 0 and steep.ms_per_1k_context == pytest.approx(0.95)
