"""Where the config comes from, and the VLBATCH_* environment overrides of every setting."""

from __future__ import annotations

import os
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

import batch.config as config_module
from batch.cli import main
from batch.config import (
    ENV_ALIASES,
    SECTIONS,
    Config,
    ConfigError,
    env_variables,
    find_config,
    load_config,
    unknown_env_variables,
)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HOME with no XDG_CONFIG_HOME and a fake /etc; the current folder is tmp_path/work."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "vlbatch" / "config.yaml")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


# --- search order ---------------------------------------------------------------------------------------------


def test_search_order_explicit_then_env_then_local_then_xdg_then_etc_then_defaults(homes, tmp_path, monkeypatch):
    explicit = write(tmp_path / "explicit.yaml", "spool:\n  max_attempts: 1\n")
    from_env = write(tmp_path / "env.yaml", "spool:\n  max_attempts: 2\n")
    local = write(Path.cwd() / "config.yaml", "spool:\n  max_attempts: 3\n")
    user = write(homes / ".config" / "vlbatch" / "config.yaml", "spool:\n  max_attempts: 4\n")
    system = write(config_module.SYSTEM_CONFIG, "spool:\n  max_attempts: 5\n")
    monkeypatch.setenv("VLBATCH_CONFIG", str(from_env))

    def found() -> tuple[Path | None, int]:
        config = load_config(find_config(None))
        return config.source, config.spool.max_attempts

    assert find_config(explicit) == explicit
    assert load_config(find_config(explicit)).source == explicit.resolve()
    assert found() == (from_env.resolve(), 2)
    monkeypatch.delenv("VLBATCH_CONFIG")
    assert found() == (local.resolve(), 3)
    local.unlink()
    assert found() == (user.resolve(), 4)
    user.unlink()
    assert found() == (system.resolve(), 5)
    system.unlink()
    assert found() == (None, 3)  # the built-in default


def test_the_system_config_is_etc_vlbatch_config_yaml():
    # conftest points it elsewhere for every test, so the definition itself is read
    assert 'SYSTEM_CONFIG = Path("/etc/vlbatch/config.yaml")' in Path(config_module.__file__).read_text()


def test_relative_paths_in_the_system_config_are_taken_from_its_folder(homes):
    system = write(config_module.SYSTEM_CONFIG, "spool:\n  database: db/v.db\n")
    assert find_config(None) == system
    assert load_config(find_config(None)).spool.database == system.parent.resolve() / "db" / "v.db"


def test_an_empty_vlbatch_config_counts_as_unset(homes, monkeypatch):
    local = write(Path.cwd() / "config.yaml", "spool:\n  max_attempts: 5\n")
    monkeypatch.setenv("VLBATCH_CONFIG", "")
    assert find_config(None) == Path("config.yaml")
    assert load_config(find_config(None)).source == local.resolve()


