"""Workers report themselves: real `vlbatch watch` processes beat into the `workers` table, and `vlbatch status`
tells a running job from a stalled one (its worker killed) and from one handed back, and lists idle watchers."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv, wait_for

from batch.cli import main
from batch.service.reports.reports import status_report

pytestmark = pytest.mark.slow
BEAT = 0.5


@pytest.fixture
def env(tmp_path, tiny_onnx) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config(lease=4.0, settle=0.2, rescan=1.0, heartbeat_seconds=BEAT)
    e.inbox.mkdir(parents=True)
    return e


def long_job(env: SpoolEnv, n: int = 24) -> None:
    for i in range(n):
        env.image(f"batch/{i:02d}.png", seed=100 + i, size=(900, 600))
    env.drop("long.yaml", "id: long\nprompt: Describe.\ninputs: ../../media/batch/\nmax_new_tokens: 48\n")


def answers(env: SpoolEnv) -> int:
    try:
        return env.db().execute("select count(*) from job_results where job_id = 'long'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def status(env: SpoolEnv) -> str:
    result = CliRunner().invoke(main, ["--config", str(env.config_path), "status"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def status_json(env: SpoolEnv) -> dict:
    args = ["--config", str(env.config_path), "status", "--json"]
    return json.loads(CliRunner().invoke(main, args, catch_exceptions=False).stdout)


def last_beat(env: SpoolEnv, worker: str) -> datetime:
    row = env.db().execute("select heartbeat_utc from workers where id = ?", [worker]).fetchone()
    return datetime.fromisoformat(row[0])


def test_a_killed_worker_shows_its_job_stalled_then_running_again_once_recovered(env):
    long_job(env)
    first = env.spawn("watch")
    name = f"{socket.gethostname()}:{first.pid}"
    try:
        wait_for(lambda: answers(env) >= 2, timeout=120)
        (running,) = status_json(env)["running"]
        assert (running["state"], running["worker"]) == ("running", name)
        assert running["eta_s"] is not None

        def on_a_file() -> dict | None:  # the file name comes with the next beat after its unit started
            shown = {w["worker"]: w for w in status_json(env)["workers"]}.get(name)
            return shown if shown and shown["file"] else None

        args = ["--config", str(env.config_path), "status", "--job", "long", "--json"]
        (run,) = json.loads(CliRunner().invoke(main, args, catch_exceptions=False).stdout)
        assert run["state"] == "running" and run["answered"] >= 2  # what its links hold so far
        shown = wait_for(on_a_file, timeout=5 * BEAT)
        assert shown["state"] == "busy" and shown["job"] == "long" and shown["file"].endswith(".png")
    finally:
        first.kill()  # SIGKILL: no last beat, no hand-back
        first.wait()
    killed_at = datetime.now(timezone.utc)
    # within two heartbeat intervals of the kill (the last beat came before it), the job is stalled, with no ETA
    report = status_report(env.config(), now=killed_at + timedelta(seconds=2 * BEAT + 0.05))
    (stalled,) = report["running"]
    assert stalled["state"] == "stalled" and stalled["eta_s"] is None
    assert datetime.fromisoformat(stalled["worker_gone_utc"]) == last_beat(env, name)
    assert stalled["lease_expires_utc"] and name not in [w["worker"] for w in report["workers"]]
    assert report["jobs"] == {"stalled": 1}
    time.sleep(2 * BEAT + 0.1)
    text = status(env)
    assert "stalled (worker gone since" in text and "ETA" not in text and f"worker {name}" not in text

    second = env.spawn("watch")
    other = f"{socket.gethostname()}:{second.pid}"
    try:
        # the next worker takes the job back (its holder is gone from this host) and carries the run on
        def running_on_second() -> bool:
            runs = status_json(env)["running"]
            return bool(runs) and runs[0]["worker"] == other and runs[0]["state"] == "running"

        wait_for(running_on_second, timeout=60, interval=0.1)
        assert "running long (run" in status(env)
        wait_for(lambda: (env.jobs / "done" / "long.yaml").exists(), timeout=180)
        # done, and the watcher is still there: listed as idle
        wait_for(lambda: {w["worker"]: w["state"] for w in status_json(env)["workers"]}.get(other) == "idle")
        text = status(env)
        assert f"worker {other} (watch): idle" in text and "stalled" not in text
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=60)
    assert env.job("long")["attempts"] == 2
    row = env.db().execute("select state, stopped_utc from workers where id = ?", [other]).fetchone()
    assert row[0] == "stopped" and row[1]  # a clean stop says so: status no longer lists it
    assert other not in [w["worker"] for w in status_json(env)["workers"]]


def test_a_job_handed_back_by_a_second_signal_is_not_shown_running(env):
    long_job(env)
    proc = env.spawn("watch")
    try:
        wait_for(lambda: answers(env) >= 1, timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # the second one hands the job back at once
        _, err = proc.communicate(timeout=60)
    assert "job.handed_back" in err and (env.inbox / "long.yaml").exists()
    (job,) = status_json(env)["running"]
    assert job["state"] == "waiting" and job["eta_s"] is None
    assert status_json(env)["jobs"] == {"waiting": 1}  # not counted as running
    text = status(env)
    assert "waiting long (run 1): back in the inbox" in text and "running long" not in text and "ETA" not in text
    assert status_json(env)["workers"] == []  # the worker said it stopped


def test_a_watcher_waiting_for_a_slot_is_listed_and_a_stop_there_loads_no_model(env, tmp_path):
    first = env.spawn("watch")  # spool.max_workers is 1: the second waits for the first one's slot
    wait_for(lambda: env.db_path.exists() and [w["state"] for w in status_json(env)["workers"]] == ["idle"])
    log = tmp_path / "second.log"
    second = env.spawn("watch", log=log)
    name = f"{socket.gethostname()}:{second.pid}"
    try:
        wait_for(lambda: {w["worker"]: w["state"] for w in status_json(env)["workers"]}.get(name) == "waiting")
        assert f"worker {name} (watch): waiting" in status(env)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert second.returncode == 0 and first.returncode == 0
    assert "model.loaded" not in log.read_text()  # stopped while waiting: nothing was loaded for nothing
    assert status_json(env)["workers"] == []


def test_an_idle_watcher_is_listed_and_a_locked_database_never_stops_its_beat(env):
    proc = env.spawn("watch")
    name = f"{socket.gethostname()}:{proc.pid}"
    try:
        wait_for(lambda: env.db_path.exists() and name in [w["worker"] for w in status_json(env)["workers"]])
        (worker,) = status_json(env)["workers"]
        assert (worker["state"], worker["command"], worker["job"]) == ("idle", "watch", None)
        assert f"worker {name} (watch): idle" in status(env)
        # hold the write lock for longer than the worker's busy timeout: beats are skipped, then carry on
        lock = sqlite3.connect(env.db_path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        time.sleep(4 * BEAT)
        lock.execute("COMMIT")
        lock.close()
        before = last_beat(env, name)
        wait_for(lambda: last_beat(env, name) > before, timeout=10)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
