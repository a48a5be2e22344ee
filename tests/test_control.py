"""Operator control with real worker processes: `vlbatch cancel` (queued, running and standing jobs), `vlbatch
pause`/`resume` of a running `watch`, and job priority (the inbox order, and a long low job pre-empted between
units by a high one that arrives after it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import threading
import time

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv, wait_for

from batch.cli import main
from batch.infer.batching import DecodeBatch
from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.jobfile import JobRejected, parse_job
from batch.service.spool.spool import Spool, read_priority
from batch.service.spool.states import JobState
from batch.service.store.store import Store
from batch.service.worker.control import CANCEL_POLL_SECONDS, JobCancelled, PreEmpted
from batch.service.worker.worker import Worker

BEAT = 0.5


@pytest.fixture
def env(tmp_path, tiny_onnx) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    # one answer at a time: these tests need a job that outlasts an operator's request on its way to the worker,
    # and batches of the tiny model end the job first (the tests of a batch in flight set their own)
    e.write_config(lease=2.0, settle=0.2, rescan=1.0, heartbeat_seconds=BEAT, model={"batch": 1})
    e.inbox.mkdir(parents=True)
    return e


def vlbatch(env: SpoolEnv, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--config", str(env.config_path), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def long_job(env: SpoolEnv, job_id: str = "long", n: int = 20, priority: int | None = None) -> str:
    for i in range(n):
        env.image(f"{job_id}/{i:02d}.png", seed=100 + i, size=(900, 600))
    key = "" if priority is None else f"priority: {priority}\n"
    return f"id: {job_id}\nprompt: Describe.\ninputs: ../../media/{job_id}/\nmax_new_tokens: 48\n{key}"


def links(env: SpoolEnv, job_id: str) -> int:
    try:
        return env.db().execute("select count(*) from job_results where job_id = ?", [job_id]).fetchone()[0]
    except sqlite3.OperationalError:  # the worker has not created the tables yet
        return 0


def stop(proc) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return proc.returncode


def worker_id(proc) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def worker_state(env: SpoolEnv, proc) -> str | None:
    try:
        row = env.db().execute("select state from workers where id = ?", [worker_id(proc)]).fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


# priority ---------------------------------------------------------------------------------------
def test_priority_is_an_integer_within_limits_and_named_when_wrong(tmp_path):
    def parse(text: str):
        path = tmp_path / "job.yaml"
        path.write_text(f"prompt: Hi.\n{text}")
        return parse_job(path, allowed_roots=[], generation=GenerationSettings(), media=MediaSettings())

    assert parse("").priority == 0 and parse("priority: -1000\n").priority == -1000
    assert parse("priority: 7  # before the backfill\n").priority == 7
    for bad, shown in [("1001", "1001"), ('"9"', "text ('9')"), ("true", "true/false"), ("2.5", "a number")]:
        with pytest.raises(JobRejected) as caught:
            parse(f"priority: {bad}\n")
        reason = caught.value.reason
        assert "'priority' must be an integer from -1000 to 1000" in reason and shown in reason


def test_the_inbox_is_taken_highest_priority_first_then_oldest(tmp_path):
    spool = Spool(tmp_path / "jobs", settle_seconds=0.0).ensure()
    old = time.time() - 600
    for name, priority, age in [("a", None, 50), ("b", "5", 10), ("c", "-3", 60), ("d", "5", 20), ("e", '"hi"', 70)]:
        path = spool.inbox / f"{name}.yaml"
        path.write_text("prompt: Hi.\n" + ("" if priority is None else f"priority: {priority}\n"))
        os.utime(path, (old - age, old - age))
    ready, _ = spool.pending()
    # 5 (older first), then 0 (e's priority is not a number: sorted as 0, rejected when taken), then -3
    assert [p.stem for p in ready] == ["d", "b", "e", "a", "c"]

    # a changed file is read again (its signature changed); one nested in a value is not a priority
    (spool.inbox / "c.yaml").write_text("prompt: Hi.\npriority: 9\n")
    os.utime(spool.inbox / "c.yaml", (old, old))
    (spool.inbox / "a.yaml").write_text("prompt: |\n  priority: 50\n")
    os.utime(spool.inbox / "a.yaml", (old - 50, old - 50))
    assert [p.stem for p in spool.pending()[0]] == ["c", "d", "b", "e", "a"]
    assert read_priority(spool.inbox / "missing.yaml") == 0


def test_submit_priority_writes_the_key(env, tmp_path):
    env.image("a.png")
    job = tmp_path / "photo.yaml"
    job.write_text(f"prompt: Describe.\ninputs: {env.media / 'a.png'}\npriority: 1\n")
    code, _, err = vlbatch(env, "submit", "--priority", "40", str(job))
    assert code == 0, err
    assert read_priority(env.inbox / "photo.yaml") == 40
    code, _, err = vlbatch(env, "submit", "--priority", "4000", str(job))
    assert code == 2 and "--priority" in err


def test_run_takes_a_later_high_job_first_and_standing_jobs_by_priority(env):
    env.image("a.png", 1)
    env.image("b.png", 2)
    old = time.time() - 300
    env.drop("low.yaml", "prompt: Low.\ninputs: ../../media/a.png\n", when=old)
    env.drop("high.yaml", "prompt: High.\ninputs: ../../media/b.png\npriority: 3\n", when=old + 60)
    standing = env.jobs / "standing"
    standing.mkdir(parents=True)
    (standing / "a-first-by-name.yaml").write_text(f"prompt: One.\ninputs: {env.media / 'a.png'}\n")
    (standing / "z-urgent.yaml").write_text(f"prompt: Two.\ninputs: {env.media / 'b.png'}\npriority: 2\n")
    worker = Worker.from_config(env.config())
    try:
        outcomes = worker.drain()
    finally:
        worker.close()
    assert [o.job_id for o in outcomes] == ["high", "low", "z-urgent", "a-first-by-name"]
    assert all(o.state == "done" for o in outcomes)
    rows = env.db().execute("select id, priority from runs order by id").fetchall()
    assert rows == [(1, 3), (2, 0), (3, 2), (4, 0)]


# cancel -----------------------------------------------------------------------------------------
def test_cancel_a_queued_job_and_what_cannot_be_cancelled(env):
    env.drop("renamed.yaml", "id: holiday\nprompt: Describe.\n")
    env.drop("other.yaml", "prompt: Describe.\n")
    code, out, err = vlbatch(env, "cancel", "holiday", "--json")
    assert code == 0, err
    (done,) = json.loads(out)
    cancelled = env.jobs / "cancelled" / "renamed.yaml"
    assert done["action"] == "cancelled" and done["files"] == [str(cancelled)]
    assert cancelled.exists() and not (env.inbox / "renamed.yaml").exists()
    reason = (env.jobs / "cancelled" / "renamed.yaml.reason.txt").read_text()
    assert reason.startswith("cancelled by ") and "@" in reason
    job = env.job("holiday")
    assert job["state"] == "cancelled" and job["cancelled_by"] == reason.split()[2]
    run = env.db().execute("select state, source, cancel_requested_utc from runs where job_id = 'holiday'").fetchone()
    assert run[0] == "cancelled" and run[1] == "renamed.yaml" and run[2]

    # by its file's name, as the inbox lists it
    code, out, _ = vlbatch(env, "cancel", "other.yaml")
    assert code == 0 and out.startswith("cancelled other.yaml: ")
    assert env.job("other")["state"] == "cancelled"

    code, _, err = vlbatch(env, "cancel", "holiday", "nosuch")
    assert code == 1
    assert "holiday: already finished (cancelled at " in err
    assert "nosuch: no such job in the inbox" in err
    env.drop("named.yaml", "id: elsewise\nprompt: Describe.\n")  # its id is not its name: the file is pointed at
    code, _, err = vlbatch(env, "cancel", "named")
    assert code == 1 and "named.yaml is there under another id: `vlbatch cancel named.yaml` names the file" in err
    assert (env.inbox / "named.yaml").exists()
    status = json.loads(vlbatch(env, "status", "--json")[1])
    assert status["jobs"]["cancelled"] == 2 and status["spool"]["cancelled"] == 2


def test_cancel_a_running_job_drops_the_rest_and_the_worker_goes_on(env):
    env.drop("long.yaml", long_job(env), when=time.time() - 5)
    log = env.root / "watch.log"
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: links(env, "long") >= 2, timeout=120)
        code, out, err = vlbatch(env, "cancel", "long")
        assert code == 0, err
        assert out.startswith(f"requested long: asked worker {worker_id(proc)} to cancel long")
        wait_for(lambda: (env.jobs / "cancelled" / "long.yaml").exists(), timeout=60)
        env.image("next.png", 7)
        env.drop("next.yaml", "prompt: Next.\ninputs: ../../media/next.png\n")
        wait_for(lambda: (env.jobs / "done" / "next.yaml").exists(), timeout=60)
    finally:
        assert stop(proc) == 0
    job = env.job("long")
    assert job["state"] == "cancelled" and job["cancelled_by"] and job["cancel_requested_utc"]
    assert job["error"].startswith(f"cancelled by {job['cancelled_by']} at ") and job["inflight"] is None
    assert 2 <= job["answered"] < 20
    # the answers recorded before the cancel stay, one per link; nothing of the dropped unit was recorded
    results = env.db().execute("select count(*) from results where job_id = 'long'").fetchone()[0]
    assert results == links(env, "long") == job["answered"]
    run = env.db().execute("select state, cancelled_by from runs where id = ?", [job["run_id"]]).fetchone()
    assert run == ("cancelled", job["cancelled_by"])
    assert (env.jobs / "cancelled" / "long.yaml.reason.txt").read_text().strip() == job["error"]
    assert "event=job.cancelled" in log.read_text()

    code, _, err = vlbatch(env, "cancel", "long")
    assert code == 1 and "long: already finished (cancelled at" in err


def test_cancel_a_standing_pass_keeps_the_standing_job(env):
    standing = env.jobs / "standing"
    standing.mkdir(parents=True)
    text = long_job(env, "nightly").replace("../../media/nightly/", str(env.media / "nightly"))
    (standing / "nightly.yaml").write_text(text)
    proc = env.spawn("run")
    wait_for(lambda: links(env, "nightly") >= 2, timeout=120)
    code, out, err = vlbatch(env, "cancel", "nightly")
    assert code == 0 and "the standing job stays" in out, err
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # a cancelled job is not a failure
    assert "1 jobs: 0 done, 0 failed or rejected (0 with problems not met before), 1 cancelled" in err
    first = env.job("nightly")
    assert first["state"] == "cancelled" and 2 <= first["answered"] < 20
    assert (standing / "nightly.yaml").exists()

    # the next pass answers only what the cancelled one left
    again = env.spawn("run")
    assert again.wait(timeout=300) == 0
    second = env.job("nightly")
    assert second["state"] == "done" and second["run_id"] != first["run_id"]
    assert second["answered"] + first["answered"] == 20 and second["cancel_requested_utc"] is None


def test_a_cancel_is_seen_within_a_long_answer_at_most_every_half_second(env):
    """The hook called with each piece of generated text: a unit that generates for minutes is dropped at once."""
    worker = Worker.from_config(env.config())
    try:
        worker.store.start_job("long", {"claim": "c--long.yaml", "source": "long.yaml"}, worker.name)
        worker._job_id = "long"
        worker._check_abort("a")  # nothing asked yet
        operator = Store(env.db_path)
        assert operator.request_cancel("long", "op@host")["cancelled_by"] == "op@host"
        operator.close()
        worker._check_abort("b")  # looked at less than CANCEL_POLL_SECONDS ago: not looked at again yet
        time.sleep(CANCEL_POLL_SECONDS)
        with pytest.raises(JobCancelled, match="cancelled by op@host at "):
            worker._check_abort("c")
    finally:
        worker.close()


# pause and resume ---------------------------------------------------------------------------------
def test_a_pause_holds_the_answers_in_flight_between_two_decode_steps(env, monkeypatch):
    env.write_config(lease=2.0, settle=0.2, rescan=1.0, heartbeat_seconds=BEAT, model={"batch": 4})
    env.drop("long.yaml", long_job(env, n=8))
    worker = Worker.from_config(env.config())
    steps: list[bool] = []
    step = DecodeBatch.step

    def paused_after_the_third(batch):
        steps.append(worker.control.paused)
        if len(steps) == 3:  # `vlbatch pause`, then a stop signal while the worker holds
            worker.control.on_request("pause")
            threading.Timer(0.5, lambda: setattr(worker, "stop_requested", True)).start()
        return step(batch)

    monkeypatch.setattr(DecodeBatch, "step", paused_after_the_third)
    try:
        (outcome,) = worker.drain()
    finally:
        worker.close()
    assert outcome.state == "handed_back" and len(steps) == 3  # held after its step: no step taken while paused
    assert links(env, "long") == 0 and (env.inbox / "long.yaml").exists()  # the answers in flight were dropped
    assert env.job("long")["inflight"] is None  # a live worker: no unit in flight is blamed


def test_pause_holds_a_running_watch_with_its_model_and_claim_then_resume_finishes(env):
    env.drop("long.yaml", long_job(env, n=12), when=time.time() - 5)
    log = env.root / "watch.log"
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: links(env, "long") >= 1, timeout=120)
        code, out, err = vlbatch(env, "pause", "--wait", "--timeout", "60")
        assert code == 0, err
        assert f"asked {worker_id(proc)} (watch, " in out and f"paused: {worker_id(proc)}" in out
        held = links(env, "long")
        time.sleep(3 * BEAT + 2.0)  # longer than the lease (2 s): it is renewed all along
        assert links(env, "long") == held < 12
        assert worker_state(env, proc) == "paused"
        spool = Spool(env.jobs, lease_seconds=2.0)
        (claim,) = spool.claims()
        # held: a renewal a moment late on a loaded machine is caught up within one lease, a stopped one never
        wait_for(lambda: spool.is_held(claim.path.name), timeout=2.0 * 3)
        report = json.loads(vlbatch(env, "status", "--json")[1])
        assert report["workers"][0]["state"] == "paused" and report["jobs"] == {"paused": 1}
        (job,) = report["running"]  # the job is held, not running: no ETA
        assert job["state"] == "paused" and job["eta_s"] is None
        assert "paused long (run" in vlbatch(env, "status")[1]

        code, out, err = vlbatch(env, "resume", worker_id(proc))
        assert code == 0 and f"asked {worker_id(proc)} (watch, paused, on long) to resume" in out, err
        wait_for(lambda: (env.jobs / "done" / "long.yaml").exists(), timeout=120)
        wait_for(lambda: worker_state(env, proc) == "idle", timeout=10)
    finally:
        assert stop(proc) == 0
    text = log.read_text()
    assert text.count("event=model.loaded") == 1
    assert "event=worker.paused" in text and "event=worker.resumed" in text
    job = env.job("long")
    assert (job["state"], job["attempts"], job["answered"]) == ("done", 1, 12)


def test_a_stop_signal_while_paused_hands_the_job_back(env):
    env.drop("long.yaml", long_job(env, n=12), when=time.time() - 5)
    proc = env.spawn("watch")
    try:
        wait_for(lambda: links(env, "long") >= 1, timeout=120)
        code, _, err = vlbatch(env, "pause", "--wait")
        assert code == 0, err
    finally:
        assert stop(proc) == 0  # the first signal: no need for a second one
    assert (env.inbox / "long.yaml").exists() and not Spool(env.jobs).claims()
    job = env.job("long")
    assert job["state"] == "running" and job["attempts"] == 0  # handed back: not counted as an attempt
    code, _, err = vlbatch(env, "pause")
    assert code == 1 and "no live worker" in err
    code, _, err = vlbatch(env, "resume", "nosuch:1")
    assert code == 1 and "nosuch:1: no such worker" in err


# pre-emption --------------------------------------------------------------------------------------
def test_a_high_priority_job_pre_empts_a_long_low_one_which_resumes_without_redoing_answers(env):
    env.drop("long.yaml", long_job(env), when=time.time() - 5)
    log = env.root / "watch.log"
    proc = env.spawn("watch", "--force", log=log)  # --force: no stored answer is reused, the run's own are skipped
    try:
        wait_for(lambda: links(env, "long") >= 2, timeout=120)
        env.image("photo.png", 3)
        env.drop("photo.yaml", "prompt: Caption.\ninputs: ../../media/photo.png\npriority: 10\n")
        wait_for(lambda: (env.jobs / "done" / "long.yaml").exists(), timeout=300)
    finally:
        assert stop(proc) == 0
    photo, long = env.job("photo"), env.job("long")
    assert photo["state"] == "done" and photo["priority"] == 10
    assert photo["finished_utc"] < long["finished_utc"]
    assert (long["state"], long["attempts"], long["answered"], long["priority"]) == ("done", 1, 20, 0)
    # every image answered exactly once across the hand-back
    rows = env.db().execute("select count(*), count(distinct cache_key) from results where job_id = 'long'")
    assert rows.fetchone() == (20, 20)
    assert "event=job.preempted job=long by=photo.yaml priority=10" in log.read_text()


def test_a_pre_emption_finishes_the_answers_in_flight_then_makes_way(env, monkeypatch):
    env.write_config(lease=2.0, settle=0.2, rescan=1.0, heartbeat_seconds=BEAT, model={"batch": 4})
    env.drop("long.yaml", long_job(env, n=8))
    worker = Worker.from_config(env.config())
    looks: list[int] = []

    def urgent_after_three(job):
        looks.append(job.priority)
        if len(looks) == 4:  # three files in flight when a job of priority 10 turns up
            raise PreEmpted(job.id, env.inbox / "urgent.yaml", 10, job.priority)

    handed_back_with: list[int] = []
    hand_back = worker._hand_back

    def counting_hand_back(claim, reason):
        handed_back_with.append(links(env, "long"))
        return hand_back(claim, reason)

    monkeypatch.setattr(worker, "_check_preempt", urgent_after_three)
    monkeypatch.setattr(worker, "_hand_back", counting_hand_back)
    try:
        (outcome,) = worker.drain()  # the job made way, went back to the inbox, and was taken again
    finally:
        worker.close()
    assert handed_back_with == [3]  # the answers in flight were finished and kept before the job made way
    assert outcome.state == "done" and env.job("long")["attempts"] == 1
    rows = env.db().execute("select count(*), count(distinct cache_key) from results where job_id = 'long'")
    assert rows.fetchone() == (8, 8)  # none answered twice


def test_a_finished_claim_committed_cancelled_is_settled_to_cancelled(env):
    """A worker that died between committing a cancel and moving the file: recovery finishes the move."""
    spool = Spool(env.jobs, lease_seconds=0.01).ensure()
    env.drop("gone.yaml", "prompt: Hi.\n")
    claim = spool.claim(env.inbox / "gone.yaml")
    store = Store(env.db_path)
    store.start_job("gone", {"claim": claim.path.name, "source": "gone.yaml"}, "host:1")
    store.finish_job("gone", JobState.CANCELLED, "cancelled by x@y at now (vlbatch cancel)")
    store.close()
    time.sleep(0.05)
    worker = Worker.from_config(env.config())
    worker.spool = spool
    try:
        worker.recover()
    finally:
        worker.close()
    assert (env.jobs / "cancelled" / "gone.yaml").exists()
    assert (env.jobs / "cancelled" / "gone.yaml.reason.txt").read_text().startswith("cancelled by x@y")
    assert not list(env.jobs.glob("work/*gone*"))
