"""Which answers a view shows: one filter, turned into the SQL that `vlbatch results`, `serve` and `gallery` share.

Answers are listed as the runs own them (one row per link of `job_results`), newest link first: each with the
run's own media paths and the job's tags. Which links: each job's latest run (for a standing job, the answer each
file it tracks has now); `run` one run; `last_run` everything each job's latest run linked; `file` every link of a
file in every run. Times (`since`/`until`) select answers by when they were made (`results.created_utc`), never by
when a run linked them (`job_results.linked_utc`): a reused answer keeps the time it was made.
The SQL reads only; it runs on the worker's `Store` connection or on a read-only one (Datasette, the gallery).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class ResultFilter:
    """Without `run`, `last_run` or `file`, every job's latest run (for a standing job, the answer each file it
    tracks has now). `file` is a stored path (`paths.encode_path` of the real absolute path) or a glob of one
    (SQLite GLOB: `*` matches `/` too). `since`/`until` are UTC times in the stored format, compared with the
    answer's `created_utc`; `tag` is `value` (a list item or a mapping key) or `key=value`; `search` is words, each
    found as written (see `literal_words`); `fts` a raw FTS5 query; `failed` keeps only the files that got no answer
    (True) or only answers (False)."""

    job: str | None = None
    run: int | None = None
    last_run: bool = False
    file: str | None = None
    since: str | None = None
    until: str | None = None
    tag: str | None = None
    search: str | None = None
    fts: str | None = None
    failed: bool | None = None

    def where(self) -> tuple[str, list[Any]]:
        where, args = [self._scope()], []
        if self.run is not None:
            args.append(self.run)
        if self.job:
            where.append("jr.job_id = ?")
            args.append(self.job)
        if self.file:
            sql, file_args = _file_condition(self.file)
            where.append(sql)
            args += file_args
        if self.since:
            where.append("r.created_utc >= ?")
            args.append(self.since)
        if self.until:
            where.append("r.created_utc < ?")
            args.append(self.until)
        if self.tag:
            sql, tag_args = _tag_condition(self.tag)
            where.append(sql)
            args += tag_args
        for word in literal_words(self.search or ""):
            where.append("(instr(lower(coalesce(r.answer, '')), ?) > 0 OR instr(lower(coalesce(r.prompt, '')), ?) > 0)")
            args += [word, word]
        if self.fts:
            where.append("r.id IN (SELECT rowid FROM results_fts WHERE results_fts MATCH ?)")
            args.append(self.fts)
        if self.failed is not None:
            where.append("r.error IS NOT NULL" if self.failed else "r.error IS NULL")
        return " AND ".join(where), args

    def _scope(self) -> str:
        """Which links: one run, each job's latest run, every run (a file's history), or each job's current set."""
        if self.run is not None:
            return "jr.run_id = ?"
        if self.last_run:
            return "jr.run_id = j.run_id"
        if self.file:
            return "1"
        return _CURRENT

    @property
    def history(self) -> bool:
        """Whether the rows may hold one file's answers from several runs (`file` without a run)."""
        return bool(self.file) and self.run is None and not self.last_run

    def select(self, result_columns: Sequence[str], limit: int | None = None, offset: int = 0) -> tuple[str, list[Any]]:
        """The answers, newest link first; `result_columns` are the results table's columns, as the database has
        them. `created_utc` is the answer's (when it was made); `linked_utc` is the link's (when the run took it)."""
        # the link's own columns stand in for the answer's: whose file, which job
        own = {"job_id": "jr.job_id", "media_paths": "jr.media_paths", "media_sha256": "jr.media_sha256"}
        own |= {"tags": "j.tags"}
        columns = [f"{own.get(c, 'r.' + c)} AS {c}" for c in result_columns]
        columns += ["jr.run_id", "jr.reused", "jr.id AS link_id", "jr.linked_utc", "jr.change"]
        where, args = self.where()
        sql = f"SELECT {', '.join(columns)} {_FROM} WHERE {where} ORDER BY jr.linked_utc DESC, jr.id DESC"
        if limit:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return sql, args

    def count(self) -> tuple[str, list[Any]]:
        where, args = self.where()
        return f"SELECT count(*) {_FROM} WHERE {where}", args


def literal_words(text: str) -> list[str]:
    """The words of `text` (split at white space), each to be found as written in the answer or the prompt: a part
    of a word counts (`photo` finds `photos`, `坐在` finds `坐在草地上`: text without spaces is searchable too),
    ASCII letters in any case, every other character exactly (`n4.jpg`, `don't`, `C++`, `AND`, `"`). The words are
    lowered here as SQLite's lower() lowers the text: ASCII letters only."""
    return ["".join(c.lower() if c.isascii() else c for c in word) for word in text.split()]


def _file_condition(stored: str) -> tuple[str, list[Any]]:
    """A link holding this stored path; a glob matches it as SQLite GLOB does, or the path equals it literally
    (a file whose name holds `[`)."""
    if GLOB_MAGIC.search(stored):
        return "EXISTS (SELECT 1 FROM json_each(jr.media_paths) m WHERE m.value = ? OR m.value GLOB ?)", [stored] * 2
    return "EXISTS (SELECT 1 FROM json_each(jr.media_paths) m WHERE m.value = ?)", [stored]


def _tag_condition(tag: str) -> tuple[str, list[Any]]:
    key, eq, value = tag.partition("=")
    if eq:  # numbers and booleans match their YAML spelling: year=2026, rated=true
        sql = "EXISTS (SELECT 1 FROM json_each(j.tags) t WHERE t.key = ? AND (CAST(t.value AS TEXT) = ? OR t.type = ?))"
        return sql, [key, value, value.lower() if value.lower() in ("true", "false", "null") else "-"]
    return "EXISTS (SELECT 1 FROM json_each(j.tags) t WHERE t.value = ? OR t.key = ?)", [tag, tag]


# without a run: each job's latest run; for a standing job (whose runs hold only what changed), the answer each of
# its files has now, through the index of the files it tracks
_CURRENT = (
    "(CASE WHEN j.standing = 1 THEN jr.id IN (SELECT sf.link_id FROM standing_files sf WHERE sf.job_id = j.id "
    "AND sf.state != 'gone') ELSE jr.run_id = j.run_id END)"
)
_FROM = "FROM job_results jr JOIN results r ON r.id = jr.result_id JOIN jobs j ON j.id = jr.job_id"
