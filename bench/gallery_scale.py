"""Scale check of `vlbatch gallery`: 10,000 results written as static pages, each opened in headless Chromium.

    python bench/gallery_scale.py [--results 10000] [--images 10000] [--per-page 100] [--work DIR] [--json FILE]

1. Writes `--images` synthetic 640x480 JPEGs (and `--videos` short mp4 clips, a few broken files) into a media
   folder, then a results database through the real `Store` API (several jobs and runs, reused answers, failed
   files, answers of 40-80 words, timings and tags, recorded over a few days on a simulated clock). Making the
   media is timed apart and kept out of the gallery figures; with `--work`, media made by an earlier run of the
   same settings is reused.
2. Times `write_gallery` cold (empty preview cache, new folder), warm (again into the same folder) and with a
   warm cache into a new folder, and reports the results, pages, previews and the folder's size.
3. Opens the first, a middle and the last page from file:// in headless Chromium (a fresh browser context each
   time, `--repeats` times): load event end and "every image complete and decoded", timed from navigation start,
   and the wall clock. Then the search box: the time until a query typed into #vb-search is applied over
   search-index.js (every result), checked against the counts computed here.

Exits 1 when a page takes 2 s or more, an image fails to load or decode, or a count is not what was written:
the table is printed either way, and `--json` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

import batch.service.store.store as store_module
from batch.config import Config, load_config
from batch.infer.settings import GenerationSettings, MediaSettings, answer_settings
from batch.service.spool.states import JobState
from batch.service.store.records import cache_key, to_json
from batch.service.store.store import Store, file_sha256
from batch.service.web import static_gallery

LIMIT_S = 2.0  # the requirement: every page opens in under 2 s
MEDIA_VERSION = 1  # bump when the generated media changes, so a reused --work folder is made again
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL_ID = "InternVL3-1B-int4@5f0c2a1"
BACKEND = "onnxruntime"
WORKER = "bench-host:4242"


# media ------------------------------------------------------------------------------------------
_NOISE: np.ndarray | None = None  # film grain, shared by the pictures a media process makes
_SIZE = (640, 480)


def _init_media_worker(size: tuple[int, int]) -> None:
    global _NOISE, _SIZE
    _SIZE = size
    shape = (max(size[1], 240) + 64, max(size[0], 480) + 64, 3)  # the clips are made of 480x240 pictures
    _NOISE = np.random.default_rng(12345).normal(0, 9, shape).astype(np.int16)


def _photo(seed: int, width: int, height: int) -> np.ndarray:
    """A photo-like picture: a smooth colour field (sky, ground), shapes, grain; every seed different."""
    rng = np.random.default_rng(seed)
    small_h, small_w = height // 8, width // 8
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    top, bottom = rng.uniform(30, 230, 3), rng.uniform(20, 200, 3)
    horizon = rng.uniform(0.3, 0.7) * small_h
    blend = np.clip((y - horizon) / 6 + 0.5, 0, 1)[..., None]
    phase, scale = rng.uniform(0, 6.28, 3), rng.uniform(5, 25, 3)
    waves = np.stack([25 * np.sin(x / scale[c] + y / (scale[c] * 1.7) + phase[c]) for c in range(3)], -1)
    field_ = top * (1 - blend) + bottom * blend + waves
    img = Image.fromarray(field_.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-40, width)), int(rng.integers(-40, height))
        w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle, draw.rounded_rectangle)[int(rng.integers(0, 3))]
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    pixels = np.asarray(img, dtype=np.int16)
    assert _NOISE is not None
    oy, ox = int(rng.integers(0, 64)), int(rng.integers(0, 64))
    pixels = pixels + _NOISE[oy : oy + height, ox : ox + width]
    return pixels.clip(0, 255).astype(np.uint8)


def _write_image(job: tuple[int, str]) -> int:
    seed, path = job
    Image.fromarray(_photo(seed, *_SIZE)).save(path, "JPEG", quality=88)
    return os.path.getsize(path)


def _write_video(job: tuple[int, str]) -> int:
    """A 2.4 s 320x240 mpeg4 clip: a picture panning sideways."""
    import av

    seed, path = job
    base = _photo(seed, 480, 240)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.pix_fmt = "yuv420p"
        stream.width, stream.height = 320, 240
        stream.bit_rate = 800_000
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, i * 6 : i * 6 + 320]), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return os.path.getsize(path)


@dataclass
class Media:
    images: list[Path]
    videos: list[Path]
    broken: list[Path]
    seconds: float
    reused: bool
    bytes: int
    size: tuple[int, int]


def make_media(folder: Path, images: int, size: tuple[int, int], videos: int, broken: int, workers: int) -> Media:
    """The media files, in one folder per day; reused when a manifest says they were made with these settings."""
    manifest = folder / "manifest.json"
    wanted = {"version": MEDIA_VERSION, "images": images, "videos": videos, "broken": broken, "size": list(size)}
    image_paths = [folder / f"day-{i % 7 + 1:02d}" / f"IMG_{i:05d}.jpg" for i in range(images)]
    video_paths = [folder / "clips" / f"VID_{i:04d}.mp4" for i in range(videos)]
    broken_paths = [folder / "damaged" / f"IMG_{90000 + i:05d}.jpg" for i in range(broken)]
    everything = image_paths + video_paths + broken_paths
    try:
        reuse = json.loads(manifest.read_text()) == wanted and all(p.is_file() for p in everything)
    except (OSError, ValueError):
        reuse = False
    started = time.perf_counter()
    if not reuse:
        shutil.rmtree(folder, ignore_errors=True)
        for path in everything:
            path.parent.mkdir(parents=True, exist_ok=True)
        with multiprocessing.get_context("spawn").Pool(workers, _init_media_worker, (size,)) as pool:
            list(pool.imap_unordered(_write_image, [(i, str(p)) for i, p in enumerate(image_paths)], chunksize=64))
            list(pool.imap_unordered(_write_video, [(10**6 + i, str(p)) for i, p in enumerate(video_paths)]))
        for i, path in enumerate(broken_paths):  # a JPEG header, then noise: no decoder can read it
            path.write_bytes(b"\xff\xd8\xff\xe0" + random.Random(i).randbytes(3000))
        manifest.write_text(json.dumps(wanted))
    total = sum(p.stat().st_size for p in everything)
    return Media(image_paths, video_paths, broken_paths, time.perf_counter() - started, reuse, total, size)


# answers ----------------------------------------------------------------------------------------
SUBJECTS = [
    "a golden retriever",
    "two children",
    "an elderly man in a grey coat",
    "a red bicycle",
    "a small fishing boat",
    "a woman with a yellow umbrella",
    "a stone lighthouse",
    "a flock of seagulls",
    "a vintage car",
    "a wooden bench",
    "a group of hikers",
    "a tabby cat",
    "a street musician playing a violin",
    "a market stall piled with oranges",
    "a steam locomotive",
    "a tall pine tree",
    "a bride and groom",
    "a delivery van",
    "a chess board",
    "a plate of pasta",
]
ACTIONS = [
    "stands",
    "rests",
    "waits patiently",
    "is partly hidden",
    "moves slowly",
    "is visible",
    "appears slightly blurred",
    "dominates the frame",
    "sits",
    "is framed by shadows",
]
PLACES = [
    "on a cobbled street",
    "beside a calm lake",
    "in front of a brick wall",
    "near the harbour entrance",
    "at the edge of a forest",
    "on a crowded platform",
    "under a cloudy sky",
    "inside a sunlit kitchen",
    "on a snowy mountain path",
    "along a sandy beach",
    "in a quiet courtyard",
    "next to a busy road",
]
DETAILS = [
    "In the background, {s} can be seen {p}.",
    "To the left there is {s}, slightly out of focus.",
    "The foreground shows {s} and some scattered leaves.",
    "A sign with faded lettering hangs above {s}.",
    "Reflections of {s} shimmer on the wet ground.",
    "Behind {s}, several buildings with {c} roofs rise {p}.",
]
LIGHT = ["soft and warm", "harsh midday", "cool and diffuse", "golden evening", "dim indoor", "bright overcast"]
COLOURS = ["blue", "green", "ochre", "grey", "crimson", "teal", "brown", "white", "amber", "violet"]
ENDINGS = [
    "The photo appears to be taken {t}.",
    "The overall mood is {m}.",
    "The composition is {m}, with the main subject off centre.",
    "There is no visible text apart from the sign.",
    "Nothing in the scene suggests the exact location.",
]
TIMES = ["in early spring", "on a winter morning", "during a summer festival", "late in the afternoon", "at dusk"]
MOODS = ["calm", "lively", "melancholic", "cheerful", "busy", "serene", "tense"]
FAILURES = [
    "{f}: decoding timed out after 60 s",
    "{f}: the worker process died 2 times while answering it; skipped",
    "the prompt with {f} is 9,412 tokens long, over the model's context of 8,192 (fewer media.max_tiles helps)",
    "{f}: cannot read (Permission denied)",
]
PROMPTS = [
    "Describe this photo in detail.",
    "Write a short caption for this picture: who or what is in it, where, and the light.",
    "What is happening in this image? Answer in two or three sentences.",
    "Describe the scene for an alt text.",
]
THEMES = ["holiday", "archive-scan", "street", "family", "wildlife", "event", "harbour", "studio"]


def answer_text(rng: random.Random) -> tuple[str, bool]:
    """40-80 words of caption; the second value says whether it was cut at max_new_tokens."""
    target = rng.randint(40, 80)
    sentences = [f"The image shows {rng.choice(SUBJECTS)} that {rng.choice(ACTIONS)} {rng.choice(PLACES)}."]
    while sum(len(s.split()) for s in sentences) < target:
        kind = rng.random()
        if kind < 0.5:
            detail = rng.choice(DETAILS)
            sentences.append(detail.format(s=rng.choice(SUBJECTS), p=rng.choice(PLACES), c=rng.choice(COLOURS)))
        elif kind < 0.7:
            a, b = rng.sample(COLOURS, 2)
            sentences.append(f"The lighting is {rng.choice(LIGHT)}, and the colours are mostly {a} and {b}.")
        else:
            sentences.append(rng.choice(ENDINGS).format(t=rng.choice(TIMES), m=rng.choice(MOODS)))
    words = " ".join(sentences).split()
    cut = len(words) > 80 or rng.random() < 0.04
    if cut:
        words = words[: min(len(words), rng.randint(70, 80))]
    return " ".join(words), cut


def job_tags(rng: random.Random, theme: str, index: int) -> Any:
    if index % 3 == 0:
        return [theme, str(2022 + index % 4)]
    tags: dict[str, Any] = {"project": theme, "year": 2022 + index % 4}
    if index % 2:
        tags["camera"] = rng.choice(["x100v", "a7iii", "pixel-8", "scanner"])
    if index % 5 == 0:
        tags["reviewed"] = rng.random() < 0.5
    return tags


# database ---------------------------------------------------------------------------------------
class Clock:
    """The store's `utc_now`, simulated: each call is a little later; `jump` moves to a given time."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> str:
        self.now += timedelta(milliseconds=3)
        return self.now.isoformat(timespec="milliseconds")

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@contextmanager
def simulated_clock(clock: Clock) -> Iterator[None]:
    real = store_module.utc_now
    store_module.utc_now = clock
    try:
        yield
    finally:
        store_module.utc_now = real


