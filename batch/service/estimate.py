"""`vlbatch estimate`: what jobs will cost before they run, counted as the worker will meet them.

This module owns that count and its report. Each job file is read as the worker will read it (`check_job`); each
unit's files are hashed into the worker's cache key to find answers already stored (reused: no model time);
image sizes are read from their headers in the decoding child; tiles are chosen by the pipeline's own functions
(`choose_tile_cap`, `tile_count`) and prompt tokens counted by its `PromptBudget`. The units left are priced with
`planning.Rates`, taken from a benchmark report (--rates), else this model's stored answers, else the built-in
figures for the runtime. Nothing is written: the database is opened read-only, the model is never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from batch.config import Config, ModelConfig
from batch.errors import BackendError, MediaError, VlbatchError
from batch.infer.decode import IsolatedDecoder, MediaDecoder
from batch.infer.media import choose_tile_cap, media_kind, tile_count
from batch.infer.pipeline import load_tokenizer
from batch.infer.prompt import PromptMedia
from batch.infer.prompt_budget import PromptBudget
from batch.infer.runtime.select import (
    metadata_dir,
    model_identity,
    prefill_capacity,
    runtime_kind,
    weights_formats,
)
from batch.infer.safe_open import open_regular
from batch.model.checkpoint import read_config
from batch.service.jobfile import Job, JobRejected
from batch.service.planning import (
    AX650N_PREFILL_CAPACITY,
    Rates,
    UnitTime,
    bench_key,
    rates_from_bench,
    rates_from_results,
    reference_rates,
)
from batch.service.records import cache_key
from batch.service.store import StoredAnswers, file_sha256
from batch.service.submit import check_job

STORED_ROWS = 500  # the newest answers whose timings make this model's rates
MIN_ANSWERS = 3  # fewer stored answers than this are not figures to plan on
SHOWN_PROBLEMS = 5  # unreadable or too-long units listed per job in the text report

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
    )


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
    time: UnitTime

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
    rates: Rates
    jobs: list[JobEstimate] = field(default_factory=list)
    rejected: list[JobRejected] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Counting


def estimate(
    config: Config,
    job_files: Sequence[Path],
    force: bool = False,
    rates_file: Path | None = None,
    weights: str | None = None,
    decoder: MediaDecoder | None = None,
) -> Estimate:
    """Count every job file's units and price those left to answer; a rejected job file is kept with its reason.

    `force` counts answers already stored as to be answered again (`run --force`); `rates_file` is a
    `bench/run_bench.py --json` report, read for `weights` (default: the model's own, else fp32).
    """
    model = read_model(config.model)
    with closing(StoredAnswers(config.spool.database)) as stored:
        rates = choose_rates(model, stored, config.spool.database, rates_file, weights)
        result = Estimate(model, rates)
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

    def job(self, path: Path, job: Job, rates: Rates) -> JobEstimate:
        units = [self.unit(job, files) for files in job.units()]
        answers, mean = self.stored.output_tokens(self.model.identity, job.prompt)
        limit = job.generation.max_new_tokens
        output = min(limit, max(1, round(mean))) if answers >= MIN_ANSWERS else limit
        total = UnitTime.sum(rates.unit(u.tiles, u.prompt_tokens, output) for u in units if u.status == "answer")
        return JobEstimate(path, job, units, output, answers if answers >= MIN_ANSWERS else 0, total)

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


def choose_rates(
    model: ModelFacts, stored: StoredAnswers, database: Path, rates_file: Path | None, weights: str | None
) -> Rates:
    """The first that applies: the benchmark report given, this model's stored answers, the built-in figures."""
    weights = weights or model.weights or "fp32"
    vit_weights, prefill_weights = model.vit_weights or "fp32", model.prefill_weights or "same"
    if rates_file is not None:
        return _bench_rates(rates_file, bench_key(weights, vit_weights, prefill_weights))
    rows = stored.timings(model.identity, model.backend, STORED_ROWS)
    if len(rows) >= MIN_ANSWERS:
        source = f"the last {len(rows)} answers of {model.identity} on {model.backend} stored in {database}"
        rates = rates_from_results(rows, source, whole_chunks=model.backend == "axengine")
        if rates is not None:
            return rates
    rates = reference_rates(model.backend, weights, vit_weights, prefill_weights)
    if rates is None:
        raise VlbatchError(
            f"no speed figures for {model.backend} with {weights} weights yet: run one job with this model "
            "(`vlbatch run`; the estimate then uses the timings of its answers), or measure this machine with "
            "`make bench` (it writes bench.json) and pass `--rates bench.json`"
        )
    return rates


def _bench_rates(path: Path, weights: str) -> Rates:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlbatchError(f"{path}: not a readable bench/run_bench.py --json report ({exc})") from None
    if not isinstance(report, dict):
        raise VlbatchError(f"{path}: not a bench/run_bench.py --json report (expected a JSON object)")
    try:
        rates = rates_from_bench(report, weights)
    except ValueError as exc:
        measured = [name for name, figures in report.items() if isinstance(figures, dict) and "cases" in figures]
        hint = f"; it has {', '.join(measured)} (--weights)" if measured else ""
        raise VlbatchError(f"{path}: {exc}{hint}") from None
    except (KeyError, TypeError) as exc:
        raise VlbatchError(f"{path}: the {weights} figures lack {exc} (a bench/run_bench.py --json report?)") from None
    return replace(rates, source=f"{path}: {rates.source}")


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


def _pace(time: UnitTime, units: int) -> dict[str, Any]:
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
    total.update(_pace(UnitTime.sum(j.time for j in result.jobs), total["to_answer"]))
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
        },
        "rates": asdict(result.rates),
        "jobs": jobs,
        "rejected": [{"file": str(exc.path), "reason": exc.reason} for exc in result.rejected],
        "total": total,
    }


