"""`vlbatch serve` under hostile requests: bad parameters are 4xx (never 500), no query makes the server hold much
memory or answer with a giant body, and arbitrary SQL is off when it listens beyond loopback.

The memory and network tests run the real command and fetch over HTTP on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from spool_env import SpoolEnv, wait_for

from batch.config import load_config
from batch.service.web import app, plugin

SUPERSCRIPT_TWO = "\u00b2"  # str.isdigit() says yes, int() says no
TOO_BIG = "1" * 23  # past SQLite's 64-bit integers
CTE = "with recursive c(x) as (select 1 union all select x+1 from c limit 10000) select x from c"
CROSS_JOIN = f"select * from ({CTE}) a, ({CTE}) b"  # 10 million rows
HUGE_BLOB = "select randomblob(900000000)"
MANY_LONG_ROWS = f"select hex(randomblob(3000000)) from ({CTE})"  # 6 MB a row: each under the cell cap
GIB = 2**30


@pytest.fixture
def datasette(results_env: SpoolEnv, tmp_path: Path) -> Iterator:
    built = app.build(load_config(results_env.config_path), tmp_path / "cache")
    try:
        yield built
    finally:
        built.vlbatch_state.thumbnails.close()


def fetch(datasette, *paths: str) -> list:
    async def _all() -> list:
        return [await datasette.client.get(path) for path in paths]

    return asyncio.run(_all())


def thumb(path: str, **where: str) -> str:
    return "/-/thumbnail?" + urlencode({"path": path, **where}, quote_via=quote)


def sql_url(sql: str, fmt: str = ".json", **extra: str) -> str:
    return f"/vlbatch{fmt}?" + urlencode({"sql": sql, **extra}, quote_via=quote)


# ---------------------------------------------------------------------------------------------------------------
# Parameters: 4xx, never 500


def test_bad_parameters_of_vlbatch_routes_are_400(datasette, results_env: SpoolEnv) -> None:
    beach = str(results_env.media / "beach.jpg")
    bad = {
        "23-digit link": thumb(beach, link=TOO_BIG),
        "superscript link": thumb(beach, link=SUPERSCRIPT_TWO),
        "negative link": thumb(beach, link="-1"),
        "non-digit result": thumb(beach, result="x"),
        "zero link": thumb(beach, link="0"),
        "link and result": thumb(beach, link="1", result="1"),
        "unknown thumbnail parameter": thumb(beach, size="9999"),
        "23-digit page": f"/-/gallery?page={TOO_BIG}",
        "superscript page": f"/-/gallery?page={quote(SUPERSCRIPT_TWO)}",
        "negative page": "/-/gallery?page=-1",
        "non-digit page": "/-/gallery?page=x",
        "page zero": "/-/gallery?page=0",
        "unknown show": "/-/gallery?show=everything",
        "sort on the gallery": "/-/gallery?_sort=nope",
        "overlong search": "/-/gallery?q=" + "a" * 5000,
        "parameter of charts": "/-/charts?_sort=nope",
    }
    responses = dict(zip(bad, fetch(datasette, *bad.values()), strict=True))
    for why, response in responses.items():
        assert response.status_code == 400, (why, response.status_code, response.text[:200])
        assert len(response.text) < 300 and response.text.strip(), why  # a short message
    assert "link:" in responses["23-digit link"].text and "page:" in responses["superscript page"].text
    ok = fetch(datasette, "/-/gallery?page=1&show=failed", "/-/charts", thumb(beach))
    assert [r.status_code for r in ok] == [200, 200, 200]


def test_bad_parameters_of_datasette_pages_are_4xx(datasette) -> None:
    bad = [
        "/vlbatch/results?_sort=nope",
        "/vlbatch/results.json?_sort=nope",
        "/vlbatch/results?_sort_desc=nope",
        "/vlbatch/results?_sort=id&_sort_desc=id",
        f"/vlbatch/results?_size={quote(SUPERSCRIPT_TWO)}",
        f"/vlbatch/results?_size={TOO_BIG}",
        "/vlbatch/results?_size=-1",
        "/vlbatch/results.json?_facet=nope",
        f"/vlbatch/results?id__gt={TOO_BIG}",
        f"/vlbatch/results.json?id__lt={TOO_BIG}",
        f"/vlbatch/results?_timelimit={quote(SUPERSCRIPT_TWO)}",
        f"/vlbatch/results?_facet_size={quote(SUPERSCRIPT_TWO)}",
        "/vlbatch/results?_through=x",
        sql_url("select 1", _timelimit=SUPERSCRIPT_TWO),
    ]
    for path, response in zip(bad, fetch(datasette, *bad), strict=True):
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    sort = fetch(datasette, "/vlbatch/results.json?_sort=nope")[0].json()
    assert sort["ok"] is False and sort["error"] == "Cannot sort table by nope"
    # Datasette ignores a _next it cannot use: the first page
    for path in (f"/vlbatch/results?_next={TOO_BIG}", f"/vlbatch/results?_next={quote(SUPERSCRIPT_TWO)}"):
        assert fetch(datasette, path)[0].status_code == 200, path


# ---------------------------------------------------------------------------------------------------------------
# Size limits


def test_every_connection_has_sqlites_size_limits(datasette) -> None:
    async def limits() -> tuple[int, int | None]:
        def read(conn: sqlite3.Connection) -> tuple[int, int | None]:
            heap = conn.execute("PRAGMA hard_heap_limit").fetchone()[0]
            length = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) if hasattr(conn, "getlimit") else None
            return heap, length

        return await datasette.get_database("vlbatch").execute_fn(read)

    heap, length = asyncio.run(limits())
    assert 0 < heap <= plugin.HEAP_BYTES
    assert length in (None, plugin.CELL_BYTES)


def test_large_results_are_refused_in_process(datasette) -> None:
    huge, many, cross, html = fetch(
        datasette, sql_url(HUGE_BLOB), sql_url(MANY_LONG_ROWS), sql_url(CROSS_JOIN), sql_url(MANY_LONG_ROWS, "")
    )
    assert huge.status_code == 400 and huge.json()["ok"] is False
    assert many.status_code == 400 and "larger than this server sends" in many.json()["error"]
    assert cross.status_code == 200 and cross.json()["truncated"] and len(cross.json()["rows"]) == 1000
    assert html.status_code == 400 and "larger than this server sends" in html.text and len(html.text) < 100_000


@contextmanager
def serving(env: SpoolEnv, tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """A real `vlbatch serve --port 0 ARGS`: the process, the base URL on 127.0.0.1, and its stderr log."""
    log = tmp_path / f"serve-{len(list(tmp_path.glob('serve-*.log')))}.log"
    proc = env.spawn("serve", "--port", "0", "--thumbnail-cache", str(tmp_path / "cache"), *args, log=log)
    try:

        def port() -> str | None:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()}"
            match = re.search(r"serving .* at http://[^ ]+:(\d+)/", log.read_text())
            return match and match.group(1)

        yield proc, f"http://127.0.0.1:{wait_for(port, timeout=60)}", log  # loopback only, whatever it bound
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(url: str) -> tuple[int, bytes, float]:
    """Status, body (read at most 64 MiB of it) and seconds taken."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(64 * 2**20), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(64 * 2**20), time.monotonic() - started


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) * 1024


