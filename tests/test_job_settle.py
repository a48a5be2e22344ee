"""Job files written slowly into the inbox, against real `vlbatch watch` and `vlbatch run` processes.

The writer here is this test process: it writes a job file in place in two halves through one open descriptor and
pauses between them for longer than settle_seconds, as scp, a network copy or an editor saving in two writes does.
The worker must answer the whole job exactly once and never the half, whether or not the half is valid YAML.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from spool_env import SpoolEnv, wait_for

pytestmark = pytest.mark.slow

# (first half, second half): the first is valid YAML on its own (a text-only question), or not YAML at all
REST = "inputs: ../../media/a.png\ntags: [full]\n"
HALVES = {
    "valid-half": ("id: half\nprompt: Describe the photo.\n", REST),
    "invalid-half": ("id: half\nprompt: 'Describe the photo", " in one line.'\n" + REST),
}
PAUSE = 1.0  # between the halves: more than three times settle_seconds


@pytest.fixture
def env(tmp_path, tiny_onnx) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config(lease=3.0, settle=0.3, rescan=30.0)  # a rescan never comes in time: events and polls must do
    e.inbox.mkdir(parents=True)
    e.image("a.png", 1)
    return e


def folder(env: SpoolEnv, name: str) -> list[str]:
    path = env.jobs / name
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def results(env: SpoolEnv, job_id: str) -> list[dict]:
    try:
        return list(env.db().query("select * from results where job_id = ?", [job_id]))
    except sqlite3.OperationalError:  # no tables yet
        return []


def text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def assert_answered_once_whole(env: SpoolEnv) -> None:
    """The complete job ran once: its one input answered, its tags, no text-only answer, nothing rejected."""
    job = env.job("half")
    assert (job["state"], job["attempts"], job["media_count"], job["tags"]) == ("done", 1, 1, '["full"]')
    rows = results(env, "half")
    assert len(rows) == 1 and rows[0]["media_paths"].endswith('a.png"]') and rows[0]["error"] is None
    assert env.db().execute("select count(*) from runs where job_id = 'half'").fetchone()[0] == 1
    assert folder(env, "done") == ["half.yaml"] and folder(env, "rejected") == [] and folder(env, "inbox") == []


def start_watch(env: SpoolEnv, log: Path) -> subprocess.Popen:
    proc = env.spawn("watch", log=log)
    wait_for(lambda: "event=worker.watching" in text(log) and "event=model.loaded" in text(log), timeout=90)
    return proc


@pytest.mark.parametrize("kind", sorted(HALVES))
def test_watch_answers_a_job_written_in_two_halves_once_and_whole(env, kind):
    first, second = HALVES[kind]
    log = env.root / "watch.log"
    proc = start_watch(env, log)
    try:
        with open(env.inbox / "half.yaml", "w") as fh:
            fh.write(first)
            fh.flush()
            wait_for(lambda: "event=job.waiting file=half.yaml" in text(log), timeout=10)
            time.sleep(PAUSE)
            assert env.job("half") is None and folder(env, "inbox") == ["half.yaml"]  # not touched meanwhile
            fh.write(second)
        wait_for(lambda: folder(env, "done") == ["half.yaml"], timeout=30)
    finally:
        assert stop(proc) == 0, text(log)
    assert_answered_once_whole(env)
    assert text(log).count("event=job.waiting") == 1  # one line for the wait, not one per look


@pytest.mark.parametrize("kind", sorted(HALVES))
def test_run_started_during_the_pause_waits_for_the_writer(env, kind):
    first, second = HALVES[kind]
    log = env.root / "run.log"
    with open(env.inbox / "half.yaml", "w") as fh:
        fh.write(first)
        fh.flush()
        proc = env.spawn("run", log=log)
        try:
            wait_for(lambda: "event=job.waiting file=half.yaml" in text(log), timeout=60)
            time.sleep(PAUSE)
            assert proc.poll() is None, text(log)  # `run` has not given up on the file, nor read it
            assert env.job("half") is None
            fh.write(second)
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(120) == 0, text(log)
    assert_answered_once_whole(env)


def test_run_leaves_a_file_held_open_past_lease_seconds_for_the_next_run(env):
    first, second = HALVES["valid-half"]
    log = env.root / "run.log"
    with open(env.inbox / "half.yaml", "w") as fh:
        fh.write(first)
        fh.flush()
        proc = env.spawn("run", log=log)
        wait_for(lambda: "event=job.waiting file=half.yaml" in text(log), timeout=60)
        waiting = time.monotonic()
        code = proc.wait(60)
        waited = time.monotonic() - waiting
        assert code == 0, text(log)
        assert 2.5 < waited < 10, waited  # lease_seconds (3 s) of waiting, then the next file or the exit
        assert "event=job.still_open file=half.yaml" in text(log)
        assert env.job("half") is None and folder(env, "inbox") == ["half.yaml"]
        fh.write(second)
    later = subprocess.run(env.cli("run"), capture_output=True, text=True, timeout=120)
    assert later.returncode == 0, later.stderr
    assert_answered_once_whole(env)


def test_watch_takes_a_file_promptly_when_its_writer_closes_it_however_long_it_was_held(env):
    """Past lease_seconds nothing polls the file; the writer's close event (IN_CLOSE_WRITE) wakes the loop."""
    first, second = HALVES["valid-half"]
    log = env.root / "watch.log"
    proc = start_watch(env, log)
    try:
        with open(env.inbox / "half.yaml", "w") as fh:
            fh.write(first + second)  # all written, then held open, idle
            fh.flush()
            wait_for(lambda: "event=job.still_open file=half.yaml" in text(log), timeout=15)
            time.sleep(1.0)
            assert env.job("half") is None
        closed = time.time()
        started = wait_for(lambda: (env.job("half") or {}).get("started_utc"), timeout=20)
        from datetime import datetime

        latency = datetime.fromisoformat(started).timestamp() - closed
        print(f"\npick-up {latency * 1e3:.0f} ms after the close (rescan_seconds 30)")
        assert latency < 1.5
        wait_for(lambda: folder(env, "done") == ["half.yaml"], timeout=30)
    finally:
        assert stop(proc) == 0, text(log)
    assert_answered_once_whole(env)


