"""Standing jobs with real `vlbatch run` processes: the documented cron recipe over a growing folder, exit codes
cron can live with, files that go, move or change, and two workers on one standing job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from spool_env import SpoolEnv

pytestmark = pytest.mark.slow

JOB = """id: nightly
prompt: Write a one-sentence caption for this photo.
inputs: {folder}
sidecar: true
max_tiles: 1
max_new_tokens: 6
"""


@pytest.fixture
def env(tmp_path: Path, tiny_onnx: Path) -> SpoolEnv:
    e = SpoolEnv(tmp_path / "site", tiny_onnx)
    e.root.mkdir()
    e.write_config(settle=0.2)
    (e.media / "photos").mkdir(parents=True)
    return e


SCRIPT = str(Path(sys.executable).parent / "vlbatch")


def cron_environ(env: SpoolEnv) -> dict[str, str]:
    """The environment of a cron line: no VLBATCH_* but the config it names."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}
    return {**environ, "VLBATCH_CONFIG": str(env.config_path)}


def vlbatch(env: SpoolEnv, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`vlbatch ARGS` as cron runs it: the config named by $VLBATCH_CONFIG, from another working directory."""
    return subprocess.run([SCRIPT, *args], cwd=cwd, env=cron_environ(env), capture_output=True, text=True, timeout=300)


def submit_nightly(env: SpoolEnv, cwd: Path, text: str | None = None) -> Path:
    """The nightly job (JOB over media/photos, or `text`) written in `cwd` and submitted as a standing job."""
    job = cwd / "nightly.yaml"
    job.write_text(JOB.format(folder=env.media / "photos") if text is None else text)
    submitted = vlbatch(env, "submit", "--standing", str(job), cwd=cwd)
    assert submitted.returncode == 0, submitted.stderr
    return job


def answered(env: SpoolEnv, job_id: str = "nightly") -> list[tuple[str, str | None, int]]:
    """(file name, error, reused) of every link the job's runs made, oldest first."""
    rows = env.db().execute(
        "select jr.media_paths, r.error, jr.reused from job_results jr join results r on r.id = jr.result_id "
        "where jr.job_id = ? and jr.change is null order by jr.id",
        [job_id],
    )
    return [(Path(json.loads(paths)[0]).name, error, reused) for paths, error, reused in rows]


def test_readme_cron_recipe_answers_only_new_photos(env: SpoolEnv, tmp_path: Path) -> None:
    photos = env.media / "photos"
    for i in range(2):
        env.image(f"photos/day1-{i}.jpg", seed=i)
    job = tmp_path / "nightly.yaml"
    job.write_text(JOB.format(folder=photos))
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()

    submitted = vlbatch(env, "submit", "--standing", str(job), cwd=elsewhere)
    assert submitted.returncode == 0, submitted.stderr
    standing = env.jobs / "standing" / "nightly.yaml"
    assert standing.is_file()

    first = vlbatch(env, "run", cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert sorted(name for name, _, _ in answered(env)) == ["day1-0.jpg", "day1-1.jpg"]

    for i in range(2):
        env.image(f"photos/day2-{i}.jpg", seed=10 + i)
    second = vlbatch(env, "run", cwd=elsewhere)
    assert second.returncode == 0, second.stderr
    links = answered(env)
    assert [name for name, _, _ in links[2:]] == ["day2-0.jpg", "day2-1.jpg"]  # exactly the new ones, once
    assert standing.is_file() and not (env.jobs / "done" / "nightly.yaml").exists()  # never moved
    for name in ("day1-0", "day1-1", "day2-0", "day2-1"):
        assert (photos / f"{name}.txt").read_text().strip()

    third = vlbatch(env, "run", cwd=elsewhere)
    assert third.returncode == 0, third.stderr
    assert "model.loaded" not in third.stderr
    assert len(answered(env)) == 4
    runs = env.db().execute("select count(*), sum(answered) from runs where job_id = 'nightly'").fetchone()
    assert runs == (3, 4)  # one row per cron run; the idle one answered nothing

    status = vlbatch(env, "status", cwd=elsewhere)
    assert "standing nightly: 4 files" in status.stdout, status.stdout
    shown = vlbatch(env, "results", "--job", "nightly", "--format", "json", cwd=elsewhere)
    assert sorted(Path(r["media_paths"][0]).name for r in json.loads(shown.stdout)) == [
        "day1-0.jpg",
        "day1-1.jpg",
        "day2-0.jpg",
        "day2-1.jpg",
    ]


def test_a_broken_photo_is_reported_once_and_answered_when_replaced(env: SpoolEnv, tmp_path: Path) -> None:
    photos = env.media / "photos"
    good = env.image("photos/good.jpg", seed=1)
    broken = photos / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:300])  # a truncated JPEG
    submit_nightly(env, tmp_path)

    first = vlbatch(env, "run", cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # a file failing for the first time: news
    assert "broken.jpg" in first.stderr
    again = vlbatch(env, "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # nothing changed: the same failure is not news
    assert [e is not None for n, e, _ in answered(env) if n == "broken.jpg"] == [True]  # not retried either

    retried = vlbatch(env, "run", "--retry-failed", cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr  # tried again, failed the same way: still not news
    assert [e is not None for n, e, _ in answered(env) if n == "broken.jpg"] == [True, True]

    shutil.copyfile(good, tmp_path / "copy.jpg")
    env.image("photos/broken.jpg", seed=7)  # replaced by a good photo
    fixed = vlbatch(env, "run", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert [e is None for n, e, _ in answered(env) if n == "broken.jpg"][-1]
    status = vlbatch(env, "status", cwd=tmp_path).stdout
    assert "standing nightly: 2 files;" in status, status


def test_gone_moved_and_edited(env: SpoolEnv, tmp_path: Path) -> None:
    photos = env.media / "photos"
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("c.jpg", 3)):
        env.image(f"photos/{name}", seed=seed)
    job = submit_nightly(env, tmp_path, JOB.format(folder=photos) + "remove_gone_sidecars: true\n")
    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0

    (photos / "a.jpg").unlink()
    (photos / "sub").mkdir()
    (photos / "b.jpg").rename(photos / "sub" / "b-renamed.jpg")
    result = vlbatch(env, "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model.loaded" not in result.stderr  # a move is relinked by content, without the model
    run = (
        env.db()
        .execute("select answered, reused, gone, unchanged from runs where job_id = 'nightly' order by id desc limit 1")
        .fetchone()
    )
    assert run == (0, 1, 2, 1)
    assert not (photos / "a.txt").exists()  # vlbatch's own sidecar of a file that is gone, removed as asked
    assert (photos / "sub" / "b-renamed.txt").exists()
    gone = env.db().execute("select count(*) from standing_files where state = 'gone'").fetchone()[0]
    assert gone == 2
    kept = env.db().execute("select count(*) from results where error is null").fetchone()[0]
    assert kept == 3  # answers of files that are gone stay

    # an edited prompt is a new question about every file
    job.write_text(JOB.format(folder=photos).replace("one-sentence caption", "two-word title"))
    assert vlbatch(env, "submit", "--standing", str(job), cwd=tmp_path).returncode == 0
    edited = vlbatch(env, "run", cwd=tmp_path)
    assert edited.returncode == 0, edited.stderr
    last = env.db().execute("select answered from runs where job_id = 'nightly' order by id desc limit 1").fetchone()[0]
    assert last == 2


def test_text_only_standing_job_is_refused_once(env: SpoolEnv, tmp_path: Path) -> None:
    standing = env.jobs / "standing"
    standing.mkdir(parents=True)
    (standing / "haiku.yaml").write_text("prompt: Write a haiku.\n")
    os.utime(standing / "haiku.yaml", (1, 1))
    first = vlbatch(env, "run", cwd=tmp_path)
    assert first.returncode == 1
    assert "no inputs" in (standing / "haiku.yaml.reason.txt").read_text()
    assert (standing / "haiku.yaml").exists()
    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0  # the same refusal is not news


def test_two_workers_never_run_one_standing_job_at_once(env: SpoolEnv, tmp_path: Path) -> None:
    photos = env.media / "photos"
    for i in range(6):
        env.image(f"photos/{i}.jpg", seed=i)
    env.write_config(settle=0.2, max_workers=2)
    submit_nightly(env, tmp_path)
    procs = [
        subprocess.Popen([SCRIPT, "run"], cwd=tmp_path, env=cron_environ(env), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    names = [name for name, _, _ in answered(env)]
    assert sorted(names) == sorted(f"{i}.jpg" for i in range(6))  # each file once
    hashes = env.db().execute("select count(distinct sha256) from standing_files").fetchone()[0]
    assert hashes == 6
    assert hashlib.sha256((photos / "0.jpg").read_bytes()).hexdigest() in {
        row[0] for row in env.db().execute("select sha256 from standing_files")
    }


def test_a_together_standing_job_is_asked_again_when_its_set_changes(env: SpoolEnv, tmp_path: Path) -> None:
    photos = env.media / "photos"
    env.image("photos/one.jpg", seed=1)
    env.image("photos/two.jpg", seed=2)
    job = tmp_path / "compare.yaml"
    job.write_text(f"id: compare\nprompt: What differs?\ninputs: {photos}\nmode: together\nmax_new_tokens: 4\n")
    assert vlbatch(env, "submit", "--standing", str(job), cwd=tmp_path).returncode == 0

    def answers() -> list[list[str]]:
        rows = env.db().execute("select media_paths from results where job_id = 'compare' order by id")
        return [sorted(Path(p).name for p in json.loads(row[0])) for row in rows]

    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0
    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0
    assert answers() == [["one.jpg", "two.jpg"]]  # once: nothing changed the second time
    env.image("photos/three.jpg", seed=3)
    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0
    assert answers() == [["one.jpg", "two.jpg"], ["one.jpg", "three.jpg", "two.jpg"]]
    history = vlbatch(env, "status", "--job", "compare", cwd=tmp_path).stdout
    assert history.count("unchanged") == 3, history  # one line per run, newest first


def test_an_emptied_folder_looks_unmounted_and_marks_nothing_gone(env: SpoolEnv, tmp_path: Path) -> None:
    photos = env.media / "photos"
    for i in range(2):
        env.image(f"photos/{i}.jpg", seed=i)
    submit_nightly(env, tmp_path)
    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0
    hidden = tmp_path / "unmounted"
    photos.rename(hidden)
    photos.mkdir()  # the empty mount point of a share that is not mounted
    empty = vlbatch(env, "run", cwd=tmp_path)
    assert empty.returncode == 0 and "event=standing.empty" in empty.stderr, empty.stderr
    assert env.db().execute("select count(*) from standing_files where state = 'gone'").fetchone()[0] == 0
    photos.rmdir()
    hidden.rename(photos)  # mounted again
    back = vlbatch(env, "run", cwd=tmp_path)
    assert back.returncode == 0 and "model.loaded" not in back.stderr
    (photos / "0.jpg").unlink()  # one file deleted for real: that one is gone
    assert vlbatch(env, "run", cwd=tmp_path).returncode == 0
    assert env.db().execute("select count(*) from standing_files where state = 'gone'").fetchone()[0] == 1
