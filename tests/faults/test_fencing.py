"""Faults no lease alone survives, with real `vlbatch watch` processes: a worker suspended past its lease
(SIGSTOP, as a laptop lid or a VM pause would) while another takes its job over, and the database file deleted
or replaced under a running worker."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from spool_env import SpoolEnv, wait_for

pytestmark = pytest.mark.slow

FILES = 10


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    # one answer at a time: a batch's answers are committed back to back, and a worker suspended while it holds
    # SQLite's write lock (one writer at a time) holds every other worker's writes until it resumes
    e.write_config(lease=2.0, settle=0.2, rescan=0.5, max_workers=2, model={"batch": 1})
    for i in range(FILES):
        e.image(f"many/{i:02d}.png", seed=100 + i, size=(900, 600))
    return e


def rows(env: SpoolEnv, sql: str, *args: object) -> list[tuple]:
    try:
        with sqlite3.connect(f"file:{env.db_path}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []


def answers(env: SpoolEnv) -> int:
    found = rows(env, "select count(*) from results where job_id = 'long'")
    return found[0][0] if found else 0


def stop(proc) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return ""


@pytest.mark.parametrize("resume", ["after", "while"])
def test_a_worker_suspended_past_its_lease_writes_nothing_more(env: SpoolEnv, resume: str) -> None:
    logs = env.root / "a.log", env.root / "b.log"
    first = env.spawn("watch", log=logs[0])
    second = None
    try:
        wait_for(lambda: "model.loaded" in logs[0].read_text(), timeout=60)
        env.drop("long.yaml", "id: long\nprompt: Describe.\ninputs: ../../media/many/\nmax_new_tokens: 40\n")
        wait_for(lambda: answers(env) >= 2, timeout=60)
        first.send_signal(signal.SIGSTOP)  # suspended mid-job, its lease left to run out
        second = env.spawn("watch", log=logs[1])
        if resume == "after":
            wait_for(lambda: (env.job("long") or {}).get("state") == "done", timeout=120)
        else:
            wait_for(lambda: "job.started" in logs[1].read_text() and answers(env) >= 4, timeout=120)
        first.send_signal(signal.SIGCONT)
        wait_for(lambda: "event=claim.lost" in logs[0].read_text(), timeout=60)
        wait_for(lambda: (env.job("long") or {}).get("state") == "done", timeout=120)
        time.sleep(1.5)  # a stale write, had there been one, would land now
    finally:
        for proc in (first, second):
            if proc is not None:
                stop(proc)
    per_file = rows(env, "select media_paths, count(*) from results where job_id = 'long' group by media_paths")
    assert len(per_file) == FILES and {n for _, n in per_file} == {1}, per_file  # one row per file, none twice
    job = env.job("long")
    assert (job["state"], job["answered"], job["reused"], job["failed_media"]) == ("done", FILES, 0, 0)
    second_name = next(line for line in logs[1].read_text().splitlines() if "event=job.started" in line)
    assert rows(env, "select count(*), max(state) from runs where job_id = 'long'") == [(1, "done")]
    assert job["worker"].split(":")[1] == str(second.pid), (job["worker"], second_name)  # the new holder's end
    lost = next(line for line in logs[0].read_text().splitlines() if "event=claim.lost" in line)
    assert f":{second.pid}" in lost  # says who holds it now
    assert sorted(os.listdir(env.jobs / "work")) == []  # no orphan lease, no claim left
    assert (env.jobs / "done" / "long.yaml").exists()
    assert "Traceback" not in logs[0].read_text() + logs[1].read_text()


def test_a_database_deleted_or_replaced_under_watch_gets_every_answer(env: SpoolEnv, tmp_path: Path) -> None:
    env.image("a.png", 1)
    env.image("b.png", 2)
    env.image("c.png", 3)
    log = env.root / "watch.log"
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: "model.loaded" in log.read_text(), timeout=60)
        env.drop("one.yaml", "id: one\nprompt: Describe.\ninputs: ../../media/a.png\n")
        wait_for(lambda: (env.jobs / "done" / "one.yaml").exists(), timeout=60)

        for suffix in ("", "-wal", "-shm"):  # a cleanup script removes the database
            Path(f"{env.db_path}{suffix}").unlink(missing_ok=True)
        env.drop("two.yaml", "id: two\nprompt: Describe.\ninputs: ../../media/b.png\n")
        wait_for(lambda: (env.jobs / "done" / "two.yaml").exists(), timeout=60)
        assert rows(env, "select count(*) from results where job_id = 'two'") == [(1,)]

        backup = tmp_path / "restored.db"  # a restore from a backup: another file at the same path
        source, copy = sqlite3.connect(env.db_path), sqlite3.connect(backup)
        source.backup(copy)
        source.close()
        with copy:
            copy.execute("delete from results")
        copy.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{env.db_path}{suffix}").unlink(missing_ok=True)
        os.replace(backup, env.db_path)
        env.drop("three.yaml", "id: three\nprompt: Describe.\ninputs: ../../media/c.png\n")
        wait_for(lambda: (env.jobs / "done" / "three.yaml").exists(), timeout=60)
    finally:
        stop(proc)
    assert rows(env, "select count(*) from results where job_id = 'three'") == [(1,)]
    text = log.read_text()
    events = [line for line in text.splitlines() if "event=database.reopened" in line]
    assert len(events) == 2, text[-3000:]
    assert "created=True" in events[0] and "deleted" in events[0]
    assert "created=False" in events[1] and "replaced" in events[1]
    assert "Traceback" not in text


def test_a_spool_share_that_goes_away_is_waited_for(env: SpoolEnv, tmp_path: Path) -> None:
    env.image("a.png", 1)
    log = env.root / "watch.log"
    proc = env.spawn("watch", log=log)
    away = tmp_path / "share-contents"
    try:
        wait_for(lambda: "model.loaded" in log.read_text(), timeout=60)
        env.jobs.rename(away)  # unmounted: the mount point stays, empty
        env.jobs.mkdir()
        wait_for(lambda: "the spool folder is gone" in log.read_text(), timeout=30)
        time.sleep(1.0)
        assert list(env.jobs.iterdir()) == []  # nothing made on the empty mount point
        env.jobs.rmdir()
        away.rename(env.jobs)  # mounted again
        env.drop("back.yaml", "id: back\nprompt: Describe.\ninputs: ../../media/a.png\n")
        wait_for(lambda: (env.jobs / "done" / "back.yaml").exists(), timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert "Traceback" not in log.read_text()
