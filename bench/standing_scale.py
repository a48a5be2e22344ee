"""How a standing job over a large folder starts: a cron pass over unchanged files, and `vlbatch watch` start-up.

Makes FILES small files in FOLDERS subfolders (names only matter: unchanged files are never read), records them
as already answered in the standing job's index (what a first night leaves behind), then measures with real
processes:
- `vlbatch run`: wall time and peak RSS of a pass that finds nothing new (it must not load the model);
- `vlbatch watch`: time until its first full pass is done and every folder is watched, and its peak RSS then.

    python bench/standing_scale.py --files 100000 --folders 5000 --model models/tiny-onnx
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(root: Path, files: int, folders: int, model: Path) -> Path:
    """The spool, config, folder tree and the standing job's index as a first night leaves them."""
    from batch.config import load_config
    from batch.infer.runtime.select import model_identity
    from batch.service.spool.jobfile import parse_job
    from batch.service.store.records import cache_key
    from batch.service.store.store import Store, utc_now

    photos = root / "photos"
    for i in range(folders):
        (photos / f"d{i:05d}").mkdir(parents=True)
    paths = []
    for i in range(files):
        path = photos / f"d{i % folders:05d}" / f"p{i:06d}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xd9")
        paths.append(path)
    config = root / "config.yaml"
    config.write_text(
        f"model:\n  dir: {model}\nspool:\n  dir: jobs\n  database: vlbatch.db\n  media_roots: [photos]\n"
        "  settle_seconds: 0.5\n  rescan_seconds: 5\n"
    )
    standing = root / "jobs" / "standing"
    standing.mkdir(parents=True)
    job_file = standing / "nightly.yaml"
    job_file.write_text(f"id: nightly\nprompt: Caption it.\ninputs: {photos}\nmax_tiles: 1\n")
    settings = load_config(config)
    job = parse_job(
        job_file,
        allowed_roots=list(settings.spool.media_roots),
        generation=settings.generation,
        media=settings.media,
        base_dir=standing,
        standing=True,
        resolve_media=False,
    )
    basis = cache_key([], job.prompt, job.generation, job.media_settings, model_identity(model))
    store = Store(settings.spool.database)
    now = utc_now()
    rows = []
    for path in paths:
        info = os.stat(path)
        rows.append(
            {
                "job_id": "nightly",
                "path": str(path.resolve()),
                "size": info.st_size,
                "mtime_ns": info.st_mtime_ns,
                "sha256": "0" * 64,
                "basis": basis,
                "state": "answered",
                "first_seen_utc": now,
                "updated_utc": now,
            }
        )
    store.db["standing_files"].insert_all(rows, batch_size=5000)
    store.close()
    return config


def vlbatch(config: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "vlbatch"), "--config", str(config)]


def cron_pass(config: Path) -> tuple[float, float, str]:
    started = time.perf_counter()
    done = subprocess.run([*vlbatch(config), "run"], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0 or "model.loaded" in done.stderr:
        raise SystemExit(f"the cron pass did not do what it should (exit {done.returncode}):\n{done.stderr[-3000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak_mb, done.stderr


def watch_start(config: Path, log: Path) -> tuple[float, float, str]:
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([*vlbatch(config), "watch"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 1800
        while "event=standing.scanned" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"watch did not finish its first pass:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak_mb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return wall, peak_mb, log.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=5_000)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-onnx")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="standing-scale-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        config = build(root, args.files, args.folders, args.model.resolve())
        took = time.perf_counter() - started
        print(f"made {args.files:,} files in {args.folders:,} folders and their index in {took:.1f} s")
        wall, peak, _ = cron_pass(config)
        print(f"vlbatch run, nothing new:   {wall:6.1f} s wall, peak RSS {peak:6.0f} MB (model not loaded)")
        wall, peak, text = watch_start(config, root / "watch.log")
        polled = text.count("event=watch.polling")
        print(
            f"vlbatch watch, first pass:  {wall:6.1f} s wall (model load included), RSS {peak:6.0f} MB, "
            f"{args.folders + 1:,} folders watched{f', {polled} left to rescans' if polled else ''}"
        )
        scanned = re.search(r"event=standing.scanned .*", text)
        print(scanned.group(0) if scanned else "")


if __name__ == "__main__":
    main()
