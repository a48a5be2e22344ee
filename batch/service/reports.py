"""What `vlbatch status` and `vlbatch results` show: the spool, running jobs with progress, runs, answers.

These commands only read: they never create a database (a missing one is an error naming the config in use).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from batch.config import Config
from batch.errors import VlbatchError
from batch.service.spool import Spool
from batch.service.store import Store, pending_migrations
from batch.service.timefilter import to_utc_iso

TABLE_COLUMNS = ("id", "job_id", "media", "answer", "output_tokens", "ttft_ms", "tokens_per_s", "created_utc")
JSON_COLUMNS = ("media_paths", "media_sha256", "settings", "tags")  # stored as JSON text, shown as values


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
    store = Store(require_database(config), config.spool.database_timeout_seconds)
    try:
        yield store
    finally:
        store.close()


def status_report(config: Config, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(timezone.utc)
    with existing_store(config) as store:
        spool = Spool(config.spool.dir).counts()
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
            "jobs": store.counts_by_state(),
            "running": [_progress(store, job, now) for job in store.running_jobs()],
            "throughput": throughput,
            "recent_failures": store.recent_failures(),
            "standing": store.standing_jobs(),
            "actors": [_actor(row) for row in store.recent_actors(to_utc_iso(now - timedelta(days=1)))],
        }


def _actor(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray actor seen in the last day: where it ran, its state and what it answered."""
    decode_s = (row["decode_ms"] or 0) / 1e3
    return {
        "actor": row["id"],
        "node": row["node"],
        "backend": row["backend"],
        "state": row["state"],
        "answers": row["answers"],
        "tokens_per_s": round(row["output_tokens"] / decode_s, 2) if decode_s else None,
        "last_error": row["last_error"],
        "updated_utc": row["updated_utc"],
    }


def _progress(store: Store, job: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A running job: its worker, answers so far of its media, time spent and the time left at this pace."""
    done = store.run_answers(job["run_id"])
    total = job["media_count"] or 0
    elapsed = (now - datetime.fromisoformat(job["started_utc"])).total_seconds()
    eta = elapsed / done * (total - done) if done and total >= done else None
    return {
        "job": job["id"],
        "run": job["run_id"],
        "worker": job["worker"],
        "attempt": job["attempts"],
        "done": done,
        "total": total,
        "elapsed_s": round(elapsed, 1),
        "eta_s": None if eta is None else round(eta, 1),
        "file": ", ".join(Path(p).name for p in json.loads(job["inflight"])) if job.get("inflight") else None,
    }


def job_history(config: Config, job_id: str) -> list[dict[str, Any]]:
    with existing_store(config) as store:
        runs = store.runs_of(job_id)
    if not runs:
        raise VlbatchError(f"no job with id {job_id!r} in {config.spool.database}")
    return runs


def format_status(report: dict[str, Any]) -> str:
    lines = [f"config: {report['config'] or '(defaults)'}   database: {report['database']}"]
    lines.append("spool:  " + "  ".join(f"{k}={v}" for k, v in report["spool"].items()))
    lines.append("jobs:   " + ("  ".join(f"{k}={v}" for k, v in report["jobs"].items()) or "none yet"))
    for run in report["running"]:
        eta = "?" if run["eta_s"] is None else _duration(run["eta_s"])
        at = f", now {run['file']}" if run["file"] else ""
        lines.append(
            f"running {run['job']} (run {run['run']}, attempt {run['attempt']}) on {run['worker']}: "
            f"{run['done']}/{run['total']} answered, {_duration(run['elapsed_s'])} elapsed, ETA {eta}{at}"
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


def query_results(config: Config, **filters: Any) -> list[dict[str, Any]]:
    with existing_store(config) as store:
        try:
            return store.query_results(**filters)
        except sqlite3.OperationalError as exc:
            raise VlbatchError(f"cannot run that search ({exc}); see SQLite FTS5 query syntax") from None


def format_results(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt in ("json", "jsonl"):
        values = [_with_json_values(row) for row in rows]
        if fmt == "json":
            return json.dumps(values, ensure_ascii=False, indent=2) + "\n"
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in values)
    if fmt == "csv":
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return out.getvalue()
    if fmt == "openai-batch":
        from batch.service.openai_batch import result_lines

        return "".join(line + "\n" for line in result_lines(_openai_rows(rows)))
    return _table(rows)


def _openai_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Result rows keyed by the custom_id a request carried (its job's tag), else by the job id."""
    out = []
    for row in rows:
        tags = json.loads(row.get("tags") or "null")
        custom_id = tags.get("openai_custom_id") if isinstance(tags, dict) else None
        out.append({**row, "custom_id": custom_id or row["job_id"], "result_id": row["link_id"]})
    return out


def _with_json_values(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v for k, v in row.items()}


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
        text = " ".join((text or "").split())
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
