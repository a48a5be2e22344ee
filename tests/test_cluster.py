"""`vlbatch run --ray` / `watch --ray` against a real Ray cluster on this machine.

The cluster is Ray's own multi-node test utility (`ray.cluster_utils.Cluster`): a head node and a second node,
each a raylet of its own on this host (same IP, own ports) with 1 CPU and one unit of the custom resource
`vlbatch_test`, so that with `cluster.resource: vlbatch_test` exactly two actors run, one per node. Both nodes
share this host's name and IP, so which node an actor ran on is told by its worker process's parent, the raylet
of that node. `vlbatch` itself runs as a subprocess that joins the cluster as a driver (`--ray <address>`), as in
production. One cluster serves the whole module; each test has its own spool and database.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from spool_env import SpoolEnv, wait_for
from synthetic import write_media

try:
    from ray.cluster_utils import Cluster
except ImportError as exc:  # the `ray` extra is not installed
    pytest.skip(f"the Ray tests need the ray extra (pip install 'vlbatch[ray]'): {exc}", allow_module_level=True)

from batch.cli import main
from batch.config import load_config
from batch.service.worker.worker import Worker

pytestmark = pytest.mark.slow

RESOURCE = "vlbatch_test"
PLUGIN = Path(__file__).parent / "faults" / "plugin"  # sitecustomize: FAULT_SUITE_CRASH_ON_MAGENTA
HOST = socket.gethostname()
PHOTOS = [("beach.jpg", (320, 240), 1), ("street.png", (240, 320), 2), ("harbor.png", (448, 448), 4)]
CAPTION = "Write a one-sentence caption for this photo."
JOBS = {  # the shapes of jobs/examples/*.yaml, on the synthetic media
    "caption-photos.yaml": f"id: caption-photos\nprompt: {CAPTION}\ninputs:\n  - ../../media/photos/\nmode: each\n"
    "max_new_tokens: 48\ntags: [captions, demo]\n",
    "compare-two.yaml": "prompt: What differs between these two pictures?\ninputs:\n  - ../../media/photos/beach.jpg\n"
    "  - ../../media/photos/street.png\nmode: together\nmax_tiles: 4\ntemperature: 0.7\nseed: 42\n"
    "tags:\n  project: demo\n  kind: comparison\n",
    "video-question.yaml": "prompt: What happens in this clip?\ninputs: ../../media/photos/*.mp4\nvideo_frames: 8\n"
    "max_new_tokens: 64\n",
    "many.yaml": "prompt: Caption.\ninputs: ../../media/many/\n",
}


@dataclass
class Env(SpoolEnv):
    """A spool beside others in one folder: its own config, jobs/ and database, the folder's media shared."""

    name: str = "ray"
    ppids: dict[str, int] = field(default_factory=dict)  # actor id -> its worker process's parent (a raylet)

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.name}.yaml"

    @property
    def jobs(self) -> Path:
        return self.root / f"jobs-{self.name}"

    @property
    def db_path(self) -> Path:
        return self.root / f"{self.name}.db"

    def configure(self, cluster: dict | None = None, model: dict | None = None, **spool: object) -> Env:
        self.write_config(lease=10.0, database=f"{self.name}.db", spool_dir=f"jobs-{self.name}", model=model, **spool)
        if cluster is not None:
            settings = {"resource": RESOURCE, **cluster}
            with self.config_path.open("a") as out:
                out.write("cluster:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items()))
        return self

    def rows(self, sql: str, *args: object) -> list[dict]:
        if not self.db_path.exists():
            return []
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as db:
            db.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in db.execute(sql, args)]
            except sqlite3.OperationalError:  # tables not created yet
                return []

    def actors(self) -> list[dict]:
        return self.rows("select * from actors order by started_utc, id")

    def committed(self, job_id: str) -> int:
        return len(self.rows("select 1 from results where job_id = ? and answer is not null", job_id))

    def answers(self, job_id: str) -> dict[str, dict]:
        """The answers of the job's latest run, by file names (several for a `together` unit)."""
        rows = self.rows(
            "select r.* from results r join job_results jr on jr.result_id = r.id "
            "where jr.run_id = (select run_id from jobs where id = ?) order by r.id",
            job_id,
        )
        return {",".join(Path(p).name for p in json.loads(r["media_paths"])): r for r in rows}

    def note_actors(self) -> None:
        """Remember each running actor's parent process: the raylet of the node it was placed on."""
        for row in self.actors():
            if row["pid"] and row["id"] not in self.ppids and row["state"] == "ready":
                try:
                    self.ppids[row["id"]] = _ppid(row["pid"])
                except OSError:  # gone already
                    pass


