"""`vlbatch estimate --calibrate`: the tiny model measured on this machine, its figures kept per model and machine,
reused by later estimates, and an estimate made with them set against a run of the same job by the worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv

from batch.cli import main
from batch.infer.runtime.select import model_identity
from batch.model.ort_options import usable_cpus
from batch.service.reports import calibrate
from batch.service.reports.calibrate import Calibration
from batch.service.worker.worker import Worker


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The calibration cache of this test alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "vlbatch" / "calibration"


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config()
    return e


def cli(*args: object, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


def plan(env: SpoolEnv, name: str, text: str) -> Path:
    path = env.root / "plans" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def estimate_json(env: SpoolEnv, *args: object) -> dict:
    return json.loads(cli("--config", env.config_path, "estimate", "--json", *args).stdout)


def test_calibrate_measures_keeps_the_figures_and_later_estimates_reuse_them(env, cache):
    env.image("one.png", 1, (640, 480))
    job_file = plan(env, "one.yaml", "prompt: Describe it.\ninputs: ../media/one.png\nmax_new_tokens: 20\n")
    assert estimate_json(env, job_file)["rates"] is None  # nothing measured yet

    measured = cli("--config", env.config_path, "estimate", "--json", "--calibrate", job_file)
    report = json.loads(measured.stdout)
    rates = report["rates"]
    assert rates["origin"] == "calibration" and rates["measured"] is True
    assert min(rates["vit_ms_per_tile"], rates["prefill_first_chunk_ms"], rates["decode_ms_per_token"]) > 0
    assert report["jobs"][0]["seconds"]["total"] > 0 and report["no_figures"] is None
    (kept,) = cache.glob("*.json")
    assert f"vlbatch: calibration kept in {kept}" in measured.stderr
    entry = json.loads(kept.read_text())
    config = env.config()
    assert entry["model_id"] == model_identity(env.model) and entry["machine"]["threads"] == usable_cpus()
    assert entry["machine"]["backend"] == "onnxruntime" and entry["machine"]["cpu"] == calibrate.cpu_model()
    assert [s["tokens"] for s in entry["prefill"]][:3] == [128, 512, 1024]
    assert len(entry["decode"]) == 3 and all(s["tokens"] >= calibrate.DECODE_TOKENS for s in entry["decode"])
    assert report["calibration"]["measured_utc"] == entry["measured_utc"]

    later = estimate_json(env, job_file)  # no --calibrate: the cache
    assert later["rates"] == rates and later["calibration"] == report["calibration"]
    text = cli("--config", env.config_path, "estimate", job_file).stdout
    date = Calibration.from_dict(entry).date
    assert f"rates   measured: calibrated on {date} on {calibrate.this_machine(config.model).describe()}" in text
    assert not env.db_path.exists()  # an estimate never creates the database, calibrated or not

    before = kept.stat().st_ino
    again = cli("--config", env.config_path, "estimate", "--calibrate", job_file)
    assert "calibrated on" in again.stdout
    assert kept.stat().st_ino != before  # measured again, written anew (atomically: a new file renamed over)
    assert [p.name for p in cache.iterdir()] == [kept.name]  # no temp file left behind


def test_a_calibration_holds_for_its_own_machine_and_threads_only(env, cache):
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    cli("--config", env.config_path, "estimate", "--calibrate", job_file)
    other_threads = usable_cpus() + 1
    report = estimate_json(env, "--threads", other_threads, job_file)
    assert report["rates"] is None and "not calibrated on this machine" in report["no_figures"]
    cli("--config", env.config_path, "estimate", "--threads", other_threads, "--calibrate", job_file)
    assert len(list(cache.glob("*.json"))) == 2
    assert estimate_json(env, "--threads", other_threads, job_file)["calibration"]["machine"]["threads"] == (
        other_threads
    )


def test_a_damaged_cache_entry_counts_as_none_and_calibrate_replaces_it(env, cache):
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    cli("--config", env.config_path, "estimate", "--calibrate", job_file)
    (kept,) = cache.glob("*.json")
    kept.write_text(kept.read_text()[:100])  # cut short
    assert estimate_json(env, job_file)["rates"] is None
    cli("--config", env.config_path, "estimate", "--calibrate", job_file)
    assert json.loads(kept.read_text())["model_id"] == model_identity(env.model)
    assert estimate_json(env, job_file)["rates"]["origin"] == "calibration"


def test_calibrate_and_rates_together_is_bad_usage(env, tmp_path):
    job_file = plan(env, "ask.yaml", "prompt: Hello?\n")
    bench = tmp_path / "bench.json"
    bench.write_text("{}")
    result = cli("--config", env.config_path, "estimate", "--calibrate", "--rates", bench, job_file, code=2)
    assert "--calibrate and --rates are two sources of figures: give one" in result.stderr


def test_the_calibrated_estimate_is_near_the_time_the_worker_takes(env):
    """The pricing checked against a real run, with a wide margin (0.2x to 5x): not a speed test."""
    env.write_config(give_up_seconds=10)  # a fault of the machine fails the test at once
    settings = env.config_path.read_text().replace("max_new_tokens: 12\n", "max_new_tokens: 12\n  ignore_eos: true\n")
    env.config_path.write_text(settings)  # every answer runs to max_new_tokens, the figure an estimate prices
    for i in range(3):
        env.image(f"photos/{i}.png", i, (640, 480))
    job = "prompt: Describe it.\ninputs: {}/photos/\nmax_tiles: 2\nmax_new_tokens: 1000\n"
    report = estimate_json(env, "--calibrate", plan(env, "photos.yaml", job.format("../media")))
    estimated = report["total"]["seconds"]["total"]

    env.drop("photos.yaml", job.format("../../media"))
    worker = Worker.from_config(env.config())
    try:
        assert worker.pipeline is not None  # the model's load is not a unit's time (an estimate leaves it out)
        assert worker.take_slot(wait=False)
        started = time.perf_counter()
        (outcome,) = worker.drain()
        measured = time.perf_counter() - started
    finally:
        worker.close()
    assert outcome.state == "done"
    answers = list(env.db().query("select tiles, prompt_tokens, output_tokens from results"))
    job_figures = report["jobs"][0]
    assert len(answers) == job_figures["to_answer"] == 3
    assert sum(a["tiles"] for a in answers) == job_figures["tiles"]
    assert {a["output_tokens"] for a in answers} == {1000}
    assert 0.2 <= estimated / measured <= 5, f"estimated {estimated:.2f} s, the worker took {measured:.2f} s"

    after = estimate_json(env, plan(env, "more.yaml", job.format("../media").replace("Describe", "Name")))
    assert after["rates"]["origin"] == "history"  # its own stored answers now come before the calibration
