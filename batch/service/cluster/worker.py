"""The head of `run --ray` / `watch --ray`: the local worker's spool, claims, database, reuse and sidecars, with
each unit the model must answer sent to the Ray actor pool instead of a local model.

The head runs several jobs at once, one per lane (a thread with its own database connection), as many lanes as
the pool holds units (actors x `units_per_actor`: each actor's batch and one more), so that one-image jobs keep
every actor busy too.
Each job's units are sent in order and committed as they come back; a second stop signal hands every running
job back with whatever is in flight dropped (nothing of it was committed), and a later attempt of a run skips
every unit already recorded.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from batch.config import Config
from batch.errors import VlbatchError
from batch.infer.runtime.select import model_identity
from batch.service.cluster.pool import ActorPool, NoActors, PoolLane, units_per_actor
from batch.service.logs import event
from batch.service.spool.folder_watch import FolderWatch
from batch.service.spool.spool import Spool
from batch.service.store.store import Store
from batch.service.worker.pooled import PooledWorker
from batch.service.worker.units import Done
from batch.service.worker.worker import Outcome

log = logging.getLogger("batch.service.cluster")
MAX_LANES = 64  # jobs one head runs at once, whatever the cluster holds (each lane: a thread, a connection)


class RayWorker(PooledWorker):
    def __init__(
        self,
        config: Config,
        store: Store,
        spool: Spool,
        model_id: str,
        address: str,
        force: bool,
        retry_failed: bool = False,
    ) -> None:
        super().__init__(config, store, spool, self._no_local_model, model_id, force, retry_failed)
        self.address = address
        self._pool: ActorPool | None = None
        self._lock = threading.Lock()
        self._inboxes: dict[int, list[Done]] = {}
        self._lanes = threading.local()

    @classmethod
    def from_config(
        cls, config: Config, force: bool = False, address: str | None = None, retry_failed: bool = False
    ) -> RayWorker:
        if config.model.dir is None:
            raise VlbatchError("no model: set model.dir in config.yaml, $VLBATCH_MODEL_DIR or --model")
        spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()
        store = Store(config.spool.database, config.spool.database_timeout_seconds, spool=spool.root)
        return cls(config, store, spool, model_identity(config.model.dir), address or "auto", force, retry_failed)

    @staticmethod
    def _no_local_model() -> Any:
        raise AssertionError("a Ray head holds no model of its own")

    @property
    def pool(self) -> ActorPool:
        if self._pool is None:
            self._pool = ActorPool(
                self.config,
                self.address,
                self._record_actor,
                stopping=lambda: self.abort_requested,
            )
            self._pool.wait_ready()
        return self._pool

    def _record_actor(self, actor: str, **fields: Any) -> None:
        self._lane().store.record_actor(actor, head=self.name, **fields)

    def start_heartbeat(self, command: str) -> None:
        self.heartbeat.holds_actors = True
        super().start_heartbeat(f"{command} --ray")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        super().close()

    # several jobs at once -------------------------------------------------------------------------
    def _lane_limit(self) -> int:
        """How many jobs may run at once: as many as the pool holds units; one while no actor can start."""
        try:
            return max(1, self.pool.wanted * units_per_actor(self.config))
        except NoActors as exc:  # the first job asks again, and is handed back if there is still none
            event(log, "cluster.no_actors", logging.WARNING, reason=exc.strerror)
            return 1

    def _drain_inbox(self) -> list[Outcome]:
        return self._run_lanes(until_empty=True)

    def watch(self) -> None:
        self.start_heartbeat("watch")
        observer = self._observer()
        observer.start()
        event(
            log,
            "worker.watching",
            inbox=self.spool.inbox,
            standing=self.standing.dir,
            worker=self.name,
            ray=self.address,
        )
        try:
            self._run_lanes(until_empty=False, folders=FolderWatch(observer, self.wake))
        finally:
            observer.stop()
            observer.join()
        event(log, "worker.stopped", worker=self.name)

    def _run_lanes(self, until_empty: bool, folders: FolderWatch | None = None) -> list[Outcome]:
        """Claim ready jobs into free lanes until the inbox is empty (`run`) or a stop signal (`watch`, `run`).

        With `folders` (`watch`), the standing jobs' passes run in this thread whenever no lane is busy."""
        outcomes: list[Outcome] = []
        running: dict[Future[Outcome | None], Path] = {}
        bar = tqdm(desc="jobs", unit="job", total=0, disable=not sys.stderr.isatty(), file=sys.stderr)
        lanes = self._lane_limit()
        with ThreadPoolExecutor(MAX_LANES, thread_name_prefix="lane") as executor:
            while not (self.stop_requested and not running):
                next_ready = None
                if not self.stop_requested and not self.control.paused:  # vlbatch pause: no new job
                    lanes = lanes if self._pool is not None else self._lane_limit()
                    try:
                        self._check_places()
                        self.recover()
                        ready, next_ready = self.spool.pending()
                    except Exception as exc:
                        self._wait_out(exc, give_up=until_empty)
                        continue
                    for path in [p for p in ready if p not in running.values()][: min(lanes, MAX_LANES) - len(running)]:
                        running[executor.submit(self._lane_take, path)] = path
                    bar.total = max(bar.total, bar.n + len(running))
                if not running:
                    if self.control.paused:
                        self._hold_while_paused()
                        continue
                    if until_empty and next_ready is None:
                        break
                    pause = self._pause(next_ready)
                    if folders is not None and not self.stop_requested and not next_ready:
                        try:
                            standing_next = self._standing_cycle(folders)
                        except Exception as exc:
                            self._wait_out(exc, give_up=False)
                            continue
                        if standing_next is not None:
                            pause = min(pause, max(0.02, standing_next - time.monotonic()))
                    self.wake.wait(pause)
                    self.wake.clear()
                    continue
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    del running[future]
                    try:
                        outcome = future.result()
                    except Exception as exc:  # the lane handed its job back: a fault of the machine
                        self._wait_out(exc, give_up=until_empty)
                        continue
                    self._backoff.reset()
                    self._failing_since = None
                    if outcome:
                        outcomes.append(outcome)
                        bar.update(1)
        bar.close()
        return outcomes

    def _pause(self, next_ready: float | None) -> float:
        timeout = self.config.spool.rescan_seconds
        return timeout if next_ready is None else min(timeout, max(0.02, next_ready - time.time()))

    def _lane(self) -> RayWorker:
        """The job this thread runs (its own database connection), or the head itself in the head's thread."""
        return getattr(self._lanes, "worker", None) or self

    def _lane_take(self, path: Path) -> Outcome | None:
        """One job in a lane thread, with a database connection of its own for its whole run."""
        lane = _Lane(self)
        self._lanes.worker = lane
        try:
            return lane.take(path)
        finally:
            self._lanes.worker = None
            lane.close()

    # one job's units ------------------------------------------------------------------------------
    def _check_preempt(self, job: Any) -> None:
        """Never: a head runs several jobs at once, one per lane, so a job of higher priority has a lane of its own
        as soon as one is free."""

    def _units_pool(self) -> Any:
        return PoolLane(self.pool, self._lock, self._inboxes, id(self))

    def _answered(self, done: Done) -> None:
        """The actors table: the actor's answers and its share of decode time, or its last error."""
        answer = done.answer
        if answer.result is None:
            self.store.record_actor(done.actor, last_error=answer.error)
        else:
            t = answer.result.timings  # its share of the actor's decode steps: a batch's steps are counted once
            self.store.actor_answered(done.actor, answer.result.output_tokens, t.decode_share_ms)


class _Lane(RayWorker):
    """A job running beside others on the same head: its own database connection and claim, the head's pool,
    stop signals and name."""

    def __init__(self, head: RayWorker) -> None:
        self.head = head
        store = Store(head.config.spool.database, head.config.spool.database_timeout_seconds)
        super().__init__(head.config, store, head.spool, head.model_id, head.address, head.force, head.retry_failed)
        self.name = head.name
        self.heartbeat = head.heartbeat  # one row for the head and all its lanes
        self.control = head.control  # vlbatch pause holds every lane

    # the head's state, read through: set once in Worker.__init__, ignored here
    stop_requested = property(lambda self: self.head.stop_requested, lambda self, value: None)
    abort_requested = property(lambda self: self.head.abort_requested, lambda self, value: None)

    @property
    def pool(self) -> ActorPool:
        return self.head.pool

    def _units_pool(self) -> Any:
        return PoolLane(self.head.pool, self.head._lock, self.head._inboxes, id(self))
