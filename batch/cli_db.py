"""`vlbatch db`: the database over years: backup, prune, vacuum, size (the work is in
batch/service/store/maintenance.py).

Each subcommand reads spool.database from the configuration in use, as every command does, and never creates a
database. Exit codes as everywhere: 0 done, 1 a problem (one line on stderr), 2 bad usage or config, 3 a fault of
the machine (the database locked past spool.database_timeout_seconds, a full disk), 4 the database is damaged.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from batch.service.store import maintenance


def _cli() -> Any:
    """batch.cli, imported when a command runs (it imports this module to register the group)."""
    import batch.cli

    return batch.cli


@click.group()
def db() -> None:
    """The database over years: backups while workers write, pruning old runs, VACUUM, size and growth.

    \b
    vlbatch db backup /backup/            a checked copy, taken while workers write
    vlbatch db prune --older-than 90d     what would go (a dry run); --yes deletes it
    vlbatch db vacuum                     give the space freed by a prune back to the disk
    vlbatch db size                       size per table now, and after a year of nights
    """


def _database(ctx: click.Context) -> tuple[Path, float]:
    """(spool.database, spool.database_timeout_seconds) of the configuration in use, checked first."""
    config = _cli()._config(ctx)
    return Path(config.spool.database), config.spool.database_timeout_seconds


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


@db.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT when it exists (else that is an error).")
@click.option(
    "--step-pages",
    type=click.IntRange(min=1),
    default=maintenance.STEP_PAGES,
    show_default=True,
    help="Pages copied per step of the online backup (a short pause between steps).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the copy, its size, checks, rows.")
@click.pass_context
def backup(ctx: click.Context, out: Path, force: bool, step_pages: int, as_json: bool) -> None:
    """Copy the database to OUT while workers keep writing: one checked file that vlbatch opens as it is.

    The copy is one consistent snapshot (SQLite's online backup API; workers never wait for it), written under
    a hidden temp name beside OUT, checked with PRAGMA integrity_check, and only then renamed to OUT: there is
    never a half backup under OUT's name. It needs no -wal file: point spool.database at it to use it.
    OUT may be a folder: the copy is then named vlbatch-YYYYMMDD-HHMMSS.db (UTC) inside it.

    \b
    Examples:
      vlbatch db backup /backup/vlbatch.db
      vlbatch db backup /backup/                  # /backup/vlbatch-20261125-031500.db
      vlbatch db backup --force --json /backup/latest.db
    \b
    Exit codes: 0 written and checked; 1 OUT exists (--force replaces it), no database, no such folder;
    3 a full disk; 4 the database is damaged (nothing is written).
    """
    database, _ = _database(ctx)
    report = maintenance.backup(database, out, force=force, step_pages=step_pages)
    if as_json:
        _echo_json(asdict(report))
    else:
        click.echo(maintenance.format_backup(report))


def _cutoff(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, str]:
    """--older-than: (the text given, the stored UTC time it names); never in the future."""
    from batch.service.store.timefilter import parse_when, to_utc_iso

    now = datetime.now(timezone.utc)
    try:
        when = parse_when(value, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    if when > now:
        raise click.BadParameter(f"{value!r} is in the future: it would prune everything", ctx=ctx, param=param)
    return value, to_utc_iso(when)


@db.command()
@click.option(
    "--older-than",
    "cutoff",
    required=True,
    metavar="AGE",
    callback=_cutoff,
    help="Runs finished before this: an age (90d, 26w, 12h) or an ISO 8601 time (2026-01-01), as --since takes.",
)
@click.option("--yes", is_flag=True, help="Delete. Without it, a dry run: what would go is counted, nothing else.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
@click.pass_context
def prune(ctx: click.Context, cutoff: tuple[str, str], yes: bool, as_json: bool) -> None:
    """Delete old history: runs finished before AGE and their links, and answers no run or file holds any more.

    A dry run by default: the counts per table of what would go; --yes deletes it. Never deleted: a job's
    latest run (what `vlbatch results --job` shows), every run of a running job, what a standing job's tracked
    files point at (their answer, its link and run), anything newer than AGE. Answers and failures go only when
    no remaining run links them and they are older than AGE: a file answered again later costs model time.
    Sidecar rows stay (vlbatch recognises its own .txt/.xmp files by them), with result_id emptied when their
    answer goes. Deletes run in transactions of at most 2,000 rows: workers go on meanwhile. The file does not
    shrink: `vlbatch db vacuum` gives the space back.

    \b
    Examples:
      vlbatch db prune --older-than 90d          # counts only
      vlbatch db prune --older-than 90d --yes
      vlbatch db prune --older-than 2026-01-01 --yes --json
    \b
    Exit codes: 0 done; 1 no database; 2 a bad AGE; 3 the database stayed locked past
    spool.database_timeout_seconds (what was deleted stays deleted: run it again); 4 the database is damaged.
    """
    config = _cli()._config(ctx)
    database, timeout = Path(config.spool.database), config.spool.database_timeout_seconds
    text, cutoff_utc = cutoff
    store = _open_store(database, timeout, Path(config.spool.dir))
    try:
        report = maintenance.prune(store, cutoff_utc, delete=yes)
    finally:
        store.close()
    if as_json:
        _echo_json({"older_than": text, **asdict(report)})
    else:
        click.echo(maintenance.format_prune(report, text))


def _open_store(database: Path, timeout: float, spool: Path) -> Any:
    """The store over an existing database (migrated, as every command that writes it does, when no worker of an
    older vlbatch runs in `spool`)."""
    from batch.service.store.store import Store

    maintenance.require_file(database)
    try:
        return Store(database, timeout, spool=spool)
    except sqlite3.Error as exc:
        raise maintenance.database_error(database, exc, "opening the database") from exc


@db.command()
@click.pass_context
def vacuum(ctx: click.Context) -> None:
    """Rebuild the database file without its free pages (after a prune), and print its size before and after.

    VACUUM holds the write lock while it runs (0.2 s for 41 MiB on a 2-core machine): workers wait, up to
    spool.database_timeout_seconds, then back off and carry on. It needs free disk about the size of the file
    in SQLite's temp folder ($SQLITE_TMPDIR, else /var/tmp) and as much again beside the database (the WAL):
    checked first, with a clear message when there is not enough.

    \b
    Example:
      vlbatch db prune --older-than 90d --yes && vlbatch db vacuum
    \b
    Exit codes: 0 done; 1 no database, or not enough free disk; 3 the database stayed locked; 4 it is damaged.
    """
    database, timeout = _database(ctx)
    click.echo(maintenance.format_vacuum(maintenance.vacuum(database, timeout)))


@db.command()
@click.option(
    "--project-files",
    "files",
    default=100_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files to project for.",
)
@click.option("--nights", default=365, show_default=True, type=click.IntRange(min=1), help="Nightly runs to project.")
@click.option(
    "--new-files",
    "new_percent",
    type=click.FloatRange(min=0, max=100),
    metavar="PERCENT",
    help="New files a night, in percent of --project-files (default: from the standing jobs' history, else 1).",
)
@click.option(
    "--prune-days",
    default=90,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also project with `db prune --older-than Nd` run every night (0: leave that out).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the tables, bytes per row, projection.")
@click.pass_context
def size(
    ctx: click.Context, files: int, nights: int, new_percent: float | None, prune_days: int, as_json: bool
) -> None:
    """The database's size now (rows and bytes per table), and its size after NIGHTS nightly runs over FILES files.

    Bytes per row are measured in this database (SQLite's dbstat table) where a table holds enough rows, else
    built-in figures (bench/db_growth.py). Two kinds of job are projected: a standing job, whose nightly run
    links only new and changed files, and a plain job file re-run every night, which links every file each
    night (its answers are reused: no model time, but a link row per file per night); each also pruned to
    --prune-days.

    \b
    Examples:
      vlbatch db size
      vlbatch db size --project-files 250000 --nights 730 --new-files 0.5
      vlbatch db size --json
    """
    database, _ = _database(ctx)
    report = maintenance.measure(database)
    costs = maintenance.row_costs(report)
    history = maintenance.new_file_rate(database) if new_percent is None else None
    if new_percent is not None:
        rate, source = new_percent / 100, "--new-files"
    elif history is not None:
        rate, source = history, "the standing jobs' history"
    else:
        rate, source = 0.01, "default: no standing job history"
    projections = maintenance.project(costs, files, nights, rate, prune_days or None)
    settings = {"files": files, "nights": nights, "new_per_night": rate, "new_source": source, "prune_days": prune_days}
    if as_json:
        _echo_json(maintenance.size_dict(report, costs, projections, settings))
    else:
        click.echo(maintenance.format_size(report, costs, projections, settings))
