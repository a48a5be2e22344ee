"""`vlbatch serve`: Datasette over the results database, read-only, with the gallery, charts and thumbnails.

Most tests drive the site in-process (`datasette.client`); the loopback, shutdown and live-worker tests run the
real command and fetch over HTTP.
"""

from __future__ import annotations

import asyncio
import html
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from click.testing import CliRunner
from PIL import Image
from spool_env import SpoolEnv, wait_for
from synthetic import synthetic_image
from web_env import cards_of, latest_rows, search_word, shown

from batch.cli import main
from batch.config import load_config
from batch.infer.decode import InProcessDecoder, IsolatedDecoder
from batch.infer.generate import GenerationResult
from batch.infer.timings import TIMING_COLUMNS, Timings
from batch.service.store.records import answer_row
from batch.service.store.store import Store
from batch.service.web import app, plugin
from batch.service.web.metadata import QUERIES

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Helpers

# Paths given to open() / os.open() while a test watches (None: nobody is watching). Audit hooks cannot be removed,
# so the hook is installed once and stays inert outside `watching_opens`.
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def watching_opens() -> Iterator[list[str]]:
    global _OPENED
    _OPENED = opened = []
    try:
        yield opened
    finally:
        _OPENED = None


@contextmanager
def site(env: SpoolEnv, cache: Path, in_process_decoder: bool = False) -> Iterator:
    """The Datasette `vlbatch serve` builds for this folder; with `in_process_decoder` previews are decoded in
    this process (so the audit hook sees every file the decoder opens)."""
    factory = InProcessDecoder if in_process_decoder else IsolatedDecoder
    datasette = app.build(load_config(env.config_path), cache, decoder_factory=factory)
    thumbnails = datasette.vlbatch_state.thumbnails
    try:
        yield datasette
    finally:
        thumbnails.close()


def fetch(datasette, *paths: str) -> list:
    async def _all() -> list:
        return [await datasette.client.get(path) for path in paths]

    return asyncio.run(_all())


def thumb(path: str | Path) -> str:
    return "/-/thumbnail?" + urlencode({"path": str(path)}, quote_via=quote)


def copy_env(env: SpoolEnv, to: Path) -> SpoolEnv:
    """A copy of a spool folder whose recorded media paths name the copy's own media."""
    shutil.copytree(env.root, to)
    copied = SpoolEnv(to, env.model)
    conn = sqlite3.connect(copied.db_path)
    with conn:
        for table in ("results", "job_results"):
            conn.execute(
                f"UPDATE {table} SET media_paths = replace(media_paths, ?, ?)", [f"{env.media}/", f"{copied.media}/"]
            )
    conn.close()
    return copied


def record_paths(db_path: Path, paths: list[str]) -> None:
    """Link the first answer to more files, as if a run had recorded them."""
    conn = sqlite3.connect(db_path)
    with conn:
        for path in paths:
            conn.execute(
                "INSERT INTO job_results (job_id, run_id, result_id, reused, media_paths, media_sha256, linked_utc) "
                "SELECT job_id, run_id, result_id, 1, ?, media_sha256, linked_utc FROM job_results WHERE id = 1",
                [json.dumps([path])],
            )
    conn.close()


def jpeg(body: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(body))
    picture.load()
    assert picture.format == "JPEG"
    return picture


def served_url(log: Path, proc: subprocess.Popen) -> tuple[str, str]:
    """(host, base URL) from the `serving ... at http://HOST:PORT/` line the command writes to stderr."""

    def line():
        assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()}"
        return re.search(r"serving .* at (http://([^:/\[\]]+):\d+/)", log.read_text())

    match = wait_for(line, timeout=60)
    return match.group(2), match.group(1)


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


@pytest.fixture
def copied(results_env: SpoolEnv, tmp_path: Path) -> SpoolEnv:
    return copy_env(results_env, tmp_path / "spool")


