"""The README documents every command, and every command has help."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from batch.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_command_is_in_the_readme_and_has_help():
    expected = {"ask", "submit", "watch", "run", "status", "results", "serve", "gallery", "config", "export"}
    expected |= {"make-model", "estimate", "db", "cancel", "pause", "resume"}
    assert set(main.commands) == expected
    for name, command in main.commands.items():
        assert f"`vlbatch {name}`" in README, name
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and command.help.split(".")[0][:40] in " ".join(result.stdout.split()), name


def test_every_database_column_is_documented(tmp_path):
    from batch.service.store.store import Store

    store = Store(tmp_path / "docs.db")
    for table in ("jobs", "runs", "results", "job_results", "sidecars", "actors", "workers", "standing_files"):
        assert f"`{table}`" in README, table
        for column in store.db[table].columns_dict:
            assert f"`{column}`" in README, f"{table}.{column}"
    store.close()


def test_every_database_column_is_described_to_datasette(tmp_path):
    from batch.service.store.store import Store
    from batch.service.web.metadata import DATABASE, metadata

    tables = metadata()["databases"][DATABASE]["tables"]
    store = Store(tmp_path / "docs.db")
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


def test_every_environment_variable_is_in_the_readme():
    from batch.config import env_variables

    for name in env_variables():
        assert f"`{name}`" in README, name
