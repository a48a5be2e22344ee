"""`vlbatch estimate`: what jobs will cost before they run, counted as the worker will meet them.

This module owns that count, the rates it is priced with and its report. Each job file is read as the worker will
read it (`check_job`); each unit's files are hashed into the worker's cache key to find answers already stored
(reused: no model time); image sizes are read from their headers in the decoding child; tiles are chosen by the
pipeline's own functions (`choose_tile_cap`, `tile_count`) and prompt tokens counted by its `PromptBudget`. The
units left are priced with `ContextRates`: ViT per tile, prefill by chunk, and decode per token as a function of
the position it is decoded at. They come from the first that applies: a benchmark report (--rates), this model's
stored answers, its calibration on this machine (`--calibrate`, kept by `batch.service.reports.calibrate`), the built-in
figures, which hold only for models of InternVL3-2B's shape. With none, the report says so and gives no times.
The database is opened read-only; only --calibrate loads and runs the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from batch.config import Config, ModelConfig
from batch.errors import BackendError, MediaError, VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.infer.media import choose_tile_cap, media_kind, tile_count
from batch.infer.pipeline import load_tokenizer
from batch.infer.prompt import PromptMedia
from batch.infer.prompt_budget import PromptBudget
from batch.infer.runtime.select import (
    decode_rows,
    metadata_dir,
    model_identity,
    prefill_capacity,
    runtime_kind,
    weights_formats,
)
from batch.infer.safe_open import open_regular
from batch.model.checkpoint import read_config
from batch.model.modelspec import ModelSpec
from batch.service.reports import calibrate
from batch.service.reports.calibrate import Calibration
from batch.service.reports.planning import (
    AX650N_PREFILL_CAPACITY,
    Rates,
    UnitTime,
    bench_key,
    fit_prefill,
    rates_from_bench,
    rates_from_results,
    reference_rates,
    single_stream_ms,
)
from batch.service.spool.jobfile import Job, JobRejected
from batch.service.spool.submit import check_job
from batch.service.store.records import cache_key
from batch.service.store.store import StoredAnswers, file_sha256

STORED_ROWS = 500  # the newest answers whose timings make this model's rates
MIN_ANSWERS = 3  # fewer stored answers than this are not figures to plan on
SHOWN_PROBLEMS = 5  # unreadable or too-long units listed per job in the text report
MIN_CONTEXT_SPAN = 256  # decode timings over positions closer than this cannot tell growth from noise

# InternVL3-2B (InternViT-300M + Qwen2.5-1.5B), the shape `vlbatch make-model --preset real-shape` writes: the one
# model the built-in figures (planning.CPU_REFERENCE_RATES, the published AX650N timings) were measured for
REFERENCE_MODEL = "InternVL3-2B"
REFERENCE_SHAPE: dict[str, int] = {
    "hidden size": 1536,
    "layers": 28,
    "ViT width": 1024,
    "ViT layers": 24,
    "MLP width": 8960,
    "attention heads": 12,
    "KV heads": 2,
    "vocabulary": 151674,
    "ViT MLP width": 4096,
    "ViT heads": 16,
    "tile size": 448,
    "patch size": 14,
    "image tokens per tile": 256,
}

Status = Literal["answer", "reused", "unreadable", "too_long"]


@dataclass(frozen=True)
class ModelFacts:
    """What an estimate needs of a model folder, read without loading the model."""

    dir: Path
    identity: str  # model_identity(): what stored answers record as model_id
    backend: str  # onnxruntime | axengine
    weights: str | None  # an export's weight format; None for an axmodel folder
    vit_weights: str | None  # an export's ViT weight format (fp32, int8); None for an axmodel folder
    prefill_weights: str | None  # an export's prompt layers (same, int8); None for an axmodel folder
    prompts: PromptBudget
    capacity_note: str | None = None  # how the prefill capacity was found, when not from the folder itself
    shape: dict[str, int] = field(default_factory=dict)  # architecture(): what the model's cost grows with
    batch: int = 1  # answers a worker decodes together: model.batch, as far as the runtime decodes several

    @property
    def reference_shape(self) -> bool:
        """Whether the built-in figures hold for this model: InternVL3-2B's shape."""
        return self.shape == REFERENCE_SHAPE

    @property
    def capacity(self) -> int:
        return self.prompts.capacity


