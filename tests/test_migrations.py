"""A database written by vlbatch 0.1.0 (tests/data/vlbatch-0.1.0.db, made by that release's `vlbatch run` over
three jobs: one done with sidecars, one failed that reused an answer, one rejected) opens in this release with
its history carried forward."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from batch.service.store.store import Store

RELEASE_DB = Path(__file__).resolve().parent / "data" / "vlbatch-0.1.0.db"


def test_a_0_1_0_database_is_migrated_with_its_history(tmp_path: Path):
    path = shutil.copy(RELEASE_DB, tmp_path / "vlbatch.db")
    before = sqlite3.connect(path)
    assert [r[0] for r in before.execute("select name from _sqlite_migrations")] == ["m001_initial"]
    old_jobs = {
        r[0]: r[1:] for r in before.execute("select id, state, attempts, answered, reused, failed_media from jobs")
    }
    old_links = before.execute("select count(*) from job_results").fetchone()[0]
    before.close()

    store = Store(path)
    assert [r["name"] for r in store.db["_sqlite_migrations"].rows] == [
        "m001_initial",
        "m002_unit_in_flight",
        "m003_runs_and_exact_links",
        "m004_nodes_and_actors",
        "m005_standing_jobs",
        "m006_claim_fence",
        "m007_workers_control_and_links",
        "m008_decode_rows",
    ]
    # one run per job recorded by 0.1.0, with the job's state and counts; the job points at it
    for job_id, (state, attempts, answered, reused, failed) in old_jobs.items():
        (run,) = store.runs_of(job_id)
        assert (run["state"], run["attempts"], run["answered"], run["reused"], run["failed_media"]) == (
            state,
            attempts,
            answered,
            reused,
            failed,
        )
        assert store.job(job_id)["run_id"] == run["id"]
    # every link kept, now with its run and media paths
    links = list(store.db["job_results"].rows)
    assert len(links) == old_links == 4
    assert all(link["run_id"] and json.loads(link["media_paths"]) for link in links)
    captions = store.query_results(job="captions")
    assert sorted(Path(json.loads(r["media_paths"])[0]).name for r in captions) == ["a.jpg", "b.png"]
    assert all(json.loads(r["tags"]) == {"project": "demo"} for r in captions)
    # the sidecars 0.1.0 wrote are still recognised by their content
    sidecar = next(iter(store.db["sidecars"].rows))
    assert store.wrote_sidecar(sidecar["sha256"])
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # rows link to each other (declared foreign keys, all of them satisfied), the answer comes first
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
    declared = {(fk.table, fk.column, fk.other_table) for t in store.db.tables for fk in t.foreign_keys}
    assert {("job_results", "result_id", "results"), ("job_results", "run_id", "runs"), ("runs", "job_id", "jobs")} <= (
        declared
    )
    assert store.columns("results")[:3] == ["id", "media_paths", "answer"]
    assert "linked_utc" in store.columns("job_results") and "created_utc" not in store.columns("job_results")
    # the full-text index still follows the results table (its triggers were carried over)
    word = store.db.execute("SELECT answer FROM results WHERE error IS NULL LIMIT 1").fetchone()[0].split()[0]
    hits = store.db.execute("SELECT count(*) FROM results_fts WHERE results_fts MATCH ?", [f'"{word}"']).fetchone()[0]
    store.db["results"].insert({"answer": f"{word} zebracorn", "prompt": "p", "created_utc": "2026"})
    found = store.db.execute("SELECT count(*) FROM results_fts WHERE results_fts MATCH 'zebracorn'").fetchone()[0]
    assert hits >= 1 and found == 1
    applied = store.db["_sqlite_migrations"].count
    store.close()
    assert Store(path).db["_sqlite_migrations"].count == applied  # opening again adds none
