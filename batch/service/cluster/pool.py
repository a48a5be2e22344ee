"""The head's pool of Ray actors: placing them, feeding them with backpressure, taking their answers back in
completion order, and replacing an actor that dies (its unit goes to another actor; twice dead, the unit fails).

Ray is the engine: placement by resources (`cluster.resource`, `cluster.cpus_per_actor`), the object store for
media sent as bytes, actor death detection. The head keeps what must not be shared: the database and the spool.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from batch.config import Config
from batch.infer.safe_open import open_media
from batch.service.cluster.answerer import NodeInfo, UnitAnswerer
from batch.service.logs import event
from batch.service.worker.units import Done, UnitAnswer, UnitTask

log = logging.getLogger("batch.service.cluster")
DEATHS_PER_UNIT = 2  # a unit whose actor died this many times is failed, not sent again


class NoActors(OSError):
    """No actor can answer now (none started, all dead): a passing fault, the job is handed back and retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EAGAIN, reason)


@dataclass
class _Actor:
    handle: Any
    name: str
    info: NodeInfo | None = None
    ready_ref: Any = None
    asked_at: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    alone: bool = False  # it holds a unit that runs with nothing beside it: nothing else is sent to it
    running: frozenset[int] = frozenset()  # once dead: the units it was answering (the others only waited)
    last_sent: int = 0  # the send order of its latest unit

    @property
    def rows(self) -> int:
        """Answers its model decodes together (one until it has said)."""
        return self.info.rows if self.info is not None else 1


@dataclass
class _Sent:
    tag: Any  # what the caller needs back with the answer
    task: UnitTask
    actor: _Actor | None  # None while it waits for an actor
    deaths: int = 0
    seq: int = 0  # send order: an actor answers its units in this order


def units_per_actor(config: Config, rows: int | None = None) -> int:
    """Units the head keeps at each actor: its batch (`rows`, by default model.batch) and one more decoding its
    media, or cluster.in_flight_per_actor if that is more."""
    return max(config.cluster.in_flight_per_actor, (config.model.batch if rows is None else rows) + 1)


