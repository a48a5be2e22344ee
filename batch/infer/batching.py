"""Several answers decoded together (continuous batching): each decode step runs every answer in flight through
each layer as one (rows, 1, hidden) product, so the weights are read once per step instead of once per answer.

An answer joins with its own ViT run and prefill (one prompt at a time, into a cache of its own that then becomes a
row of the shared RowCache), samples with its own settings and seed, and leaves at its own end (an end-of-turn
token, its max_new_tokens, a full cache); a waiting answer then takes its row. Greedy answers are the answers the
same requests get alone: only the order in which kernels sum may differ.

Timings per answer: ViT, prefill and TTFT are its own (TTFT runs from its start to its first token); decode_ms is
the time of the decode steps it took part in, each step shared with the other answers in it, so its tokens/s is
the rate its own stream saw and the batch's aggregate rate is the sum over its rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from batch.errors import VlbatchError
from batch.infer.generate import GenerationResult, Timings, decode_one_token, first_token
from batch.infer.kvcache import KVCache, RowCache
from batch.infer.pipeline import AnswerText, Pipeline, Request
from batch.infer.runtime.base import Backend
from batch.infer.settings import GenerationSettings


@dataclass
class Finished:
    """An answer that left the batch: its result, or the error that ended it."""

    tag: Any
    result: GenerationResult | None = None
    error: VlbatchError | None = None


@dataclass
class _Row:
    tag: Any
    request: Request
    answer: AnswerText
    sample: Callable[[np.ndarray], int]
    timings: Timings
    token: int
    budget: int  # tokens this answer may produce
    own_cache: KVCache | None  # a batch of one row decodes in the answer's own cache (runtimes of one row: the NPU)
    produced: int = 1


class DecodeBatch:
    """Up to `rows` answers in flight on one pipeline; add() while not full, step() until all have finished.

    `rows` is capped at what the runtime decodes per step (`max_rows`); a batch of one decodes exactly as
    Pipeline.answer() does, in the answer's own cache.
    """

    def __init__(self, pipeline: Pipeline, rows: int) -> None:
        backend = pipeline.backend
        self.pipeline = pipeline
        self.rows = max(1, min(rows, backend.max_rows))
        self.cache = backend.new_row_cache(self.rows) if self.rows > 1 else None
        self._rows: list[_Row] = []

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def full(self) -> bool:
        return len(self._rows) >= self.rows

    @property
    def tags(self) -> list[Any]:
        """The tags of the answers in flight, in row order."""
        return [row.tag for row in self._rows]

    def add(self, request: Request, settings: GenerationSettings, tag: Any) -> list[Finished]:
        """Run the request's ViT and prefill and take its first token; it joins the batch unless that already ended
        it (returned as finished). A VlbatchError of this request propagates: the answers in flight are untouched."""
        if self.full:
            raise VlbatchError(f"all {self.rows} rows of the batch are in use")
        started = time.perf_counter()
        timings = Timings()
        embeds = self.pipeline.prompt_embeds(request, timings)
        first = first_token(self.pipeline.backend, embeds, settings, timings, started)
        answer = AnswerText(self.pipeline, settings)
        own = first.cache if self.cache is None else None
        row = _Row(tag, request, answer, first.sample, timings, first.token, first.budget, own)
        if answer.add(first.token) or first.budget <= 1:
            return [self._finished(row)]
        if self.cache is not None:
            self.cache.add(first.cache)
        self._rows.append(row)
        return []

    def step(self) -> list[Finished]:
        """One decode step of every answer in flight; returns those that ended with it."""
        if not self._rows:
            return []
        started = time.perf_counter()
        logits = self._decode()
        elapsed_ms = (time.perf_counter() - started) * 1e3
        ended = []
        count = len(self._rows)
        for i, row in enumerate(self._rows):
            row.token = row.sample(logits[i])
            row.produced += 1
            steps = row.timings.decode_tokens = row.produced - 1
            row.timings.decode_ms += elapsed_ms
            row.timings.decode_rows += (count - row.timings.decode_rows) / steps  # the mean over its steps
            if row.answer.add(row.token) or row.produced >= row.budget:
                ended.append(i)
        finished = []
        for i in reversed(ended):  # highest first: each removal moves the last row into the freed one
            finished.append(self._finished(self._rows[i]))
            self._remove(i)
        return finished[::-1]

    def _decode(self) -> np.ndarray:
        """The next token's (rows in use, vocab) logits of every answer in flight."""
        backend, embeddings = self.pipeline.backend, self.pipeline.embeddings
        if self.cache is None:
            (row,) = self._rows
            return decode_one_token(backend, embeddings[row.token][None, None].astype(np.float32), row.own_cache)[None]
        return decode_rows_step(backend, embeddings, [row.token for row in self._rows], self.cache)

    def _remove(self, i: int) -> None:
        if self.cache is not None:
            self.cache.remove(i)
        self._rows[i] = self._rows[-1]
        self._rows.pop()

    def fail_all(self, error: VlbatchError) -> list[Finished]:
        """End every answer in flight with `error` (a step that failed fails the answers it carried)."""
        finished = [Finished(row.tag, error=error) for row in self._rows]
        while self._rows:
            self._remove(len(self._rows) - 1)
        return finished

    def _finished(self, row: _Row) -> Finished:
        return Finished(row.tag, result=row.answer.result(row.request, row.timings))


