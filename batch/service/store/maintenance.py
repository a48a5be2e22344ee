"""The database over years: online backups, pruning old history, VACUUM, and its size now and projected.

- `backup`: a consistent copy taken with SQLite's online backup API while workers write. In WAL mode (every
  vlbatch database) the copy is one read snapshot, stepped a few pages at a time: writers never wait for it. The
  copy is written under a hidden temp name beside the target, switched out of WAL (one self-contained file),
  checked with `PRAGMA integrity_check`, then renamed; a damaged source is DatabaseCorrupt (exit code 4).
- `prune`: deletes runs finished before a time with their links, then answers and failures older than it that no
  remaining run or standing file holds. What is never deleted: a job's latest run, every run of a running job,
  what a standing job's tracked files point at (their answer, their link and its run). Sidecar rows are never
  deleted (they are how vlbatch knows its own `.txt`/`.xmp` bytes wherever a folder moved): one whose answer goes
  keeps its path and bytes, with `result_id` emptied. Deletes run in short batches, each its own transaction.
- `vacuum`: VACUUM after checking the free disk it needs, then a WAL checkpoint so the file really shrinks.
- `measure` and `project`: rows and bytes per table now (the dbstat virtual table), and the size after K nights
  over N files, for a standing job and for a plain job re-run every night, with and without pruning.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batch.errors import VlbatchError
from batch.service.atomic_write import fsync_folder_at
from batch.service.faults import DatabaseCorrupt, InfrastructureError, describe, is_corrupt_database, is_passing
from batch.service.spool.states import JobState
from batch.service.store.store import Store, connect_read_only, refuse_newer

STEP_PAGES = 1024  # pages copied per backup step (4 MiB at SQLite's default page size)
STEP_PAUSE_SECONDS = 0.005  # between backup steps
PRUNE_BATCH_ROWS = 2000  # rows deleted per transaction: the write lock is held for one batch at a time
PRUNE_PAUSE_SECONDS = 0.02  # between prune transactions, so a waiting worker takes the lock
MIN_MEASURED_ROWS = 1000  # below this many rows a table's bytes per row is mostly page slack: built-in figures
FTS_TABLE = "results_fts"

# bytes per row measured by bench/db_growth.py (10,000 files, 10 nights, captions of about 300 characters);
# used for a table with fewer than MIN_MEASURED_ROWS rows. Results include their share of the full-text index.
BUILT_IN_ROW_BYTES = {"runs": 403, "job_results": 260, "results": 1411, "standing_files": 541}


# opening -------------------------------------------------------------------------------------------
def require_file(database: Path) -> Path:
    """The database file; an error naming it when there is none (these commands never create one)."""
    if not Path(database).is_file():
        raise VlbatchError(f"no database at {database} (spool.database): nothing to do")
    return Path(database)


def database_error(database: Path, exc: BaseException, doing: str) -> VlbatchError:
    """The error a command reports for an SQLite or OS error: damaged (exit 4), a fault of the machine (exit 3,
    a locked database or a full disk), or another problem (exit 1)."""
    if is_corrupt_database(exc):
        return DatabaseCorrupt(f"{database}: the database is damaged ({describe(exc)}); restore a backup")
    if is_passing(exc, spool=True):
        return InfrastructureError(f"{database}: {doing} failed: {describe(exc)}")
    return VlbatchError(f"{database}: {doing} failed: {describe(exc)}")


def file_bytes(database: Path) -> tuple[int, int]:
    """(size of the database file, size of its WAL) in bytes; 0 for one that is not there."""
    sizes = []
    for path in (Path(database), Path(f"{database}-wal")):
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    return sizes[0], sizes[1]


def user_tables(conn: sqlite3.Connection) -> list[str]:
    """The tables that hold rows of their own (not SQLite's, not the full-text index's shadow tables)."""
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    return [name for (name,) in rows if not name.startswith(FTS_TABLE)]


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in user_tables(conn)}


# backup --------------------------------------------------------------------------------------------
@dataclass
class BackupReport:
    source: str
    backup: str
    bytes: int
    seconds: float
    snapshot_utc: str
    integrity: str
    tables: dict[str, int]


def backup_target(out: Path, now: datetime | None = None) -> Path:
    """Where a backup to OUT goes: OUT itself, or `vlbatch-YYYYMMDD-HHMMSS.db` (UTC) inside OUT when it is a folder."""
    if out.is_dir():
        stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
        return out / f"vlbatch-{stamp}.db"
    if not out.parent.is_dir():
        raise VlbatchError(f"{out}: its folder {out.parent} does not exist")
    return out


def backup(database: Path, out: Path, force: bool = False, step_pages: int = STEP_PAGES) -> BackupReport:
    """Copy the database to OUT (see the module's docstring); the copy's size, row counts and check."""
    database = require_file(database)
    target = backup_target(out)
    if target.exists() and not force:
        raise VlbatchError(f"{target} exists; pass --force to replace it")
    if target.exists() and target.resolve() == database.resolve():
        raise VlbatchError(f"{target} is the database itself")
    started = time.monotonic()
    temp = None
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        temp = Path(name)
        os.chmod(temp, database.stat().st_mode & 0o777)  # readable by whoever may read the database, no more
        snapshot = _copy(database, temp, step_pages)
        integrity, tables = _check_copy(database, temp)
        _fsync(temp)
        _publish(temp, target, force)
    except OSError as exc:  # the backup's folder: no permission, a full disk
        raise database_error(target, exc, "writing the backup") from exc
    finally:
        for leftover in (temp, Path(f"{temp}-journal")) if temp else ():
            leftover.unlink(missing_ok=True)
    return BackupReport(
        source=str(database),
        backup=str(target),
        bytes=target.stat().st_size,
        seconds=time.monotonic() - started,
        snapshot_utc=snapshot,
        integrity=integrity,
        tables=tables,
    )


def _copy(database: Path, temp: Path, step_pages: int) -> str:
    """The online backup into `temp`: in WAL mode under one read snapshot (held across the steps, so writers
    going on never restart the copy), then the copy switched to a rollback journal: one file, no -wal beside it.
    Returns when the snapshot was taken (UTC)."""
    try:
        source = connect_read_only(database)
    except sqlite3.Error as exc:
        raise database_error(database, exc, "opening the database") from exc
    dest = sqlite3.connect(temp, isolation_level=None)
    try:
        wal = source.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        if wal:
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts here
        snapshot = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        source.backup(dest, pages=step_pages, progress=lambda *_: time.sleep(STEP_PAUSE_SECONDS))
        if wal:
            source.execute("COMMIT")
        dest.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.Error as exc:
        raise database_error(database, exc, "the backup") from exc
    finally:
        dest.close()
        source.close()
    return snapshot


def _refuse_damaged(database: Path, conn: sqlite3.Connection) -> None:
    """DatabaseCorrupt when `PRAGMA quick_check` finds anything (VACUUM rewrites every page: not a damaged file)."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise DatabaseCorrupt(f"{database}: the database is damaged ({_first(problems)}); restore a backup")


def _first(problems: list[str]) -> str:
    """The first few lines of an integrity check, and how many more there are."""
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def _check_copy(database: Path, temp: Path) -> tuple[str, dict[str, int]]:
    """`PRAGMA integrity_check` of the copy and its row counts; DatabaseCorrupt (the source's snapshot was
    damaged) when the check finds anything."""
    conn = sqlite3.connect(temp)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise DatabaseCorrupt(f"{database}: the database is damaged ({_first(problems)}); no backup was written")
        return "ok", row_counts(conn)
    except sqlite3.DatabaseError as exc:
        raise database_error(database, exc, "checking the backup") from exc
    finally:
        conn.close()


def _publish(temp: Path, target: Path, force: bool) -> None:
    """Rename the checked copy to its name: atomically replacing one with `force`, else never over one that
    appeared meanwhile (a hard link fails on an existing name)."""
    try:
        if force:
            os.replace(temp, target)
        else:
            os.link(temp, target)
    except FileExistsError:
        raise VlbatchError(f"{target} exists; pass --force to replace it") from None
    fsync_folder_at(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# prune ---------------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    cutoff_utc: str
    deleted: bool  # False: a dry run, the counts are what would go
    runs: int = 0
    job_results: int = 0
    results: int = 0
    answers: int = 0  # of `results`: answers
    failures: int = 0  # of `results`: recorded failures
    sidecars_detached: int = 0  # sidecar rows kept with their result_id emptied
    runs_total: int = 0
    runs_kept_before_cutoff: int = 0  # finished before the cutoff, kept: a latest run, a running job's, a standing's
    seconds: float = 0.0
    batches: int = 0
    longest_batch_ms: float = 0.0


# what a prune keeps whatever its age: built once, at the start, in temp tables (SQLite's, not the file's)
_SNAPSHOT = [
    "CREATE TEMP TABLE prune_keep_runs (id INTEGER PRIMARY KEY)",
    "CREATE TEMP TABLE prune_keep_results (id INTEGER PRIMARY KEY)",
    "CREATE TEMP TABLE prune_runs (id INTEGER PRIMARY KEY)",
    "CREATE TEMP TABLE prune_results (id INTEGER PRIMARY KEY, failed INTEGER)",
    "CREATE TEMP TABLE prune_sidecars (path TEXT PRIMARY KEY, result_id INTEGER)",
    "CREATE INDEX temp.prune_sidecars_result ON prune_sidecars (result_id)",
    # a job's latest run, every run of a running job, the runs and links a standing job's files point at
    "INSERT OR IGNORE INTO prune_keep_runs SELECT run_id FROM jobs WHERE run_id IS NOT NULL",
    "INSERT OR IGNORE INTO prune_keep_runs SELECT r.id FROM jobs j JOIN runs r ON r.job_id = j.id "
    f"WHERE j.state = '{JobState.RUNNING.value}'",
    "INSERT OR IGNORE INTO prune_keep_runs SELECT run_id FROM standing_files WHERE run_id IS NOT NULL",
    "INSERT OR IGNORE INTO prune_keep_runs SELECT jr.run_id FROM standing_files sf "
    "JOIN job_results jr ON jr.id = sf.link_id WHERE jr.run_id IS NOT NULL",
    "INSERT OR IGNORE INTO prune_keep_results SELECT result_id FROM standing_files WHERE result_id IS NOT NULL",
    "INSERT INTO prune_runs SELECT id FROM runs WHERE finished_utc IS NOT NULL AND finished_utc < :cutoff "
    f"AND state != '{JobState.RUNNING.value}' AND id NOT IN (SELECT id FROM prune_keep_runs)",
    # older than the cutoff, held by no link of a run that stays, no standing file
    "INSERT INTO prune_results SELECT r.id, r.error IS NOT NULL FROM results r WHERE r.created_utc < :cutoff "
    "AND r.id NOT IN (SELECT id FROM prune_keep_results) AND NOT EXISTS (SELECT 1 FROM job_results jr "
    "WHERE jr.result_id = r.id AND NOT EXISTS (SELECT 1 FROM prune_runs p WHERE p.id = jr.run_id))",
    "INSERT INTO prune_sidecars SELECT path, result_id FROM sidecars WHERE result_id IN (SELECT id FROM prune_results)",
]

# a run a worker may have taken up since the snapshot (its job started again): left alone
_STILL_PRUNABLE_RUN = (
    "SELECT 1 FROM runs r WHERE r.id = ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id "
    f"AND (j.state = '{JobState.RUNNING.value}' OR j.run_id = r.id))"
)


def prune(store: Store, cutoff_utc: str, delete: bool, batch_rows: int = PRUNE_BATCH_ROWS) -> PruneReport:
    """Count (dry run) or delete what is older than `cutoff_utc` (a stored UTC time) and no longer needed."""
    started = time.monotonic()
    conn = store.db.conn
    report = PruneReport(cutoff_utc=cutoff_utc, deleted=delete)
    try:
        _snapshot(conn, cutoff_utc, report)
        if delete:
            run_ids = [row[0] for row in conn.execute("SELECT id FROM prune_runs ORDER BY id")]
            _delete_runs(store, run_ids, batch_rows, report)
            result_ids = [row[0] for row in conn.execute("SELECT id FROM prune_results ORDER BY id")]
            _delete_results(store, result_ids, batch_rows, report)
    except (sqlite3.Error, OSError) as exc:  # OSError: the file was replaced under it (DatabaseReplaced)
        raise database_error(store.path, exc, "pruning") from exc
    finally:
        for table in ("prune_keep_runs", "prune_keep_results", "prune_runs", "prune_results", "prune_sidecars"):
            conn.execute(f"DROP TABLE IF EXISTS temp.{table}")
    report.seconds = time.monotonic() - started
    return report


def _snapshot(conn: sqlite3.Connection, cutoff_utc: str, report: PruneReport) -> None:
    """What would go, decided under one read snapshot, and the counts of it."""
    conn.execute("BEGIN")  # deferred: reads the file, writes only SQLite's temp tables
    try:
        for sql in _SNAPSHOT:
            conn.execute(sql, {"cutoff": cutoff_utc} if ":cutoff" in sql else {})
        report.runs = _one(conn, "SELECT count(*) FROM prune_runs")
        report.job_results = _one(conn, "SELECT count(*) FROM job_results WHERE run_id IN (SELECT id FROM prune_runs)")
        report.results = _one(conn, "SELECT count(*) FROM prune_results")
        report.failures = _one(conn, "SELECT count(*) FROM prune_results WHERE failed")
        report.answers = report.results - report.failures
        report.sidecars_detached = _one(conn, "SELECT count(*) FROM prune_sidecars")
        report.runs_total = _one(conn, "SELECT count(*) FROM runs")
        report.runs_kept_before_cutoff = (
            _one(conn, "SELECT count(*) FROM runs WHERE finished_utc < ?", [cutoff_utc]) - report.runs
        )
    finally:
        conn.execute("COMMIT")


def _one(conn: sqlite3.Connection, sql: str, args: list[Any] | None = None) -> int:
    return int(conn.execute(sql, args or []).fetchone()[0])


def _delete_runs(store: Store, run_ids: list[int], batch_rows: int, report: PruneReport) -> None:
    """Each run's links, then the run, at most `batch_rows` rows per transaction (a run of 100,000 links takes
    several); the counts become what was deleted."""
    conn = store.db.conn
    report.runs = report.job_results = 0
    pending = list(reversed(run_ids))
    begun: set[int] = set()
    while pending:
        with _batch(store, report):
            budget = batch_rows
            while pending and budget > 0:
                run_id = pending[-1]
                if run_id not in begun and conn.execute(_STILL_PRUNABLE_RUN, [run_id]).fetchone() is None:
                    pending.pop()
                    continue
                begun.add(run_id)
                links = conn.execute(
                    "DELETE FROM job_results WHERE id IN (SELECT id FROM job_results WHERE run_id = ? LIMIT ?)",
                    [run_id, budget],
                ).rowcount
                report.job_results += links
                budget -= links
                if budget > 0:  # none left: the run goes too
                    report.runs += conn.execute("DELETE FROM runs WHERE id = ?", [run_id]).rowcount
                    budget -= 1
                    pending.pop()


def _delete_results(store: Store, result_ids: list[int], batch_rows: int, report: PruneReport) -> None:
    """Answers and failures no run or standing file holds any more, `batch_rows` per transaction; their full-text
    entries go with them (the index's triggers), their sidecar rows stay with `result_id` emptied."""
    conn = store.db.conn
    report.results = report.answers = report.failures = report.sidecars_detached = 0
    for start in range(0, len(result_ids), batch_rows):
        chunk = result_ids[start : start + batch_rows]
        with _batch(store, report):
            marks = ",".join("?" * len(chunk))
            # a worker may have linked one again since the snapshot (an answer reused): that one stays
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT r.id FROM results r WHERE r.id IN ({marks}) "
                    "AND NOT EXISTS (SELECT 1 FROM job_results jr WHERE jr.result_id = r.id)",
                    chunk,
                )
            ]
            if not ids:
                continue
            marks = ",".join("?" * len(ids))
            report.sidecars_detached += conn.execute(
                f"UPDATE sidecars SET result_id = NULL WHERE path IN (SELECT path FROM prune_sidecars "
                f"WHERE result_id IN ({marks})) AND result_id IN ({marks})",
                ids + ids,
            ).rowcount
            report.failures += _one(
                conn, f"SELECT count(*) FROM results WHERE id IN ({marks}) AND error IS NOT NULL", ids
            )
            deleted = conn.execute(f"DELETE FROM results WHERE id IN ({marks})", ids).rowcount
            report.results += deleted
    report.answers = report.results - report.failures


