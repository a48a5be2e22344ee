"""The worker: claims jobs from the spool, answers each media unit through the pipeline, records it all.

`drain()` is `vlbatch run` (empty the inbox, then return); `watch()` is `vlbatch watch` (watchdog events
wake the loop; the loop always rescans the inbox itself, so a lost or doubled event changes nothing).
A job is committed to the database before its file moves to done/ or failed/; a crash in between is
reconciled from the claim name recorded with the job.
"""

from __future__ import annotations

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
from batch.infer.decode import IsolatedDecoder
from batch.infer.generate import GenerationResult
from batch.infer.pipeline import Pipeline, Request
from batch.infer.runtime.select import model_identity
from batch.infer.settings import answer_settings
from batch.service.atomic_write import SymlinkRefused, write_atomic
from batch.service.faults import (
    Backoff,
    DatabaseCorrupt,
    InfrastructureError,
    describe,
    is_corrupt_database,
    is_passing,
)
from batch.service.jobfile import Job, JobRejected, parse_job
from batch.service.logs import event
from batch.service.records import answer_row, cache_key, to_json
from batch.service.slots import WorkerSlots
from batch.service.spool import Claim, Spool
from batch.service.states import HANDED_BACK, JobState, RetryPolicy
from batch.service.store import JobIdBusy, Store, file_sha256, worker_name

log = logging.getLogger("batch.service.worker")
NODE = os.uname().nodename  # recorded with each answer: several machines may answer one spool


class HandBack(Exception):
    """Stop the current job now and return it to the inbox (a second stop signal)."""


@dataclass(frozen=True)
class Outcome:
    job_id: str
    state: str  # a finished JobState's value, or HANDED_BACK
    reason: str | None = None