def read_model(model: ModelConfig) -> ModelFacts:
    """The model folder's runtime, identity, weights, tokenizer and prefill capacity (never its weights)."""
    if model.dir is None:
        raise VlbatchError("no model: pass --model DIR or set model.dir in config.yaml")
    kind = runtime_kind(model.dir, model.backend)
    meta = metadata_dir(model.dir, model.hf_dir)
    _, _, spec = read_config(meta)
    capacity, note = _capacity(model, kind)
    prompts = PromptBudget(load_tokenizer(meta), spec.image_tokens_per_tile, capacity)
    return ModelFacts(
        Path(model.dir),
        model_identity(model.dir),
        kind,
        *weights_formats(model.dir),
        prompts,
        note,
        architecture(spec),
        min(model.batch, decode_rows(model.dir)),
    )


def architecture(spec: ModelSpec) -> dict[str, int]:
    """The dimensions a model's speed follows, named as REFERENCE_SHAPE names them."""
    vision, text = spec.vision, spec.text
    return {
        "hidden size": text.hidden_size,
        "layers": text.num_layers,
        "ViT width": vision.hidden_size,
        "ViT layers": vision.num_layers,
        "MLP width": text.intermediate_size,
        "attention heads": text.num_heads,
        "KV heads": text.num_kv_heads,
        "vocabulary": text.vocab_size,
        "ViT MLP width": vision.intermediate_size,
        "ViT heads": vision.num_heads,
        "tile size": vision.image_size,
        "patch size": vision.patch_size,
        "image tokens per tile": spec.image_tokens_per_tile,
    }


def shape_differences(shape: dict[str, int], shown: int = 2) -> str:
    """Where a model's shape departs from InternVL3-2B's, as people read it: 'hidden size 64, not 1,536; ...'."""
    differ = [f"{name} {shape.get(name, 0):,}, not {value:,}" for name, value in REFERENCE_SHAPE.items()
              if shape.get(name) != value]  # fmt: skip
    return "; ".join(differ[:shown]) + ("; ..." if len(differ) > shown else "")


def _capacity(model: ModelConfig, kind: str) -> tuple[int, str | None]:
    """The folder's prefill capacity; for a published axmodel folder where axengine cannot open it, its known one."""
    assert model.dir is not None
    try:
        return prefill_capacity(model.dir, kind, model.providers, model.device_id), None
    except BackendError:
        if kind != "axengine":
            raise
        name = Path(model.dir).resolve().name
        for suffix in sorted(AX650N_PREFILL_CAPACITY, key=len, reverse=True):
            if name.endswith(suffix):
                capacity = AX650N_PREFILL_CAPACITY[suffix]
                return capacity, f"that of the published *{suffix} folders (axengine cannot open the folder here)"
        raise


@dataclass(frozen=True)
class UnitCount:
    """One unit of a job as the worker will meet it."""

    files: tuple[Path, ...]
    kind: Literal["image", "video"] | None  # None: a text-only question
    status: Status
    tiles: int = 0
    prompt_tokens: int = 0
    reason: str | None = None  # why an unreadable or too-long unit will fail