@pytest.mark.slow
def test_heavy_queries_are_answered_quickly_and_small(results_env: SpoolEnv, tmp_path: Path) -> None:
    with serving(results_env, tmp_path) as (proc, url, log):
        seen = {}
        for name, sql in (("blob", HUGE_BLOB), ("cross join", CROSS_JOIN), ("long rows", MANY_LONG_ROWS)):
            for fmt in (".json", ".csv", ""):
                status, body, seconds = get(url + sql_url(sql, fmt))
                seen[name, fmt] = status, body
                assert seconds < 10, (name, fmt, seconds)
                assert len(body) < 2 * 2**20, (name, fmt, len(body))  # never a giant body
                assert status in (200, 400), (name, fmt, status)
            status, body, seconds = get(url + sql_url(sql, ".csv", _stream="on"))
            assert seconds < 10 and len(body) < 2 * 2**20 and status in (200, 400), (name, status, len(body))
        for name in ("blob", "long rows"):
            status, body = seen[name, ".json"]
            assert status == 400 and json.loads(body)["ok"] is False, name
            assert seen[name, ""][0] == 400 and seen[name, ".csv"][1].strip() == b"", name  # CSV: no rows
        status, body = seen["cross join", ".json"]
        assert status == 200 and json.loads(body)["truncated"] and len(json.loads(body)["rows"]) == 1000
        assert seen["cross join", ".csv"][1].count(b"\n") == 1001  # heading and 1,000 rows
        peak = peak_rss(proc.pid)
        assert peak < GIB, f"serve peaked at {peak / 2**20:.0f} MiB"
        print(f"\nvlbatch serve peak RSS after the heavy queries: {peak / 2**20:.0f} MiB")
        status, body, _ = get(url + "/-/gallery")  # and it goes on serving
        assert status == 200 and b'class="vb-card' in body
        assert proc.poll() is None, log.read_text()


# ---------------------------------------------------------------------------------------------------------------
# Arbitrary SQL only on loopback, unless asked for


def test_loopback_is_decided_by_the_bound_address() -> None:
    for host, loopback in (("127.0.0.1", True), ("0.0.0.0", False)):
        sock = app.bind(host, 0)
        try:
            assert app.is_loopback(sock) is loopback, host
        finally:
            sock.close()


@pytest.mark.slow
def test_arbitrary_sql_is_off_beyond_loopback_unless_allowed(results_env: SpoolEnv, tmp_path: Path) -> None:
    select = sql_url("select count(*) from results")
    with serving(results_env, tmp_path, "--host", "0.0.0.0") as (_, url, log):  # reached on 127.0.0.1 only
        assert "arbitrary SQL is off" in log.read_text() and "--allow-sql-on-network" in log.read_text()
        assert get(url + select)[0] == 403
        assert get(url + "/vlbatch/results?_where=" + quote("id > 0"))[0] == 403
        status, body, _ = get(url + "/vlbatch/latest_answers.json")  # canned queries still work
        assert status == 200 and json.loads(body)["ok"] is True
        status, body, _ = get(url + "/vlbatch")
        assert status == 200 and b'name="sql"' not in body  # no SQL box

    with serving(results_env, tmp_path, "--host", "0.0.0.0", "--allow-sql-on-network") as (_, url, log):
        assert "arbitrary SQL is ON" in log.read_text()
        status, body, _ = get(url + select)
        assert status == 200 and json.loads(body)["rows"] == [[7]]

    with serving(results_env, tmp_path) as (_, url, log):  # loopback: on, and nothing said about it
        assert "arbitrary SQL" not in log.read_text()
        assert get(url + select)[0] == 200
