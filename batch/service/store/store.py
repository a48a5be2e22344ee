"""The results database (SQLite through sqlite-utils): its schema, and every read and write of it.

The migrations below are the one definition of the schema; everything else reads column names from the
database. Tables (see docs/results.md, "The database"):
- `jobs`: one row per job id: its latest run's state, attempts, worker and error.
- `runs`: one row per execution of a job file (all its attempts), kept as history.
- `results`: one row per generated answer (or per media file that failed), with token counts and timings.
- `job_results`: every answer a run owns, generated or reused, with that run's own media paths and hashes.
- `sidecars`: the `.txt` files vlbatch wrote next to media, so it never overwrites someone else's.
- `actors`: the Ray actors (`run --ray`) a head has used: node, backend, answers, speed, last error.
- `standing_files`: every file a standing job tracks: its size, mtime and hash when last seen, its answer.
- `results_fts`: full-text index over answers and prompts.

Upgrades: sqlite-utils records each applied migration in `_sqlite_migrations`. A database that carries a migration
this vlbatch does not know was migrated by a newer vlbatch: every command refuses it (DatabaseTooNew) before
opening it for anything but that one read (`refuse_newer`). A database that lacks migrations is migrated when a
store opens it, in one transaction, and only when no worker of the older vlbatch still runs (`Store.upgrade`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlite_utils

from batch import __version__
from batch.errors import VlbatchError
from batch.infer.safe_open import sha256_of
from batch.service.faults import DatabaseCorrupt, describe, is_corrupt_database
from batch.service.spool.states import JobState
from batch.service.store.paths import encode_path, storable_text
from batch.service.store.records import DECODE_SHARE_MS, DECODE_TOKENS
from batch.service.store.result_filter import ResultFilter

migrations = sqlite_utils.Migrations("vlbatch")


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


@migrations()
def m003_runs_and_exact_links(db: sqlite_utils.Database) -> None:
    """Run history, and links that carry the run's own media paths (a reused answer keeps its file)."""
    db["runs"].create(
        {
            "id": int,
            "job_id": str,
            "source": str,
            "job_sha256": str,
            "prompt": str,
            "mode": str,
            "tags": str,
            "claim": str,
            "worker": str,
            "state": str,
            "attempts": int,
            "media_count": int,
            "answered": int,
            "reused": int,
            "failed_media": int,
            "error": str,
            "traceback": str,
            "started_utc": str,
            "finished_utc": str,
        },
        pk="id",
    )
    db["runs"].create_index(["job_id"])
    db["runs"].create_index(["started_utc"])
    db["jobs"].add_column("run_id", int)
    # every job recorded so far had one run: its latest
    db.execute(
        "INSERT INTO runs (job_id, source, job_sha256, prompt, mode, tags, claim, worker, state, attempts, "
        "media_count, answered, reused, failed_media, error, traceback, started_utc, finished_utc) SELECT id, source, "
        "job_sha256, prompt, mode, tags, claim, worker, state, attempts, media_count, answered, reused, failed_media, "
        "error, traceback, "
        "coalesce(started_utc, created_utc), finished_utc FROM jobs ORDER BY created_utc, id"
    )
    db.execute("UPDATE jobs SET run_id = (SELECT max(runs.id) FROM runs WHERE runs.job_id = jobs.id)")
    db["links"].create(
        {
            "id": int,
            "job_id": str,
            "run_id": int,
            "result_id": int,
            "reused": int,
            "media_paths": str,
            "media_sha256": str,
            "created_utc": str,
        },
        pk="id",
    )
    # links made before runs existed carry the paths of the answer itself (the only paths recorded then)
    db.execute(
        "INSERT INTO links (job_id, run_id, result_id, reused, media_paths, media_sha256, created_utc) "
        "SELECT jr.job_id, j.run_id, jr.result_id, jr.reused, r.media_paths, r.media_sha256, r.created_utc "
        "FROM job_results jr JOIN jobs j ON j.id = jr.job_id JOIN results r ON r.id = jr.result_id "
        "ORDER BY r.id"
    )
    db["job_results"].drop()
    db.rename_table("links", "job_results")
    db["job_results"].create_index(["run_id", "media_paths"], unique=True)
    db["job_results"].create_index(["result_id"])
    db["job_results"].create_index(["job_id"])
    db["sidecars"].create_index(["sha256"])


@migrations()
def m004_nodes_and_actors(db: sqlite_utils.Database) -> None:
    """Which host answered (several machines may now answer one spool), and the Ray actors a head has used."""
    db["results"].add_column("node", str)
    db["actors"].create(
        {
            "id": str,
            "head": str,
            "node": str,
            "node_ip": str,
            "pid": int,
            "backend": str,
            "state": str,
            "answers": int,
            "output_tokens": int,
            "decode_ms": float,
            "last_error": str,
            "started_utc": str,
            "updated_utc": str,
        },
        pk="id",
    )
    db["actors"].create_index(["updated_utc"])


@migrations()
def m005_standing_jobs(db: sqlite_utils.Database) -> None:
    """Standing jobs (job files in spool/standing/ that run again on every pass), each file they track, and
    failures kept by cache key and class, so a file that fails the same way again is not news."""
    for table in ("jobs", "runs"):
        db[table].add_column("standing", int)
        db[table].add_column("unchanged", int)
        db[table].add_column("gone", int)
        db[table].add_column("new_failures", int)
    db["results"].add_column("error_class", str)
    db["job_results"].add_column("change", str)
    db["standing_files"].create(
        {
            "job_id": str,
            "path": str,
            "size": int,
            "mtime_ns": int,
            "sha256": str,
            "basis": str,
            "cache_key": str,
            "result_id": int,
            "link_id": int,
            "state": str,
            "error_class": str,
            "first_seen_utc": str,
            "updated_utc": str,
            "run_id": int,
        },
        pk=("job_id", "path"),
    )
    db["standing_files"].create_index(["job_id", "sha256"])
    db["standing_files"].create_index(["link_id"])


