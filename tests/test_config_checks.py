"""The configuration is checked before a command starts: folders that are not there, numbers that make no sense.

Each refusal is one line on stderr naming the file (or VLBATCH_* variable, or flag), the key and the problem, with
exit code 2, and nothing has been started: no database, no spool folder, no model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from batch.cli import main
from batch.config import ConfigError, check_config, config_problems, load_config


@pytest.fixture(autouse=True)
def no_other_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the caller's ~/.config/vlbatch/config.yaml nor /etc/vlbatch/config.yaml takes part."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg"))
    monkeypatch.setattr("batch.config.SYSTEM_CONFIG", tmp_path / "no-etc" / "config.yaml")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with a model folder (empty: loading it would fail with exit 1, not 2) and a media folder."""
    (tmp_path / "model").mkdir()
    (tmp_path / "media").mkdir()
    return tmp_path


def write_config(site: Path, spool: str = "", model: str = "model", media: str = "") -> Path:
    """config.yaml in `site` with the given extra lines in `spool:` and `media:`."""
    path = site / "config.yaml"
    text = f"model:\n  dir: {model}\nspool:\n  dir: jobs\n  database: vlbatch.db\n  media_roots: [media]\n{spool}"
    path.write_text(text + (f"media:\n{media}" if media else ""))
    return path


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(result: Result, line: str, site: Path, whole: bool = True) -> None:
    """Exit 2, exactly this one line on stderr (or one that starts so), and no database or spool folder created."""
    assert result.exit_code == 2, result.stderr
    (shown,) = result.stderr.splitlines()
    assert shown == f"vlbatch: error: {line}" if whole else shown.startswith(f"vlbatch: error: {line}")
    assert result.stdout == ""
    assert not (site / "vlbatch.db").exists() and not (site / "jobs").exists()


# --- folders ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["run"], ["watch"], ["status"], ["results"], ["config"]])
def test_a_media_root_that_does_not_exist_is_refused_by_every_command(site, command):
    path = site / "config.yaml"
    path.write_text("spool:\n  media_roots: [media, /srv/photoz]\n")
    result = invoke("--config", path, *command)
    if command == ["config"]:  # prints the effective settings, then the problem
        assert result.exit_code == 2 and "/srv/photoz" in result.stdout
        assert result.stderr == f"vlbatch: error: {path}: spool.media_roots: /srv/photoz does not exist\n"
        return
    assert_refused(result, f"{path}: spool.media_roots: /srv/photoz does not exist", site)


def test_a_media_root_that_is_a_file_is_refused(site):
    (site / "photos.txt").write_text("not a folder")
    path = write_config(site)
    path.write_text(path.read_text().replace("[media]", "[media, photos.txt]"))
    assert_refused(
        invoke("--config", path, "run"), f"{path}: spool.media_roots: {site / 'photos.txt'} is not a folder", site
    )


def test_a_spool_folder_that_cannot_be_created_is_refused(site):
    path = write_config(site)
    path.write_text(path.read_text().replace("dir: jobs", "dir: gone/jobs"))
    expected = f"{path}: spool.dir: {site / 'gone' / 'jobs'} does not exist, nor does {site / 'gone'} to create it in"
    assert_refused(invoke("--config", path, "run"), expected, site)


def test_a_database_whose_folder_cannot_be_created_is_refused(site):
    path = write_config(site)
    path.write_text(path.read_text().replace("database: vlbatch.db", "database: a/b/v.db"))
    expected = (
        f"{path}: spool.database: {site / 'a' / 'b' / 'v.db'}: its folder {site / 'a' / 'b'} does not exist, "
        f"nor does {site / 'a'} to create it in"
    )
    assert_refused(invoke("--config", path, "status"), expected, site)


def test_a_database_that_is_a_folder_is_refused(site):
    path = write_config(site)
    (site / "data.db").mkdir()
    path.write_text(path.read_text().replace("database: vlbatch.db", "database: data.db"))
    expected = f"{path}: spool.database: {site / 'data.db'} is a folder, not a database file"
    assert_refused(invoke("--config", path, "results"), expected, site)


