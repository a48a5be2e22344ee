"""Any file name a POSIX folder can hold is answered, stored losslessly, shown and reused by a real `vlbatch run`.

Names that are not UTF-8 (byte 0xff, as old cameras and Windows tools write on shares), a newline, a backslash,
a leading dash and 255 bytes (the longest name there is, with `sidecar: true`) sit beside an ordinary one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from spool_env import SpoolEnv

from batch.service.store.paths import decode_path, decode_paths_json, encode_path, paths_json, storable_text

NAMES = [
    os.fsdecode(b"caf\xff-\xe9t\xe9.jpg"),  # Latin-1 bytes, not UTF-8
    "new\nline.jpg",
    "-dash.jpg",
    "back\\slash.jpg",
    "a" * 251 + ".jpg",  # 255 bytes: its sidecar's temp name must not grow with it
    "plain.jpg",
]


@pytest.mark.parametrize(
    "raw",
    [b"/m/a\xffb.jpg", b"/m/new\nline", b"/m/-x", b"/m/back\\x41\\.jpg", "/m/caf\u00e9".encode(), b"/m/\x7f\x01\xc3"],
)
def test_every_path_round_trips_through_its_stored_form(raw: bytes) -> None:
    path = os.fsdecode(raw)
    stored = encode_path(path)
    stored.encode("utf-8")  # SQLite takes it: no lone surrogate left
    assert stored.isprintable() and decode_path(stored) == path and os.fsencode(decode_path(stored)) == raw
    assert decode_paths_json(paths_json([path, path])) == [path, path]


def test_stored_forms_are_readable_and_plain_names_unchanged() -> None:
    assert encode_path(os.fsdecode(b"/m/caf\xff.jpg")) == "/m/caf\\xff.jpg"
    assert encode_path("/m/new\nline.jpg") == "/m/new\\x0aline.jpg"
    assert encode_path("/m/back\\slash") == "/m/back\\\\slash"
    assert encode_path("/m/été -x.jpg") == "/m/été -x.jpg"
    assert decode_path("/old/raw\\name") == "/old/raw\\name"  # a raw backslash an older release stored still opens
    assert storable_text(os.fsdecode(b"cannot read /m/\xff.jpg")) == "cannot read /m/\\xff.jpg"


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config()
    for seed, name in enumerate(NAMES):
        e.image(f"odd/{name}", seed=seed + 1)
    return e


JOB = "prompt: Describe it.\ninputs: ../../media/odd/\nsidecar: true\n"


def run(env: SpoolEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(env.cli(*args), capture_output=True, text=True, timeout=300)


def test_every_name_is_answered_shown_and_reused(env: SpoolEnv) -> None:
    env.drop("names.yaml", JOB)
    first = run(env, "run")
    assert first.returncode == 0, first.stderr
    job = env.job("names")
    assert (job["state"], job["answered"], job["failed_media"]) == ("done", len(NAMES), 0), job["error"]
    odd = env.media / "odd"
    expected = {str(odd / name) for name in NAMES}
    rows = list(env.db().query("select media_paths, answer, error from results order by id"))
    assert {decode_paths_json(r["media_paths"])[0] for r in rows} == expected
    assert all(r["answer"] and r["error"] is None for r in rows)
    for name in NAMES:  # every sidecar written, the 255-byte one included, and no temp file left behind
        stem = name.rsplit(".", 1)[0]
        assert (odd / f"{stem}.txt").read_bytes()
    assert not [n for n in os.listdir(odd) if n.startswith(".")]
    recorded = {decode_path(r["path"]) for r in env.db().query("select path from sidecars")}
    assert recorded == {str(odd / (name.rsplit(".", 1)[0] + ".txt")) for name in NAMES}

    shown = run(env, "results", "--job", "names", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert {decode_path(r["media_paths"][0]) for r in listed} == expected
    table = run(env, "results", "--job", "names")
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 2 + len(NAMES)  # a newline in a name never breaks a line
    for name in NAMES:
        assert encode_path(name)[:40] in table.stdout
    as_csv = run(env, "results", "--job", "names", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    cells = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert {decode_paths_json(c["media_paths"])[0] for c in cells} == expected
    batch = run(env, "results", "--job", "names", "--format", "openai-batch")
    assert batch.returncode == 0, batch.stderr
    lines = [json.loads(line) for line in batch.stdout.splitlines()]
    assert len(lines) == len(NAMES) and all(line["response"]["status_code"] == 200 for line in lines)

    # the same job again: every answer is found by content and path, none generated again
    env.drop("names.yaml", JOB)
    second = run(env, "run")
    assert second.returncode == 0, second.stderr
    job = env.job("names")
    assert (job["state"], job["answered"], job["reused"]) == ("done", 0, len(NAMES)), job["error"]
    assert env.db()["results"].count == len(NAMES)
    assert "event=answer.done" not in second.stderr


def test_a_standing_job_tracks_odd_names_and_skips_them_unchanged(env: SpoolEnv) -> None:
    standing = env.jobs / "standing"
    standing.mkdir(parents=True)
    (standing / "nightly.yaml").write_text(f"prompt: Describe it.\ninputs: {env.media / 'odd'}/\nsidecar: true\n")
    first = run(env, "run")
    assert first.returncode == 0, first.stderr
    tracked = {decode_path(r["path"]): r["state"] for r in env.db().query("select path, state from standing_files")}
    assert tracked == {str(env.media / "odd" / name): "answered" for name in NAMES}
    second = run(env, "run")
    assert second.returncode == 0, second.stderr
    job = env.job("nightly")
    assert (job["unchanged"], job["answered"], job["gone"]) == (len(NAMES), 0, 0)
    (env.media / "odd" / NAMES[0]).unlink()
    third = run(env, "run")
    assert third.returncode == 0, third.stderr
    state = {decode_path(r["path"]): r["state"] for r in env.db().query("select path, state from standing_files")}
    assert state[str(env.media / "odd" / NAMES[0])] == "gone" and env.job("nightly")["gone"] == 1


def test_odd_names_in_the_gallery_and_serve(env: SpoolEnv, tmp_path: Path) -> None:
    """The static gallery and `vlbatch serve` show every name and make a preview of every file."""
    import asyncio
    import html
    import re
    from urllib.parse import quote, urlencode

    from batch.config import load_config
    from batch.service.web import app

    env.drop("names.yaml", JOB)
    assert run(env, "run").returncode == 0
    out = tmp_path / "gallery"
    written = run(env, "gallery", str(out), "--thumbnail-cache", str(tmp_path / "cache"))
    assert written.returncode == 0, written.stderr
    page = (out / "index.html").read_text()
    for name in NAMES:
        assert html.escape(encode_path(name), quote=False)[:40] in page, name
    assert len([p for p in (out / "thumbs").iterdir() if p.suffix == ".jpg"]) == len(NAMES)

    datasette = app.build(load_config(env.config_path), tmp_path / "serve-cache")
    try:
        stored = [json.loads(r["media_paths"])[0] for r in env.db().query("select media_paths from results")]
        urls = ["/-/thumbnail?" + urlencode({"path": p}, quote_via=quote) for p in stored]

        async def get_all() -> list:
            return [await datasette.client.get(path) for path in ["/-/gallery?job=names", *urls]]

        responses = asyncio.run(get_all())
    finally:
        datasette.vlbatch_state.thumbnails.close()
    gallery, *previews = responses
    assert gallery.status_code == 200
    assert len(re.findall(r"/-/thumbnail\?", gallery.text)) >= len(NAMES)
    assert [r.status_code for r in previews] == [200] * len(NAMES)
    assert all(r.headers["content-type"] == "image/jpeg" for r in previews)
