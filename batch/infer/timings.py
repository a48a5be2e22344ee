"""What each timing of an answer means, said once: `Timings` (one answer's, as the model measures it) and
`TIMING_COLUMNS`, the one-sentence definition of each `results` column they become (the Datasette column notes and
the canned queries follow it).

Every time is wall-clock time (time.perf_counter) of the process that answers, in milliseconds. One answer's stages
run one after another and never overlap: preparing the request (preprocess_ms), the vision encoder (vit_ms), the
prefill up to the first token sampled (prefill_ms), then one decode step per later token (decode_ms). ttft_ms holds
the first three and the short gaps between them (looking up the prompt's token embeddings, making its cache), so
ttft_ms >= preprocess_ms + vit_ms + prefill_ms, and an answer's own time from its media to its last token is
ttft_ms + decode_ms: adding preprocess_ms to that counts it twice.

Time an answer spends waiting is in none of them: a worker prepares the next file while the model answers the
current one (preprocess_ms may overlap another answer's stages, never its own), and a prepared file waits for a
free row of a batch (batch/infer/batching.py) before its ViT starts; TTFT starts again from its own preparation.

Answers decoded together share each decode step: an answer's decode_ms is the whole time of every step it took
part in, and decode_rows is how many answers those steps carried on average. Summing decode_ms over answers
decoded together counts a shared step once per answer; an answer's share of its worker's decode time is
decode_ms / decode_rows (`Timings.decode_share_ms`; records.DECODE_SHARE_MS in SQL). The time between its steps
(other answers joining the batch: their ViT and prefill) is not in its decode_ms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# column -> its definition (no closing full stop: Datasette shows them as notes); `results` stores each of them
TIMING_COLUMNS: dict[str, str] = {
    "preprocess_ms": "Wall time preparing the request before the model runs: decoding the media, tiling and "
    "normalising it, building and tokenizing the prompt (a worker does it for the next file while the model answers "
    "this one)",
    "vit_ms": "Wall time of the InternViT vision encoder over the tiles, after preprocess_ms (0 without media; near 0 "
    "when the same tiles' features were still cached)",
    "prefill_ms": "Wall time of the prompt's prefill in chunks, after vit_ms, up to and including sampling the first "
    "token",
    "ttft_ms": "Time to first token: preprocess_ms + vit_ms + prefill_ms and the short gaps between them, without "
    "overlap (time the prepared file waited for the model or a batch row is not counted); its time to the last token "
    "is ttft_ms + decode_ms",
    "decode_ms": "Wall time of the decode steps that made every token after the first; answers decoded together "
    "share a step and each counts it whole (its share of the worker's decode time: decode_ms / decode_rows)",
    "tokens_per_s": "Decode speed of this answer's own stream: the tokens its decode steps made (every one after the "
    "first, a closing end-of-turn token included) per second of decode_ms; 0 without decode steps (tokens/s)",
    "decode_rows": "Answers that took part in its decode steps, itself included, on average over them (1: decoded "
    "alone; empty in rows from before batched decode: alone)",
}


@dataclass
class Timings:
    """One answer's timings as the model measures them (TIMING_COLUMNS says what each means); times in ms."""

    preprocess_ms: float = 0.0
    vit_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (all but the first; a closing end-of-turn token too)
    prompt_tokens: int = 0
    decode_rows: float = 1.0  # answers that shared its decode steps, on average over them (batching.py)

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    @property
    def decode_share_ms(self) -> float:
        """Its share of the worker's decode time: each step it took part in divided among the answers in it."""
        return self.decode_ms / max(self.decode_rows, 1.0)

    def to_dict(self) -> dict[str, float]:
        data = asdict(self)
        data["tokens_per_s"] = self.tokens_per_s
        return data