@dataclass
class _UnitRun:
    """One run of a job through its units: what is decoded ahead, and what failed."""

    job: Job
    run_id: int
    resume: bool  # a later attempt of the same run: units it already holds are skipped
    units: list[tuple[Path, ...]]
    ahead: dict[int, Future[Request]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        config: Config,
        store: Store,
        spool: Spool,
        open_pipeline: Callable[[], Pipeline],
        model_id: str,
        force: bool = False,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self._open_pipeline = open_pipeline
        self._pipeline: Pipeline | None = None
        self.model_id = model_id
        self.force = force
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

    @classmethod
    def from_config(cls, config: Config, force: bool = False) -> Worker:
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
            )

        return cls(
            config,
            Store(config.spool.database, config.spool.database_timeout_seconds),
            spool,
            open_pipeline,
            model_identity(model.dir),
            force,
        )

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            started = time.perf_counter()
            self._pipeline = self._open_pipeline()
            event(log, "model.loaded", model=self.model_id, ms=(time.perf_counter() - started) * 1e3)
        return self._pipeline

    def close(self) -> None:
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
            self.wake.set()
            event(log, "worker.signal", signal=signal.Signals(signum).name, hand_back=self.abort_requested)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # loops --------------------------------------------------------------------------------------
    def drain(self) -> list[Outcome]:
        """Run every job in the inbox, waiting for files still being written; then return."""
        outcomes: list[Outcome] = []
        bar = tqdm(desc="jobs", unit="job", total=0, disable=not sys.stderr.isatty(), file=sys.stderr)
        while not self.stop_requested:
            try:
                ready, outcome, next_ready = self._cycle()
            except Exception as exc:
                self._wait_out(exc, give_up=True)
                continue
            if outcome:
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
        """Hold one of the spool.max_workers slots of this spool and model; `wait` until one is free (watch)."""
        if self.slots.take():
            return True
        event(
            log,
            "worker.no_slot",
            slots=self.slots.count,
            reason="every worker slot for this spool and model is held by another vlbatch process (spool.max_workers)",
            waiting=wait,
        )
        return wait and self.slots.wait(lambda: self.stop_requested)

    def watch(self) -> None:
        """Run jobs as they arrive until a stop signal; faults of the machine are waited out, never fatal."""
        observer = self._observer()
        observer.start()
        event(log, "worker.watching", inbox=self.spool.inbox, worker=self.name)
        try:
            _ = self.pipeline  # load the model before the first job arrives
            while not self.stop_requested:
                try:
                    ready, _, next_ready = self._cycle()
                except Exception as exc:
                    self._wait_out(exc, give_up=False)
                    continue
                if ready:
                    continue
                timeout = self.config.spool.rescan_seconds
                if next_ready is not None:
                    timeout = min(timeout, max(0.02, next_ready - time.time()))
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
        self.recover()
        ready, next_ready = self.spool.pending()
        outcome = self.take(ready[0]) if ready else None
        self._backoff.reset()
        self._failing_since = None
        return len(ready), outcome, next_ready

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
        event(log, "worker.fault", logging.ERROR, error=describe(exc), passing=is_passing(exc), retry_in_s=delay)
        if not is_passing(exc):
            log.debug("%s", "".join(traceback.format_exception(exc)))
        self.wake.wait(delay)  # a stop signal ends the pause early
        self.wake.clear()

    def _observer(self) -> Any:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        wake = self.wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, _event: Any) -> None:
                wake.set()

        observer = PollingObserver(timeout=0.5) if self.config.spool.polling else Observer()
        observer.schedule(Wake(), str(self.spool.inbox), recursive=False)
        return observer

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
        }
        try:
            run_id, attempts = self.store.start_job(job.id, fields, self.name, claim_alive=self.spool.is_held)
        except JobIdBusy as exc:
            reason = (
                f"{exc}; this file was set aside: submit it again when that run has finished, or give it another id"
            )
            return self._reject(claim, job.id, reason, record=False)
        self._job_id = job.id
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
                failures = self._run_units(job, run_id, resume=attempts > 1)
        except HandBack:
            self._hand_back(claim, "second stop signal")
            return Outcome(job.id, HANDED_BACK)
        except Exception as exc:
            if is_passing(exc) or is_corrupt_database(exc):
                raise  # the machine's fault, not the job's: handed back, retried after a pause
            # a bug or a runtime failure: record it against the job, keep the worker alive
            return self._finish(claim, job.id, JobState.FAILED, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        state = JobState.FAILED if failures else JobState.DONE
        reason = "\n".join(failures) if failures else None
        outcome = self._finish(claim, job.id, state, reason)
        event(log, f"job.{state.value}", job=job.id, ms=(time.perf_counter() - started) * 1e3, failures=len(failures))
        return outcome

    def _reject(self, claim: Claim, job_id: str, reason: str, record: bool = True) -> Outcome:
        """A job file that cannot run; `record=False` keeps the job row of another file with the same id."""
        self.store.record_rejected(job_id, str(claim.name), reason, update_job=record)
        self.spool.finish(claim, JobState.REJECTED, reason)
        event(log, "job.rejected", logging.WARNING, file=claim.name, reason=reason)
        return Outcome(job_id, JobState.REJECTED.value, reason)

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

    def _finish(self, claim: Claim, job_id: str, state: JobState, reason: str | None, tb: str | None = None) -> Outcome:
        self.store.finish_job(job_id, state, reason, tb)  # committed first ...
        self.spool.finish(claim, state, reason)  # ... then moved; recover() settles a crash in between
        return Outcome(job_id, state.value, reason)

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

    # units --------------------------------------------------------------------------------------
    def _run_units(self, job: Job, run_id: int, resume: bool) -> list[str]:
        """Answer each unit of the job; returns one line per media unit that failed."""
        unit_run = _UnitRun(job, run_id, resume, job.units())
        bar = tqdm(unit_run.units, desc=job.id, unit="answer", disable=not sys.stderr.isatty(), file=sys.stderr)
        for index, unit in enumerate(bar):
            if self.abort_requested:
                raise HandBack
            self._answer_unit(unit_run, index, unit)
        return unit_run.failures

    def _answer_unit(self, run: _UnitRun, index: int, unit: tuple[Path, ...]) -> None:
        """One unit: hash, reuse a stored answer if one fits, else decode (read ahead), generate and record."""
        job = run.job
        base = self._needs_answer(run, unit)
        if base is None:
            return
        paths = base["media_paths"]
        try:
            request = self._prepared(run, index)
        except VlbatchError as exc:  # unreadable media, a decoder that crashed or hung, too long a prompt
            return self._unit_failed(run, base, str(exc))
        # recorded before the model runs: a worker that dies in this unit twice skips it the next time
        deaths = self.store.begin_unit(job.id, paths)
        if self.policy.skip_unit(deaths):
            names = ", ".join(str(p) for p in unit)
            return self._unit_failed(
                run, base, f"{names}: the worker process died {deaths} times while answering it; skipped"
            )
        try:
            result = self.pipeline.answer(request, job.generation, on_text=self._check_abort)
        except VlbatchError as exc:
            return self._unit_failed(run, base, str(exc))
        self._record_answer(run, unit, base, result, self.pipeline.backend.name, NODE)

    def _needs_answer(self, run: _UnitRun, unit: tuple[Path, ...]) -> dict[str, Any] | None:
        """The unit's results row so far, when the model must answer it; None when it is settled here (linked to
        an answer this run or an earlier one holds, or failed unreadable)."""
        job = run.job
        paths = to_json([str(p) for p in unit])
        try:
            hashes = [file_sha256(p) for p in unit]
        except MediaError as exc:
            self._unit_failed(
                run, {"media_paths": paths, "prompt": job.prompt}, f"{exc.path}: cannot read ({exc.reason})"
            )
            return None
        own = {"media_paths": paths, "media_sha256": to_json(hashes)}
        linked = self.store.linked(run.run_id, paths) if run.resume else None
        if linked is not None:  # answered by an earlier attempt of this run
            self._write_sidecar(job, unit, linked)
            return None
        key = cache_key(hashes, job.prompt, job.generation, job.media_settings, self.model_id)
        previous = None if self.force else self.store.previous_answer(key)
        if previous is not None:
            self.store.link(job.id, run.run_id, previous, own["media_paths"], own["media_sha256"], reused=True)
            self._write_sidecar(job, unit, previous)
            return None
        return {
            **own,
            "cache_key": key,
            "prompt": job.prompt,
            "settings": to_json(answer_settings(job.generation, job.media_settings)),
            "tags": to_json(job.tags),
            "model_id": self.model_id,
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

    def _unit_failed(self, run: _UnitRun, row: dict[str, Any], reason: str) -> None:
        self.store.add_result(run.job.id, run.run_id, {**row, "cache_key": None, "error": reason})
        self.store.end_unit(run.job.id)
        run.failures.append(reason)
        event(log, "answer.failed", logging.WARNING, job=run.job.id, reason=reason)

    def _await(self, future: Future[Request]) -> Request:
        """The prepared request, checking for a second stop signal while the decoder works (up to its time limit)."""
        while True:
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                if self.abort_requested:
                    raise HandBack from None

    def _check_abort(self, _text: str) -> None:
        if self.abort_requested:
            raise HandBack

    def _write_sidecar(self, job: Job, unit: tuple[Path, ...], result_id: int) -> None:
        """<media>.txt beside a single media file, atomically; never over a file vlbatch did not write."""
        if not job.sidecar or len(unit) != 1:
            return
        path = unit[0].with_suffix(".txt")
        answer = self.store.result(result_id)["answer"] or ""
        if (path.exists() or path.is_symlink()) and not job.sidecar_overwrite:
            try:
                ours = self.store.wrote_sidecar(file_sha256(path))  # by content: a copied folder stays ours
            except MediaError:  # a symlink, a FIFO, a folder: certainly not ours
                ours = False
            if not ours:
                event(log, "sidecar.kept", logging.WARNING, path=path, reason="exists and was not written by vlbatch")
                return
        try:
            write_atomic(path, answer)  # a hidden random temp name (O_EXCL), fsync, rename; never through a symlink
        except SymlinkRefused:
            event(log, "sidecar.kept", logging.WARNING, path=path, reason="is a symbolic link")
            return
        self.store.record_sidecar(path, file_sha256(path), result_id)
