"""The documentation keeps up with the code: every command, column, setting and variable is in its page, the
configuration reference is the one generated from the code, and the site builds with strict link checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from batch.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "hooks"))

import config_reference  # noqa: E402  (docs/hooks/config_reference.py)


def page(name: str) -> str:
    return (DOCS / name).read_text()


def test_every_command_is_in_the_operating_page_and_has_help():
    commands = page("operating.md")
    expected = {"ask", "submit", "watch", "run", "status", "results", "serve", "gallery", "config", "export"}
    expected |= {"make-model", "estimate", "db", "cancel", "pause", "resume"}
    assert set(main.commands) == expected
    for name, command in main.commands.items():
        assert f"| `vlbatch {name}` |" in commands, name
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and command.help.split(".")[0][:40] in " ".join(result.stdout.split()), name


def test_every_database_column_is_documented(tmp_path):
    from batch.service.store.store import Store

    results = page("results.md")
    store = Store(tmp_path / "docs.db")
    for table in ("jobs", "runs", "results", "job_results", "sidecars", "actors", "workers", "standing_files"):
        assert f"`{table}`" in results, table
        for column in store.db[table].columns_dict:
            assert f"`{column}`" in results, f"{table}.{column}"
    store.close()


def test_every_database_column_is_described_to_datasette(tmp_path):
    from batch.infer.timings import TIMING_COLUMNS
    from batch.service.store.store import Store
    from batch.service.web.metadata import DATABASE, metadata

    tables = metadata()["databases"][DATABASE]["tables"]
    store = Store(tmp_path / "docs.db")
    # every timing of an answer is described exactly as batch/infer/timings.py defines it, and defined there
    results = tables["results"]["columns"]
    assert {column: results.get(column) for column in TIMING_COLUMNS} == TIMING_COLUMNS
    timed = {c for c in store.db["results"].columns_dict if c.endswith("_ms") or c in ("tokens_per_s", "decode_rows")}
    assert timed == set(TIMING_COLUMNS)
    for table in ("jobs", "runs", "results", "job_results", "sidecars", "actors", "standing_files", "workers"):
        described = tables[table]["columns"]
        for column in store.db[table].columns_dict:
            assert described.get(column), f"{table}.{column} has no description in batch/service/web/metadata.py"
            if column.endswith("_utc"):  # each time says which event it stamps
                text = described[column]
                assert text.startswith("When ") and text.endswith("UTC)"), f"{table}.{column}: {text}"
        assert not set(described) - set(store.db[table].columns_dict), f"{table}: described columns that do not exist"
    store.close()


def test_every_config_setting_is_in_config_yaml():
    from batch.config import Config

    text = (Path(__file__).resolve().parents[1] / "config.yaml").read_text()
    for section, values in Config().to_dict().items():
        assert f"{section}:" in text
        for key in values:
            assert f"  {key}:" in text, f"{section}.{key}"


def test_the_configuration_reference_is_the_one_generated_from_the_code():
    text = page("configuration.md")
    assert config_reference.fill(text) == text, "docs/configuration.md is out of date: run `make docs`"


def test_every_setting_and_variable_is_in_the_reference():
    from batch.config import Config, env_variables

    reference = config_reference.reference()
    for section, values in Config().to_dict().items():
        for key in values:
            row = next((line for line in reference.splitlines() if line.startswith(f"| `{section}.{key}` |")), None)
            assert row, f"{section}.{key}"
            assert row.rstrip(" |").split("|")[-1].strip(), f"{section}.{key} has no meaning: comment its field"
    for name in env_variables():
        assert f"`{name}`" in reference, name


def test_the_site_builds_with_strict_link_checks(tmp_path):
    """Every page, the README as its home, and every link and anchor between them: a broken one fails the build."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    built = (tmp_path / "site" / "configuration.html").read_text()
    from batch.config import env_variables

    assert all(name in built for name in env_variables())
    home = (tmp_path / "site" / "index.html").read_text()
    assert "Quick start" in home and "make demo" in home  # the README is the home page
