"""What `vlbatch status` and `vlbatch results` show: the spool, running jobs with progress, runs, answers.

These commands only read: they never create a database (a missing one is an error naming the config in use).
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from batch.config import Config
from batch.errors import VlbatchError
from batch.service.faults import DatabaseCorrupt, describe, is_corrupt_database, is_passing
from batch.service.reports.worker_status import (
    PAUSED,
    RUNNING,
    STALLED,
    WAITING,
    job_liveness,
    local_clock,
    stalled_text,
    worker_view,
)
from batch.service.spool.spool import Spool
from batch.service.store.result_filter import ResultFilter
from batch.service.store.store import Store, pending_migrations
from batch.service.store.timefilter import to_utc_iso
from batch.service.worker.heartbeat import is_gone

TABLE_COLUMNS = ("id", "job_id", "run_id", "media", "answer", "output_tokens", "ttft_ms", "tokens_per_s", "created_utc")
# stored as JSON text, shown as values by json_row
JSON_COLUMNS = ("media_paths", "media_sha256", "settings", "tags", "inflight")
MACHINE_FORMATS = ("json", "jsonl", "csv", "openai-batch")  # every matching row unless -n says otherwise
FORMATS = ("table", *MACHINE_FORMATS)
TABLE_PAGE = 100  # rows the terminal table shows unless -n says otherwise


def require_database(config: Config) -> Path:
    """The configured database's path; an error naming the config in use when there is none."""
    path = Path(config.spool.database)
    if not path.is_file():
        raise VlbatchError(
            f"no database at {path} (config: {config.source or 'defaults'}): nothing has run with this "
            "configuration yet; pass --config or set $VLBATCH_CONFIG to read another one"
        )
    return path


def require_current_database(config: Config) -> Path:
    """The configured database, for viewers that only read it: it must exist and carry every migration."""
    path = require_database(config)
    pending = pending_migrations(path)
    if pending:
        raise VlbatchError(
            f"{path} is from an older vlbatch (it lacks {', '.join(pending)}); `vlbatch status` upgrades it "
            "(the viewers open it read-only and never change it)"
        )
    return path


@contextmanager
def existing_store(config: Config) -> Iterator[Store]:
    """The configured database, if it exists; a read-only command never creates one."""
    store = Store(require_database(config), config.spool.database_timeout_seconds, spool=config.spool.dir)
    try:
        yield store
    finally:
        store.close()