@contextmanager
def _batch(store: Store, report: PruneReport) -> Iterator[None]:
    """One prune transaction (BEGIN IMMEDIATE, waiting up to the store's busy_timeout for the write lock), timed
    from the lock to the commit, then a short pause so that a worker waiting for the lock gets it."""
    with store.atomic():
        locked = time.monotonic()
        yield
    report.batches += 1
    report.longest_batch_ms = max(report.longest_batch_ms, (time.monotonic() - locked) * 1e3)
    time.sleep(PRUNE_PAUSE_SECONDS)


# vacuum --------------------------------------------------------------------------------------------
@dataclass
class VacuumReport:
    database: str
    bytes_before: int
    wal_bytes_before: int
    bytes_after: int
    wal_bytes_after: int
    seconds: float


def sqlite_temp_dir() -> Path:
    """Where SQLite puts VACUUM's temporary copy on Unix: $SQLITE_TMPDIR, $TMPDIR, /var/tmp, /usr/tmp, /tmp."""
    for candidate in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), "/var/tmp", "/usr/tmp", "/tmp"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return Path(candidate)
    return Path.cwd()


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def vacuum_space_problem(database: Path) -> str | None:
    """None when there is room for VACUUM; else what is missing. VACUUM writes a temporary copy of the database
    (in SQLite's temp folder) and, in WAL mode, the whole rebuilt file into the WAL beside it: up to the file's
    size in each place, twice that when both are on one file system."""
    size = sum(file_bytes(database))
    needs: dict[int, tuple[int, list[Path]]] = {}
    for folder in (Path(database).resolve().parent, sqlite_temp_dir()):
        device = os.stat(folder).st_dev
        total, folders = needs.get(device, (0, []))
        needs[device] = (total + size, [*folders, folder])
    for need, folders in needs.values():
        free = free_bytes(folders[0])
        if free < need:
            where = " and ".join(str(f) for f in folders)
            return (
                f"VACUUM needs about {human_bytes(need)} free on the file system of {where} "
                f"(a copy of the {human_bytes(size)} database), and {human_bytes(free)} is free"
            )
    return None


