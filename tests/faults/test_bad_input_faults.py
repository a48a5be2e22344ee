"""Bad files meet real worker processes: hostile job files, decoders that crash, hang or eat memory, a FIFO,
an image bomb, a model runtime that kills the worker, symlinks planted for the sidecar, and two files with one id."""

from __future__ import annotations

import os
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
from faultkit import assert_sound, fault_env, fault_image, reason, run, settled, wait_for
from PIL import Image
from spool_env import SpoolEnv

from batch.service.spool.spool import Spool
from batch.service.store.store import Store
from batch.service.worker.worker import Worker

pytestmark = pytest.mark.slow


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its pixel data is empty): what a bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_hostile_job_files_are_rejected_and_the_spool_goes_on(env: SpoolEnv):
    env.image("ok.png")
    env.drop("nested.yaml", "[" * 5000 + "\n")  # 5,000 levels: RecursionError in a plain safe_load
    env.drop("twice.yaml", "prompt: a\nprompt: b\ninputs: ../../media/ok.png\n")
    env.drop("tiles.yaml", "prompt: hi\ninputs: ../../media/ok.png\nmax_tiles: 5000\n")
    env.drop("frames.yaml", "prompt: hi\ninputs: ../../media/ok.png\nvideo_frames: 100000\n")
    env.drop("binary.yaml", "\x00\x01\x02 prompt")
    env.drop("good.yaml", "prompt: Describe.\ninputs: ../../media/ok.png\n")
    done = run(env, "run")
    assert done.returncode == 1, done.stderr
    final = settled(env)
    assert final["done"] == ["good.yaml"] and not final["inbox"] and not final["work"]
    assert sorted(final["rejected"]) == ["binary.yaml", "frames.yaml", "nested.yaml", "tiles.yaml", "twice.yaml"]
    assert "nested deeper than" in reason(env, "rejected", "nested.yaml")
    assert "duplicate key `prompt` on line 2" in reason(env, "rejected", "twice.yaml")
    assert "at most 40" in reason(env, "rejected", "tiles.yaml")
    assert "at most 64" in reason(env, "rejected", "frames.yaml")
    assert_sound(env)


def test_decoders_that_crash_hang_or_eat_memory_fail_only_their_file(env: SpoolEnv):
    env.write_config(media={"decode_timeout_seconds": 3, "decode_memory_mb": 1024})
    env.image("d/a.png", 1)
    fault_image(env.media / "d" / "b-segv.png", "segv")
    fault_image(env.media / "d" / "c-hang.png", "hang")
    fault_image(env.media / "d" / "d-alloc.png", "alloc")
    (env.media / "d" / "e-bomb.png").write_bytes(png_header(13000, 13000))  # 169 Mpx
    env.image("d/f.png", 2)
    env.drop("mixed.yaml", "prompt: Describe.\ninputs: ../../media/d/\n")
    started = time.monotonic()
    done = run(env, "run")
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert settled(env)["failed"] == ["mixed.yaml"]
    why = reason(env, "failed", "mixed.yaml")
    assert "b-segv.png: decoder crashed (SIGSEGV)" in why
    assert "c-hang.png: decoding timed out after 3 s" in why
    assert "d-alloc.png: decoding exceeded the 1024 MiB memory cap" in why
    assert "e-bomb.png: image is too large to decode safely" in why and "max_image_pixels" in why
    job = env.job("mixed")
    assert (job["answered"], job["failed_media"], job["attempts"]) == (2, 4, 1)  # a.png and f.png answered
    assert elapsed < 60, f"a run with one hanging decoder took {elapsed:.0f} s"
    assert "event=job.failed" in done.stderr
    assert_sound(env)


def test_a_media_file_swapped_for_a_fifo_after_the_check_fails_at_once(env: SpoolEnv):
    fault_image(env.media / "s" / "a-slow.png", "slow")  # two seconds of decoding: time to swap b.png
    env.image("s/b.png", 2)
    env.image("s/c.png", 3)
    env.drop("swap.yaml", "prompt: Describe.\ninputs: ../../media/s/\n")
    proc = env.spawn("run", log=env.root / "run.log", env=fault_env())
    wait_for(lambda: (env.job("swap") or {}).get("state") == "running", timeout=60)
    target = env.media / "s" / "b.png"
    target.unlink()
    os.mkfifo(target)  # a plain open() of this blocks until a writer comes: forever
    assert proc.wait(60) == 1
    why = reason(env, "failed", "swap.yaml")
    assert "b.png" in why and "FIFO" in why
    assert env.job("swap")["answered"] == 2
    assert_sound(env)


