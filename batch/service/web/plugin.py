"""The Datasette plugin `vlbatch serve` registers: the gallery, charts and thumbnail routes, and media cells.

Hooks act only on a Datasette that `batch.service.web.app.build` made (it carries a `WebState`); registered
once per process, they leave any other Datasette alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sqlite3
import sys
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

from datasette import Response, hookimpl
from datasette.plugins import pm
from datasette.utils import add_cors_headers
from datasette.utils.asgi import Base400
from datasette.views.base import DatasetteError
from markupsafe import Markup, escape

from batch.service.store.result_filter import ResultFilter
from batch.service.store.timefilter import parse_when, to_utc_iso
from batch.service.web import charts
from batch.service.web.cards import card
from batch.service.web.metadata import DATABASE
from batch.service.web.thumbnails import Thumbnails

PAGE_SIZE = 48
MAX_PAGE = 10**6  # a gallery page number past this is no page anyone reached by clicking
MAX_ROW_ID = 2**63 - 1  # SQLite's largest integer
MAX_TEXT = 2000  # characters in one gallery form field
MAX_PATH = 4096
SHOW = {"": None, "answers": False, "failed": True}  # the gallery's `show` choices, as ResultFilter.failed

# Size limits of every connection `vlbatch serve` opens, so no query can make the server hold much memory:
CELL_BYTES = 8 * 2**20  # the longest string or blob SQLite makes (SQLITE_LIMIT_LENGTH; Python >= 3.11)
HEAP_BYTES = 64 * 2**20  # all SQLite memory of the process (PRAGMA hard_heap_limit: Python 3.10 too)
RESULT_BUDGET = 32 * 2**20  # what one statement's rows may add up to, counted as characters of JSON
# is the path recorded: in the given link (job_results row) or answer (results row), else anywhere (a scan)
RECORDED_SQL = {
    "link": "SELECT 1 FROM job_results jr, json_each(jr.media_paths) m WHERE jr.id = ? AND m.value = ?",
    "result": "SELECT 1 FROM results r, json_each(r.media_paths) m WHERE r.id = ? AND m.value = ?",
    None: "SELECT 1 FROM job_results jr, json_each(jr.media_paths) m WHERE m.value = ? LIMIT 1",
}


@dataclass
class WebState:
    thumbnails: Thumbnails


class ResultTooLarge(sqlite3.DataError):
    """A query's values add up to more than `vlbatch serve` sends (or holds) for one statement."""


def limit_connection(conn: sqlite3.Connection) -> None:
    """SQLite's own size limits on a connection: no string or blob past CELL_BYTES (where Python can set it),
    no more than HEAP_BYTES of SQLite memory in the whole process (a query past it fails: out of memory)."""
    if hasattr(conn, "setlimit"):  # Python >= 3.11
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, CELL_BYTES)
    conn.execute(f"PRAGMA hard_heap_limit = {HEAP_BYTES}")


def _cost(value: Any) -> int:
    """About the characters a value takes in a JSON response: non-ASCII text as \\uXXXX, blobs as base64."""
    if isinstance(value, str):
        return len(value) if value.isascii() else 6 * len(value)
    if isinstance(value, bytes):
        return 2 * len(value)
    return 24


class BudgetedRows:
    """A row factory (sqlite3.Row rows) that refuses a statement's rows once they add up to more than `budget`:
    the page, JSON or CSV of a query never holds more than that, whatever the number of rows asked for."""

    def __init__(self, budget: int = RESULT_BUDGET) -> None:
        self.budget = budget
        self._spent: weakref.WeakKeyDictionary[sqlite3.Cursor, int] = weakref.WeakKeyDictionary()

    def __call__(self, cursor: sqlite3.Cursor, row: tuple) -> sqlite3.Row:
        spent = self._spent.get(cursor, 0) + sum(map(_cost, row))
        if spent > self.budget:
            raise ResultTooLarge(
                f"the result is larger than this server sends ({self.budget // 2**20} MiB): select fewer rows, or "
                "parts of long values (substr(), length())"
            )
        self._spent[cursor] = spent
        return sqlite3.Row(cursor, row)


