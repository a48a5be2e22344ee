"""The worker: claims jobs from the spool, answers each media unit through the pipeline, records it all.

`drain()` is `vlbatch run` (empty the inbox, then one pass of every standing job, then return); `watch()` is
`vlbatch watch` (watchdog events on the inbox, the standing folder and the standing jobs' media folders wake
the loop; the loop always rescans by itself too, so a lost or doubled event changes nothing).
A job is committed to the database before its file moves to done/ or failed/; a crash in between is
reconciled from the claim name recorded with the job.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from batch.config import Config
from batch.errors import MediaError, VlbatchError
from batch.infer.batching import DecodeBatch, Finished, batch_limit
from batch.infer.decode import IsolatedDecoder
from batch.infer.generate import GenerationResult
from batch.infer.pipeline import Pipeline, Request
from batch.infer.runtime.select import model_identity
from batch.infer.settings import answer_settings
from batch.service.faults import (
    Backoff,
    DatabaseCorrupt,
    InfrastructureError,
    describe,
    is_corrupt_database,
    is_passing,
)
from batch.service.logs import event
from batch.service.spool.folder_watch import FolderWatch
from batch.service.spool.jobfile import Job, JobRejected, parse_job
from batch.service.spool.settle import SettleTracker
from batch.service.spool.spool import Claim, Priorities, Spool
from batch.service.spool.standing import (
    CLAIM_PREFIX,
    InputSpecs,
    PassPlan,
    StandingFolder,
    covers,
    input_specs,
    plan_pass,
    vanished_paths,
)
from batch.service.spool.states import CLAIM_LOST, HANDED_BACK, JobState, RetryPolicy
from batch.service.store.paths import decode_path, encode_path, paths_json
from batch.service.store.records import answer_row, cache_key, failure_class, to_json
from batch.service.store.store import ClaimLost, DatabaseReplaced, JobIdBusy, Store, file_sha256, utc_now, worker_name
from batch.service.worker import sidecars
from batch.service.worker.control import (
    CANCEL_POLL_SECONDS,
    PREEMPT_POLL_SECONDS,
    PREEMPT_SHARE,
    Every,
    JobCancelled,
    PauseSwitch,
    PreEmpted,
)
from batch.service.worker.heartbeat import BUSY, IDLE, PAUSED, STOPPING, WAITING, Heartbeat
from batch.service.worker.slots import WorkerSlots

log = logging.getLogger("batch.service.worker.worker")
NODE = os.uname().nodename  # recorded with each answer: several machines may answer one spool
CRON_WAIT_SECONDS = 60.0  # `vlbatch run` waits this long at most for media files still being written


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:  # gone meanwhile
        return None


def _signature(path: Path) -> tuple[int, int, int] | None:
    """A file's size, mtime and inode: what changes when it is edited or replaced (None once it is gone)."""
    info = _stat(path)
    return None if info is None else (info.st_size, info.st_mtime_ns, info.st_ino)


class HandBack(Exception):
    """Stop the current job now and return it to the inbox (a second stop signal, or a stop signal while paused)."""


# an Outcome's state for a job handed back to make way for an inbox job of higher priority (it runs again later)
PREEMPTED = "preempted"


@dataclass(frozen=True)
class Outcome:
    job_id: str
    state: str  # a finished JobState's value, HANDED_BACK or PREEMPTED
    reason: str | None = None
    new_problems: int = 0  # failures not met before (the same unit failing the same way again is not news)


@dataclass
class _UnitRun:
    """One run of a job through its units: what is decoded ahead, and what failed."""

    job: Job
    run_id: int
    resume: bool  # a later attempt of the same run: units it already holds are skipped
    units: list[tuple[Path, ...]]
    ahead: dict[int, Future[Request]] = field(default_factory=dict)
    rows: int = 1  # answers to decode together (model.batch; 1 after a death with a batch in flight)
    batch: DecodeBatch | None = None  # the answers being decoded together (a Ray head's units are at its actors)
    died_with: frozenset[str] = frozenset()  # the stored paths in flight when the job's last worker died
    failures: list[str] = field(default_factory=list)
    new_failures: int = 0  # of those, the ones not met before (see Store.failed_before)