@dataclass
class Unit:
    paths: list[Path]
    broken: bool = False
    sha: list[str] = field(default_factory=list)


@dataclass
class Built:
    seconds: float
    results_rows: int
    shown: int
    jobs: int
    runs: int
    failed: int
    reused: int
    first_utc: str
    last_utc: str
    bytes: int


def plan_units(media: Media, results: int, rng: random.Random) -> list[Unit]:
    """`results` units: mostly one image each (cycling through them), some videos, the broken files, and one
    mode-together unit of four images."""
    special: list[Unit] = [Unit([p], broken=True) for p in media.broken] + [Unit([p]) for p in media.videos]
    if media.images and results > len(special) + 1:
        special.append(Unit(rng.sample(media.images, min(4, len(media.images)))))
    special = special[:results]
    plain = [Unit([media.images[i % len(media.images)]]) for i in range(results - len(special))] if media.images else []
    positions = sorted(rng.sample(range(len(plain) + len(special)), len(special)))
    ordered = plain[:]
    for position, unit in zip(positions, special, strict=True):
        ordered.insert(position, unit)
    return ordered


class Recorder:
    """Writes a job's runs as the worker does: start_job, add_result or link per unit, finish_job."""

    def __init__(self, store: Store, clock: Clock, rng: random.Random) -> None:
        self.store, self.clock, self.rng = store, clock, rng
        self.generation, self.media = GenerationSettings(), MediaSettings()
        self.settings = to_json(answer_settings(self.generation, self.media))
        self.runs = self.failed = self.reused = 0

    def run(self, job_id: str, fields: dict[str, Any], units: list[Unit], fail_rate: float, earlier: dict[int, int]):
        """One run over `units`; answers of an `earlier` run (unit index -> id) are reused. Returns this run's
        answer ids by unit index, negative for the failed files."""
        store, rng = self.store, self.rng
        run_id, _ = store.start_job(job_id, {**fields, "claim": f"{job_id}.{self.runs}.claim"}, WORKER)
        self.runs += 1
        base = {"prompt": fields["prompt"], "settings": self.settings, "tags": fields["tags"], "model_id": MODEL_ID}
        answers: dict[int, int] = {}
        for index, unit in enumerate(units):
            paths, hashes = to_json([str(p) for p in unit.paths]), to_json(unit.sha)
            previous = earlier.get(index, -1)
            if previous > 0:
                store.link(job_id, run_id, previous, paths, hashes, reused=True)
                self.reused += 1
                answers[index] = previous
                continue
            row = {**base, "media_paths": paths, "media_sha256": hashes}
            names = ", ".join(str(p) for p in unit.paths)
            if unit.broken or rng.random() < fail_rate:
                if unit.broken:
                    reason = f"{names}: not a readable image (corrupt file, or its extension does not match its format)"
                else:
                    reason = rng.choice(FAILURES).format(f=names)
                self.clock.advance(rng.uniform(0.05, 60))
                answers[index] = -store.add_result(job_id, run_id, {**row, "cache_key": None, "error": reason})
                continue
            row |= self.answer(unit, fields["prompt"])
            answers[index] = store.add_result(job_id, run_id, row)
        failures = sum(1 for v in answers.values() if v < 0)
        error = f"{failures} files could not be answered" if failures else None
        store.finish_job(job_id, JobState.FAILED if failures else JobState.DONE, error)
        return answers

    def answer(self, unit: Unit, prompt: str) -> dict[str, Any]:
        """A generated answer's columns, with timings and token counts of a plausible run (the clock moves on)."""
        rng = self.rng
        text, cut = answer_text(rng)
        tiles = 8 if len(unit.paths) > 1 or unit.paths[0].suffix == ".mp4" else 7
        out_tokens = 256 if cut else int(len(text.split()) * rng.uniform(1.2, 1.45))
        vit = tiles * rng.uniform(70, 110)
        prefill = rng.uniform(250, 600) + tiles * 40
        decode = out_tokens * rng.uniform(38, 55)
        self.clock.advance((vit + prefill + decode) / 1000 + rng.uniform(0.05, 0.4))
        return {
            "cache_key": cache_key(unit.sha, prompt, self.generation, self.media, MODEL_ID),
            "answer": text,
            "finish_reason": "length" if cut else "stop",
            "prompt_tokens": rng.randint(28, 60) + tiles * 256,
            "image_tokens": tiles * 256,
            "output_tokens": out_tokens,
            "tiles": tiles,
            "preprocess_ms": (preprocess := rng.uniform(8, 40)),
            "vit_ms": vit,
            "prefill_ms": prefill,
            "ttft_ms": preprocess + vit + prefill + rng.uniform(5, 20),  # as batch/infer/timings.py defines it
            "decode_ms": decode,
            "tokens_per_s": out_tokens / (decode / 1000),
            "backend": BACKEND,
        }


