"""`vlbatch results` and `gallery` answering the questions people ask: what the last night made (--since by the
answer's own time, --last-run), one file's history (--file), literal words (-s) beside raw FTS5 (--fts), exports
that hold every row in every machine format, OpenAI Batch custom_ids that map back to their files, one JSON shape."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv
from web_env import cards_of

from batch.cli import main
from batch.service.store.paths import decode_path, encode_path
from batch.service.worker.worker import Worker

pytestmark = pytest.mark.slow

FOLDER_JOB = "id: folder\nprompt: Caption it.\ninputs: {folder}\nmax_tiles: 1\nmax_new_tokens: 4\n"
STANDING_JOB = "id: nightly\nprompt: Name it.\ninputs: {folder}\nmax_tiles: 1\nmax_new_tokens: 4\n"
PROMPTS = {  # text-only jobs whose prompts hold words that are FTS5 syntax, or not a word at all, when unquoted
    "file-name": "Is n4.jpg the harbour?",
    "contraction": "Say why we don't stop.",
    "language": "Explain C++ templates AND macros.",
    "quote": 'Quote "this" line.',
    "lookalikes": "Is a png file of vitamin C, a_png, in the photos?",
    "chinese": "一只猫坐在草地上",
}


def drain(env: SpoolEnv) -> dict[str, str]:
    worker = Worker.from_config(env.config())
    try:
        return {o.job_id: o.state for o in worker.drain()}
    finally:
        worker.close()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def invoke(env: SpoolEnv, *args: str, cwd: Path | None = None):
    """`vlbatch --config ENV ARGS` in-process (from `cwd` when given); stdout and stderr apart."""
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["--config", str(env.config_path), *args], catch_exceptions=False)
    finally:
        os.chdir(old)


def rows(env: SpoolEnv, *args: str, cwd: Path | None = None) -> list[dict]:
    result = invoke(env, "results", "--json", *args, cwd=cwd)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def said(stderr: str) -> str:
    """What a command told its user on stderr, without the log lines (`ts=... event=...`)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("ts="))


def names(found: list[dict]) -> list[str]:
    return sorted(Path(decode_path(r["media_paths"][0])).name for r in found)


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path):
    """Night 1 answers a.jpg and b.jpg for an inbox job run again each night (`folder`) and for a standing job
    (`nightly`); c.jpg and d.jpg arrive during the day; night 2 runs both again. Returns (env, a time between)."""
    env = SpoolEnv(tmp_path_factory.mktemp("nights"), tiny_onnx)
    env.write_config(settle=0.05)
    photos = env.media / "photos"
    for i, name in enumerate(("a.jpg", "b.jpg")):
        env.image(f"photos/{name}", seed=i)
    standing = env.jobs / "standing"
    standing.mkdir(parents=True)
    (standing / "nightly.yaml").write_text(STANDING_JOB.format(folder=photos))
    env.drop("folder.yaml", FOLDER_JOB.format(folder=photos))
    assert drain(env) == {"folder": "done", "nightly": "done"}
    time.sleep(0.05)
    between = utc_now()
    time.sleep(0.05)
    for i, name in enumerate(("c.jpg", "d.jpg"), start=2):
        env.image(f"photos/{name}", seed=i)
    time.sleep(0.1)  # older than settle_seconds: the standing pass takes them at once
    env.drop("folder.yaml", FOLDER_JOB.format(folder=photos))
    assert drain(env) == {"folder": "done", "nightly": "done"}
    return env, between


def test_since_selects_answers_by_when_they_were_made(nights) -> None:
    env, between = nights
    assert names(rows(env, "--job", "folder", "--since", between)) == ["c.jpg", "d.jpg"]
    assert names(rows(env, "--job", "nightly", "--since", between)) == ["c.jpg", "d.jpg"]
    assert names(rows(env, "--job", "folder", "--until", between)) == ["a.jpg", "b.jpg"]  # reused: made night 1
    latest = rows(env, "--job", "folder")
    assert names(latest) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # the latest run holds all four
    for row in latest:
        made_before = row["created_utc"] < between
        assert made_before == bool(row["reused"]) == (names([row]) in (["a.jpg"], ["b.jpg"]))
        assert row["linked_utc"] > between  # linked by night 2's run, whenever the answer was made


def test_last_run_lists_everything_each_jobs_latest_run_touched(nights) -> None:
    env, between = nights
    touched = rows(env, "--last-run")
    by_job = {job: names([r for r in touched if r["job_id"] == job]) for job in ("folder", "nightly")}
    assert by_job == {"folder": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "nightly": ["c.jpg", "d.jpg"]}
    assert sum(r["reused"] for r in touched) == 2  # the folder job's a and b, linked again
    assert len({r["run_id"] for r in touched}) == 2
    assert names(rows(env, "--job", "nightly")) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # what each file has now
    both = invoke(env, "results", "--run", "1", "--last-run")
    assert both.exit_code == 2 and "--run and --last-run" in both.stderr