@dataclass
class JobEstimate:
    """A job's units counted, and the model time of those the worker will answer."""

    file: Path
    job: Job
    units: list[UnitCount]
    output_tokens: int  # per answer
    output_answers: int  # stored answers the output figure is the mean of; 0: max_new_tokens, an upper bound
    time: UnitTime | None  # None: no figures to price it with
    rows: int = 1  # answers decoded together (model.batch, at most the answers to make)

    def count(self, status: Status) -> int:
        return sum(1 for unit in self.units if unit.status == status)

    def figures(self) -> dict[str, Any]:
        answered = [unit for unit in self.units if unit.status == "answer"]
        kinds = [media_kind(path) for unit in self.units for path in unit.files]
        return {
            "units": len(self.units),
            "images": kinds.count("image"),
            "videos": kinds.count("video"),
            "text_only": sum(1 for unit in self.units if not unit.files),
            "reused": self.count("reused"),
            "unreadable": self.count("unreadable"),
            "too_long": self.count("too_long"),
            "to_answer": len(answered),
            "tiles": sum(unit.tiles for unit in answered),
            "prompt_tokens": sum(unit.prompt_tokens for unit in answered),
        }


@dataclass
class Estimate:
    model: ModelFacts
    rates: ContextRates | None  # None: no figures apply to this model (`missing` says why)
    jobs: list[JobEstimate] = field(default_factory=list)
    rejected: list[JobRejected] = field(default_factory=list)
    missing: str | None = None
    calibration: Calibration | None = None  # the one the rates come from
    calibration_note: str | None = None  # where --calibrate kept its figures, or why it could not


# ---------------------------------------------------------------------------------------------------------------
# Counting


def estimate(
    config: Config,
    job_files: Sequence[Path],
    force: bool = False,
    rates_file: Path | None = None,
    weights: str | None = None,
    decoder: MediaDecoder | None = None,
    calibrate_now: bool = False,
) -> Estimate:
    """Count every job file's units and price those left to answer; a rejected job file is kept with its reason.

    `force` counts answers already stored as to be answered again (`run --force`); `rates_file` is a
    `bench/run_bench.py --json` report, read for `weights` (default: the model's own, else fp32);
    `calibrate_now` measures the model on this machine first (`calibrate.measure`), keeps the figures in the
    calibration cache and prices with them.
    """
    model = read_model(config.model)
    fresh = calibrate.measure(config.model) if calibrate_now else None
    note = _keep(fresh) if fresh is not None else None
    calibration = fresh or calibrate.load(model.identity, calibrate.this_machine(config.model))
    with closing(StoredAnswers(config.spool.database)) as stored:
        if fresh is not None:
            rates, missing = rates_from_calibration(fresh), None
        else:
            rates, missing = choose_rates(model, stored, config.spool.database, rates_file, weights, calibration)
        used = calibration if rates is not None and rates.origin == "calibration" else None
        result = Estimate(model, rates, missing=missing, calibration=used, calibration_note=note)
        counter = _Counter(model, stored, decoder or IsolatedDecoder(), force)
        try:
            for path in job_files:
                try:
                    job = check_job(Path(path), config)
                except JobRejected as exc:
                    result.rejected.append(exc)
                    continue
                result.jobs.append(counter.job(Path(path), job, rates))
        finally:
            counter.decoder.close()
    return result


def _keep(calibration: Calibration) -> str:
    """Keep a fresh calibration in the cache; where it went, or why it could not (the estimate goes on)."""
    try:
        return f"calibration kept in {calibrate.save(calibration)}"
    except OSError as exc:
        return f"calibration not kept: {exc.filename or calibrate.cache_dir()}: {exc.strerror or exc}"