def vacuum(database: Path, busy_timeout_seconds: float) -> VacuumReport:
    """VACUUM (it holds the write lock for as long as it takes: workers wait, up to their busy_timeout), then a
    checkpoint that moves the rebuilt pages from the WAL into the file and empties the WAL."""
    database = require_file(database)
    problem = vacuum_space_problem(database)
    if problem:
        raise VlbatchError(f"{database}: {problem}; free some space or set $SQLITE_TMPDIR to a roomier folder")
    before = file_bytes(database)
    started = time.monotonic()
    refuse_newer(database)  # never VACUUM a database a newer vlbatch migrated
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        _refuse_damaged(database, conn)
        conn.execute("PRAGMA temp_store = FILE")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as exc:
        raise database_error(database, exc, "VACUUM") from exc
    finally:
        conn.close()
    after = file_bytes(database)
    return VacuumReport(str(database), before[0], before[1], after[0], after[1], time.monotonic() - started)


# size now ------------------------------------------------------------------------------------------
@dataclass
class TableSize:
    name: str
    rows: int
    bytes: int

    @property
    def bytes_per_row(self) -> float | None:
        return self.bytes / self.rows if self.rows else None


@dataclass
class SizeReport:
    database: str
    file_bytes: int
    wal_bytes: int
    page_size: int
    page_count: int
    free_pages: int
    method: str  # dbstat: measured; estimate: the used pages shared out by the built-in figures
    tables: list[TableSize]

    def table(self, name: str) -> TableSize:
        return next((t for t in self.tables if t.name == name), TableSize(name, 0, 0))