class Worker:
    def __init__(
        self,
        config: Config,
        store: Store,
        spool: Spool,
        open_pipeline: Callable[[], Pipeline],
        model_id: str,
        force: bool = False,
        retry_failed: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self._open_pipeline = open_pipeline
        self._pipeline: Pipeline | None = None
        self.model_id = model_id
        self.force = force
        self.retry_failed = retry_failed  # try again units that failed before with the same content and settings
        self.name = worker_name()
        self.stop_requested = False  # first signal: finish the current job, then stop
        self.abort_requested = False  # second signal: hand the current job back now
        self.wake = threading.Event()
        self.policy = RetryPolicy(max_attempts=config.spool.max_attempts, give_up_s=config.spool.give_up_seconds)
        self._backoff = Backoff(self.policy.first_backoff_s, self.policy.max_backoff_s)
        self._failing_since: float | None = None
        self._job_id: str | None = None  # the job being processed, for a hand-back after a fault
        self.slots = WorkerSlots(spool.root, model_id, config.spool.max_workers)
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.standing = StandingFolder(spool.root)
        self._settle = SettleTracker(config.spool.settle_seconds)
        # standing job -> (its files still being written, when to look again)
        self._standing_waiting: dict[Path, tuple[set[Path], float | None]] = {}
        self._standing_due: dict[Path, float] = {}  # standing job -> when its next full pass is due (watch)
        self._standing_seen: dict[Path, tuple[int, int, int] | None] = {}  # its file as that pass read it
        beat, timeout = config.spool.heartbeat_seconds, config.spool.database_timeout_seconds
        # the `workers` row: started by drain() or watch(), stopped by close()
        self.heartbeat = Heartbeat(store.path, "run", model_id, beat, timeout, self.name)
        self._beating = False
        # operator control (control.py): pause/resume from the heartbeat, cancel and priority per unit
        self.control = PauseSwitch(self.wake, self.name)
        self.heartbeat.on_request = self.control.on_request
        self._cancel_poll = Every(CANCEL_POLL_SECONDS)
        self._preempt_poll = Every(PREEMPT_POLL_SECONDS)
        self._standing_priorities = Priorities()

    @classmethod
    def from_config(cls, config: Config, force: bool = False, retry_failed: bool = False) -> Worker:
        model = config.model
        if model.dir is None:
            raise VlbatchError("no model: set model.dir in config.yaml, $VLBATCH_MODEL_DIR or --model")
        spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()

        def open_pipeline() -> Pipeline:
            return Pipeline.open(
                model.dir,
                model.backend,
                model.hf_dir,
                model.threads,
                config.media,
                decoder=IsolatedDecoder(),
                providers=model.providers,
                device_id=model.device_id,
                npu_io=model.npu_io,
            )

        return cls(
            config,
            Store(config.spool.database, config.spool.database_timeout_seconds, spool=spool.root),
            spool,
            open_pipeline,
            model_identity(model.dir),
            force,
            retry_failed,
        )

    def answer_model_id(self) -> str:
        """The model identity answers are stored and reused under (a model server's: asked of it)."""
        return self.model_id

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            started = time.perf_counter()
            self._pipeline = self._open_pipeline()
            backend = self._pipeline.backend
            rows = min(self.config.model.batch, backend.max_rows)
            event(log, "model.loaded", model=self.model_id, ms=(time.perf_counter() - started) * 1e3, batch=rows)
            if rows < self.config.model.batch:
                event(log, "model.one_at_a_time", logging.WARNING, model=self.model_id, reason=batch_limit(backend))
        return self._pipeline

    def close(self) -> None:
        if self._beating:
            self.heartbeat.stop()
            self._beating = False
        self.slots.release()
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        if self._pipeline is not None:
            self._pipeline.close()  # also stops the decoding child, which ends a decode still running
        self.store.close()

    # signals ------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: Any) -> None:
            if self.stop_requested:
                self.abort_requested = True
            self.stop_requested = True
            self.heartbeat.set_state(STOPPING)
            self.wake.set()
            event(log, "worker.signal", signal=signal.Signals(signum).name, hand_back=self.abort_requested)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # loops --------------------------------------------------------------------------------------
    def start_heartbeat(self, command: str) -> None:
        """Report this worker in the `workers` table from now until close() (`vlbatch status` lists it)."""
        if not self._beating:
            self.heartbeat.command = command
            self.heartbeat.start()
            self._beating = True

    def drain(self) -> list[Outcome]:
        """Run every job in the inbox, waiting for files still being written, then a pass of every standing job."""
        self.start_heartbeat("run")
        outcomes = self._drain_inbox()
        passed: set[Path] = set()  # standing jobs whose pass is over
        while not self.stop_requested:
            try:
                passes = self.standing_passes(passed)
            except Exception as exc:
                self._wait_out(exc, give_up=True)
                continue
            outcomes += [outcome for outcome in passes if outcome.state != PREEMPTED]
            if not any(outcome.state == PREEMPTED for outcome in passes):
                return outcomes
            outcomes += self._drain_inbox()  # the job of higher priority that stopped a pass; then the rest
        return outcomes

    def _drain_inbox(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        bar = tqdm(desc="jobs", unit="job", total=0, disable=not sys.stderr.isatty(), file=sys.stderr)
        while not self.stop_requested:
            if self.control.paused:
                self._hold_while_paused()
                continue
            try:
                ready, outcome, next_ready = self._cycle()
            except Exception as exc:
                self._wait_out(exc, give_up=True)
                continue
            if outcome and outcome.state != PREEMPTED:  # a pre-empted job runs again in this drain
                outcomes.append(outcome)
                bar.update(1)
            if ready:
                bar.total = max(bar.total, bar.n + ready - 1)  # the files still waiting behind the one taken
                bar.refresh()
                continue
            if next_ready is None:
                break
            time.sleep(max(0.05, next_ready - time.time()))
        bar.close()
        return outcomes

    def take_slot(self, wait: bool) -> bool:
        """Hold one of the spool.max_workers slots of this spool and model; `wait` until one is free (watch).

        DatabaseTooNew when a newer vlbatch migrated the database after this worker opened it: one that decided
        to migrate before the slot was taken (see Store.check_not_newer)."""
        if self.slots.take():
            self.store.check_not_newer()
            return True
        event(
            log,
            "worker.no_slot",
            slots=self.slots.count,
            reason="every worker slot for this spool and model is held by another vlbatch process (spool.max_workers)",
            waiting=wait,
        )
        if not wait:
            return False
        self.heartbeat.set_state(WAITING)  # listed by status while it waits (a heartbeat started by the caller)
        taken = self.slots.wait(lambda: self.stop_requested)
        if taken:
            self.store.check_not_newer()
            self.heartbeat.set_state(IDLE)
        return taken

    def watch(self) -> None:
        """Run jobs as they arrive until a stop signal; faults of the machine are waited out, never fatal."""
        self.start_heartbeat("watch")
        observer = self._observer()
        observer.start()
        folders = FolderWatch(observer, self.wake)
        event(log, "worker.watching", inbox=self.spool.inbox, standing=self.standing.dir, worker=self.name)
        try:
            if not self.stop_requested:  # a stop while it waited for a slot: no model loaded for nothing
                _ = self.pipeline  # load the model before the first job arrives
            while not self.stop_requested:
                if self.control.paused:  # vlbatch pause: no job and no standing pass until resumed
                    self._hold_while_paused()
                    continue
                try:
                    ready, _, next_ready = self._cycle()
                    if ready:
                        continue
                    standing_next = self._standing_cycle(folders)
                except Exception as exc:
                    self._wait_out(exc, give_up=False)
                    continue
                timeout = self.config.spool.rescan_seconds
                if next_ready is not None:
                    timeout = min(timeout, max(0.02, next_ready - time.time()))
                if standing_next is not None:
                    timeout = min(timeout, max(0.02, standing_next - time.monotonic()))
                self.wake.wait(timeout)
                self.wake.clear()
        finally:
            observer.stop()
            observer.join()
        event(log, "worker.stopped", worker=self.name)

    def _cycle(self) -> tuple[int, Outcome | None, float | None]:
        """One turn of either loop: settle abandoned claims, then take the oldest ready job.

        Returns how many job files were ready (the oldest was taken), its outcome, and when the next
        still-settling file is ready.
        """
        self._check_places()
        self.recover()
        ready, next_ready = self.spool.pending()
        outcome = self.take(ready[0]) if ready else None
        if ready or next_ready is None:  # a job taken, or nothing waiting: the faults are over
            self._backoff.reset()
            self._failing_since = None
        return len(ready), outcome, next_ready

    def _check_places(self) -> None:
        """The spool and the database are still the configured ones: a spool folder that is gone (an unmounted
        share) is waited for, never made again on the mount point; a database file deleted or replaced under the
        worker is reopened at its path (a new one made only where the path is empty, and said), so that no answer
        is ever committed into an unlinked file."""
        missing = [folder for folder in (self.spool.inbox, self.spool.work) if not folder.is_dir()]
        if missing:
            raise OSError(errno.ESTALE, f"{missing[0]}: the spool folder is gone (an unmounted share?); waiting for it")
        try:
            self.store.check_identity()
        except DatabaseReplaced as exc:
            self._reopen_store(exc.strerror or str(exc))

    def _reopen_store(self, reason: str) -> None:
        path = self.store.path
        if not path.parent.is_dir():
            raise OSError(errno.ESTALE, f"{path.parent}: the database folder is gone (an unmounted share?); waiting")
        # this worker passed the check for older workers when it started: the others running now are of its version
        store = Store(path, self.config.spool.database_timeout_seconds, check_older_workers=False)
        self.store.close()
        self.store = store
        event(log, "database.reopened", logging.WARNING, path=path, reason=reason, created=store.created)

    def _wait_out(self, exc: Exception, give_up: bool) -> None:
        """Log a fault and pause (capped exponential backoff); raise when it cannot or should not be waited out."""
        if is_corrupt_database(exc):
            raise DatabaseCorrupt(
                f"{self.store.path}: the database is damaged ({describe(exc)}); restore it from a backup or move it "
                "aside (a new one is created) before starting again"
            ) from exc
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if give_up and now - self._failing_since > self.policy.give_up_s:
            raise InfrastructureError(
                f"gave up after {now - self._failing_since:.0f} s of faults (spool.give_up_seconds); last: "
                f"{describe(exc)}"
            ) from exc
        delay = self._backoff.next_delay()
        passing = is_passing(exc, spool=True)  # what reaches here came from the spool or the database
        event(log, "worker.fault", logging.ERROR, error=describe(exc), passing=passing, retry_in_s=delay)
        if not passing:
            log.debug("%s", "".join(traceback.format_exception(exc)))
        self.wake.wait(delay)  # a stop signal ends the pause early
        self.wake.clear()

    def _observer(self) -> Any:
        from watchdog.events import (
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        wake = self.wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, _event: Any) -> None:
                wake.set()

        observer = PollingObserver(timeout=0.5) if self.config.spool.polling else Observer()
        # our own reads (a hash, the open-for-writing check) open files: those events would only wake us for nothing
        changes = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent]
        observer.schedule(Wake(), str(self.spool.inbox), recursive=False, event_filter=changes)
        observer.schedule(Wake(), str(self.standing.ensure().dir), recursive=False, event_filter=changes)
        return observer

    def _standing_cycle(self, folders: FolderWatch) -> float | None:
        """`watch`'s turn for standing jobs: a full pass of each job when due (first at start, then every
        rescan_seconds, or longer for a folder whose pass is slow), else targeted passes for the files that file
        events named or that were still being written. Returns when the next pass is due (time.monotonic)."""
        jobs = self._standing_priorities.ordered(self.standing.job_files())
        changed, full = folders.take()
        specs = self._follow_standing(jobs, folders)
        now = time.monotonic()
        for path in jobs:
            if self.stop_requested or self.control.paused or self.ready_inbox():  # the inbox goes first
                folders.put_back(changed, full)
                break
            waiting, retry_at = self._standing_waiting.get(path, (set(), None))
            targets = {p for p in changed if covers(specs[path], p)} if path in specs else set(changed)
            signature = _signature(path)
            edited = self._standing_seen.get(path) != signature  # a new or edited job file: a pass now
            if full or edited or self._standing_due.get(path, 0.0) <= now:
                self._standing_seen[path] = signature
                started = time.monotonic()
                outcome = self.standing_pass(path)
                took = time.monotonic() - started
                event(log, "standing.scanned", job=path.name, ms=took * 1e3, **folders.counts())
                # a slow full pass (a very large folder) runs less often: at most about 5% of the time
                self._standing_due[path] = time.monotonic() + max(self.config.spool.rescan_seconds, 20 * took)
                if outcome is not None and outcome.state == PREEMPTED:  # goes on once the inbox is served
                    self._standing_due[path] = 0.0
            elif targets or (waiting and retry_at is not None and retry_at <= now):
                self.standing_pass(path, targets=targets | waiting)
        for path in list(self._standing_due):
            if path not in jobs:
                del self._standing_due[path]
                self._standing_waiting.pop(path, None)
                self._standing_seen.pop(path, None)
        retries = [r for w, r in self._standing_waiting.values() if w and r is not None]
        return min([*self._standing_due.values(), *retries], default=None)

    def _follow_standing(self, jobs: list[Path], folders: FolderWatch) -> dict[Path, InputSpecs]:
        """Each standing job's inputs, with their folders watched (never with spool.polling: rescans do it)."""
        specs = {}
        for path in jobs:
            try:
                job = self._parse_standing(path, resolve_media=False)
            except (JobRejected, OSError):
                continue
            specs[path] = input_specs(job.inputs, self.standing.dir)
        if not self.config.spool.polling:
            folders.follow(folder for spec in specs.values() for folder in spec.watch_folders)
        return specs

    def ready_inbox(self) -> bool:
        """Whether a job file waits in the inbox (it goes first: standing passes can wait)."""
        return bool(self.spool.pending()[0])

    # recovery -----------------------------------------------------------------------------------
    def recover(self) -> None:
        """Settle claims left by dead workers: finish those already committed, return the rest to the inbox."""
        for claim in self.spool.abandoned():
            try:
                committed = self.store.finished_claim(claim.path.name)
                if committed:
                    self.spool.finish(claim, committed["state"], committed["error"])
                    event(log, "job.reconciled", job=committed["id"], state=committed["state"])
                else:
                    self.spool.release(claim)
                    event(log, "job.returned", file=claim.name, reason="its worker stopped renewing the lease")
            except FileNotFoundError:  # another worker settled it first
                continue
        self.spool.reconsider_rejected()  # a rejected file that changed since (the rest of a slow copy) is read again
        self.spool.orphan_leases()  # left by a worker that renewed after it lost its claim

    # one job ------------------------------------------------------------------------------------
    def take(self, path: Path) -> Outcome | None:
        claim = self.spool.claim(path)
        if claim is None:
            return None
        self._job_id = None
        try:
            return self.process(claim)
        except Exception:
            self._hand_back(claim, "a fault of the machine; retried after a pause")
            raise

    def process(self, claim: Claim) -> Outcome:
        default_id = Path(claim.name).stem
        try:
            job = self._parse(claim)
        except JobRejected as exc:
            return self._reject(claim, default_id, exc.reason)
        fields = {
            "source": claim.name,
            "job_sha256": job.content_sha256,
            "prompt": job.prompt,
            "mode": job.mode,
            "tags": to_json(job.tags),
            "media_count": len(job.media),
            "claim": claim.path.name,
            "priority": job.priority,
        }
        try:
            run_id, attempts = self._start_job(job.id, fields, claim_alive=self.spool.is_held)
        except JobIdBusy as exc:
            reason = (
                f"{exc}; this file was set aside: submit it again when that run has finished, or give it another id"
            )
            return self._reject(claim, job.id, reason, record=False)
        self._job_id = job.id
        try:
            return self._run_job(claim, job, run_id, attempts)
        except ClaimLost as lost:  # suspended past the lease: another worker runs the job now; write nothing more
            return self._claim_lost(claim, lost)
        finally:
            self.store.let_go(job.id)
            self.heartbeat.job_ended(job.id)

    def _run_job(self, claim: Claim, job: Job, run_id: int, attempts: int) -> Outcome:
        if self.policy.exhausted(attempts):
            inflight = (self.store.job(job.id) or {}).get("inflight")
            where = f" (last while answering {', '.join(json.loads(inflight))})" if inflight else ""
            reason = f"gave up after {attempts - 1} attempts: the worker stopped during each of them{where}"
            event(log, "job.failed", logging.WARNING, job=job.id, reason=reason)
            return self._finish(claim, job.id, JobState.FAILED, reason)
        event(log, "job.started", job=job.id, attempt=attempts, media=len(job.media), mode=job.mode)
        started = time.perf_counter()
        try:
            with self._lease_renewal(claim):
                unit_run = self._run_units(job, run_id, resume=self._resumes(run_id, attempts))
        except HandBack as exc:
            self._hand_back(claim, str(exc) or "second stop signal")
            return Outcome(job.id, HANDED_BACK)
        except JobCancelled as exc:
            return self._cancelled(claim, job.id, str(exc), started)
        except PreEmpted as exc:
            event(log, "job.preempted", job=job.id, by=exc.by.name, priority=exc.priority, own=job.priority)
            self._hand_back(claim, str(exc))
            return Outcome(job.id, PREEMPTED, str(exc))
        except ClaimLost:
            raise
        except Exception as exc:
            if is_passing(exc) or is_corrupt_database(exc):
                raise  # the machine's fault, not the job's: handed back, retried after a pause
            # a bug or a runtime failure: record it against the job, keep the worker alive
            return self._finish(claim, job.id, JobState.FAILED, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        failures = unit_run.failures
        state = JobState.FAILED if failures else JobState.DONE
        reason = "\n".join(failures) if failures else None
        outcome = self._finish(claim, job.id, state, reason, new_failures=unit_run.new_failures)
        event(
            log,
            f"job.{state.value}",
            job=job.id,
            ms=(time.perf_counter() - started) * 1e3,
            failures=len(failures),
            new_failures=unit_run.new_failures,
        )
        return outcome

    def _resumes(self, run_id: int, attempts: int) -> bool:
        """Whether this start carries on a run that already holds answers: a later attempt, or a run handed back by
        a live worker (a stop signal, a pre-emption), which is not an attempt. Its answered units are skipped."""
        return attempts > 1 or self.store.run_answers(run_id) > 0

    def _start_job(self, job_id: str, fields: dict[str, Any], claim_alive: Callable[[str], bool]) -> tuple[int, int]:
        """Store.start_job, and this worker's heartbeat says it is on the job."""
        started = self.store.start_job(job_id, fields, self.name, claim_alive=claim_alive)
        self.heartbeat.job_started(job_id)
        return started

    def _claim_lost(self, claim: Claim | None, lost: ClaimLost) -> Outcome:
        """The job is another worker's now: one log line, and this worker's own leftovers (its lease) removed."""
        event(log, "claim.lost", logging.WARNING, job=lost.job_id, by=lost.holder, worker=self.name)
        if claim is not None and not claim.path.exists():
            claim.lease_path.unlink(missing_ok=True)
        return Outcome(lost.job_id, CLAIM_LOST)

    def _cancelled(self, claim: Claim, job_id: str, reason: str, started: float) -> Outcome:
        """An operator cancelled the job: the unit in progress is dropped, the answers recorded so far stay, the job
        and its run end cancelled (committed first), then its file moves to cancelled/ with the reason beside it."""
        self.store.end_unit(job_id)
        outcome = self._finish(claim, job_id, JobState.CANCELLED, reason, new_failures=0)
        answered = self.store.run_answers((self.store.job(job_id) or {}).get("run_id"))
        ms = (time.perf_counter() - started) * 1e3
        event(log, "job.cancelled", job=job_id, reason=reason, ms=ms, answered=answered)
        return outcome

    def _reject(self, claim: Claim, job_id: str, reason: str, record: bool = True) -> Outcome:
        """A job file that cannot run; `record=False` keeps the job row of another file with the same id."""
        self.store.record_rejected(job_id, str(claim.name), reason, update_job=record)
        self.spool.finish(claim, JobState.REJECTED, reason)
        event(log, "job.rejected", logging.WARNING, file=claim.name, reason=reason)
        return Outcome(job_id, JobState.REJECTED.value, reason, new_problems=1)

    def _hand_back(self, claim: Claim, reason: str) -> None:
        """Return the job to the inbox alive (not an attempt), unless its final state is already committed.

        Whatever cannot be done now stays as it is: a claim left in work/ is settled by recover() once its
        lease has run out (committed: moved on; not committed: returned to the inbox).
        """
        try:
            if not claim.path.exists() or self.store.finished_claim(claim.path.name):
                return
            self.spool.release(claim)
            event(log, "job.handed_back", file=claim.name, job=self._job_id, reason=reason)
            if self._job_id:
                self.store.hand_back(self._job_id)
        except Exception as exc:
            event(log, "job.kept_in_work", logging.WARNING, file=claim.name, error=describe(exc))

    def _parse(self, claim: Claim) -> Job:
        job = parse_job(
            claim.path,
            allowed_roots=list(self.config.spool.media_roots),
            generation=self.config.generation,
            media=self.config.media,
            base_dir=self.spool.inbox,
        )
        if job.id == claim.path.stem:  # no id in the file: the name it was submitted under
            job = replace(job, id=Path(claim.name).stem)
        return job

    def _finish(
        self,
        claim: Claim,
        job_id: str,
        state: JobState,
        reason: str | None,
        tb: str | None = None,
        new_failures: int | None = None,
    ) -> Outcome:
        """Commit the job's end, then move its file. A job failed as a whole (`tb`, or no unit count) is news."""
        new = (1 if state is JobState.FAILED else 0) if new_failures is None else new_failures
        self.store.finish_job(job_id, state, reason, tb, counts={"new_failures": new})  # committed first ...
        self.spool.finish(claim, state, reason)  # ... then moved; recover() settles a crash in between
        return Outcome(job_id, state.value, reason, new_problems=new)

    @contextmanager
    def _lease_renewal(self, claim: Claim) -> Iterator[None]:
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.spool.lease_seconds / 3):
                try:
                    self.spool.renew(claim)
                except Exception as exc:  # a full disk: try again at the next tick, the job goes on
                    event(log, "lease.renew_failed", logging.WARNING, file=claim.name, error=describe(exc))

        thread = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # standing jobs ------------------------------------------------------------------------------
    def standing_pass(self, path: Path, targets: set[Path] | None = None, cron: bool = False) -> Outcome | None:
        """One pass of the standing job `path`: answer what is new or changed, mark what is gone.

        `targets`: only these files (named by file events), else every file of the job's inputs. With `cron`
        (`vlbatch run`), the pass waits a while for files still being written, so that one run takes them, and
        records a run even when nothing changed (one row per cron run; `watch` records none per idle rescan).
        None when nothing ran: no change, or another worker holds the job.
        """
        with self.standing.hold(path) as held:
            if not held:
                return None
            return self._standing_pass(path, targets, cron)

    def _standing_pass(self, path: Path, targets: set[Path] | None, cron: bool) -> Outcome | None:
        try:
            return self._standing_plan(path, targets, cron)
        except ClaimLost as lost:
            return self._claim_lost(None, lost)
        finally:
            if self._job_id:
                self.store.let_go(self._job_id)
                self.heartbeat.job_ended(self._job_id)

    def _standing_plan(self, path: Path, targets: set[Path] | None, cron: bool) -> Outcome | None:
        self._job_id = None
        try:
            job = self._parse_standing(path, resolve_media=targets is None)
            if targets is not None and job.mode == "together":  # one answer over the set: look at all of it
                job, targets = self._parse_standing(path, resolve_media=True), None
        except JobRejected as exc:
            return self._standing_rejected(path, exc.reason)
        except FileNotFoundError:  # deleted meanwhile
            return None
        self.standing.set_reason(path, None)
        index = self.store.standing_index(job.id)
        basis = cache_key([], job.prompt, job.generation, job.media_settings, self.model_id)
        if targets is None:
            candidates, vanished = list(job.media), vanished_paths(index, job.media)
        else:
            specs = input_specs(job.inputs, self.standing.dir)
            real = {Path(os.path.realpath(p)) for p in targets}
            candidates = sorted(p for p in real if covers(specs, p) and self._inside_roots(p))
            vanished = [encode_path(p) for p in real if encode_path(p) in index]
        if targets is None and vanished and not candidates:
            # every tracked file gone at once, and nothing there: far more likely an unmounted share (its empty
            # mount point) than a folder emptied on purpose; answers stay current until files come back or go
            event(
                log,
                "standing.empty",
                logging.WARNING,
                job=path.name,
                tracked=len(vanished),
                reason="its inputs hold no files now; not marked gone (an unmounted share?)",
            )
            vanished = []
        plan = plan_pass(candidates, index, basis, self._media_complete, self.retry_failed, vanished)
        if cron:
            self._wait_for_writers(path, plan, index, basis)
        self._standing_waiting[path] = (set(plan.waiting), plan.next_check)
        if not plan.needs_run and not cron:
            return None
        if job.mode == "together" and plan.needs_run:  # one answer over the set: asked again for all of it
            plan.changed = {p: info for p in job.media if (info := plan.changed.get(p) or _stat(p)) is not None}
        return self._standing_run(path, job, index, basis, plan)

    def _standing_run(
        self, path: Path, job: Job, index: dict[str, dict[str, Any]], basis: str, plan: PassPlan
    ) -> Outcome | None:
        tracked = sum(1 for entry in index.values() if entry["state"] != "gone")
        fields = {
            "source": str(path),
            "job_sha256": job.content_sha256,
            "prompt": job.prompt,
            "mode": job.mode,
            "tags": to_json(job.tags),
            "media_count": len(plan.changed),
            "claim": self.standing.claim_of(path),
            "standing": 1,
            "priority": job.priority,
        }
        try:
            run_id, attempts = self._start_job(job.id, fields, claim_alive=self._claim_alive)
        except JobIdBusy as exc:
            event(log, "standing.busy", logging.WARNING, file=path.name, reason=str(exc))
            return None
        self._job_id = job.id
        if self.policy.exhausted(attempts):
            reason = f"gave up after {attempts - 1} attempts: the worker stopped during each of them"
            self.store.finish_job(job.id, JobState.FAILED, reason, counts={"new_failures": 1})
            return Outcome(job.id, JobState.FAILED.value, reason, new_problems=1)
        event(
            log,
            "job.started",
            job=job.id,
            standing=True,
            attempt=attempts,
            changed=len(plan.changed),
            gone=len(plan.gone),
            unchanged=plan.unchanged,
            tracked=tracked,
        )
        started = time.perf_counter()
        try:
            changed = replace(job, media=tuple(sorted(plan.changed)))
            unit_run = self._run_units(changed, run_id, resume=self._resumes(run_id, attempts))
        except HandBack:
            self.store.hand_back(job.id)  # the run stays open: the next pass carries it on
            return Outcome(job.id, HANDED_BACK)
        except JobCancelled as exc:  # this pass ends; the standing job stays and its next pass goes on
            self.store.end_unit(job.id)
            self._track(job, run_id, index, basis, plan)  # what it answered is not asked again
            self.store.finish_job(job.id, JobState.CANCELLED, str(exc), counts={"new_failures": 0})
            event(log, "job.cancelled", job=job.id, standing=True, reason=str(exc))
            return Outcome(job.id, JobState.CANCELLED.value, str(exc))
        except PreEmpted as exc:
            event(log, "job.preempted", job=job.id, standing=True, by=exc.by.name, priority=exc.priority)
            self.store.hand_back(job.id)  # the run stays open: the next pass carries it on
            return Outcome(job.id, PREEMPTED, str(exc))
        except ClaimLost:
            raise
        except Exception as exc:
            if is_passing(exc) or is_corrupt_database(exc):
                raise
            reason, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            self.store.finish_job(job.id, JobState.FAILED, reason, tb, counts={"new_failures": 1})
            return Outcome(job.id, JobState.FAILED.value, reason, new_problems=1)
        self._track(job, run_id, index, basis, plan)
        self.store.record_gone(job.id, run_id, plan.gone)
        for entry in plan.gone:
            if job.remove_gone_sidecars:
                self._remove_sidecar(job, Path(decode_path(entry["path"])))
        failures = unit_run.failures
        state = JobState.FAILED if failures else JobState.DONE
        reason = "\n".join(failures) if failures else None
        counts = {"new_failures": unit_run.new_failures, "unchanged": plan.unchanged}
        self.store.finish_job(job.id, state, reason, counts=counts)
        event(
            log,
            f"job.{state.value}",
            job=job.id,
            standing=True,
            ms=(time.perf_counter() - started) * 1e3,
            failures=len(failures),
            new_failures=unit_run.new_failures,
            gone=len(plan.gone),
        )
        return Outcome(job.id, state.value, reason, new_problems=unit_run.new_failures)

    def _parse_standing(self, path: Path, resolve_media: bool) -> Job:
        return parse_job(
            path,
            allowed_roots=list(self.config.spool.media_roots),
            generation=self.config.generation,
            media=self.config.media,
            base_dir=self.standing.dir,
            standing=True,
            resolve_media=resolve_media,
        )

    def _standing_rejected(self, path: Path, reason: str) -> Outcome | None:
        """A standing job that cannot run stays where it is, its reason beside it; reported once per reason."""
        try:
            if self.standing.reason_path(path).read_text().rstrip("\n") == reason.rstrip():
                return None
        except OSError:
            pass
        self.standing.set_reason(path, reason)
        self.store.record_rejected(path.stem, str(path), reason)
        event(log, "job.rejected", logging.WARNING, file=path.name, standing=True, reason=reason)
        return Outcome(path.stem, JobState.REJECTED.value, reason, new_problems=1)

    def _track(self, job: Job, run_id: int, index: dict[str, dict[str, Any]], basis: str, plan: PassPlan) -> None:
        """What this run settled for each file (answered, reused, failed), as the job's index of tracked files."""
        now = utc_now()
        rows = []
        for link in self.store.run_links(run_id):
            if link["change"] == "gone":
                continue
            hashes = json.loads(link["media_sha256"] or "[]")
            for i, name in enumerate(json.loads(link["media_paths"])):  # stored names (paths.py), index keys too
                info = plan.changed.get(Path(decode_path(name)))
                try:
                    info = info or os.stat(decode_path(name))
                except OSError:
                    continue
                previous = index.get(name) or {}
                rows.append(
                    {
                        "job_id": job.id,
                        "path": name,
                        "size": info.st_size,
                        "mtime_ns": info.st_mtime_ns,
                        "sha256": hashes[i] if i < len(hashes) else None,
                        "basis": basis,
                        "cache_key": link["cache_key"],
                        "result_id": link["result_id"],
                        "link_id": link["link_id"],
                        "state": "failed" if link["error"] else "answered",
                        "error_class": link["error_class"],
                        "first_seen_utc": previous.get("first_seen_utc") or now,
                        "updated_utc": now,
                        "run_id": run_id,
                    }
                )
        self.store.save_standing(rows)

    def _claim_alive(self, claim: str) -> bool:
        if claim.startswith(CLAIM_PREFIX):
            return self.standing.is_held(claim)
        return self.spool.is_held(claim)

    def _inside_roots(self, path: Path) -> bool:
        roots = [*self.config.spool.media_roots, self.standing.dir]
        return any(path.is_relative_to(os.path.realpath(root)) for root in roots)

    def _media_complete(self, path: Path, info: os.stat_result) -> float | None:
        """None when a media file is complete (no writer holds it, unchanged for settle_seconds); else when to
        look again."""
        verdict = self._settle.check(path, info)
        if verdict.complete:
            self._settle.forget(path)  # taken now: a later change is a new episode
            return None
        wait = self.config.spool.rescan_seconds if verdict.retry_in is None else verdict.retry_in
        return time.monotonic() + max(0.02, wait)

    def _wait_for_writers(self, path: Path, plan: PassPlan, index: dict[str, dict[str, Any]], basis: str) -> None:
        """Look again at files still being written until they are complete, for up to CRON_WAIT_SECONDS (or a
        stop signal); what is still incomplete then is left for the next run, said in the log."""
        deadline = time.monotonic() + CRON_WAIT_SECONDS
        while plan.waiting and not self.stop_requested:
            next_check = plan.next_check or time.monotonic()
            if next_check > deadline:
                event(
                    log,
                    "media.deferred",
                    logging.WARNING,
                    job=path.name,
                    files=len(plan.waiting),
                    first=plan.waiting[0],
                    reason="still being written; the next run takes them",
                )
                return
            self.wake.wait(max(0.0, next_check - time.monotonic()))
            again = plan_pass(plan.waiting, index, basis, self._media_complete, self.retry_failed)
            plan.changed.update(again.changed)
            plan.unchanged += again.unchanged
            plan.waiting, plan.next_check = again.waiting, again.next_check

    def standing_passes(self, passed: set[Path] | None = None) -> list[Outcome]:
        """A full pass of every standing job, highest priority first, as `vlbatch run` makes after draining the inbox.

        `passed`: the jobs whose pass is over (added to as passes end). A pass that makes way for an inbox job of
        higher priority ends the round (its outcome is PREEMPTED): the caller runs the inbox, then the rest."""
        self._check_places()
        passed = set() if passed is None else passed
        outcomes = []
        for path in self._standing_priorities.ordered(self.standing.job_files()):
            if path in passed:
                continue
            self._hold_while_paused()
            if self.stop_requested:
                break
            outcome = self.standing_pass(path, cron=True)
            if outcome is not None:
                outcomes.append(outcome)
                if outcome.state == PREEMPTED:
                    break
            passed.add(path)
        return outcomes

    def _remove_sidecar(self, job: Job, media: Path) -> None:
        """The sidecar vlbatch wrote beside a file that is gone, if the job asks (only vlbatch's own bytes)."""
        from batch.service.worker import sidecars

        if sidecars.remove_gone(job, media, self.store):
            event(log, "sidecar.removed", path=media, reason="its media file is gone")

    # units --------------------------------------------------------------------------------------
    def _run_units(self, job: Job, run_id: int, resume: bool) -> _UnitRun:
        """Answer each unit of the job, up to model.batch at once; the run holds one line per media unit that failed.

        Units join a DecodeBatch as their media is ready and leave as each answer ends (continuous batching). A job
        whose previous attempt died with units in flight answers one unit at a time, so that the unit that kills
        the worker is found (begin_unit counts its deaths) and skipped.
        """
        unit_run = _UnitRun(job, run_id, resume, job.units())
        inflight = self.store.inflight(job.id) if resume else None
        suspect = inflight is not None
        unit_run.died_with = frozenset(json.loads(inflight)) if inflight else frozenset()
        unit_run.rows = 1 if suspect else self.config.model.batch
        if suspect and self.config.model.batch > 1:
            event(log, "job.one_at_a_time", job=job.id, reason="its last attempt stopped while answering")
        bar = tqdm(unit_run.units, desc=job.id, unit="answer", disable=not sys.stderr.isatty(), file=sys.stderr)
        self._preempt_poll.restart()
        try:
            for index, unit in enumerate(bar):
                if self.abort_requested:
                    raise HandBack
                try:
                    self._between_units(job)
                except PreEmpted:
                    self._drain(unit_run)  # the answers in flight are finished and kept, then the job makes way
                    raise
                self._settle_unit(unit_run, unit, functools.partial(self._answer_unit, unit_run, index, unit))
                while unit_run.batch is not None and unit_run.batch.full:
                    self._decode_step(unit_run)
            self._drain(unit_run)
        except BaseException:
            batch = unit_run.batch
            if batch is not None and len(batch) and batch.rows > 1:  # a live worker leaves no batch marker behind
                with contextlib.suppress(Exception):
                    self.store.mark_inflight(job.id, [])
            raise
        return unit_run

    def _settle_unit(self, run: _UnitRun, unit: tuple[Path, ...], work: Callable[[], object]) -> None:
        """Run one unit's work; a problem of that unit's own files fails the unit, not the job."""
        try:
            work()
        except (OSError, UnicodeError, ValueError) as exc:  # one file's problem (its name, its folder's rights)
            if is_passing(exc) or isinstance(exc, DatabaseReplaced):
                raise  # the machine's: the job goes back and is retried after a pause
            self._unit_error(run, unit, exc)

    def _drain(self, run: _UnitRun) -> None:
        while run.batch is not None and len(run.batch):
            self._decode_step(run)

    def _decode_step(self, run: _UnitRun) -> None:
        """One decode step of every answer in flight; those that ended are recorded. A pause holds the answers in
        flight after the step; a second stop signal or a cancel, checked after each step, drops them."""
        assert run.batch is not None
        try:
            finished = run.batch.step()
        except VlbatchError as exc:  # the runtime failed the step: every answer it carried fails
            finished = run.batch.fail_all(exc)
        for item in finished:
            self._settle_unit(run, item.tag[0], lambda item=item: self._answer_ended(run, item))
        if finished and run.batch.rows > 1:
            self._mark_batch(run)
        if len(run.batch):
            self._hold_while_paused(run.job.id)
        self._check_abort("")

    def _mark_batch(self, run: _UnitRun, joining: tuple[Path, ...] = ()) -> None:
        """Record the units in flight (and one about to join), every path as stored."""
        assert run.batch is not None
        units = [unit for unit, _ in run.batch.tags] + [joining]
        self.store.mark_inflight(run.job.id, [encode_path(p) for unit in units for p in unit])

    def _unit_error(self, run: _UnitRun, unit: tuple[Path, ...], exc: Exception) -> None:
        """A unit that raised where no unit should (a strange name, a folder it may not touch): a failed unit with
        the reason, never a failed job; the rest of the job goes on. A unit already recorded keeps its record."""
        paths = paths_json(unit)
        if self.store.linked(run.run_id, paths) is not None:
            event(log, "unit.error", logging.WARNING, job=run.job.id, paths=paths, error=describe(exc))
            return
        names = ", ".join(encode_path(p) for p in unit)
        row = {"media_paths": paths, "prompt": run.job.prompt, "cache_key": None}
        self._unit_failed(run, row, f"{names}: {describe(exc)}", type(exc).__name__)

    def _answer_unit(self, run: _UnitRun, index: int, unit: tuple[Path, ...]) -> None:
        """One unit: hash, reuse a stored answer if one fits, else decode (read ahead), run its ViT and prefill and
        let it join the batch of answers being decoded (recorded when its answer ends)."""
        job = run.job
        base = self._needs_answer(run, unit)
        if base is None:
            return
        paths = base["media_paths"]
        try:
            request = self._prepared(run, index)
        except VlbatchError as exc:  # unreadable media, a decoder that crashed or hung, too long a prompt
            return self._unit_failed(run, base, str(exc), failure_class(exc))
        if run.batch is None:  # made at the first unit the model answers: a pass with none never loads the model
            run.batch = DecodeBatch(self.pipeline, run.rows)
        batch = run.batch
        if batch.rows > 1:
            # the units in flight, recorded before the model runs: a worker that dies here has the job's next
            # attempt answer one unit at a time
            self._mark_batch(run, joining=unit)
        else:
            # recorded before the model runs: a worker that dies in this unit twice skips it the next time
            died_in_batch = bool(run.died_with) and run.died_with.issuperset(encode_path(p) for p in unit)
            deaths = self.store.begin_unit(job.id, paths, died_in_batch)
            if self.policy.skip_unit(deaths):
                names = ", ".join(str(p) for p in unit)
                return self._unit_failed(
                    run,
                    base,
                    f"{names}: the worker process died {deaths} times while answering it; skipped",
                    "worker_died",
                )
        self.heartbeat.on_file(job.id, ", ".join(encode_path(p.name) for p in unit))  # any name, as stored
        try:
            finished = batch.add(request, job.generation, (unit, base))
        except VlbatchError as exc:
            self._unit_failed(run, base, str(exc), failure_class(exc))
            if batch.rows > 1:
                self._mark_batch(run)
            return
        for item in finished:
            self._answer_ended(run, item)
        if finished and batch.rows > 1:
            self._mark_batch(run)

    def _answer_ended(self, run: _UnitRun, item: Finished) -> None:
        unit, base = item.tag
        if item.error is not None:
            return self._unit_failed(run, base, str(item.error), failure_class(item.error))
        assert item.result is not None
        self._record_answer(run, unit, base, item.result, self.pipeline.backend.name, NODE)

    def _needs_answer(self, run: _UnitRun, unit: tuple[Path, ...]) -> dict[str, Any] | None:
        """The unit's results row so far, when the model must answer it; None when it is settled here (linked to
        an answer this run or an earlier one holds, or failed unreadable)."""
        job = run.job
        paths = paths_json(unit)  # any file name, losslessly (paths.py)
        try:
            hashes = [file_sha256(p) for p in unit]
        except MediaError as exc:
            row = {"media_paths": paths, "prompt": job.prompt, "cache_key": None}
            self._unit_failed(run, row, f"{exc.path}: cannot read ({exc.reason})", "unreadable")
            return None
        own = {"media_paths": paths, "media_sha256": to_json(hashes)}
        linked = self.store.linked(run.run_id, paths) if run.resume else None
        if linked is not None:  # answered by an earlier attempt of this run
            self._write_sidecar(job, unit, linked)
            return None
        model_id = self.answer_model_id()
        key = cache_key(hashes, job.prompt, job.generation, job.media_settings, model_id)
        previous = None if self.force else self.store.reuse_answer(job.id, run.run_id, key, **own)
        if previous is not None:
            self._write_sidecar(job, unit, previous)
            return None
        failed = None if self.force or self.retry_failed else self.store.previous_failure(key)
        if failed is not None:  # the same bytes failed the same question before: not tried again, not news
            self.store.link(job.id, run.run_id, failed["id"], own["media_paths"], own["media_sha256"], reused=True)
            run.failures.append(f"{failed['error']} (failed before; --retry-failed tries again)")
            return None
        return {
            **own,
            "cache_key": key,
            "prompt": job.prompt,
            "settings": to_json(answer_settings(job.generation, job.media_settings)),
            "tags": to_json(job.tags),
            "model_id": model_id,
        }

    def _record_answer(
        self,
        run: _UnitRun,
        unit: tuple[Path, ...],
        base: dict[str, Any],
        result: GenerationResult,
        backend: str,
        node: str,
    ) -> int:
        """Commit a generated answer (with the host that made it), then write its sidecar."""
        job = run.job
        result_id = self.store.add_result(job.id, run.run_id, {**base, **answer_row(result, backend), "node": node})
        if run.batch is None or run.batch.rows == 1:  # a batch's units in flight are kept by _mark_batch
            self.store.end_unit(job.id)
        t = result.timings
        event(
            log,
            "answer.done",
            job=job.id,
            file=", ".join(p.name for p in unit),
            node=node,
            ttft_ms=t.ttft_ms,
            tokens=result.output_tokens,
            tok_s=t.tokens_per_s,
        )
        self._write_sidecar(job, unit, result_id)
        return result_id

    def _prepared(self, run: _UnitRun, index: int) -> Request:
        """This unit's decoded media (prepared ahead while the previous unit generated); starts the next one."""
        job = run.job

        def start(i: int) -> Future[Request]:
            return self._prefetch.submit(self.pipeline.prepare, job.prompt, run.units[i], job.media_settings)

        request = run.ahead.pop(index, None) or start(index)
        if index + 1 < len(run.units):
            run.ahead[index + 1] = start(index + 1)
        return self._await(request)

    def _unit_failed(self, run: _UnitRun, row: dict[str, Any], reason: str, error_class: str = "error") -> None:
        """Record a unit that got no answer, under its cache key and the class of its error; news only if that
        unit never failed that way before."""
        new = not self.store.failed_before(row.get("cache_key"), row["media_paths"], error_class)
        self.store.add_result(run.job.id, run.run_id, {**row, "error": reason, "error_class": error_class})
        if run.batch is None or run.batch.rows == 1:  # a batch's units in flight are kept by _mark_batch
            self.store.end_unit(run.job.id)
        run.failures.append(reason)
        run.new_failures += new
        event(log, "answer.failed", logging.WARNING, job=run.job.id, reason=reason, error_class=error_class, new=new)

    def _await(self, future: Future[Request]) -> Request:
        """The prepared request, checking for a second stop signal while the decoder works (up to its time limit)."""
        while True:
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                if self.abort_requested:
                    raise HandBack from None
                self._check_cancel(self._job_id, throttled=True)

    def _check_abort(self, _text: str) -> None:
        """Called with each piece of generated text: a second stop signal, or a cancel, drops the unit now."""
        if self.abort_requested:
            raise HandBack
        self._check_cancel(self._job_id, throttled=True)

    # operator control (batch/service/worker/control.py) -----------------------------------------------------
    def _between_units(self, job: Job) -> None:
        """Before each unit: wait out a pause, end a job an operator cancelled, make way for a job of higher
        priority."""
        self._hold_while_paused(job.id)
        self._check_cancel(job.id)
        self._check_preempt(job)

    def _hold_while_paused(self, job_id: str | None = None) -> None:
        """While `vlbatch pause` holds, take nothing new: the model stays loaded and a job's claim keeps its lease
        (renewed by its own thread). A cancel of the job ends the wait (the caller ends the job); a stop signal
        ends it too, and hands a job in progress back to the inbox at once (HandBack) rather than finishing it."""
        if not self.control.paused:
            return
        self.heartbeat.set_state(PAUSED)
        event(log, "worker.paused", worker=self.name, job=job_id)
        while self.control.paused and not self.stop_requested:
            if job_id is not None and self.store.cancel_requested(job_id):
                return
            self.wake.wait(self.config.spool.heartbeat_seconds)
            self.wake.clear()
        if self.stop_requested:
            if job_id is not None:
                raise HandBack("a stop signal while paused")
            return
        self.heartbeat.set_state(BUSY if job_id is not None else IDLE)
        event(log, "worker.resumed", worker=self.name, job=job_id)

    def _check_cancel(self, job_id: str | None, throttled: bool = False) -> None:
        """JobCancelled when an operator asked to cancel the job (`throttled`: at most every CANCEL_POLL_SECONDS)."""
        if job_id is None or (throttled and not self._cancel_poll.due()):
            return
        asked = self.store.cancel_requested(job_id)
        if asked is not None:
            raise JobCancelled(job_id, *asked)

    def _check_preempt(self, job: Job) -> None:
        """PreEmpted when a ready inbox job has a higher priority than this one. The inbox is looked at no more
        often than every PREEMPT_POLL_SECONDS, and at most about 1/PREEMPT_SHARE of the time (a very large inbox)."""
        if not self._preempt_poll.due():
            return
        started = time.monotonic()
        ready, _ = self.spool.pending()
        self._preempt_poll.hold(PREEMPT_SHARE * (time.monotonic() - started))
        if ready and self.spool.priorities.known(ready[0]) > job.priority:
            raise PreEmpted(job.id, ready[0], self.spool.priorities.known(ready[0]), job.priority)

    def _write_sidecar(self, job: Job, unit: tuple[Path, ...], result_id: int) -> None:
        """The job's sidecar (.txt or .xmp) beside a single media file: see batch/service/worker/sidecars.py."""
        sidecars.write_for_unit(self.store, job, unit, result_id)
