"""`vlbatch estimate --calibrate`: a short measured pass of one model on this machine, and the cache that keeps it.

The model is loaded as the worker loads it (`Pipeline.open`); the pass runs its ViT on one synthetic tile,
prefills a synthetic prompt of a few lengths and decodes a few dozen tokens at a few context lengths (a decode
step costs the same whatever the cache's rows hold, so the cache is not filled first). Only the raw timings are
kept; `batch.service.reports.estimate` fits its rates from them. They are kept per model identity and machine (host, CPU
model, runtime, threads) as JSON in $XDG_CACHE_HOME/vlbatch/calibration (default ~/.cache/vlbatch/calibration),
written atomically; a damaged or foreign entry counts as none.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from batch.cache_home import cache_home
from batch.config import ModelConfig
from batch.errors import VlbatchError
from batch.infer.generate import decode_one_token, prefill
from batch.infer.media import normalize_tiles
from batch.infer.pipeline import Pipeline
from batch.infer.runtime.base import Backend
from batch.infer.runtime.select import model_identity, runtime_kind
from batch.model.ort_options import usable_cpus
from batch.service.atomic_write import write_atomic

FORMAT = "vlbatch-calibration"
VERSION = 1
PREFILL_CHUNKS = (1, 4, 8)  # prompt lengths measured, in the runtime's prefill chunks (capped by its capacity)
LONGEST_PROMPT_MS = 2000.0  # the longest prompt the model takes is measured too where those predict it costs less
DECODE_TOKENS = 32  # decode steps timed at each context length, at least ...
MAX_DECODE_TOKENS = 512  # ... and more, up to this many, until ENOUGH_MS of them is timed
DECODE_WARMUP = 2  # decode steps run first at each context length, untimed
ENOUGH_MS = 300.0  # a short stage is repeated until this much of it is timed (at most MAX_REPEATS runs)
MAX_REPEATS = 25


@dataclass(frozen=True)
class Machine:
    """What a calibration holds for: the host, its CPU, the runtime and its threads (None on axengine), and how
    the NPU's layers take their inputs (model.npu_io as configured; None on onnxruntime)."""

    host: str
    cpu: str
    backend: str
    threads: int | None
    npu_io: str | None = None

    def describe(self) -> str:
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        npu_io = f", npu_io {self.npu_io}" if self.npu_io else ""
        return f"{self.host} ({self.cpu}, {self.backend}{threads}{npu_io})"


@dataclass(frozen=True)
class PrefillSample:
    tokens: int
    ms: float


@dataclass(frozen=True)
class DecodeSample:
    context: float  # the mean position of the timed steps: the rows each step attends over
    tokens: int
    ms_per_token: float


@dataclass(frozen=True)
class Calibration:
    """One measured pass: the timings as measured, the model and machine they hold for, and when."""

    model_id: str
    machine: Machine
    measured_utc: str
    load_s: float
    seconds: float  # the whole pass, the load included
    chunk_tokens: int
    whole_chunks: bool  # the runtime prefills whole chunks (the NPU's compiled graphs)
    vit_ms_per_tile: float
    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]

    @property
    def date(self) -> str:
        """When it was measured, as people read it: 2026-12-04 21:03 UTC."""
        return datetime.fromisoformat(self.measured_utc).strftime("%Y-%m-%d %H:%M UTC")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """The calibration a cache entry holds; KeyError, TypeError or ValueError for one that is not."""
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError("not a calibration of this format")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        calibration = cls(
            **{
                **fields,
                "machine": Machine(**fields["machine"]),
                "prefill": tuple(PrefillSample(**s) for s in fields["prefill"]),
                "decode": tuple(DecodeSample(**s) for s in fields["decode"]),
            }
        )
        datetime.fromisoformat(calibration.measured_utc)
        if not calibration.prefill or not calibration.decode or calibration.vit_ms_per_tile <= 0:
            raise ValueError("no timings")
        return calibration


# ---------------------------------------------------------------------------------------------------------------
# This machine and the cache


def cpu_model() -> str:
    """The CPU's model name as the system tells it (/proc/cpuinfo), else the platform's word for it."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


def this_machine(model: ModelConfig) -> Machine:
    """The machine a calibration of `model` (as configured) is measured on and looked up for."""
    assert model.dir is not None
    backend = runtime_kind(model.dir, model.backend)
    threads = (model.threads or usable_cpus()) if backend == "onnxruntime" else None
    npu_io = model.npu_io if backend == "axengine" else None
    return Machine(socket.gethostname(), cpu_model(), backend, threads, npu_io)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/vlbatch/calibration (~/.cache/vlbatch/calibration)."""
    return cache_home("calibration")


def cache_file(model_id: str, machine: Machine) -> Path:
    """The entry of one model on one machine: a readable name and a digest of everything it is kept for."""
    key = json.dumps([model_id, asdict(machine)], sort_keys=True)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id.split("@")[0])[:60]
    return cache_dir() / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def load(model_id: str, machine: Machine) -> Calibration | None:
    """The cached calibration of this model on this machine; None when there is none (or none whole)."""
    path = cache_file(model_id, machine)
    try:
        calibration = Calibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if calibration.model_id != model_id or calibration.machine != machine:
        return None
    return calibration