def _status(env: Env) -> dict:
    result = CliRunner().invoke(main, ["--config", str(env.config_path), "status", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _same(row: dict) -> tuple:
    """What must not depend on where an answer was made."""
    keys = ("answer", "error", "output_tokens", "prompt_tokens", "image_tokens", "tiles", "finish_reason")
    return tuple(row[k] for k in keys)


def _media(root: Path, many: int = 40) -> None:
    write_media(root / "media" / "photos", PHOTOS)  # the photos and clip.mp4
    env = SpoolEnv(root, root)
    for i in range(many):
        env.image(f"many/{i:02d}.png", 100 + i, size=(64, 48))


class Head:
    """`vlbatch run|watch --ray ADDRESS` as a subprocess: watched while it runs, always ended."""

    def __init__(self, env: Env, address: str, command: str = "run") -> None:
        self.env = env
        self.log = env.root / f"{env.name}-{command}-{time.monotonic_ns()}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("VLBATCH_", "RAY_ADDRESS"))}
        self.proc = env.spawn(command, "--ray", address, log=self.log, env=clean)

    def wait(self, timeout: float = 240.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.env.note_actors()
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"vlbatch did not exit in {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        return self.proc.returncode

    def until(self, predicate, timeout: float = 120.0):
        def check():
            self.env.note_actors()
            assert self.proc.poll() is None, f"vlbatch exited early ({self.proc.returncode}):\n{self.text()[-3000:]}"
            return predicate()

        return wait_for(check, timeout, interval=0.05)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """Head + one node, shut down at the module's end; then every process it started must be gone."""
    head_args = {"num_cpus": 1, "resources": {RESOURCE: 1}, "include_dashboard": False}
    with _crashing_on_magenta():
        c = Cluster(initialize_head=True, head_node_args=head_args)
    started: set[int] = set()
    try:
        with _crashing_on_magenta():
            c.add_node(num_cpus=1, resources={RESOURCE: 1})
        c.wait_for_nodes()
        yield c
    finally:
        started = _descendants(os.getpid())  # GCS, raylets, agents, actors (orphans once their raylet is gone)
        c.shutdown()
    try:
        wait_for(lambda: not [pid for pid in started if _alive(pid)], timeout=30, interval=0.2)
    except AssertionError:
        raise AssertionError(f"Ray processes outlived the cluster: {[p for p in started if _alive(p)]}") from None


@contextlib.contextmanager
def _crashing_on_magenta() -> Iterator[None]:
    """Nodes started inside run actors that crash (SIGSEGV) when they answer a solid magenta photo: a model runtime
    that dies on one input (tests/faults/plugin, through the environment the node's processes inherit)."""
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "FAULT_SUITE_CRASH_ON_MAGENTA")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN), saved["PYTHONPATH"]]))
    os.environ["FAULT_SUITE_CRASH_ON_MAGENTA"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(_ppid(int(entry.name)), []).append(int(entry.name))
            except OSError:
                continue
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def raylets(cluster: Cluster) -> dict[int, str]:
    """Each node's raylet process id -> the node's Ray id."""
    return {n.all_processes["raylet"][0].process.pid: n.node_id for n in cluster.list_all_nodes()}


@pytest.fixture
def heads():
    """Every vlbatch process a test starts, killed at its end whatever happened."""
    started: list[Head] = []

    def start(env: Env, address: str, command: str = "run") -> Head:
        started.append(Head(env, address, command))
        return started[-1]

    yield start
    for head in started:
        head.stop()


@pytest.fixture(scope="module")
def answered(cluster, tiny_onnx, tmp_path_factory):
    """The example-like jobs and a 40-file folder, answered once through the cluster's 2 actors and once by
    the single-process worker, over the same media paths."""
    root = tmp_path_factory.mktemp("answered")
    _media(root)
    ray_env = Env(root, tiny_onnx, name="ray").configure(cluster={})
    local = Env(root, tiny_onnx, name="local").configure()
    for env in (ray_env, local):
        for name, text in JOBS.items():
            env.drop(name, text)
    head = Head(ray_env, cluster.address)
    try:
        code = head.wait()
    finally:
        head.stop()
    worker = Worker.from_config(load_config(local.config_path, environ={}))  # no VLBATCH_* of the caller's shell
    try:
        outcomes = {o.job_id: o.state for o in worker.drain()}
    finally:
        worker.close()
    assert set(outcomes.values()) == {"done"}, outcomes
    return ray_env, local, code, head.text()


def test_two_actors_one_on_each_node_answer_the_jobs(answered, cluster):
    env, _, code, log = answered
    assert code == 0, log[-3000:]
    assert "4 jobs: 4 done, 0 failed" in log
    assert sorted(p.name for p in (env.jobs / "done").iterdir()) == sorted(JOBS)
    actors = env.actors()
    assert len(actors) == 2, actors
    assert {a["state"] for a in actors} == {"stopped"}  # the run ended and stopped them
    assert all(a["answers"] > 0 and a["output_tokens"] > 0 and a["decode_ms"] > 0 for a in actors), actors
    assert {(a["node"], a["backend"]) for a in actors} == {(HOST, "onnxruntime")}
    assert all(a["node_ip"] and a["pid"] and a["last_error"] is None for a in actors)
    assert len({a["pid"] for a in actors}) == 2
    # one per node: each actor process is a child of a different node's raylet
    nodes = raylets(cluster)
    assert len(nodes) == 2 and sorted(env.ppids) == sorted(a["id"] for a in actors), env.ppids
    assert {nodes[ppid] for ppid in env.ppids.values()} == set(nodes.values())
    generated = env.rows("select * from results where answer is not null")
    assert sum(a["answers"] for a in actors) == len(generated) == 3 + 1 + 1 + 1 + 40  # photos + clip, 3 jobs, 40
    assert {(r["node"], r["backend"]) for r in generated} == {(HOST, "onnxruntime")}


def test_the_cluster_answers_exactly_as_the_single_process_worker(answered):
    env, local, _, _ = answered
    for job_id, files in [("caption-photos", 4), ("compare-two", 1), ("video-question", 1), ("many", 40)]:
        ours, theirs = env.answers(job_id), local.answers(job_id)
        assert len(ours) == files and sorted(ours) == sorted(theirs), job_id
        for name, row in ours.items():
            assert row["error"] is None and row["answer"] and row["output_tokens"] > 0, (job_id, name)
            assert _same(row) == _same(theirs[name]), (job_id, name)
            assert row["media_paths"] == theirs[name]["media_paths"] and row["cache_key"] == theirs[name]["cache_key"]


def test_status_lists_the_actors(answered):
    env, _, _, _ = answered
    actors = env.actors()
    result = CliRunner().invoke(main, ["--config", str(env.config_path), "status", "--json"])
    assert result.exit_code == 0, result.output
    listed = {a["actor"]: a for a in json.loads(result.stdout)["actors"]}
    assert sorted(listed) == sorted(a["id"] for a in actors)
    for row in actors:
        shown = listed[row["id"]]
        assert (shown["node"], shown["backend"], shown["state"]) == (HOST, "onnxruntime", "stopped")
        assert shown["answers"] == row["answers"] > 0
        assert shown["tokens_per_s"] == pytest.approx(row["output_tokens"] / (row["decode_ms"] / 1e3), abs=0.01)
    text = CliRunner().invoke(main, ["--config", str(env.config_path), "status"])
    assert text.exit_code == 0, text.output
    for row in actors:
        tok_s = listed[row["id"]]["tokens_per_s"]
        line = f"actor {row['id']} on {HOST} (onnxruntime): stopped, {row['answers']} answers, {tok_s:.2f} tok/s"
        assert line in text.stdout, text.stdout


def test_a_killed_actor_is_replaced_and_every_file_is_answered_once(answered, cluster, heads, tmp_path, tiny_onnx):
    _, local, _, _ = answered
    _media(tmp_path)
    env = Env(tmp_path, tiny_onnx).configure(cluster={})
    env.drop("many.yaml", JOBS["many.yaml"])
    head = heads(env, cluster.address)
    head.until(lambda: env.committed("many") >= 4)
    victim = head.until(lambda: [a for a in env.actors() if a["state"] == "ready" and a["answers"] >= 1])[0]
    first = {a["id"] for a in env.actors()}
    os.kill(victim["pid"], signal.SIGKILL)
    assert head.wait() == 0, head.text()[-3000:]
    assert env.job("many")["state"] == "done" and (env.jobs / "done" / "many.yaml").exists()
    # every file exactly once, each answer the one the single-process worker gave
    linked = env.rows("select media_paths from job_results where job_id = 'many'")
    assert len(linked) == 40 and len({r["media_paths"] for r in linked}) == 40
    results = env.rows("select media_paths from results")
    assert len(results) == 40 and len({r["media_paths"] for r in results}) == 40
    ours, theirs = env.answers("many"), local.answers("many")
    assert {n: _same(r) for n, r in ours.items()} == {n: _same(r) for n, r in theirs.items()}
    # the killed actor is gone with the reason; Ray put its replacement on the node that freed, and it answered
    actors = {a["id"]: a for a in env.actors()}
    assert len(actors) == 3, actors
    gone = actors[victim["id"]]
    assert gone["state"] == "gone" and "died" in gone["last_error"], gone
    (new,) = [a for a in actors.values() if a["id"] not in first]
    assert new["state"] == "stopped" and new["answers"] > 0 and new["pid"] != victim["pid"]
    assert env.ppids[new["id"]] == env.ppids[victim["id"]]
    assert sum(a["answers"] for a in actors.values()) == 40
    assert "event=cluster.unit_resent" in head.text()


def test_a_unit_that_kills_its_actor_twice_is_skipped_and_its_batch_is_answered(cluster, heads, tmp_path, tiny_onnx):
    """The magenta photo crashes any actor that answers it. The first death blames the units that actor was
    decoding together; each goes again alone, so the second death is the magenta photo's own: it is skipped,
    every other photo is answered once."""
    env = Env(tmp_path, tiny_onnx).configure(cluster={})
    for i in range(7):
        env.image(f"k/{i}.png", 200 + i, size=(64, 48))
    Image.new("RGB", (64, 48), (255, 0, 255)).save(env.media / "k" / "3-magenta.png")
    env.drop("killer.yaml", "prompt: Caption.\ninputs: ../../media/k/\nmax_new_tokens: 24\n")
    head = heads(env, cluster.address)
    assert head.wait() == 1, head.text()[-3000:]  # a file failed
    job = env.job("killer")
    assert (job["state"], job["answered"], job["failed_media"]) == ("failed", 7, 1)
    failed = env.rows("select media_paths, error from results where error is not null")
    assert len(failed) == 1 and "3-magenta.png" in failed[0]["media_paths"]
    assert "died 2 times" in failed[0]["error"]
    linked = env.rows("select media_paths from job_results where job_id = 'killer'")
    assert len(linked) == 8 and len({r["media_paths"] for r in linked}) == 8
    assert sum(a["state"] == "gone" for a in env.actors()) == 2  # two deaths, both the magenta photo's


def test_a_killed_head_recovers_as_a_single_worker_does(answered, cluster, heads, tmp_path, tiny_onnx):
    """kill -9 of the head mid-job: its actors go with it; once the lease runs out the next head takes the job
    back and answers only what was not committed."""
    _, local, _, _ = answered
    _media(tmp_path)
    env = Env(tmp_path, tiny_onnx).configure(cluster={})
    env.drop("many.yaml", JOBS["many.yaml"])
    head = heads(env, cluster.address)
    head.until(lambda: env.committed("many") >= 6)
    shown = _status(env)  # the head reports itself, and the job runs on it
    assert [w["command"] for w in shown["workers"]] == ["run --ray"] and shown["running"][0]["state"] == "running"
    assert {a["state"] for a in shown["actors"]} == {"ready"}
    head.proc.kill()
    head.proc.wait()
    before = env.committed("many")
    assert 6 <= before < 40 and list((env.jobs / "work").glob("*many.yaml*"))
    time.sleep(11)  # the lease (10 s) runs out; two heartbeats (5 s) are long missed
    shown = _status(env)  # the head and its actors are gone, the job stalled: nothing shows as running
    assert shown["workers"] == [] and shown["running"][0]["state"] == "stalled"
    assert {a["state"] for a in shown["actors"]} == {"gone (its head stopped beating)"}
    again = heads(env, cluster.address)
    assert again.wait() == 0, again.text()[-3000:]
    assert env.job("many")["state"] == "done" and env.job("many")["attempts"] == 2
    results = env.rows("select media_paths from results")
    assert len(results) == 40 and len({r["media_paths"] for r in results}) == 40, "a file was answered twice"
    ours, theirs = env.answers("many"), local.answers("many")
    assert {n: _same(r) for n, r in ours.items()} == {n: _same(r) for n, r in theirs.items()}


def test_one_image_jobs_run_side_by_side_on_both_actors(cluster, heads, tmp_path, tiny_onnx):
    """The head runs as many jobs at once as the pool holds units, so one-image jobs keep every actor busy."""
    _media(tmp_path, many=8)
    env = Env(tmp_path, tiny_onnx).configure(cluster={})
    for i in range(8):
        env.drop(f"one-{i}.yaml", f"prompt: Caption.\ninputs: ../../media/many/{i:02d}.png\n")
    head = heads(env, cluster.address)
    assert head.wait() == 0, head.text()[-3000:]
    assert len(list((env.jobs / "done").iterdir())) == 8
    assert len(env.rows("select 1 from job_results")) == len(env.rows("select 1 from results")) == 8
    assert sorted(a["answers"] for a in env.actors()) != [0, 8], "one actor answered every job"
    assert sum(a["answers"] for a in env.actors()) == 8


def _stop_signal_mid_job(cluster, heads, tmp_path, tiny_onnx):
    """A head running the 16-file job, sent one SIGTERM once 3 answers are committed: (env, head). The actors answer
    one unit at a time: batches of the tiny model would end the job before a second signal could reach it."""
    _media(tmp_path, many=16)
    env = Env(tmp_path, tiny_onnx).configure(cluster={}, model={"batch": 1})
    env.drop("many.yaml", JOBS["many.yaml"])
    head = heads(env, cluster.address)
    head.until(lambda: env.committed("many") >= 3)
    head.proc.send_signal(signal.SIGTERM)
    return env, head


def test_one_stop_signal_finishes_the_job(cluster, heads, tmp_path, tiny_onnx):
    env, head = _stop_signal_mid_job(cluster, heads, tmp_path, tiny_onnx)
    assert head.wait() == 0, head.text()[-3000:]
    assert env.job("many")["state"] == "done" and (env.jobs / "done" / "many.yaml").exists()
    assert len(env.answers("many")) == 16 and len(env.rows("select 1 from results where error is null")) == 16
    assert {a["state"] for a in env.actors()} == {"stopped"}


def test_two_stop_signals_hand_the_job_back_and_a_later_run_completes_it(cluster, heads, tmp_path, tiny_onnx):
    env, head = _stop_signal_mid_job(cluster, heads, tmp_path, tiny_onnx)
    head.until(lambda: "event=worker.signal" in head.text())  # two signals at once would count as one
    head.proc.send_signal(signal.SIGTERM)
    assert head.wait() == 0, head.text()[-3000:]
    assert "event=job.handed_back" in head.text()
    assert (env.inbox / "many.yaml").exists() and not list((env.jobs / "done").iterdir())
    assert env.job("many")["state"] not in ("done", "failed")
    before = env.committed("many")
    assert 3 <= before < 16
    again = heads(env, cluster.address)
    assert again.wait() == 0, again.text()[-3000:]
    assert env.job("many")["state"] == "done"
    assert len(env.answers("many")) == 16
    results = env.rows("select media_paths from results")
    assert len(results) == 16 and len({r["media_paths"] for r in results}) == 16  # nothing answered twice
    assert again.text().count("event=answer.done") == 16 - before


def test_media_as_bytes_or_through_path_map_answer_the_same(answered, cluster, heads, tmp_path, tiny_onnx):
    _, local, _, _ = answered
    _media(tmp_path, many=0)
    media = tmp_path / "media"
    expected = {n: _same(r) for n, r in local.answers("caption-photos").items()}
    # bytes: the head reads its own paths, whatever path_map says the nodes would see
    sent = Env(tmp_path, tiny_onnx, name="bytes")
    sent.configure(cluster={"media": "bytes", "path_map": [f"{media}=/nonexistent/node-media"]})
    sent.drop("caption-photos.yaml", JOBS["caption-photos.yaml"])
    head = heads(sent, cluster.address)
    assert head.wait() == 0, head.text()[-3000:]
    assert {n: _same(r) for n, r in sent.answers("caption-photos").items()} == expected
    # path_map: the actors read the nodes' view of the media folder, here a copy that lacks one file
    node_view = tmp_path / "node-view"
    shutil.copytree(media, node_view)
    (node_view / "photos" / "harbor.png").unlink()
    mapped = Env(tmp_path, tiny_onnx, name="mapped").configure(cluster={"path_map": [f"{media}={node_view}"]})
    mapped.drop("caption-photos.yaml", JOBS["caption-photos.yaml"])
    head = heads(mapped, cluster.address)
    assert head.wait() == 1, head.text()[-3000:]  # the job failed: one of its files is not there for the nodes
    assert mapped.job("caption-photos")["state"] == "failed"
    ours = mapped.answers("caption-photos")
    assert {n: _same(r) for n, r in ours.items() if n != "harbor.png"} == {
        n: v for n, v in expected.items() if n != "harbor.png"
    }
    assert str(node_view / "photos" / "harbor.png") in ours["harbor.png"]["error"]


def test_an_actor_that_cannot_load_the_model_is_reported_and_run_gives_up(cluster, heads, tmp_path, tiny_onnx):
    _media(tmp_path, many=2)
    env = Env(tmp_path, tiny_onnx)
    env.configure(cluster={"path_map": [f"{tiny_onnx}=/nonexistent/vlbatch-model"]}, give_up_seconds=5)
    env.drop("many.yaml", JOBS["many.yaml"])
    head = heads(env, cluster.address)
    assert head.wait(timeout=90) == 3, head.text()[-3000:]
    assert "gave up after" in head.text() and "no Ray actor could start" in head.text()
    assert (env.inbox / "many.yaml").exists()
    assert not list((env.jobs / "failed").iterdir()) and not list((env.jobs / "work").iterdir())
    assert env.job("many")["state"] not in ("done", "failed")
    actors = env.actors()
    assert len(actors) >= 4, actors  # each retry of the job asked the cluster for actors again
    for actor in actors:
        assert actor["state"] == "gone" and actor["node"] == HOST and actor["node_ip"], actor
        assert "/nonexistent/vlbatch-model" in actor["last_error"], actor
    status = CliRunner().invoke(main, ["--config", str(env.config_path), "status"])
    assert f"on {HOST} " in status.stdout and "last error: could not start" in status.stdout


def test_watch_waits_for_actors_that_can_load_the_model(cluster, heads, tmp_path, tiny_onnx):
    _media(tmp_path, many=2)
    node_model = tmp_path / "node-model"  # not there yet: every actor fails to load the model
    env = Env(tmp_path, tiny_onnx).configure(cluster={"path_map": [f"{tiny_onnx}={node_model}"]})
    env.drop("many.yaml", JOBS["many.yaml"])
    head = heads(env, cluster.address, command="watch")
    head.until(lambda: len([a for a in env.actors() if a["state"] == "gone"]) >= 4)  # two tries at least
    assert env.job("many")["state"] not in ("done", "failed")
    node_model.symlink_to(tiny_onnx)  # the node's model folder appears: the next try's actors load it
    head.until(lambda: (env.job("many") or {}).get("state") == "done", timeout=120)
    head.proc.send_signal(signal.SIGTERM)
    assert head.wait() == 0, head.text()[-3000:]
    assert len(env.answers("many")) == 2
    assert any(a["answers"] for a in env.actors())


def test_standing_jobs_under_a_ray_head_run_and_watch(cluster, heads, tmp_path, tiny_onnx):
    """A standing job's pass answers through the actors under `run --ray`, and `watch --ray` answers a photo
    dropped into its folder afterwards, each file once."""
    _media(tmp_path, many=4)
    env = Env(tmp_path, tiny_onnx).configure(cluster={})
    standing = env.jobs / "standing"
    standing.mkdir(parents=True)
    (standing / "folder.yaml").write_text(f"prompt: Caption.\ninputs: {tmp_path / 'media' / 'many'}\n")
    head = heads(env, cluster.address)
    assert head.wait() == 0, head.text()[-3000:]
    assert env.committed("folder") == 4
    watcher = heads(env, cluster.address, "watch")
    watcher.until(lambda: "event=standing.scanned" in watcher.text())
    env.image("many/late.png", 500, size=(64, 48))
    watcher.until(lambda: env.committed("folder") == 5, timeout=60)
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.wait() == 0, watcher.text()[-3000:]
    names = [Path(json.loads(r["media_paths"])[0]).name for r in env.rows("select media_paths from results")]
    assert sorted(names) == sorted([*(f"{i:02d}.png" for i in range(4)), "late.png"])
