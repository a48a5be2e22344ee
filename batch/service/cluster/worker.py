"""The head of `run --ray` / `watch --ray`: the local worker's spool, claims, database, reuse and sidecars, with
each unit the model must answer sent to the Ray actor pool instead of a local model.

Units are sent in job order, at most `cluster.in_flight_per_actor` per actor, and committed as they come back;
a second stop signal hands the job back with whatever is in flight dropped (nothing of it was committed), and a
later attempt of the run skips every unit already recorded.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

from batch.config import Config
from batch.errors import VlbatchError
from batch.infer.runtime.select import model_identity
from batch.service.cluster.answerer import UnitTask
from batch.service.cluster.pool import ActorPool, Done, NoActors
from batch.service.logs import event
from batch.service.spool import Spool
from batch.service.store import Store
from batch.service.worker import HandBack, Worker, _UnitRun

log = logging.getLogger("batch.service.cluster")


class RayWorker(Worker):
    def __init__(self, config: Config, store: Store, spool: Spool, model_id: str, address: str, force: bool) -> None:
        super().__init__(config, store, spool, self._no_local_model, model_id, force)
        self.address = address
        self._pool: ActorPool | None = None

    @classmethod
    def from_config(cls, config: Config, force: bool = False, address: str | None = None) -> RayWorker:
        if config.model.dir is None:
            raise VlbatchError("no model: set model.dir in config.yaml, $VLBATCH_MODEL_DIR or --model")
        spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()
        store = Store(config.spool.database, config.spool.database_timeout_seconds)
        return cls(config, store, spool, model_identity(config.model.dir), address or "auto", force)

    @staticmethod
    def _no_local_model() -> Any:
        raise AssertionError("a Ray head holds no model of its own")

    @property
    def pool(self) -> ActorPool:
        if self._pool is None:
            self._pool = ActorPool(
                self.config,
                self.address,
                lambda actor, **fields: self.store.record_actor(actor, head=self.name, **fields),
                stopping=lambda: self.abort_requested,
            )
            self._pool.wait_ready()
        return self._pool

    def watch(self) -> None:
        try:
            _ = self.pool  # start the actors before the first job arrives
        except NoActors as exc:  # waited out like any passing fault: each job asks for actors again
            event(log, "cluster.no_actors", logging.WARNING, reason=exc.strerror)
        super().watch()

    @property
    def pipeline(self) -> Any:  # watch() touches it to load the model early: the actors are that model
        return self.pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        super().close()

    def _run_units(self, job: Any, run_id: int, resume: bool) -> list[str]:
        run = _UnitRun(job, run_id, resume, job.units())
        pool = self.pool
        bar = tqdm(total=len(run.units), desc=job.id, unit="answer", disable=not sys.stderr.isatty(), file=sys.stderr)
        try:
            for unit in run.units:
                if self.abort_requested:
                    raise HandBack
                base = self._needs_answer(run, unit)
                if base is None:
                    bar.update()
                    continue
                while pool.full():
                    self._commit(run, pool.next_done(timeout=0.5), bar)
                    if self.abort_requested:
                        raise HandBack
                # the head's paths: the pool reads them (media: bytes) or maps them through path_map
                task = UnitTask(job.prompt, tuple(str(p) for p in unit), None, job.generation, job.media_settings)
                try:
                    pool.submit((unit, base), task)
                except VlbatchError as exc:  # a file the head cannot read to send as bytes
                    self._unit_failed(run, base, str(exc))
                    bar.update()
            while pool.busy():
                self._commit(run, pool.next_done(timeout=0.5), bar)
                if self.abort_requested:
                    raise HandBack
        except BaseException:  # a hand-back or a fault: what is in flight belongs to this run alone, so it goes
            pool.cancel()
            raise
        finally:
            bar.close()
        return run.failures

    def _commit(self, run: _UnitRun, done: Done | None, bar: tqdm) -> None:
        if done is None:
            return
        unit, base = done.tag
        answer = done.answer
        if answer.result is None:
            self._unit_failed(run, base, answer.error or "no answer")
            self.store.record_actor(done.actor, last_error=answer.error)
        else:
            self._record_answer(run, unit, base, answer.result, answer.backend, answer.node)
            t = answer.result.timings
            self.store.actor_answered(done.actor, answer.result.output_tokens, t.decode_ms)
        bar.update()