def test_a_spool_folder_and_database_that_can_be_created_pass(site):
    path = write_config(site)
    config = load_config(path)
    assert not config.spool.dir.exists() and not config.spool.database.exists()
    assert config_problems(config, needs_model=True) == []
    check_config(config, needs_model=True)


@pytest.mark.parametrize("command", [["run"], ["watch"], ["estimate", "job.yaml"], ["ask", "-p", "Hi"]])
def test_a_model_folder_that_is_not_there_is_refused_by_the_commands_that_load_or_price_it(site, command):
    path = write_config(site, model="models/gone")
    (site / "job.yaml").write_text("prompt: hi\n")
    expected = f"{path}: model.dir: {site / 'models' / 'gone'} does not exist"
    assert_refused(invoke("--config", path, *command), expected, site)


def test_the_other_commands_do_not_need_the_model_folder(site):
    path = write_config(site, model="models/gone")
    result = invoke("--config", path, "status")
    assert result.exit_code == 1 and "no database at" in result.stderr  # got past the checks


def test_a_model_flag_is_checked_instead_of_model_dir_and_named(site):
    path = write_config(site, model="models/gone")  # --model replaces it: not checked
    result = invoke("--config", path, "run", "--model", site / "nope")
    assert_refused(result, f"--model: model.dir: {site / 'nope'} does not exist", site)
    model_file = site / "model.onnx"
    model_file.write_text("")
    result = invoke("--config", path, "ask", "-p", "Hi", "--model", model_file)
    assert_refused(result, f"--model: model.dir: {model_file} is not a folder", site)


def test_a_folder_from_the_environment_names_the_variable(site, monkeypatch):
    path = write_config(site)
    monkeypatch.setenv("VLBATCH_SPOOL_MEDIA_ROOTS", f"{site / 'media'}:{site / 'photoz'}")
    expected = f"VLBATCH_SPOOL_MEDIA_ROOTS: spool.media_roots: {site / 'photoz'} does not exist"
    assert_refused(invoke("--config", path, "run"), expected, site)
    monkeypatch.delenv("VLBATCH_SPOOL_MEDIA_ROOTS")
    monkeypatch.setenv("VLBATCH_MODEL_DIR", str(site / "m2"))
    assert_refused(
        invoke("--config", path, "watch"), f"VLBATCH_MODEL_DIR: model.dir: {site / 'm2'} does not exist", site
    )


def test_check_config_raises_the_first_problem():
    config = load_config(None, environ={"VLBATCH_SPOOL_MEDIA_ROOTS": "/nonexistent/a:/nonexistent/b"})
    assert config_problems(config, needs_model=False) == [
        "VLBATCH_SPOOL_MEDIA_ROOTS: spool.media_roots: /nonexistent/a does not exist",
        "VLBATCH_SPOOL_MEDIA_ROOTS: spool.media_roots: /nonexistent/b does not exist",
    ]
    with pytest.raises(ConfigError, match="^VLBATCH_SPOOL_MEDIA_ROOTS: spool.media_roots: /nonexistent/a does"):
        check_config(config, needs_model=False)
    assert config_problems(config, needs_model=False, needs_spool=False) == []