class _Counter:
    """Counts units across the jobs of one estimate: an answer stored, or given earlier in the same jobs, is reused."""

    def __init__(self, model: ModelFacts, stored: StoredAnswers, decoder: MediaDecoder, force: bool) -> None:
        self.model = model
        self.stored = stored
        self.decoder = decoder
        self.force = force
        # files are hashed only when an answer could be reused: with no answer of this model stored, none can be
        self.hashing = not force and stored.has_model(model.identity)
        self.answered_keys: set[str] = set()  # answers the worker will have stored by the time it meets a unit

    def job(self, path: Path, job: Job, rates: Rates | None) -> JobEstimate:
        units = [self.unit(job, files) for files in job.units()]
        answers, mean = self.stored.output_tokens(self.model.identity, job.prompt)
        limit = job.generation.max_new_tokens
        output = min(limit, max(1, round(mean))) if answers >= MIN_ANSWERS else limit
        answered = [u for u in units if u.status == "answer"]
        total = None if rates is None else UnitTime.sum(rates.unit(u.tiles, u.prompt_tokens, output) for u in answered)
        rows = max(1, min(self.model.batch, len(answered)))
        if total is not None and rows > 1:  # answers decoded together: the steps of one serve them all
            total = replace(total, decode_ms=total.decode_ms / rates.decode_speedup(rows))
        return JobEstimate(path, job, units, output, answers if answers >= MIN_ANSWERS else 0, total, rows)

    def unit(self, job: Job, files: tuple[Path, ...]) -> UnitCount:
        kind: Literal["image", "video"] | None = None
        if files:
            kind = "video" if media_kind(files[0]) == "video" else "image"
        key = None
        try:
            if self.hashing:
                hashes = [file_sha256(p) for p in files]
                key = cache_key(hashes, job.prompt, job.generation, job.media_settings, self.model.identity)
                if key in self.answered_keys or self.stored.previous_answer(key) is not None:
                    return UnitCount(files, kind, "reused")
        except MediaError as exc:  # as the worker records it
            return UnitCount(files, kind, "unreadable", reason=f"{exc.path}: cannot read ({exc.reason})")
        try:
            per_item = self._tiles(job, files, kind)
        except MediaError as exc:
            return UnitCount(files, kind, "unreadable", reason=str(exc))
        prompts = self.model.prompts
        tokens = prompts.prompt_tokens(job.prompt, kind, per_item)
        if tokens > prompts.capacity:
            media = PromptMedia(kind, per_item) if kind is not None else None
            return UnitCount(
                files, kind, "too_long", sum(per_item), tokens, prompts.too_long(job.prompt, tokens, media)
            )
        if key is not None:
            self.answered_keys.add(key)
        return UnitCount(files, kind, "answer", sum(per_item), tokens)

    def _tiles(self, job: Job, files: tuple[Path, ...], kind: str | None) -> tuple[int, ...]:
        """Tiles per image (or per frame) as the pipeline will make them; MediaError for a file it cannot read."""
        settings = job.media_settings
        if kind is None:
            return ()
        if kind == "video":  # every sampled frame is one tile; the clip itself is only checked to be readable
            if not self.hashing:
                _check_readable(files[0])
            return (1,) * settings.video_frames
        sizes = self.decoder.probe(files, settings)
        budget = self.model.prompts.tile_budget(job.prompt, "image", len(files))
        cap = choose_tile_cap(sizes, settings, budget)
        return tuple(tile_count(w, h, cap, settings.image_size, settings.use_thumbnail) for w, h in sizes)


def _check_readable(path: Path) -> None:
    os.close(open_regular(path))


# ---------------------------------------------------------------------------------------------------------------
# Rates


@dataclass(frozen=True)
class ContextRates(Rates):
    """Rates whose decode step costs more the longer the context it attends over: a step at position p (prompt
    tokens plus answer tokens so far) costs `decode_ms_per_token + decode_ms_per_1k_context * p / 1000`."""

    decode_ms_per_1k_context: float = 0.0
    decode_note: str | None = None  # why decode is priced flat, where it is for want of figures
    origin: str = "built-in"  # rates file | history | calibration | built-in

    def decode_ms_at(self, position: float) -> float:
        return self.decode_ms_per_token + self.decode_ms_per_1k_context * position / 1e3

    def unit(self, tiles: int, prompt_tokens: int, output_tokens: int) -> UnitTime:
        """One answer: the first token comes with the prefill; decode step k (from 0) feeds position prompt + k."""
        steps = max(0, output_tokens - 1)
        flat = super().unit(tiles, prompt_tokens, output_tokens)
        return replace(flat, decode_ms=steps * self.decode_ms_at(prompt_tokens + (steps - 1) / 2) if steps else 0.0)


