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
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg"))  # nor the caller's own or system-wide one
    monkeypatch.setattr("batch.config.SYSTEM_CONFIG", tmp_path / "no-etc" / "config.yaml")

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
        ("model: [1, 2\n", "my.yaml:2:1: not valid YAML: expected ',' or ']', but got '<stream end>'"),
        ("model:\n\tdir: x\n", "my.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token"),
        ("modle:\n  dir: x\n", "my.yaml: modle: unknown section (did you mean model?)"),
        ("generation:\n  max_new_tokens: 0\n", "my.yaml: generation.max_new_tokens: must be at least 1"),
        ("generation:\n  temprature: 1\n", "my.yaml: generation.temprature: unknown key (did you mean temperature?)"),
        ("media:\n  max_tiles: many\n", "my.yaml: media.max_tiles: must be a positive integer, got 'many'"),
        ("media:\n  video_decoder: ffmpeg\n", "my.yaml: media.video_decoder: must be auto, decord or pyav"),
        ("media:\n  max_tiles: 41\n", "my.yaml: media.max_tiles: must be at most 40"),
        ("media:\n  video_frames: 65\n", "my.yaml: media.video_frames: must be at most 64"),
        ("media:\n  decode_timeout_seconds: 0\n", "my.yaml: media.decode_timeout_seconds: must be a positive number"),
        ("media:\n  max_tiles: 2\n  max_tiles: 3\n", "my.yaml:3:3: duplicate key `max_tiles` on line 3"),
        ("caf\xe9: 1\n".encode("latin-1"), "my.yaml: not UTF-8 text"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key_and_exit_2(run, tmp_path, config, message):
    config_file = tmp_path / "my.yaml"
    config_file.write_bytes(config) if isinstance(config, bytes) else config_file.write_text(config)
    result = run("--config", config_file, "ask", "-p", "Hi")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"vlbatch: error: {config_file}{message.removeprefix('my.yaml')}")


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


@pytest.mark.parametrize("command", [[], *([name] for name in main.commands)])
def test_every_command_has_help_and_takes_config_after_its_name(run, command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage: " in result.stdout and len(result.stdout.splitlines()) > 5
    assert "--config FILE" in result.stdout and "/etc/vlbatch/config.yaml" in " ".join(result.stdout.split())


def test_config_given_after_the_command_is_used(run, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("spool:\n  max_attempts: 7\n")
    for args in (
        ["config", "--config", config],
        ["--config", config, "config"],
        ["--config", config, "config", "--config", config],
    ):
        result = run(*args)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.startswith(f"# from {config}\n") and "max_attempts: 7" in result.stdout
    missing = run("status", "--config", tmp_path / "gone.yaml")
    assert (missing.exit_code, missing.stderr) == (
        2,
        f"vlbatch: error: --config {tmp_path / 'gone.yaml'}: no such config file\n",
    )


def test_two_different_config_files_are_bad_usage(run, tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("")
    result = run("--config", tmp_path / "a.yaml", "config", "--config", tmp_path / "b.yaml")
    assert result.exit_code == 2 and "differs from --config" in result.stderr and result.stdout == ""


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
