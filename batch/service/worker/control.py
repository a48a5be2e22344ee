"""Operator control: `vlbatch cancel`, `vlbatch pause` and `vlbatch resume`, and what a worker makes of them.

The operator's side writes requests and moves nothing a worker holds:
- `cancel_jobs`: a job still queued (its file in the inbox, found by its `id:` or its name) is claimed like a worker
  claims it and moved to `cancelled/` with a reason file, with a run recorded as cancelled; a running job gets
  `cancel_requested_utc` and `cancelled_by` in the database, and its worker ends it (see below);
- `ask_workers`: `pause` or `resume` left in `workers.request` for the named (or every live) worker, which takes it
  at its next heartbeat (batch.service.worker.heartbeat); `wait_until_paused` watches their rows say so.

The worker's side (batch.service.worker.worker) uses the pieces here:
- `PauseSwitch` takes pause and resume from the heartbeat thread; the worker holds between units (and takes no
  job, unit or standing pass) while it is set, its model loaded and its claim's lease renewed;
- `JobCancelled` ends a job whose cancel was asked: looked for before every unit and, throttled by `Every`, while a
  unit decodes or generates; the unit in progress is dropped (nothing of it is recorded);
- `PreEmpted` hands a job back between units when a ready inbox job has a higher priority (single workers only).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batch.config import Config
from batch.errors import VlbatchError
from batch.service.logs import event
from batch.service.spool.jobfile import JobRejected, load_job_text
from batch.service.spool.spool import JOB_SUFFIXES, Spool, is_job_name
from batch.service.spool.standing import CLAIM_PREFIX
from batch.service.spool.states import JobState
from batch.service.store.store import Store, utc_now
from batch.service.worker.heartbeat import PAUSED, STOPPED, worker_gone

log = logging.getLogger("batch.service.worker.control")

PAUSE, RESUME = "pause", "resume"
REQUESTS = (PAUSE, RESUME)
CANCEL_POLL_SECONDS = 0.5  # while a unit generates, a cancel is looked for at most this often
PREEMPT_POLL_SECONDS = 0.5  # between units, the inbox is looked at for a job of higher priority at most this often
PREEMPT_SHARE = 20  # ... and at most about 1/20 of the time (a scan of a very large inbox takes tens of ms)
RACE_SECONDS = 5.0  # a queued job a worker claimed just before the cancel: how long its start is waited for

# what cancel_jobs did with each job id
CANCELLED, REQUESTED, UNKNOWN, FINISHED = "cancelled", "requested", "unknown", "finished"


# the worker's side ---------------------------------------------------------------------------------
class JobCancelled(Exception):
    """An operator cancelled the job this worker runs: end it cancelled, keeping the answers recorded so far."""

    def __init__(self, job_id: str, when: str, who: str | None) -> None:
        super().__init__(f"cancelled by {who or 'an operator'} at {when} (vlbatch cancel)")
        self.job_id = job_id


class PreEmpted(Exception):
    """A ready inbox job has a higher priority: hand this one back, to resume after it without redoing answers."""

    def __init__(self, job_id: str, by: Path, priority: int, own: int) -> None:
        super().__init__(
            f"pre-empted by {by.name} (priority {priority} > {own}); resumes later without redoing its answered files"
        )
        self.job_id = job_id
        self.by = by
        self.priority = priority


class Every:
    """Says `due()` at most once every `seconds` (monotonic clock); `hold(s)` pushes the next time further out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.seconds
        return True

    def restart(self) -> None:
        """Not due before `seconds` from now."""
        self._next = time.monotonic() + self.seconds

    def hold(self, seconds: float) -> None:
        self._next = max(self._next, time.monotonic() + seconds)


class PauseSwitch:
    """`vlbatch pause`/`resume` as one worker process takes them: set from its heartbeat thread, read by its loops."""

    def __init__(self, wake: threading.Event, worker: str) -> None:
        self.paused = False
        self._wake = wake
        self._worker = worker

    def on_request(self, request: str) -> bool:
        """The heartbeat's callback: True when the request was taken (the heartbeat then clears it)."""
        if request not in REQUESTS:
            event(log, "worker.request_ignored", logging.WARNING, worker=self._worker, request=request)
            return True  # cleared: an unknown word would otherwise come back at every beat
        self.paused = request == PAUSE
        event(log, f"worker.{request}_asked", worker=self._worker)
        self._wake.set()
        return True


