"""Batch throughput: N one-image caption jobs through one `vlbatch run`, against one process per job.

    python bench/batch_throughput.py MODEL_DIR [--jobs 100] [--per-process-jobs 10] [--threads 2]

One process per job is how the upstream demo works: every question pays the start-up and the model load.
Both sides use the same model folder and backend; the per-process side runs `--per-process-jobs` of the jobs
and its rate is applied to all N. Also prints the worker's overhead: the share of the run's wall time (after
the model has loaded) not spent in preprocessing, the ViT, prefill or decode.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlite_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synthetic import synthetic_image  # noqa: E402

from batch.service.store.records import DECODE_SHARE_MS  # noqa: E402

PROMPT = "Write a one-sentence caption for this photo."


def vlbatch() -> list[str]:
    script = Path(sys.executable).parent / "vlbatch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--per-process-jobs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "media").mkdir()
        (root / "jobs" / "inbox").mkdir(parents=True)
        (root / "config.yaml").write_text(
            f"model:\n  dir: {args.model_dir.resolve()}\n  threads: {args.threads}\n"
            f"generation:\n  max_new_tokens: {args.max_new_tokens}\n"
            "media:\n  max_tiles: 1\nspool:\n  media_roots: [media]\n  settle_seconds: 0\n"
        )
        images = []
        for i in range(args.jobs):
            image = root / "media" / f"{i:04d}.jpg"
            synthetic_image(448, 448, seed=i).save(image)
            images.append(image)
            (root / "jobs" / "inbox" / f"job{i:04d}.yaml").write_text(f"prompt: {PROMPT}\ninputs: {image}\n")

        started = time.perf_counter()
        proc = subprocess.run(
            [*vlbatch(), "--config", str(root / "config.yaml"), "run"], capture_output=True, text=True, check=True
        )
        worker_s = time.perf_counter() - started
        load_ms = float(re.search(r"event=model.loaded \S+ ms=([\d.]+)", proc.stderr).group(1))
        db = sqlite_utils.Database(root / "vlbatch.db")
        # each answer's own stages (ttft_ms holds its preprocessing), its decode steps counted once per batch
        model_ms = db.execute(
            f"select sum(ttft_ms + {DECODE_SHARE_MS}), count(*) from results where error is null"
        ).fetchone()
        served = worker_s * 1e3 - load_ms
        overhead = (served - model_ms[0]) / served

        k = min(args.per_process_jobs, args.jobs)
        started = time.perf_counter()
        for image in images[:k]:
            subprocess.run(
                [
                    *vlbatch(),
                    "ask",
                    "--model",
                    str(args.model_dir),
                    "--threads",
                    str(args.threads),
                    "--max-tiles",
                    "1",
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                    "-p",
                    PROMPT,
                    str(image),
                ],
                capture_output=True,
                check=True,
            )
        per_process_s = (time.perf_counter() - started) / k * args.jobs

    print(f"{args.jobs} one-image jobs, model {args.model_dir.name}, {args.threads} threads")
    print(
        f"one worker:        {worker_s:8.1f} s  ({args.jobs / worker_s:.2f} jobs/s; model load {load_ms / 1e3:.1f} s)"
    )
    print(f"process per job:   {per_process_s:8.1f} s  ({args.jobs / per_process_s:.2f} jobs/s; from {k} jobs)")
    print(f"throughput ratio:  {per_process_s / worker_s:8.1f}x")
    print(f"worker overhead:   {overhead * 100:8.2f} % of the time after the model loaded ({model_ms[1]} answers)")


if __name__ == "__main__":
    main()
