"""A results database made by the real worker for the viewer tests: photos (one EXIF-rotated), a clip, a bad file."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from markupsafe import escape
from PIL import Image
from spool_env import SpoolEnv
from synthetic import synthetic_image, write_video

from batch.service.web.cards import printable
from batch.service.worker.worker import Worker

ROTATED = "portrait-exif.jpg"  # stored 160x100 landscape, EXIF orientation 6: shown upright it is 100x160


def latest_rows(db_path: Path) -> list[dict]:
    """Every result of each job's latest run, straight from the database (read-only)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [
            dict(row)
            for row in conn.execute(
                "SELECT jr.id AS link_id, jr.job_id, jr.media_paths, r.answer, r.error FROM job_results jr "
                "JOIN results r ON r.id = jr.result_id JOIN jobs j ON j.id = jr.job_id WHERE jr.run_id = j.run_id"
            )
        ]
    finally:
        conn.close()


def shown(text: str) -> str:
    """A stored text as the pages write it: control characters replaced, HTML-escaped."""
    return str(escape(printable(text)))


def cards_of(page: str) -> list[str]:
    """The result cards of a served or static gallery page."""
    return re.findall(r'<article class="vb-card.*?</article>', page, re.S)


def search_word(rows: list[dict]) -> tuple[str, list[dict]]:
    """A plain word of some answers but not all (no FTS5 syntax in it), and the rows whose answer has it."""
    for row in rows:
        for word in re.findall(r"(?<![^\W_])[a-z]{4,}(?![^\W_])", (row["answer"] or "").lower()):
            having = [r for r in rows if r["answer"] and re.search(rf"(?<![^\W_]){word}(?![^\W_])", r["answer"], re.I)]
            if word not in ("caption", "compare", "them") and 0 < len(having) < len(rows) - 1:
                return word, having
    raise AssertionError(f"no answer has a word of its own: {rows}")


def make_results(root: Path, model: Path) -> SpoolEnv:
    """Two jobs drained in-process: `captions` (tags [captions, demo]) over 4 photos, a clip and a corrupt file;
    `pair` (tags {kind: comparison}) over two photos together."""
    env = SpoolEnv(root, model)
    env.write_config()
    env.image("beach.jpg", 1, (320, 240))
    env.image("street.png", 2, (240, 320))
    env.image("harbor.png", 3, (400, 200))
    rotated = synthetic_image(160, 100, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rotated.save(env.media / ROTATED, exif=exif)
    frames = (synthetic_image(96, 64, seed=i) for i in range(24))
    write_video(env.media / "clip.mp4", (__import__("numpy").asarray(f) for f in frames))
    (env.media / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    env.drop("captions.yaml", "prompt: Caption it.\ninputs: ../../media/\ntags: [captions, demo]\n")
    env.drop(
        "pair.yaml",
        "prompt: Compare them.\nmode: together\ninputs: [../../media/beach.jpg, ../../media/street.png]\n"
        "tags: {kind: comparison}\n",
    )
    worker = Worker.from_config(env.config())
    try:
        outcomes = {o.job_id: o.state for o in worker.drain()}
    finally:
        worker.close()
    assert outcomes == {"captions": "failed", "pair": "done"}, outcomes  # broken.jpg fails its own file only
    return env


LONG_NAME = "a" * 146 + ".jpg"  # 150 characters, no space to break at
LONG_BROKEN = "b" * 146 + ".jpg"  # the same length, and not a JPEG: its card shows the reason, naming it
LONG_JOB = "nightly-" + "x" * 100  # a job id of 108 characters without a space
LONG_TAG = "t" * 120
LONG_PROMPT = (
    "Describe this photograph for the archive: the place, the season, the weather, the people and what they are "
    "doing, any signs or text that can be read, and anything unusual. Mention https://example.org/"
    + "p" * 150
    + " if it applies, and keep to three sentences."
)
SHORT_PROMPT = "Name the colours."
UNBROKEN_ANSWER = "z" * 400


def make_crowded_results(root: Path, model: Path) -> SpoolEnv:
    """Cards that push at their edges, made by the worker: a 150-character file name and a broken file of the same
    length, answered by two jobs (a long prompt with a 150-character word, a long unbroken job id and tag; a short
    prompt with a long mapping tag), and then one answer made 400 characters without a space."""
    env = SpoolEnv(root, model)
    env.write_config()
    env.image(LONG_NAME, 5, (320, 240))
    env.image("beach.jpg", 1, (320, 240))
    (env.media / LONG_BROKEN).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    inputs = f"[../../media/{LONG_NAME}, ../../media/beach.jpg, ../../media/{LONG_BROKEN}]"
    env.drop(
        "long.yaml",
        f"id: {LONG_JOB}\nprompt: '{LONG_PROMPT}'\ninputs: {inputs}\ntags: [{LONG_TAG}, holiday, archive-2026]\n",
    )
    env.drop("colours.yaml", f"prompt: {SHORT_PROMPT}\ninputs: {inputs}\ntags: {{kind: {'k' * 90}}}\n")
    worker = Worker.from_config(env.config())
    try:
        outcomes = {o.job_id: o.state for o in worker.drain()}
    finally:
        worker.close()
    assert outcomes == {LONG_JOB: "failed", "colours": "failed"}, outcomes  # the broken file fails on its own
    conn = sqlite3.connect(env.db_path)
    with conn:
        conn.execute(
            "UPDATE results SET answer = ? WHERE id = (SELECT min(id) FROM results WHERE error IS NULL)",
            [UNBROKEN_ANSWER],
        )
    conn.close()
    return env
