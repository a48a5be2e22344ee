"""`vlbatch gallery OUT_DIR`: the results as static pages with their previews, needing no server and no network."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import jinja2
import pytest
from click.testing import CliRunner
from PIL import Image
from spool_env import SpoolEnv
from web_env import cards_of, latest_rows, search_word, shown

from batch.cli import main
from batch.service.web import static_gallery
from batch.service.web.cards import PROMPT_CHARS, card
from batch.service.web.static_gallery import MANIFEST


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preview cache for the module's writes (each preview is made once)."""
    return tmp_path_factory.mktemp("thumbnail-cache")


@pytest.fixture
def gallery(results_env: SpoolEnv, cache: Path):
    def _gallery(out: Path, *args: str, thumbnail_cache: Path = cache):
        command = ["--config", str(results_env.config_path), "gallery", str(out), "--thumbnail-cache"]
        return CliRunner().invoke(main, [*command, str(thumbnail_cache), *args], catch_exceptions=False)

    return _gallery


def published(row: dict, env: SpoolEnv) -> str:
    """A result's answer, or its reason with the file named from its media root on, as the pages show it."""
    return shown(row["answer"] or row["error"].replace(str(env.media), env.media.name))


def pages_of(out: Path) -> list[str]:
    """The pages in order: index.html, page-2.html, ..."""
    names = ["index.html", *sorted((p.name for p in out.glob("page-*.html")), key=lambda n: int(n[5:-5]))]
    return [(out / name).read_text(encoding="utf-8") for name in names]


def jobs_of(page: str) -> list[str]:
    return re.findall(r'<span class="vb-job">([^<]+)</span>', page)


def search_index(out: Path) -> list[list]:
    text = (out / "search-index.js").read_text(encoding="utf-8").strip()
    assert text.startswith("window.VB_INDEX = ") and text.endswith(";")
    return json.loads(text.removeprefix("window.VB_INDEX = ").removesuffix(";"))


