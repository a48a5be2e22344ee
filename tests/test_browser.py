"""The viewers in a real browser: headless Debian chromium, driven by playwright, over the database the worker
filled (tests/web_env.py): `vlbatch serve` on loopback, and the static `vlbatch gallery` pages from file://.

Skipped where /usr/bin/chromium or the playwright package is missing, or the browser does not start.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from browser_shots import (
    VIEWPORT,
    browser_problem,
    launch_chromium,
    settle_images,
    start_serve,
    stop,
    write_static_gallery,
)

problem = browser_problem()
if problem:
    pytest.skip(problem, allow_module_level=True)

from PIL import Image  # noqa: E402
from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

from batch.service.result_filter import ResultFilter  # noqa: E402
from batch.service.store import connect_read_only  # noqa: E402
from batch.service.web.cards import printable  # noqa: E402

pytestmark = pytest.mark.slow

BROKEN = "broken.jpg"
FTS_KEYWORDS = {"and", "or", "not", "near"}

# each figure of each card: its file name, and whether it shows a decoded preview or the "no preview" box
FIGURES_JS = """() => Array.from(document.querySelectorAll('.vb-card')).map((card) => ({
  hidden: card.hidden,
  error: card.querySelector('.vb-error')?.textContent ?? null,
  answer: card.querySelector('.vb-answer')?.textContent ?? null,
  figures: Array.from(card.querySelectorAll('.vb-media figure')).map((f) => {
    const img = f.querySelector('img');
    return {
      name: f.querySelector('figcaption').textContent.replace(/^\\u25b6\\s*/, ''),
      decoded: img ? img.complete && img.naturalWidth > 0 : false,
      nopreview: f.querySelector('.vb-nopreview') !== null,
    };
  }),
}))"""


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as playwright:
        try:
            chromium = launch_chromium(playwright)
        except Exception as exc:  # the binary is there but cannot start (no shared libraries, a sandbox refusal)
            pytest.skip(f"headless chromium does not start: {exc}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Page:
    context = browser.new_context(viewport=VIEWPORT)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def served(results_env, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`vlbatch serve --port 0` over the results database: its URL."""
    work = tmp_path_factory.mktemp("serve")
    process, url = start_serve(results_env, work / "thumbnails", log=work / "serve.log")
    try:
        yield url
    finally:
        stop(process)
    log = (work / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def static_site(results_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vlbatch gallery OUT --per-page 3`: 7 results on 3 pages."""
    work = tmp_path_factory.mktemp("static")
    return write_static_gallery(results_env, work / "site", work / "thumbnails", "--per-page", "3")


@pytest.fixture(scope="module")
def stored(results_env) -> list[dict]:
    """Every result row: answer, error, media paths (read-only)."""
    conn = connect_read_only(results_env.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT id, answer, error, media_paths FROM results ORDER BY id")]
    finally:
        conn.close()


def words(text: str) -> str:
    """Stored text as a page shows it: control characters (the tiny random model writes NULs) replaced, as the cards
    do; whitespace is compared loosely."""
    return " ".join(printable(text).split())


def assert_previews(cards: list[dict], stored: list[dict], published_root: Path | None = None) -> None:
    """Every file's preview decoded, except broken.jpg's, whose card shows "no preview" and the failure reason
    (static pages name the file from its media root on: `published_root`)."""
    assert cards
    reason = next(r["error"] for r in stored if r["error"])
    if published_root is not None:
        reason = reason.replace(str(published_root), published_root.name)
    for c in cards:
        for f in c["figures"]:
            if f["name"] == BROKEN:
                assert f["nopreview"] and not f["decoded"], c
                assert c["error"] is not None and words(c["error"]) == words(reason), c
                assert BROKEN in c["error"]
            else:
                assert f["decoded"] and not f["nopreview"], c
    assert any(f["name"] == BROKEN for c in cards for f in c["figures"])


def assert_screenshot(path: Path, size: dict[str, int] = VIEWPORT) -> None:
    assert path.stat().st_size > 20_000, path.stat().st_size
    with Image.open(path) as shot:
        assert shot.format == "PNG" and shot.width == size["width"] and shot.height >= size["height"], shot
        assert shot.convert("RGB").getcolors(256) is None  # text, previews and borders: far more than 256 colours


def fts_word(stored: list[dict], results_env) -> tuple[str, str, int]:
    """A plain word of one answer that the full-text search finds in some results, not all: (word, answer, hits)."""
    conn = connect_read_only(results_env.db_path)
    try:
        total = conn.execute(*ResultFilter().count()).fetchone()[0]
        for row in stored:
            for word in re.findall(r"[^\W_]+", row["answer"] or ""):
                if not (word.isascii() and word.isalpha() and len(word) >= 4) or word.lower() in FTS_KEYWORDS:
                    continue
                hits = conn.execute(*ResultFilter(search=word).count()).fetchone()[0]
                if 1 <= hits < total:
                    return word, row["answer"], hits
    finally:
        conn.close()
    pytest.fail(f"no answer has a plain word that some results lack: {[r['answer'] for r in stored]}")


def test_served_gallery_shows_previews_answers_and_searches(page: Page, served: str, stored, results_env, tmp_path):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(served + "-/gallery")
    settle_images(page)
    cards = page.evaluate(FIGURES_JS)
    assert len(cards) == len(stored)
    assert_previews(cards, stored)
    visible = [words(a.text_content()) for a in page.locator(".vb-answer").all() if a.is_visible()]
    assert sorted(visible) == sorted(words(r["answer"]) for r in stored if r["answer"] is not None)
    failure = page.locator(".vb-card.vb-failed .vb-error")
    assert failure.count() == 1 and failure.is_visible()
    assert all(url.startswith(served) for url in requested), requested  # Datasette's own assets only

    shot = tmp_path / "gallery.png"
    page.screenshot(path=str(shot), full_page=True)
    assert_screenshot(shot)

    word, answer, hits = fts_word(stored, results_env)
    page.locator("input[name=q]").fill(word)
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"[?&]q=" + re.escape(word)))
    assert 1 <= page.locator(".vb-card").count() == hits < len(stored)
    assert words(answer) in [words(t) for t in page.locator(".vb-answer").all_text_contents()]
    assert page.locator(".vb-answer").filter(has_text=word).first.is_visible()
    assert page.locator("input[name=q]").input_value() == word


def test_served_charts_draw_three_svgs(page: Page, served: str):
    page.goto(served + "-/charts")
    charts = page.locator(".vb-chart > svg")
    assert charts.count() == 3
    for chart in charts.all():
        box = chart.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 100, box
    assert "no answers yet" not in page.locator(".vb-chart").first.inner_text()


def test_served_results_table_decodes_media_thumbnails(page: Page, served: str, stored):
    page.goto(served + "vlbatch/results")
    settle_images(page)
    images = page.locator("td.col-media_paths img")
    paths = [p for row in stored for p in json.loads(row["media_paths"])]
    assert images.count() == sum(not p.endswith(BROKEN) for p in paths)  # broken.jpg's preview removes itself
    widths = images.evaluate_all("(imgs) => imgs.map((i) => i.complete ? i.naturalWidth : 0)")
    assert all(w > 0 for w in widths), widths
    names = page.locator("td.col-media_paths figcaption").all_text_contents()
    assert sorted(names) == sorted(Path(p).name for p in paths)


def test_static_gallery_from_file_url(page: Page, static_site: Path, stored, tmp_path, results_env):
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(static_site.as_uri())
    settle_images(page)

    index = json.loads(
        (static_site.parent / "search-index.js").read_text().removeprefix("window.VB_INDEX = ").rstrip().rstrip(";")
    )
    pages = {n for n, _ in index}
    assert pages == {1, 2, 3} and len(index) == len(stored)
    cards = page.evaluate(FIGURES_JS)
    assert len(cards) == 3
    for n in pages - {1}:  # every page's previews, not only the first one's
        other = page.context.new_page()
        other.goto((static_site.parent / f"page-{n}.html").as_uri())
        settle_images(other)
        cards += other.evaluate(FIGURES_JS)
        other.close()
    assert_previews(cards, stored, results_env.media)
    shown_answers = [words(c["answer"]) for c in cards if c["answer"] is not None]
    assert sorted(shown_answers) == sorted(words(r["answer"]) for r in stored if r["answer"] is not None)
    for answer in page.locator(".vb-answer").all():
        assert answer.is_visible()

    shot = tmp_path / "static-gallery.png"
    page.screenshot(path=str(shot), full_page=True)
    assert_screenshot(shot)

    # a word only page 2 has: this page hides every card and links to page 2, which opens filtered
    candidates = [w for n, text in index if n == 2 for w in text.split() if len(w) >= 4]
    candidates.sort(key=lambda w: not (w.isascii() and w.isalpha()))  # a plain word first, if page 2 has one
    word = next((w for w in candidates if not any(w in text for n, text in index if n != 2)), None)
    assert word, index
    expected = sum(n == 2 and word in text for n, text in index)
    page.locator("#vb-search").fill(word)
    assert page.locator(".vb-card:visible").count() == 0
    assert page.locator(".vb-card[hidden]").count() == 3
    link = page.locator("#vb-elsewhere a")
    assert link.count() == 1 and link.inner_text() == f"page 2 ({expected})"
    assert link.get_attribute("href").startswith("page-2.html#q=")
    link.click()
    page.wait_for_url(re.compile(r"page-2\.html#q="))
    assert page.locator("#vb-search").input_value() == word
    assert page.locator(".vb-card:visible").count() == expected >= 1
    for card in page.locator(".vb-card:visible").all():
        assert word in card.get_attribute("data-search")
    assert page.locator(".vb-card[hidden]").count() == 3 - expected
    assert page.locator("#vb-search-status").inner_text() == f"{expected} of 3 on this page match"

    assert requested and all(url.startswith(("file://", "data:")) for url in requested), requested