def format_estimate(result: Estimate) -> str:
    """The estimate for people: the model and the rates' source, each job's counts and time, the total."""
    model, rates = result.model, result.rates
    weights = f", {model.weights} weights" if model.weights else ""
    int8 = [
        part for part, kind in (("ViT", model.vit_weights), ("prompt layers", model.prefill_weights)) if kind == "int8"
    ]
    weights += f", int8 {' and '.join(int8)}" if int8 else ""
    capacity = f"prompts up to {model.capacity:,} tokens" + (f" ({model.capacity_note})" if model.capacity_note else "")
    growth = f" +{rates.prefill_growth_ms:.1f} ms per later chunk" if rates.prefill_growth_ms else ""
    lines = [
        f"model   {model.identity}: {model.backend}{weights}, {capacity}",
        f"rates   {'measured' if rates.measured else 'computed, not measured here'}: {rates.source}",
        f"        ViT {rates.vit_ms_per_tile:.1f} ms/tile, prefill {rates.prefill_first_chunk_ms:.1f} ms for the first "
        f"{rates.chunk_tokens}-token chunk{growth}, decode {rates.decode_ms_per_token:.1f} ms/token",
    ]
    data = estimate_dict(result)
    for job, figures in zip(result.jobs, data["jobs"], strict=True):
        lines += ["", f"{job.file} (job {job.job.id}, mode {job.job.mode})", *_job_lines(job, figures)]
    total = data["total"]
    if len(result.jobs) > 1 or result.rejected:
        rejected = f" ({len(result.rejected)} rejected)" if result.rejected else ""
        head = f"total   {total['jobs']} jobs{rejected}, {total['units']:,} units, {total['to_answer']:,} to answer"
        lines += ["", head, *(f"        {line}" for line in _time_lines(total))]
    return "\n".join(lines)


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
    s = figures["seconds"]
    return [
        f"{duration(s['total'])} for one worker: ViT {duration(s['vit'])}, prefill {duration(s['prefill'])}, "
        f"decode {duration(s['decode'])}",
        f"{duration(figures['seconds_per_unit'])} per unit, {figures['units_per_hour']:,.0f} units per hour",
    ]
