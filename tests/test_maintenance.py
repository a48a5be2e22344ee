"""`vlbatch db`: backups while a real worker writes, pruning what may go and nothing else, VACUUM, size."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv, wait_for

from batch.cli import main
from batch.service.spool.states import JobState
from batch.service.store import maintenance
from batch.service.store.store import Store

NOW = datetime.now(timezone.utc)


# a database whose history spans a year, written by the store's own write paths ---------------------
class Clock:
    """The store's clock (`utc_now`), set to a number of days ago: history written as it would have been."""

    def __init__(self) -> None:
        self.days_ago = 0.0

    def __call__(self) -> str:
        return (NOW - timedelta(days=self.days_ago)).isoformat(timespec="milliseconds")


def answer(store: Store, job: str, run: int, name: str, words: str, error: str | None = None) -> int:
    row = {
        "media_paths": json.dumps([f"/photos/{name}.jpg"]),
        "media_sha256": json.dumps([name * 4]),
        "cache_key": f"key-{name}",
        "prompt": "Describe.",
        "answer": None if error else words,
        "error": error,
        "error_class": "MediaError" if error else None,
    }
    return store.add_result(job, run, row)


def reuse(store: Store, job: str, run: int, result_id: int, name: str) -> None:
    store.link(job, run, result_id, json.dumps([f"/photos/{name}.jpg"]), json.dumps([name * 4]), reused=True)


def start(store: Store, job: str, standing: bool = False) -> int:
    fields = {"source": f"/jobs/{job}.yaml", "prompt": "Describe.", "standing": int(standing)}
    return store.start_job(job, fields, "host:1")[0]


def track(store: Store, job: str, run: int) -> None:
    """What a standing run leaves in standing_files: each file it linked points at its link and answer."""
    rows = []
    for link in store.run_links(run):
        path = json.loads(link["media_paths"])[0]
        rows.append(
            {
                "job_id": job,
                "path": path,
                "size": 1,
                "mtime_ns": 1,
                "sha256": json.loads(link["media_sha256"])[0],
                "result_id": link["result_id"],
                "link_id": link["link_id"],
                "state": "failed" if link["error"] else "answered",
                "run_id": run,
            }
        )
    store.save_standing(rows)


@pytest.fixture
def history(tmp_path, monkeypatch) -> dict:
    """A year of history (ages in days): what `db prune --older-than 90d` must delete and what it must keep."""
    clock = Clock()
    monkeypatch.setattr("batch.service.store.store.utc_now", clock)
    store = Store(tmp_path / "vlbatch.db")
    ids: dict = {}

    def at(days: float) -> None:
        clock.days_ago = days

    # a plain job re-run: night one answers a and b and fails on broken; b changes; the latest run reuses
    at(200)
    n1 = start(store, "nightly")
    ids["a"] = answer(store, "nightly", n1, "a", "lighthouse harbour dusk")
    ids["b"] = answer(store, "nightly", n1, "b", "zeppelin oldanswer")
    ids["broken"] = answer(store, "nightly", n1, "broken", "", error="broken.jpg: cannot read")
    store.finish_job("nightly", JobState.FAILED, "broken.jpg: cannot read")
    at(150)
    n2 = start(store, "nightly")
    reuse(store, "nightly", n2, ids["a"], "a")
    ids["b2"] = answer(store, "nightly", n2, "b", "zeppelin newanswer")
    store.finish_job("nightly", JobState.DONE)
    at(10)
    n3 = start(store, "nightly")
    reuse(store, "nightly", n3, ids["a"], "a")
    reuse(store, "nightly", n3, ids["b2"], "b")
    store.finish_job("nightly", JobState.DONE)
    # a job id used once, long ago: its only run is its latest
    at(300)
    once = start(store, "once")
    ids["once"] = answer(store, "once", once, "o", "solitary answer")
    store.finish_job("once", JobState.DONE)
    # a job running now whose earlier run is old
    at(200)
    busy1 = start(store, "busy")
    ids["busy"] = answer(store, "busy", busy1, "y", "busy earlier")
    store.finish_job("busy", JobState.DONE)
    at(1)
    busy2 = start(store, "busy")
    reuse(store, "busy", busy2, ids["busy"], "y")
    # a standing job: f1, f2 on its first pass; f3 new and f2 changed on its second; then passes with no news
    at(300)
    s1 = start(store, "archive", standing=True)
    ids["f1"] = answer(store, "archive", s1, "f1", "first file")
    ids["f2"] = answer(store, "archive", s1, "f2", "second file before")
    track(store, "archive", s1)
    store.finish_job("archive", JobState.DONE)
    at(200)
    s2 = start(store, "archive", standing=True)
    ids["f3"] = answer(store, "archive", s2, "f3", "third file")
    ids["f2b"] = answer(store, "archive", s2, "f2", "second file after")
    track(store, "archive", s2)
    store.finish_job("archive", JobState.DONE)
    at(100)
    s3 = start(store, "archive", standing=True)
    store.finish_job("archive", JobState.DONE, counts={"unchanged": 3})
    at(5)
    s4 = start(store, "archive", standing=True)
    store.finish_job("archive", JobState.DONE, counts={"unchanged": 3})
    # sidecars vlbatch wrote for b's old answer and for a's
    (tmp_path / "b.txt").write_text("zeppelin oldanswer")
    store.record_sidecar(tmp_path / "b.txt", "sha-b", ids["b"])
    store.record_sidecar(tmp_path / "a.txt", "sha-a", ids["a"])
    store.close()
    at(0)
    runs = {"n1": n1, "n2": n2, "n3": n3, "once": once, "busy1": busy1, "busy2": busy2}
    runs |= {"s1": s1, "s2": s2, "s3": s3, "s4": s4}
    config = tmp_path / "config.yaml"
    config.write_text("spool:\n  dir: jobs\n  database: vlbatch.db\n")
    return {"db": tmp_path / "vlbatch.db", "config": config, "results": ids, "runs": runs}