# the operator's side -------------------------------------------------------------------------------
def asker() -> str:
    """user@host of the person running the command (recorded as `cancelled_by`)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment and none in the password database
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def cancel_jobs(config: Config, job_ids: list[str], who: str | None = None) -> list[dict[str, Any]]:
    """Cancel each job: queued ones at once, running ones by asking their worker. One dict per job id, saying what
    was done (`action`: cancelled, requested, unknown, finished), with `ok` False for the last two."""
    who = who or asker()
    spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()
    store = Store(config.spool.database, config.spool.database_timeout_seconds, spool=spool.root)
    try:
        return [_cancel_one(spool, store, job_id, who) for job_id in job_ids]
    finally:
        store.close()


def _cancel_one(spool: Spool, store: Store, job_id: str, who: str) -> dict[str, Any]:
    reason = f"cancelled by {who} at {utc_now()} (vlbatch cancel)"
    row = store.job(job_id)
    held = row is not None and row["state"] == JobState.RUNNING.value and _held_run(spool, row)
    moved, raced = [], False
    for path, file_job_id in queued_files(spool, job_id):
        claim = spool.claim(path)
        if claim is None:  # a worker took it first: it runs now, so its worker is asked below
            raced = True
            continue
        target = spool.finish(claim, JobState.CANCELLED, reason)
        store.record_cancelled(file_job_id, claim.name, who, reason, update_job=not held)
        event(log, "job.cancelled", job=file_job_id, file=claim.name, moved_to=target, by=who)
        moved.append(str(target))
    result: dict[str, Any] = {"job": job_id, "files": moved, "worker": None, "ok": True}
    if held or raced:
        asked = store.request_cancel(job_id, who) if held else _request_after_start(store, job_id, who, row)
        if asked is not None:
            event(log, "job.cancel_requested", job=job_id, worker=asked["worker"], by=who)
            standing = (asked.get("claim") or "").startswith(CLAIM_PREFIX)
            then = (
                "the current pass ends cancelled; the standing job stays (remove its file to stop it for good)"
                if standing
                else f"it ends cancelled and its file moves to {spool.cancelled}"
            )
            message = (
                f"asked worker {asked['worker']} to cancel {job_id}: the unit it is answering is dropped, the "
                f"answers already recorded stay; {then}"
            )
            return {**result, "action": REQUESTED, "worker": asked["worker"], "message": _joined(moved, message)}
    if moved:
        return {**result, "action": CANCELLED, "message": _joined(moved, "")}
    row = store.job(job_id)
    if row is None:
        message = f"{job_id}: no such job in the inbox ({spool.inbox}) or the database ({store.path})"
        named = [spool.inbox / f"{job_id}{suffix}" for suffix in JOB_SUFFIXES]
        for path in (p for p in named if p.is_file()):  # a file of that name whose `id:` says otherwise
            message += f"; {path.name} is there under another id: `vlbatch cancel {path.name}` names the file"
        return {**result, "action": UNKNOWN, "ok": False, "message": message}
    when = row["finished_utc"] or row["started_utc"] or "?"
    message = f"{job_id}: already finished ({row['state']} at {when}); nothing to cancel"
    if row.get("standing"):
        message += " (a standing job between passes: remove its file from standing/ to stop it for good)"
    return {**result, "action": FINISHED, "ok": False, "state": row["state"], "message": message}


def _joined(moved: list[str], then: str) -> str:
    parts = [f"cancelled the queued file, now {path}" for path in moved]
    return "; ".join([*parts, then] if then else parts)


def _held_run(spool: Spool, row: dict[str, Any]) -> bool:
    """Whether a running job's run is held by a worker (alive, or dead and to be taken back from work/): then that
    worker, or the next one, ends it. False when its file went back to the inbox (handed back)."""
    claim = row.get("claim") or ""
    if claim.startswith(CLAIM_PREFIX):
        return True
    return not claim or os.path.lexists(spool.work / claim)


def _request_after_start(store: Store, job_id: str, who: str, before: dict[str, Any] | None) -> dict[str, Any] | None:
    """A worker claimed the file between our look and our claim: wait (a little) for it to start the job, then ask."""
    deadline = time.monotonic() + RACE_SECONDS
    while time.monotonic() < deadline:
        row = store.job(job_id)
        started = row is not None and row["state"] == JobState.RUNNING.value
        if started and (before is None or row["started_utc"] != before.get("started_utc")):
            return store.request_cancel(job_id, who)
        time.sleep(0.05)
    return None


def queued_files(spool: Spool, job_id: str) -> list[tuple[Path, str]]:
    """Job files in the inbox of this job, with their job id: those whose `id:` is `job_id` (or, without one, whose
    stem is), and the file named `job_id` itself.

    Only files that hold the id's text or carry its name are parsed, so a large inbox costs one read of each."""
    found = []
    needle = job_id.encode("utf-8", "surrogateescape")
    with os.scandir(spool.inbox) as entries:
        for entry in entries:
            if not is_job_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            named = job_id in (entry.name, Path(entry.name).stem)
            if not named and not _holds(entry.path, needle):
                continue
            file_job_id = _job_id_of(Path(entry.path))
            if file_job_id == job_id or entry.name == job_id:
                found.append((Path(entry.path), file_job_id))
    return sorted(found)