def decode_rows_step(backend: Backend, embeddings: np.ndarray, tokens: list[int], cache: RowCache) -> np.ndarray:
    """Feed each row in use its next token at its own position; returns the (rows, vocab) next-token logits."""
    x = np.asarray(embeddings[tokens], dtype=np.float32)[:, None]
    positions, mask = cache.prepare_step()
    x = backend.decode_rows_layers(x, positions, mask, cache)
    cache.advance()
    return backend.logits_rows(x)


def batch_limit(backend: Backend) -> str:
    """Why a runtime decodes fewer answers per step than model.batch asks, and what to do about it."""
    version = getattr(backend, "format_version", None)
    if version is not None and backend.max_rows == 1:
        return (
            f"this export (format {version}) decodes one answer at a time: re-export it for model.batch with "
            f"`vlbatch export HF_DIR OUT_DIR` (the same weight flags as before)"
        )
    if backend.max_rows == 1:
        return f"{backend.name} decodes one answer at a time (its model files are compiled for one row)"
    return f"{backend.name} decodes at most {backend.max_rows} answers per step"


class BatchScheduler:
    """One model's DecodeBatch driven by a thread of its own, for callers in many threads (a Ray actor's): each
    answer() waits for its own result while the batch decodes every request in flight together.

    An `alone` request waits until nothing else is in flight and runs with nothing beside it (a unit suspected of
    killing its process is judged on its own).
    """

    def __init__(self, pipeline: Pipeline, rows: int) -> None:
        self.batch = DecodeBatch(pipeline, rows)
        self._waiting: deque[tuple[Request, GenerationSettings, bool, Future]] = deque()
        self._ready = threading.Condition()
        self._alone = False  # an alone request is in flight
        threading.Thread(target=self._run, name="decode-batch", daemon=True).start()

    def answer(self, request: Request, settings: GenerationSettings, alone: bool = False) -> GenerationResult:
        """The request's answer; its VlbatchError (or the step's that carried it) is raised here."""
        done: Future = Future()
        with self._ready:
            self._waiting.append((request, settings, alone, done))
            self._ready.notify()
        return done.result()

    def _admit(self) -> list[tuple[Request, GenerationSettings, bool, Future]]:
        """The waiting requests that may join now (FIFO: an alone request at the head joins an empty batch only)."""
        with self._ready:
            while not self._waiting and not len(self.batch):
                self._ready.wait()
            taken: list[tuple[Request, GenerationSettings, bool, Future]] = []
            while self._waiting and not self._alone and len(self.batch) + len(taken) < self.batch.rows:
                alone = self._waiting[0][2]
                if alone and (taken or len(self.batch)):
                    break
                taken.append(self._waiting.popleft())
                if alone:
                    self._alone = True
                    break
            return taken

    def _run(self) -> None:
        while True:
            for request, settings, _, done in self._admit():
                try:
                    self._deliver(self.batch.add(request, settings, done))
                except Exception as exc:  # this request's own failure: the others go on
                    done.set_exception(exc if isinstance(exc, VlbatchError) else _model_failed(exc))
            if len(self.batch):
                try:
                    self._deliver(self.batch.step())
                except Exception as exc:  # the step failed every answer it carried
                    error = exc if isinstance(exc, VlbatchError) else _model_failed(exc)
                    self._deliver(self.batch.fail_all(error))
            if not len(self.batch):
                self._alone = False

    @staticmethod
    def _deliver(finished: list[Finished]) -> None:
        for item in finished:
            if item.result is not None:
                item.tag.set_result(item.result)
            else:
                item.tag.set_exception(item.error)


def _model_failed(exc: Exception) -> VlbatchError:
    return VlbatchError(f"the model failed: {type(exc).__name__}: {exc}")
