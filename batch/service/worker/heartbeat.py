"""Workers report themselves: each `run`/`watch` process (a Ray head too) keeps a row of the `workers` table current.

A thread writes the row every `spool.heartbeat_seconds`, and at once (at most once a second) when the worker starts
or ends a job or changes state: host, pid, command, state (idle, busy, paused, waiting for a worker slot, stopping,
stopped), the jobs and the file it is on, and the time of the beat. A worker that misses two beats is gone (killed,
frozen, its host down): `vlbatch status` then shows its job as stalled, never as running. The same beat renews the
`heartbeat_utc` of the Ray actors the head holds, so one rule says whether anything is alive.

Each beat opens its own short connection (the worker's is not shared across threads, and a database file replaced
under the worker is followed); a beat that meets a locked or full database is skipped and logged, never fatal.
The beat also reads `request`, what an operator asked of this worker (`vlbatch pause`), and hands it to the worker.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from batch.service.logs import event
from batch.service.store.store import utc_now

log = logging.getLogger("batch.service.worker.heartbeat")

MISSED_BEATS = 2  # a worker silent for this many of its intervals is gone
MIN_SPACING_SECONDS = 1.0  # a change (a job, a state) is written at once, but at most one beat a second
# waiting: for a worker slot (spool.max_workers)
IDLE, BUSY, PAUSED, STOPPING, STOPPED, WAITING = "idle", "busy", "paused", "stopping", "stopped", "waiting"


def is_gone(heartbeat_utc: str | None, heartbeat_seconds: float | None, state: str | None, now: datetime) -> bool:
    """Whether a worker row says its worker is no longer there: it stopped, or missed MISSED_BEATS beats."""
    if state == STOPPED or not heartbeat_utc:
        return True
    silent = (now - datetime.fromisoformat(heartbeat_utc)).total_seconds()
    return silent > MISSED_BEATS * (heartbeat_seconds or 5.0)


def worker_gone(row: dict[str, Any], now: datetime) -> bool:
    """`is_gone` of a `workers` row: stopped, or silent for MISSED_BEATS of its own beat intervals."""
    return is_gone(row.get("heartbeat_utc"), row.get("heartbeat_seconds"), row.get("state"), now)


@dataclass
class _Doing:
    state: str = IDLE
    jobs: dict[str, str | None] = field(default_factory=dict)  # job id -> the file being answered now


class Heartbeat:
    """The `workers` row of one process, written every `interval` seconds by a daemon thread until `stop()`."""

    def __init__(
        self,
        database: Path,
        command: str,
        model_id: str,
        interval: float,
        busy_timeout_seconds: float = 5.0,
        worker_id: str | None = None,
        on_request: Callable[[str], bool] | None = None,
    ) -> None:
        self.database = Path(database)
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.command = command
        self.model_id = model_id
        self.interval = interval
        self.busy_timeout_seconds = busy_timeout_seconds
        self.on_request = on_request  # returns True when it acted on the request (then it is cleared)
        self.holds_actors = False  # a Ray head: its beat renews its actors' heartbeat_utc too
        self._doing = _Doing()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_utc = utc_now()
        self._stopped_utc: str | None = None
        self._failing = False

    # what the worker is doing -------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        """idle, busy, paused or stopping; written at once (not at the next beat)."""
        with self._lock:
            changed = self._doing.state != state
            self._doing.state = state
        if changed:
            self._wake.set()

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self._doing.jobs[job_id] = None
            if self._doing.state == IDLE:
                self._doing.state = BUSY
        self._wake.set()

    def on_file(self, job_id: str, file: str | None) -> None:
        """The file (or unit) a job is answering now; written with the next beat. Not at once: a beat at every
        file's start would write in step with the worker's own commits (and stretch them, waiting for the GIL)."""
        with self._lock:
            if job_id in self._doing.jobs:
                self._doing.jobs[job_id] = file

    def job_ended(self, job_id: str) -> None:
        with self._lock:
            self._doing.jobs.pop(job_id, None)
            if not self._doing.jobs and self._doing.state == BUSY:
                self._doing.state = IDLE
        self._wake.set()

    # the thread ---------------------------------------------------------------------------------
    def start(self) -> Heartbeat:
        self.beat()  # the row exists before the worker takes its first job
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The last beat: state stopped, with the time (status stops listing the worker)."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.busy_timeout_seconds + 5)
        with self._lock:
            self._doing = _Doing(state=STOPPED)
        self._stopped_utc = utc_now()
        self.beat()

    def _run(self) -> None:
        """A beat every `interval` from the last one; a change wakes it sooner, at most one beat per MIN_SPACING."""
        last = time.monotonic()
        while not self._done.is_set():
            woken = self._wake.wait(max(0.0, last + self.interval - time.monotonic()))
            self._wake.clear()
            if woken:
                self._done.wait(max(0.0, last + min(MIN_SPACING_SECONDS, self.interval) - time.monotonic()))
            if self._done.is_set():
                return
            self.beat()
            last = time.monotonic()

    def beat(self) -> None:
        """Write the row now and take any request an operator left for this worker."""
        with self._lock:
            state = self._doing.state
            jobs = dict(self._doing.jobs)
        now = utc_now()
        row = {
            "id": self.id,
            "host": self.id.rsplit(":", 1)[0],
            "pid": os.getpid(),
            "command": self.command,
            "model_id": self.model_id,
            "state": state,
            "job_id": ", ".join(jobs) or None,
            "file": ", ".join(f for f in jobs.values() if f) or None,
            "heartbeat_seconds": self.interval,
            "started_utc": self._started_utc,
            "heartbeat_utc": now,
            "stopped_utc": self._stopped_utc,
        }
        try:
            request = self._write(row)
        except (sqlite3.Error, OSError) as exc:
            if not self._failing:
                event(log, "heartbeat.failed", logging.WARNING, worker=self.id, error=str(exc))
            self._failing = True
            return
        if self._failing:
            event(log, "heartbeat.resumed", worker=self.id)
        self._failing = False
        if request and self.on_request is not None and self.on_request(request):
            self._clear_request(request)

    def _connect(self) -> sqlite3.Connection:
        if not self.database.is_file():  # never create a database by beating into a path that has none
            raise FileNotFoundError(f"{self.database}: no database")
        conn = sqlite3.connect(self.database, timeout=self.busy_timeout_seconds, isolation_level=None)
        return conn

    def _write(self, row: dict[str, object]) -> str | None:
        """The row, and a Ray head's actors, each written by one statement in its own transaction: the write lock
        is never held across statements (where this thread would wait for the GIL, and a worker suspended there,
        SIGSTOP or a laptop lid, would hold every other worker's writes)."""
        conn = self._connect()
        try:
            names = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            updates = ", ".join(f"{name} = excluded.{name}" for name in row if name != "id")
            conn.execute(
                f"INSERT INTO workers ({names}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}",
                list(row.values()),
            )
            if self.holds_actors and self._stopped_utc is None:  # a Ray head's actors live as long as it beats
                conn.execute(
                    "UPDATE actors SET heartbeat_utc = ? WHERE head = ? AND state IN ('starting', 'ready')",
                    [row["heartbeat_utc"], self.id],
                )
            return conn.execute("SELECT request FROM workers WHERE id = ?", [self.id]).fetchone()[0]
        finally:
            conn.close()

    def _clear_request(self, request: str) -> None:
        try:
            conn = self._connect()
            try:
                conn.execute("UPDATE workers SET request = NULL WHERE id = ? AND request = ?", [self.id, request])
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            event(log, "heartbeat.failed", logging.WARNING, worker=self.id, error=str(exc))
