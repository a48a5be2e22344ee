"""`vlbatch gallery OUT_DIR`: the results as a folder of static pages that open from file://, with no network.

OUT_DIR gets index.html (page 1), page-2.html, ..., thumbs/ (the previews, hard-linked or copied from the
preview cache), gallery.css, gallery.js (the search box) and search-index.js (every result's searchable text, so
the box also names matches on other pages). Writing again replaces the pages, removes what the new pages no
longer use, and keeps previews that are still current; files vlbatch did not write are never touched (a folder
holding other files and no `.vlbatch-gallery` marker is refused).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from tqdm import tqdm

from batch.config import Config
from batch.errors import VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.service.atomic_write import write_atomic
from batch.service.reports import require_current_database
from batch.service.result_filter import ResultFilter
from batch.service.store import connect_read_only
from batch.service.web.cards import card
from batch.service.web.thumbnails import DEFAULT_EDGE, Thumbnails

HERE = Path(__file__).parent
MARKER = ".vlbatch-gallery"
ASSETS = ("gallery.css", "gallery.js")


@dataclass(frozen=True)
class Written:
    index: Path
    results: int
    pages: int
    previews: int  # distinct files shown with a preview
    seconds: float


def page_name(page: int) -> str:
    return "index.html" if page == 1 else f"page-{page}.html"


def write_gallery(
    config: Config,
    out_dir: Path,
    filters: dict[str, Any],
    per_page: int,
    thumbnail_cache: Path,
    edge: int = DEFAULT_EDGE,
    decoder_factory: Callable[[], MediaDecoder] = IsolatedDecoder,
) -> Written:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    rows = _rows(config, ResultFilter(**filters))
    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / MARKER, "written by vlbatch gallery: its pages and thumbs/ are replaced on each run\n")
    thumbnails = Thumbnails(config.spool.media_roots, thumbnail_cache, config.media, edge, decoder_factory)
    try:
        previews = _copy_previews(rows, thumbnails, out_dir / "thumbs")
    finally:
        thumbnails.close()
    roots = [Path(root) for root in config.spool.media_roots]
    cards = [card(row, previews.get, lambda path: _under_root(path, roots)) for row in rows]
    pages = max(1, math.ceil(len(cards) / per_page))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    template = env.get_template("vlbatch/static_page.html")
    common = {
        "total": len(cards),
        "pages": pages,
        "page_name": page_name,
        "filters": {k: v for k, v in filters.items() if v not in (None, False)},
        "database": Path(config.spool.database).name,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for asset in ASSETS:
        shutil.copyfile(HERE / "static" / asset, out_dir / asset)
    index = [[1 + i // per_page, c["search_text"]] for i, c in enumerate(cards)]
    write_atomic(out_dir / "search-index.js", "window.VB_INDEX = " + json.dumps(index, ensure_ascii=False) + ";\n")
    # index.html last: until the new pages are all there, the folder still opens on the old ones
    for page in range(pages, 0, -1):
        chunk = cards[(page - 1) * per_page : page * per_page]
        first = (page - 1) * per_page + 1
        html = template.render(common, cards=chunk, page=page, first=first, last=first + len(chunk) - 1)
        write_atomic(out_dir / page_name(page), html)
    _remove_stale(out_dir, pages, set(previews.values()))
    return Written(out_dir / "index.html", len(cards), pages, len(previews), time.perf_counter() - started)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise VlbatchError(f"{out_dir}: not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise VlbatchError(
            f"{out_dir}: the folder holds other files and is not a vlbatch gallery; give an empty or new folder"
        )


def _rows(config: Config, flt: ResultFilter) -> list[dict[str, Any]]:
    conn = connect_read_only(require_current_database(config))
    conn.row_factory = sqlite3.Row
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(results)")]
        sql, args = flt.select(columns)
        try:
            return [dict(row) for row in conn.execute(sql, args)]
        except sqlite3.OperationalError as exc:
            raise VlbatchError(f"cannot run that search ({exc}); see SQLite FTS5 query syntax") from None
    finally:
        conn.close()


def _under_root(path: str, roots: list[Path]) -> str:
    """A media path as the pages show it: from its media root on (the pages may be copied or published)."""
    for root in roots:
        if Path(path).is_relative_to(root):
            return f"{root.name}/{Path(path).relative_to(root)}"
    return Path(path).name


def _copy_previews(rows: list[dict[str, Any]], thumbnails: Thumbnails, thumbs: Path) -> dict[str, str]:
    """Each recorded path's preview put into thumbs/: {path: "thumbs/NAME.jpg"}, for files that have one.

    Previews are made by every decoder of `thumbnails` at once; each is hard-linked from the cache where the
    two share a filesystem, else copied.
    """
    paths = list(dict.fromkeys(p for row in rows for p in json.loads(row.get("media_paths") or "[]")))

    def place(path: str) -> str | None:
        real = thumbnails.allowed(path)
        preview = thumbnails.preview(real) if real else None
        if preview is None or preview.file is None:
            return None
        target = thumbs / preview.file.name
        if not target.is_file():
            try:
                os.link(preview.file, target)
            except FileExistsError:  # the same preview, placed by another thread a moment ago
                pass
            except OSError:  # another filesystem, or one without hard links
                shutil.copyfile(preview.file, target)
        return f"thumbs/{target.name}"

    bar = tqdm(total=len(paths), desc="previews", unit="file", disable=not sys.stderr.isatty(), file=sys.stderr)
    with bar, ThreadPoolExecutor(len(thumbnails.decoders)) as pool:
        placed = {}
        for path, name in zip(paths, pool.map(place, paths), strict=True):
            bar.update()
            if name:
                placed[path] = name
    return placed


def _remove_stale(out_dir: Path, pages: int, previews: set[str]) -> None:
    """Pages past the last one and previews no page shows any more, from an earlier run into the same folder."""
    for old in out_dir.glob("page-*.html"):
        number = old.stem.removeprefix("page-")
        if not number.isdigit() or int(number) > pages:
            old.unlink(missing_ok=True)
    for old in (out_dir / "thumbs").glob("*.jpg"):
        if f"thumbs/{old.name}" not in previews:
            old.unlink(missing_ok=True)