def build_database(config: Config, media: Media, results: int, days: float, seed: int) -> Built:
    """The results through `Store`, as workers record them, in one transaction on a simulated clock.

    Jobs of 150-900 files, recorded one after another over `days`; every fourth job had a first run that
    covered 60% of its files and failed some, then a second run that reused those answers and did the rest.
    """
    rng = random.Random(seed)
    started = time.perf_counter()
    units = plan_units(media, results, rng)
    for unit in units:
        unit.sha = [file_sha256(p) for p in unit.paths]
    chunks, i = [], 0
    while i < len(units):
        # one run records each file once: a job never holds more single-image units than there are images
        size = min(rng.randint(150, 900), max(1, len(media.images)))
        chunks.append(units[i : i + size])
        i += size
    start = datetime.now(timezone.utc) - timedelta(days=days)
    clock = Clock(start)
    gap = days * 86400 / max(1, len(chunks))
    store = Store(config.spool.database)
    recorder = Recorder(store, clock, rng)
    try:
        with simulated_clock(clock), store.atomic():
            for number, chunk in enumerate(chunks):
                clock.now = start + timedelta(seconds=number * gap + rng.uniform(0, gap / 4))
                theme = THEMES[number % len(THEMES)]
                job_id = f"{theme}-{number:03d}"
                fields = {
                    "source": f"{job_id}.yaml",
                    "job_sha256": f"{number:064x}",
                    "prompt": rng.choice(PROMPTS),
                    "mode": "together" if any(len(u.paths) > 1 for u in chunk) else "each",
                    "tags": to_json(job_tags(rng, theme, number)),
                    "media_count": sum(len(u.paths) for u in chunk),
                }
                earlier: dict[int, int] = {}
                if number % 4 == 1:
                    clock.advance(-3 * 3600)
                    earlier = recorder.run(job_id, fields, chunk[: int(len(chunk) * 0.6)], 0.08, {})
                    clock.now = start + timedelta(seconds=number * gap + gap / 3)
                answers = recorder.run(job_id, fields, chunk, 0.015, earlier)
                recorder.failed += sum(1 for v in answers.values() if v < 0)
        rows = store.db.execute("SELECT count(*) FROM results").fetchone()[0]
        shown = store.db.execute(
            "SELECT count(*) FROM job_results jr JOIN jobs j ON j.id = jr.job_id WHERE jr.run_id = j.run_id"
        ).fetchone()[0]
        first, last = store.db.execute("SELECT min(created_utc), max(created_utc) FROM job_results").fetchone()
    finally:
        store.close()
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in config.spool.database.parent.glob(config.spool.database.name + "*"))
    return Built(seconds, rows, shown, len(chunks), recorder.runs, recorder.failed, recorder.reused, first, last, size)


