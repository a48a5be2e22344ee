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
from spool_env import SpoolEnv
from web_env import LONG_JOB, LONG_NAME, LONG_PROMPT, SHORT_PROMPT, latest_rows, make_crowded_results

problem = browser_problem()
if problem:
    pytest.skip(problem, allow_module_level=True)

from PIL import Image  # noqa: E402
from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

from batch.infer.timings import TIMING_COLUMNS  # noqa: E402
from batch.service.store.result_filter import ResultFilter  # noqa: E402
from batch.service.store.store import connect_read_only  # noqa: E402
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


# ---------------------------------------------------------------------------------------------------------------
# Cards that push at their edges: long names, prompts, tags and answers stay inside their card, at two widths

WIDTHS = (1400, 390)

# What each visible card draws, against its content box (inside border and padding): every element and every run of
# text, clipped by the boxes inside the card that clip their overflow (an ellipsis, a line clamp), must lie inside it;
# and no two cards may overlap.
CONTAINMENT_JS = """() => {
  const inset = (el) => {
    const r = el.getBoundingClientRect(), s = getComputedStyle(el), px = (v) => parseFloat(v) || 0;
    return {left: r.left + px(s.borderLeftWidth) + px(s.paddingLeft), right: r.right - px(s.borderRightWidth) -
      px(s.paddingRight), top: r.top + px(s.borderTopWidth) + px(s.paddingTop), bottom: r.bottom -
      px(s.borderBottomWidth) - px(s.paddingBottom)};
  };
  const cards = Array.from(document.querySelectorAll('.vb-card')).filter((c) => !c.hidden);
  const escapes = [], overlaps = [];
  cards.forEach((card, index) => {
    const box = inset(card);
    const walker = document.createTreeWalker(card, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      let rect;
      if (node.nodeType === Node.TEXT_NODE) {
        if (!node.textContent.trim()) continue;
        const range = document.createRange();
        range.selectNodeContents(node);
        rect = range.getBoundingClientRect();
      } else {
        rect = node.getBoundingClientRect();
      }
      if (rect.width === 0 && rect.height === 0) continue;  // not drawn (display: none, a closed <details>)
      const seen = {left: rect.left, right: rect.right, top: rect.top, bottom: rect.bottom};
      for (let up = node.parentElement; up && up !== card; up = up.parentElement) {
        const style = getComputedStyle(up), clip = up.getBoundingClientRect();
        if (style.overflowX !== 'visible') { seen.left = Math.max(seen.left, clip.left);
          seen.right = Math.min(seen.right, clip.right); }
        if (style.overflowY !== 'visible') { seen.top = Math.max(seen.top, clip.top);
          seen.bottom = Math.min(seen.bottom, clip.bottom); }
      }
      if (seen.right <= seen.left || seen.bottom <= seen.top) continue;  // clipped away entirely
      const out = Math.max(box.left - seen.left, seen.right - box.right, box.top - seen.top, seen.bottom - box.bottom);
      if (out > 0.5) {
        const what = node.nodeType === Node.TEXT_NODE ? '"' + node.textContent.trim().slice(0, 30) + '"' :
          node.tagName.toLowerCase() + (node.className ? '.' + String(node.className).split(' ')[0] : '');
        escapes.push({card: index, what, by: Math.round(out)});
      }
    }
    for (let other = index + 1; other < cards.length; other++) {
      const a = card.getBoundingClientRect(), b = cards[other].getBoundingClientRect();
      const w = Math.min(a.right, b.right) - Math.max(a.left, b.left), h = Math.min(a.bottom, b.bottom) -
        Math.max(a.top, b.top);
      if (w > 0.5 && h > 0.5) overlaps.push([index, other]);
    }
  });
  const widest = Math.max(...cards.map((c) => c.getBoundingClientRect().right));
  return {cards: cards.length, escapes, overlaps, widest, viewport: window.innerWidth};
}"""

# each card's prompt and job id as drawn: the text, whether its box has a size inside the viewport's width, and how
# many lines of text it is high
SHOWN_JS = """() => Array.from(document.querySelectorAll('.vb-card')).map((card) => {
  const shown = (el, text = el) => {
    if (!el) return null;
    const r = el.getBoundingClientRect(), s = getComputedStyle(text);
    return {text: el.innerText, drawn: r.width > 0 && r.height > 0 && r.left >= 0 && r.right <= innerWidth,
      lines: text.getBoundingClientRect().height / (parseFloat(s.lineHeight) || 1.2 * parseFloat(s.fontSize))}; };
  const prompt = card.querySelector('.vb-prompt');
  return {prompt: prompt && shown(prompt, prompt.querySelector('.vb-prompt-text') || prompt),
    job: shown(card.querySelector('.vb-job'))};
})"""


