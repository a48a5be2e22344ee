"""Sidecars vlbatch owns: `.txt` and XMP (`photo.jpg.xmp`, the caption as dc:description) written atomically, never
over or through someone else's file, read back by exiftool, and removed only when vlbatch wrote their exact bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from spool_env import SpoolEnv
from synthetic import synthetic_image, write_heic

from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.jobfile import JobRejected, parse_job
from batch.service.store.store import Store
from batch.service.worker.sidecars import (
    remove_gone,
    remove_sidecar,
    sidecar_bytes,
    sidecar_path,
    write_sidecar,
    xml_text,
    xmp_document,
)

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
}
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")  # XML 1.0's Char, negated
NASTY = 'Fish & <chips> "at" 5\'s\x00\x01\x08\x0b\x0c\x1f\x7f\ttab\nline\rreturn \ud800 \ufffe\uffff é 🐟 ]]> &amp;'
NASTY_KEPT = 'Fish & <chips> "at" 5\'s\x7f\ttab\nline\rreturn   é 🐟 ]]> &amp;'  # what XML 1.0 can hold of it


def exiftool() -> str:
    found = shutil.which("exiftool")
    if found is None:
        pytest.skip("exiftool is not installed (Debian: apt-get install libimage-exiftool-perl; .ci/run installs it)")
    return found


def description(path: Path) -> str:
    """The XMP dc:description exiftool reads from a file, exactly (-b: the raw value, newlines and CRs kept)."""
    done = subprocess.run(
        [exiftool(), "-b", "-XMP-dc:Description", str(path)], capture_output=True, timeout=60, check=True
    )
    return done.stdout.decode("utf-8")


def caption_in(document: bytes) -> tuple[str, str]:
    """(caption, its xml:lang) as an XML parser reads the sidecar."""
    root = ET.fromstring(document.split(b"?>", 1)[1].rsplit(b"<?xpacket", 1)[0])
    (item,) = root.findall("./rdf:RDF/rdf:Description/dc:description/rdf:Alt/rdf:li", NS)
    return item.text or "", item.get(XML_LANG, "")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "vlbatch.db")


def answer(store: Store, text: str, media: Path) -> int:
    """A stored answer (a result row of a running job), as the worker records one."""
    run_id, _ = store.start_job("captions", {}, "test")
    return store.add_result("captions", run_id, {"media_paths": json.dumps([str(media)]), "answer": text})


# ---------------------------------------------------------------------------------------------------------------
# The XMP document


def test_names_of_sidecars() -> None:
    assert sidecar_path(Path("/p/IMG_1.JPG"), "txt") == Path("/p/IMG_1.txt")  # as before: the stem
    assert sidecar_path(Path("/p/IMG_1.JPG"), "xmp") == Path("/p/IMG_1.JPG.xmp")  # one per file
    assert sidecar_path(Path("/p/IMG_1.CR2"), "xmp") != sidecar_path(Path("/p/IMG_1.JPG"), "xmp")
    with pytest.raises(ValueError, match="unknown sidecar format 'json'"):
        sidecar_path(Path("/p/a.jpg"), "json")


def test_xml_text_escapes_markup_and_drops_what_xml_forbids() -> None:
    assert xml_text("a & b < c > d") == "a &amp; b &lt; c &gt; d"
    assert xml_text("\x00\x1f\x0b\ud800\ufffe\uffff") == ""
    assert xml_text("\t\n") == "\t\n" and xml_text("\r") == "&#13;"
    assert xml_text("]]> &amp;") == "]]&gt; &amp;amp;"


@pytest.mark.parametrize("text", ["A red boat in a harbour.", NASTY, "", "  spaces kept  ", "<x:xmpmeta>"])
def test_the_caption_reads_back_as_written(text: str) -> None:
    document = sidecar_bytes(text, "xmp")
    assert document.startswith(b'<?xpacket begin="\xef\xbb\xbf"') and document.endswith(b'<?xpacket end="w"?>\n')
    kept = NASTY_KEPT if text == NASTY else text
    assert caption_in(document) == (kept, "x-default")
    assert sidecar_bytes(text, "xmp") == document  # the same answer, the same bytes: ownership by content
    assert sidecar_bytes("Plain.", "txt") == b"Plain."


def test_exiftool_reads_the_caption(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg.xmp"
    path.write_text(xmp_document(NASTY), encoding="utf-8", errors="replace")
    assert description(path) == NASTY_KEPT
    done = subprocess.run([exiftool(), "-s3", "-XMP-dc:Description", str(path)], capture_output=True, text=True)
    assert done.stdout.startswith("Fish & <chips>")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def test_xmp_is_written_beside_the_file_and_recorded(store: Store, tmp_path: Path) -> None:
    media = tmp_path / "IMG_1.HEIC"
    media.write_bytes(b"photo")
    text = NASTY.replace("\ud800", "")  # SQLite holds UTF-8: a stored answer has no lone surrogate
    result = answer(store, text, media)
    written = write_sidecar(store, media, "xmp", result)
    assert written == tmp_path / "IMG_1.HEIC.xmp"
    assert written.read_bytes() == sidecar_bytes(text, "xmp")
    assert caption_in(written.read_bytes())[0] == NASTY_KEPT
    (row,) = store.db["sidecars"].rows
    assert (row["path"], row["result_id"]) == (str(written), result)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_an_unchanged_sidecar_is_not_written_again(store: Store, tmp_path: Path) -> None:
    media = tmp_path / "a.jpg"
    media.write_bytes(b"photo")
    result = answer(store, "Same caption.", media)
    path = write_sidecar(store, media, "xmp", result)
    assert path is not None
    before = os.stat(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    assert write_sidecar(store, media, "xmp", result) == path
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns - 10**9)  # untouched


def test_foreign_xmp_and_symlinks_are_kept(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    media = tmp_path / "a.jpg"
    media.write_bytes(b"photo")
    result = answer(store, "A caption.", media)
    darktable = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><!-- darktable history --></x:xmpmeta>'
    (tmp_path / "a.jpg.xmp").write_text(darktable)
    assert write_sidecar(store, media, "xmp", result) is None
    assert (tmp_path / "a.jpg.xmp").read_text() == darktable
    (kept,) = [r for r in caplog.records if getattr(r, "event", None) == "sidecar.kept"]
    assert kept.fields == {"path": tmp_path / "a.jpg.xmp", "reason": "exists and was not written by vlbatch"}
    assert write_sidecar(store, media, "xmp", result, overwrite=True) == tmp_path / "a.jpg.xmp"  # the job said so
    assert caption_in((tmp_path / "a.jpg.xmp").read_bytes())[0] == "A caption."
    outside = tmp_path / "outside.xmp"
    outside.write_text("precious")
    other = tmp_path / "b.jpg"
    other.write_bytes(b"photo")
    (tmp_path / "b.jpg.xmp").symlink_to(outside)
    (tmp_path / "c.jpg.xmp").mkdir()  # not a file at all
    for overwrite in (False, True):
        assert write_sidecar(store, other, "xmp", answer(store, "B.", other), overwrite=overwrite) is None
        assert write_sidecar(store, tmp_path / "c.jpg", "xmp", result, overwrite=overwrite) is None
    assert outside.read_text() == "precious" and (tmp_path / "b.jpg.xmp").is_symlink()
    assert (tmp_path / "c.jpg.xmp").is_dir()
    reasons = [r.fields["reason"] for r in caplog.records if getattr(r, "event", None) == "sidecar.kept"]
    assert reasons[1:] == ["is a symbolic link", "is not a regular file"] * 2


def test_a_copied_folder_keeps_its_sidecars_ours(store: Store, tmp_path: Path) -> None:
    media = tmp_path / "orig" / "a.jpg"
    media.parent.mkdir()
    media.write_bytes(b"photo")
    write_sidecar(store, media, "xmp", answer(store, "First caption.", media))
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    copied = tmp_path / "copy" / "a.jpg"
    assert write_sidecar(store, copied, "xmp", answer(store, "Second caption.", copied)) is not None
    assert caption_in((tmp_path / "copy" / "a.jpg.xmp").read_bytes())[0] == "Second caption."


# ---------------------------------------------------------------------------------------------------------------
# Removing the sidecar of a file that is gone


def test_removing_only_what_vlbatch_wrote(store: Store, tmp_path: Path) -> None:
    names = ("ours.jpg", "edited.jpg", "foreign.jpg", "linked.jpg")
    for name in names:
        media = tmp_path / name
        media.write_bytes(b"photo")
        write_sidecar(store, media, "xmp", answer(store, f"Caption of {name}.", media))
    with open(tmp_path / "edited.jpg.xmp", "a") as handle:
        handle.write("<!-- a photo manager added keywords -->")
    (tmp_path / "foreign.jpg.xmp").write_text("someone else's")
    (tmp_path / "linked.jpg.xmp").unlink()
    (tmp_path / "linked.jpg.xmp").symlink_to(tmp_path / "ours.jpg.xmp")
    for name in names:
        (tmp_path / name).unlink()  # the media files are gone
    assert remove_sidecar(store, tmp_path / "linked.jpg", "xmp") is False  # a symlink, even to our own bytes
    assert remove_sidecar(store, tmp_path / "ours.jpg", "xmp") is True
    assert remove_sidecar(store, tmp_path / "ours.jpg", "xmp") is False  # nothing left to remove
    assert remove_sidecar(store, tmp_path / "edited.jpg", "xmp") is False
    assert remove_sidecar(store, tmp_path / "foreign.jpg", "xmp") is False
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".xmp") == [
        "edited.jpg.xmp",
        "foreign.jpg.xmp",
        "linked.jpg.xmp",
    ]


def test_remove_gone_takes_both_formats_and_spares_a_namesakes_txt(store: Store, tmp_path: Path) -> None:
    jpg, png = tmp_path / "shot.jpg", tmp_path / "shot.png"
    for media in (jpg, png):
        media.write_bytes(b"photo")
    result = answer(store, "A caption.", jpg)
    write_sidecar(store, jpg, "txt", result)
    write_sidecar(store, jpg, "xmp", result)
    job = parse_job(_job(tmp_path, "sidecar: xmp\n"), allowed_roots=[tmp_path], generation=GEN, media=MEDIA)
    jpg.unlink()
    assert remove_gone(job, jpg, store) is True
    assert not (tmp_path / "shot.jpg.xmp").exists()
    assert (tmp_path / "shot.txt").exists()  # shot.png is still there: the .txt may be its caption
    png.unlink()
    assert remove_gone(job, jpg, store) is True and not (tmp_path / "shot.txt").exists()
    assert remove_gone(job, jpg, store) is False


# ---------------------------------------------------------------------------------------------------------------
# The job key

GEN, MEDIA = GenerationSettings(), MediaSettings()


def _job(folder: Path, extra: str, inputs: str = "inputs: .\n") -> Path:
    if not (folder / "a.png").exists():
        synthetic_image(8, 8).save(folder / "a.png")
    path = folder / "job.yaml"
    path.write_text(f"prompt: Caption.\n{inputs}{extra}")
    return path


@pytest.mark.parametrize(
    ("written", "parsed"),
    [("true", "txt"), ("txt", "txt"), ("xmp", "xmp"), ("XMP", "xmp"), ("false", None), (None, None)],
)
def test_the_sidecar_key(tmp_path: Path, written: str | None, parsed: str | None) -> None:
    extra = "" if written is None else f"sidecar: {written}\n"
    job = parse_job(_job(tmp_path, extra), allowed_roots=[tmp_path], generation=GEN, media=MEDIA)
    assert job.sidecar == parsed


@pytest.mark.parametrize(
    ("extra", "inputs", "reason"),
    [
        ("sidecar: json\n", "inputs: .\n", "'sidecar' must be true, false, txt or xmp"),
        ("sidecar: 1\n", "inputs: .\n", "'sidecar' must be true, false, txt or xmp"),
        ("sidecar: xmp\nmode: together\n", "inputs: a.png\n", "sidecar: xmp needs mode each"),
        ("sidecar: true\nmode: together\n", "inputs: a.png\n", "sidecar: true needs mode each"),
        ("sidecar: xmp\n", "", "sidecar: xmp needs inputs"),
    ],
)
def test_sidecar_key_errors_name_the_allowed_values(tmp_path: Path, extra: str, inputs: str, reason: str) -> None:
    with pytest.raises(JobRejected) as info:
        parse_job(_job(tmp_path, extra, inputs), allowed_roots=[tmp_path], generation=GEN, media=MEDIA)
    assert reason in info.value.reason, info.value.reason


# ---------------------------------------------------------------------------------------------------------------
# A real `vlbatch run`


@pytest.mark.slow
def test_vlbatch_run_writes_xmp_sidecars_that_exiftool_reads(tiny_onnx: Path, tmp_path: Path) -> None:
    tool = exiftool()
    env = SpoolEnv(tmp_path, tiny_onnx)
    env.write_config()
    env.image("trip/beach.jpg", 1)
    write_heic(env.media / "trip" / "IMG_0002.HEIC", synthetic_image(160, 120, 2))
    env.image("trip/harbour.png", 3)
    (env.media / "trip" / "harbour.png.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")  # someone's
    env.drop("trip.yaml", "prompt: Caption.\ninputs: ../../media/trip/\nsidecar: xmp\n")
    done = subprocess.run(env.cli("run"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = {
        Path(json.loads(row["media_paths"])[0]).name: row["answer"]
        for row in env.db().query("select media_paths, answer from results where job_id = 'trip'")
    }
    assert set(answers) == {"beach.jpg", "IMG_0002.HEIC", "harbour.png"} and all(answers.values())
    for name in ("beach.jpg", "IMG_0002.HEIC"):
        sidecar = env.media / "trip" / f"{name}.xmp"
        assert description(sidecar) == NOT_XML.sub("", answers[name])
        line = subprocess.run([tool, "-s3", "-XMP-dc:Description", str(sidecar)], capture_output=True, text=True)
        assert line.returncode == 0 and line.stdout.strip()
    assert (env.media / "trip" / "harbour.png.xmp").read_text() == "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
    assert "sidecar.kept" in done.stderr
    assert not list((env.media / "trip").glob("*.txt"))  # xmp only
    recorded = {Path(row["path"]).name for row in env.db()["sidecars"].rows}
    assert recorded == {"beach.jpg.xmp", "IMG_0002.HEIC.xmp"}
