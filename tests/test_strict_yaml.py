"""batch.strict_yaml: duplicate keys, deep nesting and alias bombs refused by line; else as safe_load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from batch import strict_yaml
from batch.config import ConfigError, load_config
from batch.strict_yaml import MAX_ALIAS_NODES, MAX_DEPTH, StrictYAMLError, load

REPO = Path(__file__).resolve().parents[1]


def refused(text: str, **kwargs: int) -> StrictYAMLError:
    with pytest.raises(StrictYAMLError) as info:
        load(text, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Ordinary documents


NORMAL = [
    "",
    "# only a comment\n",
    "just text\n",
    "- a\n- 2\n- 3.5\n- true\n- null\n- 2024-06-01\n",
    "prompt: |\n  Line one.\n  Line two.\ninputs: [a.png, 'b/*.jpg']\ntags: {trip: Rome, year: 2024}\n",
    "a: {b: {c: [1, [2, [3, {d: e}]]]}}\n",
    "defaults: &d {temperature: 0, top_k: 5}\njob:\n  <<: *d\n  top_k: 7\nsame: *d\nname: &n x\nagain: *n\n",
    "? [complex, key]\n: value\n",  # unhashable: left to SafeConstructor below
    "1: one\n'1': text one\n",  # 1 and '1' are different keys
    "!!set {a, b}\n",
    "!!omap [a: 1, b: 2]\n",
    "- " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n",  # exactly MAX_DEPTH levels
]


@pytest.mark.parametrize("text", NORMAL)
def test_ordinary_documents_load_as_safe_load_does(text: str) -> None:
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        with pytest.raises(type(exc)):
            load(text)
    else:
        assert load(text) == expected


@pytest.mark.parametrize(
    "path", [REPO / "config.yaml", *sorted((REPO / "jobs" / "examples").glob("*.y*ml"))], ids=lambda p: p.name
)
def test_shipped_files_load_as_safe_load_does(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert load(text) == yaml.safe_load(text)


def test_exactly_max_depth_loads_and_one_more_is_refused() -> None:
    assert load("[" * MAX_DEPTH + "]" * MAX_DEPTH) == yaml.safe_load("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    error = refused("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert str(error) == f"nested deeper than {MAX_DEPTH} levels at line 1"


def test_unsafe_tags_stay_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(yaml.constructor.ConstructorError):
        load(f"!!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()
    assert issubclass(strict_yaml.StrictLoader, yaml.SafeLoader)


def test_syntax_errors_come_through_as_yaml_errors_naming_the_line() -> None:
    with pytest.raises(yaml.MarkedYAMLError) as info:
        load("a: 1\nb: [2,\nc: 3\n")
    assert info.value.problem_mark is not None and "line " in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Duplicate keys


def test_duplicate_top_level_key_names_both_lines() -> None:
    error = refused("prompt: a\ninputs: x.png\nmode: each\nprompt: b\n")
    assert str(error) == "duplicate key `prompt` on line 4 (first on line 1)"
    assert error.line == 4


def test_duplicate_nested_key() -> None:
    assert str(refused("tags:\n  a: 1\n  b: 2\n  a: 3\n")) == "duplicate key `a` on line 4 (first on line 2)"


def test_duplicate_key_in_flow_mapping_and_quoted_spelling() -> None:
    assert str(refused("{x: 1, 'x': 2}\n")) == "duplicate key `x` on line 1 (first on line 1)"
    assert str(refused('a: 1\n\n"a": 2\n')) == "duplicate key `a` on line 3 (first on line 1)"


def test_keys_that_load_equal_are_duplicates() -> None:
    assert str(refused("1: a\n0x1: b\n")) == "duplicate key `1` on line 2 (first on line 1)"
    assert str(refused("1: a\ntrue: b\n")) == "duplicate key `True` on line 2 (first on line 1)"  # safe_load merges


def test_merge_keys_may_be_overridden_but_not_repeated_by_hand() -> None:
    assert load("d: &d {a: 1}\ne: {<<: *d, a: 2}\n") == {"d": {"a": 1}, "e": {"a": 2}}
    assert "duplicate key `a`" in str(refused("d: &d {a: 1}\ne: {<<: *d, a: 2, a: 3}\n"))


def test_a_very_long_duplicate_key_is_shortened() -> None:
    key = "k" * 500
    message = str(refused(f"{key}: 1\n{key}: 2\n"))
    assert message.startswith("duplicate key `" + "k" * 57 + "...` on line 2") and len(message) < 120


# ---------------------------------------------------------------------------------------------------------------
# Depth


@pytest.mark.parametrize("bracket", ["[", "{"])
@pytest.mark.parametrize("count", [5_000, 100_000])
def test_thousands_of_nested_brackets_are_refused_fast(bracket: str, count: int) -> None:
    text = bracket * count
    started = time.perf_counter()
    error = refused(text)
    assert time.perf_counter() - started < 5
    assert str(error) == f"nested deeper than {MAX_DEPTH} levels at line 1"


def test_safe_load_itself_would_recurse_on_the_same_input() -> None:
    """What the strict loader protects against: yaml.safe_load recurses once per level."""
    with pytest.raises(RecursionError):
        yaml.safe_load("[" * 5_000 + "]" * 5_000)
    assert "nested deeper" in str(refused("[" * 5_000 + "]" * 5_000))


def test_ten_kilobyte_job_of_nested_brackets() -> None:
    text = "prompt: p\ninputs: " + "[" * 5_000 + "]" * 5_000 + "\n"
    assert 10_000 <= len(text.encode()) < 11_000
    assert str(refused(text)) == f"nested deeper than {MAX_DEPTH} levels at line 2"


def test_block_nesting_names_the_line_where_it_goes_too_deep() -> None:
    lines = ["a:"] + ["  " * level + "-" for level in range(1, 40)]
    error = refused("\n".join(lines) + " x\n")
    assert str(error) == f"nested deeper than {MAX_DEPTH} levels at line {MAX_DEPTH + 1}"
    assert error.line == MAX_DEPTH + 1


def test_max_depth_is_a_parameter() -> None:
    assert load("a: {b: 1}\n", max_depth=2) == {"a": {"b": 1}}
    assert str(refused("a:\n  b: [1]\n", max_depth=2)) == "nested deeper than 2 levels at line 2"


def test_depth_through_an_alias_counts() -> None:
    deep = "[" * 20 + "]" * 20
    text = f"a: &a {deep}\nb: " + "[" * 15 + "*a" + "]" * 15 + "\n"
    error = refused(text)
    assert str(error) == f"nested deeper than {MAX_DEPTH} levels at line 2 (through alias `*a`)"


# ---------------------------------------------------------------------------------------------------------------
# Aliases


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijklmnop"
    for previous, name in zip(names, names[1:levels], strict=False):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly() -> None:
    started = time.perf_counter()
    error = refused(_billion_laughs())
    assert time.perf_counter() - started < 2
    assert str(error).startswith(f"aliases repeat more than {MAX_ALIAS_NODES} values (limit reached by `*")
    assert error.line is not None and 2 <= error.line <= 9


def test_a_few_aliases_are_fine() -> None:
    assert load(_billion_laughs(levels=2))["b"] == [["lol"] * 9] * 9


def test_alias_budget_is_a_parameter() -> None:
    text = "a: &a [1, 2, 3]\nb: [*a, *a]\n"
    assert load(text, max_alias_nodes=8) == {"a": [1, 2, 3], "b": [[1, 2, 3], [1, 2, 3]]}
    assert "aliases repeat more than 7 values" in str(refused(text, max_alias_nodes=7))


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: [1, *a]}\n"])
def test_recursive_aliases_are_refused(text: str) -> None:
    assert str(refused(text)) == "alias `*a` on line 1 refers to a collection that holds it"


# ---------------------------------------------------------------------------------------------------------------
# config.yaml uses it


def test_config_refuses_duplicate_keys_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("generation:\n  temperature: 0\n  temperature: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:3:3: duplicate key `temperature` on line 3 (first on line 2)"


def test_config_refuses_deep_nesting_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  dir: " + "[" * 5_000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2:38: nested deeper than {MAX_DEPTH} levels at line 2"


@pytest.mark.parametrize("text", ["a\u2028b", "a\u0085b", "a\u2029b", "café ☕", "plain"])
def test_dump_exact_loads_back_as_written(text: str) -> None:
    """PyYAML writes U+0085/U+2028/U+2029 raw with allow_unicode and reads them as line breaks: not here."""
    from batch.strict_yaml import dump_exact

    data = {"prompt": text, "inputs": [f"/m/{text}.jpg"]}
    dumped = dump_exact(data)
    assert yaml.safe_load(dumped) == data
    if text in ("café ☕", "plain"):
        assert text in dumped  # readable where that is exact