def test_gallery_since_shows_the_new_answers_only(nights, tmp_path: Path) -> None:
    env, between = nights
    out = tmp_path / "last-night"
    written = invoke(env, "gallery", str(out), "--since", between, "--json", "--thumbnail-cache", str(tmp_path / "c"))
    assert written.exit_code == 0, written.stderr
    summary = json.loads(written.stdout)
    assert summary["results"] == 4 and summary["pages"] == 1 and summary["index"] == str(out / "index.html")
    cards = cards_of((out / "index.html").read_text(encoding="utf-8"))
    assert len(cards) == 4
    assert sorted(re.search(r'alt="([^"]+)"', card).group(1) for card in cards) == ["c.jpg", "c.jpg", "d.jpg", "d.jpg"]
    cache = str(tmp_path / "c")
    one_job = invoke(
        env, "gallery", str(tmp_path / "f"), "--job", "folder", "--since", between, "--json", "--thumbnail-cache", cache
    )
    assert json.loads(one_job.stdout)["results"] == 2


def test_file_lists_every_answer_of_one_file_newest_first(nights) -> None:
    env, between = nights
    photos = env.media / "photos"
    history = rows(env, "--file", str(photos / "a.jpg"))
    # the folder job linked it on both nights (the same answer, reused), the standing job once
    assert sorted((r["job_id"], r["reused"]) for r in history) == [("folder", 0), ("folder", 1), ("nightly", 0)]
    assert [r["linked_utc"] for r in history] == sorted((r["linked_utc"] for r in history), reverse=True)
    assert rows(env, "--file", "a.jpg", cwd=photos) == history  # relative to the current folder
    assert len(rows(env, "--file", str(photos / "*.jpg"))) == 2 * 3 + 2 * 2  # a, b three times; c, d twice
    assert names(rows(env, "--file", str(photos / "[cd].jpg"), "--job", "folder")) == ["c.jpg", "d.jpg"]
    assert rows(env, "--file", str(photos / "nothing.jpg")) == []
    linked = invoke(env, "results", "--file", "photos/b.jpg", cwd=env.media)
    assert linked.exit_code == 0 and linked.stdout.count("b.jpg") == 3
    # a folder is every file under it
    assert rows(env, "--file", str(photos)) == rows(env, "--file", str(photos / "*"))
    assert len(rows(env, "--file", "photos", cwd=env.media)) == 2 * 3 + 2 * 2


