"""A database written by vlbatch 0.1.0 (tests/data/vlbatch-0.1.0.db, made by that release's `vlbatch run` over
three jobs: one done with sidecars, one failed that reused an answer, one rejected) opens in this release with
its history carried forward."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from batch.service.store import Store

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
    applied = store.db["_sqlite_migrations"].count
    store.close()
    assert Store(path).db["_sqlite_migrations"].count == applied  # opening again adds none
