"""Units answered away from the worker's own model: sent to a pool (Ray actors, a model server's parallel slots),
up to what it holds at once, and committed as their answers come back, in whatever order.

A job's units are sent in order; the pool says when it is full (backpressure). A pause, a cancel or a stop signal
is checked between units and while waiting; a second stop signal, or a fault, drops what is in flight (nothing of
it was committed), and a later attempt of the run skips every unit already recorded.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from tqdm import tqdm

from batch.errors import VlbatchError
from batch.service.store.records import failure_class
from batch.service.worker.units import Done, UnitTask
from batch.service.worker.worker import HandBack, Worker, _UnitRun


class UnitsPool(Protocol):
    def full(self) -> bool: ...

    def busy(self) -> bool: ...

    def submit(self, tag: Any, task: UnitTask) -> None: ...

    def next_done(self, timeout: float = 1.0) -> Done | None: ...

    def cancel(self) -> None: ...


class PooledWorker(Worker):
    """A worker whose units go to `_units_pool()`; `_answered(done)` is told of each answer after it is recorded."""

    def _units_pool(self) -> UnitsPool:
        raise NotImplementedError

    def _answered(self, done: Done) -> None:
        """After an answer (or a failed unit) is recorded: what the answerer's own records need."""

    def _run_units(self, job: Any, run_id: int, resume: bool) -> _UnitRun:
        run = _UnitRun(job, run_id, resume, job.units())
        pool = self._units_pool()
        bar = tqdm(total=len(run.units), desc=job.id, unit="answer", disable=not sys.stderr.isatty(), file=sys.stderr)
        try:
            for unit in run.units:
                if self.abort_requested:
                    raise HandBack
                self._between_units(job)  # a pause, a cancel (what is in flight is dropped below)
                base = self._needs_answer(run, unit)
                if base is None:
                    bar.update()
                    continue
                while pool.full():
                    self._commit(run, pool.next_done(timeout=0.5), bar)
                    if self.abort_requested:
                        raise HandBack
                    self._check_cancel(job.id, throttled=True)
                # the head's paths: the pool reads them (media: bytes) or maps them through path_map
                task = UnitTask(job.prompt, tuple(str(p) for p in unit), None, job.generation, job.media_settings)
                try:
                    pool.submit((unit, base), task)
                except VlbatchError as exc:  # a file the head cannot read to send as bytes
                    self._unit_failed(run, base, str(exc), failure_class(exc))
                    bar.update()
            while pool.busy():
                self._commit(run, pool.next_done(timeout=0.5), bar)
                if self.abort_requested:
                    raise HandBack
                self._check_cancel(job.id, throttled=True)
        except BaseException:  # a hand-back or a fault: what is in flight belongs to this run alone, so it goes
            pool.cancel()
            raise
        finally:
            bar.close()
        return run

    def _commit(self, run: _UnitRun, done: Done | None, bar: tqdm) -> None:
        if done is None:
            return
        unit, base = done.tag
        answer = done.answer
        if answer.result is None:
            self._unit_failed(run, base, answer.error or "no answer", answer.error_class)
        else:
            self._record_answer(run, unit, base, answer.result, answer.backend, answer.node)
        self._answered(done)
        bar.update()