def measure(database: Path) -> SizeReport:
    """The file, its pages, and each table's rows and bytes (with its indexes; `results` without the full-text
    index, which is its own entry), read through a read-only connection."""
    database = require_file(database)
    try:
        conn = connect_read_only(database)
    except sqlite3.Error as exc:
        raise database_error(database, exc, "opening the database") from exc
    try:
        page_size, page_count, free_pages = (
            _one(conn, f"PRAGMA {name}") for name in ("page_size", "page_count", "freelist_count")
        )
        rows = row_counts(conn)
        rows[FTS_TABLE] = rows.get("results", 0)
        try:
            measured, method = _dbstat_bytes(conn), "dbstat"
        except sqlite3.OperationalError as exc:
            if is_corrupt_database(exc) or "dbstat" not in str(exc):
                raise
            measured, method = _estimated_bytes(rows, (page_count - free_pages) * page_size), "estimate"
    except sqlite3.DatabaseError as exc:
        raise database_error(database, exc, "reading the database") from exc
    finally:
        conn.close()
    main, wal = file_bytes(database)
    names = sorted(set(rows) | set(measured), key=lambda n: -measured.get(n, 0))
    tables = [TableSize(n, rows.get(n, 0), measured.get(n, 0)) for n in names]
    return SizeReport(str(database), main, wal, page_size, page_count, free_pages, method, tables)


