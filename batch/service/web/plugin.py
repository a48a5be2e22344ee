"""The Datasette plugin `vlbatch serve` registers: the gallery, charts and thumbnail routes, and media cells.

Hooks act only on a Datasette that `batch.service.web.app.build` made (it carries a `WebState`); registered
once per process, they leave any other Datasette alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

from datasette import Response, hookimpl
from datasette.plugins import pm
from markupsafe import Markup, escape

from batch.service.result_filter import ResultFilter
from batch.service.timefilter import parse_when, to_utc_iso
from batch.service.web import charts
from batch.service.web.cards import card
from batch.service.web.metadata import DATABASE
from batch.service.web.thumbnails import Thumbnails

PAGE_SIZE = 48
# is the path recorded: in the given link (job_results row) or answer (results row), else anywhere (a scan)
RECORDED_SQL = {
    "link": "SELECT 1 FROM job_results jr, json_each(jr.media_paths) m WHERE jr.id = ? AND m.value = ?",
    "result": "SELECT 1 FROM results r, json_each(r.media_paths) m WHERE r.id = ? AND m.value = ?",
    None: "SELECT 1 FROM job_results jr, json_each(jr.media_paths) m WHERE m.value = ? LIMIT 1",
}


@dataclass
class WebState:
    thumbnails: Thumbnails


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
    path = request.args.get("path") or ""
    owner = next(((key, request.args[key]) for key in ("link", "result") if key in request.args), (None, None))
    if not path or (owner[0] and not owner[1].isdigit()):
        return Response.text("no preview for that path", status=404)
    args = [int(owner[1]), path] if owner[0] else [path]
    recorded = (await datasette.get_database(DATABASE).execute(RECORDED_SQL[owner[0]], args)).first()
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


def _filter_from(request: Any) -> tuple[ResultFilter, dict[str, str], list[str]]:
    """The gallery's form fields as a filter; the values as typed (to fill the form again) and any errors."""
    fields = {name: (request.args.get(name) or "").strip() for name in ("q", "job", "tag", "since", "until", "show")}
    errors, times, now = [], {}, datetime.now(timezone.utc)
    for name in ("since", "until"):
        if fields[name]:
            try:
                times[name] = to_utc_iso(parse_when(fields[name], now))
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
    failed = {"failed": True, "answers": False}.get(fields["show"])
    flt = ResultFilter(
        job=fields["job"] or None,
        tag=fields["tag"] or None,
        search=fields["q"] or None,
        failed=failed,
        since=times.get("since"),
        until=times.get("until"),
    )
    return flt, fields, errors


async def gallery(datasette: Any, request: Any) -> Response:
    db = datasette.get_database(DATABASE)
    flt, fields, errors = _filter_from(request)
    try:
        page = max(1, int(request.args.get("page") or 1))
    except ValueError:
        page = 1
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
        except Exception as exc:  # an FTS5 syntax error in the search text, most often
            errors.append(f"cannot run that search ({exc}); see SQLite FTS5 query syntax")
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
    db = datasette.get_database(DATABASE)
    timing_rows = (await db.execute(charts.TIMINGS_SQL)).rows
    hour_rows = (await db.execute(charts.PER_HOUR_SQL)).rows
    timings, per_hour = [tuple(r) for r in timing_rows], [tuple(r) for r in hour_rows]
    svgs = await asyncio.to_thread(lambda: [*charts.timing_charts(timings), charts.per_hour_chart(per_hour)])
    context = {"charts": [Markup(svg) for svg in svgs], "points": len(timing_rows)}
    return Response.html(await datasette.render_template("vlbatch/charts.html", context, request=request))
