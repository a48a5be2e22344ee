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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from batch.config import Config
from batch.errors import VlbatchError
from batch.infer.pipeline import Pipeline, Request
from batch.infer.runtime.select import model_identity
from batch.service.jobfile import Job, JobRejected, parse_job
from batch.service.logs import event
from batch.service.spool import Claim, Spool
from batch.service.store import Store, cache_key, file_sha256, worker_name

log = logging.getLogger("batch.service.worker")


class HandBack(Exception):
    """Stop the current job now and return it to the inbox (a second stop signal)."""


@dataclass(frozen=True)
class Outcome:
    job_id: str
    state: str  # done | failed | rejected | handed_back
    reason: str | None = None


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
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    @classmethod
    def from_config(cls, config: Config, force: bool = False) -> Worker:
        model = config.model
        if model.dir is None:
            raise VlbatchError("no model: set model.dir in config.yaml, $VLBATCH_MODEL_DIR or --model")
        spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()

        def open_pipeline() -> Pipeline:
            return Pipeline.open(model.dir, model.backend, model.hf_dir, model.threads, config.media)

        return cls(config, Store(config.spool.database), spool, open_pipeline, model_identity(model.dir), force)

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            started = time.perf_counter()
            self._pipeline = self._open_pipeline()
            event(log, "model.loaded", model=self.model_id, ms=(time.perf_counter() - started) * 1e3)
        return self._pipeline

    def close(self) -> None:
        self._prefetch.shutdown(cancel_futures=True)
        if self._pipeline is not None:
            self._pipeline.close()
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
        while not self.stop_requested:
            self.recover()
            ready, next_ready = self.spool.pending()
            if ready:
                outcome = self.take(ready[0])
                if outcome:
                    outcomes.append(outcome)
            elif next_ready is not None:
                time.sleep(max(0.05, next_ready - time.time()))
            else:
                break
        return outcomes

    def watch(self) -> None:
        """Run jobs as they arrive until a stop signal."""
        observer = self._observer()
        observer.start()
        event(log, "worker.watching", inbox=self.spool.inbox, worker=self.name)
        try:
            _ = self.pipeline  # load the model before the first job arrives
            while not self.stop_requested:
                self.recover()
                ready, next_ready = self.spool.pending()
                if ready:
                    self.take(ready[0])
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
        return self.process(claim)

    def process(self, claim: Claim) -> Outcome:
        default_id = Path(claim.name).stem
        try:
            job = self._parse(claim)
        except JobRejected as exc:
            self.store.record_rejected(default_id, str(claim.name), exc.reason)
            self.spool.finish(claim, "rejected", exc.reason)
            event(log, "job.rejected", logging.WARNING, file=claim.name, reason=exc.reason)
            return Outcome(default_id, "rejected", exc.reason)

        fields = {
            "source": claim.name,
            "job_sha256": job.content_sha256,
            "prompt": job.prompt,
            "mode": job.mode,
            "tags": _json(job.tags),
            "media_count": len(job.media),
            "claim": claim.path.name,
        }
        attempts = self.store.start_job(job.id, fields, self.name)
        if attempts > self.config.spool.max_attempts:
            reason = f"gave up after {attempts - 1} attempts: the worker stopped during each of them"
            return self._finish(claim, job.id, "failed", reason)
        if attempts == 1:
            self.store.clear_links(job.id)
        event(log, "job.started", job=job.id, attempt=attempts, media=len(job.media), mode=job.mode)
        started = time.perf_counter()
        try:
            with self._lease_renewal(claim):
                failures = self._run_units(job, resume=attempts > 1)
        except HandBack:
            self.spool.release(claim)
            event(log, "job.handed_back", job=job.id)
            return Outcome(job.id, "handed_back")
        except Exception as exc:  # a bug or a runtime failure: record it, keep the worker alive
            return self._finish(claim, job.id, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        state = "failed" if failures else "done"
        reason = "\n".join(failures) if failures else None
        outcome = self._finish(claim, job.id, state, reason)
        event(log, f"job.{state}", job=job.id, ms=(time.perf_counter() - started) * 1e3, failures=len(failures))
        return outcome

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

    def _finish(self, claim: Claim, job_id: str, state: str, reason: str | None, tb: str | None = None) -> Outcome:
        self.store.finish_job(job_id, state, reason, tb)  # committed first ...
        self.spool.finish(claim, state, reason)  # ... then moved; recover() settles a crash in between
        return Outcome(job_id, state, reason)

    @contextmanager
    def _lease_renewal(self, claim: Claim) -> Iterator[None]:
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.spool.lease_seconds / 3):
                self.spool.renew(claim)

        thread = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # units --------------------------------------------------------------------------------------
    def _run_units(self, job: Job, resume: bool) -> list[str]:
        """Answer each unit of the job; returns one line per media unit that failed."""
        failures: list[str] = []
        settings = job.settings_dict()
        units = job.units()
        ahead: dict[int, Future[Request]] = {}  # the next unit's media, decoded while this one generates

        def start(index: int) -> Future[Request]:
            return self._prefetch.submit(self.pipeline.prepare, job.prompt, units[index], job.media_settings)

        bar = tqdm(units, desc=job.id, unit="answer", disable=not sys.stderr.isatty(), file=sys.stderr)
        for index, unit in enumerate(bar):
            if self.abort_requested:
                raise HandBack
            paths = [str(p) for p in unit]
            try:
                hashes = [file_sha256(p) for p in unit]
            except OSError as exc:
                reason = f"{exc.filename}: cannot read ({exc.strerror})"
                self.store.add_result(job.id, {"media_paths": _json(paths), "prompt": job.prompt, "error": reason})
                failures.append(reason)
                continue
            key = cache_key(hashes, job.prompt, settings, self.model_id)
            if resume and self.store.linked(job.id, key) is not None:
                continue  # answered by an earlier attempt of this job
            previous = None if self.force else self.store.previous_answer(key)
            if previous is not None:
                self.store.link(job.id, previous, reused=True)
                self._write_sidecar(job, unit, previous)
                continue
            base = {
                "media_paths": _json(paths),
                "media_sha256": _json(hashes),
                "cache_key": key,
                "prompt": job.prompt,
                "settings": _json(settings),
                "tags": _json(job.tags),
                "model_id": self.model_id,
            }
            try:
                request = ahead.pop(index, None) or start(index)
                if index + 1 < len(units):
                    ahead[index + 1] = start(index + 1)
                result = self.pipeline.answer(request.result(), job.generation, on_text=self._check_abort)
            except VlbatchError as exc:  # unreadable media, too long a prompt: this unit only
                self.store.add_result(job.id, {**base, "cache_key": None, "error": str(exc)})
                failures.append(str(exc))
                continue
            timings = result.timings
            row = {
                **base,
                "answer": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "image_tokens": result.image_tokens,
                "output_tokens": result.output_tokens,
                "tiles": result.tiles,
                "preprocess_ms": timings.preprocess_ms,
                "vit_ms": timings.vit_ms,
                "prefill_ms": timings.prefill_ms,
                "ttft_ms": timings.ttft_ms,
                "decode_ms": timings.decode_ms,
                "tokens_per_s": timings.tokens_per_s,
                "backend": self.pipeline.backend.name,
            }
            result_id = self.store.add_result(job.id, row)
            self._write_sidecar(job, unit, result_id)
        return failures

    def _check_abort(self, _text: str) -> None:
        if self.abort_requested:
            raise HandBack

    def _write_sidecar(self, job: Job, unit: tuple[Path, ...], result_id: int) -> None:
        """<media>.txt beside a single media file, atomically; never over a file vlbatch did not write."""
        if not job.sidecar or len(unit) != 1:
            return
        path = unit[0].with_suffix(".txt")
        answer = self.store.result(result_id)["answer"] or ""
        if path.exists() and not job.sidecar_overwrite:
            recorded = self.store.sidecar_sha256(path)
            if recorded is None or recorded != file_sha256(path):
                event(log, "sidecar.kept", logging.WARNING, path=path, reason="exists and was not written by vlbatch")
                return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(answer, encoding="utf-8")
        os.replace(tmp, path)
        self.store.record_sidecar(path, file_sha256(path), result_id)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