def register() -> None:
    plugin = sys.modules[__name__]
    if not pm.is_registered(plugin):
        pm.register(plugin, name="vlbatch")


def _state(datasette: Any) -> WebState | None:
    return getattr(datasette, "vlbatch_state", None)


def thumbnail_url(datasette: Any, path: str, link: int | None = None, result: int | None = None) -> str:
    """The preview URL of a recorded path; naming the row that records it makes the check a key lookup."""
    where = {"link": link} if link is not None else {"result": result} if result is not None else {}
    return datasette.urls.path("/-/thumbnail?" + urlencode({"path": path} | where, quote_via=quote))


@hookimpl
def register_routes(datasette: Any) -> list[tuple[str, Any]]:
    if _state(datasette) is None:
        return []
    return [(r"^/-/gallery$", gallery), (r"^/-/charts$", charts_page), (r"^/-/thumbnail$", thumbnail)]


@hookimpl
def prepare_connection(conn: sqlite3.Connection, database: str, datasette: Any) -> None:
    if _state(datasette) is not None:
        limit_connection(conn)
        conn.row_factory = BudgetedRows()


def _client_error(exception: BaseException) -> DatasetteError | None:
    """The 4xx error of an exception that a request caused (a bad parameter, a query too large), else None."""
    if isinstance(exception, Base400):
        return DatasetteError(exception.args[0] if exception.args else "", status=exception.status)
    if isinstance(exception, DatasetteError):
        if exception.status < 500:
            return exception
        # Datasette 0.65 answers these parameter errors with 500
        known = ("Cannot sort table by", "Cannot use _sort and _sort_desc", "Invalid _through")
        return _bad(exception.message) if exception.message.startswith(known) else None
    if isinstance(exception, sqlite3.DataError):  # string or blob too big, ResultTooLarge
        return _bad(str(exception))
    if isinstance(exception, MemoryError):  # SQLite's heap limit reached (SQLITE_NOMEM)
        return _bad(f"the query needs more memory than this server gives one query ({HEAP_BYTES // 2**20} MiB)")
    if isinstance(exception, OverflowError):  # a number too large for SQLite in a filter (id__gt=1e30)
        return _bad(f"a number is out of range: {exception}")
    if isinstance(exception, ValueError):  # a parameter Datasette parses with int() or json.loads()
        return _bad(f"bad parameter: {exception}")
    return None


def _bad(message: str) -> DatasetteError:
    return DatasetteError(message, title="Bad request", status=400)


@hookimpl(hookwrapper=True)
def handle_exception(datasette: Any, request: Any, exception: Exception) -> Generator[None, Any, None]:
    """Errors a request caused are 4xx (as Datasette's own error page or JSON), never 500. Datasette's own handler
    is left out for them, so they print nothing (it prints each traceback, with every local when rich is there)."""
    outcome = yield
    error = _client_error(exception) if _state(datasette) is not None else None
    if error is None:
        return

    async def page() -> Response:
        message = Markup(error.message) if error.message_is_html else error.message
        info = {**error.error_dict, "ok": False, "error": message, "status": error.status, "title": error.title}
        headers: dict[str, str] = {}
        if datasette.cors:
            add_cors_headers(headers)
        if request.path.endswith(".json"):
            return Response.json(info, status=error.status, headers=headers)
        template = datasette.jinja_env.select_template([f"{error.status}.html", "error.html"])
        context = dict(info, urls=datasette.urls, app_css_hash=datasette.app_css_hash(), menu_links=lambda: [])
        return Response.html(await template.render_async(context), status=error.status, headers=headers)

    outcome.force_result([page])


def _bad_request(message: str) -> Response:
    return Response.text(message, status=400)