@dataclass(frozen=True)
class DecodeFit:
    ms_per_token: float  # at position 0
    ms_per_1k_context: float
    note: str | None = None  # why it is flat, when it is


def fit_decode(samples: Iterable[tuple[float, float, float]], what: str) -> DecodeFit | None:
    """Decode ms per token against position, from (mean position, ms per token, steps) by least squares weighted
    by steps; flat (the weighted mean) where the positions span under MIN_CONTEXT_SPAN or the time does not grow.
    `what` names the figures in the note. None without any figure."""
    rows = [(p, ms, n) for p, ms, n in samples if ms > 0 and n > 0]
    if not rows:
        return None
    position, ms, steps = (np.array(column, dtype=np.float64) for column in zip(*rows, strict=True))
    mean = float((ms * steps).sum() / steps.sum())
    if position.max() - position.min() < MIN_CONTEXT_SPAN:
        where = "one context length" if len(set(position.round())) == 1 else "context lengths too close together"
        return DecodeFit(mean, 0.0, f"flat: {what} hold decode figures at {where} only")
    growth, base = np.polyfit(position, ms, 1, w=np.sqrt(steps))
    if growth <= 0:
        return DecodeFit(mean, 0.0, f"flat: {what} show no growth with the context")
    if base < 0:  # steeper than a line through 0 ms at position 0: that line instead
        return DecodeFit(0.0, float((steps * position * ms).sum() / (steps * position * position).sum() * 1e3))
    return DecodeFit(float(base), float(growth * 1e3))


def with_decode(rates: Rates, fit: DecodeFit | None, origin: str) -> ContextRates:
    """`rates` with decode priced by `fit` (flat at the rates' own figure without one)."""
    base = {**asdict(rates), "origin": origin}
    if fit is None:
        return ContextRates(**{**base, "decode_note": f"flat: the {origin} figures hold one decode figure"})
    return ContextRates(
        **{
            **base,
            "decode_ms_per_token": fit.ms_per_token,
            "decode_ms_per_1k_context": fit.ms_per_1k_context,
            "decode_note": fit.note,
        }
    )


def choose_rates(
    model: ModelFacts,
    stored: StoredAnswers,
    database: Path,
    rates_file: Path | None,
    weights: str | None,
    calibration: Calibration | None = None,
) -> tuple[ContextRates | None, str | None]:
    """The first that applies: the benchmark report given, this model's stored answers, its calibration on this
    machine, the built-in figures (for InternVL3-2B's shape only). (None, why) when none does."""
    weights = weights or model.weights or "fp32"
    vit_weights, prefill_weights = model.vit_weights or "fp32", model.prefill_weights or "same"
    if rates_file is not None:
        return _bench_rates(rates_file, bench_key(weights, vit_weights, prefill_weights)), None
    rows = stored.timings(model.identity, model.backend, STORED_ROWS)
    if len(rows) >= MIN_ANSWERS:
        source = f"the last {len(rows)} answers of {model.identity} on {model.backend} stored in {database}"
        rates = rates_from_results(rows, source, whole_chunks=model.backend == "axengine")
        if rates is not None:
            return with_decode(rates, _history_decode(rows), "history"), None
    if calibration is not None:
        return rates_from_calibration(calibration), None
    if not model.reference_shape:
        differs = shape_differences(model.shape)
        why = f"the built-in ones are for {REFERENCE_MODEL}'s shape (this model's differs: {differs})"
        return None, _no_figures(model, database, why)
    rates = reference_rates(model.backend, weights, vit_weights, prefill_weights)
    if rates is None:
        key = bench_key(weights, vit_weights, prefill_weights)
        why = f"the built-in ones have none for {model.backend} with {key} weights"
        return None, _no_figures(model, database, why)
    return with_decode(rates, None, "built-in"), None


