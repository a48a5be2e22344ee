"""Faults of the machine meet real worker processes: a full disk under the spool and under the database, a
database locked by another process, and kill -9 of the decoder and of the worker across 50 jobs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import (
    assert_sound,
    decoder_child,
    fault_env,
    fill,
    reason,
    run,
    settled,
    small_filesystem,
    stop,
    wait_for,
)
from spool_env import SpoolEnv

pytestmark = pytest.mark.slow


def spool_on(env: SpoolEnv, folder: Path, **settings: object) -> SpoolEnv:
    """The same installation with its spool folder moved to `folder`."""
    moved = SpoolEnv(env.root, env.model, spool_root=folder)
    moved.write_config(spool_dir=folder, **settings)
    moved.inbox.mkdir(parents=True, exist_ok=True)
    return moved


def logged(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text()


def test_a_full_disk_under_the_spool_is_waited_out(env: SpoolEnv, tmp_path: Path):
    with small_filesystem(tmp_path / "spoolfs", 1024) as fs:
        env = spool_on(env, fs / "jobs")
        env.image("a.png", 1)
        staged = fs / "staged.yaml"  # on the same file system, so it can be renamed in once the disk is full
        staged.write_text(f"prompt: Describe.\ninputs: {env.media / 'a.png'}\n")
        log = env.root / "watch.log"
        proc = env.spawn("watch", log=log)
        try:
            wait_for(lambda: logged(log, "event=model.loaded"), timeout=60)
            filler = fill(fs)
            os.rename(staged, env.inbox / "full.yaml")
            wait_for(lambda: logged(log, "No space left on device"), timeout=20)
            time.sleep(0.5)
            assert proc.poll() is None  # still running, waiting the fault out
            assert settled(env)["inbox"] == ["full.yaml"]  # handed back intact, not stranded in work/
            filler.unlink()
            wait_for(lambda: (env.jobs / "done" / "full.yaml").exists(), timeout=30)
            assert proc.poll() is None
        finally:
            assert stop(proc) == 0
    assert env.job("full")["answered"] == 1 and env.job("full")["attempts"] == 1
    assert "event=worker.fault" in log.read_text()
    assert_sound(env)


def test_a_full_disk_under_the_database_is_waited_out(env: SpoolEnv, tmp_path: Path):
    with small_filesystem(tmp_path / "dbfs", 2048) as fs:
        env = SpoolEnv(env.root, env.model, database=fs / "vlbatch.db")
        env.write_config(database=env.db_path)
        env.image("a.png", 1)
        log = env.root / "watch.log"
        proc = env.spawn("watch", log=log)
        try:
            wait_for(lambda: logged(log, "event=model.loaded"), timeout=60)
            filler = fill(fs)
            env.drop("dbfull.yaml", "prompt: Describe.\ninputs: ../../media/a.png\n")
            wait_for(lambda: logged(log, "database or disk is full"), timeout=30)
            time.sleep(0.5)
            assert proc.poll() is None
            assert not settled(env)["done"] and not settled(env)["failed"]  # waiting, not given up
            filler.unlink()
            wait_for(lambda: (env.jobs / "done" / "dbfull.yaml").exists(), timeout=30)
        finally:
            assert stop(proc) == 0
        assert env.job("dbfull")["answered"] == 1
        assert_sound(env)


def test_run_gives_up_on_a_full_disk_with_exit_code_3(env: SpoolEnv, tmp_path: Path):
    with small_filesystem(tmp_path / "spoolfs", 512) as fs:
        env = spool_on(env, fs / "jobs", give_up_seconds=2)
        env.image("a.png", 1)
        env.drop("stuck.yaml", f"prompt: Describe.\ninputs: {env.media / 'a.png'}\n")
        filler = fill(fs)
        done = run(env, "run")
        assert done.returncode == 3, done.stderr
        assert "gave up after" in done.stderr and "No space left on device" in done.stderr
        assert settled(env)["inbox"] == ["stuck.yaml"] and not settled(env)["work"]
        filler.unlink()
        assert run(env, "run").returncode == 0
        assert settled(env)["done"] == ["stuck.yaml"]
    assert_sound(env)


def test_submit_on_a_full_disk_says_so_and_leaves_nothing(env: SpoolEnv, tmp_path: Path):
    with small_filesystem(tmp_path / "spoolfs", 512) as fs:
        env = spool_on(env, fs / "jobs")
        env.image("a.png", 1)
        job = env.root / "mine.yaml"
        job.write_text("prompt: Describe.\ninputs: media/a.png\n" + "# padding\n" * 400)
        fill(fs)
        done = run(env, "submit", str(job))
        assert done.returncode == 1
        assert "cannot write the job into the inbox" in done.stderr and "No space left" in done.stderr
        assert "Traceback" not in done.stderr
        assert list(env.inbox.iterdir()) == []


def test_a_database_write_lock_held_twice_the_busy_timeout(env: SpoolEnv):
    env.write_config(database_timeout_seconds=1)
    env.image("a.png", 1)
    log = env.root / "watch.log"
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: logged(log, "event=model.loaded"), timeout=60)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time\n"
                "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "db.execute('BEGIN IMMEDIATE')\n"
                "print('locked', flush=True)\n"
                "time.sleep(2.0)\n"  # twice the worker's busy timeout
                "db.execute('COMMIT')\n",
                str(env.db_path),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "locked"
        env.drop("locked.yaml", "prompt: Describe.\ninputs: ../../media/a.png\n")
        wait_for(lambda: logged(log, "database is locked"), timeout=20)
        assert holder.wait(10) == 0
        wait_for(lambda: (env.jobs / "done" / "locked.yaml").exists(), timeout=30)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert env.job("locked")["answered"] == 1 and env.job("locked")["attempts"] == 1
    assert_sound(env)


def test_kill_9_of_the_decoder_and_the_worker_across_50_jobs(env: SpoolEnv):
    env.write_config(lease=2.0, settle=0.1, max_attempts=10)
    names = []
    for i in range(50):
        env.image(f"m/{i:02d}.png", seed=i, size=(96, 96))  # square: one tile
        if i % 10 == 9:  # some jobs with two files
            env.image(f"m/{i:02d}b.png", seed=100 + i, size=(96, 96))
            inputs = f"[../../media/m/{i:02d}.png, ../../media/m/{i:02d}b.png]"
        else:
            inputs = f"../../media/m/{i:02d}.png"
        names.append(f"j{i:02d}.yaml")
        env.drop(names[-1], f"prompt: Describe.\ninputs: {inputs}\nmax_new_tokens: 8\n")
    rng = random.Random(20261125)
    log = env.root / "soak.log"
    proc = env.spawn("watch", log=log, env=fault_env())
    kills = {"worker": 0, "decoder": 0}
    deadline = time.monotonic() + 120

    def finished() -> int:
        final = settled(env)
        return len(final["done"]) + len(final["failed"]) + len(final["rejected"])

    while finished() < 50 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 0.8))
        if proc.poll() is not None:
            proc = env.spawn("watch", log=log, env=fault_env())
            continue
        if sum(kills.values()) >= 10:
            continue
        if kills["worker"] >= 4 or rng.random() < 0.5:  # each worker kill costs a restart and a model load
            try:
                os.kill(decoder_child(proc.pid, timeout=2), signal.SIGKILL)
                kills["decoder"] += 1
            except (AssertionError, ProcessLookupError):
                pass  # no decoder running at this moment
        else:
            proc.kill()
            proc.wait()
            kills["worker"] += 1
            # restart at once: were the last job done meanwhile, the loop would end with the worker we killed
            proc = env.spawn("watch", log=log, env=fault_env())
    try:
        wait_for(lambda: finished() == 50, timeout=max(5.0, deadline - time.monotonic()))
        assert proc.poll() is None
    finally:
        assert stop(proc) in (0, -signal.SIGKILL)
    print(f"\nkills: {kills}; done {len(settled(env)['done'])}, failed {len(settled(env)['failed'])}")
    final = settled(env)
    assert sorted(final["done"] + final["failed"]) == names and not final["inbox"] and not final["work"]
    assert kills["worker"] >= 3 and kills["decoder"] >= 3
    for name in final["failed"]:  # only a kill that hit the same file twice may fail it, and it says so
        why = reason(env, "failed", name)
        assert "decoder crashed (SIGKILL)" in why or "died 2 times" in why, why
    assert_sound(env)
