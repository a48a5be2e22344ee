"""The generation ladder shared by every runtime: chunked prefill, one-token decode, sampling, timings."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from batch.infer.kvcache import KVCache
from batch.infer.runtime.base import Backend
from batch.infer.sampling import make_sampler
from batch.infer.settings import GenerationSettings
from batch.infer.timings import Timings


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    image_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens or a full cache)
    timings: Timings = field(default_factory=Timings)
    tiles: int = 0

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Step:
    token: int
    logits: np.ndarray  # (vocab,) float32 logits the token was drawn from


def num_chunks(n: int, chunk: int) -> int:
    """Chunks for n prompt tokens: ceil, so an exact multiple runs no empty chunk."""
    return math.ceil(n / chunk)


def prefill(backend: Backend, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
    """Run the prompt's (S, hidden) embeddings through every layer in chunks; returns the last (1, 1, hidden)."""
    chunk = backend.chunk_len
    x = embeds[None, :0]
    for c in range(num_chunks(len(embeds), chunk)):
        start = c * chunk
        x = backend.prefill_layers(embeds[None, start : start + chunk], start, cache)  # (1, n, hidden)
        cache.length = start + x.shape[1]
    return x[:, -1:]


def decode_one_token(backend: Backend, embed: np.ndarray, cache: KVCache) -> np.ndarray:
    """Feed one (1, 1, hidden) embedding at the cache's next position; returns next-token logits."""
    pos = cache.length
    x = backend.decode_layers(embed, pos, cache)
    cache.length = pos + 1
    return backend.logits(x)


@dataclass
class FirstToken:
    """An answer after its prefill: its cache, its sampler, the first token and how many tokens it may produce."""

    cache: KVCache
    sample: Callable[[np.ndarray], int]
    logits: np.ndarray
    token: int
    budget: int  # max_new_tokens, or fewer where the cache would fill first


def first_token(
    backend: Backend, prompt_embeds: np.ndarray, settings: GenerationSettings, timings: Timings, started: float
) -> FirstToken:
    """Prefill the prompt's (S, hidden) embeddings into a new cache and sample the first token; fills the prefill
    time, the prompt's tokens and TTFT in `timings`: its preprocess_ms plus the time since `started`, the
    perf_counter() when the answer's model work began (before its embeddings and ViT; see batch/infer/timings.py)."""
    sample = make_sampler(settings.temperature, settings.top_k, settings.top_p, settings.seed)
    cache = backend.new_cache()
    t = time.perf_counter()
    logits = backend.logits(prefill(backend, prompt_embeds, cache))
    token = sample(logits)
    now = time.perf_counter()
    timings.prefill_ms = (now - t) * 1e3
    timings.prompt_tokens = len(prompt_embeds)
    timings.ttft_ms = timings.preprocess_ms + (now - started) * 1e3
    budget = min(settings.max_new_tokens, backend.kv_capacity - len(prompt_embeds) + 1)
    return FirstToken(cache, sample, logits, token, budget)


def generate_steps(
    backend: Backend,
    embeddings: np.ndarray,
    prompt_embeds: np.ndarray,
    settings: GenerationSettings,
    stop_ids: frozenset[int],
    timings: Timings,
    started: float,
) -> Iterator[Step]:
    """Yield sampled tokens until a stop token (unless ignore_eos), max_new_tokens or a full cache.

    `started` is when the answer's model work began (for TTFT, see first_token); `timings` is filled in as steps run.
    """
    first = first_token(backend, prompt_embeds, settings, timings, started)
    cache, sample, logits, token = first.cache, first.sample, first.logits, first.token
    produced = 1
    while True:
        yield Step(token, logits)
        if (token in stop_ids and not settings.ignore_eos) or produced >= first.budget:
            break
        t = time.perf_counter()
        logits = decode_one_token(backend, embeddings[token][None, None].astype(np.float32), cache)
        token = sample(logits)
        produced += 1
        timings.decode_tokens = produced - 1
        timings.decode_ms += (time.perf_counter() - t) * 1e3
