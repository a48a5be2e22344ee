"""A standing job's folder as the watch folder, with a real `vlbatch watch`: photos copied in one after another,
one copied slowly, a hundred at once, the watcher restarted mid-way, and a folder inotify cannot watch."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from spool_env import SpoolEnv, wait_for
from synthetic import synthetic_image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

JOB = "id: drop\nprompt: Caption it.\ninputs: {folder}\nsidecar: true\nmax_tiles: 1\nmax_new_tokens: 4\n"


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tiny_onnx)
    e.write_config(settle=0.5, rescan=2.0)
    (e.media / "drop").mkdir(parents=True)
    standing = e.jobs / "standing"
    standing.mkdir(parents=True)
    (standing / "drop.yaml").write_text(JOB.format(folder=e.media / "drop"))
    return e


def links(env: SpoolEnv) -> list[tuple[str, str, str | None]]:
    """(file name, media sha256, error) of every answer the job's runs made."""
    try:
        rows = env.db().execute(
            "select jr.media_paths, jr.media_sha256, r.error from job_results jr join results r on r.id = jr.result_id "
            "where jr.job_id = 'drop' and jr.change is null order by jr.id"
        )
        return [(Path(json.loads(p)[0]).name, json.loads(h)[0], e) for p, h, e in rows]
    except Exception:  # no tables yet
        return []


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def photo_bytes(seed: int) -> bytes:
    from io import BytesIO

    out = BytesIO()
    synthetic_image(320, 240, seed=seed).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_photos_dropped_into_the_folder_are_answered_once_each(env: SpoolEnv, tmp_path: Path) -> None:
    drop = env.media / "drop"
    log = tmp_path / "watch.log"
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: "worker.watching" in log.read_text(), timeout=60)
        wait_for(lambda: "model.loaded" in log.read_text(), timeout=60)
        latencies = []
        for i in range(3):  # one after another
            data = photo_bytes(i)
            staged = tmp_path / f"p{i}.jpg"
            staged.write_bytes(data)
            shutil.copyfile(staged, drop / f"p{i}.jpg")
            copied = time.time()
            wait_for(lambda i=i: any(name == f"p{i}.jpg" for name, _, _ in links(env)), timeout=30)
            latencies.append(time.time() - copied)
        print(f"\nanswer latency after each copy: {', '.join(f'{s:.2f} s' for s in latencies)}")

        # a slow copy: chunks with pauses longer than settle_seconds, through one open file
        data = photo_bytes(99)
        with open(drop / "slow.jpg", "wb") as fh:
            for start in range(0, len(data), len(data) // 4 + 1):
                fh.write(data[start : start + len(data) // 4 + 1])
                fh.flush()
                time.sleep(0.9)
        wait_for(lambda: any(name == "slow.jpg" for name, _, _ in links(env)), timeout=30)
        time.sleep(1.5)
        slow = [(h, e) for name, h, e in links(env) if name == "slow.jpg"]
        assert slow == [(hashlib.sha256(data).hexdigest(), None)]  # once, and as the whole file

        # a hundred at once
        batch = tmp_path / "batch"
        batch.mkdir()
        for i in range(100):
            (batch / f"b{i:03d}.jpg").write_bytes(photo_bytes(1000 + i))
        for path in sorted(batch.iterdir()):
            shutil.copyfile(path, drop / path.name)
        wait_for(lambda: sum(name.startswith("b") for name, _, _ in links(env)) >= 100, timeout=240)
        time.sleep(1.0)
    finally:
        stop(proc)
    names = [name for name, _, _ in links(env)]
    assert sorted(names) == sorted(
        {*(f"p{i}.jpg" for i in range(3)), "slow.jpg", *(f"b{i:03d}.jpg" for i in range(100))}
    )
    assert all(error is None for _, _, error in links(env))
    assert (drop / "b050.txt").read_text().strip()


def test_a_restarted_watcher_loses_and_doubles_nothing(env: SpoolEnv, tmp_path: Path) -> None:
    drop = env.media / "drop"
    log = tmp_path / "watch.log"
    proc = env.spawn("watch", log=log)
    wait_for(lambda: "model.loaded" in log.read_text(), timeout=60)
    for i in range(20):
        (drop / f"r{i:02d}.jpg").write_bytes(photo_bytes(200 + i))
    wait_for(lambda: len(links(env)) >= 3, timeout=60)
    proc.send_signal(signal.SIGKILL)  # mid-way, without warning
    proc.wait(timeout=30)
    for i in range(20, 25):  # dropped while nobody watches
        (drop / f"r{i:02d}.jpg").write_bytes(photo_bytes(200 + i))
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: len({name for name, _, _ in links(env)}) >= 25, timeout=120)
        time.sleep(2.5)  # a rescan more: nothing more comes
    finally:
        stop(proc)
    names = [name for name, _, _ in links(env)]
    assert sorted(names) == [f"r{i:02d}.jpg" for i in range(25)]  # every file once


def test_a_folder_past_the_inotify_limit_falls_back_to_rescans(env: SpoolEnv, tmp_path: Path) -> None:
    """Inside a user namespace of its own, the test lowers that namespace's inotify watch limit (never the
    machine's): the watcher says so once and the rescans still answer what is dropped."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", "echo 40 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limit here: {probe.stderr.strip()}")
    drop = env.media / "drop"
    for i in range(60):  # more folders than the namespace may watch
        (drop / f"album{i:02d}").mkdir()
    env.write_config(settle=0.3, rescan=1.0)
    log = tmp_path / "watch.log"
    command = " ".join(f"'{part}'" for part in env.cli("watch"))
    with open(log, "a") as err:
        proc = subprocess.Popen(
            [
                "unshare",
                "--user",
                "--map-root-user",
                "sh",
                "-c",
                f"echo 40 > /proc/sys/user/max_inotify_watches && exec {command}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(lambda: "model.loaded" in log.read_text(), timeout=60)
        (drop / "album59" / "late.jpg").write_bytes(photo_bytes(5))
        wait_for(lambda: any(name == "late.jpg" for name, _, _ in links(env)), timeout=30)
    finally:
        stop(proc)
    text = log.read_text()
    assert text.count("event=watch.polling") == 1, text
    assert "Traceback" not in text


def test_a_folder_of_5000_files_starts_without_the_model_or_a_gap(tiny_onnx: Path, tmp_path: Path) -> None:
    """bench/standing_scale.py at CI size: a cron pass over 5,000 answered files in 250 folders loads no model
    and answers nothing; `watch` finishes its first pass with every folder watched (figures: the benchmark)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("standing_scale", REPO / "bench" / "standing_scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    config = scale.build(tmp_path, files=5_000, folders=250, model=tiny_onnx)
    _, _, cron_log = scale.cron_pass(config)
    assert "answer.done" not in cron_log and "model.loaded" not in cron_log
    assert "unchanged=5000" in cron_log
    _, _, watch_log = scale.watch_start(config, tmp_path / "watch.log")
    scanned = next(line for line in watch_log.splitlines() if "event=standing.scanned" in line)
    assert "watched=1 " in scanned and "polled=0" in scanned, scanned  # one recursive watch over the tree


def test_standing_jobs_added_and_edited_under_a_running_watch(env: SpoolEnv, tmp_path: Path) -> None:
    """No restart: a new standing job file is taken at once, and an edited one (a new prompt) asks again,
    long before the next rescan."""
    env.write_config(settle=0.3, rescan=60.0)
    for i in range(2):
        (env.media / "drop" / f"e{i}.jpg").write_bytes(photo_bytes(300 + i))
    (env.jobs / "standing" / "drop.yaml").unlink()
    log = tmp_path / "watch.log"
    proc = env.spawn("watch", log=log)
    try:
        wait_for(lambda: "event=worker.watching" in log.read_text(), timeout=60)
        time.sleep(1.0)
        job = env.jobs / "standing" / "drop.yaml"
        staged = tmp_path / ".drop.yaml.tmp"
        staged.write_text(JOB.format(folder=env.media / "drop"))
        staged.rename(job)
        wait_for(lambda: len(links(env)) == 2, timeout=30)
        staged.write_text(JOB.format(folder=env.media / "drop").replace("Caption it.", "Title it."))
        staged.rename(job)
        wait_for(lambda: len(links(env)) == 4, timeout=30)
    finally:
        stop(proc)
    prompts = [row[0] for row in env.db().execute("select prompt from results order by id")]
    assert prompts == ["Caption it.", "Caption it.", "Title it.", "Title it."]