def _dbstat_bytes(conn: sqlite3.Connection) -> dict[str, int]:
    """Bytes per table from the dbstat virtual table: each table with its indexes, the full-text index's shadow
    tables under `results_fts`, SQLite's own under `sqlite_schema`."""
    owner = {name: table for name, table in conn.execute("SELECT name, tbl_name FROM sqlite_master")}
    sizes: dict[str, int] = {}
    for name, pages_bytes in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
        table = owner.get(name, name)
        if table.startswith(FTS_TABLE):
            table = FTS_TABLE
        elif table.startswith("sqlite_"):
            table = "sqlite_schema"
        sizes[table] = sizes.get(table, 0) + int(pages_bytes)
    return sizes


def _estimated_bytes(rows: dict[str, int], used_bytes: int) -> dict[str, int]:
    """Without dbstat: the used pages shared out among the tables in proportion to rows x built-in bytes/row."""
    weights = {name: count * BUILT_IN_ROW_BYTES.get(name, 100) for name, count in rows.items() if name != FTS_TABLE}
    total = sum(weights.values())
    return {name: round(used_bytes * weight / total) for name, weight in weights.items()} if total else {}


# size to come --------------------------------------------------------------------------------------
@dataclass
class RowCosts:
    """Bytes one row adds, per kind of row; `measured` names those taken from this database."""

    run: float
    link: float
    result: float  # with its share of the full-text index
    standing_file: float
    measured: list[str] = field(default_factory=list)


