"""vlbatch's jobs answered by the real llama-server (`make llama-server`) serving the tiny InternVL model: folder,
`together`, video and text jobs through `vlbatch run`, their records (answers, usage, timings, who answered),
reuse, and the server killed mid-answer and started again. tests/test_model_server.py covers the faults a real
server will not produce on demand (429, 503, garbage) with a stub."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from spool_env import SpoolEnv, wait_for
from synthetic import synthetic_image, write_video

if TYPE_CHECKING:
    from llama_server import LlamaServer

pytest_plugins = ["llama_server"]
pytestmark = pytest.mark.slow

IMAGE_TOKENS = 256  # one tile of the tiny model


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}


def _run(env: SpoolEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(env.cli(*args), capture_output=True, text=True, env=_environ(), cwd=env.root, timeout=300)


@pytest.fixture
def env(tmp_path: Path, llama_server: LlamaServer) -> SpoolEnv:
    env = SpoolEnv(tmp_path, tmp_path / "no-model-folder")
    model = {"backend": "openai", "url": llama_server.url, "concurrency": 2, "timeout_seconds": 60}
    env.write_config(model=model, give_up_seconds=120, heartbeat_seconds=0.5)
    for n in range(3):
        env.image(f"photo{n}.jpg", seed=n)
    return env


def test_folder_together_video_and_text_jobs(env: SpoolEnv, llama_server: LlamaServer):
    (env.media / "clips").mkdir()
    write_video(env.media / "clips" / "clip.mp4", [np.asarray(synthetic_image(96, 64, seed=s)) for s in range(12)])
    env.drop("folder.yaml", "prompt: Describe the photo.\ninputs: ../../media/photo*.jpg\n")
    env.drop(
        "pair.yaml", "prompt: Compare.\ninputs: [../../media/photo0.jpg, ../../media/photo1.jpg]\nmode: together\n"
    )
    env.drop("clip.yaml", "prompt: What happens?\ninputs: ../../media/clips/clip.mp4\nvideo_frames: 3\n")
    env.drop("text.yaml", "prompt: Say hello.\n")
    done = _run(env, "run")
    assert done.returncode == 0, done.stderr + llama_server.log_tail()
    rows = {(r["job_id"], tuple(Path(p).name for p in json.loads(r["media_paths"]))): r for r in env.results()}
    assert sorted(rows) == sorted(
        [("folder", (f"photo{n}.jpg",)) for n in range(3)]
        + [("pair", ("photo0.jpg", "photo1.jpg")), ("clip", ("clip.mp4",)), ("text", ())]
    )
    host = llama_server.url.removeprefix("http://")
    for (job, files), row in rows.items():
        assert row["error"] is None and row["answer"], (job, row)
        assert row["backend"] == "openai" and row["node"] == host and row["model_id"].startswith("model.gguf@")
        assert row["finish_reason"] in ("stop", "length") and 1 <= row["output_tokens"] <= 12
        images = 3 if job == "clip" else len(files)
        assert row["tiles"] == images
        # the prompt the server counted: the images' tokens (its tiling adds an overview tile only past one tile)
        assert row["prompt_tokens"] >= IMAGE_TOKENS * images + 10
        assert row["ttft_ms"] >= row["prefill_ms"] > 0 and row["decode_ms"] >= 0
    # the same jobs again: every answer reused (a request would have stored a new answer)
    for name in ("folder", "pair", "clip", "text"):
        env.drop(f"{name}-again.yaml", (env.jobs / "done" / f"{name}.yaml").read_text())
    again = _run(env, "run")
    assert again.returncode == 0 and "answer.done" not in again.stderr
    assert len(env.results()) == 6


def test_the_server_killed_mid_answer_and_restarted_loses_nothing_and_doubles_nothing(
    env: SpoolEnv, llama_server: LlamaServer, tmp_path: Path
):
    for n in range(3, 8):
        env.image(f"photo{n}.jpg", seed=n)
    env.write_config(
        model={"backend": "openai", "url": llama_server.url, "concurrency": 2, "timeout_seconds": 60},
        give_up_seconds=120,
        heartbeat_seconds=0.5,
    )
    (env.root / "config.yaml").write_text(
        (env.root / "config.yaml").read_text().replace("max_new_tokens: 12", "max_new_tokens: 400\n  ignore_eos: true")
    )
    env.drop("long.yaml", "prompt: Describe the photo at length.\ninputs: ../../media/\n")
    worker = env.spawn("run", log=tmp_path / "run.log", env=_environ())
    try:
        wait_for(lambda: len(env.results()) >= 1, timeout=180)
        llama_server.kill()  # mid-answer: the answers in flight are cut off
        time.sleep(2)
        llama_server.start()
        assert worker.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
        if not llama_server.running():
            llama_server.start()
    rows = env.results()
    names = [Path(json.loads(r["media_paths"])[0]).name for r in rows]
    assert sorted(names) == sorted(f"photo{n}.jpg" for n in range(8))  # every photo answered, each once
    assert all(r["error"] is None and r["output_tokens"] == 400 for r in rows)
    log = (tmp_path / "run.log").read_text()
    assert "asking again" in log  # the cut answers were asked for again