def save(calibration: Calibration) -> Path:
    """Keep a calibration in the cache (written atomically); the OSError of a cache that cannot be written."""
    path = cache_file(calibration.model_id, calibration.machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(calibration.to_dict(), indent=2) + "\n", durable=False)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The measured pass


def measure(model: ModelConfig) -> Calibration:
    """Load the model as the worker does and time its stages on a synthetic tile and synthetic prompts."""
    if model.dir is None:
        raise VlbatchError("no model: pass --model DIR or set model.dir in config.yaml")
    machine = this_machine(model)
    started = time.perf_counter()
    pipeline = Pipeline.open(
        model.dir,
        model.backend,
        model.hf_dir,
        model.threads,
        providers=model.providers,
        device_id=model.device_id,
        npu_io=model.npu_io,
    )
    load_s = time.perf_counter() - started
    try:
        backend = pipeline.backend
        vit = _vit_ms_per_tile(backend, pipeline.spec.vision.image_size)
        rng = np.random.default_rng(0)
        prompts = _prefill_samples(pipeline, rng)
        steps = _decode_samples(pipeline, rng)
    finally:
        pipeline.close()
    return Calibration(
        model_id=model_identity(model.dir),
        machine=machine,
        measured_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        load_s=load_s,
        seconds=time.perf_counter() - started,
        chunk_tokens=backend.chunk_len,
        whole_chunks=machine.backend == "axengine",
        vit_ms_per_tile=vit,
        prefill=prompts,
        decode=steps,
    )


def _timed_ms(run: Callable[[], object], warmup: bool = True) -> float:
    """The mean milliseconds of `run`, repeated until ENOUGH_MS of it is timed (a first, untimed run first).

    The mean, not the median: the hiccups of a busy machine are part of the time a worker takes."""
    if warmup:
        run()
    times: list[float] = []
    while not times or (sum(times) < ENOUGH_MS and len(times) < MAX_REPEATS):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.mean(times))


def synthetic_tile(size: int) -> np.ndarray:
    """One (1, 3, size, size) float32 tile of smooth colour gradients, normalised as the pipeline normalises."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), 255 - ramp[None, :].repeat(size, 0)])
    return normalize_tiles(rgb.transpose(1, 2, 0).astype(np.uint8)[None])


def _vit_ms_per_tile(backend: Backend, size: int) -> float:
    tile = synthetic_tile(size)
    return _timed_ms(lambda: backend.vit(tile))


def _prefill_samples(pipeline: Pipeline, rng: np.random.Generator) -> tuple[PrefillSample, ...]:
    """The prompt's first token to its first answer token (the logits included), at a few prompt lengths."""
    backend = pipeline.backend
    lengths = sorted({min(backend.prefill_capacity, n * backend.chunk_len) for n in PREFILL_CHUNKS})
    vocab = min(len(pipeline.embeddings), len(pipeline.tokenizer))

    def run(length: int) -> Callable[[], object]:
        embeds = np.asarray(pipeline.embeddings[rng.integers(0, vocab, length)], dtype=np.float32)
        return lambda: backend.logits(prefill(backend, embeds, backend.new_cache()))

    _timed_ms(run(lengths[0]), warmup=False)  # the first prompt of a process pays the sessions' first runs
    samples = [PrefillSample(n, _timed_ms(run(n), warmup=False)) for n in lengths]
    longest = backend.prefill_capacity
    if longest > lengths[-1] and _predicted_ms(samples[-1], longest) < LONGEST_PROMPT_MS:
        samples.append(PrefillSample(longest, _timed_ms(run(longest), warmup=False)))
    return tuple(samples)


def _predicted_ms(measured: PrefillSample, tokens: int) -> float:
    """A longer prompt's prefill time, at most, from a shorter one's (prefill grows at most as its length squared)."""
    return measured.ms * (tokens / measured.tokens) ** 2


def decode_contexts(chunk: int, prefill_capacity: int, kv_capacity: int) -> list[int]:
    """Where the timed decode steps start: just after a one-chunk prompt, after the longest prompt, and between."""
    room = DECODE_WARMUP + MAX_DECODE_TOKENS + 1
    last = max(0, min(prefill_capacity, kv_capacity - room))
    first = min(chunk, last)
    return sorted({first, (first + last) // 2, last})


def _decode_samples(pipeline: Pipeline, rng: np.random.Generator) -> tuple[DecodeSample, ...]:
    """Decode steps (the next token's embedding, every layer, the logits, a greedy pick) at a few context lengths."""
    backend = pipeline.backend
    samples = []
    for start in decode_contexts(backend.chunk_len, backend.prefill_capacity, backend.kv_capacity):
        cache = backend.new_cache()
        cache.length = start  # the rows attended over cost the same whatever they hold
        token = int(rng.integers(0, len(pipeline.tokenizer)))
        times: list[float] = []
        for step in range(DECODE_WARMUP + MAX_DECODE_TOKENS):
            t = time.perf_counter()
            embed = np.asarray(pipeline.embeddings[token], dtype=np.float32)[None, None]
            token = int(np.argmax(decode_one_token(backend, embed, cache)))
            if step >= DECODE_WARMUP:
                times.append((time.perf_counter() - t) * 1e3)
                if len(times) >= DECODE_TOKENS and sum(times) >= ENOUGH_MS:
                    break
        context = start + DECODE_WARMUP + (len(times) - 1) / 2
        samples.append(DecodeSample(context, len(times), float(np.mean(times))))
    return tuple(samples)
