"""The results database (SQLite through sqlite-utils): schema migrations, job rows, answers and their timings.

Tables (see README, "The database"):
- `jobs`: one row per job id, its state, attempts, worker and error.
- `results`: one row per generated answer (or per media file that failed), with token counts and timings.
- `job_results`: which answers belong to which job, including earlier answers a job reused.
- `sidecars`: the `.txt` files vlbatch wrote next to media, so it never overwrites someone else's.
- `results_fts`: full-text index over answers and prompts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from batch.infer.safe_open import sha256_of

migrations = sqlite_utils.Migrations("vlbatch")

JOB_STATES = ("running", "done", "failed", "rejected")
RESULT_COLUMNS = (
    "id",
    "job_id",
    "media_paths",
    "media_sha256",
    "cache_key",
    "prompt",
    "answer",
    "error",
    "finish_reason",
    "prompt_tokens",
    "image_tokens",
    "output_tokens",
    "tiles",
    "preprocess_ms",
    "vit_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_ms",
    "tokens_per_s",
    "backend",
    "model_id",
    "settings",
    "tags",
    "created_utc",
)


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["jobs"].create(
        {
            "id": str,
            "source": str,
            "job_sha256": str,
            "prompt": str,
            "mode": str,
            "tags": str,
            "state": str,
            "attempts": int,
            "worker": str,
            "claim": str,
            "media_count": int,
            "answered": int,
            "reused": int,
            "failed_media": int,
            "error": str,
            "traceback": str,
            "created_utc": str,
            "started_utc": str,
            "finished_utc": str,
        },
        pk="id",
    )
    db["jobs"].create_index(["state", "finished_utc"])
    db["jobs"].create_index(["claim"])
    db["results"].create(
        {
            "id": int,
            "job_id": str,
            "media_paths": str,
            "media_sha256": str,
            "cache_key": str,
            "prompt": str,
            "answer": str,
            "error": str,
            "finish_reason": str,
            "prompt_tokens": int,
            "image_tokens": int,
            "output_tokens": int,
            "tiles": int,
            "preprocess_ms": float,
            "vit_ms": float,
            "prefill_ms": float,
            "ttft_ms": float,
            "decode_ms": float,
            "tokens_per_s": float,
            "backend": str,
            "model_id": str,
            "settings": str,
            "tags": str,
            "created_utc": str,
        },
        pk="id",
    )
    db["results"].create_index(["cache_key"])
    db["results"].create_index(["job_id"])
    db["results"].create_index(["created_utc"])
    db["job_results"].create({"job_id": str, "result_id": int, "reused": int}, pk=("job_id", "result_id"))
    db["job_results"].create_index(["result_id"])
    db["sidecars"].create({"path": str, "sha256": str, "result_id": int}, pk="path")
    db["results"].enable_fts(["answer", "prompt"], create_triggers=True)


@migrations()
def m002_unit_in_flight(db: sqlite_utils.Database) -> None:
    # the unit a job's worker started last and has not finished: a worker that dies in it twice skips it
    db["jobs"].add_column("inflight", str)
    db["jobs"].add_column("inflight_deaths", int)


class JobIdBusy(Exception):
    """Another file with the same job id is running now (its claim is alive)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job id {job['id']} is running now from {job['source']} (worker {job['worker']})")
        self.job = job


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def cache_key(media_sha256: Sequence[str], prompt: str, settings: dict[str, Any], model_id: str) -> str:
    """What makes two answers interchangeable: the same media bytes, prompt, settings and model."""
    payload = json.dumps(
        {"media": list(media_sha256), "prompt": prompt, "settings": settings, "model": model_id}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a regular file, opened without following a final symlink or blocking; MediaError if refused."""
    return sha256_of(path)


class Store:
    """All reads and writes of the database file; migrates it when opened."""

    def __init__(self, path: Path, busy_timeout_seconds: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(self.path)
        # several workers share one file: a writer waits this long for the lock, then the worker backs off
        self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process at a time switches to WAL and migrates
            self.db.enable_wal()
            migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """A write transaction that takes the write lock up front (BEGIN IMMEDIATE).

        With several workers on one file, a plain deferred transaction that reads and then writes can fail
        at once with "database is locked"; an immediate one waits its turn (busy_timeout) instead.
        """
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():  # nested: a savepoint
                yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.rollback()
            raise
        conn.execute("COMMIT")

    # jobs ---------------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = list(self.db["jobs"].rows_where("id = ?", [job_id]))
        return rows[0] if rows else None

    def start_job(
        self, job_id: str, fields: dict[str, Any], worker: str, claim_alive: Callable[[str], bool] = lambda _: False
    ) -> int:
        """Mark a job running; returns its attempt number (a job found still running was interrupted).

        JobIdBusy when the job id is running under another claim that `claim_alive` says is still held: two
        files with one id never run at once, and their attempts are never counted as one job's.
        """
        with self.atomic():
            previous = self.job(job_id)
            resumed = previous is not None and previous["state"] == "running"
            if resumed and previous["claim"] != fields.get("claim") and claim_alive(previous["claim"] or ""):
                raise JobIdBusy(previous)
            attempts = previous["attempts"] + 1 if resumed else 1
            row = {
                **fields,
                "id": job_id,
                "state": "running",
                "attempts": attempts,
                "worker": worker,
                "error": None,
                "traceback": None,
                "started_utc": utc_now(),
                "finished_utc": None,
                "created_utc": previous["created_utc"] if resumed else utc_now(),
                **({} if resumed else {"inflight": None, "inflight_deaths": 0}),
            }
            self.db["jobs"].upsert(row, pk="id")
        return attempts

    def hand_back(self, job_id: str) -> None:
        """A job returned to the inbox by a live worker (a stop signal, a passing fault): not an attempt."""
        with self.atomic():
            self.db.execute(
                "UPDATE jobs SET attempts = max(attempts - 1, 0) WHERE id = ? AND state = 'running'", [job_id]
            )

    def begin_unit(self, job_id: str, unit: str) -> int:
        """Record that the worker starts answering `unit`; returns how often a worker already died in it."""
        with self.atomic():
            row = self.db.execute("SELECT inflight, inflight_deaths FROM jobs WHERE id = ?", [job_id]).fetchone()
            deaths = (row[1] or 0) + 1 if row and row[0] == unit else 0
            self.db.execute("UPDATE jobs SET inflight = ?, inflight_deaths = ? WHERE id = ?", [unit, deaths, job_id])
        return deaths

    def end_unit(self, job_id: str) -> None:
        with self.atomic():
            self.db.execute("UPDATE jobs SET inflight = NULL, inflight_deaths = 0 WHERE id = ?", [job_id])

    def clear_links(self, job_id: str) -> None:
        """Forget which answers belong to a job before a fresh run of it (the answers stay)."""
        self.db.execute("DELETE FROM job_results WHERE job_id = ?", [job_id])  # sqlite-utils commits it

    def finished_claim(self, claim: str) -> dict[str, Any] | None:
        """The job row that a claim committed as finished, if any (for a crash before the final move)."""
        rows = list(self.db["jobs"].rows_where("claim = ? AND state IN ('done', 'failed')", [claim]))
        return rows[0] if rows else None

    def finish_job(self, job_id: str, state: str, error: str | None = None, traceback: str | None = None) -> None:
        assert state in JOB_STATES
        with self.atomic():
            counts = self.db.execute(
                "SELECT count(*), coalesce(sum(jr.reused), 0), coalesce(sum(r.error IS NOT NULL), 0) "
                "FROM job_results jr JOIN results r ON r.id = jr.result_id WHERE jr.job_id = ?",
                [job_id],
            ).fetchone()
            self.db["jobs"].update(
                job_id,
                {
                    "state": state,
                    "error": error,
                    "traceback": traceback,
                    "finished_utc": utc_now(),
                    "answered": counts[0] - counts[1] - counts[2],
                    "reused": counts[1],
                    "failed_media": counts[2],
                },
            )

    def record_rejected(self, job_id: str, source: str, reason: str) -> None:
        now = utc_now()
        self.db["jobs"].upsert(
            {
                "id": job_id,
                "source": source,
                "state": "rejected",
                "attempts": 0,
                "error": reason,
                "created_utc": now,
                "finished_utc": now,
            },
            pk="id",
        )

    # results ------------------------------------------------------------------------------------
    def previous_answer(self, key: str) -> int | None:
        """The newest successful answer with this cache key (an indexed lookup)."""
        row = self.db.execute(
            "SELECT id FROM results WHERE cache_key = ? AND error IS NULL ORDER BY id DESC LIMIT 1", [key]
        ).fetchone()
        return row[0] if row else None

    def linked(self, job_id: str, key: str) -> int | None:
        """An answer with this key already linked to the job (by an interrupted earlier attempt)."""
        row = self.db.execute(
            "SELECT r.id FROM job_results jr JOIN results r ON r.id = jr.result_id "
            "WHERE jr.job_id = ? AND r.cache_key = ? LIMIT 1",
            [job_id, key],
        ).fetchone()
        return row[0] if row else None

    def add_result(self, job_id: str, row: dict[str, Any]) -> int:
        """Insert one answer (or one media failure) and link it to the job, in one transaction."""
        unknown = set(row) - set(RESULT_COLUMNS)
        assert not unknown, unknown
        with self.atomic():
            result_id = self.db["results"].insert({**row, "job_id": job_id, "created_utc": utc_now()}).last_pk
            self.link(job_id, result_id, reused=False)
        return int(result_id)

    def link(self, job_id: str, result_id: int, reused: bool) -> None:
        self.db["job_results"].insert(
            {"job_id": job_id, "result_id": result_id, "reused": int(reused)}, pk=("job_id", "result_id"), ignore=True
        )

    def result(self, result_id: int) -> dict[str, Any]:
        return self.db["results"].get(result_id)

    # sidecars -----------------------------------------------------------------------------------
    def sidecar_sha256(self, path: Path) -> str | None:
        row = self.db.execute("SELECT sha256 FROM sidecars WHERE path = ?", [str(path)]).fetchone()
        return row[0] if row else None

    def record_sidecar(self, path: Path, sha256: str, result_id: int) -> None:
        self.db["sidecars"].upsert({"path": str(path), "sha256": sha256, "result_id": result_id}, pk="path")

    # queries ------------------------------------------------------------------------------------
    def counts_by_state(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state")}

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        return list(
            self.db["jobs"].rows_where(
                "state IN ('failed', 'rejected')", order_by="finished_utc DESC", limit=limit, select="id, state, error"
            )
        )

    def throughput(self, since_utc: str) -> dict[str, float]:
        row = self.db.execute(
            "SELECT count(*), coalesce(sum(output_tokens), 0), coalesce(sum(decode_ms), 0), "
            "coalesce(avg(ttft_ms), 0) FROM results WHERE created_utc >= ? AND error IS NULL",
            [since_utc],
        ).fetchone()
        return {
            "answers": row[0],
            "output_tokens": row[1],
            "tokens_per_s": row[1] / (row[2] / 1e3) if row[2] else 0.0,
            "mean_ttft_ms": row[3],
        }

    def query_results(
        self,
        job: str | None = None,
        since: str | None = None,
        until: str | None = None,
        tag: str | None = None,
        search: str | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Answers, newest first, filtered by job, creation time, tag and full-text search."""
        where, args = [], []
        if job:
            where.append("r.id IN (SELECT result_id FROM job_results WHERE job_id = ?)")
            args.append(job)
        if since:
            where.append("r.created_utc >= ?")
            args.append(since)
        if until:
            where.append("r.created_utc < ?")
            args.append(until)
        if tag:
            where.append("EXISTS (SELECT 1 FROM json_each(r.tags) t WHERE t.value = ? OR t.key = ?)")
            args += [tag, tag]
        if search:
            where.append("r.id IN (SELECT rowid FROM results_fts WHERE results_fts MATCH ?)")
            args.append(search)
        sql = "SELECT r.* FROM results r"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