def _no_figures(model: ModelFacts, database: Path, why: str) -> str:
    return (
        f"no speed figures for {model.identity}: {why}, no answers of it are stored in {database}, and it was "
        "not calibrated on this machine. `vlbatch estimate --calibrate JOB.yaml ...` measures it here (it loads "
        "the model and runs it for seconds to a minute; later estimates reuse the figures); or pass --rates "
        "bench.json (`make bench`)"
    )


def _history_decode(rows: Sequence[dict[str, Any]]) -> DecodeFit | None:
    """Decode against position from stored answers: each answer's steps fed positions prompt .. prompt+steps-1."""
    samples = []
    for row in rows:
        steps = (row.get("output_tokens") or 0) - 1
        if steps > 0 and (row.get("decode_ms") or 0) > 0 and row.get("prompt_tokens"):
            alone_ms = single_stream_ms(row["decode_ms"], row.get("decode_rows"))
            samples.append((row["prompt_tokens"] + (steps - 1) / 2, alone_ms / steps, steps))
    return fit_decode(samples, "the stored answers")


def rates_from_calibration(calibration: Calibration) -> ContextRates:
    """Rates fitted to a calibration's timings: ViT per tile, prefill by chunk, decode against position."""
    shape = Rates(0, 0, 0, 0, "", chunk_tokens=calibration.chunk_tokens, whole_chunks=calibration.whole_chunks)
    first, growth = fit_prefill((shape.chunks(s.tokens), s.ms) for s in calibration.prefill)
    fit = fit_decode(((s.context, s.ms_per_token, s.tokens) for s in calibration.decode), "the calibration's timings")
    source = f"calibrated on {calibration.date} on {calibration.machine.describe()} (--calibrate)"
    rates = replace(shape, vit_ms_per_tile=calibration.vit_ms_per_tile, prefill_first_chunk_ms=first,
                    prefill_growth_ms=growth, source=source)  # fmt: skip
    return with_decode(rates, fit, "calibration")