def test_a_rejected_half_whose_rest_lands_later_is_read_again_and_answered_once(env):
    """A writer that closes between the halves: no tool can know the file is incomplete, so the half is rejected.
    The rest then lands in the rejected file (a writer holding it by handle, as over NFS, or a fix made there):
    the changed file goes back to the inbox, its stale reason is removed, and the whole job is answered once."""
    env.write_config(lease=3.0, settle=0.3, rescan=1.0)  # rejected/ is looked through at each rescan
    first, second = HALVES["invalid-half"]
    log = env.root / "watch.log"
    proc = start_watch(env, log)
    try:
        with open(env.inbox / "half.yaml", "w") as fh:
            fh.write(first)
        wait_for(lambda: "half.yaml.reason.txt" in folder(env, "rejected"), timeout=20)
        assert env.job("half")["state"] == "rejected"
        time.sleep(2.5)  # rescans that find it unchanged leave it alone
        assert "half.yaml" in folder(env, "rejected") and "job.reconsidered" not in text(log)
        with open(env.jobs / "rejected" / "half.yaml", "a") as fh:
            fh.write(second)
        wait_for(lambda: folder(env, "done") == ["half.yaml"], timeout=30)
    finally:
        assert stop(proc) == 0, text(log)
    assert text(log).count("event=job.reconsidered file=half.yaml") == 1
    job = env.job("half")
    assert (job["state"], job["attempts"], job["media_count"], job["tags"]) == ("done", 1, 1, '["full"]')
    assert len(results(env, "half")) == 1
    assert folder(env, "rejected") == []  # the stale reason and the record went with it
    assert (env.jobs / "done" / "half.yaml").read_text() == first + second