def vlbatch(config: Path, *args: str):
    return CliRunner().invoke(main, ["--config", str(config), *args])


def ids_of(db: Path, table: str) -> set:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute(f"SELECT id FROM {table}")}
    finally:
        conn.close()


def fts_search(db: Path, word: str) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT rowid FROM results_fts WHERE results_fts MATCH ?", [word])]
    finally:
        conn.close()


def test_every_db_subcommand_is_in_the_docs_and_has_help():
    from batch.cli_db import db

    readme = (Path(__file__).resolve().parents[1] / "docs" / "operating.md").read_text()
    assert set(db.commands) == {"backup", "prune", "vacuum", "size"}
    for name, command in db.commands.items():
        assert f"vlbatch db {name}" in readme, name
        result = CliRunner().invoke(main, ["db", name, "--help"])
        assert result.exit_code == 0 and command.help.split(".")[0][:40] in " ".join(result.stdout.split()), name


# prune ---------------------------------------------------------------------------------------------
def test_prune_is_a_dry_run_by_default_and_counts_what_would_go(history):
    before = {table: ids_of(history["db"], table) for table in ("runs", "results", "job_results")}
    result = vlbatch(history["config"], "db", "prune", "--older-than", "90d", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["deleted"] is False
    # n1, n2 (nightly's older runs) and s3 (a standing pass no tracked file points at)
    assert (report["runs"], report["job_results"]) == (3, 5)
    assert (report["results"], report["answers"], report["failures"]) == (2, 1, 1)
    assert report["sidecars_detached"] == 1
    assert {table: ids_of(history["db"], table) for table in before} == before


def test_prune_deletes_old_history_and_keeps_what_is_needed(history):
    runs, results = history["runs"], history["results"]
    result = vlbatch(history["config"], "db", "prune", "--older-than", "90d", "--yes")
    assert result.exit_code == 0, result.output
    assert "3 deleted of 10" in " ".join(result.stdout.split())

    assert ids_of(history["db"], "runs") == {runs[k] for k in ("n3", "once", "busy1", "busy2", "s1", "s2", "s4")}
    kept = {results[k] for k in ("a", "b2", "once", "busy", "f1", "f2", "f3", "f2b")}
    assert ids_of(history["db"], "results") == kept  # b's old answer and the old failure went
    conn = sqlite3.connect(history["db"])
    try:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.execute("INSERT INTO results_fts(results_fts) VALUES('integrity-check')")  # raises if inconsistent
        links = conn.execute("SELECT DISTINCT run_id FROM job_results").fetchall()
        sidecars = dict(conn.execute("SELECT path, result_id FROM sidecars"))
    finally:
        conn.close()
    assert {r for (r,) in links} <= ids_of(history["db"], "runs")
    # the sidecar rows stay (vlbatch still knows its .txt files); the pruned answer's is detached
    assert sidecars == {str(history["db"].parent / "b.txt"): None, str(history["db"].parent / "a.txt"): results["a"]}
    assert fts_search(history["db"], "oldanswer") == []
    assert fts_search(history["db"], "newanswer") == [results["b2"]]

    shown = vlbatch(history["config"], "results", "--job", "nightly", "--format", "json")
    assert shown.exit_code == 0, shown.output
    assert sorted(row["answer"] for row in json.loads(shown.stdout)) == [
        "lighthouse harbour dusk",
        "zeppelin newanswer",
    ]
    status = vlbatch(history["config"], "status", "--job", "nightly", "--json")
    assert status.exit_code == 0, status.output
    assert [run["id"] for run in json.loads(status.stdout)] == [runs["n3"]]
    assert vlbatch(history["config"], "status").exit_code == 0

    again = vlbatch(history["config"], "db", "prune", "--older-than", "90d", "--yes", "--json")
    assert json.loads(again.stdout)["runs"] == 0  # nothing more to take


def test_prune_in_batches_smaller_than_a_run_leaves_the_same_database(history, tmp_path):
    copy = tmp_path / "copy.db"
    maintenance.backup(history["db"], copy)
    cutoff = (NOW - timedelta(days=90)).isoformat(timespec="milliseconds")
    reports = []
    for path, rows in ((history["db"], maintenance.PRUNE_BATCH_ROWS), (copy, 2)):  # n1 has 3 links: 2 batches
        store = Store(path)
        reports.append(maintenance.prune(store, cutoff, delete=True, batch_rows=rows))
        store.close()
    whole, small = reports
    assert (small.runs, small.job_results, small.results) == (whole.runs, whole.job_results, whole.results) == (3, 5, 2)
    assert small.batches > whole.batches
    for table in ("runs", "results", "job_results", "standing_files"):
        assert ids_of(copy, table) == ids_of(history["db"], table) if table != "standing_files" else True
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_prune_keeps_answers_a_worker_linked_again_after_the_snapshot(history):
    """A worker that reuses an old answer while a prune runs: the answer stays (checked in each batch)."""
    store = Store(history["db"])
    cutoff = (NOW - timedelta(days=90)).isoformat(timespec="milliseconds")
    conn = store.db.conn
    maintenance._snapshot(conn, cutoff, maintenance.PruneReport(cutoff, True))
    busy2 = history["runs"]["busy2"]
    store.hold("busy", store.job("busy")["fence"])
    reuse(store, "busy", busy2, history["results"]["b"], "b")  # b's old answer, reused now by the running job
    report = maintenance.PruneReport(cutoff, True)
    runs = [row[0] for row in conn.execute("SELECT id FROM prune_runs")]
    maintenance._delete_runs(store, runs, 100, report)
    maintenance._delete_results(store, [row[0] for row in conn.execute("SELECT id FROM prune_results")], 100, report)
    store.close()
    assert history["results"]["b"] in ids_of(history["db"], "results")
    assert report.results == 1  # only the old failure


@pytest.mark.parametrize("age", ["ninety days", "2999-01-01", "0x"])
def test_prune_refuses_a_bad_or_future_age(history, age):
    result = vlbatch(history["config"], "db", "prune", "--older-than", age)
    assert result.exit_code == 2
    assert "--older-than" in result.output


def test_db_commands_without_a_database_say_so(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("spool:\n  dir: jobs\n  database: none.db\n")
    for args in (["backup", "out.db"], ["prune", "--older-than", "1d"], ["vacuum"], ["size"]):
        result = vlbatch(config, "db", *args)
        assert result.exit_code == 1, (args, result.output)
        assert "no database at" in result.output and "none.db" in result.output
    assert not (tmp_path / "none.db").exists()


# backup --------------------------------------------------------------------------------------------
def test_backup_refuses_to_overwrite_without_force_and_names_files_in_a_folder(history, tmp_path):
    out = tmp_path / "out.db"
    out.write_text("someone's file")
    refused = vlbatch(history["config"], "db", "backup", str(out))
    assert refused.exit_code == 1 and "exists; pass --force" in refused.output
    assert out.read_text() == "someone's file"
    forced = vlbatch(history["config"], "db", "backup", str(out), "--force", "--json")
    assert forced.exit_code == 0, forced.output
    report = json.loads(forced.stdout)
    assert (report["backup"], report["integrity"], report["tables"]["runs"]) == (str(out), "ok", 10)
    assert report["bytes"] == out.stat().st_size
    assert out.stat().st_mode & 0o777 == history["db"].stat().st_mode & 0o777
    folder = tmp_path / "backups"
    folder.mkdir()
    named = vlbatch(history["config"], "db", "backup", str(folder), "--json")
    made = Path(json.loads(named.stdout)["backup"])
    assert made.parent == folder and made.name.startswith("vlbatch-") and made.suffix == ".db"
    assert datetime.strptime(made.stem, "vlbatch-%Y%m%d-%H%M%S")
    assert sorted(p.name for p in folder.iterdir()) == [made.name]  # no temp file left, no -wal beside it
    missing = vlbatch(history["config"], "db", "backup", str(tmp_path / "nowhere" / "x.db"))
    assert missing.exit_code == 1 and "does not exist" in missing.output


def damage(path: Path) -> None:
    """Overwrite every other page but the first with garbage (what a bad disk or a stray write does)."""
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        for offset in range(4096, size, 4096 * 2):
            fh.seek(offset)
            fh.write(os.urandom(4096))


def test_backup_of_a_damaged_database_exits_4_and_writes_nothing(history, tmp_path):
    damage(history["db"])
    out = tmp_path / "backups"
    out.mkdir()
    result = vlbatch(history["config"], "db", "backup", str(out))
    assert result.exit_code == 4, result.output
    assert "damaged" in result.output
    assert list(out.iterdir()) == []


def test_size_and_vacuum_of_a_damaged_database_exit_4(history):
    damage(history["db"])
    for args in (["size"], ["vacuum"]):
        result = vlbatch(history["config"], "db", *args)
        assert result.exit_code == 4, (args, result.output)


@pytest.mark.slow
def test_backup_while_watch_answers_jobs_holds_every_answer_committed_before_it(tmp_path, tiny_onnx):
    env = SpoolEnv(tmp_path, tiny_onnx)
    # one answer at a time: answers land one by one, so some land while the backup copies (a batch lands at once)
    env.write_config(lease=3.0, settle=0.2, rescan=1.0, model={"batch": 1})
    for i in range(24):
        env.image(f"batch/{i:02d}.png", seed=200 + i, size=(900, 600))
    proc = env.spawn("watch", log=tmp_path / "watch.log")
    try:
        for j in range(3):
            names = "".join(f"  - ../../media/batch/{i:02d}.png\n" for i in range(j * 8, j * 8 + 8))
            env.drop(f"job{j}.yaml", f"id: job{j}\nprompt: Describe.\nmax_new_tokens: 48\ninputs:\n{names}")
        wait_for(lambda: answers(env.db_path) >= 3, timeout=120)
        committed = answer_ids(env.db_path)
        out = tmp_path / "backup.db"
        done = subprocess.run(
            env.cli("db", "backup", str(out), "--step-pages", "1", "--json"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        after = answers(env.db_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    report = json.loads(done.stdout)
    print(f"\n{len(committed)} answers before the backup, {report['tables']['results']} in it, {after} after it")
    assert after > len(committed)  # the worker kept answering around the backup
    assert report["integrity"] == "ok"
    assert not Path(f"{out}-wal").exists()
    assert open(out, "rb").read(20)[18:20] == b"\x01\x01"  # a rollback-journal file: no WAL needed beside it
    conn = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        held = {row[0] for row in conn.execute("SELECT id FROM results")}
    finally:
        conn.close()
    assert committed <= held
    assert report["tables"]["results"] == len(held)
    # vlbatch uses the backup as its database, directly
    config = tmp_path / "restored.yaml"
    config.write_text(env.config_path.read_text().replace("database: vlbatch.db", f"database: {out}"))
    shown = vlbatch(config, "results", "-n", "0", "--format", "json")
    assert shown.exit_code == 0, shown.output
    assert len(json.loads(shown.stdout)) >= len(committed)


def answers(db: Path) -> int:
    try:
        return len(answer_ids(db))
    except sqlite3.OperationalError:  # the worker has not made the tables yet
        return 0


def answer_ids(db: Path) -> set[int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM results")}
    finally:
        conn.close()


# vacuum --------------------------------------------------------------------------------------------
def test_vacuum_after_a_prune_shrinks_the_file(tmp_path):
    store = Store(tmp_path / "vlbatch.db")
    for night in range(4):
        run = start(store, "nightly")
        with store.atomic():
            for i in range(500):
                answer(store, "nightly", run, f"n{night}-{i}", "words " * 40)
        store.finish_job("nightly", JobState.DONE)
    store.close()
    config = tmp_path / "config.yaml"
    config.write_text("spool:\n  dir: jobs\n  database: vlbatch.db\n")
    pruned = vlbatch(
        config,
        "db",
        "prune",
        "--older-than",
        (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat(),
        "--yes",
    )
    assert pruned.exit_code == 2  # in the future: refused
    conn = sqlite3.connect(tmp_path / "vlbatch.db")
    conn.execute("UPDATE runs SET finished_utc = '2000-01-01T00:00:00.000+00:00' WHERE id < 4")
    conn.execute("UPDATE results SET created_utc = '2000-01-01T00:00:00.000+00:00'")
    conn.commit()
    conn.close()
    assert vlbatch(config, "db", "prune", "--older-than", "1d", "--yes").exit_code == 0
    before = maintenance.file_bytes(tmp_path / "vlbatch.db")
    result = vlbatch(config, "db", "vacuum")
    assert result.exit_code == 0, result.output
    after = maintenance.file_bytes(tmp_path / "vlbatch.db")
    assert after[0] < before[0] / 2 and after[1] == 0
    assert "vacuumed" in result.stdout and maintenance.human_bytes(after[0]) in result.stdout
    assert ids_of(tmp_path / "vlbatch.db", "runs") == {4}


def test_vacuum_refuses_without_the_free_disk_it_needs(history, monkeypatch):
    monkeypatch.setattr(maintenance, "free_bytes", lambda folder: 1000)  # the disk is the boundary here
    before = history["db"].read_bytes()
    result = vlbatch(history["config"], "db", "vacuum")
    assert result.exit_code == 1
    assert "VACUUM needs about" in result.output and "1000 B is free" in result.output
    assert history["db"].read_bytes() == before


# size ----------------------------------------------------------------------------------------------
def test_size_reports_tables_and_projects_both_kinds_of_job(history):
    result = vlbatch(history["config"], "db", "size", "--json", "--project-files", "1000", "--nights", "10")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tables = {t["name"]: t for t in report["tables"]}
    assert report["method"] == "dbstat"
    assert (tables["runs"]["rows"], tables["results"]["rows"], tables["standing_files"]["rows"]) == (10, 10, 3)
    assert sum(t["bytes"] for t in report["tables"]) == report["page_size"] * (
        report["page_count"] - report["free_pages"]
    )
    kinds = {k["kind"]: k for k in report["projection"]["kinds"]}
    assert set(kinds) == {"standing", "standing-pruned", "nightly", "nightly-pruned"}
    assert kinds["nightly"]["bytes"] > kinds["standing"]["bytes"]
    # the standing job's history: f3 and f2 again after its first pass, over 195 days, 3 files tracked
    assert report["projection"]["new_source"] == "the standing jobs' history"
    assert report["projection"]["new_per_night"] == pytest.approx(2 / 195 / 3, rel=0.01)
    text = vlbatch(history["config"], "db", "size", "--new-files", "2")
    assert text.exit_code == 0, text.output
    assert "plain job re-run nightly" in text.stdout and "2.00% new files a night (--new-files)" in text.stdout


def test_projection_arithmetic():
    costs = maintenance.RowCosts(run=1, link=1, result=1, standing_file=1)
    kinds = {p.kind: p for p in maintenance.project(costs, files=1000, nights=10, new_per_night=0.01, prune_days=4)}
    # 1000 files, 10 new a night: 1090 at the end
    assert (kinds["standing"].runs, kinds["standing"].links, kinds["standing"].results) == (10, 1090, 1090)
    assert kinds["standing"].bytes == 10 + 3 * 1090
    assert kinds["nightly"].links == sum(1000 + 10 * k for k in range(10))
    assert (kinds["nightly-pruned"].runs, kinds["nightly-pruned"].links) == (
        4,
        sum(1000 + 10 * k for k in range(6, 10)),
    )
    assert kinds["nightly"].bytes == 10 + kinds["nightly"].links + 1090