@migrations()
def m006_claim_fence(db: sqlite_utils.Database) -> None:
    """A generation number per job that grows with every start: a worker's writes for a job hold only while the
    number it started with is still the job's (a worker that lost its claim, suspended past its lease, is fenced)."""
    db["jobs"].add_column("fence", int)


# the answer first (then what it is about), as Datasette and `select *` show the table
RESULT_COLUMN_ORDER = ["id", "media_paths", "answer", "error", "prompt", "job_id", "created_utc"]
FOREIGN_KEYS = {  # declared for the viewers (Datasette links rows by them); SQLite does not enforce them here
    "jobs": [("run_id", "runs", "id")],
    "runs": [("job_id", "jobs", "id")],
    "results": [("job_id", "jobs", "id")],
    "job_results": [("job_id", "jobs", "id"), ("run_id", "runs", "id"), ("result_id", "results", "id")],
    "sidecars": [("result_id", "results", "id")],
    "standing_files": [
        ("job_id", "jobs", "id"),
        ("result_id", "results", "id"),
        ("link_id", "job_results", "id"),
        ("run_id", "runs", "id"),
    ],
}


@migrations()
def m007_workers_control_and_links(db: sqlite_utils.Database) -> None:
    """Workers that report themselves (heartbeats), operator control (cancel, pause, priority), a link's time
    under its own name (`linked_utc`: when a run took an answer, apart from the answer's `created_utc`), declared
    foreign keys, and the results table with the file and its answer first."""
    db["workers"].create(
        {
            "id": str,  # host:pid, as jobs.worker names it
            "host": str,
            "pid": int,
            "command": str,  # run, watch, run --ray, watch --ray
            "model_id": str,
            "state": str,  # idle, busy, paused, waiting (for a worker slot), stopping, stopped
            "job_id": str,
            "file": str,
            "request": str,  # what an operator asked of it and it has not done yet: pause, resume
            "heartbeat_seconds": float,
            "started_utc": str,
            "heartbeat_utc": str,
            "stopped_utc": str,
        },
        pk="id",
    )
    db["workers"].create_index(["heartbeat_utc"])
    for table in ("jobs", "runs"):
        db[table].add_column("priority", int)
        db[table].add_column("cancel_requested_utc", str)
        db[table].add_column("cancelled_by", str)
    db.execute("ALTER TABLE job_results RENAME COLUMN created_utc TO linked_utc")
    db["actors"].add_column("heartbeat_utc", str)
    triggers = [sql for _, table, sql in db.triggers if table == "results"]
    for table, keys in FOREIGN_KEYS.items():
        order = RESULT_COLUMN_ORDER if table == "results" else None
        db[table].transform(foreign_keys=keys, column_order=order)
    for sql in triggers:  # the full-text index's triggers went with the old table
        db.execute(sql.replace("CREATE TRIGGER", "CREATE TRIGGER IF NOT EXISTS", 1))


@migrations()
def m008_decode_rows(db: sqlite_utils.Database) -> None:
    """How many answers shared an answer's decode steps (their mean over its steps; 1: decoded alone), which its
    `decode_ms` and `tokens_per_s` are read against."""
    db["results"].add_column("decode_rows", float)


class DatabaseTooNew(VlbatchError):
    """The database carries migrations this vlbatch does not know: a newer vlbatch migrated it. Nothing of it is
    read further or written (not even its journal mode): this vlbatch must be upgraded (exit code 2)."""

    def __init__(self, path: Path, unknown: list[str], known: list[str]) -> None:
        super().__init__(
            f"{path} was migrated by a newer vlbatch ({', '.join(unknown)}; this vlbatch {__version__} knows up to "
            f"{known[-1]}): upgrade vlbatch here (install the newer release, with its extras) and start it again; "
            "nothing was changed"
        )
        self.unknown = unknown


@dataclass(frozen=True)
class OlderWorker:
    """A worker of an older vlbatch that still works on a database that needs migrations: `name` is its worker
    id (host:pid) where known, `what` says how it was seen (its heartbeat, a worker slot it holds)."""

    name: str
    what: str


class OlderWorkersRunning(VlbatchError):
    """The database needs migrations, and workers of the older vlbatch that uses it are still running: it is not
    migrated under them (exit code 3: it is migrated once they have stopped)."""

    def __init__(self, path: Path, pending: list[str], workers: list[OlderWorker]) -> None:
        seen = "; ".join(f"{w.name} ({w.what})" for w in workers)
        names = ", ".join(w.name for w in workers)
        super().__init__(
            f"{path} needs migrations ({', '.join(pending)}) and workers of an older vlbatch still use it ({seen}): "
            f"not migrated; stop the running workers ({names}), then start this one"
        )
        self.pending = pending
        self.workers = workers


