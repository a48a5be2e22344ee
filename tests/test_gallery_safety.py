"""`vlbatch gallery OUT_DIR` touches nothing outside OUT_DIR and only the files it wrote inside it.

Symlinks are planted at every name it writes or removes (thumbs/, each page, the assets, the search index, the
manifest, a preview, a stale page), pointing at files and folders outside: the command refuses with one line
naming the link, and a snapshot of the outside folder (names, bytes, mtimes) is the same after. A user's own
files in OUT_DIR and thumbs/ stay; a symlinked OUT_DIR is followed and said so; the preview cache is as careful.
Every write is a real `vlbatch` process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from spool_env import SpoolEnv

from batch.service.web.static_gallery import LEGACY_MARKER, MANIFEST

Snapshot = dict[str, tuple]


def snapshot(root: Path) -> Snapshot:
    """Every name under `root` (links not followed) with its type, bytes or link target, and mtime."""
    seen: Snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                seen[str(path.relative_to(root))] = ("link", os.readlink(path), info.st_mtime_ns)
            elif stat.S_ISDIR(info.st_mode):
                seen[str(path.relative_to(root))] = ("dir", info.st_mtime_ns)
            else:
                seen[str(path.relative_to(root))] = ("file", path.read_bytes(), info.st_mtime_ns, info.st_ino)
    return seen


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder of someone's files outside every gallery folder: photos, a page, a style sheet."""
    root = tmp_path / "outside"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 my holiday \xff\xd9")
    (root / "photos" / "notes.txt").write_text("keep me")
    (root / "page.html").write_text("<p>my page</p>")
    (root / "style.css").write_text("body { color: red }")
    return root


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("thumbnail-cache")


@pytest.fixture
def gallery(results_env: SpoolEnv, cache: Path):
    """Runs `vlbatch gallery OUT ARGS...` as a process; returns the finished process (text stdout and stderr)."""

    def _gallery(out: Path, *args: str, thumbnail_cache: Path = cache) -> subprocess.CompletedProcess:
        command = results_env.cli("gallery", str(out), "--thumbnail-cache", str(thumbnail_cache), *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    return _gallery


def one_line_refusal(result: subprocess.CompletedProcess, names: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("ts=")]  # no log lines
    assert len(lines) == 1 and lines[0].startswith("vlbatch: error: "), result.stderr
    assert names in lines[0] and "Traceback" not in result.stderr


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def previews(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "thumbs").iterdir() if re.fullmatch(r"[0-9a-f]{64}\.jpg", p.name))


# each name `vlbatch gallery --per-page 2` writes or (index 'stale') removes, and a file and a folder to point at
PLANTED = [
    "thumbs",
    "index.html",
    "page-2.html",
    "page-4.html",
    "gallery.css",
    "gallery.js",
    "search-index.js",
    MANIFEST,
    "thumbs/PREVIEW",  # a preview the pages show
    "thumbs/" + "0" * 64 + ".jpg",  # a name of the kind it writes
]


@pytest.mark.parametrize("pointing_at", ["photos", "page.html"])
@pytest.mark.parametrize("name", PLANTED)
def test_a_symlink_planted_where_it_writes_is_refused(
    gallery, outside: Path, tmp_path: Path, name: str, pointing_at: str
) -> None:
    out = tmp_path / "site"
    first = gallery(out, "--per-page", "2")
    assert first.returncode == 0, first.stderr
    name = name.replace("PREVIEW", previews(out)[0])
    planted = out / name
    if planted.is_dir():
        shutil.rmtree(planted)
    else:
        planted.unlink(missing_ok=True)
    planted.symlink_to(outside / pointing_at)
    before = snapshot(outside)

    again = gallery(out, "--per-page", "2")
    one_line_refusal(again, f"{planted} is a symbolic link")
    assert snapshot(outside) == before
    assert os.readlink(planted) == str(outside / pointing_at)

    stale = gallery(out, "--per-page", "3")  # page-4.html would be removed now
    one_line_refusal(stale, f"{planted} is a symbolic link")
    assert snapshot(outside) == before