def _bench_rates(path: Path, weights: str) -> ContextRates:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlbatchError(f"{path}: not a readable bench/run_bench.py --json report ({exc})") from None
    if not isinstance(report, dict):
        raise VlbatchError(f"{path}: not a bench/run_bench.py --json report (expected a JSON object)")
    try:
        rates = rates_from_bench(report, weights)
        fit = _bench_decode(report[weights])
    except ValueError as exc:
        measured = [name for name, figures in report.items() if isinstance(figures, dict) and "cases" in figures]
        hint = f"; it has {', '.join(measured)} (--weights)" if measured else ""
        raise VlbatchError(f"{path}: {exc}{hint}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise VlbatchError(f"{path}: the {weights} figures lack {exc} (a bench/run_bench.py --json report?)") from None
    return with_decode(replace(rates, source=f"{path}: {rates.source}"), fit, "rates file")


def _bench_decode(figures: dict[str, Any]) -> DecodeFit | None:
    """Decode against position from a report's cases: each decoded its steps after its prompt."""
    samples = []
    for case in [*figures["cases"].values(), *figures.get("photos", {}).values()]:
        per_token, total = case.get("decode_ms_per_token") or 0, case.get("decode_ms") or 0
        steps = round(total / per_token) if per_token > 0 and total > 0 else 1
        samples.append((case["prompt_tokens"] + (steps - 1) / 2, per_token, steps))
    return fit_decode(samples, "the report's cases")


# ---------------------------------------------------------------------------------------------------------------
# Reports


def duration(seconds: float) -> str:
    """A wall time as people say it: 4.2 s, 38 s, 12 min 5 s, 2 h 14 min, 3 d 4 h."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s" if whole % 60 else f"{whole // 60} min"
    minutes = round(seconds / 60)
    if minutes < 24 * 60:
        return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"
    hours = round(seconds / 3600)
    return f"{hours // 24} d {hours % 24} h" if hours % 24 else f"{hours // 24} d"


def _pace(time: UnitTime | None, units: int) -> dict[str, Any]:
    if time is None:
        return {"seconds": None, "seconds_per_unit": None, "units_per_hour": None}
    seconds = {
        "vit": time.vit_ms / 1e3,
        "prefill": time.prefill_ms / 1e3,
        "decode": time.decode_ms / 1e3,
        "total": time.total_ms / 1e3,
    }
    per_unit = seconds["total"] / units if units else None
    return {
        "seconds": seconds,
        "seconds_per_unit": per_unit,
        "units_per_hour": 3600 / per_unit if per_unit else None,
    }


def estimate_dict(result: Estimate) -> dict[str, Any]:
    """The estimate as plain data (`--json`): the model, the rates and their source, each job, the totals."""
    model = result.model
    jobs = []
    for job in result.jobs:
        figures = job.figures()
        jobs.append(
            {
                "file": str(job.file),
                "id": job.job.id,
                "mode": job.job.mode,
                **figures,
                "output_tokens_per_answer": job.output_tokens,
                "output_tokens_from": "stored answers" if job.output_answers else "max_new_tokens",
                "output_tokens_answers": job.output_answers,
                **_pace(job.time, figures["to_answer"]),
                "problems": [
                    {"files": [str(p) for p in unit.files], "status": unit.status, "reason": unit.reason}
                    for unit in job.units
                    if unit.status in ("unreadable", "too_long")
                ],
            }
        )
    keys = ("units", "images", "videos", "text_only", "reused", "unreadable", "too_long", "to_answer", "tiles")
    total: dict[str, Any] = {"jobs": len(jobs), **{key: sum(j[key] for j in jobs) for key in (*keys, "prompt_tokens")}}
    times = [j.time for j in result.jobs]
    total.update(_pace(None if result.rates is None else UnitTime.sum(t for t in times if t), total["to_answer"]))
    calibration = result.calibration
    return {
        "model": {
            "dir": str(model.dir),
            "id": model.identity,
            "backend": model.backend,
            "weights": model.weights,
            "vit_weights": model.vit_weights,
            "prefill_weights": model.prefill_weights,
            "prefill_capacity": model.capacity,
            "prefill_capacity_from": model.capacity_note or "the model folder",
            "shape": model.shape,
            "reference_shape": model.reference_shape,
            "batch": model.batch,
        },
        "rates": None if result.rates is None else asdict(result.rates),
        "no_figures": result.missing,
        "calibration": None
        if calibration is None
        else {
            "measured_utc": calibration.measured_utc,
            "machine": asdict(calibration.machine),
            "seconds": calibration.seconds,
            "load_s": calibration.load_s,
        },
        "jobs": jobs,
        "rejected": [{"file": str(exc.path), "reason": exc.reason} for exc in result.rejected],
        "total": total,
    }


def format_estimate(result: Estimate) -> str:
    """The estimate for people: the model and the rates' source, each job's counts and time, the total."""
    model = result.model
    weights = f", {model.weights} weights" if model.weights else ""
    int8 = [
        part for part, kind in (("ViT", model.vit_weights), ("prompt layers", model.prefill_weights)) if kind == "int8"
    ]
    weights += f", int8 {' and '.join(int8)}" if int8 else ""
    capacity = f"prompts up to {model.capacity:,} tokens" + (f" ({model.capacity_note})" if model.capacity_note else "")
    lines = [f"model   {model.identity}: {model.backend}{weights}, {capacity}", *_rates_lines(result)]
    data = estimate_dict(result)
    for job, figures in zip(result.jobs, data["jobs"], strict=True):
        lines += ["", f"{job.file} (job {job.job.id}, mode {job.job.mode})", *_job_lines(job, figures)]
    total = data["total"]
    if len(result.jobs) > 1 or result.rejected:
        rejected = f" ({len(result.rejected)} rejected)" if result.rejected else ""
        jobs = f"{total['jobs']} job{'' if total['jobs'] == 1 else 's'}"
        head = f"total   {jobs}{rejected}, {total['units']:,} units, {total['to_answer']:,} to answer"
        lines += ["", head, *(f"        {line}" for line in _time_lines(total))]
    return "\n".join(lines)


def _rates_lines(result: Estimate) -> list[str]:
    rates = result.rates
    if rates is None:
        return [
            f"rates   {line}" if i == 0 else f"        {line}" for i, line in enumerate(_wrap(result.missing or ""))
        ]
    growth = f" +{_ms(rates.prefill_growth_ms)} ms per later chunk" if rates.prefill_growth_ms else ""
    decode = f"decode {_ms(rates.decode_ms_per_token)} ms/token"
    if rates.decode_ms_per_1k_context:
        decode += f" +{_ms(rates.decode_ms_per_1k_context)} ms per 1,000 tokens of context"
    lines = [
        f"rates   {'measured' if rates.measured else 'computed, not measured here'}: {rates.source}",
        f"        ViT {_ms(rates.vit_ms_per_tile)} ms/tile, prefill {_ms(rates.prefill_first_chunk_ms)} ms for the "
        f"first {rates.chunk_tokens}-token chunk{growth}, {decode}",
    ]
    if rates.decode_note:
        lines.append(f"        decode {rates.decode_note}")
    batch = result.model.batch
    if batch > 1:
        lines.append(
            f"        decode of up to {batch} answers at once (model.batch): x{rates.decode_speedup(batch):.2f} "
            f"the speed of one" + ("" if rates.batch_speedup else " (the built-in CPU figures)")
        )
    return lines


def _ms(value: float) -> str:
    """Milliseconds with a tenth, or with two significant digits below 1 ms (the tiny model's)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _wrap(text: str, width: int = 104) -> list[str]:
    """Text in lines of at most `width` characters, broken between words."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _job_lines(job: JobEstimate, figures: dict[str, Any]) -> list[str]:
    parts = [(figures["images"], "image"), (figures["videos"], "video"), (figures["text_only"], "text-only question")]
    what = ", ".join(f"{n:,} {name}{'s' if n != 1 else ''}" for n, name in parts if n)
    if job.output_answers:
        output = f"{job.output_tokens} per answer (the mean of {job.output_answers} stored answers to this prompt)"
    else:
        output = f"{job.output_tokens} per answer (max_new_tokens: an upper bound)"
    lines = [
        f"  units            {figures['units']:,}" + (f": {what}" if what else ""),
        f"  already answered {figures['reused']:,} (reused, no model time)",
        f"  unreadable       {figures['unreadable']:,}",
        *_problems(job, "unreadable"),
    ]
    if figures["too_long"]:
        lines += [f"  too long         {figures['too_long']:,}", *_problems(job, "too_long")]
    lines += [
        f"  to answer        {figures['to_answer']:,}",
        f"  tiles            {figures['tiles']:,}",
        f"  prompt tokens    {figures['prompt_tokens']:,}",
        f"  output tokens    {output}",
    ]
    time = _time_lines(figures)
    lines.append(f"  wall time        {time[0]}")
    lines += [f"                   {line}" for line in time[1:]]
    return lines


def _problems(job: JobEstimate, status: Status) -> list[str]:
    reasons = [unit.reason or "" for unit in job.units if unit.status == status]
    lines = [f"                   {reason}" for reason in reasons[:SHOWN_PROBLEMS]]
    if len(reasons) > SHOWN_PROBLEMS:
        lines.append(f"                   ... and {len(reasons) - SHOWN_PROBLEMS} more (--json lists every one)")
    return lines


def _time_lines(figures: dict[str, Any]) -> list[str]:
    if not figures["to_answer"]:
        return ["nothing to answer"]
    if figures["seconds"] is None:
        return ["unknown: no speed figures for this model (--calibrate measures some)"]
    s = figures["seconds"]
    return [
        f"{duration(s['total'])} for one worker: ViT {duration(s['vit'])}, prefill {duration(s['prefill'])}, "
        f"decode {duration(s['decode'])}",
        f"{duration(figures['seconds_per_unit'])} per unit, {figures['units_per_hour']:,.0f} units per hour",
    ]
