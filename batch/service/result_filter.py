"""Which answers a view shows: one filter, turned into the SQL that `vlbatch results`, `serve` and `gallery` share.

Answers are listed as the runs own them, newest first: each with the run's own media paths and the job's tags.
The SQL reads only; it runs on the worker's `Store` connection or on a read-only one (Datasette, the gallery).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResultFilter:
    """Without `run`, every job's latest run (for a standing job, the answer each file it tracks has now).
    `since`/`until` are UTC times in the stored format; `tag` is `value` (a list item or a mapping key) or
    `key=value`; `search` is an FTS5 query over answers and prompts; `failed` keeps only the files that got no
    answer (True) or only answers (False)."""

    job: str | None = None
    run: int | None = None
    since: str | None = None
    until: str | None = None
    tag: str | None = None
    search: str | None = None
    failed: bool | None = None

    def where(self) -> tuple[str, list[Any]]:
        where, args = ["jr.run_id = ?" if self.run is not None else _CURRENT], []
        if self.run is not None:
            args.append(self.run)
        if self.job:
            where.append("jr.job_id = ?")
            args.append(self.job)
        if self.since:
            where.append("jr.created_utc >= ?")
            args.append(self.since)
        if self.until:
            where.append("jr.created_utc < ?")
            args.append(self.until)
        if self.tag:
            key, eq, value = self.tag.partition("=")
            if eq:  # numbers and booleans match their YAML spelling: year=2026, rated=true
                where.append(
                    "EXISTS (SELECT 1 FROM json_each(j.tags) t WHERE t.key = ? AND (CAST(t.value AS TEXT) = ? "
                    "OR t.type = ?))"
                )
                args += [key, value, value.lower() if value.lower() in ("true", "false", "null") else "-"]
            else:
                where.append("EXISTS (SELECT 1 FROM json_each(j.tags) t WHERE t.value = ? OR t.key = ?)")
                args += [self.tag, self.tag]
        if self.search:
            where.append("r.id IN (SELECT rowid FROM results_fts WHERE results_fts MATCH ?)")
            args.append(self.search)
        if self.failed is not None:
            where.append("r.error IS NOT NULL" if self.failed else "r.error IS NULL")
        return " AND ".join(where), args

    def select(self, result_columns: Sequence[str], limit: int | None = None, offset: int = 0) -> tuple[str, list[Any]]:
        """The answers, newest first; `result_columns` are the results table's columns, as the database has them."""
        # the link's own columns stand in for the answer's: whose file, which job, when it was recorded
        own = {"job_id": "jr.job_id", "media_paths": "jr.media_paths", "media_sha256": "jr.media_sha256"}
        own |= {"created_utc": "jr.created_utc", "tags": "j.tags"}
        columns = [f"{own.get(c, 'r.' + c)} AS {c}" for c in result_columns]
        columns += ["jr.run_id", "jr.reused", "jr.id AS link_id"]
        where, args = self.where()
        sql = f"SELECT {', '.join(columns)} {_FROM} WHERE {where} ORDER BY jr.created_utc DESC, jr.id DESC"
        if limit:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return sql, args

    def count(self) -> tuple[str, list[Any]]:
        where, args = self.where()
        return f"SELECT count(*) {_FROM} WHERE {where}", args


# without --run: each job's latest run; for a standing job (whose runs hold only what changed), the answer each of
# its files has now, through the index of the files it tracks
_CURRENT = (
    "(CASE WHEN j.standing = 1 THEN jr.id IN (SELECT sf.link_id FROM standing_files sf WHERE sf.job_id = j.id "
    "AND sf.state != 'gone') ELSE jr.run_id = j.run_id END)"
)
_FROM = "FROM job_results jr JOIN results r ON r.id = jr.result_id JOIN jobs j ON j.id = jr.job_id"