def _unknown(request: Any, known: set[str]) -> Response | None:
    """400 for a parameter the route does not take."""
    unknown = sorted(set(request.args.keys()) - known)
    return _bad_request(f"unknown parameter: {', '.join(unknown)[:200]}") if unknown else None


def _number(text: str, low: int, high: int) -> int | None:
    """ASCII digits only (no sign, no superscripts, no spaces) between low and high, else None."""
    if not re.fullmatch(r"[0-9]{1,19}", text):
        return None
    value = int(text)
    return value if low <= value <= high else None


@hookimpl
def menu_links(datasette: Any) -> list[dict[str, str]]:
    if _state(datasette) is None:
        return []
    return [
        {"href": datasette.urls.path("/-/gallery"), "label": "Gallery"},
        {"href": datasette.urls.path("/-/charts"), "label": "Charts"},
    ]


@hookimpl
def extra_css_urls(datasette: Any) -> list[str]:
    return [datasette.urls.path("/vlbatch-static/gallery.css")] if _state(datasette) else []


@hookimpl
def render_cell(row: Any, value: Any, column: str, table: str | None, database: str, datasette: Any) -> Markup | None:
    """A `media_paths` cell shows each file's preview above its name."""
    if _state(datasette) is None or database != DATABASE or column != "media_paths" or not isinstance(value, str):
        return None
    try:
        paths = json.loads(value)
    except ValueError:
        return None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return None
    keys = row.keys() if hasattr(row, "keys") else ()
    row_id = row["id"] if "id" in keys and isinstance(row["id"], int) else None
    owner = {"job_results": {"link": row_id}, "results": {"result": row_id}}.get(table or "", {})
    figures = "".join(
        f'<figure class="vb-cell"><img src="{escape(thumbnail_url(datasette, p, **owner))}" alt="" loading="lazy" '
        f'onerror="this.remove()"><figcaption title="{escape(p)}">{escape(p.rsplit("/", 1)[-1])}'
        "</figcaption></figure>"
        for p in paths
    )
    return Markup(figures)


