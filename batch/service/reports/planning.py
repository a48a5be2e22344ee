"""How long a unit of work takes, from rates: ViT per tile, prefill by chunk, decode per token.

One cost model serves `vlbatch estimate`, the benchmark's planning table and the docs' "how long will my
folder take". Prefill chunk k (counting from 1) costs `first_chunk_ms + growth_ms * (k - 1)`: every chunk does
the same matrix work and attends over a history that grows by one chunk, so a prompt of x chunks costs
`first_chunk_ms * x + growth_ms * x * (x - 1) / 2`. Rates come from three places, in order of trust: the
answers this worker stored (`rates_from_results`), a benchmark report (`rates_from_bench`), and the figures
built in here (`REFERENCE_RATES`): the published AX650N timings (computed, not measured here) and one CPU
benchmark run (measured, on the CPU it names).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

CHUNK_TOKENS = 128


@dataclass(frozen=True)
class UnitTime:
    """Milliseconds one unit spends in the model's stages. Its time to the first token is ViT plus prefill
    (`vit_prefill_ms`): a stored answer's ttft_ms less its preprocess_ms, which a worker spends on the next file while
    the model answers (batch/infer/timings.py)."""

    vit_ms: float
    prefill_ms: float
    decode_ms: float

    @property
    def vit_prefill_ms(self) -> float:
        return self.vit_ms + self.prefill_ms

    @property
    def total_ms(self) -> float:
        return self.vit_prefill_ms + self.decode_ms

    @staticmethod
    def sum(times: Iterable[UnitTime]) -> UnitTime:
        """Stage by stage, the time of several units."""
        times = list(times)
        return UnitTime(sum(t.vit_ms for t in times), sum(t.prefill_ms for t in times), sum(t.decode_ms for t in times))


@dataclass(frozen=True)
class Rates:
    """What one worker does per second; `measured` is False for figures computed from published tables."""

    vit_ms_per_tile: float
    prefill_first_chunk_ms: float
    prefill_growth_ms: float  # extra cost of each later chunk over the one before it
    decode_ms_per_token: float
    source: str
    measured: bool = True
    chunk_tokens: int = CHUNK_TOKENS
    whole_chunks: bool = False  # the NPU's prefill graphs always run a full chunk; onnxruntime runs what is there
    # aggregate decode speed of N answers decoded together over one answer's, as (N, factor) points; none: the
    # built-in CPU curve (BATCH_SPEEDUP)
    batch_speedup: tuple[tuple[int, float], ...] = ()

    def decode_speedup(self, rows: int) -> float:
        """How much faster N answers decode together than one after another (linear between measured points,
        flat past the last)."""
        return speedup_at(self.batch_speedup or BATCH_SPEEDUP, rows)

    def chunks(self, prompt_tokens: int) -> float:
        x = prompt_tokens / self.chunk_tokens
        return float(math.ceil(x)) if self.whole_chunks else x

    def prefill_ms(self, prompt_tokens: int) -> float:
        x = self.chunks(prompt_tokens)
        return self.prefill_first_chunk_ms * x + self.prefill_growth_ms * x * (x - 1) / 2

    def unit(self, tiles: int, prompt_tokens: int, output_tokens: int) -> UnitTime:
        """One answer: the first token comes with the prefill, each later one costs a decode step."""
        return UnitTime(
            self.vit_ms_per_tile * tiles,
            self.prefill_ms(prompt_tokens),
            self.decode_ms_per_token * max(0, output_tokens - 1),
        )


# bench/batched_decode.py on the real-shape int4+int8 export (2-core AMD EPYC Zen 4, 2 threads, 408-token prompts,
# median of 3 rounds, 2026-12-05): tokens/s of N rows decoded together over one row's
BATCH_SPEEDUP: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 1.66), (4, 2.37), (8, 3.04))


def speedup_at(points: tuple[tuple[int, float], ...], rows: float) -> float:
    """The factor at `rows` on a curve of (rows, factor) points: linear between them, flat past the last."""
    if rows <= 1:
        return 1.0
    xs, ys = zip(*sorted({(1, 1.0), *points}), strict=True)  # rows may be a mean (stored decode_rows)
    return float(np.interp(rows, xs, ys))


def single_stream_ms(decode_ms: float, rows: float | None) -> float:
    """An answer's decode time as if it had been decoded alone: `rows` answers that shared its steps each step took
    rows / speedup(rows) times one answer's step (the built-in curve)."""
    rows = rows or 1.0
    return decode_ms if rows <= 1 else decode_ms * speedup_at(BATCH_SPEEDUP, rows) / rows