def test_a_job_or_run_that_does_not_exist_and_an_empty_time_span_are_said(nights) -> None:
    env, between = nights
    for args, what in ((("--job", "nosuch"), "no job with id 'nosuch'"), (("--run", "999"), "no run 999")):
        for command in (["results", *args], ["gallery", str(env.root / "g"), *args]):
            result = invoke(env, *command)
            assert result.exit_code == 1 and what in said(result.stderr), (command, result.stderr)
    backwards = invoke(env, "results", "--since", "1m", "--until", "1h")
    assert backwards.exit_code == 2 and "is not before --until" in backwards.stderr


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> SpoolEnv:
    """Text-only jobs whose prompts hold n4.jpg, don't, C++, AND and a quoted word."""
    env = SpoolEnv(tmp_path_factory.mktemp("words"), tiny_onnx)
    env.write_config()
    for job_id, prompt in PROMPTS.items():
        env.drop(f"{job_id}.yaml", f"id: {job_id}\nprompt: '{prompt.replace(chr(39), chr(39) * 2)}'\n")
    env.image("broken-source.png", seed=1)
    (env.media / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    env.drop("photos.yaml", "id: photos\nprompt: Caption.\ninputs: ../../media/\nmax_new_tokens: 3\n")
    assert drain(env) == {**dict.fromkeys(PROMPTS, "done"), "photos": "failed"}
    conn = sqlite3.connect(env.db_path)
    with conn:  # the random model's answers may hold any word: the prompts alone decide what is found
        conn.execute("UPDATE results SET answer = 'nothing to see' WHERE answer IS NOT NULL")
    conn.close()
    return env


@pytest.mark.parametrize(
    "words_given, found",
    [
        ("n4.jpg", ["file-name"]),
        ("don't", ["contraction"]),
        ("C++", ["language"]),
        ("AND", ["language"]),
        ("and macros", ["language"]),  # every word, in any order and case
        ("NEAR", []),
        ('"this"', ["quote"]),
        ('"', ["quote"]),  # punctuation alone is a word too
        ("jpg stop", []),
        ("a.png", []),  # not "a png" nor "a_png": the characters as written
        ("c++", ["language"]),  # not "vitamin C,"
        ("photo", ["lookalikes"]),  # a part of a word
        ("坐在", ["chinese"]),  # text without spaces
        ("草地 猫", ["chinese"]),
    ],
)
def test_search_takes_words_literally(words: SpoolEnv, words_given: str, found: list[str]) -> None:
    assert sorted(r["job_id"] for r in rows(words, "-s", words_given)) == found


def test_the_table_never_sends_control_characters_to_the_terminal(words: SpoolEnv) -> None:
    conn = sqlite3.connect(words.db_path)
    (answer_id,) = conn.execute("SELECT min(id) FROM results WHERE answer IS NOT NULL").fetchone()
    with conn:
        conn.execute("UPDATE results SET answer = ? WHERE id = ?", ["\x1b[2Jcleared\x07 \x00end", answer_id])
    try:
        table = invoke(words, "results", "-n", "0").stdout
        assert "\ufffd[2Jcleared\ufffd \ufffdend" in table
        assert not any(not c.isprintable() for c in table.replace("\n", ""))
        shown = [r["answer"] for r in rows(words) if r["id"] == answer_id]
        assert shown == ["\x1b[2Jcleared\x07 \x00end"]  # machine formats keep the text as it is
    finally:
        with conn:
            conn.execute("UPDATE results SET answer = 'nothing to see' WHERE id = ?", [answer_id])
        conn.close()


def test_fts_takes_raw_queries_and_a_bad_one_is_one_line(words: SpoolEnv) -> None:
    assert sorted(r["job_id"] for r in rows(words, "--fts", "n4 OR macros")) == ["file-name", "language"]
    assert sorted(r["job_id"] for r in rows(words, "--fts", "templ*", "-s", "C++")) == ["language"]
    bad = invoke(words, "results", "--fts", "AND")
    assert bad.exit_code == 1 and bad.stdout == ""
    assert said(bad.stderr).count("\n") == 1 and "--fts 'AND' is not a valid SQLite FTS5 query" in bad.stderr
    for query in ('"unclosed', "nosuchcolumn:word"):  # errors SQLite raises while stepping, not preparing
        bad = invoke(words, "results", "--fts", query)
        assert bad.exit_code == 1, bad.stderr
        assert f"--fts {query!r} is not a valid SQLite FTS5 query" in said(bad.stderr)


def test_failed_lists_files_without_an_answer_with_the_reason(words: SpoolEnv) -> None:
    (failure,) = rows(words, "--failed")
    assert names([failure]) == ["broken.jpg"] and failure["answer"] is None and failure["error"]
    table = invoke(words, "results", "--failed")
    assert "broken.jpg" in table.stdout and "ERROR:" in table.stdout and "broken-source" not in table.stdout


def test_json_shapes_are_decoded_values_everywhere(words: SpoolEnv, tmp_path: Path) -> None:
    as_json = invoke(words, "results", "--json")
    assert as_json.stdout == invoke(words, "results", "--format", "json").stdout
    for row in json.loads(as_json.stdout):
        assert isinstance(row["media_paths"], list) and isinstance(row["tags"], list)
        assert isinstance(row["settings"], dict) and isinstance(row["media_sha256"], list)
    for line in invoke(words, "results", "--format", "jsonl").stdout.splitlines():
        assert isinstance(json.loads(line)["settings"], dict)
    (run,) = json.loads(invoke(words, "status", "--job", "photos", "--json").stdout)
    assert run["tags"] == []


def test_submit_and_status_print_json_with_tags_as_values(tmp_path: Path, tiny_onnx: Path) -> None:
    env = SpoolEnv(tmp_path / "site", tiny_onnx)
    env.root.mkdir()
    env.write_config()
    job = tmp_path / "tagged.yaml"
    job.write_text("id: tagged\nprompt: Hi.\ntags: {project: pets}\n")
    submitted = invoke(env, "submit", "--json", str(job))
    assert submitted.exit_code == 0, submitted.stderr
    (entry,) = json.loads(submitted.stdout)["submitted"]
    assert entry["source"] == str(job) and Path(entry["target"]).is_file() and entry["standing"] is False
    assert drain(env) == {"tagged": "done"}
    (tagged,) = json.loads(invoke(env, "status", "--job", "tagged", "--json").stdout)
    assert tagged["tags"] == {"project": "pets"}
    (row,) = rows(env, "--job", "tagged")
    assert row["tags"] == {"project": "pets"}
    refused = tmp_path / "refused.yaml"
    refused.write_text("id: refused\nprompt: Hi.\nmode: sideways\n")
    partly = invoke(env, "submit", "--json", str(job), str(refused))
    assert partly.exit_code == 1 and "refused.yaml" in said(partly.stderr)
    assert [e["source"] for e in json.loads(partly.stdout)["submitted"]] == [str(job)]  # what did go in


BULK = 110


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> SpoolEnv:
    """110 answers of one folder job that came from request `req-7` (with files in a subfolder and names that are
    not plain UTF-8 text), and two one-image requests submitted as an OpenAI Batch file."""
    env = SpoolEnv(tmp_path_factory.mktemp("bulk"), tiny_onnx)
    env.write_config()
    folder = env.media / "bulk"
    odd = [os.fsdecode(b"caf\xe9.jpg"), "two\nlines.jpg", "back\\slash.jpg"]
    for i in range(BULK):
        name = odd[i] if i < len(odd) else f"{i:03d}.jpg"
        env.image(f"bulk/{'2026/' if i % 3 else ''}{name}", seed=i, size=(32, 24))
    env.drop(
        "bulk.yaml",
        f"id: bulk\nprompt: Caption.\ninputs: {folder}\nmax_tiles: 1\nmax_new_tokens: 2\n"
        "tags: {openai_custom_id: req-7, openai_batch: by-hand.jsonl}\n",
    )
    env.image("single/one.jpg", seed=201)
    env.image("single/two.jpg", seed=202)
    requests = env.root / "requests.jsonl"
    lines = []
    for custom_id in ("one", "two"):
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": str(env.media / "single" / f"{custom_id}.jpg")}},
                    ],
                }
            ],
            "max_tokens": 3,
        }
        lines.append(
            json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    requests.write_text("\n".join(lines) + "\n")
    submitted = invoke(env, "submit", "--openai-batch", str(requests), "--json")
    assert submitted.exit_code == 0, submitted.stderr
    assert len(json.loads(submitted.stdout)["submitted"]) == 2
    assert drain(env) == {"bulk": "done", "one": "done", "two": "done"}
    return env


def test_every_machine_format_exports_every_row(bulk: SpoolEnv) -> None:
    def out(*args: str) -> str:
        result = invoke(bulk, "results", "--job", "bulk", *args)
        assert result.exit_code == 0 and said(result.stderr) == "", result.stderr
        return result.stdout

    assert len(json.loads(out("--format", "json"))) == BULK
    assert len(out("--format", "jsonl").splitlines()) == BULK
    assert len(list(csv.reader(io.StringIO(out("--format", "csv"))))) == BULK + 1  # and the header
    assert len(out("--format", "openai-batch").splitlines()) == BULK
    assert len(json.loads(out("--json", "-n", "7"))) == 7
    assert json.loads(out("--json", "-n", "0")) == json.loads(out("--json"))


def test_the_table_stops_at_a_page_and_says_what_it_left_out(bulk: SpoolEnv) -> None:
    page = invoke(bulk, "results", "--job", "bulk")
    assert page.exit_code == 0
    assert len(page.stdout.splitlines()) == 2 + 100  # header, rule, a page of rows
    assert said(page.stderr) == "vlbatch: the newest 100 of 110 answers shown, 10 left out; -n 0 shows them all\n"
    everything = invoke(bulk, "results", "--job", "bulk", "-n", "0")
    assert len(everything.stdout.splitlines()) == 2 + BULK and said(everything.stderr) == ""
    assert said(invoke(bulk, "results", "--job", "bulk", "-n", "110").stderr) == ""


def test_openai_batch_custom_ids_are_unique_and_name_their_files(bulk: SpoolEnv) -> None:
    exported = invoke(bulk, "results", "--format", "openai-batch")
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(lines) == BULK + 2
    custom_ids = [line["custom_id"] for line in lines]
    assert len(set(custom_ids)) == len(custom_ids)
    assert len({line["id"] for line in lines}) == len(lines)
    assert {"one", "two"} <= set(custom_ids)  # a request over one image keeps its own custom_id
    folder = encode_path(bulk.media / "bulk") + "/"
    answers = {Path(decode_path(r["media_paths"][0])): r["answer"] for r in rows(bulk, "--job", "bulk")}
    for line in lines:
        base, slash, relative = line["custom_id"].partition("/")
        if line["custom_id"] in ("one", "two"):
            continue
        assert base == "req-7" and slash
        path = Path(decode_path(folder + relative))
        assert path.is_file(), line["custom_id"]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == answers.pop(path)
    assert not answers  # every file once
    assert "req-7/2026/caf\\xe9.jpg" not in custom_ids  # index 0: in the folder itself
    assert {"req-7/caf\\xe9.jpg", "req-7/2026/two\\x0alines.jpg", "req-7/2026/back\\\\slash.jpg"} <= set(custom_ids)
    again = invoke(bulk, "results", "--format", "openai-batch", "--file", str(bulk.media / "bulk" / "2026" / "*"))
    assert len(again.stdout.splitlines()) == sum(1 for c in custom_ids if c.startswith("req-7/2026/"))