def _holds(path: str, needle: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return needle in fh.read()
    except OSError:
        return False


def _job_id_of(path: Path) -> str:
    """The id a worker gives the job file: its `id:`, else its name's stem (a file that cannot be read: the stem)."""
    try:
        _, mapping = load_job_text(path)
    except JobRejected:
        return path.stem
    job_id = mapping.get("id")
    return job_id if isinstance(job_id, str) else path.stem


# pause and resume ----------------------------------------------------------------------------------
def ask_workers(config: Config, request: str, names: list[str]) -> list[dict[str, Any]]:
    """Leave `request` for the named workers (host:pid), or for every live worker of this database without names.

    VlbatchError naming the worker for one that is unknown or gone, or when no worker is live at all."""
    assert request in REQUESTS, request
    from batch.service.reports.reports import require_database

    store = Store(require_database(config), config.spool.database_timeout_seconds, spool=config.spool.dir)
    try:
        now = datetime.now(timezone.utc)
        targets = [_named_worker(store, name, now) for name in names] if names else _live_workers(store, now)
        if not targets:
            raise VlbatchError(f"no live worker in {store.path}: none to {request}")
        store.request_workers([row["id"] for row in targets], request)
        return [
            {"worker": row["id"], "command": row["command"], "state": row["state"], "job": row["job_id"]}
            for row in targets
        ]
    finally:
        store.close()


def _live(row: dict[str, Any], now: datetime) -> bool:
    return not worker_gone(row, now)


def _live_workers(store: Store, now: datetime) -> list[dict[str, Any]]:
    return [row for row in store.workers() if _live(row, now)]


def _named_worker(store: Store, name: str, now: datetime) -> dict[str, Any]:
    row = store.worker(name)
    if row is None:
        live = ", ".join(row["id"] for row in _live_workers(store, now)) or "none"
        raise VlbatchError(f"{name}: no such worker in {store.path} (live workers: {live}; names are host:pid)")
    if not _live(row, now):
        said = "stopped" if row["state"] == STOPPED else f"gone (last heartbeat {row['heartbeat_utc']})"
        raise VlbatchError(f"{name}: that worker has {said}")
    return row


def wait_until_paused(config: Config, worker_ids: list[str], timeout: float) -> list[str]:
    """Wait until each worker's row says paused (or it stopped or went); returns those still not paused."""
    store = Store(config.spool.database, config.spool.database_timeout_seconds)
    try:
        deadline = time.monotonic() + timeout
        while True:
            now = datetime.now(timezone.utc)
            waiting = []
            for worker_id in worker_ids:
                row = store.worker(worker_id)
                if row is not None and _live(row, now) and row["state"] != PAUSED:
                    waiting.append(worker_id)
            if not waiting or time.monotonic() >= deadline:
                return waiting
            time.sleep(0.1)
    finally:
        store.close()