def row_costs(report: SizeReport) -> RowCosts:
    """Bytes per row of this database where a table holds enough rows to tell; built-in figures elsewhere."""
    costs = dict(BUILT_IN_ROW_BYTES)
    measured = []
    for table in costs:
        size = report.table(table)
        if size.rows >= MIN_MEASURED_ROWS:
            extra = report.table(FTS_TABLE).bytes if table == "results" else 0
            costs[table] = (size.bytes + extra) / size.rows
            measured.append(table)
    return RowCosts(costs["runs"], costs["job_results"], costs["results"], costs["standing_files"], measured)


def new_file_rate(database: Path) -> float | None:
    """New or changed files a standing job answered per day, as a share of the files it tracks now, from its
    runs after its first (None without such history)."""
    conn = connect_read_only(require_file(database))
    try:
        row = conn.execute(
            "SELECT sum(coalesce(answered, 0) + coalesce(failed_media, 0)), min(started_utc), max(finished_utc) "
            "FROM runs r WHERE standing = 1 AND finished_utc IS NOT NULL "
            "AND id > (SELECT min(id) FROM runs f WHERE f.job_id = r.job_id AND f.standing = 1)"
        ).fetchone()
        tracked = _one(conn, "SELECT count(*) FROM standing_files WHERE state != 'gone'")
    except sqlite3.OperationalError:  # an older schema without standing jobs
        return None
    finally:
        conn.close()
    answered, first, last = row
    if not answered or not tracked or not first or not last:
        return None
    days = max(1.0, (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds() / 86400)
    return answered / days / tracked


@dataclass
class Projection:
    kind: str  # standing, nightly
    what: str
    runs: int
    links: int
    results: int
    standing_files: int
    bytes: float


def project(costs: RowCosts, files: int, nights: int, new_per_night: float, prune_days: int | None) -> list[Projection]:
    """Rows and bytes after `nights` nightly runs over a folder of `files` files that gains `new_per_night`
    (a share of `files`) new files each night, for the two kinds of job, kept whole or pruned to `prune_days`.

    - a standing job links only the night's new files: every night a run, and for each new file an answer, a
      link and a tracked file; pruning cannot take what the tracked files point at (nearly everything);
    - a plain job re-run every night (the same id) links every file each night (answers reused, no model time):
      links grow with files x nights; pruning keeps the last `prune_days` nights' runs and their links.
    """
    new = round(files * new_per_night)
    final = files + new * max(0, nights - 1)

    def links_over(first: int, last: int) -> int:  # links of nights first..last (1-based): files then present
        count = max(0, last - first + 1)
        return count * files + new * (sum(range(first - 1, last)) if count else 0)

    shapes = [
        ("standing", "standing job: each night links only new files", nights, final, final, final),
        ("nightly", "plain job re-run nightly: each night links every file", nights, links_over(1, nights), final, 0),
    ]
    if prune_days:
        kept = min(nights, prune_days)
        # a standing run stays while a tracked file points at its link: every run that answered a new file
        standing_runs = nights if new else min(nights, kept + 1)
        shapes[1:1] = [
            ("standing-pruned", f"  the same, pruned to {prune_days} days", standing_runs, final, final, final)
        ]
        shapes.append(
            (
                "nightly-pruned",
                f"  the same, pruned to {prune_days} days",
                kept,
                links_over(nights - kept + 1, nights),
                final,
                0,
            )
        )
    out = []
    for kind, what, runs, links, results, standing in shapes:
        size = runs * costs.run + links * costs.link + results * costs.result + standing * costs.standing_file
        out.append(Projection(kind, what, runs, links, results, standing, size))
    return out


# words ---------------------------------------------------------------------------------------------
def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_backup(report: BackupReport) -> str:
    tables = ", ".join(f"{name} {count:,}" for name, count in report.tables.items())
    return (
        f"backed up {report.source} to {report.backup}: {human_bytes(report.bytes)} in {report.seconds:.1f} s, "
        f"integrity_check {report.integrity}\nrows: {tables}"
    )


def format_prune(report: PruneReport, cutoff_text: str) -> str:
    verb = "deleted" if report.deleted else "would delete"
    lines = [
        f"prune older than {cutoff_text} (finished before {report.cutoff_utc}): "
        + ("done" if report.deleted else "dry run, nothing deleted (--yes deletes)"),
        f"  runs         {report.runs:>10,} {verb} of {report.runs_total:,} "
        f"({report.runs_kept_before_cutoff:,} older kept: a job's latest run, a running job's, "
        "or what a standing job's files point at)",
        f"  job_results  {report.job_results:>10,} {verb} (the links of those runs)",
        f"  results      {report.results:>10,} {verb} ({report.answers:,} answers, {report.failures:,} failures "
        "held by no remaining run or standing file)",
        f"  sidecars     {report.sidecars_detached:>10,} kept with result_id emptied (vlbatch still knows its files)",
    ]
    if report.deleted:
        lines.append(
            f"{report.batches} transactions in {report.seconds:.1f} s, the longest holding the write lock "
            f"{report.longest_batch_ms:.0f} ms; `vlbatch db vacuum` gives the freed pages back to the disk"
        )
    return "\n".join(lines)


def format_vacuum(report: VacuumReport) -> str:
    before = report.bytes_before + report.wal_bytes_before
    after = report.bytes_after + report.wal_bytes_after
    text = (  # the WAL counts: pages not yet checkpointed into the file are part of the database on disk
        f"vacuumed {report.database} in {report.seconds:.1f} s: {human_bytes(before)} -> {human_bytes(after)} on "
        f"disk (file {human_bytes(report.bytes_before)} + WAL {human_bytes(report.wal_bytes_before)} -> file "
        f"{human_bytes(report.bytes_after)} + WAL {human_bytes(report.wal_bytes_after)})"
    )
    if report.wal_bytes_after:
        text += "; a reader held the WAL: it moves into the file at the workers' next checkpoint"
    return text


def format_size(report: SizeReport, costs: RowCosts, projections: list[Projection], settings: dict[str, Any]) -> str:
    free = report.free_pages / report.page_count if report.page_count else 0.0
    lines = [
        f"{report.database}: {human_bytes(report.file_bytes)} (+ WAL {human_bytes(report.wal_bytes)}), "
        f"{report.page_count:,} pages of {report.page_size} bytes, {free:.1%} free (vacuum gives them back)",
        "",
        f"{'table':<16}{'rows':>12}{'bytes':>12}{'bytes/row':>11}",
    ]
    for table in report.tables:
        per_row = f"{table.bytes_per_row:.0f}" if table.bytes_per_row is not None else "-"
        lines.append(f"{table.name:<16}{table.rows:>12,}{human_bytes(table.bytes):>12}{per_row:>11}")
    how = "measured with dbstat" if report.method == "dbstat" else "estimated (no dbstat in this SQLite)"
    lines.append(f"({how}; each table with its indexes)")
    measured = ", ".join(costs.measured) or "none"
    lines += [
        "",
        f"projection: {settings['files']:,} files, {settings['nights']} nights, "
        f"{settings['new_per_night']:.2%} new files a night ({settings['new_source']})",
        f"bytes per row: run {costs.run:.0f}, link {costs.link:.0f}, answer {costs.result:.0f} (with full-text index), "
        f"tracked file {costs.standing_file:.0f} (measured here: {measured}; the rest built in)",
    ]
    for p in projections:
        lines.append(
            f"  {p.what:<58}{human_bytes(p.bytes):>11}  ({p.runs:,} runs, {p.links:,} links, {p.results:,} answers"
            + (f", {p.standing_files:,} tracked files)" if p.standing_files else ")")
        )
    return "\n".join(lines)


def size_dict(report: SizeReport, costs: RowCosts, projections: list[Projection], settings: dict[str, Any]) -> dict:
    tables = [{**asdict(t), "bytes_per_row": t.bytes_per_row} for t in report.tables]
    return {
        **{k: v for k, v in asdict(report).items() if k != "tables"},
        "tables": tables,
        "bytes_per_row": asdict(costs),
        "projection": {**settings, "kinds": [asdict(p) for p in projections]},
    }