def test_gallery_is_self_contained(gallery, results_env: SpoolEnv, tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = gallery(out)
    assert result.exit_code == 0, result.output
    assert "7 results on 1 pages" in result.stderr
    assert (out / MANIFEST).is_file()
    (page,) = pages_of(out)
    rows = latest_rows(results_env.db_path)
    assert len(cards_of(page)) == len(rows) == 7
    for row in rows:
        assert published(row, results_env) in page
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", page), "control characters reach the page"
    assert str(results_env.root) not in page, "pages that may be published show paths from the media root on"

    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 7  # beach, street (twice: alone and in the pair), harbor, portrait, clip; no broken
    for src in sources:
        assert src.startswith("thumbs/") and (out / src).is_file(), src
    assert len(list((out / "thumbs").iterdir())) == 5
    portrait = re.search(r'<img src="([^"]+)" alt="portrait-exif.jpg"', page).group(1)
    with Image.open(out / portrait) as picture:
        assert picture.format == "JPEG" and picture.height > picture.width

    prompts = [re.search(r'<span class="vb-prompt-text">([^<]*)</span>', c).group(1) for c in cards_of(page)]
    assert sorted(prompts) == ["Caption it."] * 6 + ["Compare them."]  # the failed file's card too
    (broken,) = [c for c in cards_of(page) if "vb-failed" in c]
    (failure,) = [r for r in rows if r["error"]]
    assert published(failure, results_env) in broken and '<div class="vb-nopreview">no preview</div>' in broken

    for file in out.rglob("*"):
        if file.suffix in (".html", ".css", ".js"):
            text = file.read_text(encoding="utf-8")
            assert not re.search(r"https?://", text), f"{file.name} refers to the network"
            for ref in re.findall(r'(?:src|href)="([^"#?]+)', text):
                assert (out / ref).is_file(), f"{file.name} refers to {ref}, which is not in the folder"

    index = search_index(out)
    assert [page for page, _ in index] == [1] * 7
    assert [text for _, text in index] == [
        html.unescape(re.search(r'data-search="([^"]*)"', c).group(1)) for c in cards_of(page)
    ]


def test_per_page_splits_into_linked_pages(gallery, tmp_path: Path) -> None:
    out = tmp_path / "site"
    result = gallery(out, "--per-page", "2")
    assert result.exit_code == 0, result.output
    pages = pages_of(out)
    assert [len(cards_of(p)) for p in pages] == [2, 2, 2, 1]
    names = ["index.html", "page-2.html", "page-3.html", "page-4.html"]
    for number, page in enumerate(pages):
        prev = re.findall(r'<a rel="prev" href="([^"]+)"', page)
        following = re.findall(r'<a rel="next" href="([^"]+)"', page)
        assert set(prev) == ({names[number - 1]} if number else set())
        assert set(following) == ({names[number + 1]} if number < 3 else set())
        assert f"page {number + 1} of 4" in page
    index = search_index(out)
    assert [page for page, _ in index] == [1, 1, 2, 2, 3, 3, 4]
    for number, page in enumerate(pages, start=1):
        searchable = [html.unescape(re.search(r'data-search="([^"]*)"', c).group(1)) for c in cards_of(page)]
        assert [text for p, text in index if p == number] == searchable


def test_filters(gallery, results_env: SpoolEnv, tmp_path: Path) -> None:
    rows = latest_rows(results_env.db_path)
    word, having = search_word(rows)
    written = {}
    for name, args in {
        "pair": ["--job", "pair"],
        "demo": ["--tag", "demo"],
        "comparison": ["--tag", "kind=comparison"],
        "failed": ["--failed"],
        "search": ["--search", word],
    }.items():
        result = gallery(tmp_path / name, *args)
        assert result.exit_code == 0, result.output
        (written[name],) = pages_of(tmp_path / name)
    assert jobs_of(written["pair"]) == jobs_of(written["comparison"]) == ["pair"]
    assert jobs_of(written["demo"]) == ["captions"] * 6
    (failure,) = [r for r in rows if r["error"]]
    (card,) = cards_of(written["failed"])
    assert published(failure, results_env) in card
    found = cards_of(written["search"])
    assert len(found) == len(having) < len(rows)
    for row in having:
        assert any(shown(row["answer"]) in c for c in found)
    assert f"search: {word}" in written["search"]

    result = gallery(tmp_path / "nobody", "--tag", "nobody")
    assert result.exit_code == 0, result.output
    (empty,) = pages_of(tmp_path / "nobody")
    assert cards_of(empty) == [] and "no results" in empty and search_index(tmp_path / "nobody") == []


def test_writing_again_removes_what_is_no_longer_shown(gallery, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert gallery(out, "--per-page", "2").exit_code == 0
    assert len(list(out.glob("page-*.html"))) == 3 and len(list((out / "thumbs").iterdir())) == 5
    (out / "notes.txt").write_text("mine")
    result = gallery(out, "--per-page", "2", "--job", "pair")
    assert result.exit_code == 0, result.output
    assert list(out.glob("page-*.html")) == []
    (page,) = pages_of(out)
    shown_thumbs = sorted(re.findall(r'<img src="thumbs/([^"]+)"', page))
    assert len(shown_thumbs) == 2
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == shown_thumbs
    assert (out / "notes.txt").read_text() == "mine"
    assert [p for p, _ in search_index(out)] == [1]


def test_refuses_a_folder_it_did_not_write(gallery, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.html").write_text("my own page")
    result = gallery(out)
    assert result.exit_code == 1
    assert "not a vlbatch gallery" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    assert (out / "index.html").read_text() == "my own page"

    result = gallery(tmp_path / "bad-search", "--fts", '"')  # a raw FTS5 query that is not one
    assert result.exit_code == 1 and "is not a valid SQLite FTS5 query" in result.stderr
    assert not (tmp_path / "bad-search").exists()

    file = tmp_path / "a-file"
    file.write_text("keep")
    result = gallery(file)
    assert result.exit_code != 0 and "a-file" in result.stderr
    assert file.read_text() == "keep"


def test_a_failed_preview_is_remembered(gallery, results_env: SpoolEnv, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "site"
    assert gallery(out, thumbnail_cache=cache).exit_code == 0
    (failed,) = cache.rglob("*.err")
    assert "corrupt or truncated" in failed.read_text()
    made = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*.*")}
    assert len(made) == 6  # five previews and the failure

    result = gallery(out, thumbnail_cache=cache)
    assert result.exit_code == 0, result.output
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*.*")} == made  # nothing made again
    (page,) = pages_of(out)
    (broken,) = [c for c in cards_of(page) if "broken.jpg" in c]
    assert '<div class="vb-nopreview">no preview</div>' in broken and "<img" not in broken


def test_cards_escape_what_they_show_and_cut_a_very_long_prompt() -> None:
    """The card template (the served gallery's and the static pages') escapes the prompt, names, tags and answer."""
    hostile = '<img src=x onerror="alert(1)">'
    row = {
        "link_id": 1,
        "job_id": f"job{hostile}",
        "media_paths": json.dumps([f"/media/{hostile}.jpg"]),
        "answer": f"an answer {hostile}",
        "prompt": f"Describe {hostile}" + " and more" * 300,
        "tags": json.dumps([hostile, {"k": hostile}]),
    }
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(static_gallery.HERE / "templates"), autoescape=True)
    macro = env.get_template("vlbatch/_card.html").module.result_card
    page = str(macro(card(row, lambda path: f"thumbs/{hostile}.jpg")))
    assert "<img src=x" not in page and 'onerror="alert' not in page
    assert page.count("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;") >= 5  # name, answer, prompt, job, tags
    prompt = re.search(r'<span class="vb-prompt-text">([^<]*)</span>', page).group(1)
    assert html.unescape(prompt).startswith(f"Describe {hostile} and more")
    assert len(html.unescape(prompt)) == PROMPT_CHARS + 1 and prompt.endswith("\u2026")  # cut, and said so
