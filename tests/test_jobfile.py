"""The job file format: job files parsed, validated and resolved against real files, folders, globs and symlinks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from batch.errors import VlbatchError
from batch.infer.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool import jobfile
from batch.service.spool.jobfile import (
    MAX_INPUTS,
    MAX_JOB_BYTES,
    MAX_MEDIA_FILES,
    MAX_TOGETHER,
    MAX_YAML_DEPTH,
    Job,
    JobRejected,
    load_job_text,
    parse_job,
)
from batch.service.spool.spool import is_job_name

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "jobs" / "examples"
REPO_MEDIA = REPO / "jobs" / "media"

GEN = GenerationSettings(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=7)
MEDIA = MediaSettings(max_tiles=12, video_frames=8)


def png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def touch(path: Path, data: bytes = b"x") -> Path:
    """A file whose contents do not matter (parse_job never decodes media)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_job(folder: Path, text: str, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def parse(path: Path, roots: list[Path] | None = None, **kwargs) -> Job:
    return parse_job(path, allowed_roots=roots or [], generation=GEN, media=MEDIA, **kwargs)


def rejected(path: Path, roots: list[Path] | None = None, **kwargs) -> str:
    with pytest.raises(JobRejected) as info:
        parse(path, roots, **kwargs)
    assert info.value.path == path
    assert str(info.value) == f"{path}: {info.value.reason}"
    return info.value.reason


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """A job folder holding one image, a photos/ tree and a clip."""
    folder = tmp_path / "inbox"
    png(folder / "a.png")
    png(folder / "photos" / "b.jpg")
    png(folder / "photos" / "sub" / "c.png")
    touch(folder / "photos" / "notes.txt")
    png(folder / "photos" / ".hidden.png")
    png(folder / "photos" / ".cache" / "d.png")
    touch(folder / "clip.mp4")
    return folder


def job_text(inputs: str = "a.png", **extra: object) -> str:
    lines = ["prompt: Describe this photo.", f"inputs: {inputs}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Happy paths


def test_minimal_job_defaults(inbox: Path) -> None:
    path = write_job(inbox, job_text(), name="holiday-captions.yaml")
    job = parse(path)
    assert job.id == "holiday-captions"
    assert job.source == path.resolve()
    assert job.prompt == "Describe this photo."
    assert job.mode == "each"
    assert job.media == ((inbox / "a.png").resolve(),)
    assert job.generation == GEN
    assert job.media_settings == MEDIA
    assert (job.sidecar, job.sidecar_overwrite, job.tags) == (None, False, [])
    assert job.inputs == ("a.png",)
    assert job.content_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert job.units() == [((inbox / "a.png").resolve(),)]


def test_full_example_from_the_format(inbox: Path) -> None:
    text = """\
id: holiday-captions          # optional
prompt: Describe this photo.
inputs:
  - photos/
  - "extra/*.jpg"
  - clip.mp4
mode: each
max_new_tokens: 128
temperature: 0
video_frames: 4
max_tiles: 6
sidecar: true
sidecar_overwrite: false
tags: [holiday, 2024]
"""
    png(inbox / "extra" / "e.jpg")
    job = parse(write_job(inbox, text))
    real = inbox.resolve()
    assert job.id == "holiday-captions"
    assert job.media == (
        real / "clip.mp4",
        real / "extra" / "e.jpg",
        real / "photos" / "b.jpg",
        real / "photos" / "sub" / "c.png",
    )
    assert job.inputs == ("photos/", "extra/*.jpg", "clip.mp4")
    assert job.generation.max_new_tokens == 128 and job.generation.seed == 7  # override over the defaults
    assert job.media_settings == MediaSettings(max_tiles=6, video_frames=4)
    assert job.sidecar == "txt"  # true is the .txt sidecar
    assert job.tags == ["holiday", "2024"]  # an unquoted number kept as the text written


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_media(inbox: Path) -> None:
    job = parse(write_job(inbox, job_text("photos")))
    real = inbox.resolve() / "photos"
    assert job.media == (real / "b.jpg", real / "sub" / "c.png")


def test_uppercase_suffixes_count_as_media(tmp_path: Path) -> None:
    png(tmp_path / "pics" / "IMG_1.JPG")
    job = parse(write_job(tmp_path, job_text("pics")))
    assert [p.name for p in job.media] == ["IMG_1.JPG"]


def test_glob_with_double_star(inbox: Path) -> None:
    job = parse(write_job(inbox, job_text('"photos/**/*.png"')))
    assert job.media == (inbox.resolve() / "photos" / "sub" / "c.png",)


def test_inputs_as_one_string_and_duplicates_collapse(inbox: Path) -> None:
    text = "prompt: p\ninputs: [a.png, ./a.png, '*.png', photos/.., photos/sub/c.png, photos]\n"
    job = parse(write_job(inbox, text))
    real = inbox.resolve()
    assert job.media == (
        real / "a.png",
        real / "clip.mp4",
        real / "photos" / "b.jpg",
        real / "photos" / "sub" / "c.png",
    )
    assert len(set(job.media)) == len(job.media)


def test_relative_inputs_resolve_against_base_dir(tmp_path: Path) -> None:
    png(tmp_path / "library" / "x.png")
    path = write_job(tmp_path / "queue", job_text("x.png"))
    job = parse(path, [tmp_path / "library"], base_dir=tmp_path / "library")
    assert job.media == ((tmp_path / "library" / "x.png").resolve(),)


def test_media_in_an_allowed_root_via_dotdot(tmp_path: Path) -> None:
    png(tmp_path / "media" / "x.png")
    path = write_job(tmp_path / "jobs", job_text("../media/x.png"))
    assert parse(path, [tmp_path / "media"]).media == ((tmp_path / "media" / "x.png").resolve(),)


def test_absolute_input_inside_a_root(tmp_path: Path) -> None:
    image = png(tmp_path / "media" / "x.png")
    path = write_job(tmp_path / "jobs", job_text(str(image)))
    assert parse(path, [tmp_path / "media"]).media == (image.resolve(),)


def test_symlink_that_stays_inside_the_roots_is_followed(tmp_path: Path) -> None:
    image = png(tmp_path / "media" / "x.png")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "link.png").symlink_to(image)
    (tmp_path / "jobs" / "folder").symlink_to(tmp_path / "media", target_is_directory=True)
    path = write_job(tmp_path / "jobs", "prompt: p\ninputs: [link.png, folder]\n")
    assert parse(path, [tmp_path / "media"]).media == (image.resolve(),)


def test_symlink_loop_inside_a_folder_terminates(tmp_path: Path) -> None:
    png(tmp_path / "pics" / "x.png")
    (tmp_path / "pics" / "loop").symlink_to(tmp_path / "pics", target_is_directory=True)
    job = parse(write_job(tmp_path, job_text("pics")))
    assert job.media == ((tmp_path / "pics" / "x.png").resolve(),)


def test_together_with_four_images(tmp_path: Path) -> None:
    images = [png(tmp_path / f"{i}.png") for i in range(MAX_TOGETHER)]
    job = parse(write_job(tmp_path, job_text("'*.png'", mode="together")))
    assert job.mode == "together"
    assert job.units() == [tuple(p.resolve() for p in images)]


def test_units_each(inbox: Path) -> None:
    job = parse(write_job(inbox, job_text("photos")))
    assert job.units() == [(p,) for p in job.media]


def test_overrides_merge_over_the_defaults_passed_in(inbox: Path) -> None:
    text = job_text(temperature=0.7, top_p=0.9, top_k=20, seed="null", max_tiles=2)
    job = parse(write_job(inbox, text))
    assert job.generation == GenerationSettings(max_new_tokens=64, temperature=0.7, top_k=20, top_p=0.9, seed=None)
    assert job.media_settings == MediaSettings(max_tiles=2, video_frames=8)
    assert parse(write_job(inbox, job_text())).generation == GEN


def test_tags_mapping(inbox: Path) -> None:
    text = job_text(tags="{trip: Rome, year: 2024, rated: true, note: null, day: 2024-06-01}")
    job = parse(write_job(inbox, text))
    assert job.tags == {"trip": "Rome", "year": 2024, "rated": True, "note": None, "day": "2024-06-01"}
    json.dumps(job.tags)


def test_prompt_block_scalar_is_trimmed(inbox: Path) -> None:
    job = parse(write_job(inbox, "prompt: |\n  Line one.\n  Line two.\ninputs: a.png\n"))
    assert job.prompt == "Line one.\nLine two."


def test_utf8_bom_and_non_ascii_are_fine(inbox: Path) -> None:
    path = inbox / "job.yml"
    path.write_bytes("\ufeffprompt: Décris cette photo.\ninputs: a.png\n".encode())
    assert parse(path).prompt == "Décris cette photo."


def test_a_job_file_of_exactly_the_size_limit_is_read(inbox: Path) -> None:
    text = job_text()
    path = write_job(inbox, text + "#" * (MAX_JOB_BYTES - len(text.encode()) - 1) + "\n")
    assert path.stat().st_size == MAX_JOB_BYTES
    assert parse(path).prompt


def test_a_rejection_names_the_file_and_keeps_the_reason() -> None:
    assert issubclass(JobRejected, VlbatchError)
    error = JobRejected(Path("x.yaml"), "bad")
    assert (str(error), error.reason) == ("x.yaml: bad", "bad")


# ---------------------------------------------------------------------------------------------------------------
# The job file itself


def test_symlinked_job_file(inbox: Path) -> None:
    real = write_job(inbox, job_text(), name="real.yaml")
    link = inbox / "link.yaml"
    link.symlink_to(real)
    assert "job file is a symlink" in rejected(link)


def test_oversized_job_file(inbox: Path) -> None:
    path = write_job(inbox, job_text() + "#" * MAX_JOB_BYTES + "\n")
    reason = rejected(path)
    assert "too large" in reason and str(path.stat().st_size) in reason and str(MAX_JOB_BYTES) in reason


def test_missing_job_file(tmp_path: Path) -> None:
    assert "job file not found" in rejected(tmp_path / "nope.yaml")


def test_not_utf8(inbox: Path) -> None:
    path = inbox / "job.yaml"
    path.write_bytes("prompt: Décris\ninputs: a.png\n".encode("latin-1"))
    assert "not UTF-8" in rejected(path)


def test_malformed_yaml_names_line_and_column(inbox: Path) -> None:
    reason = rejected(write_job(inbox, "prompt: p\ninputs: [a.png,\nmode: each\n"))
    assert reason.startswith("malformed YAML at line ")
    assert re.search(r"line \d+, column \d+", reason)


def test_tab_indentation_is_malformed(inbox: Path) -> None:
    assert "line 3" in rejected(write_job(inbox, "prompt: p\ninputs:\n\t- a.png\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "got a list"), ("just text\n", "got text"), ("", "job file is empty"), ("# c\n", "empty")],
)
def test_not_a_mapping(inbox: Path, text: str, expected: str) -> None:
    assert expected in rejected(write_job(inbox, text))


def test_python_tags_are_refused(inbox: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"prompt: !!python/object/apply:os.system ['touch {marker}']\ninputs: a.png\n"
    reason = rejected(write_job(inbox, text))
    assert "unsupported YAML tag '!!python/object/apply:os.system'" in reason
    assert "line 1, column 9" in reason
    assert not marker.exists()


def test_custom_tags_are_refused(inbox: Path) -> None:
    assert "unsupported YAML tag '!secret'" in rejected(write_job(inbox, "prompt: !secret x\ninputs: a.png\n"))


def test_two_documents(inbox: Path) -> None:
    assert "malformed YAML" in rejected(write_job(inbox, job_text() + "---\nprompt: q\n"))


def test_duplicate_key_names_the_key_and_both_lines(inbox: Path) -> None:
    reason = rejected(write_job(inbox, "prompt: Describe.\ninputs: a.png\nmode: each\nprompt: Other.\n"))
    assert reason == "duplicate key `prompt` on line 4 (first on line 1)"


def test_duplicate_key_inside_tags(inbox: Path) -> None:
    reason = rejected(write_job(inbox, job_text(tags="{trip: Rome, trip: Paris}")))
    assert reason == "duplicate key `trip` on line 3 (first on line 3)"


@pytest.mark.parametrize(("opening", "closing"), [("[", "]"), ("{", "}")])
def test_deeply_nested_job_file_is_refused_without_recursing(inbox: Path, opening: str, closing: str) -> None:
    path = write_job(inbox, "prompt: p\ninputs: " + opening * 5_000 + closing * 5_000 + "\n")
    assert 10_000 <= path.stat().st_size < 11_000
    assert rejected(path) == f"nested deeper than {MAX_YAML_DEPTH} levels at line 2"


def test_deepest_allowed_nesting_gets_to_the_type_checks(inbox: Path) -> None:
    deep = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    assert "'inputs' must be text or a list of text" in rejected(write_job(inbox, f"prompt: p\ninputs: {deep}\n"))


def test_alias_bomb_is_refused(inbox: Path) -> None:
    lines = ["prompt: p", "inputs: a.png", 'tags: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*{'a' if i == 0 else f'a{i - 1}'}"] * 9) + "]" for i in range(8)]
    reason = rejected(write_job(inbox, "\n".join(lines) + "\n"))
    assert reason.startswith("aliases repeat more than ") and "values (limit reached by `*a" in reason


def test_recursive_alias_is_refused(inbox: Path) -> None:
    reason = rejected(write_job(inbox, "prompt: p\ninputs: &i [a.png, *i]\n"))
    assert reason == "alias `*i` on line 2 refers to a collection that holds it"


def test_unexpected_error_while_parsing_becomes_a_rejection(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(mapping: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(jobfile, "_tags", boom)
    path = write_job(inbox, job_text())
    with pytest.raises(JobRejected) as info:
        parse(path)
    assert info.value.reason == "cannot parse the job file (RuntimeError: boom)"
    assert info.value.path == path and isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("helper", "error", "expected"),
    [
        ("_decode", RecursionError("maximum recursion depth exceeded"), "RecursionError: maximum recursion depth"),
        ("_decode", UnicodeError("odd text"), "UnicodeError: odd text"),
        ("_read_job_bytes", OSError(5, "Input/output error"), "OSError: [Errno 5] Input/output error"),
        ("_load_mapping", TypeError("unhashable"), "TypeError: unhashable"),
        ("_roots", ValueError("bad root"), "ValueError: bad root"),
    ],
)
def test_unexpected_errors_anywhere_in_parsing_are_named(
    inbox: Path, monkeypatch: pytest.MonkeyPatch, helper: str, error: Exception, expected: str
) -> None:
    def raise_it(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(jobfile, helper, raise_it)
    path = write_job(inbox, job_text())
    assert rejected(path).startswith(f"cannot parse the job file ({expected}")
    with pytest.raises(JobRejected):
        load_job_text(path) if helper != "_roots" else parse(path)


def test_memory_error_is_not_blamed_on_the_job(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(jobfile, "_decode", out_of_memory)
    with pytest.raises(MemoryError):
        parse(write_job(inbox, job_text()))


# ---------------------------------------------------------------------------------------------------------------
# Keys, types and values


def test_missing_prompt(inbox: Path) -> None:
    assert "missing required key 'prompt'" in rejected(write_job(inbox, "inputs: a.png\n"))


@pytest.mark.parametrize("prompt", ['""', "'   '"])
def test_empty_prompt(inbox: Path, prompt: str) -> None:
    assert "'prompt' is empty" in rejected(write_job(inbox, f"prompt: {prompt}\ninputs: a.png\n"))


@pytest.mark.parametrize("text", ["prompt: Write a haiku.\n", "prompt: Write a haiku.\ninputs: []\n"])
def test_a_job_without_inputs_is_one_text_only_question(inbox: Path, text: str) -> None:
    job = parse(write_job(inbox, text))
    assert job.media == () and job.units() == [()]


def test_empty_input_entries(inbox: Path) -> None:
    assert "empty entry" in rejected(write_job(inbox, job_text("['']")))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("prompt", "5", "'prompt' must be text, got a number (5)"),
        ("inputs", "{a: 1}", "'inputs' must be text or a list of text"),
        ("inputs", "[a.png, 3]", "'inputs' must be text or a list of text (paths, folders, globs), got a number (3)"),
        ("max_new_tokens", "ten", "'max_new_tokens' must be an integer, got text ('ten')"),
        ("max_new_tokens", "12.5", "'max_new_tokens' must be an integer, got a number (12.5)"),
        ("temperature", "hot", "'temperature' must be a number"),
        ("top_k", "true", "'top_k' must be an integer, got true/false"),
        ("seed", "1.5", "'seed' must be an integer or null"),
        ("video_frames", "[8]", "'video_frames' must be an integer, got a list"),
        ("sidecar", '"yes"', "'sidecar' must be true, false, txt or xmp (true = txt"),
        ("sidecar_overwrite", "1", "'sidecar_overwrite' must be true or false, got a number (1)"),
        ("mode", "[each]", "'mode' must be text, got a list"),
        ("id", "2024", "'id' must be text, got a number (2024); quote it"),
        ("tags", "5", "'tags' must be a list of text or a mapping of names to values, got a number (5)"),
        ("tags", "[[a, b]]", "'tags' list entries must be text, got a list"),
        ("tags", "{a: [1]}", "tag 'a' must be a single value"),
        ("tags", "{1: a}", "'tags' mapping keys must be text"),
    ],
)
def test_wrong_types(inbox: Path, key: str, value: str, expected: str) -> None:
    data = {"prompt": "Describe.", "inputs": "a.png"}
    lines = [f"{k}: {v}" for k, v in data.items() if k != key] + [f"{key}: {value}"]
    assert expected in rejected(write_job(inbox, "\n".join(lines) + "\n"))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("mode", "both", "'mode' must be 'each' or 'together', got 'both'"),
        ("temperature", "-1", "'temperature' must be 0 (greedy) or more, got -1"),
        ("temperature", ".nan", "temperature must be a number, got NaN"),
        ("max_new_tokens", "0", "max_new_tokens must be at least 1, got 0"),
        ("top_p", "0", "top_p must be in (0, 1]"),
        ("top_p", "1.5", "top_p must be in (0, 1]"),
        ("top_k", "-3", "top_k must be a non-negative integer"),
        ("max_tiles", "0", "media setting `max_tiles` must be a positive integer, got 0"),
        ("video_frames", "-2", "media setting `video_frames` must be a positive integer"),
        ("id", "a/b", "'id' must not start with '.' or hold slashes"),
        ("id", "'.hidden'", "'id' must not start with '.'"),
        ("id", "''", "'id' must be non-empty"),
    ],
)
def test_invalid_values(inbox: Path, key: str, value: str, expected: str) -> None:
    assert expected in rejected(write_job(inbox, job_text(**{key: value})))


def test_unknown_key_suggests_the_close_one(inbox: Path) -> None:
    reason = rejected(write_job(inbox, "promt: p\ninputs: a.png\n"))
    assert "unknown key 'promt' (did you mean 'prompt'?)" in reason


def test_unknown_key_without_a_close_one_lists_the_known(inbox: Path) -> None:
    reason = rejected(write_job(inbox, job_text(colour="red")))
    assert "unknown key 'colour'" in reason and "known keys:" in reason and "max_new_tokens" in reason


def test_unknown_keys_come_before_file_system_checks(inbox: Path) -> None:
    reason = rejected(write_job(inbox, "prompt: p\ninputs: missing.png\ntemprature: 0\n"))
    assert reason == "unknown key 'temprature' (did you mean 'temperature'?)"


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the allowed roots


def test_dotdot_leaving_the_roots(tmp_path: Path) -> None:
    png(tmp_path / "secret.png")
    path = write_job(tmp_path / "jobs", job_text("../secret.png"))
    assert "outside the allowed media folders" in rejected(path, [tmp_path / "media"])


def test_dotdot_leaving_the_roots_to_a_missing_file_says_outside(tmp_path: Path) -> None:
    path = write_job(tmp_path / "jobs", job_text("../../../etc/nothing-here.png"))
    assert "outside the allowed media folders" in rejected(path)


def test_absolute_path_outside_the_roots(tmp_path: Path) -> None:
    image = png(tmp_path / "elsewhere" / "x.png")
    path = write_job(tmp_path / "jobs", job_text(str(image)))
    reason = rejected(path, [tmp_path / "media"])
    assert "outside the allowed media folders" in reason and str(image) in reason


def test_root_prefix_is_not_enough(tmp_path: Path) -> None:
    image = png(tmp_path / "media-other" / "x.png")  # shares the text prefix of the root, not the folder
    path = write_job(tmp_path / "jobs", job_text(str(image)))
    assert "outside the allowed media folders" in rejected(path, [tmp_path / "media"])


def test_symlinked_file_escaping(tmp_path: Path) -> None:
    secret = png(tmp_path / "private" / "x.png")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "x.png").symlink_to(secret)
    assert "outside the allowed media folders" in rejected(write_job(tmp_path / "jobs", job_text("x.png")))


def test_symlinked_folder_escaping(tmp_path: Path) -> None:
    png(tmp_path / "private" / "x.png")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "pics").symlink_to(tmp_path / "private", target_is_directory=True)
    assert "outside the allowed media folders" in rejected(write_job(tmp_path / "jobs", job_text("pics/")))


def test_symlink_inside_a_folder_escaping(tmp_path: Path) -> None:
    secret = png(tmp_path / "private" / "x.png")
    png(tmp_path / "jobs" / "pics" / "ok.png")
    (tmp_path / "jobs" / "pics" / "sneaky.png").symlink_to(secret)
    reason = rejected(write_job(tmp_path / "jobs", job_text("pics")))
    assert "outside the allowed media folders" in reason and "sneaky.png" in reason


def test_symlinked_subfolder_escaping(tmp_path: Path) -> None:
    png(tmp_path / "private" / "x.png")
    png(tmp_path / "jobs" / "pics" / "ok.png")
    (tmp_path / "jobs" / "pics" / "more").symlink_to(tmp_path / "private", target_is_directory=True)
    assert "outside the allowed media folders" in rejected(write_job(tmp_path / "jobs", job_text("pics")))


def test_glob_match_escaping_through_a_symlink(tmp_path: Path) -> None:
    secret = png(tmp_path / "private" / "x.png")
    png(tmp_path / "jobs" / "ok.png")
    (tmp_path / "jobs" / "sneaky.png").symlink_to(secret)
    assert "outside the allowed media folders" in rejected(write_job(tmp_path / "jobs", job_text("'*.png'")))


def test_glob_searching_outside_the_roots(tmp_path: Path) -> None:
    png(tmp_path / "private" / "x.png")
    path = write_job(tmp_path / "jobs", job_text("'../private/*.png'"))
    assert "outside the allowed media folders" in rejected(path)


def test_missing_file(inbox: Path) -> None:
    reason = rejected(write_job(inbox, job_text("nope.png")))
    assert "input 'nope.png' not found" in reason


def test_broken_symlink_is_not_found(inbox: Path) -> None:
    (inbox / "gone.png").symlink_to(inbox / "never-there.png")
    assert "not found" in rejected(write_job(inbox, job_text("gone.png")))


def test_unsupported_extension_named_explicitly(inbox: Path) -> None:
    reason = rejected(write_job(inbox, job_text("photos/notes.txt")))
    assert "'photos/notes.txt'" in reason and "unsupported file type '.txt'" in reason
    assert all(suffix in reason for suffix in [*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS])


def test_folder_without_media(inbox: Path) -> None:
    touch(inbox / "docs" / "readme.txt")
    png(inbox / "docs" / ".thumb.png")
    assert "folder 'docs' holds no images or videos" in rejected(write_job(inbox, job_text("docs")))


def test_glob_matching_nothing(inbox: Path) -> None:
    assert "glob '*.webp' matches nothing" in rejected(write_job(inbox, job_text("'*.webp'")))


def test_glob_matching_no_media(inbox: Path) -> None:
    assert "glob 'photos/*.txt' matches no images or videos" in rejected(write_job(inbox, job_text("photos/*.txt")))


def test_every_input_must_match_even_when_others_do(inbox: Path) -> None:
    assert "not found" in rejected(write_job(inbox, "prompt: p\ninputs: [a.png, b.png]\n"))


# ---------------------------------------------------------------------------------------------------------------
# Caps on a job's size


def test_default_caps() -> None:
    assert (MAX_INPUTS, MAX_MEDIA_FILES) == (1_000, 100_000)


def test_too_many_inputs(inbox: Path) -> None:
    assert parse(write_job(inbox, job_text("[" + ", ".join(["a.png"] * MAX_INPUTS) + "]"))).media
    reason = rejected(write_job(inbox, job_text("[" + ", ".join(["a.png"] * (MAX_INPUTS + 1)) + "]")))
    assert reason == (
        f"'inputs' has {MAX_INPUTS + 1} entries; a job takes at most {MAX_INPUTS}: split it into several job files"
    )


def _pictures(folder: Path, count: int) -> None:
    for i in range(count):
        touch(folder / f"{i:03}.png")


@pytest.fixture
def cap(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(jobfile, "MAX_MEDIA_FILES", 5)
    return 5


def test_folder_with_more_media_than_the_cap(tmp_path: Path, cap: int) -> None:
    _pictures(tmp_path / "pics", cap)
    assert len(parse(write_job(tmp_path, job_text("pics"))).media) == cap
    touch(tmp_path / "pics" / "sub" / "extra.jpg")
    reason = rejected(write_job(tmp_path, job_text("pics")))
    assert reason == (
        f"the inputs match more than {cap} media files (passed while reading 'pics'); "
        f"a job takes at most {cap}: split it into several job files"
    )


def test_glob_with_more_media_than_the_cap(tmp_path: Path, cap: int) -> None:
    _pictures(tmp_path / "pics", cap + 1)
    reason = rejected(write_job(tmp_path, job_text("'pics/*.png'")))
    assert f"more than {cap} media files (passed while reading 'pics/*.png')" in reason and "split" in reason


def test_the_cap_counts_all_inputs_together_but_each_file_once(tmp_path: Path, cap: int) -> None:
    _pictures(tmp_path / "one", 3)
    _pictures(tmp_path / "two", 3)
    assert len(parse(write_job(tmp_path, "prompt: p\ninputs: [one, one/, 'one/*.png', one/000.png]\n")).media) == 3
    reason = rejected(write_job(tmp_path, "prompt: p\ninputs: [one, 'two/*.png']\n"))
    assert f"more than {cap} media files (passed while reading 'two/*.png')" in reason


def test_walking_stops_as_soon_as_the_cap_is_passed(tmp_path: Path, cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _pictures(tmp_path / "pics", 60)
    yielded = []
    walk = jobfile._Resolver._walk

    def counting_walk(self: object, folder: Path, spec: str):  # type: ignore[no-untyped-def]
        for path in walk(self, folder, spec):
            yielded.append(path)
            yield path

    monkeypatch.setattr(jobfile._Resolver, "_walk", counting_walk)
    assert "more than 5 media files" in rejected(write_job(tmp_path, job_text("pics")))
    assert len(yielded) == cap + 1


def test_globbing_stops_as_soon_as_the_cap_is_passed(tmp_path: Path, cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _pictures(tmp_path / "pics", 60)
    produced = []
    iglob = jobfile.glob.iglob

    def counting_iglob(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for match in iglob(*args, **kwargs):
            produced.append(match)
            yield match

    monkeypatch.setattr(jobfile.glob, "iglob", counting_iglob)
    assert "more than 5 media files" in rejected(write_job(tmp_path, job_text("'pics/*.png'")))
    assert len(produced) == cap + 1


# ---------------------------------------------------------------------------------------------------------------
# Mode together and sidecars


def test_together_with_too_many_images(tmp_path: Path) -> None:
    for i in range(MAX_TOGETHER + 1):
        png(tmp_path / f"{i}.png")
    reason = rejected(write_job(tmp_path, job_text("'*.png'", mode="together")))
    assert f"at most {MAX_TOGETHER} images" in reason and str(MAX_TOGETHER + 1) in reason


def test_together_with_a_video(inbox: Path) -> None:
    reason = rejected(write_job(inbox, "prompt: p\ninputs: [a.png, clip.mp4]\nmode: together\n"))
    assert "images only" in reason and "clip.mp4" in reason


def test_sidecar_with_together(inbox: Path) -> None:
    assert "sidecar: true needs mode each" in rejected(write_job(inbox, job_text(mode="together", sidecar="true")))


# ---------------------------------------------------------------------------------------------------------------
# The shipped examples


def _synthesise_media(job_file: Path) -> None:
    """Create a tiny PNG (or placeholder video) for every input an example names, so it can resolve."""
    data = yaml.safe_load(job_file.read_text(encoding="utf-8"))
    inputs = data.get("inputs", [])
    for spec in [inputs] if isinstance(inputs, str) else inputs:
        target = job_file.parent / spec
        suffix = Path(spec).suffix.lower()
        if any(ch in spec for ch in "*?["):
            name = re.sub(r"\[([^\]])[^\]]*\]", r"\1", spec.replace("**/", "").replace("**", "x"))
            name = name.replace("*", "sample").replace("?", "x")
            target, suffix = job_file.parent / name, Path(name).suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            touch(target, b"\x00\x00\x00\x18ftypmp42")
        elif suffix in IMAGE_EXTENSIONS:
            png(target)
        else:
            png(target / "sample.png")


def _example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*") if is_job_name(p.name)) if EXAMPLES.is_dir() else []


@pytest.mark.parametrize("media", ["repo", "synthetic"])
@pytest.mark.parametrize("example", _example_files(), ids=lambda p: p.name)
def test_example_jobs_parse(example: Path, media: str, tmp_path: Path) -> None:
    """Every shipped example parses: against jobs/media when present, and against synthetic media in a copy."""
    if media == "repo":
        if not REPO_MEDIA.is_dir():
            pytest.skip("no jobs/media folder")
        job = parse(example, [REPO_MEDIA])
    else:
        copy = tmp_path / "examples" / example.name
        copy.parent.mkdir()
        shutil.copy(example, copy)
        (tmp_path / "media").mkdir()
        _synthesise_media(copy)
        job = parse(copy, [tmp_path / "media"])
    assert job.media and job.units()
    assert all(path.is_file() for path in job.media)


def test_symlinked_roots_are_compared_by_real_path(tmp_path: Path) -> None:
    image = png(tmp_path / "real-media" / "x.png")
    os.symlink(tmp_path / "real-media", tmp_path / "media")
    path = write_job(tmp_path / "jobs", job_text(str(tmp_path / "media" / "x.png")))
    assert parse(path, [tmp_path / "media"]).media == (image.resolve(),)