# ---------------------------------------------------------------------------------------------------------------
# Thumbnails: only recorded files under the media roots, refused before anything is opened


def test_thumbnail_refuses_paths_without_opening_them(copied: SpoolEnv, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    synthetic_image(64, 48, seed=7).save(secret)
    link = copied.media / "link.jpg"
    link.symlink_to(secret)
    unrecorded = copied.image("unrecorded.jpg", seed=8)
    beach = copied.media / "beach.jpg"
    dotdot = f"{copied.media}/../media/beach.jpg"
    notes = copied.media / "notes.txt"
    notes.write_text("not a picture")
    refused = {
        "recorded, outside the media roots": str(secret),
        "recorded, with ..": dotdot,
        "recorded symlink to outside the roots": str(link),
        "under the roots, not recorded": str(unrecorded),
        "relative": "media/beach.jpg",
        "not a media file": str(notes),
    }
    record_paths(copied.db_path, [str(secret), dotdot, str(link), "media/beach.jpg", str(notes)])
    cache = tmp_path / "cache"

    with site(copied, cache, in_process_decoder=True) as datasette:
        with watching_opens() as opened:
            responses = dict(zip(refused, fetch(datasette, *(thumb(p) for p in refused.values())), strict=True))
        for why, response in responses.items():
            assert response.status_code == 404, why
        touched = {os.path.realpath(p) for p in opened if os.path.isabs(p)} | set(opened)
        for why, path in refused.items():
            assert not {path, os.path.realpath(path), str(secret)} & touched, f"{why}: {path} was opened"
        assert not list(cache.rglob("*.*")), "a preview was attempted"

        # the same site and hook see the decoder open a file it may show
        with watching_opens() as opened:
            (ok,) = fetch(datasette, thumb(beach))
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
        assert str(beach) in opened

        # a URL that names the row recording the path is checked against that row alone
        conn = sqlite3.connect(copied.db_path)
        clip_link, beach_link = (
            conn.execute("SELECT id FROM job_results WHERE media_paths = ?", [json.dumps([str(p)])]).fetchone()[0]
            for p in (copied.media / "clip.mp4", beach)
        )
        conn.close()
        other_row, not_a_row, own_row = fetch(
            datasette, f"{thumb(beach)}&link={clip_link}", f"{thumb(beach)}&link=x", f"{thumb(beach)}&link={beach_link}"
        )
        assert other_row.status_code == 404 and not_a_row.status_code == 400  # not a row id: a bad request
        assert own_row.status_code == 200


def test_a_preview_cache_that_cannot_be_written_is_a_503_and_the_site_goes_on(
    results_env: SpoolEnv, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with site(results_env, blocked) as datasette:
        preview, gallery = fetch(datasette, thumb(results_env.media / "beach.jpg"), "/-/gallery")
    assert preview.status_code == 503 and "cannot keep previews" in preview.text
    assert gallery.status_code == 200 and len(cards_of(gallery.text)) == 7


def test_thumbnails_of_recorded_media(results_env: SpoolEnv, tmp_path: Path) -> None:
    media = results_env.media
    cache = tmp_path / "cache"
    with site(results_env, cache) as datasette:
        beach, portrait, clip, broken, nothing = fetch(
            datasette,
            thumb(media / "beach.jpg"),
            thumb(media / "portrait-exif.jpg"),
            thumb(media / "clip.mp4"),
            thumb(media / "broken.jpg"),
            "/-/thumbnail",
        )
        assert beach.status_code == 200 and beach.headers["content-type"] == "image/jpeg"
        assert jpeg(beach.content).size == (320, 240)  # never enlarged past its own size (edge 320)
        assert portrait.status_code == 200
        width, height = jpeg(portrait.content).size
        assert height > width, "EXIF orientation 6 is shown upright (portrait)"
        assert clip.status_code == 200 and jpeg(clip.content).size == (96, 64)
        assert broken.status_code == 404 and "no preview" in broken.text
        assert nothing.status_code == 404
        made = sorted(p.suffix for p in cache.rglob("*.*"))
        assert made == [".err", ".jpg", ".jpg", ".jpg"]
        (again,) = fetch(datasette, thumb(media / "beach.jpg"))  # from the cache
        assert again.content == beach.content
        assert sorted(p.suffix for p in cache.rglob("*.*")) == made


# ---------------------------------------------------------------------------------------------------------------
# Read-only


def test_the_database_cannot_be_changed_through_the_site(copied: SpoolEnv, tmp_path: Path) -> None:
    db = copied.db_path
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    with site(copied, tmp_path / "cache") as datasette:
        delete, smuggled, *pages = fetch(
            datasette,
            "/vlbatch.json?sql=" + quote("DELETE FROM jobs"),
            "/vlbatch.json?sql=" + quote("SELECT 1; DELETE FROM jobs"),
            "/",
            "/vlbatch",
            "/vlbatch/results",
            "/vlbatch/jobs",
            "/-/gallery",
            "/-/charts",
            "/vlbatch/latest_answers.json",
        )
        assert delete.status_code == 400 and delete.json()["ok"] is False
        assert smuggled.status_code == 400
        assert [p.status_code for p in pages] == [200] * len(pages)

        async def write(sql: str) -> None:
            await datasette.get_database("vlbatch").execute_write(sql)

        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            asyncio.run(write("DELETE FROM jobs"))
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM job_results").fetchone()[0] == 7
    conn.close()
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before


# ---------------------------------------------------------------------------------------------------------------
# The real command: loopback by default, stops on SIGTERM, serves while a worker writes


def test_host_defaults_to_loopback_in_help() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert re.search(r"--host TEXT .*\[default:\s+127\.0\.0\.1\]", " ".join(result.output.split()))


@pytest.mark.slow
def test_serve_binds_loopback_and_stops_on_sigterm(results_env: SpoolEnv, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    before = results_env.db_path.stat().st_mtime_ns
    proc = results_env.spawn("serve", "--port", "0", "--thumbnail-cache", str(tmp_path / "cache"), log=log)
    try:
        host, url = served_url(log, proc)
        assert host == "127.0.0.1"
        status, body = http_get(url + "-/gallery")
        assert status == 200 and b'class="vb-card' in body
        status, body = http_get(url + thumb(results_env.media / "harbor.png")[1:])
        assert status == 200 and jpeg(body).size == (320, 160)
    finally:
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("serve did not stop within 15 s of SIGTERM") from None
    assert time.monotonic() - started < 10
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()
    assert results_env.db_path.stat().st_mtime_ns == before


@pytest.mark.slow
def test_serve_while_a_worker_writes(copied: SpoolEnv, tmp_path: Path) -> None:
    new = [copied.image(f"new/photo-{i:02d}.png", seed=100 + i, size=(96, 72)) for i in range(12)]
    serve = copied.spawn("serve", "--port", "0", "--thumbnail-cache", str(tmp_path / "cache"), log=tmp_path / "s.log")
    try:
        _, url = served_url(tmp_path / "s.log", serve)
        watched = ["-/gallery", "vlbatch/results.json", thumb(copied.media / "harbor.png")[1:]]
        assert all(http_get(url + path)[0] == 200 for path in watched)
        copied.drop("fresh.yaml", "prompt: Caption it briefly.\ninputs: ../../media/new/\n")
        run = copied.spawn("run", log=tmp_path / "run.log")
        statuses: list[tuple[str, int]] = []
        try:
            deadline = time.monotonic() + 240
            while run.poll() is None and time.monotonic() < deadline:
                for path in watched:
                    try:
                        statuses.append((path, http_get(url + path)[0]))
                    except urllib.error.HTTPError as exc:
                        statuses.append((path, exc.code))
        finally:
            if run.poll() is None:
                run.kill()
            run.wait()
        assert run.returncode == 0, (tmp_path / "run.log").read_text()
        assert len(statuses) >= 2 * len(watched), "the worker finished before the site was read while it ran"
        assert [s for s in statuses if s[1] != 200] == [], (tmp_path / "s.log").read_text()

        fresh = [row for row in latest_rows(copied.db_path) if row["job_id"] == "fresh"]
        assert sorted(json.loads(r["media_paths"])[0] for r in fresh) == sorted(map(str, new))
        assert all(r["answer"] is not None and r["error"] is None for r in fresh)
        status, body = http_get(url + "-/gallery?job=fresh")
        page = body.decode()
        assert status == 200 and len(cards_of(page)) == 12
        for row in fresh:
            assert shown(row["answer"]) in page
        status, body = http_get(url + thumb(new[0])[1:])
        assert status == 200 and jpeg(body).size == (96, 72)
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=15)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()


# ---------------------------------------------------------------------------------------------------------------
# Pages


@pytest.fixture
def datasette(results_env: SpoolEnv, tmp_path: Path):
    with site(results_env, tmp_path / "cache") as built:
        yield built


def test_index_and_database_pages_name_the_canned_queries(datasette) -> None:
    index, database = fetch(datasette, "/", "/vlbatch")
    assert index.status_code == database.status_code == 200
    for page in (index.text, database.text):
        text = html.unescape(page)
        for name, query in QUERIES.items():
            assert query["title"] in text, name
            assert f'href="/vlbatch/{name}"' in page
        assert 'href="/-/gallery"' in page and 'href="/-/charts"' in page
    assert "_memory" not in index.text


def test_results_table_describes_columns_facets_and_previews(datasette, results_env: SpoolEnv) -> None:
    (page,) = fetch(datasette, "/vlbatch/results")
    assert page.status_code == 200
    text = html.unescape(page.text)
    for column in ("ttft_ms", "tokens_per_s"):  # each timing as batch/infer/timings.py defines it
        assert TIMING_COLUMNS[column] in text, column
    about = re.search(
        r'<details class="vb-about-columns">\s*<summary>About these columns</summary>(.*?)</details>', text, re.S
    )
    assert about and TIMING_COLUMNS["ttft_ms"] in about.group(1)  # folded, a click away
    for facet in ("job_id", "finish_reason", "model_id", "backend"):
        assert f'id="facet-{facet}"' in page.text, facet
    for name in ("beach.jpg", "street.png", "clip.mp4", "broken.jpg"):
        # each cell names its row, so the server checks the path with a key lookup
        assert f'<img src="{shown(thumb(results_env.media / name))}&amp;result=' in page.text, name


def test_tables_link_rows_by_their_foreign_keys(datasette) -> None:
    links, runs, jobs = fetch(datasette, "/vlbatch/job_results", "/vlbatch/runs", "/vlbatch/jobs")
    # a link to the row it names, labelled by its id alone (no id repeated beside a label)
    for page, column, target in (
        (links, "job_id", "jobs"),
        (links, "run_id", "runs"),
        (links, "result_id", "results"),
        (runs, "job_id", "jobs"),
        (jobs, "run_id", "runs"),
    ):
        cells = re.findall(rf'<td class="col-{column} [^"]*">(.*?)</td>', page.text)
        assert cells, column
        for cell in cells:
            value = re.fullmatch(rf'<a href="/vlbatch/{target}/([^"]+)">([^<]+)</a>', cell)
            assert value and value.group(1) == value.group(2), cell


def test_every_canned_query_runs(datasette, results_env: SpoolEnv) -> None:
    names = [name for name in QUERIES if name != "job_answers"]  # that one needs a job: below
    responses = fetch(datasette, *(f"/vlbatch/{name}.json?_shape=objects" for name in names))
    by_name = {}
    for name, response in zip(names, responses, strict=True):
        assert response.status_code == 200 and response.json()["ok"], name
        by_name[name] = response.json()["rows"]
    assert len(by_name["latest_answers"]) == 6  # 5 captions answers and the pair's
    assert [row["source"] for row in by_name["failures"] if row["what"] == "file"] == [
        json.dumps([str(results_env.media / "broken.jpg")])
    ]
    assert sum(row["answers"] for row in by_name["throughput_per_hour"]) == 6
    assert len(by_name["slowest_answers"]) == 6

    captions, pair, nobody = fetch(
        datasette,
        "/vlbatch/job_answers.json?_shape=objects&job=captions",
        "/vlbatch/job_answers.json?_shape=objects&job=pair",
        "/vlbatch/job_answers.json?_shape=objects&job=nobody",
    )
    names = sorted(Path(json.loads(row["media_paths"])[0]).name for row in captions.json()["rows"])
    assert names == ["beach.jpg", "broken.jpg", "clip.mp4", "harbor.png", "portrait-exif.jpg", "street.png"]
    assert len(pair.json()["rows"]) == 1 and nobody.json()["rows"] == []


def _timed(stages: tuple[float, float, float], decode: tuple[float, int, float], finish: str, output: int) -> dict:
    """A stored answer's row with known timings, made as a worker makes it: (preprocess, ViT, prefill) ms, then
    (decode_ms, decode steps, answers that shared them on average); TTFT holds its stages and a 10 ms gap."""
    preprocess, vit, prefill = stages
    decode_ms, steps, rows = decode
    timings = Timings(preprocess, vit, prefill, preprocess + vit + prefill + 10, decode_ms, steps, 0, rows)
    return answer_row(GenerationResult("a caption", list(range(output)), 300, 256, finish, timings, 1), "onnxruntime")


def _canned(tmp_path: Path, name: str, rows: list[tuple[str, dict]]) -> list[dict]:
    """The canned query's rows over a database holding exactly these answers (created_utc, row)."""
    store = Store(tmp_path / "timed.db")
    for created, row in rows:
        store.db["results"].insert({**row, "job_id": "timed", "media_paths": "[]", "created_utc": created})
    store.close()
    conn = sqlite3.connect(tmp_path / "timed.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(QUERIES[name]["sql"])]
    finally:
        conn.close()


def test_slowest_answers_add_each_stage_once(tmp_path: Path) -> None:
    rows = [
        ("2026-12-05T10:00:01.000+00:00", _timed((100, 200, 300), (500, 10, 1), "stop", 10)),  # ttft 610, 1,110 in all
        ("2026-12-05T10:00:02.000+00:00", _timed((900, 0, 150), (100, 2, 1), "length", 3)),  # ttft 1,060, 1,160 in all
    ]
    slowest = _canned(tmp_path, "slowest_answers", rows)
    assert [row["total_ms"] for row in slowest] == [1160, 1110]  # ttft_ms + decode_ms: preparation counted once
    for row in slowest:
        assert row["total_ms"] == round(row["ttft_ms"] + row["decode_ms"])
        assert row["ttft_ms"] == row["preprocess_ms"] + row["vit_ms"] + row["prefill_ms"] + 10


def test_throughput_per_hour_divides_decode_tokens_by_the_worker_s_decode_time(tmp_path: Path) -> None:
    # 10:00: two answers decoded together for 10 steps of 50 ms each (each counts 500 ms, the worker spent 500),
    # then one alone for 6 steps in 300 ms: 26 tokens from decode steps in 800 ms; 11:00: one alone, 4 in 200 ms
    rows = [
        ("2026-12-05T10:00:01.000+00:00", _timed((5, 20, 30), (500, 10, 2), "length", 11)),
        ("2026-12-05T10:00:02.000+00:00", _timed((5, 20, 30), (500, 10, 2), "stop", 10)),
        ("2026-12-05T10:00:03.000+00:00", _timed((5, 20, 30), (300, 6, 1), "length", 7)),
        ("2026-12-05T11:00:01.000+00:00", _timed((5, 20, 30), (200, 4, 1), "length", 5)),
    ]
    hours = {row["hour_utc"]: row for row in _canned(tmp_path, "throughput_per_hour", rows)}
    ten, eleven = hours["2026-12-05T10:00"], hours["2026-12-05T11:00"]
    assert (ten["answers"], ten["output_tokens"], ten["tokens_per_s"]) == (3, 28, 32.5)  # 26 / 0.8 s
    assert (eleven["answers"], eleven["tokens_per_s"]) == (1, 20.0)  # one answer alone: its own tokens_per_s
    assert eleven["tokens_per_s"] == rows[3][1]["tokens_per_s"]
    assert ten["mean_ttft_ms"] == 65  # 5 + 20 + 30 + 10: preparation inside TTFT, once


def test_status_counts_throughput_as_the_canned_query_does(tmp_path: Path) -> None:
    """`vlbatch status`'s answers-per-hour figure (Store.throughput) and the canned query give one tokens/s."""
    rows = [
        ("2026-12-05T10:00:01.000+00:00", _timed((5, 20, 30), (500, 10, 2), "length", 11)),
        ("2026-12-05T10:00:02.000+00:00", _timed((5, 20, 30), (500, 10, 2), "stop", 10)),
        ("2026-12-05T10:00:03.000+00:00", _timed((5, 20, 30), (300, 6, 1), "length", 7)),
    ]
    (hour,) = _canned(tmp_path, "throughput_per_hour", rows)
    store = Store(tmp_path / "timed.db")
    try:
        figures = store.throughput("2026-12-05T00:00:00.000+00:00")
    finally:
        store.close()
    assert figures["tokens_per_s"] == pytest.approx(hour["tokens_per_s"]) == pytest.approx(32.5)  # 26 / 0.8 s
    assert (figures["answers"], figures["output_tokens"]) == (hour["answers"], hour["output_tokens"]) == (3, 28)


def test_gallery_shows_every_answer_with_previews(datasette, results_env: SpoolEnv) -> None:
    (page,) = fetch(datasette, "/-/gallery")
    assert page.status_code == 200
    rows = latest_rows(results_env.db_path)
    assert len(cards_of(page.text)) == len(rows) == 7
    for row in rows:
        assert shown(row["answer"] or row["error"]) in page.text
        for path in json.loads(row["media_paths"]):
            assert f'src="{shown(thumb(path))}&amp;link={row["link_id"]}"' in page.text
    assert "1–7 of 7 results" in page.text


def test_gallery_filters(datasette, results_env: SpoolEnv) -> None:
    rows = latest_rows(results_env.db_path)
    word, having = search_word(rows)
    pair, tagged, demo, failed, answers, found = fetch(
        datasette,
        "/-/gallery?job=pair",
        "/-/gallery?tag=kind%3Dcomparison",
        "/-/gallery?tag=demo",
        "/-/gallery?show=failed",
        "/-/gallery?show=answers",
        "/-/gallery?q=" + word,
    )
    for response, count, jobs in ((pair, 1, {"pair"}), (tagged, 1, {"pair"}), (demo, 6, {"captions"})):
        cards = cards_of(response.text)
        assert len(cards) == count
        assert {re.search(r'class="vb-job"[^>]*>([^<]+)<', c).group(1) for c in cards} == jobs
    (broken,) = [r for r in rows if r["error"]]
    (card,) = cards_of(failed.text)
    assert shown(broken["error"]) in card and "vb-answer" not in card
    assert len(cards_of(answers.text)) == 6 and "vb-error" not in answers.text
    cards = cards_of(found.text)
    assert len(cards) == len(having) < len(rows)
    for row in having:
        assert any(shown(row["answer"]) in c for c in cards)


def test_gallery_reports_bad_filters_instead_of_failing(datasette) -> None:
    since, until, fts, page = fetch(
        datasette, "/-/gallery?since=yesterdayish", "/-/gallery?until=13h%3F", '/-/gallery?q="', "/-/gallery?page=x"
    )
    assert since.status_code == 200 and '<p class="message-error">since:' in since.text
    assert "yesterdayish" in since.text and not cards_of(since.text)
    assert until.status_code == 200 and '<p class="message-error">until:' in until.text
    # the search box takes words literally: a lone quote is no syntax error, only a word no answer holds
    assert fts.status_code == 200 and "message-error" not in fts.text and not cards_of(fts.text)
    assert page.status_code == 400 and "page:" in page.text  # not a page number: a bad request


def test_gallery_pages(datasette, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin, "PAGE_SIZE", 2)
    seen: list[str] = []
    url, visited = "/-/gallery?tag=demo", 0
    while url:
        (page,) = fetch(datasette, url)
        visited += 1
        cards = cards_of(page.text)
        assert page.status_code == 200 and len(cards) == 2
        seen += cards
        assert f"page {visited} of 3" in page.text
        prev = re.search(r'<a rel="prev" href="([^"]+)"', page.text)
        assert (prev is None) == (visited == 1)
        if prev:
            assert f"page={visited - 1}" in html.unescape(prev.group(1))
            assert "tag=demo" in html.unescape(prev.group(1))
        following = re.search(r'<a rel="next" href="([^"]+)"', page.text)
        url = "/-/gallery" + html.unescape(following.group(1)) if following else None
    assert visited == 3 and len(set(seen)) == 6
    (past,) = fetch(datasette, "/-/gallery?tag=demo&page=9")
    assert "page 3 of 3" in past.text and len(cards_of(past.text)) == 2


def test_charts_are_inline_svg_with_no_network(datasette) -> None:
    (page,) = fetch(datasette, "/-/charts")
    assert page.status_code == 200
    charts = re.findall(r'<div class="vb-chart">(<svg.*?</svg>)</div>', page.text, re.S)
    assert len(charts) == 3 and not any(re.search(r"<script[^>]*\bsrc=", svg) for svg in charts)
    assert not re.search(r"<script[^>]+src=[\"']?(https?:)?//", page.text)
    assert not re.search(r"""src=["']?(https?:)?//|<link[^>]+href=["']?(https?:)?//""", page.text)  # loads nothing
    ttft, speed, per_hour = charts
    assert ttft.count('class="dot ') == speed.count('class="dot ') == 6  # one point per answer
    assert 'class="rect ' in per_hour and 'class="no_data"' not in page.text


def test_menu_links_to_the_gallery_and_charts(datasette) -> None:
    (page,) = fetch(datasette, "/vlbatch/jobs")
    assert re.search(r'<a href="/-/gallery">Gallery</a>', page.text)
    assert re.search(r'<a href="/-/charts">Charts</a>', page.text)


# ---------------------------------------------------------------------------------------------------------------
# Databases it will not serve


@pytest.mark.slow
def test_serve_refuses_an_older_database_without_changing_it(results_env: SpoolEnv, tmp_path: Path) -> None:
    env = SpoolEnv(tmp_path / "old", results_env.model)
    env.root.mkdir()
    env.write_config()
    shutil.copyfile(REPO / "tests" / "data" / "vlbatch-0.1.0.db", env.db_path)
    before = (env.db_path.read_bytes(), env.db_path.stat().st_mtime_ns)
    proc = subprocess.run(env.cli("serve", "--port", "0"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "`vlbatch status` upgrades it" in proc.stderr and str(env.db_path) in proc.stderr
    assert (env.db_path.read_bytes(), env.db_path.stat().st_mtime_ns) == before

    env.db_path.unlink()
    proc = subprocess.run(env.cli("serve", "--port", "0"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and str(env.db_path) in proc.stderr, proc.stderr
    assert not env.db_path.exists()