# --- numbers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spool", "media", "message"),
    [
        ("  lease_seconds: 0\n", "", "spool.lease_seconds: must be more than 0, got 0"),
        ("  rescan_seconds: 0\n", "", "spool.rescan_seconds: must be more than 0, got 0 (0 would make an idle"),
        ("  give_up_seconds: 0\n", "", "spool.give_up_seconds: must be more than 0, got 0"),
        ("  database_timeout_seconds: 0\n", "", "spool.database_timeout_seconds: must be more than 0, got 0"),
        ("  lease_seconds: -2.5\n", "", "spool.lease_seconds: must be more than 0, got -2.5"),
        ("  lease_seconds: .nan\n", "", "spool.lease_seconds: must be a number of seconds, got nan"),
        ("  give_up_seconds: .inf\n", "", "spool.give_up_seconds: must be a number of seconds, got inf"),
        ("  settle_seconds: -1\n", "", "spool.settle_seconds: must be 0 or more, got -1"),
        ("  max_workers: 0\n", "", "spool.max_workers: must be a positive integer, got 0"),
        ("", "  decode_timeout_seconds: 0\n", "media.decode_timeout_seconds: must be a positive number, got 0"),
        ("", "  max_image_pixels: 0\n", "media.max_image_pixels: must be a positive integer, got 0"),
        ("", "  decode_memory_mb: -1\n", "media.decode_memory_mb: must be a whole number >= 0, got -1"),
    ],
)
def test_a_number_that_makes_no_sense_is_refused(site, spool, media, message):
    path = write_config(site, spool=spool, media=media)
    assert_refused(invoke("--config", path, "run"), f"{path}: {message}", site, whole=False)


def test_rescan_seconds_0_says_why(site):
    path = write_config(site, spool="  rescan_seconds: 0\n")
    result = invoke("--config", path, "watch")
    assert "at 100% CPU" in result.stderr and result.exit_code == 2


def test_zero_is_fine_where_it_means_something(site):
    path = write_config(site, spool="  settle_seconds: 0\n", media="  decode_memory_mb: 0\n")
    config = load_config(path)
    assert config.spool.settle_seconds == 0 and config.media.decode_memory_mb == 0  # no settling, no memory cap
    check_config(config, needs_model=True)


def test_a_number_from_the_environment_names_the_variable(site, monkeypatch):
    path = write_config(site)
    monkeypatch.setenv("VLBATCH_SPOOL_RESCAN_SECONDS", "0")
    result = invoke("--config", path, "watch")
    assert result.exit_code == 2
    assert result.stderr.startswith("vlbatch: error: VLBATCH_SPOOL_RESCAN_SECONDS: spool.rescan_seconds: must be more")


# --- the config line and the exit code, in real processes ---------------------------------------------------------


def _vlbatch(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "vlbatch"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "batch"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_bad_config_exits_2_in_a_real_process_with_nothing_started(site):
    path = site / "etc-config.yaml"
    path.write_text("spool:\n  media_roots: [/srv/photoz]\n")
    done = _vlbatch("run", "--config", path, cwd=site)
    assert done.returncode == 2
    assert done.stderr == f"vlbatch: error: {path}: spool.media_roots: /srv/photoz does not exist\n"
    assert sorted(p.name for p in site.iterdir()) == ["etc-config.yaml", "media", "model"]


def test_commands_that_read_the_database_log_their_config_first_and_keep_stdout_clean(results_env):
    config = results_env.config_path
    for command in (["status"], ["results", "--format", "json"], ["status", "--json"]):
        result = invoke(*command, "--config", config)
        assert result.exit_code == 0, result.stderr
        first = result.stderr.splitlines()[0]
        assert " event=config " in f" {first} " and " level=info " in f" {first} "
        assert f"config={config.resolve()}" in first and f"database={results_env.db_path}" in first
        assert "ts=" not in result.stdout
        if "json" in command or "--json" in command:
            json.loads(result.stdout)


def test_ask_keeps_its_quiet_default(site):
    result = invoke("ask", "-p", "Hi", "--model", site / "model")  # an empty folder: exit 1, but no config line
    assert result.exit_code == 1 and "event=config" not in result.stderr


@pytest.mark.parametrize("command", [["run"], ["watch"], ["ask", "-p", "hi"], ["status"]])
def test_a_model_server_without_its_address_is_refused_by_every_command(site, command):
    path = site / "config.yaml"
    path.write_text("model:\n  backend: openai\n")
    result = invoke("--config", path, *command)
    assert_refused(
        result, f"{path}: model.url: backend openai needs the server's address here (http://host:port)", site
    )