class ActorPool:
    """`submit` units, `next_done` their answers; `full` says when to stop submitting (backpressure)."""

    def __init__(
        self,
        config: Config,
        address: str,
        on_actor: Callable[..., None],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.ray = ray
        self.config = config
        self.cluster = config.cluster
        self.on_actor = on_actor  # on_actor(name, **fields): the `actors` table
        self.stopping = stopping  # a wait for actors ends early when this turns true (a second stop signal)
        self._started_ray = False
        self.actors: list[_Actor] = []
        self.sent: dict[Any, _Sent] = {}  # object ref of answer() -> what was sent
        self.waiting: deque[_Sent] = deque()  # submitted, no actor free for it yet (an alone unit waits for one idle)
        self._serial = 0
        self._seq = 0
        if not ray.is_initialized():
            self._join(address)
        try:
            self.wanted = self._actor_count()
        except NoActors:
            self.close()
            raise
        remote = ray.remote(UnitAnswerer)
        resources = {self.cluster.resource: 1} if self.cluster.resource else None
        # a threaded actor: each unit it holds runs in a thread of its own (media decoding), all joining its batch
        self._remote = remote.options(
            num_cpus=self.cluster.cpus_per_actor,
            resources=resources,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=units_per_actor(config),
        )
        for _ in range(self.wanted):
            self._start_actor()
        event(log, "cluster.started", address=address, actors=self.wanted, resource=self.cluster.resource)

    def _join(self, address: str) -> None:
        """Join (or, for "local", start) the cluster; a cluster that cannot be reached is a passing fault."""
        # ray.init sets its own SIGTERM handler (sys.exit): the head's stop signals must stay the worker's
        main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            ray.init(
                address=address,  # "local" starts a cluster of its own, never joins one found on this host
                namespace="vlbatch",
                log_to_driver=False,
                logging_level=logging.WARNING,
                include_dashboard=False if address == "local" else None,
            )
        except Exception as exc:
            raise NoActors(f"cannot join the Ray cluster at {address}: {_reason(exc)}") from exc
        finally:
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
        self._started_ray = True

    # placing actors -----------------------------------------------------------------------------
    def _actor_count(self) -> int:
        if self.cluster.actors:
            return self.cluster.actors
        total = self.ray.cluster_resources()
        if self.cluster.resource:
            count = int(total.get(self.cluster.resource, 0))
            if not count:  # the boards may not have joined yet: handed back and tried again
                raise NoActors(
                    f"the Ray cluster has no {self.cluster.resource!r} resource (cluster.resource); start each board "
                    f"with ray start --resources='{{\"{self.cluster.resource}\": 1}}'"
                )
            return count
        return max(1, int(total.get("CPU", 1)) // self.cluster.cpus_per_actor)

    def _start_actor(self) -> None:
        self._serial += 1
        # the head's pid too: two heads on one spool (spool.max_workers) may start actors in the same second
        name = f"{self.config.spool.dir.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self._serial}"
        model, media = self.config.model, self.config.media
        handle = self._remote.remote(model, media, self.cluster, self.cluster.cpus_per_actor)
        actor = _Actor(handle, name)
        actor.ready_ref = handle.info.remote()
        self.actors.append(actor)
        self.on_actor(name, state="starting")

    def _settle_starting(self, timeout: float) -> None:
        """Mark actors ready (or failed: they are excluded, with the reason recorded by node)."""
        starting = {a.ready_ref: a for a in self.actors if a.info is None}
        if not starting:
            return
        ready, _ = self.ray.wait(list(starting), num_returns=len(starting), timeout=timeout)
        for ref in ready:
            actor = starting[ref]
            try:
                info = self.ray.get(ref)
            except Exception as exc:
                self._drop(actor, f"could not start: {_reason(exc)}")
                continue
            self.on_actor(actor.name, node=info.node, node_ip=info.ip, pid=info.pid, backend=info.backend)
            if info.error:  # alive, but without a model (a wrong path, no NPU): recorded with its node, left out
                self._drop(actor, f"could not start: {info.error}")
                continue
            actor.info = info
            actor.ready_ref = None
            self.on_actor(actor.name, state="ready")
            event(log, "cluster.actor_ready", actor=actor.name, node=actor.info.node, backend=actor.info.backend)
        for actor in [a for a in self.actors if a.info is None]:
            if time.monotonic() - actor.asked_at > self.cluster.actor_start_seconds:
                limit = self.cluster.actor_start_seconds
                self._drop(actor, f"not ready after {limit:g} s (cluster.actor_start_seconds)")

    def _drop(self, actor: _Actor, reason: str) -> None:
        self.actors.remove(actor)
        self.on_actor(actor.name, state="gone", last_error=reason)
        event(log, "cluster.actor_gone", logging.WARNING, actor=actor.name, reason=reason)
        try:
            self.ray.kill(actor.handle)
        except Exception:
            pass

    @property
    def ready(self) -> list[_Actor]:
        return [a for a in self.actors if a.info is not None]

    def wait_ready(self) -> None:
        """Until at least one actor is ready; NoActors when none can start."""
        if not self.actors:  # all failed or died before: ask again (the fault may be gone, a node may be back)
            for _ in range(self.wanted):
                self._start_actor()
        deadline = time.monotonic() + self.cluster.actor_start_seconds + 1
        while not self.ready:
            if self.stopping():
                raise NoActors("stopped while waiting for an actor")
            if not self.actors:
                raise NoActors("no Ray actor could start (see `vlbatch status` for each actor's reason)")
            if time.monotonic() > deadline:
                raise NoActors("no Ray actor became ready in time")
            self._settle_starting(timeout=1.0)

    # units --------------------------------------------------------------------------------------
    def _capacity(self, actor: _Actor) -> int:
        """Units an actor holds at once, by the batch it reported."""
        return units_per_actor(self.config, actor.rows)

    def full(self) -> bool:
        capacity = sum(self._capacity(a) for a in self.ready) or self.cluster.in_flight_per_actor
        return len(self.sent) + len(self.waiting) >= capacity

    def busy(self) -> bool:
        return bool(self.sent or self.waiting)

    def submit(self, tag: Any, task: UnitTask) -> None:
        self.wait_ready()
        self.waiting.append(_Sent(tag, task, None))
        self._dispatch()

    def _dispatch(self) -> None:
        """Send waiting units in order while an actor can take them: an alone unit to an idle actor only, and
        nothing else to an actor that holds one; while an alone unit waits, the actors drain for it."""
        while self.waiting:
            sent = self.waiting[0]
            if sent.task.alone:
                idle = [a for a in self.ready if a.in_flight == 0]
                if not idle:
                    return
                actor = min(idle, key=lambda a: a.last_sent)
            else:
                free = [a for a in self.ready if not a.alone and a.in_flight < self._capacity(a)]
                if not free:
                    return
                actor = min(free, key=lambda a: (a.in_flight, a.last_sent))  # ties: the one idle longest
            self.waiting.popleft()
            sent.actor = actor
            self._send(sent)

    def _send(self, sent: _Sent) -> None:
        actor = sent.actor
        task = sent.task  # the head's paths: read here for bytes, mapped for an actor that reads them itself
        if task.files is None and self._wants_bytes(actor):
            task = _with_bytes(task)
            sent.task = task  # a unit sent again keeps its bytes
        if task.files is None:
            task = replace(task, paths=tuple(self.cluster.node_path(p) for p in task.paths))
        ref = actor.handle.answer.remote(task)
        self._seq += 1
        sent.seq = actor.last_sent = self._seq
        actor.in_flight += 1
        actor.alone = actor.alone or task.alone
        self.sent[ref] = sent

    def _wants_bytes(self, actor: _Actor) -> bool:
        info = actor.info
        nodes = set(self.cluster.bytes_nodes)
        return self.cluster.media == "bytes" or (info is not None and bool({info.node, info.ip} & nodes))

    def next_done(self, timeout: float = 1.0) -> Done | None:
        """One finished unit (in completion order), or None after `timeout`; an actor found dead is replaced and
        its units sent again (a unit that took two actors down fails)."""
        self._settle_starting(timeout=0)
        if self.waiting and not self.sent:
            self.wait_ready()
        self._dispatch()
        if not self.sent:
            return None
        ready, _ = self.ray.wait(list(self.sent), num_returns=1, timeout=timeout)
        if not ready:
            return None
        ref = ready[0]
        sent = self.sent.pop(ref)
        self._returned(sent)
        try:
            return Done(sent.tag, self.ray.get(ref), sent.actor.name)
        except self.ray.exceptions.RayActorError as exc:
            return self._actor_died(sent, exc)
        except self.ray.exceptions.RayTaskError as exc:  # a bug in the actor: this unit fails, the actor lives
            failed = UnitAnswer(None, f"the actor failed: {_reason(exc)}", _node(sent.actor), "")
            return Done(sent.tag, failed, sent.actor.name)

    def _returned(self, sent: _Sent) -> None:
        actor = sent.actor
        actor.in_flight -= 1
        if sent.task.alone:
            actor.alone = False

    def _actor_died(self, sent: _Sent, exc: Exception) -> Done | None:
        actor = sent.actor
        if actor in self.actors:
            # an actor answers its oldest units together (its batch), or an alone unit with nothing beside it: those
            # were running when it died
            held = [s for s in self.sent.values() if s.actor is actor] + [sent]
            alone = [s.seq for s in held if s.task.alone]
            actor.running = frozenset(alone[:1] or sorted(s.seq for s in held)[: actor.rows])
            self._drop(actor, f"died: {_reason(exc)}")
            self._start_actor()  # Ray places the replacement wherever the resources are
        if sent.seq in actor.running:  # the units only queued behind them are sent again without blame
            sent.deaths += 1
        names = ", ".join(sent.task.paths)
        if sent.deaths >= DEATHS_PER_UNIT:
            error = f"{names}: the actor process died {sent.deaths} times while answering it; skipped"
            return Done(sent.tag, UnitAnswer(None, error, _node(actor), ""), actor.name)
        event(log, "cluster.unit_resent", logging.WARNING, file=names, reason="its actor died")
        # the other units the dead actor held come back the same way, each from its own failed ref; one it was
        # answering goes again alone, so that a second death is its own
        if sent.deaths:
            sent.task = replace(sent.task, alone=True)
        self.waiting.appendleft(sent)
        self.wait_ready()
        self._dispatch()
        return None

    def cancel(self, which: Callable[[Any], bool] = lambda tag: True) -> None:
        """Forget the units in flight whose tag `which` picks (a hand-back): nothing of theirs is committed."""
        self.waiting = deque(sent for sent in self.waiting if not which(sent.tag))
        for ref, sent in list(self.sent.items()):
            if not which(sent.tag):
                continue
            self._returned(sent)
            del self.sent[ref]
            try:
                self.ray.cancel(ref)
            except Exception:
                pass

    def close(self) -> None:
        self.cancel()
        for actor in list(self.actors):
            self.on_actor(actor.name, state="stopped")
            try:
                self.ray.kill(actor.handle)
            except Exception:
                pass
        self.actors.clear()
        if self._started_ray:
            self.ray.shutdown()


class PoolLane:
    """One job's view of a pool several jobs share (each in its own thread): the same calls as ActorPool, with
    answers routed to the job that sent the unit. Every call into the pool holds one lock."""

    def __init__(self, pool: ActorPool, lock: threading.Lock, inboxes: dict[int, list[Done]], lane: int) -> None:
        self.pool, self.lock, self.inboxes, self.lane = pool, lock, inboxes, lane
        self.outstanding = 0

    def full(self) -> bool:
        with self.lock:
            return self.pool.full()

    def busy(self) -> bool:
        return self.outstanding > 0

    def submit(self, tag: Any, task: UnitTask) -> None:
        with self.lock:
            self.pool.submit((self.lane, tag), task)
        self.outstanding += 1

    def next_done(self, timeout: float = 1.0) -> Done | None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                mine = self.inboxes.setdefault(self.lane, [])
                if not mine:
                    done = self.pool.next_done(timeout=0.02)
                    if done is not None:
                        lane, tag = done.tag
                        self.inboxes.setdefault(lane, []).append(replace(done, tag=tag))
                if mine:
                    self.outstanding -= 1
                    return mine.pop(0)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)  # let the other jobs' threads take their answers

    def cancel(self) -> None:
        with self.lock:
            self.pool.cancel(lambda tag: tag[0] == self.lane)
            self.inboxes.pop(self.lane, None)
        self.outstanding = 0


def _with_bytes(task: UnitTask) -> UnitTask:
    files = []
    for path in task.paths:
        with open_media(path) as handle:
            files.append((path, handle.read()))
    return replace(task, files=tuple(files))


def _node(actor: _Actor) -> str:
    return actor.info.node if actor.info else "?"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