def test_a_new_folder_with_a_planted_thumbs_link_is_not_a_gallery(gallery, outside: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    out.mkdir()
    (out / "thumbs").symlink_to(outside / "photos")
    before = snapshot(outside)
    one_line_refusal(gallery(out), "is not a vlbatch gallery")
    assert snapshot(outside) == before


def test_links_at_names_it_does_not_write_are_left_alone(gallery, outside: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert gallery(out, "--per-page", "2").returncode == 0
    (out / "page-9.html").symlink_to(outside / "page.html")  # no page 9 was written: not vlbatch's
    (out / "photos").symlink_to(outside / "photos")
    (out / "thumbs" / "logo.jpg").symlink_to(outside / "photos" / "holiday.jpg")
    before = snapshot(outside)
    for per_page in ("2", "3", "100"):
        result = gallery(out, "--per-page", per_page)
        assert result.returncode == 0, result.stderr
    assert snapshot(outside) == before
    assert [p.is_symlink() for p in (out / "page-9.html", out / "photos", out / "thumbs" / "logo.jpg")] == [True] * 3


def test_the_users_own_files_stay(gallery, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert gallery(out, "--per-page", "2").returncode == 0
    assert len(previews(out)) == 5
    own = {
        out / "page-about.html": "<p>about</p>",
        out / "notes.txt": "mine",
        out / "page-2.html.bak": "a copy",
        out / "thumbs" / "logo.jpg": "not a preview",
    }
    for path, text in own.items():
        path.write_text(text)
    for args in (["--per-page", "2", "--job", "pair"], ["--tag", "nobody"]):
        result = gallery(out, *args)
        assert result.returncode == 0, result.stderr
        for path, text in own.items():
            assert path.read_text() == text
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "index.html", "gallery.css", "gallery.js", "search-index.js", "thumbs"]
        + ["page-about.html", "notes.txt", "page-2.html.bak"]
    )
    assert [p.name for p in (out / "thumbs").iterdir()] == ["logo.jpg"]
    assert manifest(out)["files"] == ["gallery.css", "gallery.js", "index.html", "search-index.js"]
    assert manifest(out)["thumbs"] == []


def test_the_same_run_twice_keeps_previews_and_removes_its_stale_pages(gallery, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert gallery(out, "--per-page", "2").returncode == 0
    assert sorted(p.name for p in out.glob("page-*.html")) == ["page-2.html", "page-3.html", "page-4.html"]
    kept = {name: (out / "thumbs" / name).stat() for name in previews(out)}
    assert manifest(out)["thumbs"] == sorted(kept)

    result = gallery(out, "--per-page", "3")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("page-*.html")) == ["page-2.html", "page-3.html"]
    assert {n: ((out / "thumbs" / n).stat().st_ino, (out / "thumbs" / n).stat().st_mtime_ns) for n in kept} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in kept.items()
    }
    assert set(manifest(out)["files"]) == {
        "index.html",
        "page-2.html",
        "page-3.html",
        "gallery.css",
        "gallery.js",
        "search-index.js",
    }
    assert not [p for p in out.rglob(".*.tmp")], "temp files left behind"


def test_a_symlinked_out_dir_is_followed_and_said(gallery, tmp_path: Path) -> None:
    real = tmp_path / "www" / "real"
    real.mkdir(parents=True)
    link = tmp_path / "last-night"
    link.symlink_to(real)
    for _ in range(2):
        result = gallery(link)
        assert result.returncode == 0, result.stderr
        assert f"vlbatch: {link} is a symbolic link to {real}; writing there" in result.stderr
    assert link.is_symlink() and (real / "index.html").is_file() and len(previews(real)) == 5

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_line_refusal(gallery(dangling), "which is not a folder")
    assert not (tmp_path / "nowhere").exists()


def test_a_gallery_of_the_older_marker_is_taken_over(gallery, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert gallery(out, "--per-page", "2").returncode == 0
    (out / MANIFEST).unlink()
    (out / LEGACY_MARKER).write_text("written by vlbatch gallery\n")
    (out / "page-about.html").write_text("mine")
    (out / "thumbs" / "logo.jpg").write_text("mine")
    result = gallery(out, "--per-page", "2", "--job", "pair")
    assert result.returncode == 0, result.stderr
    assert not (out / LEGACY_MARKER).exists() and manifest(out)["files"]
    assert not list(out.glob("page-[0-9]*.html")) and (out / "page-about.html").read_text() == "mine"
    assert len(previews(out)) == 2 and (out / "thumbs" / "logo.jpg").read_text() == "mine"


def test_the_preview_cache_never_writes_or_links_through_a_symlink(gallery, outside: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert gallery(tmp_path / "first", thumbnail_cache=cache).returncode == 0
    jpegs = sorted(cache.rglob("*.jpg"))
    (failed,) = cache.rglob("*.err")
    # an entry turned into a link to someone's JPEG, a remembered failure into a link to someone's text
    jpegs[0].unlink()
    jpegs[0].symlink_to(outside / "photos" / "holiday.jpg")
    failed.unlink()
    failed.symlink_to(outside / "photos" / "notes.txt")
    before = snapshot(outside)
    out = tmp_path / "second"
    result = gallery(out, thumbnail_cache=cache)
    assert result.returncode == 0, result.stderr
    assert snapshot(outside) == before
    assert not jpegs[0].is_symlink() and not failed.is_symlink(), "the planted links were not replaced"
    placed = out / "thumbs" / jpegs[0].name
    assert placed.read_bytes() != (outside / "photos" / "holiday.jpg").read_bytes()
    assert placed.stat().st_ino == jpegs[0].stat().st_ino  # hard-linked from the cache's own file
    assert "keep me" not in (out / "index.html").read_text()

    # a cache subfolder turned into a link to someone's folder: refused, nothing written there
    sub = jpegs[1].parent
    shutil.rmtree(sub)
    sub.symlink_to(outside / "photos")
    before = snapshot(outside)
    one_line_refusal(gallery(tmp_path / "third", thumbnail_cache=cache), f"{sub} is a symbolic link")
    assert snapshot(outside) == before