def known_migrations() -> list[str]:
    """The migrations this vlbatch knows, in order (its newest last)."""
    return [m.name for m in migrations.pending(sqlite_utils.Database(memory=True, execute_plugins=False))]


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """The vlbatch migrations recorded in a database (sqlite-utils' `_sqlite_migrations` table), in order."""
    table = migrations.migrations_table
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [table]).fetchone():
        return []
    rows = conn.execute(f"SELECT name FROM [{table}] WHERE migration_set = ? ORDER BY rowid", [migrations.name])
    return [row[0] for row in rows]


def schema_check(conn: sqlite3.Connection, path: Path) -> list[str]:
    """The migrations the database still lacks; DatabaseTooNew when it carries one this vlbatch does not know."""
    known = known_migrations()
    applied = applied_migrations(conn)
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise DatabaseTooNew(path, unknown, known)
    return [name for name in known if name not in applied]


def refuse_newer(path: Path) -> list[str] | None:
    """DatabaseTooNew when a newer vlbatch migrated the file at `path`, read without writing anything; else the
    migrations it lacks (None when it cannot be read as a database: the caller's own open says why).

    Every command checks this before it opens the database. Reading a WAL database through an ordinary
    connection, even a read-only one, creates its -wal and -shm files: when there is no -wal (nor a rollback
    journal) beside it, no other process has it open and the file alone is the database, so it is read as
    immutable (no journal, no lock); otherwise read-only, where the journal files are there already."""
    path = Path(path)
    journals = any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-journal"))
    uri = f"file:{quote(str(path.resolve()))}?mode=ro" + ("" if journals else "&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return None
    try:
        return schema_check(conn, path)
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def older_workers(conn: sqlite3.Connection, spool: Path | None) -> list[OlderWorker]:
    """The workers that use the database now, other than this process: the `workers` rows of other processes
    that are not gone (a heartbeat fresher than two of its intervals; on this host, a process that still
    exists), and the worker slots under `<spool>/.slots/` (any model's) held by other processes. Called while
    migrations are pending, when every such worker is one of an older vlbatch."""
    from batch.service.worker.heartbeat import worker_gone
    from batch.service.worker.slots import held_by_others

    me, host = worker_name(), os.uname().nodename
    found: dict[str, OlderWorker] = {}
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'workers'").fetchone():
        cursor = conn.execute("SELECT * FROM workers WHERE state IS NOT 'stopped' ORDER BY started_utc")
        names = [d[0] for d in cursor.description]
        now = datetime.now(timezone.utc)
        for row in (dict(zip(names, values, strict=True)) for values in cursor.fetchall()):
            if row["id"] == me or worker_gone(row, now) or (row.get("host") == host and not _alive(row.get("pid"))):
                continue
            what = f"{row.get('command') or 'worker'}, {row.get('state')}, heartbeat {row.get('heartbeat_utc')}"
            found[row["id"]] = OlderWorker(row["id"], what)
    for slot in held_by_others(spool) if spool is not None else []:
        name = f"{host}:{slot.pid}" if slot.pid is not None else f"the process holding {slot.path}"
        known = found.get(name)
        what = f"{known.what}, " if known else ""
        found[name] = OlderWorker(name, f"{what}holds worker slot {slot.name}")
    return list(found.values())


def _alive(pid: object) -> bool:
    """Whether a process with this id exists on this host (one of another user's counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: taken as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(path: Path) -> Path:
    """The lock file beside the database that a process holds while it switches to WAL and migrates."""
    return path.with_name(path.name + ".lock")


class ClaimLost(Exception):
    """Another worker took this job over (its fence moved on): nothing more is written for the stale holder."""

    def __init__(self, job_id: str, holder: str | None) -> None:
        super().__init__(f"job {job_id} was taken over by {holder or 'another worker'}")
        self.job_id = job_id
        self.holder = holder


class DatabaseReplaced(OSError):
    """The database path no longer names the file this connection has open (deleted, replaced, remounted).

    A fault of the machine, waited out like a full disk: the worker reopens the path and carries on, and nothing
    is ever committed to the unlinked file."""


class JobIdBusy(Exception):
    """Another file with the same job id is running now (its claim is alive)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job id {job['id']} is running now from {job['source']} (worker {job['worker']})")
        self.job = job


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def file_sha256(path: Path) -> str:
    """SHA-256 of a regular file, opened without following a final symlink or blocking; MediaError if refused."""
    return sha256_of(path)


_NO_CANCEL = {"cancel_requested_utc": None, "cancelled_by": None}
_PREVIOUS_ANSWER = "SELECT id FROM results WHERE cache_key = ? AND error IS NULL ORDER BY id DESC LIMIT 1"


class Store:
    """All reads and writes of the database file; migrates it when opened."""

    def __init__(
        self,
        path: Path,
        busy_timeout_seconds: float = 30.0,
        spool: Path | None = None,
        check_older_workers: bool = True,
    ) -> None:
        """Open (or create) the database and migrate it (see `upgrade`). `spool`: the spool folder whose worker
        slots are probed before migrating (None: only the workers table is read); `check_older_workers` False
        for a worker that reopens its database (it passed the check when it started)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()  # a new file: said by a worker that reopens a vanished database
        if not self.created:
            refuse_newer(self.path)  # before anything opens it for writing: a newer database is left untouched
        self.db = sqlite_utils.Database(self.path)
        self._fences: dict[str, int] = {}  # job id -> the fence this worker's writes for it must still find
        try:
            # several workers share one file: a writer waits this long for the lock, then the worker backs off
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
            with open(_lock_path(self.path), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one process at a time switches to WAL and migrates
                pending = schema_check(self.db.conn, self.path)  # again, now that no one else migrates
                self.db.enable_wal()
                if pending:
                    self.upgrade(spool, check_older_workers)
        except BaseException:
            self.db.close()
            raise
        self.identity = _identity(self.path)  # the file this connection writes: checked before every commit

    def upgrade(self, spool: Path | None, check_older_workers: bool = True) -> None:
        """Apply the pending migrations, all of them in one transaction that takes the write lock first (BEGIN
        IMMEDIATE, each migration a savepoint in it): a crash or an error half-way leaves the schema as it was,
        and of two processes that start together one migrates, the other then finds nothing pending.

        A database that has been migrated before (an older vlbatch uses it) is migrated only when no worker of
        that vlbatch is running: OlderWorkersRunning names them otherwise (see `older_workers`); the decision is
        taken under the same write lock as the migration."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            pending = schema_check(conn, self.path)
            if pending and check_older_workers and applied_migrations(conn):
                blockers = older_workers(conn, spool)
                if blockers:
                    raise OlderWorkersRunning(self.path, pending, blockers)
            migrations.apply(self.db)
            if not conn.in_transaction:  # never: sqlite-utils runs each migration as a savepoint of this one
                raise RuntimeError("the migrations ended the transaction they ran in")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def check_not_newer(self) -> None:
        """DatabaseTooNew when a newer vlbatch has migrated the file since this store opened it.

        Read under the lock file that a migration holds (shared), so a migration under way is waited for: a worker
        that calls this after taking its slot either finds the schema it knows, or the newer vlbatch deciding to
        migrate has seen that slot held and refused."""
        with open(_lock_path(self.path), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            schema_check(self.db.conn, self.path)

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
            self.check_identity()  # never commit into a file that the path no longer names
        except BaseException:
            conn.rollback()
            raise
        conn.execute("COMMIT")

    def check_identity(self) -> None:
        """DatabaseReplaced when the configured path is gone or names another file than the one open here."""
        now = _identity(self.path)
        if now != self.identity:
            what = "deleted" if now is None else "replaced by another file"
            raise DatabaseReplaced(errno.ESTALE, f"{self.path}: the database file was {what} while it was open")

    # fencing ------------------------------------------------------------------------------------
    def hold(self, job_id: str, fence: int) -> None:
        """From now on, every write for this job checks (in its transaction) that the job's fence is still `fence`."""
        self._fences[job_id] = fence

    def let_go(self, job_id: str) -> None:
        self._fences.pop(job_id, None)

    def check_fence(self, job_id: str) -> None:
        """ClaimLost when another worker has started the job since this one did (call inside a transaction)."""
        mine = self._fences.get(job_id)
        if mine is None:
            return
        row = self.db.execute("SELECT fence, worker FROM jobs WHERE id = ?", [job_id]).fetchone()
        if row is None or row[0] != mine:
            raise ClaimLost(job_id, row[1] if row else None)

    def columns(self, table: str) -> list[str]:
        """A table's columns, in order, as the migrations made them."""
        return list(self.db[table].columns_dict)

    # jobs and runs ------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = list(self.db["jobs"].rows_where("id = ?", [job_id]))
        return rows[0] if rows else None

    def run(self, run_id: int) -> dict[str, Any] | None:
        rows = list(self.db["runs"].rows_where("id = ?", [run_id]))
        return rows[0] if rows else None

    def runs_of(self, job_id: str) -> list[dict[str, Any]]:
        """A job's runs, newest first."""
        return list(self.db["runs"].rows_where("job_id = ?", [job_id], order_by="id DESC"))

    def start_job(
        self, job_id: str, fields: dict[str, Any], worker: str, claim_alive: Callable[[str], bool] = lambda _: False
    ) -> tuple[int, int]:
        """Mark a job running; returns (run id, attempt number). A job found still running was interrupted:
        this is another attempt of the same run. Otherwise a new run starts. The job's fence grows by one and
        this store holds it (see `hold`): a worker that started the job earlier can write nothing more for it.

        JobIdBusy when the job id is running under another claim that `claim_alive` says is still held: two
        files with one id never run at once, and their attempts are never counted as one job's.
        """
        with self.atomic():
            previous = self.job(job_id)
            resumed = previous is not None and previous["state"] == JobState.RUNNING and previous["run_id"]
            if resumed and previous["claim"] != fields.get("claim") and claim_alive(previous["claim"] or ""):
                raise JobIdBusy(previous)
            now = utc_now()
            attempts = previous["attempts"] + 1 if resumed else 1
            run = {**fields, "worker": worker, "state": JobState.RUNNING.value, "attempts": attempts}
            if resumed:
                run_id = previous["run_id"]
                self.db["runs"].update(run_id, {**run, "error": None, "traceback": None})
            else:
                run_id = self.db["runs"].insert({**run, "job_id": job_id, "started_utc": now}).last_pk
            fence = ((previous or {}).get("fence") or 0) + 1
            row = {
                **fields,
                "id": job_id,
                "fence": fence,
                "run_id": run_id,
                "state": JobState.RUNNING.value,
                "attempts": attempts,
                "worker": worker,
                "error": None,
                "traceback": None,
                "started_utc": now,
                "finished_utc": None,
                "created_utc": previous["created_utc"] if previous else now,
                # a new run starts with no unit in flight and no cancel asked (a resumed one keeps a cancel asked)
                **({} if resumed else {"inflight": None, "inflight_deaths": 0, **_NO_CANCEL}),
            }
            self.db["jobs"].upsert(row, pk="id")
        self.hold(job_id, fence)
        return int(run_id), attempts

    def hand_back(self, job_id: str) -> None:
        """A job returned to the inbox by a live worker (a stop signal, a passing fault): not an attempt."""
        with self.atomic():
            self.check_fence(job_id)
            for table, row_id in (("jobs", job_id), ("runs", self._run_id(job_id))):
                self.db.execute(
                    f"UPDATE {table} SET attempts = max(attempts - 1, 0) WHERE id = ? AND state = ?",
                    [row_id, JobState.RUNNING.value],
                )
            # the worker lives: no unit in flight killed it
            self.db.execute("UPDATE jobs SET inflight = NULL, inflight_deaths = 0 WHERE id = ?", [job_id])

    def _run_id(self, job_id: str) -> int | None:
        row = self.db.execute("SELECT run_id FROM jobs WHERE id = ?", [job_id]).fetchone()
        return row[0] if row else None

    def begin_unit(self, job_id: str, unit: str, died_in_batch: bool = False) -> int:
        """Record that the worker starts answering `unit`; returns how often a worker already died in it
        (`died_in_batch`: the unit was in the batch in flight when the job's last worker died, one death)."""
        with self.atomic():
            self.check_fence(job_id)
            row = self.db.execute("SELECT inflight, inflight_deaths FROM jobs WHERE id = ?", [job_id]).fetchone()
            deaths = (row[1] or 0) + 1 if row and row[0] == unit else int(died_in_batch)
            self.db.execute("UPDATE jobs SET inflight = ?, inflight_deaths = ? WHERE id = ?", [unit, deaths, job_id])
        return deaths

    def mark_inflight(self, job_id: str, paths: list[str]) -> None:
        """Record the units a batched decode has in flight (their stored paths, one JSON list; none: NULL). Unlike
        begin_unit, nothing is counted: a worker that dies with a batch in flight has its next attempt of the job
        answer one unit at a time, where begin_unit finds the unit that kills it."""
        with self.atomic():
            self.check_fence(job_id)
            self.db.execute(
                "UPDATE jobs SET inflight = ?, inflight_deaths = 0 WHERE id = ?",
                [json.dumps(paths, ensure_ascii=False) if paths else None, job_id],
            )

    def inflight(self, job_id: str) -> str | None:
        """The unit (or batch) a worker recorded in flight for the job: set when one died while answering."""
        row = self.db.execute("SELECT inflight FROM jobs WHERE id = ?", [job_id]).fetchone()
        return row[0] if row else None

    def end_unit(self, job_id: str) -> None:
        with self.atomic():
            self.check_fence(job_id)
            self.db.execute("UPDATE jobs SET inflight = NULL, inflight_deaths = 0 WHERE id = ?", [job_id])

    def finished_claim(self, claim: str) -> dict[str, Any] | None:
        """The job row that a claim committed as finished, if any (for a crash before the final move)."""
        done = (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value)
        rows = list(self.db["jobs"].rows_where("claim = ? AND state IN (?, ?, ?)", [claim, *done]))
        return rows[0] if rows else None

    def finish_job(
        self,
        job_id: str,
        state: JobState,
        error: str | None = None,
        traceback: str | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        """The job's (and its run's) final state and counts, from the run's links; `counts` adds others
        (a standing run's unchanged files, new failures)."""
        with self.atomic():
            self.check_fence(job_id)
            run_id = self._run_id(job_id)
            update = {
                "state": JobState(state).value,
                "error": None if error is None else storable_text(error),  # may quote a name that is not UTF-8
                "traceback": None if traceback is None else storable_text(traceback),
                "finished_utc": utc_now(),
                **self.run_counts(run_id),
                **(counts or {}),
            }
            self.db["jobs"].update(job_id, update)
            if run_id is not None:
                self.db["runs"].update(run_id, update)

    def run_counts(self, run_id: int | None) -> dict[str, int]:
        """What a run's links hold so far: answered, reused, failed_media and gone (a file gone from a standing
        folder keeps its answer: its link says so and is not counted as one)."""
        answered, reused, failed, gone = self.db.execute(
            "SELECT coalesce(sum(jr.change IS NOT 'gone' AND jr.reused = 0 AND r.error IS NULL), 0), "
            "coalesce(sum(jr.change IS NOT 'gone' AND jr.reused = 1), 0), "
            "coalesce(sum(jr.change IS NOT 'gone' AND jr.reused = 0 AND r.error IS NOT NULL), 0), "
            "coalesce(sum(jr.change = 'gone'), 0) "
            "FROM job_results jr JOIN results r ON r.id = jr.result_id WHERE jr.run_id = ?",
            [run_id],
        ).fetchone()
        return {"answered": answered, "reused": reused, "failed_media": failed, "gone": gone}

    def record_rejected(self, job_id: str, source: str, reason: str, update_job: bool = True) -> None:
        """A job file that could not run: a run of its own, and the job's state unless another file holds it."""
        now = utc_now()
        rejected = {"source": source, "state": JobState.REJECTED.value, "attempts": 0, "error": storable_text(reason)}
        with self.atomic():
            run_id = (
                self.db["runs"].insert({**rejected, "job_id": job_id, "started_utc": now, "finished_utc": now}).last_pk
            )
            if update_job:
                previous = self.job(job_id)
                self.db["jobs"].upsert(
                    {
                        **rejected,
                        "id": job_id,
                        "run_id": run_id,
                        "created_utc": previous["created_utc"] if previous else now,
                        "finished_utc": now,
                    },
                    pk="id",
                )

    # operator control (vlbatch cancel, pause, resume: batch/service/worker/control.py) ------------------
    def request_cancel(self, job_id: str, who: str) -> dict[str, Any] | None:
        """Ask the worker running the job (and its run) to cancel it; the first request's time and asker stand.
        None when the job is not running."""
        with self.atomic():
            job = self.job(job_id)
            if job is None or job["state"] != JobState.RUNNING.value:
                return None
            if not job.get("cancel_requested_utc"):
                asked = {"cancel_requested_utc": utc_now(), "cancelled_by": who}
                self.db["jobs"].update(job_id, asked)
                if job["run_id"] is not None:
                    self.db["runs"].update(job["run_id"], asked)
                job = {**job, **asked}
        return job

    def cancel_requested(self, job_id: str) -> tuple[str, str | None] | None:
        """(when, who) when a cancel of the running job was asked, else None (an indexed lookup, per unit)."""
        row = self.db.execute("SELECT cancel_requested_utc, cancelled_by FROM jobs WHERE id = ?", [job_id]).fetchone()
        return (row[0], row[1]) if row and row[0] else None

    def record_cancelled(self, job_id: str, source: str, who: str, reason: str, update_job: bool = True) -> int:
        """A queued job file cancelled before any worker ran it: a run of its own in state cancelled, and the job's
        state unless `update_job` is False (another file with the same id is running now). A job whose open run
        waits in the inbox (handed back, or taken back from a dead worker) has that run ended cancelled instead,
        and its fence moved on, so that a worker frozen in it writes nothing more. Returns the run id."""
        now = utc_now()
        ended = {
            "state": JobState.CANCELLED.value,
            "error": storable_text(reason),
            "finished_utc": now,
            "cancelled_by": who,
        }
        with self.atomic():
            job = self.job(job_id)
            if update_job and job is not None and job["state"] == JobState.RUNNING.value and job["run_id"]:
                ended["cancel_requested_utc"] = job.get("cancel_requested_utc") or now
                self.db["runs"].update(job["run_id"], ended)
                self.db["jobs"].update(job_id, {**ended, "fence": (job.get("fence") or 0) + 1})
                return int(job["run_id"])
            ended["cancel_requested_utc"] = now
            run = {**ended, "job_id": job_id, "source": source, "attempts": 0, "started_utc": now}
            run_id = int(self.db["runs"].insert(run).last_pk)
            if update_job:
                created = job["created_utc"] if job else now
                row = {**ended, "id": job_id, "source": source, "run_id": run_id, "attempts": 0, "created_utc": created}
                self.db["jobs"].upsert(row, pk="id")
        return run_id

    def request_workers(self, worker_ids: list[str], request: str) -> None:
        """Leave `request` (pause, resume) for these workers: each takes it at its next heartbeat."""
        with self.atomic():
            for worker_id in worker_ids:
                self.db.execute("UPDATE workers SET request = ? WHERE id = ?", [request, worker_id])

    # results ------------------------------------------------------------------------------------
    def previous_answer(self, key: str) -> int | None:
        """The newest successful answer with this cache key (an indexed lookup)."""
        row = self.db.execute(_PREVIOUS_ANSWER, [key]).fetchone()
        return row[0] if row else None

    def reuse_answer(
        self, job_id: str, run_id: int, key: str, media_paths: str, media_sha256: str | None
    ) -> int | None:
        """The newest successful answer with this cache key, linked to the run in the same transaction, so that
        `vlbatch db prune` cannot delete it in between; None when there is none."""
        with self.atomic():
            result_id = self.previous_answer(key)
            if result_id is not None:
                self.link(job_id, run_id, result_id, media_paths, media_sha256, reused=True)
        return result_id

    def linked(self, run_id: int, media_paths: str) -> int | None:
        """The answer a run already holds for these media (from an interrupted earlier attempt of it)."""
        row = self.db.execute(
            "SELECT result_id FROM job_results WHERE run_id = ? AND media_paths = ?", [run_id, media_paths]
        ).fetchone()
        return row[0] if row else None

    def add_result(self, job_id: str, run_id: int, row: dict[str, Any]) -> int:
        """Insert one answer (or one media failure) and link it to the run, in one transaction."""
        unknown = set(row) - set(self.columns("results"))
        assert not unknown, f"not a results column: {sorted(unknown)}"
        row = {k: storable_text(v) if k == "error" and isinstance(v, str) else v for k, v in row.items()}
        with self.atomic():
            self.check_fence(job_id)
            now = utc_now()
            result_id = self.db["results"].insert({**row, "job_id": job_id, "created_utc": now}).last_pk
            self.link(job_id, run_id, result_id, row["media_paths"], row.get("media_sha256"), reused=False)
        return int(result_id)

    def link(
        self,
        job_id: str,
        run_id: int,
        result_id: int,
        media_paths: str,
        media_sha256: str | None,
        reused: bool,
        change: str | None = None,
    ) -> None:
        """Record that the run owns this answer for these media of its own (`change`: a standing run's gone)."""
        with self.atomic():
            self.check_fence(job_id)
            self.db["job_results"].insert(
                {
                    "job_id": job_id,
                    "run_id": run_id,
                    "result_id": result_id,
                    "reused": int(reused),
                    "media_paths": media_paths,
                    "media_sha256": media_sha256,
                    "linked_utc": utc_now(),
                    "change": change,
                },
                ignore=True,  # the same media twice in one run: the first link stands
            )

    # failures -----------------------------------------------------------------------------------
    def previous_failure(self, key: str) -> dict[str, Any] | None:
        """The newest recorded failure of a unit with this cache key (the same bytes, prompt and settings)."""
        rows = list(
            self.db["results"].rows_where(
                "cache_key = ? AND error IS NOT NULL", [key], order_by="id DESC", limit=1, select="id, error"
            )
        )
        return rows[0] if rows else None

    def failed_before(self, key: str | None, media_paths: str, error_class: str) -> bool:
        """Whether this unit already failed the same way: the same cache key (or, for a file that could not
        be read at all, the same paths) and the same class of error. Such a failure is not news."""
        if key is not None:
            sql, args = "cache_key = ? AND error_class = ?", [key, error_class]
        else:
            sql, args = "cache_key IS NULL AND media_paths = ? AND error_class = ?", [media_paths, error_class]
        return self.db["results"].count_where(sql + " AND error IS NOT NULL", args) > 0

    # standing jobs ------------------------------------------------------------------------------
    def standing_index(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Every file a standing job tracks (gone ones included), by path."""
        return {row["path"]: row for row in self.db["standing_files"].rows_where("job_id = ?", [job_id])}

    def run_links(self, run_id: int) -> list[dict[str, Any]]:
        """A run's links with what their answer was: the files a standing run answered, reused or failed."""
        cursor = self.db.execute(
            "SELECT jr.id AS link_id, jr.media_paths, jr.media_sha256, jr.result_id, jr.reused, jr.change, "
            "r.error, r.error_class, r.cache_key FROM job_results jr JOIN results r ON r.id = jr.result_id "
            "WHERE jr.run_id = ?",
            [run_id],
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def save_standing(self, rows: list[dict[str, Any]]) -> None:
        """Create or update tracked files (keyed by job and path), in one transaction."""
        if not rows:
            return
        with self.atomic():
            for job_id in {row["job_id"] for row in rows}:
                self.check_fence(job_id)
            self.db["standing_files"].upsert_all(rows, pk=("job_id", "path"))

    def record_gone(self, job_id: str, run_id: int, entries: list[dict[str, Any]]) -> None:
        """Files gone from a standing folder: their answers stay, marked gone, with a link of this run saying so."""
        if not entries:
            return
        now = utc_now()
        with self.atomic():
            self.check_fence(job_id)
            for entry in entries:
                paths = json.dumps([entry["path"]], ensure_ascii=False)
                if entry.get("result_id") is not None:
                    self.link(job_id, run_id, entry["result_id"], paths, None, reused=False, change="gone")
                self.db.execute(
                    "UPDATE standing_files SET state = 'gone', updated_utc = ?, run_id = ? "
                    "WHERE job_id = ? AND path = ?",
                    [now, run_id, job_id, entry["path"]],
                )

    def standing_jobs(self) -> list[dict[str, Any]]:
        """Standing jobs with their latest run and how many files each tracks now."""
        cursor = self.db.execute(
            "SELECT j.id, j.source, j.state, j.run_id, j.started_utc, j.finished_utc, j.answered, j.reused, "
            "j.failed_media, j.new_failures, j.unchanged, j.gone, j.error, "
            "(SELECT count(*) FROM standing_files sf WHERE sf.job_id = j.id AND sf.state != 'gone') AS files, "
            "(SELECT count(*) FROM standing_files sf WHERE sf.job_id = j.id AND sf.state = 'failed') AS failing "
            "FROM jobs j WHERE j.standing = 1 ORDER BY j.id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def result(self, result_id: int) -> dict[str, Any]:
        return self.db["results"].get(result_id)

    # sidecars -----------------------------------------------------------------------------------
    def wrote_sidecar(self, sha256: str) -> bool:
        """Whether vlbatch wrote a sidecar with exactly these bytes (anywhere: a copied folder keeps its own)."""
        return self.db.execute("SELECT 1 FROM sidecars WHERE sha256 = ? LIMIT 1", [sha256]).fetchone() is not None

    def record_sidecar(self, path: Path, sha256: str, result_id: int) -> None:
        with self.atomic():
            row = {"path": encode_path(path), "sha256": sha256, "result_id": result_id}  # any name: see paths.py
            self.db["sidecars"].upsert(row, pk="path")

    # Ray actors ---------------------------------------------------------------------------------
    def record_actor(self, actor_id: str, **fields: Any) -> None:
        """Create or update an actor's row (its state, node, last error...); `updated_utc` is set to now."""
        now = utc_now()
        with self.atomic():
            if self.db["actors"].count_where("id = ?", [actor_id]):
                self.db["actors"].update(actor_id, {**fields, "updated_utc": now})
            else:
                row = {"answers": 0, "output_tokens": 0, "decode_ms": 0.0, "started_utc": now, "updated_utc": now}
                self.db["actors"].insert({"id": actor_id, **row, **fields})

    def actor_answered(self, actor_id: str, output_tokens: int, decode_ms: float) -> None:
        with self.atomic():
            self.db.execute(
                "UPDATE actors SET answers = answers + 1, output_tokens = output_tokens + ?, "
                "decode_ms = decode_ms + ?, updated_utc = ? WHERE id = ?",
                [output_tokens, decode_ms, utc_now(), actor_id],
            )

    def workers(self) -> list[dict[str, Any]]:
        """Every worker that has not said it stopped (some may be gone without saying so: see heartbeat.is_gone)."""
        return list(self.db["workers"].rows_where("state != 'stopped'", order_by="started_utc"))

    def worker(self, worker_id: str) -> dict[str, Any] | None:
        rows = list(self.db["workers"].rows_where("id = ?", [worker_id]))
        return rows[0] if rows else None

    def recent_actors(self, since_utc: str) -> list[dict[str, Any]]:
        return list(self.db["actors"].rows_where("updated_utc >= ?", [since_utc], order_by="node, started_utc"))

    # queries ------------------------------------------------------------------------------------
    def counts_by_state(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state")}

    def running_jobs(self) -> list[dict[str, Any]]:
        return list(self.db["jobs"].rows_where("state = ?", [JobState.RUNNING.value], order_by="started_utc"))

    def run_answers(self, run_id: int | None) -> int:
        """How many of its media a run holds an answer (or a recorded failure) for."""
        return self.db.execute("SELECT count(*) FROM job_results WHERE run_id = ?", [run_id]).fetchone()[0]

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        return list(
            self.db["jobs"].rows_where(
                "state IN (?, ?)",
                [JobState.FAILED.value, JobState.REJECTED.value],
                order_by="finished_utc DESC",
                limit=limit,
                select="id, state, error",
            )
        )

    def throughput(self, since_utc: str) -> dict[str, float]:
        row = self.db.execute(
            f"SELECT count(*), coalesce(sum(output_tokens), 0), coalesce(sum({DECODE_SHARE_MS}), 0), "
            f"coalesce(avg(ttft_ms), 0), coalesce(sum({DECODE_TOKENS}), 0) FROM results "
            "WHERE created_utc >= ? AND error IS NULL",
            [since_utc],
        ).fetchone()
        return {  # the decode steps' tokens over the worker's decode time, as the throughput query counts them
            "answers": row[0],
            "output_tokens": row[1],
            "tokens_per_s": row[4] / (row[2] / 1e3) if row[2] else 0.0,
            "mean_ttft_ms": row[3],
        }

    def query_results(self, limit: int | None = 100, **filters: Any) -> list[dict[str, Any]]:
        """Answers as the runs own them, newest first (see `ResultFilter` for the filters)."""
        sql, args = ResultFilter(**filters).select(self.columns("results"), limit)
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can only read the file (opened mode=ro, and query_only); DatabaseTooNew, before the file
    is opened, when a newer vlbatch migrated it (what it holds may mean something else now)."""
    refuse_newer(path)
    conn = sqlite3.connect(f"file:{quote(str(Path(path).resolve()))}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


class StoredAnswers:
    """The answers stored so far, for a command that only reads: the file is opened read-only and never created,
    migrated or written; a missing file (or one without a results table yet) holds no answers."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = None
        if self.path.is_file():
            try:
                self._conn = connect_read_only(self.path)
            except sqlite3.DatabaseError as exc:
                raise self._unreadable(exc) from exc
            self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _rows(self, sql: str, args: list[Any]) -> list[sqlite3.Row]:
        if self._conn is None:
            return []
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            if "no such table" in str(exc):  # created, but no worker has migrated it yet
                return []
            raise self._unreadable(exc) from exc

    def _unreadable(self, exc: sqlite3.DatabaseError) -> VlbatchError:
        if is_corrupt_database(exc):
            return DatabaseCorrupt(f"{self.path}: the database is damaged ({describe(exc)})")
        return VlbatchError(f"{self.path}: cannot read the database ({describe(exc)})")

    def previous_answer(self, key: str) -> int | None:
        """The newest successful answer with this cache key: what a worker would reuse (Store.previous_answer)."""
        rows = self._rows(_PREVIOUS_ANSWER, [key])
        return rows[0][0] if rows else None

    def has_model(self, model_id: str) -> bool:
        """Whether any successful answer of this model is stored (else none of its cache keys can match)."""
        return bool(self._rows("SELECT 1 FROM results WHERE model_id = ? AND error IS NULL LIMIT 1", [model_id]))

    def timings(self, model_id: str, backend: str, limit: int = 500) -> list[dict[str, Any]]:
        """The newest successful answers of this model on this runtime: sizes, stage timings and how many answers
        shared their decode steps (1 in a database from before batched decode)."""
        columns = {row[1] for row in self._rows("PRAGMA table_info(results)", [])}
        rows_column = "decode_rows" if "decode_rows" in columns else "1 AS decode_rows"
        rows = self._rows(
            f"SELECT tiles, vit_ms, prompt_tokens, prefill_ms, output_tokens, decode_ms, {rows_column} FROM results "
            "WHERE model_id = ? AND backend = ? AND error IS NULL ORDER BY id DESC LIMIT ?",
            [model_id, backend, limit],
        )
        return [dict(row) for row in rows]

    def output_tokens(self, model_id: str, prompt: str) -> tuple[int, float]:
        """(answers, mean output tokens) of this model's successful answers to exactly this prompt text."""
        rows = self._rows(
            "SELECT count(*), coalesce(avg(output_tokens), 0) FROM results "
            "WHERE model_id = ? AND prompt = ? AND error IS NULL",
            [model_id, prompt],
        )
        return (int(rows[0][0]), float(rows[0][1])) if rows else (0, 0.0)


def pending_migrations(path: Path) -> list[str]:
    """The migrations a database file still lacks, read without writing anything (for read-only viewers)."""
    conn = connect_read_only(path)
    try:
        return [m.name for m in migrations.pending(sqlite_utils.Database(conn))]
    finally:
        conn.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
