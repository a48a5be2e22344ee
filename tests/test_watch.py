"""Real worker processes on a temporary spool: watchdog pick-up, half-written files, kill -9, SIGTERM, two workers."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time

import pytest
from spool_env import SpoolEnv, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path, tiny_onnx) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config(lease=3.0, settle=0.3, rescan=2.0)
    (tmp_path / "jobs" / "inbox").mkdir(parents=True)
    return e


def results_count(env: SpoolEnv, job_id: str) -> int:
    try:
        return env.db().execute("select count(*) from results where job_id = ?", [job_id]).fetchone()[0]
    except sqlite3.OperationalError:  # the worker has not created the tables yet
        return 0


def stop(proc) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def many_images_job(env: SpoolEnv, n: int = 12) -> str:
    for i in range(n):
        env.image(f"batch/{i:02d}.png", seed=100 + i, size=(900, 600))
    return "id: long\nprompt: Describe.\ninputs: ../../media/batch/\nmax_new_tokens: 48\n"


def test_dropped_job_runs_within_a_second_and_half_written_files_once(env):
    env.image("a.png", 1)
    proc = env.spawn("watch")
    try:
        env.drop("warmup.yaml", "prompt: Hi.\ninputs: ../../media/a.png\n")
        wait_for(lambda: (env.root / "jobs" / "done" / "warmup.yaml").exists(), timeout=90)  # model loaded
        time.sleep(0.5)
        dropped = time.time()
        env.drop("quick.yaml", "prompt: Describe.\ninputs: ../../media/a.png\n")
        started = wait_for(lambda: (env.job("quick") or {}).get("started_utc"), timeout=20)
        from datetime import datetime

        latency = datetime.fromisoformat(started).timestamp() - dropped
        print(f"\npick-up latency {latency * 1e3:.0f} ms (settle 300 ms)")
        assert latency < 1.0
        wait_for(lambda: (env.root / "jobs" / "done" / "quick.yaml").exists())

        # written slowly, in pieces, straight into the inbox
        with open(env.inbox / "slow.yaml", "w") as fh:
            for piece in [
                "prompt: Describe",
                " the photo.\n",
                "inputs:\n",
                "  - ../../media/a.png\n",
                "tags: [slow]\n",
            ]:
                fh.write(piece)
                fh.flush()
                time.sleep(0.15)
        wait_for(lambda: (env.root / "jobs" / "done" / "slow.yaml").exists())
        time.sleep(0.5)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    job = env.job("slow")
    assert (job["state"], job["attempts"], job["tags"]) == ("done", 1, '["slow"]')
    assert results_count(env, "slow") == 1
    assert not list((env.root / "jobs" / "rejected").iterdir())


def test_kill_9_during_generation_then_restart_completes_exactly_once(env):
    job = many_images_job(env)
    env.drop("long.yaml", job, when=time.time() - 5)
    first = env.spawn("watch")
    wait_for(lambda: results_count(env, "long") >= 2, timeout=90)
    first.kill()  # SIGKILL: no clean-up at all
    first.wait()
    assert list((env.root / "jobs" / "work").glob("*long.yaml"))
    assert results_count(env, "long") < 12

    second = env.spawn("watch")
    try:
        wait_for(lambda: (env.root / "jobs" / "done" / "long.yaml").exists(), timeout=120)
    finally:
        code, err = stop(second)
    assert code == 0, err
    row = env.job("long")
    assert (row["state"], row["attempts"], row["answered"]) == ("done", 2, 12)
    assert results_count(env, "long") == 12  # every image answered once, across both attempts
    keys = env.db().execute("select count(distinct cache_key) from results where job_id = 'long'").fetchone()[0]
    assert keys == 12


def test_sigterm_during_a_job_finishes_it_and_exits_cleanly(env):
    job = many_images_job(env)
    env.drop("long.yaml", job, when=time.time() - 5)
    env.drop("next.yaml", "prompt: Later.\ninputs: ../../media/batch/00.png\n", when=time.time() - 1)
    proc = env.spawn("watch")
    wait_for(lambda: results_count(env, "long") >= 1, timeout=90)
    code, err = stop(proc)
    assert code == 0, err
    assert "worker.stopped" in err
    row = env.job("long")
    assert (row["state"], row["attempts"], row["answered"]) == ("done", 1, 12)
    assert (env.root / "jobs" / "done" / "long.yaml").exists()
    assert (env.inbox / "next.yaml").exists()  # not started: still waiting, nothing lost


def test_two_run_processes_share_twenty_jobs_each_done_once(env):
    env.write_config(lease=3.0, settle=0.3, rescan=2.0, max_workers=2)
    for i in range(20):
        env.image(f"m/{i:02d}.png", seed=i, size=(64, 64))
        env.drop(f"job{i:02d}.yaml", f"prompt: Caption.\ninputs: ../../media/m/{i:02d}.png\n", when=time.time() - 5)
    workers = [env.spawn("run"), env.spawn("run")]
    outputs = [p.communicate(timeout=300) for p in workers]
    assert [p.returncode for p in workers] == [0, 0], outputs
    done = sorted(p.name for p in (env.root / "jobs" / "done").iterdir())
    assert done == [f"job{i:02d}.yaml" for i in range(20)]
    db = env.db()
    assert db.execute("select count(*), sum(attempts) from jobs where state = 'done'").fetchone() == (20, 20)
    assert db.execute("select count(*), count(distinct job_id) from results").fetchone() == (20, 20)
    ran = [err.count("event=job.started") for _, err in outputs]
    print(f"\njobs per worker: {ran}")
    assert sum(ran) == 20


def test_an_overlapping_cron_run_leaves_at_once_and_a_second_watch_waits_for_the_slot(env):
    env.image("a.png", 1)
    first = env.spawn("watch", log=env.root / "first.log")
    try:
        wait_for(lambda: "event=model.loaded" in (env.root / "first.log").read_text(), timeout=60)
        started = time.monotonic()
        late = subprocess.run(env.cli("run"), capture_output=True, text=True, timeout=60)
        assert late.returncode == 0 and time.monotonic() - started < 10
        assert "event=worker.no_slot" in late.stderr and "model.loaded" not in late.stderr  # no second model
        second = env.spawn("watch", log=env.root / "second.log")
        wait_for(lambda: "event=worker.no_slot" in (env.root / "second.log").read_text(), timeout=30)
        assert stop(first)[0] == 0
        wait_for(lambda: "event=model.loaded" in (env.root / "second.log").read_text(), timeout=60)
        env.drop("after.yaml", "prompt: Describe.\ninputs: ../../media/a.png\n")
        wait_for(lambda: (env.root / "jobs" / "done" / "after.yaml").exists(), timeout=30)
        assert "job=after" in (env.root / "second.log").read_text()
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