def status_report(config: Config, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(timezone.utc)
    with existing_store(config) as store:
        spool_folder = Spool(config.spool.dir, config.spool.lease_seconds)
        spool = spool_folder.counts()
        workers = {row["id"]: row for row in store.workers()}
        running = [
            _progress(store, job, now, job_liveness(job, _worker_of(store, workers, job), spool_folder, now))
            for job in store.running_jobs()
        ]
        windows = {"1h": timedelta(hours=1), "24h": timedelta(days=1)}
        throughput = {}
        for label, span in windows.items():
            figures = store.throughput(to_utc_iso(now - span))
            figures["answers_per_hour"] = figures["answers"] / (span.total_seconds() / 3600)
            throughput[label] = figures
        return {
            "config": str(config.source) if config.source else None,
            "database": str(config.spool.database),
            "queue": spool["inbox"],
            "spool": spool,
            "jobs": _honest_counts(store.counts_by_state(), running),
            "workers": [view for view in (worker_view(row, now) for row in workers.values()) if not view["gone"]],
            "running": running,
            "throughput": throughput,
            "recent_failures": store.recent_failures(),
            "standing": store.standing_jobs(),
            "actors": [
                _actor(row, now, config.spool.heartbeat_seconds)
                for row in store.recent_actors(to_utc_iso(now - timedelta(days=1)))
            ],
        }


def _actor(row: dict[str, Any], now: datetime, heartbeat_seconds: float) -> dict[str, Any]:
    """A Ray actor seen in the last day: where it ran, its state and what it answered. A starting or ready actor
    whose head stopped beating for it is gone, whatever its row said last."""
    decode_s = (row["decode_ms"] or 0) / 1e3
    state = row["state"]
    if state in ("starting", "ready") and is_gone(row.get("heartbeat_utc"), heartbeat_seconds, state, now):
        state = "gone (its head stopped beating)"
    return {
        "actor": row["id"],
        "node": row["node"],
        "backend": row["backend"],
        "state": state,
        "answers": row["answers"],
        "tokens_per_s": round(row["output_tokens"] / decode_s, 2) if decode_s else None,
        "last_error": row["last_error"],
        "updated_utc": row["updated_utc"],
        "heartbeat_utc": row.get("heartbeat_utc"),
    }


def _honest_counts(counts: dict[str, int], running: list[dict[str, Any]]) -> dict[str, int]:
    """Jobs per state, where a job the database calls running counts as its worker's heartbeat says: paused,
    stalled (its worker gone) or waiting (its file back in the inbox)."""
    counts = dict(counts)
    for state in (PAUSED, STALLED, WAITING):
        n = sum(1 for run in running if run["state"] == state)
        if n:
            counts[state] = n
            counts[RUNNING] -= n
    if counts.get(RUNNING) == 0:
        del counts[RUNNING]
    return counts


def _worker_of(store: Store, live: dict[str, dict[str, Any]], job: dict[str, Any]) -> dict[str, Any] | None:
    """The `workers` row of the worker that started the job (one that said it stopped is read too)."""
    return live.get(job["worker"]) or (store.worker(job["worker"]) if job.get("worker") else None)


def _progress(store: Store, job: dict[str, Any], now: datetime, liveness: dict[str, Any]) -> dict[str, Any]:
    """A job the database calls running: whether it is (its worker's heartbeat), answers so far of its media, time
    spent (until its worker was last heard, for a stalled one) and, only while it really runs, the time left at
    this pace."""
    done = store.run_answers(job["run_id"])
    total = job["media_count"] or 0
    until = datetime.fromisoformat(liveness["worker_gone_utc"]) if liveness.get("worker_gone_utc") else now
    elapsed = max(0.0, (until - datetime.fromisoformat(job["started_utc"])).total_seconds())
    eta = elapsed / done * (total - done) if done and total >= done else None
    if liveness["state"] != RUNNING:
        eta = None
    return {
        **liveness,
        "job": job["id"],
        "run": job["run_id"],
        "worker": job["worker"],
        "attempt": job["attempts"],
        "done": done,
        "total": total,
        "elapsed_s": round(elapsed, 1),
        "eta_s": None if eta is None else round(eta, 1),
        "file": ", ".join(Path(p).name for p in json.loads(job["inflight"])) if job.get("inflight") else None,
        "priority": job.get("priority") or 0,
        "cancel_requested_utc": job.get("cancel_requested_utc"),  # vlbatch cancel asked: it ends at the next unit
        "cancelled_by": job.get("cancelled_by"),
    }


def job_history(config: Config, job_id: str) -> list[dict[str, Any]]:
    """A job's runs, newest first; a run still going shows what its links hold so far."""
    with existing_store(config) as store:
        runs = [run | store.run_counts(run["id"]) if run["state"] == RUNNING else run for run in store.runs_of(job_id)]
    if not runs:
        raise VlbatchError(f"no job with id {job_id!r} in {config.spool.database}")
    return [json_row(run) for run in runs]


def format_status(report: dict[str, Any]) -> str:
    lines = [f"config: {report['config'] or '(defaults)'}   database: {report['database']}"]
    lines.append("spool:  " + "  ".join(f"{k}={v}" for k, v in report["spool"].items()))
    lines.append("jobs:   " + ("  ".join(f"{k}={v}" for k, v in report["jobs"].items()) or "none yet"))
    shown = {run["job"] for run in report["running"]}  # their lines name the file from the run, fresher than a beat
    for worker in report.get("workers", []):
        file = f", now {worker['file']}" if worker["file"] and worker["job"] not in shown else ""
        doing = f"on {worker['job']}{file}" if worker["job"] else ""
        lines.append(
            f"worker {worker['worker']} ({worker['command']}): {worker['state']}{' ' + doing if doing else ''}, "
            f"up since {local_clock(worker['started_utc'])}, last heartbeat {worker['heartbeat_age_s']:.0f}s ago"
        )
    for run in report["running"]:
        counts = f"{run['done']}/{run['total']} answered"
        if run["state"] == STALLED:
            lines.append(
                f"{stalled_text(run, datetime.now(timezone.utc))}: {run['job']} (run {run['run']}, attempt "
                f"{run['attempt']}) on {run['worker']}: {counts}"
            )
            continue
        if run["state"] == WAITING:
            lines.append(
                f"waiting {run['job']} (run {run['run']}): back in the inbox, its run resumes when a worker takes it: "
                f"{counts}"
            )
            continue
        if run["state"] == PAUSED:
            lines.append(
                f"paused {run['job']} (run {run['run']}, attempt {run['attempt']}) on {run['worker']}: {counts} "
                "(vlbatch resume goes on)"
            )
            continue
        eta = "?" if run["eta_s"] is None else _duration(run["eta_s"])
        at = f", now {run['file']}" if run["file"] else ""
        if run.get("cancel_requested_utc"):
            at += f"; cancel asked by {run['cancelled_by']} at {local_clock(run['cancel_requested_utc'])}"
        lines.append(
            f"running {run['job']} (run {run['run']}, attempt {run['attempt']}) on {run['worker']}: "
            f"{counts}, {_duration(run['elapsed_s'])} elapsed, ETA {eta}{at}"
        )
    for window, figures in report["throughput"].items():
        lines.append(
            f"{window:>6}: {figures['answers']} answers ({figures['answers_per_hour']:.1f}/h), "
            f"{figures['output_tokens']} tokens, {figures['tokens_per_s']:.2f} tok/s decode, "
            f"mean TTFT {figures['mean_ttft_ms']:.0f} ms"
        )
    for actor in report.get("actors", []):
        speed = "" if actor["tokens_per_s"] is None else f", {actor['tokens_per_s']:.2f} tok/s"
        error = f"; last error: {actor['last_error'].splitlines()[0]}" if actor["last_error"] else ""
        lines.append(
            f"actor {actor['actor']} on {actor['node'] or '?'} ({actor['backend'] or '?'}): {actor['state']}, "
            f"{actor['answers']} answers{speed}{error}"
        )
    for job in report.get("standing", []):
        lines.append(_standing_line(job))
    for failure in report["recent_failures"]:
        lines.append(f"{failure['state']}: {failure['id']}: {(failure['error'] or '').splitlines()[0]}")
    return "\n".join(lines) + "\n"


def _standing_line(job: dict[str, Any]) -> str:
    """A standing job: the files it tracks, and what its last run changed."""
    if job["state"] == "rejected":
        return f"standing {job['id']}: cannot run: {(job['error'] or '').splitlines()[0]}"
    failing = f", {job['failing']} failing" if job["failing"] else ""
    last = (
        f"{job['answered'] or 0} answered, {job['reused'] or 0} reused, {job['failed_media'] or 0} failed "
        f"({job['new_failures'] or 0} new), {job['unchanged'] or 0} unchanged, {job['gone'] or 0} gone"
    )
    when = job["finished_utc"] or f"running since {job['started_utc']}"
    return (
        f"standing {job['id']}: {job['files']} files{failing}; last run {job['run_id']} {job['state']} {when}: {last}"
    )


def format_history(runs: list[dict[str, Any]]) -> str:
    lines = []
    for run in runs:
        counts = f"{run['answered'] or 0} answered, {run['reused'] or 0} reused, {run['failed_media'] or 0} failed"
        if run.get("standing"):
            counts += f" ({run['new_failures'] or 0} new), {run['unchanged'] or 0} unchanged, {run['gone'] or 0} gone"
        lines.append(
            f"run {run['id']}: {run['state']}  {run['source']}  attempts {run['attempts']}  {counts}  "
            f"{run['started_utc']} -> {run['finished_utc'] or '...'}  {run['worker'] or ''}".rstrip()
        )
        if run["error"]:
            lines.append(f"    {run['error'].splitlines()[0]}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Exported:
    """What `export_results` wrote: rows, and how many matched when the table stopped at its page (else None)."""

    written: int
    matching: int | None = None


def row_limit(fmt: str, limit: int | None) -> int | None:
    """The most rows to write (None: all): -n N, 0 for all; without -n a page for the table, all for the rest."""
    if limit is None:
        return TABLE_PAGE if fmt == "table" else None
    return limit or None


def export_results(config: Config, flt: ResultFilter, fmt: str, limit: int | None, out: TextIO) -> Exported:
    """Writes the answers `flt` selects to `out` in `fmt`, each row as the cursor gives it (memory stays flat
    however many match); `limit` as `row_limit` makes it. Reads the configured database, never creates one."""
    with existing_store(config) as store:
        require_named(store.db.conn, flt, store.path)
        names, rows = _query(store, flt, limit)
        if fmt == "table":
            written = _write_table(rows, out)
        elif fmt == "json":
            written = _write_json(rows, out)
        elif fmt == "jsonl":
            written = _write_lines((json.dumps(json_row(row), ensure_ascii=False) for row in rows), out)
        elif fmt == "csv":
            written = _write_csv(names, rows, out)
        elif fmt == "openai-batch":
            written = _write_lines(_openai_lines(store, flt, rows), out)
        else:
            raise ValueError(f"unknown format {fmt!r}")
        matching = None
        if fmt == "table" and limit and written == limit:
            matching = _read(store, lambda: store.db.execute(*flt.count()).fetchone()[0])
    return Exported(written, matching)


def require_named(conn: sqlite3.Connection, flt: ResultFilter, database: Path) -> None:
    """An error naming the job or run a filter asks for when the database has none of that name (a typo would
    otherwise look like a job without answers)."""
    if flt.job and conn.execute("SELECT 1 FROM jobs WHERE id = ?", [flt.job]).fetchone() is None:
        raise VlbatchError(f"no job with id {flt.job!r} in {database} (vlbatch status lists the jobs)")
    if flt.run is not None and conn.execute("SELECT 1 FROM runs WHERE id = ?", [flt.run]).fetchone() is None:
        raise VlbatchError(f"no run {flt.run} in {database} (vlbatch status --job ID lists a job's runs)")


def json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A database row with its JSON-text columns (JSON_COLUMNS: media_paths, media_sha256, settings, tags,
    inflight) as the values they hold: the one shape every `--json` and JSON format prints."""
    return {name: _json_value(value) if name in JSON_COLUMNS else value for name, value in row.items()}


def _json_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:  # not written by vlbatch: shown as it is rather than not at all
        return value


def _query(store: Store, flt: ResultFilter, limit: int | None) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The column names and a lazy iterator of rows. The query runs (and a bad --fts fails) before anything is
    written; the rows are then read one by one as the writer takes them."""
    sql, args = flt.select(store.columns("results"), limit)
    cursor = _read(store, lambda: store.db.execute(sql, args), flt)
    names = [d[0] for d in cursor.description]

    def rows() -> Iterator[dict[str, Any]]:
        values = iter(cursor)
        while True:
            one = _read(store, lambda: next(values, None), flt)
            if one is None:
                return
            yield dict(zip(names, one, strict=True))

    return names, rows()


def _read(store: Store, step: Any, flt: ResultFilter | None = None) -> Any:
    """`step()`, with SQLite's errors as one line: a bad FTS5 query names itself, a damaged database exits 4."""
    try:
        return step()
    except sqlite3.DatabaseError as exc:
        if is_corrupt_database(exc):
            raise DatabaseCorrupt(f"{store.path}: the database is damaged ({describe(exc)})") from None
        if flt is not None and flt.fts and not is_passing(exc, spool=True):  # the one query text a user writes
            raise VlbatchError(
                f"--fts {flt.fts!r} is not a valid SQLite FTS5 query ({exc}); -s takes plain words instead"
            ) from None
        raise VlbatchError(f"{store.path}: cannot read the database ({describe(exc)})") from None


def _write_lines(lines: Iterable[str], out: TextIO) -> int:
    written = 0
    for line in lines:
        out.write(line + "\n")
        written += 1
    return written


def _write_json(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """A JSON array written element by element, in the layout json.dumps(indent=2) gives the whole list."""
    written = 0
    for row in rows:
        out.write(",\n" if written else "[\n")
        out.write(textwrap.indent(json.dumps(json_row(row), ensure_ascii=False, indent=2), "  "))
        written += 1
    out.write("\n]\n" if written else "[]\n")
    return written


def _write_csv(names: list[str], rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """A header, then one line per row; JSON columns stay JSON text in their cell."""
    writer = csv.writer(out)
    writer.writerow(names)
    written = 0
    for row in rows:
        writer.writerow(row.values())
        written += 1
    return written


def _write_table(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    shown = list(rows)  # a page: the columns' widths need every row of it
    out.write(_table(shown))
    return len(shown)


def _openai_lines(store: Store, flt: ResultFilter, rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """OpenAI Batch output lines (`openai_batch.result_lines`), ids from the link, custom_ids from `CustomIds`."""
    from batch.service.spool.openai_batch import result_lines

    return result_lines(_openai_rows(store, flt, rows))


def _openai_rows(store: Store, flt: ResultFilter, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows with their custom_id. A file's history (--file without a run) may hold one request's answer from
    several runs: each custom_id then gets its newest answer only."""
    custom_ids = CustomIds(store.db.conn)
    seen: set[str] | None = set() if flt.history else None
    for row in rows:
        custom_id = custom_ids.of(row)
        if seen is not None:
            if custom_id in seen:
                continue
            seen.add(custom_id)
        yield {**row, "custom_id": custom_id, "result_id": row["link_id"]}


class CustomIds:
    """The custom_id of an answer in an OpenAI Batch export, unique among the lines of one run.

    The base is the request's custom_id (its job's `openai_custom_id` tag), else the job id; neither holds `/`.
    A run that answers once (mode together, or one file, or a text-only job: what one request line becomes) keeps
    the base. Every other answer is `<base>/<its file's path relative to the deepest folder holding all the files
    of its run>` (of a standing job: all the files it tracks), as `paths.encode_path` stores it: a job over
    /srv/photos/ gives `nightly/beach.jpg` and `nightly/2026/harbor.jpg`.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._runs: dict[Any, tuple[bool, bool]] = {}  # run id -> (answers once, standing)
        self._parents: dict[tuple[str, Any], str] = {}

    def of(self, row: Mapping[str, Any]) -> str:
        base = request_id(row)
        once, standing = self._run(row["run_id"])
        paths = json.loads(row.get("media_paths") or "[]")
        if once or len(paths) != 1:
            return base
        parent = self._parent(("job", row["job_id"]) if standing else ("run", row["run_id"]))
        path = paths[0]
        return f"{base}/{path[len(parent) :] if parent and path.startswith(parent) else path}"

    def _run(self, run_id: Any) -> tuple[bool, bool]:
        if run_id not in self._runs:
            found = self.conn.execute("SELECT standing, mode, media_count FROM runs WHERE id = ?", [run_id]).fetchone()
            standing, mode, media_count = found or (0, "each", None)
            once = not standing and (mode == "together" or (media_count is not None and media_count <= 1))
            self._runs[run_id] = (once, bool(standing))
        return self._runs[run_id]

    def _parent(self, key: tuple[str, Any]) -> str:
        """The deepest folder (ending in /) that holds every file of a run, or every file a standing job tracks."""
        if key not in self._parents:
            if key[0] == "job":
                sql = "SELECT min(path), max(path) FROM standing_files WHERE job_id = ?"
            else:
                paths = "json_extract(media_paths, '$[0]')"
                sql = f"SELECT min({paths}), max({paths}) FROM job_results WHERE run_id = ? AND change IS NULL"
            low, high = self.conn.execute(sql, [key[1]]).fetchone()
            prefix = os.path.commonprefix([low or "", high or ""])  # of the least and greatest: of them all
            self._parents[key] = prefix[: prefix.rfind("/") + 1]
        return self._parents[key]


def request_id(row: Mapping[str, Any]) -> str:
    """The custom_id of the request an answer's job came from (its `openai_custom_id` tag), else the job id."""
    tags = _json_value(row.get("tags"))
    custom_id = tags.get("openai_custom_id") if isinstance(tags, dict) else None
    return str(custom_id) if custom_id else str(row["job_id"])


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no results\n"
    cells = [[_cell(name, row) for name in TABLE_COLUMNS] for row in rows]
    widths = [max(len(name), *(len(r[i]) for r in cells)) for i, name in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(name.ljust(w) for name, w in zip(TABLE_COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(name: str, row: dict[str, Any]) -> str:
    if name == "media":
        paths = json.loads(row.get("media_paths") or "[]")
        return ", ".join(Path(p).name for p in paths)
    if name == "answer":
        text = row["answer"] if row.get("error") is None else f"ERROR: {row['error']}"
        text = ("(gone) " if row.get("change") == "gone" else "") + " ".join((text or "").split())
        # a model's text may hold control characters (an escape sequence would drive the terminal): shown as �
        text = "".join(c if c.isprintable() else "\ufffd" for c in text)
        return text if len(text) <= 60 else text[:57] + "..."
    value = row.get(name)
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