def test_a_unit_that_kills_the_worker_twice_is_skipped_on_the_next_attempt(env: SpoolEnv):
    env.image("k/a.png", 1)
    magenta = env.media / "k" / "b.png"
    Image.new("RGB", (448, 448), (255, 0, 255)).save(magenta)
    env.image("k/c.png", 3)
    env.drop("killer.yaml", "prompt: Describe.\ninputs: ../../media/k/\n")
    crash = {"FAULT_SUITE_CRASH_ON_MAGENTA": "1"}
    codes = [run(env, "run", **crash).returncode for _ in range(2)]
    assert codes == [-11, -11]  # SIGSEGV in the model runtime, twice, on the same file
    assert env.job("killer")["inflight_deaths"] == 1
    last = run(env, "run", **crash)
    assert last.returncode == 1, last.stderr
    why = reason(env, "failed", "killer.yaml")
    assert str(magenta) in why and "died 2 times" in why
    job = env.job("killer")
    assert (job["attempts"], job["answered"], job["failed_media"]) == (3, 2, 1)
    assert "event=job.failed" in last.stderr
    assert_sound(env)


def test_planted_symlinks_never_redirect_a_sidecar(env: SpoolEnv, tmp_path: Path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    env.image("p/a.png", 1)
    env.image("p/b.png", 2)
    # the temp name an older release used, and the sidecar's own name, both pointing outside the media roots
    for pid in range(os.getpid(), os.getpid() + 200):
        os.symlink(outside, env.media / "p" / f".a.txt.{pid}.tmp")
    os.symlink(outside, env.media / "p" / "b.txt")
    env.drop("side.yaml", "prompt: Describe.\ninputs: ../../media/p/\nsidecar: true\nsidecar_overwrite: true\n")
    assert run(env, "run").returncode == 0
    assert outside.read_text() == "precious"
    assert (env.media / "p" / "a.txt").read_text() and not (env.media / "p" / "a.txt").is_symlink()
    assert (env.media / "p" / "b.txt").is_symlink()  # left alone, with a warning
    assert_sound(env)


def test_two_files_with_one_id_never_run_as_one_job(env: SpoolEnv):
    env.image("t/a.png", 1)
    env.image("t/b.png", 2)
    env.drop("first.yaml", "id: same\nprompt: Describe.\ninputs: ../../media/t/\n")
    env.drop("second.yaml", "id: same\nprompt: Caption.\ninputs: ../../media/t/a.png\n")
    config = env.config()
    spool = Spool(config.spool.dir, config.spool.lease_seconds, config.spool.settle_seconds).ensure()
    first = spool.claim(spool.inbox / "first.yaml")
    store = Store(config.spool.database)
    # another worker is running `first.yaml`: its claim is held (this process's lease) and its row is running
    store.start_job("same", {"source": "first.yaml", "claim": first.path.name, "media_count": 2}, "elsewhere:1")
    worker = Worker(config, store, spool, lambda: None, "m")
    outcome = worker.take(spool.inbox / "second.yaml")
    assert outcome.state == "rejected" and "job id same is running now from first.yaml" in outcome.reason
    assert env.job("same")["state"] == "running" and env.job("same")["attempts"] == 1
    spool.release(first)
    store.close()
    worker.close()
    assert run(env, "run").returncode == 0
    job = env.job("same")
    assert job["state"] == "done" and job["answered"] + job["reused"] == job["media_count"] == 2
    assert_sound(env)


def test_a_hung_decoder_does_not_block_a_stop_signal(env: SpoolEnv):
    env.write_config(media={"decode_timeout_seconds": 30})
    fault_image(env.media / "h" / "a-hang.png", "hang")
    env.drop("hang.yaml", "prompt: Describe.\ninputs: ../../media/h/\n")
    proc = env.spawn("watch", log=env.root / "watch.log", env=fault_env())
    wait_for(lambda: (env.job("hang") or {}).get("state") == "running", timeout=60)
    log = env.root / "watch.log"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "event=worker.signal" in log.read_text(), timeout=10)
    proc.send_signal(signal.SIGTERM)  # the second signal hands the job back at once, decoder or not
    code = proc.wait(20)
    assert code == 0 and time.monotonic() - started < 20
    assert settled(env)["inbox"] == ["hang.yaml"]
    assert_sound(env)