async def thumbnail(datasette: Any, request: Any) -> Response:
    """The preview of a recorded media file under the media roots; 404 for anything else, before any open."""
    state = _state(datasette)
    refused = _unknown(request, {"path", "link", "result"})
    if refused:
        return refused
    path = request.args.get("path") or ""
    if len(path) > MAX_PATH:
        return _bad_request(f"path: longer than {MAX_PATH} characters")
    owners = [key for key in ("link", "result") if key in request.args]
    if len(owners) > 1:
        return _bad_request("give link or result, not both")
    owner = owners[0] if owners else None
    row_id = _number(request.args[owner], 1, MAX_ROW_ID) if owner else None
    if owner and row_id is None:
        return _bad_request(f"{owner}: a row id (digits 0-9, 1 to {MAX_ROW_ID})")
    if not path:
        return Response.text("no preview for that path", status=404)
    args = [row_id, path] if owner else [path]
    recorded = (await datasette.get_database(DATABASE).execute(RECORDED_SQL[owner], args)).first()
    real = await asyncio.to_thread(state.thumbnails.allowed, path) if recorded else None
    if real is None:
        return Response.text("no preview for that path", status=404)
    try:
        preview = await asyncio.to_thread(state.thumbnails.preview, real)
        body = await asyncio.to_thread(preview.file.read_bytes) if preview.file else b""
    except OSError as exc:  # the preview cache cannot be written (full disk, permissions): a passing fault
        return Response.text(f"cannot keep previews in {state.thumbnails.cache_dir}: {exc.strerror}", status=503)
    if preview.file is None:
        return Response.text(f"no preview: {preview.error}", status=404)
    return Response(body, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


GALLERY_FIELDS = ("q", "job", "tag", "since", "until", "show")


def _gallery_args(request: Any) -> tuple[dict[str, str], int] | str:
    """The gallery's form fields and page number, or why they are refused (a 400)."""
    unknown = sorted(set(request.args.keys()) - {*GALLERY_FIELDS, "page"})
    if unknown:
        return f"unknown parameter: {', '.join(unknown)[:200]}"
    fields = {name: (request.args.get(name) or "").strip() for name in GALLERY_FIELDS}
    for name, value in fields.items():
        if len(value) > MAX_TEXT:
            return f"{name}: longer than {MAX_TEXT} characters"
    if fields["show"] not in SHOW:
        return "show: answers, failed or nothing"
    page_text = (request.args.get("page") or "").strip()
    page = _number(page_text, 1, MAX_PAGE) if page_text else 1
    if page is None:
        return f"page: a page number (digits 0-9, 1 to {MAX_PAGE})"
    return fields, page


def _filter_from(fields: dict[str, str]) -> tuple[ResultFilter, list[str]]:
    """The gallery's form fields as a filter, and any errors in them (shown on the page)."""
    errors, times, now = [], {}, datetime.now(timezone.utc)
    for name in ("since", "until"):
        if fields[name]:
            try:
                times[name] = to_utc_iso(parse_when(fields[name], now))
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
    flt = ResultFilter(
        job=fields["job"] or None,
        tag=fields["tag"] or None,
        search=fields["q"] or None,
        failed=SHOW[fields["show"]],
        since=times.get("since"),
        until=times.get("until"),
    )
    return flt, errors


async def gallery(datasette: Any, request: Any) -> Response:
    db = datasette.get_database(DATABASE)
    parsed = _gallery_args(request)
    if isinstance(parsed, str):
        return _bad_request(parsed)
    fields, page = parsed
    flt, errors = _filter_from(fields)
    columns = await db.table_columns("results")
    cards, total = [], 0
    if not errors:
        try:
            sql, args = flt.count()
            total = (await db.execute(sql, args)).first()[0]
            page = min(page, max(1, math.ceil(total / PAGE_SIZE)))  # past the end (a stale link): the last page
            sql, args = flt.select(columns, PAGE_SIZE, (page - 1) * PAGE_SIZE)
            rows = [dict(row) for row in (await db.execute(sql, args)).rows]
            cards = [card(row, lambda p, link=row["link_id"]: thumbnail_url(datasette, p, link)) for row in rows]
        except Exception as exc:  # the query's time limit, most often (the search text is taken as words)
            errors.append(f"cannot show these results ({exc})")
    jobs = [row[0] for row in (await db.execute("SELECT id FROM jobs ORDER BY id")).rows]
    pages = max(1, math.ceil(total / PAGE_SIZE))
    kept = {k: v for k, v in fields.items() if v}
    context = {
        "cards": cards,
        "fields": fields,
        "errors": errors,
        "jobs": jobs,
        "total": total,
        "page": page,
        "pages": pages,
        "first": (page - 1) * PAGE_SIZE + 1,
        "last": min(total, page * PAGE_SIZE),
        "prev_url": "?" + urlencode(kept | {"page": page - 1}) if page > 1 else None,
        "next_url": "?" + urlencode(kept | {"page": page + 1}) if page < pages else None,
        "job_url": lambda job: "?" + urlencode({"job": job}),
    }
    html = await datasette.render_template("vlbatch/gallery.html", context, request=request)
    return Response.html(html)


async def charts_page(datasette: Any, request: Any) -> Response:
    refused = _unknown(request, set())
    if refused:
        return refused
    db = datasette.get_database(DATABASE)
    timing_rows = (await db.execute(charts.TIMINGS_SQL)).rows
    hour_rows = (await db.execute(charts.PER_HOUR_SQL)).rows
    timings, per_hour = [tuple(r) for r in timing_rows], [tuple(r) for r in hour_rows]
    svgs = await asyncio.to_thread(lambda: [*charts.timing_charts(timings), charts.per_hour_chart(per_hour)])
    context = {"charts": [Markup(svg) for svg in svgs], "points": len(timing_rows)}
    return Response.html(await datasette.render_template("vlbatch/charts.html", context, request=request))
