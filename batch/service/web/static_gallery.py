"""`vlbatch gallery OUT_DIR`: the results as a folder of static pages that open from file://, with no network.

OUT_DIR gets index.html (page 1), page-2.html, ..., thumbs/ (the previews, hard-linked or copied from the
preview cache), gallery.css, gallery.js (the search box), search-index.js (every result's searchable text, so
the box also names matches on other pages) and `.vlbatch-gallery.json`, the manifest of the files it wrote.
Writing again replaces those files and removes the ones the new pages no longer use, but only files the previous
manifest lists and only regular files: a user's own files in OUT_DIR or thumbs/ stay. A folder holding other files
and no manifest is not a gallery and is refused.

Every write and delete goes through a descriptor of OUT_DIR (and of thumbs/, opened O_NOFOLLOW): new files are
made under unpredictable temp names (O_EXCL | O_NOFOLLOW) and renamed within the folder. A symlink where it would
write or delete (thumbs/, a page, an asset, the manifest, a preview) is refused before anything is written. A
symlinked OUT_DIR itself is followed once, and said so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from tqdm import tqdm

from batch.config import Config
from batch.errors import VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.service.atomic_write import SymlinkRefused
from batch.service.reports.reports import require_current_database, require_named
from batch.service.store.result_filter import ResultFilter
from batch.service.store.store import connect_read_only
from batch.service.web.cards import card
from batch.service.web.thumbnails import (
    DEFAULT_EDGE,
    Preview,
    Thumbnails,
    fsync_folder,
    open_folder_at,
    write_at,
)

HERE = Path(__file__).parent
MANIFEST = ".vlbatch-gallery.json"
LEGACY_MARKER = ".vlbatch-gallery"  # written by vlbatch before the manifest: its folders are galleries too
ASSETS = ("gallery.css", "gallery.js")
SEARCH_INDEX = "search-index.js"
THUMBS = "thumbs"
PAGE = re.compile(r"(?:index|page-[1-9][0-9]*)\.html\Z")
PREVIEW = re.compile(r"[0-9a-f]{64}\.jpg\Z")  # the cache's names: sha256 of path, size, mtime and edge


@dataclass(frozen=True)
class Written:
    index: Path
    results: int
    pages: int
    previews: int  # distinct files shown with a preview
    seconds: float


@dataclass
class Manifest:
    """What a run wrote: names in OUT_DIR and in thumbs/ (only names vlbatch itself gives are ever kept)."""

    files: set[str] = field(default_factory=set)
    thumbs: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, text: bytes) -> Manifest:
        data = json.loads(text)
        files, thumbs = data.get("files", []), data.get("thumbs", [])
        if not isinstance(files, list) or not isinstance(thumbs, list):
            raise ValueError("files and thumbs are not lists")
        return cls(
            {n for n in files if isinstance(n, str) and _ours(n)},
            {n for n in thumbs if isinstance(n, str) and PREVIEW.match(n)},
        )

    def dump(self) -> str:
        body = {"written_by": "vlbatch gallery", "files": sorted(self.files), "thumbs": sorted(self.thumbs)}
        return json.dumps(body, indent=1) + "\n"


def _ours(name: str) -> bool:
    """A name of OUT_DIR that vlbatch gallery writes (never a path: no folder part can be in it)."""
    return name in ASSETS or name == SEARCH_INDEX or bool(PAGE.match(name))


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
    target = _target(out_dir)
    fd = _open_out(target, out_dir, create=False)
    try:
        previous, legacy = _previous(fd, out_dir) if fd is not None else (Manifest(), False)
        rows = _rows(config, ResultFilter(**filters))
        if fd is None:
            target.mkdir(parents=True, exist_ok=True)
            fd = _open_out(target, out_dir, create=True)
            previous, legacy = _previous(fd, out_dir)  # made meanwhile by someone else: checked again
        assert fd is not None
        thumbnails = Thumbnails(config.spool.media_roots, thumbnail_cache, config.media, edge, decoder_factory)
        try:
            return _write(config, fd, out_dir, rows, filters, max(1, per_page), thumbnails, previous, legacy, started)
        finally:
            thumbnails.close()
    except SymlinkRefused as exc:
        raise VlbatchError(
            f"{exc.filename} is a symbolic link; vlbatch gallery writes and deletes only files it made itself "
            f"inside {out_dir} and never through a link (remove the link or give another folder)"
        ) from None
    except OSError as exc:
        where = exc.filename or out_dir
        raise VlbatchError(f"{where}: cannot write the gallery ({exc.strerror or exc})") from None
    finally:
        if fd is not None:
            os.close(fd)


def _target(out_dir: Path) -> Path:
    """The folder to write: OUT_DIR, or where it points when it is a symlink (followed once, and said so)."""
    if not out_dir.is_symlink():
        if out_dir.exists() and not out_dir.is_dir():
            raise VlbatchError(f"{out_dir}: not a folder")
        return out_dir
    real = Path(os.path.realpath(out_dir))
    if not real.is_dir():
        raise VlbatchError(f"{out_dir}: a symbolic link to {real}, which is not a folder")
    print(f"vlbatch: {out_dir} is a symbolic link to {real}; writing there", file=sys.stderr)
    return real


def _open_out(target: Path, out_dir: Path, create: bool) -> int | None:
    """OUT_DIR's descriptor, locked against a second `vlbatch gallery` into it; None if it does not exist yet."""
    try:
        # the folder named, or the symlink's target resolved above; it is no symlink (now) and nothing below it is
        # followed
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if create:
            raise
        return None
    except NotADirectoryError:
        raise VlbatchError(f"{out_dir}: not a folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VlbatchError(f"{out_dir}: another vlbatch gallery is writing into this folder") from None
    return fd


def _kind(fd: int, name: str) -> int | None:
    """The file type (stat.S_IFMT) of `name` in the folder `fd`, the link itself for a symlink; None if missing."""
    try:
        return stat.S_IFMT(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None


def _previous(fd: int, out_dir: Path) -> tuple[Manifest, bool]:
    """What the last run wrote (its manifest), and whether the folder has the marker of an older vlbatch.

    A folder with neither, holding anything, is not a gallery and is refused.
    """
    kind = _kind(fd, MANIFEST)
    if kind == stat.S_IFLNK:
        raise SymlinkRefused(out_dir / MANIFEST)
    if kind is not None:
        if kind != stat.S_IFREG:
            raise VlbatchError(f"{out_dir / MANIFEST}: not a regular file; move it aside")
        manifest_fd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        with open(manifest_fd, "rb") as handle:
            text = handle.read(16 << 20)
        try:
            return Manifest.parse(text), False
        except (ValueError, AttributeError) as exc:
            raise VlbatchError(f"{out_dir / MANIFEST}: not a vlbatch gallery manifest ({exc}); move it aside") from None
    if _kind(fd, LEGACY_MARKER) == stat.S_IFREG:
        # written before the manifest: the files the old version wrote have exactly the names it gives
        files = {name for name in os.listdir(fd) if _ours(name) and _kind(fd, name) == stat.S_IFREG}
        thumbs: set[str] = set()
        if _kind(fd, THUMBS) == stat.S_IFDIR:
            thumbs_fd = open_folder_at(fd, THUMBS, out_dir / THUMBS, create=False)
            try:
                thumbs = {n for n in os.listdir(thumbs_fd) if PREVIEW.match(n) and _kind(thumbs_fd, n) == stat.S_IFREG}
            finally:
                os.close(thumbs_fd)
        return Manifest(files, thumbs), True
    if os.listdir(fd):
        raise VlbatchError(
            f"{out_dir}: the folder holds other files and is not a vlbatch gallery (no {MANIFEST}); "
            "give an empty or new folder"
        )
    return Manifest(), False


def _check_names(fd: int, names: Iterable[str], folder: Path) -> None:
    """Refuse before anything is written when a name to be written or removed is a symlink or not a file."""
    for name in sorted(names):
        kind = _kind(fd, name)
        if kind == stat.S_IFLNK:
            raise SymlinkRefused(folder / name)
        if kind not in (None, stat.S_IFREG):
            raise VlbatchError(f"{folder / name}: not a regular file; vlbatch gallery writes a file there")


def _write(
    config: Config,
    fd: int,
    out_dir: Path,
    rows: list[dict[str, Any]],
    filters: dict[str, Any],
    per_page: int,
    thumbnails: Thumbnails,
    previous: Manifest,
    legacy: bool,
    started: float,
) -> Written:
    pages = max(1, math.ceil(len(rows) / per_page))
    files = {*ASSETS, SEARCH_INDEX, *(page_name(page) for page in range(1, pages + 1))}
    _check_names(fd, {*files, *previous.files, MANIFEST, *([LEGACY_MARKER] if legacy else [])}, out_dir)
    thumbs_kind = _kind(fd, THUMBS)
    if thumbs_kind == stat.S_IFLNK:
        raise SymlinkRefused(out_dir / THUMBS)
    if thumbs_kind not in (None, stat.S_IFDIR):
        raise VlbatchError(f"{out_dir / THUMBS}: not a folder")
    thumbs_fd = open_folder_at(fd, THUMBS, out_dir / THUMBS)
    try:
        # every name of the kind it writes, and every one it may remove, checked before the first write
        ours = [n for n in os.listdir(thumbs_fd) if PREVIEW.match(n) or n in previous.thumbs]
        _check_names(thumbs_fd, ours, out_dir / THUMBS)
        made = _make_previews(rows, thumbnails)
        shown = {path: preview.file.name for path, preview in made.items() if preview.file is not None}
        written = Manifest(files, set(shown.values()))
        # until this run is done the manifest names what the last run and this one write: an interrupted run
        # leaves nothing that a later one would take for the user's
        write_at(fd, MANIFEST, Manifest(previous.files | files, previous.thumbs | written.thumbs).dump())
        fsync_folder(fd)
        by_name = {preview.file.name: preview for preview in made.values() if preview.file is not None}
        for name, preview in sorted(by_name.items()):
            if _kind(thumbs_fd, name) != stat.S_IFREG:  # one already there is the same preview (named by content)
                thumbnails.link_into(preview, thumbs_fd, name)
        _write_pages(config, fd, rows, filters, per_page, pages, {p: f"{THUMBS}/{n}" for p, n in shown.items()})
        for name in sorted(previous.thumbs - written.thumbs):
            _remove(thumbs_fd, name)
        fsync_folder(thumbs_fd)
    finally:
        os.close(thumbs_fd)
    for name in sorted(previous.files - files):
        _remove(fd, name)
    if legacy:
        _remove(fd, LEGACY_MARKER)
    write_at(fd, MANIFEST, written.dump())  # last: it names exactly what the folder now holds of vlbatch's
    fsync_folder(fd)
    return Written(out_dir / "index.html", len(rows), pages, len(shown), time.perf_counter() - started)


def _remove(fd: int, name: str) -> None:
    """Remove a file an earlier run wrote: only a regular file (unlinkat never follows a symlink either)."""
    if _kind(fd, name) == stat.S_IFREG:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)


def _write_pages(
    config: Config,
    fd: int,
    rows: list[dict[str, Any]],
    filters: dict[str, Any],
    per_page: int,
    pages: int,
    previews: dict[str, str],
) -> None:
    roots = [Path(root) for root in config.spool.media_roots]
    cards = [card(row, previews.get, lambda path: _under_root(path, roots)) for row in rows]
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
        write_at(fd, asset, (HERE / "static" / asset).read_bytes(), durable=False)
    index = [[1 + i // per_page, c["search_text"]] for i, c in enumerate(cards)]
    write_at(fd, SEARCH_INDEX, "window.VB_INDEX = " + json.dumps(index, ensure_ascii=False) + ";\n")
    # index.html last: until the new pages are all there, the folder still opens on the old ones
    for page in range(pages, 0, -1):
        chunk = cards[(page - 1) * per_page : page * per_page]
        first = (page - 1) * per_page + 1
        html = template.render(common, cards=chunk, page=page, first=first, last=first + len(chunk) - 1)
        write_at(fd, page_name(page), html)


def _rows(config: Config, flt: ResultFilter) -> list[dict[str, Any]]:
    conn = connect_read_only(require_current_database(config))
    conn.row_factory = sqlite3.Row
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(results)")]
        require_named(conn, flt, config.spool.database)
        sql, args = flt.select(columns)
        try:
            return [dict(row) for row in conn.execute(sql, args)]
        except sqlite3.OperationalError as exc:
            if flt.fts:  # the one query text a user writes
                raise VlbatchError(f"--fts {flt.fts!r} is not a valid SQLite FTS5 query ({exc})") from None
            raise VlbatchError(f"{config.spool.database}: cannot read the results ({exc})") from None
    finally:
        conn.close()


def _under_root(path: str, roots: list[Path]) -> str:
    """A media path as the pages show it: from its media root on (the pages may be copied or published)."""
    for root in roots:
        if Path(path).is_relative_to(root):
            return f"{root.name}/{Path(path).relative_to(root)}"
    return Path(path).name


def _make_previews(rows: list[dict[str, Any]], thumbnails: Thumbnails) -> dict[str, Preview]:
    """Each recorded path's preview in the cache (made by every decoder of `thumbnails` at once): {path: preview}
    for the files that may have one. Nothing is written into the gallery folder yet."""
    paths = list(dict.fromkeys(p for row in rows for p in json.loads(row.get("media_paths") or "[]")))

    def make(path: str) -> Preview | None:
        real = thumbnails.allowed(path)
        return thumbnails.preview(real) if real else None

    bar = tqdm(total=len(paths), desc="previews", unit="file", disable=not sys.stderr.isatty(), file=sys.stderr)
    with bar, ThreadPoolExecutor(len(thumbnails.decoders)) as pool:
        made = {}
        for path, preview in zip(paths, pool.map(make, paths), strict=True):
            bar.update()
            if preview is not None:
                made[path] = preview
    return made
