"""The `vlbatch` command line: ask end to end on the tiny model, make-model, export, config and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from batch.cli import main
from batch.infer.pipeline import Pipeline
from batch.infer.settings import GenerationSettings


@pytest.fixture
def run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./config.yaml unless a test writes one
    monkeypatch.delenv("VLBATCH_CONFIG", raising=False)

    def _run(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return _run


def test_streamed_text_is_the_generation_result(tiny_onnx, media_dir):
    chunks: list[str] = []
    pipeline = Pipeline.open(tiny_onnx)
    result = pipeline.ask(
        "Describe it.", [media_dir / "photo.jpg"], GenerationSettings(max_new_tokens=40), chunks.append
    )
    pipeline.close()
    assert len(chunks) > 1 and "".join(chunks) == result.text
    assert result.output_tokens == len(result.token_ids) > 0


def test_ask_streams_the_same_text_as_its_json_result(run, tiny_onnx, media_dir):
    args = ["ask", "--model", tiny_onnx, "-p", "What is this?", "--max-new-tokens", "24", media_dir / "square.png"]
    streamed = run(*args)
    assert streamed.exit_code == 0, streamed.stderr
    as_json = run(*args, "--json")
    result = json.loads(as_json.stdout)
    assert streamed.stdout == result["text"] + "\n"
    assert result["output_tokens"] > 0 and result["tiles"] == 1 and result["image_tokens"] == 256
    assert "prefill" in streamed.stderr and "tok/s" in streamed.stderr
    assert set(result["timings"]) >= {"preprocess_ms", "vit_ms", "prefill_ms", "ttft_ms", "decode_ms", "tokens_per_s"}


def test_sampling_flags_are_reproducible(run, tiny_onnx):
    args = ["ask", "--model", tiny_onnx, "-p", "Hi", "--max-new-tokens", "16", "--temperature", "0.9", "--json"]
    first, again = run(*args, "--seed", "5"), run(*args, "--seed", "5")
    other = run(*args, "--seed", "6", "--top-k", "20", "--top-p", "0.9")
    text = [json.loads(r.stdout)["text"] for r in (first, again, other)]
    assert text[0] == text[1] and text[0] != text[2]


def test_ask_reads_the_model_from_config_yaml(run, tiny_onnx, tmp_path):
    shutil.copytree(tiny_onnx, tmp_path / "models" / "m")
    (tmp_path / "config.yaml").write_text("model:\n  dir: models/m\ngeneration:\n  max_new_tokens: 5\n")
    result = run("ask", "-p", "Hello", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output_tokens"] <= 5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("model: [1, 2\n", "not valid YAML"),
        ("modle:\n  dir: x\n", "unknown section(s) modle"),
        ("generation:\n  max_new_tokens: 0\n", "max_new_tokens must be at least 1"),
        ("generation:\n  temprature: 1\n", "unknown key(s) in `generation`: temprature"),
        ("media:\n  max_tiles: many\n", "bad value in `media`"),
        ("media:\n  video_decoder: ffmpeg\n", "video_decoder` must be auto, decord or pyav"),
        ("media:\n  max_tiles: 41\n", "`max_tiles` must be at most 40"),
        ("media:\n  video_frames: 65\n", "`video_frames` must be at most 64"),
        ("media:\n  decode_timeout_seconds: 0\n", "decode_timeout_seconds` must be a positive number"),
        ("media:\n  max_tiles: 2\n  max_tiles: 3\n", "duplicate key `max_tiles` on line 3"),
        ("caf\xe9: 1\n".encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_bad_config_is_named(run, tmp_path, config, message):
    config_file = tmp_path / "my.yaml"
    config_file.write_bytes(config) if isinstance(config, bytes) else config_file.write_text(config)
    result = run("--config", config_file, "ask", "-p", "Hi")
    assert result.exit_code == 1
    assert "my.yaml" in result.stderr and message in result.stderr


def test_ask_errors_name_the_problem(run, tiny_onnx, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    missing = run("ask", "--model", tiny_onnx, "-p", "Hi", tmp_path / "gone.jpg")
    assert missing.exit_code == 1 and "gone.jpg" in missing.stderr
    unsupported = run("ask", "--model", tiny_onnx, "-p", "Hi", tmp_path / "notes.txt")
    assert unsupported.exit_code == 1 and "notes.txt" in unsupported.stderr
    no_model = run("ask", "-p", "Hi")
    assert no_model.exit_code == 2 and "--model" in no_model.stderr
    not_exported = run("ask", "--model", tmp_path, "-p", "Hi")
    assert not_exported.exit_code == 1 and "manifest.json" in not_exported.stderr


def test_make_model_then_export(run, tmp_path):
    assert run("make-model", "--preset", "tiny", "--seed", "3", tmp_path / "hf").exit_code == 0
    result = run("export", tmp_path / "hf", tmp_path / "onnx", "--kv-capacity", "512")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["kv_capacity"] == 512 and len(manifest["files"]["layers"]) == 2


@pytest.mark.parametrize("command", [[], ["ask"], ["export"], ["make-model"]])
def test_every_command_has_help(run, command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage: " in result.stdout and len(result.stdout.splitlines()) > 5


@pytest.mark.slow
def test_installed_console_script_runs_end_to_end(tiny_onnx, media_dir):
    script = Path(sys.executable).parent / "vlbatch"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "batch"]
    proc = subprocess.run(
        [
            *command,
            "ask",
            "--model",
            str(tiny_onnx),
            "-p",
            "Caption this.",
            "--max-new-tokens",
            "8",
            str(media_dir / "clip.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "vit" in proc.stderr and "8 tiles" in proc.stderr


def test_make_model_offers_every_preset():
    from batch.model.tinymodel import PRESETS

    (preset,) = [p for p in main.commands["make-model"].params if p.name == "preset"]
    assert set(preset.type.choices) == set(PRESETS)