def fit_prefill(samples: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """(first_chunk_ms, growth_ms) from (chunks, prefill ms) pairs, by least squares; growth is never negative.

    With one distinct prompt length the growth cannot be told apart from the per-chunk cost, and is 0.
    """
    pairs = [(x, ms) for x, ms in samples if x > 0 and ms > 0]
    if not pairs:
        raise ValueError("no prefill timings to fit")
    x = np.array([p[0] for p in pairs], dtype=np.float64)
    t = np.array([p[1] for p in pairs], dtype=np.float64)
    if len(set(np.round(x, 6))) > 1:
        basis = np.stack([x, x * (x - 1) / 2], axis=1)
        (first, growth), *_ = np.linalg.lstsq(basis, t, rcond=None)
        if growth >= 0 and first > 0:
            return float(first), float(growth)
    return float((t * x).sum() / (x * x).sum()), 0.0


def rates_from_results(rows: Iterable[Mapping[str, Any]], source: str, whole_chunks: bool = False) -> Rates | None:
    """Rates from stored answers (`results` rows with tiles, vit_ms, prompt_tokens, prefill_ms, output_tokens,
    decode_ms); None when they hold no answer with a prefill time."""
    rows = list(rows)
    vit = [(r["vit_ms"], r["tiles"]) for r in rows if (r.get("tiles") or 0) > 0 and (r.get("vit_ms") or 0) > 0]
    decode = [
        (single_stream_ms(r["decode_ms"], r.get("decode_rows")), r["output_tokens"] - 1)
        for r in rows
        if (r.get("output_tokens") or 0) > 1 and (r.get("decode_ms") or 0) > 0
    ]
    shape = Rates(0, 0, 0, 0, source, whole_chunks=whole_chunks)
    prefill = [(shape.chunks(r["prompt_tokens"]), r["prefill_ms"]) for r in rows if (r.get("prompt_tokens") or 0) > 0]
    try:
        first, growth = fit_prefill(prefill)
    except ValueError:
        return None
    return replace(
        shape,
        vit_ms_per_tile=sum(ms for ms, _ in vit) / sum(n for _, n in vit) if vit else 0.0,
        prefill_first_chunk_ms=first,
        prefill_growth_ms=growth,
        decode_ms_per_token=sum(ms for ms, _ in decode) / sum(n for _, n in decode) if decode else 0.0,
    )


def rates_from_bench(report: Mapping[str, Any], weights: str) -> Rates:
    """Rates from a `bench/run_bench.py --json` report for one export (int4, int8 or fp32): every case it ran,
    the photo captions included, fitted together."""
    try:
        figures = report[weights]
        cases = [*figures["cases"].values(), *figures.get("photos", {}).values()]
    except (KeyError, AttributeError, TypeError):
        raise ValueError(f"the benchmark report has no figures for {weights} weights") from None
    machine = report.get("machine", {})
    source = (
        f"bench/run_bench.py {weights}, {report.get('model', 'model?')}, "
        f"{machine.get('cpu', 'CPU?')}, {machine.get('threads', '?')} threads"
    )
    first, growth = fit_prefill((c["prompt_tokens"] / CHUNK_TOKENS, c["prefill_ms"]) for c in cases)
    tiled = [c for c in cases if c.get("tiles")]
    decode = [c["decode_ms_per_token"] for c in cases if c.get("decode_ms_per_token")]
    return Rates(
        vit_ms_per_tile=(
            sum(c["vit_ms"] for c in tiled) / sum(c["tiles"] for c in tiled) if tiled else figures["vit_ms_per_tile"]
        ),
        prefill_first_chunk_ms=first,
        prefill_growth_ms=growth,
        decode_ms_per_token=float(np.median(decode)),
        source=source,
    )


# The published AX650N timings (w8a16, InternVL3-2B): ViT per 448 tile, TTFT for 1, 3, 9 and 17 prefill
# chunks of 128 tokens, decode per token. The prefill model above fits them within 7% (1 chunk) and 2% (3 or
# more); figures made from them are computed, never measured here.
AX650N_VIT_MS = 364.87
AX650N_PREFILL_MS = {1: 220.98, 3: 862.29, 9: 4588.79, 17: 13904.38}
AX650N_DECODE_MS = 86.97
# longest prompts of the published axmodel folders: InternVL3-2B_axmodel_chunk_128 (photos) and _128_2048 (video)
AX650N_PREFILL_CAPACITY = {"chunk_128": 1152, "chunk_128_2048": 2176}


def ax650n_rates() -> Rates:
    first, growth = fit_prefill(AX650N_PREFILL_MS.items())
    return Rates(
        vit_ms_per_tile=AX650N_VIT_MS,
        prefill_first_chunk_ms=first,
        prefill_growth_ms=growth,
        decode_ms_per_token=AX650N_DECODE_MS,
        source="computed from the published AX650N timings (w8a16), not measured here",
        measured=False,
        whole_chunks=True,
    )


def reference_rates(
    backend: str, weights: str | None, vit_weights: str = "fp32", prefill_weights: str = "same"
) -> Rates | None:
    """The built-in figures for a backend (and, for onnxruntime, the export's weights, ViT weights and prompt
    layers); None where there are none."""
    if backend == "axengine":
        return ax650n_rates()
    rates = CPU_REFERENCE_RATES.get(weights or "")
    key = bench_key(weights or "", vit_weights, prefill_weights)
    if rates is None or (key != weights and key in CPU_REFERENCE_RATES):  # none, or measured as it is
        return CPU_REFERENCE_RATES.get(key)
    if "int8" not in (vit_weights, prefill_weights):
        return rates
    # an int8 ViT and int8 prompt layers cost the same whatever the decode layers' weights
    int8 = CPU_REFERENCE_RATES.get(INT8_ARITHMETIC)
    if int8 is None:
        return None
    parts = []
    if vit_weights == "int8":
        rates = replace(rates, vit_ms_per_tile=int8.vit_ms_per_tile)
        parts.append("ViT")
    if prefill_weights == "int8":
        rates = replace(
            rates, prefill_first_chunk_ms=int8.prefill_first_chunk_ms, prefill_growth_ms=int8.prefill_growth_ms
        )
        parts.append("prompt layers")
    return replace(rates, source=f"{rates.source}; int8 {' and '.join(parts)} from its {INT8_ARITHMETIC} run")


def bench_key(weights: str, vit_weights: str = "fp32", prefill_weights: str = "same") -> str:
    """The name `bench/run_bench.py --weights` gives an export: int4, or int4+int8 for one whose ViT and prompt
    layers both run int8 arithmetic (`vlbatch export --vit-weights int8 --prefill-weights int8`)."""
    return f"{weights}+int8" if vit_weights == "int8" and prefill_weights == "int8" else weights


# bench/run_bench.py (real-shape model with random weights, 2 threads, 2026-11-25) on a 2-core AMD EPYC (Zen 4:
# AVX-512 with VNNI and BF16), fitted by rates_from_bench over all its cases (within 15% of each measured photo).
# Another CPU differs: `make bench` there, then `vlbatch estimate --rates bench.json`.
_CPU_SOURCE = "bench/run_bench.py on a 2-core AMD EPYC (Zen 4), 2 threads, real-shape {} export"
INT8_ARITHMETIC = "int4+int8"  # --weights int4 --vit-weights int8 --prefill-weights int8
CPU_REFERENCE_RATES: dict[str, Rates] = {
    "int4": Rates(4108.1, 1006.4, 31.56, 45.25, _CPU_SOURCE.format("int4")),
    "fp32": Rates(4089.4, 1748.8, 30.58, 204.78, _CPU_SOURCE.format("fp32")),
    INT8_ARITHMETIC: Rates(1670.8, 605.7, 32.48, 38.8, _CPU_SOURCE.format(INT8_ARITHMETIC)),
}
