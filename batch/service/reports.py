"""What `vlbatch status` and `vlbatch results` print: spool and job counts, throughput, stored answers."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from batch.config import Config
from batch.errors import VlbatchError
from batch.service.spool import Spool
from batch.service.store import Store

TABLE_COLUMNS = ("id", "job_id", "media", "answer", "output_tokens", "ttft_ms", "tokens_per_s", "created_utc")


def status_report(config: Config) -> dict[str, Any]:
    store = Store(config.spool.database, config.spool.database_timeout_seconds)
    now = datetime.now(timezone.utc)
    try:
        return {
            "spool": Spool(config.spool.dir).counts(),
            "jobs": store.counts_by_state(),
            "throughput": {
                label: store.throughput((now - span).isoformat(timespec="milliseconds"))
                for label, span in (("1h", timedelta(hours=1)), ("24h", timedelta(days=1)))
            },
            "recent_failures": store.recent_failures(),
        }
    finally:
        store.close()


def query_results(config: Config, **filters: Any) -> list[dict[str, Any]]:
    store = Store(config.spool.database, config.spool.database_timeout_seconds)
    try:
        return store.query_results(**filters)
    except sqlite3.OperationalError as exc:
        raise VlbatchError(f"cannot run that search ({exc}); see SQLite FTS5 query syntax") from None
    finally:
        store.close()


def format_results(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if fmt == "csv":
        out = io.StringIO()
        if rows:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return out.getvalue()
    return _table(rows)


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