def test_xdg_config_home_is_honoured_and_a_relative_one_ignored(homes, tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    in_xdg = write(xdg / "vlbatch" / "config.yaml", "spool:\n  max_attempts: 6\n")
    in_home = write(homes / ".config" / "vlbatch" / "config.yaml", "spool:\n  max_attempts: 7\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert find_config(None) == in_xdg
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/xdg")  # the XDG spec: relative values are ignored
    write(Path.cwd() / "relative" / "xdg" / "vlbatch" / "config.yaml", "spool:\n  max_attempts: 8\n")
    assert find_config(None) == in_home
    monkeypatch.setenv("XDG_CONFIG_HOME", "")
    assert find_config(None) == in_home


def test_relative_paths_in_the_user_config_are_taken_from_its_folder(homes):
    user = write(homes / ".config" / "vlbatch" / "config.yaml", "spool:\n  database: my.db\n  media_roots: [pics]\n")
    config = load_config(find_config(None))
    assert config.spool.database == user.parent.resolve() / "my.db"
    assert config.spool.media_roots == (user.parent.resolve() / "pics",)


def test_a_missing_explicit_or_env_config_is_an_error_not_a_fallback(homes, tmp_path, monkeypatch):
    write(Path.cwd() / "config.yaml", "spool:\n  max_attempts: 3\n")  # must not be used instead
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: no such config file"):
        find_config(missing)
    monkeypatch.setenv("VLBATCH_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=r"\$VLBATCH_CONFIG .*nope\.yaml: no such config file"):
        find_config(None)
    monkeypatch.setenv("VLBATCH_CONFIG", str(tmp_path))
    with pytest.raises(ConfigError, match="not a file"):
        find_config(None)


def test_the_cli_reports_a_missing_config_file(homes, tmp_path):
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.yaml"), "config"])
    assert result.exit_code == 2
    assert result.stderr == f"vlbatch: error: --config {tmp_path / 'nope.yaml'}: no such config file\n"


def test_source_and_database_paths(homes, tmp_path):
    defaults = load_config(None)
    assert defaults.source is None and defaults.spool.database == Path.cwd() / "vlbatch.db"
    path = write(tmp_path / "c" / "vl.yaml", "spool:\n  database: data/v.db\n")
    config = load_config(path)
    assert config.source == path.resolve() and config.source.is_absolute()
    assert config.spool.database == path.parent.resolve() / "data" / "v.db"


# --- max_workers ----------------------------------------------------------------------------------------------


def test_max_workers_defaults_to_one_and_must_be_a_positive_integer(tmp_path):
    assert Config().spool.max_workers == 1
    assert load_config(write(tmp_path / "ok.yaml", "spool:\n  max_workers: 3\n")).spool.max_workers == 3
    for bad in ("0", "-1", "true", "1.5", '"2"'):
        path = write(tmp_path / "bad.yaml", f"spool:\n  max_workers: {bad}\n")
        with pytest.raises(ConfigError, match=r"bad\.yaml: spool\.max_workers: must be a positive integer"):
            load_config(path)


def test_the_shipped_config_yaml_loads_and_documents_max_workers():
    config = load_config(REPO / "config.yaml")
    assert config.spool.max_workers == 1
    line = next(x for x in (REPO / "config.yaml").read_text().splitlines() if x.startswith("  max_workers:"))
    assert "#" in line


# --- environment overrides ------------------------------------------------------------------------------------


def _sample(section: str, key: str, hint: typing.Any, default: typing.Any, tmp: Path) -> tuple[str, typing.Any]:
    """A valid value unlike the default for any field type: (the environment text, the value it must give)."""
    args = typing.get_args(hint)
    if type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        return ("false", False) if default else ("true", True)
    if hint is int:
        value = (default or 1) + 1
        return str(value), value
    if hint is float:
        value = default / 2 if default else 1.5
        return str(value), value
    if hint is Path:
        return str(tmp / key), tmp / key
    if typing.get_origin(hint) is tuple and str in typing.get_args(hint):
        names = {
            ("model", "providers"): ("AXCLRTExecutionProvider", "AxEngineExecutionProvider"),
            ("cluster", "bytes_nodes"): ("board-2", "10.0.0.7"),
            ("cluster", "path_map"): ("/srv/photos=/mnt/photos", "/opt/models=/models"),
        }
        assert (section, key) in names, f"add a valid sample value for the list-of-text setting {section}.{key}"
        return os.pathsep.join(names[section, key]), names[section, key]
    if typing.get_origin(hint) is tuple:
        return f"{tmp / 'a'}{os.pathsep}{tmp / 'b'}", (tmp / "a", tmp / "b")
    if hint is str:
        choices = {("model", "backend"): "axengine", ("media", "video_decoder"): "pyav"}
        choices |= {("cluster", "ray_address"): "10.0.0.2:6379", ("cluster", "resource"): "npu"}
        choices |= {("cluster", "media"): "bytes"}
        choices |= {("model", "url"): "http://10.0.0.3:8080", ("model", "name"): "internvl3-2b"}
        choices |= {("model", "api_key_env"): "OPENAI_API_KEY"}
        choices |= {("model", "npu_io"): "resident"}
        assert (section, key) in choices, f"add a valid sample value for the text setting {section}.{key}"
        return choices[section, key], choices[section, key]
    raise AssertionError(f"{section}.{key}: no sample for type {hint!r}; teach the config's env reader this type")


def _every_field():
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            yield section, f.name, hints[f.name], getattr(getattr(Config(), section), f.name)


@pytest.mark.parametrize(("section", "key", "hint", "default"), list(_every_field()), ids=lambda v: str(v))
def test_every_setting_has_an_environment_variable_that_reaches_it(section, key, hint, default, tmp_path, monkeypatch):
    name = f"VLBATCH_{section}_{key}".upper()
    assert env_variables()[name] == f"{section}.{key}"
    text, expected = _sample(section, key, hint, default, tmp_path)
    assert expected != default
    monkeypatch.setenv(name, text)
    assert getattr(getattr(load_config(None), section), key) == expected


def test_the_variable_list_is_every_field_plus_the_aliases():
    derived = env_variables(aliases=False)
    assert sorted(derived.values()) == sorted(f"{s}.{k}" for s, k, _, _ in _every_field())
    assert set(env_variables()) == set(derived) | set(ENV_ALIASES)
    assert "VLBATCH_CONFIG" not in env_variables()
    assert env_variables()["VLBATCH_SPOOL_MEDIA_ROOTS"] == "spool.media_roots"


def test_overrides_of_each_kind(monkeypatch, tmp_path):
    monkeypatch.setenv("VLBATCH_MODEL_THREADS", "2")
    monkeypatch.setenv("VLBATCH_MEDIA_MAX_TILES", " 6 ")
    monkeypatch.setenv("VLBATCH_SPOOL_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("VLBATCH_GENERATION_TEMPERATURE", "0.7")
    monkeypatch.setenv("VLBATCH_SPOOL_MEDIA_ROOTS", f"/a{os.pathsep}rel/b{os.pathsep}")
    monkeypatch.setenv("VLBATCH_SPOOL_POLLING", "Yes")
    monkeypatch.setenv("VLBATCH_MEDIA_USE_THUMBNAIL", "0")
    monkeypatch.setenv("VLBATCH_SPOOL_DATABASE", "data/x.db")
    monkeypatch.setenv("VLBATCH_MODEL_DIR", "~/models/m")
    config = load_config(None)
    assert config.model.threads == 2 and isinstance(config.model.threads, int)
    assert config.media.max_tiles == 6 and config.spool.max_attempts == 5
    assert config.generation.temperature == 0.7
    assert config.spool.media_roots == (Path("/a"), Path.cwd() / "rel" / "b")  # relative: from the current folder
    assert config.spool.polling is True and config.media.use_thumbnail is False
    assert config.spool.database == Path.cwd() / "data" / "x.db"
    assert config.model.dir == Path.home() / "models" / "m"


def test_the_environment_overrides_the_file_and_an_empty_or_null_value_clears_an_optional(monkeypatch, tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "model:\n  dir: m\n  threads: 4\ngeneration:\n  seed: 7\nspool:\n  media_roots: [pics]\n  max_attempts: 9\n",
    )
    monkeypatch.setenv("VLBATCH_SPOOL_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("VLBATCH_MODEL_THREADS", "")
    monkeypatch.setenv("VLBATCH_GENERATION_SEED", "null")
    monkeypatch.setenv("VLBATCH_MODEL_DIR", "NULL")
    monkeypatch.setenv("VLBATCH_SPOOL_MEDIA_ROOTS", "")
    config = load_config(path)
    assert config.spool.max_attempts == 2
    assert config.model.threads is None and config.generation.seed is None and config.model.dir is None
    assert config.spool.media_roots == ()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("VLBATCH_MEDIA_MAX_TILES", "six", "an integer"),
        ("VLBATCH_MEDIA_MAX_TILES", "6.0", "an integer"),
        ("VLBATCH_MODEL_THREADS", "two", "an integer or null"),
        ("VLBATCH_GENERATION_TEMPERATURE", "warm", "a number"),
        ("VLBATCH_SPOOL_LEASE_SECONDS", "nan", "a number"),
        ("VLBATCH_SPOOL_POLLING", "maybe", "true or false"),
        ("VLBATCH_SPOOL_POLLING", "", "true or false"),
        ("VLBATCH_SPOOL_DIR", "", "a path"),
        ("VLBATCH_MODEL_BACKEND", " ", "text"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_expected_type(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert str(info.value).startswith(f"{name}: {env_variables()[name]}: expected {expected}")


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("VLBATCH_MEDIA_MAX_TILES", "60", "at most 40"),
        ("VLBATCH_SPOOL_MAX_WORKERS", "0", "positive integer"),
        ("VLBATCH_SPOOL_MAX_ATTEMPTS", "-1", "positive integer"),
        ("VLBATCH_GENERATION_TOP_P", "0", "top_p"),
        ("VLBATCH_MEDIA_VIDEO_DECODER", "ffmpeg", "video_decoder"),
    ],
)
def test_a_value_the_setting_refuses_names_the_variable(monkeypatch, name, value, reason):
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("VLBATCH_MEDIA_IMAGE_SIZE", "224")  # a good neighbour in the same section is not blamed
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert str(info.value).startswith(f"{name}: {env_variables()[name]}: ") and reason in str(info.value)
    assert "VLBATCH_MEDIA_IMAGE_SIZE" not in str(info.value)


def test_an_unknown_variable_is_an_error_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("VLBATCH_MEDIA_MAXTILES", "6")
    monkeypatch.setenv("VLBATCH_CONFIG", "")  # known
    assert unknown_env_variables() == ["VLBATCH_MEDIA_MAXTILES"]
    with pytest.raises(ConfigError, match=r"VLBATCH_MEDIA_MAXTILES \(did you mean VLBATCH_MEDIA_MAX_TILES\?\)"):
        load_config(None)
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 2 and "VLBATCH_MEDIA_MAXTILES" in result.stderr
    assert unknown_env_variables({"VLBATCH_SPOOL_DIR": "x", "OTHER": "y", "VLBATCH_WHATEVER": ""}) == [
        "VLBATCH_WHATEVER"
    ]


def test_the_old_short_names_still_work(monkeypatch, tmp_path):
    # VLBATCH_MODEL_DIR and VLBATCH_SPOOL_DIR already are the derived names; the other three are aliases
    assert {"VLBATCH_MODEL_DIR", "VLBATCH_SPOOL_DIR"} <= set(env_variables(aliases=False))
    assert ENV_ALIASES == {
        "VLBATCH_HF_DIR": "VLBATCH_MODEL_HF_DIR",
        "VLBATCH_BACKEND": "VLBATCH_MODEL_BACKEND",
        "VLBATCH_DATABASE": "VLBATCH_SPOOL_DATABASE",
    }
    monkeypatch.setenv("VLBATCH_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("VLBATCH_HF_DIR", "hf")
    monkeypatch.setenv("VLBATCH_BACKEND", "onnxruntime")
    monkeypatch.setenv("VLBATCH_SPOOL_DIR", "spool")
    monkeypatch.setenv("VLBATCH_DATABASE", str(tmp_path / "o.db"))
    config = load_config(None)
    assert config.model.dir == tmp_path / "m" and config.model.hf_dir == Path.cwd() / "hf"
    assert config.model.backend == "onnxruntime"
    assert config.spool.dir == Path.cwd() / "spool" and config.spool.database == tmp_path / "o.db"


def test_an_alias_and_its_long_name_must_agree(monkeypatch):
    monkeypatch.setenv("VLBATCH_BACKEND", "axengine")
    monkeypatch.setenv("VLBATCH_MODEL_BACKEND", "axengine")
    assert load_config(None).model.backend == "axengine"
    monkeypatch.setenv("VLBATCH_MODEL_BACKEND", "onnxruntime")
    with pytest.raises(ConfigError, match="VLBATCH_BACKEND and VLBATCH_MODEL_BACKEND"):
        load_config(None)


def test_an_explicit_environment_mapping_replaces_os_environ(monkeypatch):
    monkeypatch.setenv("VLBATCH_SPOOL_MAX_ATTEMPTS", "7")
    assert load_config(None, environ={}).spool.max_attempts == 3
    assert load_config(None, environ={"VLBATCH_SPOOL_MAX_ATTEMPTS": "8"}).spool.max_attempts == 8


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("VLBATCH_MODEL_THREADS", "0", "VLBATCH_MODEL_THREADS: model.threads: must be a positive integer"),
        ("VLBATCH_MODEL_BACKEND", "gpu", "VLBATCH_MODEL_BACKEND: model.backend: must be auto"),
    ],
)
def test_model_settings_are_checked(monkeypatch, variable, value, reason):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=reason):
        load_config(None)


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("  backend: openai\n  url: 127.0.0.1:8080\n", "model.url: must be an http:// or https:// address"),
        ("  backend: openai\n  url: http://h:1\n  concurrency: 0\n", "model.concurrency: must be an integer from 1"),
        ("  backend: openai\n  url: http://h:1\n  timeout_seconds: 0\n", "model.timeout_seconds: must be a positive"),
    ],
)
def test_a_model_server_setting_that_cannot_work_is_one_line_naming_the_file(tmp_path, model, problem):
    """Each value alone; a server without its address is refused when a command starts (see test_config_checks)."""
    path = write(tmp_path / "c.yaml", "model:\n" + model)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path)) and problem in str(caught.value)
    assert "\n" not in str(caught.value)
