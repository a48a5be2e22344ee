"""The spool worker in-process: jobs to results, bad input, incremental runs, leases, recovery, sidecars."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv

from batch.cli import main
from batch.service.spool.spool import Spool
from batch.service.store.store import Store
from batch.service.worker.worker import Worker


@pytest.fixture
def env(tmp_path, tiny_onnx) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config()
    return e


def worker(env: SpoolEnv, **kwargs) -> Worker:
    return Worker.from_config(env.config(), **kwargs)


def drain(env: SpoolEnv, **kwargs):
    w = worker(env, **kwargs)
    try:
        return {o.job_id: o for o in w.drain()}
    finally:
        w.close()


def results_of(env: SpoolEnv, job_id: str) -> list[dict]:
    """The answers of the job's latest run."""
    return list(
        env.db().query(
            "select r.* from results r join job_results jr on jr.result_id = r.id "
            "where jr.run_id = (select run_id from jobs where id = ?) order by r.id",
            [job_id],
        )
    )


def test_a_job_becomes_result_rows_and_moves_to_done(env):
    env.image("a.jpg", 1)
    env.image("b.png", 2)
    env.drop("pair.yaml", "prompt: Describe it.\ninputs: ../../media/\ntags: [t1]\n")
    outcomes = drain(env)
    assert outcomes["pair"].state == "done"
    assert (env.root / "jobs" / "done" / "pair.yaml").exists() and not list(env.inbox.iterdir())
    rows = results_of(env, "pair")
    assert [Path(json.loads(r["media_paths"])[0]).name for r in rows] == ["a.jpg", "b.png"]
    for row in rows:
        assert row["answer"] and row["error"] is None and row["output_tokens"] > 0
        assert row["vit_ms"] > 0 and row["prefill_ms"] > 0 and row["ttft_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["backend"] == "onnxruntime" and row["model_id"].startswith(env.model.name)
    job = env.job("pair")
    assert (job["state"], job["attempts"], job["answered"], job["media_count"]) == ("done", 1, 2, 2)


def test_each_bad_input_is_recorded_and_the_good_job_beside_it_still_runs(env, tmp_path):
    good = env.image("good.png", 1)
    for i in range(5):
        env.image(f"many/{i}.png", 10 + i)
    (env.media / "empty").mkdir()
    (env.media / "notes.txt").write_text("not an image")
    (env.media / "broken.jpg").write_bytes(good.read_bytes()[:200])  # a PNG header cut short, named .jpg
    outside = tmp_path / "outside.png"
    outside.write_bytes(good.read_bytes())
    (env.media / "escape.png").symlink_to(outside)
    (tmp_path / "real-job.yaml").write_text(f"prompt: hi\ninputs: {good}\n")
    env.inbox.mkdir(parents=True)
    os.symlink(tmp_path / "real-job.yaml", env.inbox / "linked.yaml")
    m = "../../media"
    bad = {
        "malformed": ("prompt: [unclosed\n", "rejected", "YAML"),
        "not-mapping": ("- just\n- a list\n", "rejected", "mapping"),
        "python-tag": ("prompt: !!python/object/apply:os.system ['true']\ninputs: x.png\n", "rejected", "python"),
        "no-prompt": (f"inputs: {m}/good.png\n", "rejected", "prompt"),
        "wrong-type": (f"prompt: hi\ninputs: {m}/good.png\nmax_new_tokens: ten\n", "rejected", "max_new_tokens"),
        "unknown-key": (f"promt: hi\nprompt: hi\ninputs: {m}/good.png\n", "rejected", "did you mean 'prompt'"),
        "empty-folder": (f"prompt: hi\ninputs: {m}/empty/\n", "rejected", "holds no images or videos"),
        "missing-media": (f"prompt: hi\ninputs: {m}/gone.jpg\n", "rejected", "not found"),
        "unsupported": (f"prompt: hi\ninputs: {m}/notes.txt\n", "rejected", "notes.txt"),
        "too-many": (f"prompt: hi\ninputs: {m}/many/\nmode: together\n", "rejected", "4"),
        "outside-roots": (f"prompt: hi\ninputs: {outside}\n", "rejected", "outside the allowed media folders"),
        "dotdot": ("prompt: hi\ninputs: ../../../outside.png\n", "rejected", "outside the allowed media folders"),
        "symlink-escape": (f"prompt: hi\ninputs: {m}/escape.png\n", "rejected", "outside the allowed media folders"),
        "oversized": ("prompt: hi\n" + "#" * 300_000 + "\n", "rejected", "bytes"),
        "corrupt-media": (f"prompt: hi\ninputs: [{m}/broken.jpg, {m}/good.png]\n", "failed", "broken.jpg"),
        "too-long": (f"prompt: hi\ninputs: {m}/../clip.mp4\nvideo_frames: 40\n", "failed", "prompt is"),
    }
    import numpy as np
    from synthetic import write_video

    write_video(env.root / "media" / "clip.mp4", (np.full((48, 64, 3), i * 5, np.uint8) for i in range(45)))
    bad["too-long"] = (f"prompt: hi\ninputs: {m}/clip.mp4\nvideo_frames: 40\n", "failed", "prompt is")
    for name, (text, _, _) in bad.items():
        env.drop(f"{name}.yaml", text)
    env.drop("good.yaml", f"prompt: Describe.\ninputs: {m}/good.png\n")
    outcomes = drain(env)

    assert outcomes["good"].state == "done"
    assert outcomes["linked"].state == "rejected" and "symlink" in outcomes["linked"].reason
    for name, (_, state, reason) in bad.items():
        outcome = outcomes[name]
        assert outcome.state == state, (name, outcome)
        assert reason in outcome.reason, (name, outcome.reason)
        folder = env.root / "jobs" / state
        assert (folder / f"{name}.yaml").exists(), name  # nothing lost
        assert reason in (folder / f"{name}.yaml.reason.txt").read_text(), name
        assert reason in env.job(name)["error"], name
    corrupt = results_of(env, "corrupt-media")
    assert [r["error"] is None for r in corrupt] == [False, True]  # the good file was still answered


def test_run_twice_over_a_growing_folder_only_answers_new_files(env):
    for i in range(3):
        env.image(f"album/{i}.png", i)
    job = "id: album\nprompt: Caption.\ninputs: ../../media/album/\n"
    runner = CliRunner()
    env.drop("album.yaml", job)
    first = runner.invoke(main, ["--config", str(env.config_path), "run"], catch_exceptions=False)
    assert first.exit_code == 0, first.stderr
    ids_first = {r["id"] for r in results_of(env, "album")}
    for i in range(3, 5):
        env.image(f"album/{i}.png", i)
    env.drop("album.yaml", job)
    second = runner.invoke(main, ["--config", str(env.config_path), "run"], catch_exceptions=False)
    assert second.exit_code == 0, second.stderr
    rows = results_of(env, "album")
    assert len(rows) == 5 and ids_first < {r["id"] for r in rows}
    assert env.db()["results"].count == 5  # the three old answers were linked, not generated again
    job_row = env.job("album")
    assert (job_row["answered"], job_row["reused"]) == (2, 3)

    env.drop("album.yaml", job)
    forced = runner.invoke(main, ["--config", str(env.config_path), "run", "--force"], catch_exceptions=False)
    assert forced.exit_code == 0 and env.db()["results"].count == 10


def test_run_exit_code_is_nonzero_when_a_job_fails(env):
    env.drop("bad.yaml", "prompt: [\n")
    result = CliRunner().invoke(main, ["--config", str(env.config_path), "run"], catch_exceptions=False)
    assert result.exit_code == 1 and "bad: rejected" in result.stderr


def test_a_crash_after_commit_is_settled_without_running_the_model(env):
    env.image("x.png")
    env.drop("x.yaml", "prompt: hi\ninputs: ../../media/x.png\n")
    w = worker(env)
    claim = w.spool.claim(w.spool.pending(now=1e12)[0][0])
    job = w._parse(claim)
    w.store.start_job(job.id, {"claim": claim.path.name, "source": claim.name}, w.name)
    w.store.finish_job(job.id, "done")  # committed; then the process "dies" before the move
    w.close()
    lease = json.loads(claim.lease_path.read_text())
    claim.lease_path.write_text(json.dumps({**lease, "expires": 0}))  # and its lease runs out

    def no_model():
        raise AssertionError("the model must not run again")

    settle = Worker(env.config(), Store(env.db_path), Spool(env.root / "jobs"), no_model, "m")
    assert settle.drain() == []
    settle.close()
    assert (env.root / "jobs" / "done" / "x.yaml").exists() and not list((env.root / "jobs" / "work").iterdir())


@pytest.mark.slow
def test_leases_of_dead_workers_expire_and_live_ones_are_kept(env):
    spool = Spool(env.root / "jobs", lease_seconds=60).ensure()
    env.drop("live.yaml", "prompt: hi\n")
    env.drop("dead.yaml", "prompt: hi\n")
    live = spool.claim(env.inbox / "live.yaml")
    dead = spool.claim(env.inbox / "dead.yaml")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = json.loads(dead.lease_path.read_text())
    dead.lease_path.write_text(json.dumps({**lease, "pid": int(gone.stdout)}))
    assert spool.abandoned() == [dead]
    assert spool.abandoned(now=lease["expires"] + 1) == sorted([live, dead], key=lambda c: c.path.name)
    spool.release(dead)
    assert (env.inbox / "dead.yaml").exists() and live.path.exists()


def test_sidecars_are_written_atomically_and_never_over_foreign_files(env):
    env.image("s/one.png", 1)
    env.image("s/two.png", 2)
    (env.media / "s" / "two.txt").write_text("my own caption")
    job = "prompt: Caption.\ninputs: ../../media/s/\nsidecar: true\n"
    env.drop("side.yaml", job)
    drain(env)
    rows = {Path(json.loads(r["media_paths"])[0]).name: r for r in results_of(env, "side")}
    assert (env.media / "s" / "one.txt").read_text() == rows["one.png"]["answer"]
    assert (env.media / "s" / "two.txt").read_text() == "my own caption"
    env.drop("side.yaml", job.replace("sidecar: true", "sidecar: true\nsidecar_overwrite: true"))
    drain(env)
    assert (env.media / "s" / "two.txt").read_text() == rows["two.png"]["answer"]
    assert not [p for p in (env.media / "s").iterdir() if p.name.startswith(".")]


def test_sidecars_in_a_copied_media_folder_are_still_recognised_as_ours(env):
    env.image("orig/one.png", 1)
    env.drop("first.yaml", "prompt: Caption.\ninputs: ../../media/orig/\nsidecar: true\n")
    drain(env)
    shutil.copytree(env.media / "orig", env.media / "copy")  # the photos with the captions vlbatch wrote
    env.drop("second.yaml", "prompt: Describe in detail.\ninputs: ../../media/copy/\nsidecar: true\n")
    drain(env)
    (row,) = results_of(env, "second")
    assert (env.media / "copy" / "one.txt").read_text() == row["answer"]  # replaced: it was ours, by its bytes


def test_schema(tmp_path):
    store = Store(tmp_path / "s.db")
    assert {"jobs", "runs", "results", "job_results", "sidecars"} <= set(store.db.table_names())
    assert store.db["results"].detect_fts() == "results_fts"
    indexed = {tuple(i.columns) for i in store.db["results"].indexes}
    assert {("cache_key",), ("job_id",), ("created_utc",)} <= indexed
    unique = {tuple(i.columns) for i in store.db["job_results"].indexes if i.unique}
    assert ("run_id", "media_paths") in unique  # one answer per file and run
    assert store.db.journal_mode == "wal"
    applied = store.db["_sqlite_migrations"].count
    store.close()
    assert Store(tmp_path / "s.db").db["_sqlite_migrations"].count == applied  # reopening applies nothing twice


def test_a_generated_answer_fills_every_results_column(env):
    """The migration and the row mapping are the two places a column lives: a column nobody fills fails here."""
    env.image("full.png", 9)
    env.drop("full.yaml", "prompt: Describe.\ninputs: ../../media/full.png\n")
    assert drain(env)["full"].state == "done"
    (row,) = results_of(env, "full")
    assert [name for name, value in row.items() if value is None] == ["error", "error_class"]


def test_results_and_status_commands(env):
    env.image("q/cat.png", 3)
    env.image("q/dog.png", 4)
    env.drop("tagged.yaml", "prompt: Caption.\ninputs: ../../media/q/\ntags: {project: pets}\n")
    env.drop("plain.yaml", "prompt: Other.\ninputs: ../../media/q/cat.png\n")
    drain(env)
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(main, ["--config", str(env.config_path), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    assert len(json.loads(cli("results", "--format", "json"))) == 3
    assert len(cli("results", "--job", "tagged", "--format", "jsonl").splitlines()) == 2
    assert len(json.loads(cli("results", "--tag", "project", "--format", "json"))) == 2
    csv_lines = cli("results", "--format", "csv").splitlines()
    assert csv_lines[0].startswith("id,media_paths,answer,error,") and len(csv_lines) == 4
    word = next(w for w in json.loads(cli("results", "--format", "json"))[0]["answer"].split() if w.isalpha())
    assert any(word in r["answer"] for r in json.loads(cli("results", "--search", word, "--format", "json")))
    assert "cat.png" in cli("results")
    status = json.loads(cli("status", "--json"))
    assert status["jobs"] == {"done": 2} and status["spool"]["done"] == 2
    assert status["throughput"]["1h"]["answers"] == 3
    assert "spool:" in cli("status")
    assert "media_roots" in cli("config")


def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(env):
    env.image("x.png")
    store = Store(env.db_path)
    store.start_job("doomed", {"source": "doomed.yaml"}, "host:1")
    for _ in range(2):  # two more starts that "died": the row is still running, attempts 3
        store.start_job("doomed", {"source": "doomed.yaml"}, "host:1")
    store.close()
    env.drop("doomed.yaml", "prompt: hi\ninputs: ../../media/x.png\n")
    outcome = drain(env)["doomed"]
    assert outcome.state == "failed" and "gave up after 3 attempts" in outcome.reason
    assert env.job("doomed")["attempts"] == 4 and results_of(env, "doomed") == []


def test_temp_hidden_and_partial_names_are_never_read(env):
    spool = Spool(env.root / "jobs", settle_seconds=0).ensure()
    for name in [".hidden.yaml", "job.yaml.tmp", "job.yaml.part", "notes.txt", "real.yml"]:
        (spool.inbox / name).write_text("prompt: hi\n")
    (spool.inbox / "folder.yaml").mkdir()
    assert [p.name for p in spool.pending()[0]] == ["real.yml"]


def test_submit_resolves_paths_from_the_job_folder_and_refuses_media_outside_the_roots(env, tmp_path):
    env.image("sub/a.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes((env.media / "sub" / "a.png").read_bytes())
    (env.media / "sub" / "job.yaml").write_text("prompt: hi\ninputs: a.png\n")
    (elsewhere / "job.yaml").write_text("prompt: hi\ninputs: b.png\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["--config", str(env.config_path), "submit", str(env.media / "sub" / "job.yaml")])
    assert ok.exit_code == 0, ok.stderr
    assert str(env.media / "sub" / "a.png") in (env.inbox / "job.yaml").read_text()
    refused = runner.invoke(main, ["--config", str(env.config_path), "submit", str(elsewhere / "job.yaml")])
    assert refused.exit_code == 1 and "outside the allowed media folders" in refused.stderr
    assert sorted(p.name for p in env.inbox.iterdir()) == ["job.yaml"]
    assert drain(env)["job"].state == "done"


def test_environment_overrides_the_config_file(env, monkeypatch, tmp_path):
    monkeypatch.setenv("VLBATCH_DATABASE", str(tmp_path / "other.db"))
    monkeypatch.setenv("VLBATCH_SPOOL_DIR", str(tmp_path / "spool2"))
    config = env.config()
    assert config.spool.database == tmp_path / "other.db" and config.spool.dir == tmp_path / "spool2"
    shown = CliRunner().invoke(main, ["--config", str(env.config_path), "config"]).stdout
    assert str(tmp_path / "other.db") in shown


def test_a_second_stop_signal_hands_the_job_back(env):
    env.image("x.png")
    env.drop("back.yaml", "prompt: hi\ninputs: ../../media/x.png\n")
    w = worker(env)
    claim = w.spool.claim(w.spool.pending(now=1e12)[0][0])
    w.stop_requested = w.abort_requested = True  # as after two SIGTERMs
    outcome = w.process(claim)
    w.close()
    assert outcome.state == "handed_back"
    assert (env.inbox / "back.yaml").exists() and not list((env.root / "jobs" / "work").iterdir())
    # a hand-back by a live worker is not a death: the finishing run is still attempt 1
    assert drain(env)["back"].state == "done" and env.job("back")["attempts"] == 1


def test_the_next_units_media_is_prepared_while_the_current_one_generates(env, monkeypatch):
    for i in range(3):
        env.image(f"p/{i}.png", i)
    env.drop("ahead.yaml", "prompt: Caption.\ninputs: ../../media/p/\n")
    w = worker(env)
    pipeline = w.pipeline
    events: list[str] = []
    prepare, embeds = pipeline.prepare, pipeline.prompt_embeds

    def spy_prepare(question, media, settings=None):
        events.append(f"prepare {Path(media[0]).stem}")
        return prepare(question, media, settings)

    def spy_embeds(request, timings):
        events.append("answer start")
        features = embeds(request, timings)
        time.sleep(0.2)  # a slow model: the side thread has time to run
        events.append("answer end")
        return features

    monkeypatch.setattr(pipeline, "prepare", spy_prepare)
    monkeypatch.setattr(pipeline, "prompt_embeds", spy_embeds)
    outcomes = w.drain()
    w.close()
    assert outcomes[0].state == "done"
    first_end = events.index("answer end")
    assert "prepare 1" in events[:first_end]  # unit 1 was decoded while unit 0's ViT ran
    assert events.count("prepare 1") == 1 and len(results_of(env, "ahead")) == 3


def test_a_reused_answer_is_recorded_with_the_jobs_own_files(env):
    original = env.image("first/photo.png", 5)
    env.drop("one.yaml", "id: one\nprompt: Caption.\ninputs: ../../media/first/\n")
    assert drain(env)["one"].state == "done"
    copies = env.media / "second"
    copies.mkdir()
    for name in ("a.png", "b.png"):  # the same bytes under other names, twice in one job
        shutil.copy(original, copies / name)
    env.drop("two.yaml", "id: two\nprompt: Caption.\ninputs: ../../media/second/\n")
    assert drain(env)["two"].state == "done"
    store = Store(env.db_path)
    rows = store.query_results(job="two")
    store.close()
    assert sorted(json.loads(r["media_paths"])[0] for r in rows) == [str(copies / "a.png"), str(copies / "b.png")]
    assert {r["answer"] for r in rows} == {results_of(env, "one")[0]["answer"]} and all(r["reused"] for r in rows)
    assert env.db()["results"].count == 1  # one answer, owned three times
    job = env.job("two")
    assert (job["answered"], job["reused"], job["media_count"]) == (0, 2, 2)