# the gallery ------------------------------------------------------------------------------------
@contextmanager
def phase_timer(phases: dict[str, float]) -> Iterator[None]:
    """Time write_gallery's steps by wrapping the module's helpers (nothing in the module is changed)."""
    originals = {name: getattr(static_gallery, name) for name in ("_rows", "_copy_previews", "_remove_stale")}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    for name, fn in originals.items():
        setattr(static_gallery, name, timed(name.strip("_"), fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(static_gallery, name, fn)


def folder_size(folder: Path) -> dict[str, int]:
    sizes = {"total": 0, "thumbs": 0, "pages": 0, "search_index": 0, "files": 0}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        sizes["total"] += size
        sizes["files"] += 1
        if path.parent.name == "thumbs":
            sizes["thumbs"] += size
        elif path.suffix == ".html":
            sizes["pages"] += size
        elif path.name == "search-index.js":
            sizes["search_index"] = size
    return sizes


def run_gallery(config: Config, out: Path, cache: Path, per_page: int) -> dict[str, Any]:
    phases: dict[str, float] = {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    with phase_timer(phases):
        written = static_gallery.write_gallery(config, out, {}, per_page, cache)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    phases["rest"] = written.seconds - sum(phases.values())  # cards, templates, search index, page writes
    return {
        "seconds": written.seconds,
        "results": written.results,
        "pages": written.pages,
        "previews": written.previews,
        "phases_s": phases,
        "cpu_s": own.ru_utime + own.ru_stime - self_before.ru_utime - self_before.ru_stime,
        "decoder_cpu_s": max(0.0, (children.ru_utime + children.ru_stime) - (before.ru_utime + before.ru_stime)),
        "size": folder_size(out),
    }


# the browser ------------------------------------------------------------------------------------
INIT_SCRIPT = """
window.__vbImgErrors = [];
window.__vbLastImg = 0;  // when the last image finished loading (or failing), from navigation start
// load events of elements never reach window: listen on the document, in the capture phase
document.addEventListener('load', (e) => {
  if (e.target && e.target.tagName === 'IMG') window.__vbLastImg = performance.now();
}, true);
document.addEventListener('error', (e) => {
  const t = e.target;
  if (t && t.tagName === 'IMG') {
    window.__vbLastImg = performance.now();
    window.__vbImgErrors.push(t.getAttribute('src'));
  }
}, true);
"""

# every image complete; should the pages ever load images lazily, the next pending one is scrolled into view
IMAGES_DONE = """() => {
  if (document.readyState !== 'complete') return false;
  const pending = Array.from(document.images).filter((i) => !i.complete);
  if (pending.length && pending[0].loading === 'lazy') pending[0].scrollIntoView();
  return pending.length === 0;
}"""

PAGE_FIGURES = """async () => {
  const nav = performance.getEntriesByType('navigation')[0];
  const paint = performance.getEntriesByType('paint').find((p) => p.name === 'first-contentful-paint');
  const imgs = Array.from(document.images);
  const decoded = await Promise.allSettled(imgs.map((i) => i.decode()));
  return {
    response_end_ms: nav.responseEnd,
    dom_content_loaded_ms: nav.domContentLoadedEventEnd,
    load_event_end_ms: nav.loadEventEnd,
    first_contentful_paint_ms: paint ? paint.startTime : null,
    html_bytes: nav.decodedBodySize,
    images: imgs.length,
    images_ok: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
    decode_failures: decoded.filter((d) => d.status === 'rejected').length,
    load_errors: window.__vbImgErrors.length,
    no_preview: document.querySelectorAll('.vb-nopreview').length,
    cards: document.querySelectorAll('.vb-card').length,
    index_entries: window.VB_INDEX ? window.VB_INDEX.length : null,
  };
}"""

SEARCH_IN_PAGE = """async (q) => {
  const box = document.getElementById('vb-search');
  const frame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  box.value = '';
  box.dispatchEvent(new Event('input'));
  await frame();
  const t0 = performance.now();
  box.value = q;
  box.dispatchEvent(new Event('input'));
  const applied = performance.now();
  await frame();
  return {apply_ms: applied - t0, next_frame_ms: performance.now() - t0};
}"""


def html_img_count(page: Path) -> int:
    return len(re.findall(r"<img\s", page.read_text(encoding="utf-8")))


def undecodable(page: Path) -> list[str]:
    """The page's previews that Pillow cannot decode to the last byte: Chromium shows a truncated JPEG in part
    and calls it complete and decoded, so the files are also checked here."""
    bad = []
    for src in re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8")):
        try:
            with Image.open(page.parent / src) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            bad.append(f"{src} ({exc})")
    return bad


def expected_search(index: list[list[Any]], query: str, page: int) -> tuple[int, dict[int, int]]:
    words = query.lower().split()
    here, elsewhere = 0, {}
    for number, text in index:
        if all(w in text for w in words):
            if number == page:
                here += 1
            else:
                elsewhere[number] = elsewhere.get(number, 0) + 1
    return here, elsewhere


def browse(out: Path, pages: int, per_page: int, total: int, repeats: int, queries: list[str]) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    numbers = sorted({1, (pages + 1) // 2, pages})
    raw = (out / "search-index.js").read_text(encoding="utf-8")
    index = json.loads(raw.removeprefix("window.VB_INDEX = ").rstrip().removesuffix(";"))
    figures: dict[str, Any] = {"pages": [], "search": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            warm = browser.new_context()
            warm.new_page().goto("about:blank")
            warm.close()
            for number in numbers:
                path = out / static_gallery.page_name(number)
                url = path.resolve().as_uri()
                expected_imgs = html_img_count(path)
                expected_cards = min(per_page, total - (number - 1) * per_page)
                samples = []
                for _ in range(repeats):
                    context = browser.new_context(viewport={"width": 1366, "height": 900})
                    try:
                        context.add_init_script(INIT_SCRIPT)
                        page = context.new_page()
                        t = time.perf_counter()
                        page.goto(url, wait_until="load", timeout=60_000)
                        page.wait_for_function(IMAGES_DONE, polling="raf", timeout=60_000)
                        wall = (time.perf_counter() - t) * 1e3
                        done = page.evaluate("window.__vbLastImg")
                        page.wait_for_function(
                            "performance.getEntriesByType('navigation')[0].loadEventEnd > 0", timeout=10_000
                        )
                        sample = page.evaluate(PAGE_FIGURES)
                        sample |= {"images_complete_ms": done, "wall_ms": wall}
                        samples.append(sample)
                        if number == 1 and not figures["search"]:
                            figures["search"] = search(page, queries, index, number)
                    finally:
                        context.close()
                worst = max(max(s["load_event_end_ms"], s["images_complete_ms"], s["wall_ms"]) for s in samples)
                figures["pages"].append(
                    {
                        "page": number,
                        "file": path.name,
                        "expected_images": expected_imgs,
                        "expected_cards": expected_cards,
                        "undecodable_files": undecodable(path),
                        "worst_ms": worst,
                        "median": {
                            key: statistics.median(s[key] for s in samples)
                            for key in (
                                "load_event_end_ms",
                                "images_complete_ms",
                                "wall_ms",
                                "dom_content_loaded_ms",
                                "first_contentful_paint_ms",
                            )
                            if all(s[key] is not None for s in samples)
                        },
                        "samples": samples,
                    }
                )
        finally:
            browser.close()
    return figures


def search(page: Any, queries: list[str], index: list[list[Any]], number: int) -> list[dict[str, Any]]:
    """Each query: filled in at once (one input event) and typed key by key, until the status shows it."""
    # the index is loaded when the box is first used: time that once, then every query with it in place
    t = time.perf_counter()
    page.locator("#vb-search").focus()
    page.wait_for_function("() => window.VB_INDEX !== undefined", polling="raf", timeout=30_000)
    results: list[dict[str, Any]] = [
        {"index_load_ms": (time.perf_counter() - t) * 1e3, "index_entries": page.evaluate("window.VB_INDEX.length")}
    ]
    status_for = "(q) => document.getElementById('vb-search').value === q && "
    status_for += "document.getElementById('vb-search-status').textContent !== ''"
    for query in queries:
        here, elsewhere = expected_search(index, query, number)
        box = page.locator("#vb-search")
        box.fill("")
        t = time.perf_counter()
        box.fill(query)
        page.wait_for_function(status_for, arg=query, polling="raf", timeout=30_000)
        fill_ms = (time.perf_counter() - t) * 1e3
        status = page.locator("#vb-search-status").text_content() or ""
        links = page.locator("#vb-elsewhere a").count()
        visible = page.locator(".vb-card:not([hidden])").count()
        box.fill("")
        t = time.perf_counter()
        box.press_sequentially(query)
        page.wait_for_function(status_for, arg=query, polling="raf", timeout=30_000)
        typed_ms = (time.perf_counter() - t) * 1e3
        in_page = page.evaluate(SEARCH_IN_PAGE, query)
        results.append(
            {
                "query": query,
                "fill_ms": fill_ms,
                "typed_ms": typed_ms,
                "typed_keys": len(query),
                **in_page,
                "status": status,
                "matches_here": visible,
                "expected_here": here,
                "pages_elsewhere": links,
                "expected_pages_elsewhere": len(elsewhere),
                "matches_elsewhere_expected": sum(elsewhere.values()),
            }
        )
    page.locator("#vb-search").fill("")
    return results


# the report -------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check(report: dict[str, Any], results: int) -> list[str]:
    problems = []
    for name, run in report["gallery"].items():
        if run["results"] != results:
            problems.append(f"gallery {name}: {run['results']} results on the pages, {results} written")
    for entry in report["browser"]["pages"]:
        name = entry["file"]
        if entry["undecodable_files"]:
            problems.append(f"{name}: previews that do not decode: {', '.join(entry['undecodable_files'])}")
        if entry["worst_ms"] >= LIMIT_S * 1e3:
            problems.append(f"{name}: took {entry['worst_ms']:.0f} ms to open (limit {LIMIT_S * 1e3:.0f} ms)")
        for s in entry["samples"]:
            if s["decode_failures"] or s["load_errors"] or s["images_ok"] != s["images"]:
                problems.append(
                    f"{name}: {s['load_errors']} images failed to load, {s['decode_failures']} to decode, "
                    f"{s['images_ok']} of {s['images']} complete"
                )
            if s["images"] + s["load_errors"] != entry["expected_images"]:
                problems.append(f"{name}: {s['images']} images in the page, the HTML has {entry['expected_images']}")
            if s["cards"] != entry["expected_cards"]:
                problems.append(f"{name}: {s['cards']} cards, expected {entry['expected_cards']}")
            if s["index_entries"] is not None:
                problems.append(f"{name}: the search index was loaded with the page (it should wait for the box)")
    index, *queries = report["browser"]["search"]
    if index["index_entries"] != results:
        problems.append(f"search index holds {index['index_entries']} entries, expected {results}")
    for q in queries:
        if q["matches_here"] != q["expected_here"] or q["pages_elsewhere"] != q["expected_pages_elsewhere"]:
            problems.append(
                f"search {q['query']!r}: {q['matches_here']} shown here and {q['pages_elsewhere']} other pages named; "
                f"expected {q['expected_here']} and {q['expected_pages_elsewhere']}"
            )
    return list(dict.fromkeys(problems))


def print_report(report: dict[str, Any]) -> None:
    m, b = report["media"], report["database"]
    print(f"\n== vlbatch gallery at scale ({report['machine']}) ==")
    made = "reused from an earlier run" if m["reused"] else f"made in {m['seconds']:.1f} s"
    print(
        f"media: {m['images']:,} JPEGs {m['width']}x{m['height']}, {m['videos']} mp4 clips, {m['broken']} broken "
        f"files, {mib(m['bytes'])}; {made} (not in the figures below)"
    )
    print(
        f"database: {b['results_rows']:,} result rows ({b['shown']:,} shown: latest runs), {b['jobs']} jobs, "
        f"{b['runs']} runs, {b['reused']:,} reused, {b['failed']} failed; {b['first_utc'][:16]} .. "
        f"{b['last_utc'][:16]}; {mib(b['bytes'])}; built in {b['seconds']:.1f} s"
    )
    print("\nwrite_gallery               results pages previews | seconds: total = rows + previews + rest | decoder")
    for name, run in report["gallery"].items():
        ph = run["phases_s"]
        print(
            f"  {name:<24} {run['results']:7,} {run['pages']:5} {run['previews']:8,} | {run['seconds']:14.1f} "
            f"{ph.get('rows', 0):6.1f} {ph.get('copy_previews', 0):10.1f} {ph.get('rest', 0):6.1f} | "
            f"{run['decoder_cpu_s']:5.1f} s CPU"
        )
    size = next(iter(report["gallery"].values()))["size"]
    print(
        f"  folder: {mib(size['total'])} in {size['files']:,} files; thumbs {mib(size['thumbs'])}, "
        f"pages {mib(size['pages'])}, search-index.js {mib(size['search_index'])}"
    )
    load = report["browser"]["load_average"]
    print(
        f"\nopening pages (file://, headless Chromium, median of {report['repeats']} opens; worst: the slowest figure "
        f"of any open); 1-min load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after"
    )
    print("  page            DCL ms   load ms  imgs done ms  wall ms  FCP ms  worst ms  images  html KiB")
    for e in report["browser"]["pages"]:
        med, s0 = e["median"], e["samples"][0]
        fcp = med.get("first_contentful_paint_ms")
        print(
            f"  {e['file']:<15} {med['dom_content_loaded_ms']:6.0f}  {med['load_event_end_ms']:8.0f}  "
            f"{med['images_complete_ms']:12.0f}  {med['wall_ms']:7.0f}  {fcp if fcp is None else round(fcp):>6}  "
            f"{e['worst_ms']:8.0f}  {s0['images_ok']:3}/{e['expected_images']:<3}  {s0['html_bytes'] / 1024:8.0f}"
        )
    index, *queries = report["browser"]["search"]
    print(
        f"\nsearch box on index.html over search-index.js ({index['index_entries']:,} entries, loaded on first focus "
        f"in {index['index_load_ms']:.0f} ms)"
    )
    print("  query                       fill ms  typed ms (keys)  handler ms  +frame ms  here  other pages  status")
    for q in queries:
        print(
            f"  {q['query']!r:<27} {q['fill_ms']:7.0f}  {q['typed_ms']:8.0f} ({q['typed_keys']:2})  "
            f"{q['apply_ms']:10.1f}  {q['next_frame_ms']:9.1f}  {q['matches_here']:4}  {q['pages_elsewhere']:11}  "
            f"{q['status']}"
        )
    problems = report["problems"]
    ok = f"ok: every page opened in under {LIMIT_S:g} s, every image decoded, every count as written"
    print("\nverdict: " + ("FAIL" if problems else ok))
    for problem in problems:
        print(f"  - {problem}")


def write_config(root: Path, media: Path) -> Path:
    path = root / "config.yaml"
    path.write_text(f"spool:\n  dir: jobs\n  database: vlbatch.db\n  media_roots: [{media}]\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=10_000, help="results the pages show")
    parser.add_argument("--images", type=int, default=10_000, help="synthetic JPEGs the results point at")
    parser.add_argument("--size", default="640x480", help="the JPEGs' size, WIDTHxHEIGHT")
    parser.add_argument("--videos", type=int, help="mp4 clips among the results (default: 1%% of --results)")
    parser.add_argument("--broken", type=int, help="unreadable files among the results (default: 0.1%%)")
    parser.add_argument("--per-page", type=int, default=100)
    parser.add_argument("--days", type=float, default=4.0, help="the results are recorded over this many days")
    parser.add_argument("--repeats", type=int, default=3, help="opens of each page, each in a fresh context")
    parser.add_argument("--query", action="append", help="a search to time (repeatable; default: three)")
    parser.add_argument("--work", type=Path, help="keep everything here (media is reused); default: a temp folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes making the media")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    videos = args.results // 100 if args.videos is None else args.videos
    broken = max(1, args.results // 1000) if args.broken is None else args.broken
    queries = args.query or ["lighthouse", "red bicycle", "harbour crimson seagulls"]

    temp = None if args.work else tempfile.TemporaryDirectory(prefix="gallery-scale-")
    work = (args.work or Path(temp.name)).resolve()  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"work folder: {work}", file=sys.stderr)
        size = tuple(int(v) for v in args.size.lower().split("x"))
        media = make_media(work / "media", args.images, (size[0], size[1]), videos, broken, args.workers)
        print(f"media: {media.seconds:.1f} s{' (reused)' if media.reused else ''}", file=sys.stderr)
        for stale in ("vlbatch.db", "vlbatch.db-wal", "vlbatch.db-shm", "vlbatch.db.lock"):
            (work / stale).unlink(missing_ok=True)
        config = load_config(write_config(work, work / "media"), environ={})
        built = build_database(config, media, args.results, args.days, args.seed)
        print(f"database: {built.seconds:.1f} s", file=sys.stderr)

        cache, out, fresh = work / "thumbnail-cache", work / "gallery", work / "gallery-2"
        for folder in (cache, out, fresh):
            shutil.rmtree(folder, ignore_errors=True)
        gallery = {"cold (empty cache)": run_gallery(config, out, cache, args.per_page)}
        print(f"gallery cold: {gallery['cold (empty cache)']['seconds']:.1f} s", file=sys.stderr)
        gallery["warm (same folder)"] = run_gallery(config, out, cache, args.per_page)
        gallery["warm cache, new folder"] = run_gallery(config, fresh, cache, args.per_page)
        shutil.rmtree(fresh)
        written = gallery["cold (empty cache)"]

        load_before = os.getloadavg()
        browser = browse(out, written["pages"], args.per_page, written["results"], args.repeats, queries)
        browser["load_average"] = {"before": load_before, "after": os.getloadavg()}
        report: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "work": str(work),
            "media": {
                "images": len(media.images),
                "videos": len(media.videos),
                "broken": len(media.broken),
                "bytes": media.bytes,
                "seconds": media.seconds,
                "reused": media.reused,
                "width": media.size[0],
                "height": media.size[1],
            },
            "database": vars(built),
            "gallery": gallery,
            "repeats": args.repeats,
            "browser": browser,
            "limit_s": LIMIT_S,
        }
        report["problems"] = check(report, args.results)
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 1 if report["problems"] else 0
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