@pytest.fixture(scope="module")
def crowded(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> SpoolEnv:
    return make_crowded_results(tmp_path_factory.mktemp("crowded"), tiny_onnx)


@pytest.fixture(scope="module")
def crowded_pages(crowded: SpoolEnv, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The crowded results as the served gallery, the static one and Datasette's results table: {view: URL}."""
    work = tmp_path_factory.mktemp("crowded-views")
    static = write_static_gallery(crowded, work / "site", work / "thumbnails")
    process, url = start_serve(crowded, work / "thumbnails", log=work / "serve.log")
    try:
        yield {"served": url + "-/gallery", "static": static.as_uri(), "table": url + "vlbatch/results"}
    finally:
        stop(process)


def first_words(text: str, count: int = 4) -> str:
    return " ".join(text.split()[:count])


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("view", ["served", "static"])
def test_long_names_prompts_tags_and_answers_stay_inside_their_cards(
    browser: Browser, crowded_pages: dict[str, str], crowded: SpoolEnv, view: str, width: int
):
    context = browser.new_context(viewport={"width": width, "height": 900})
    try:
        page = context.new_page()
        page.goto(crowded_pages[view])
        settle_images(page)
        closed, shown = page.evaluate(CONTAINMENT_JS), page.evaluate(SHOWN_JS)
        # a click opens a prompt (Datasette's pages close an open <details> at a click elsewhere: the rest are opened
        # without one)
        page.locator(".vb-card", has=page.locator(f'.vb-job:text-is("{LONG_JOB}")')).first.locator("summary").click()
        assert page.evaluate("() => document.querySelectorAll('.vb-prompt[open]').length") == 1
        page.evaluate("() => document.querySelectorAll('.vb-prompt').forEach((d) => { d.open = true; })")
        opened, shown_open = page.evaluate(CONTAINMENT_JS), page.evaluate(SHOWN_JS)
    finally:
        context.close()
    rows = latest_rows(crowded.db_path)
    for measured in (closed, opened):
        assert measured["cards"] == len(rows) == 6
        assert measured["escapes"] == [], measured["escapes"][:20]
        assert measured["overlaps"] == []
        assert measured["widest"] <= measured["viewport"], measured  # no card reaches past the window's right edge
    whole = {" ".join(c["prompt"]["text"].split()) for c in shown_open}
    assert whole == {" ".join(LONG_PROMPT.split()), SHORT_PROMPT}
    for before, after in zip(shown, shown_open, strict=True):  # two lines until opened
        assert before["prompt"]["lines"] < 2.1, before
        if before["job"]["text"] == LONG_JOB:
            assert after["prompt"]["lines"] > 3, after
    prompts = {LONG_JOB: first_words(LONG_PROMPT), "colours": SHORT_PROMPT}
    for card in shown:
        assert card["prompt"] and card["prompt"]["drawn"], card
        assert card["job"] and card["job"]["drawn"] and card["job"]["text"] in prompts, card
        assert " ".join(card["prompt"]["text"].split()).startswith(prompts[card["job"]["text"]]), card
    assert sorted(c["job"]["text"] for c in shown) == sorted(r["job_id"] for r in rows)


def test_results_table_opens_on_the_file_and_its_answer_with_the_column_notes_folded(
    browser: Browser, crowded_pages: dict[str, str], crowded: SpoolEnv
):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.goto(crowded_pages["table"])
        settle_images(page)
        columns = page.locator("table.rows-and-columns th").evaluate_all("(ths) => ths.map((t) => t.dataset.column)")
        assert columns[:3] == ["id", "media_paths", "answer"]
        box = page.locator("th.col-answer").bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 1400, box  # on the first screen
        assert box["y"] >= 0 and box["y"] + box["height"] <= 900, box

        # the 150-character file's preview, decoded, in the media_paths column, its name wrapped inside the cell
        cell = page.locator("td.col-media_paths", has=page.locator(f'figcaption:text-is("{LONG_NAME}")'))
        assert cell.count() == 2  # its answers by both jobs
        size = cell.first.locator("img").evaluate("(i) => i.complete ? i.naturalWidth : 0")
        assert size > 0
        fits = cell.first.evaluate(
            "(td) => { const c = td.getBoundingClientRect();"
            " const f = td.querySelector('figcaption').getBoundingClientRect();"
            " return f.left >= c.left && f.right <= c.right; }"
        )
        assert fits

        # every column's description, one click away in "About these columns"; none printed above the rows
        about = page.locator("details.vb-about-columns")
        assert about.count() == 1 and about.get_attribute("open") is None
        assert about.locator("summary").inner_text() == "About these columns"
        described = about.locator("dt").all_text_contents()
        assert set(described) >= set(columns) - {"Link"}, set(columns) - set(described)
        notes = about.locator("dd")
        assert TIMING_COLUMNS["ttft_ms"] in notes.all_text_contents()
        assert not notes.first.is_visible()
        assert [d.is_visible() for d in page.locator("dl.column-descriptions").all()] == [False, False]
        about.locator("summary").click()
        assert notes.first.is_visible() and about.get_attribute("open") is not None
    finally:
        context.close()
