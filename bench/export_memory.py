"""Memory of `vlbatch results` exports: every machine format over 100,000 answers, against 1,000.

    python bench/export_memory.py [--rows 100000] [--small 1000] [--jobs 10]

Builds a database with the real schema (the migrations of `Store`) holding ROWS synthetic answers of JOBS folder
jobs (answers of about 200 characters, their links, runs and jobs rows, the full-text index kept by its
triggers), then runs `vlbatch results --format FORMAT -n 0` in a child process for json, jsonl, csv and
openai-batch, and again with `-n SMALL`. Prints the rows each wrote (counted from its output), the seconds, and
the peak resident memory of the export process itself (its rusage, read by a small launcher); the ratio of the
two peaks shows whether memory grows with the rows written. Then the time of `-s` with a word no answer holds
(a literal search reads every answer), against a query that matches none without reading them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from batch.service.store.store import Store

FORMATS = ("json", "jsonl", "csv", "openai-batch")
WORDS = "harbour boat morning light quay crane gull rope water cloud stone people bicycle market".split()
SETTINGS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "max_tiles": 6, "video_frames": 8}


def fill(db_path: Path, rows: int, jobs: int) -> None:
    """ROWS answers spread over JOBS done folder jobs, one run each; half the jobs carry a request custom_id."""
    store = Store(db_path)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    per_job = -(-rows // jobs)
    result_id = 0
    for j in range(jobs):
        job_id = f"folder-{j:02d}"
        count = min(per_job, rows - result_id)
        tags = {"openai_custom_id": f"req-{j}", "openai_batch": "bench.jsonl"} if j % 2 else ["bench", f"set-{j}"]
        run = {  # the fields a run and its job share
            "source": f"{job_id}.yaml",
            "prompt": "Caption.",
            "mode": "each",
            "tags": json.dumps(tags),
            "state": "done",
            "attempts": 1,
            "media_count": count,
            "answered": count,
            "reused": 0,
            "failed_media": 0,
            "standing": 0,
            "started_utc": _utc(start),
            "finished_utc": _utc(start + timedelta(hours=1)),
        }
        with store.atomic():
            run_id = store.db["runs"].insert({"job_id": job_id, **run}).last_pk
            store.db["jobs"].insert({"id": job_id, "run_id": run_id, "created_utc": _utc(start), **run})
        for first in range(0, count, 20_000):
            answers, links = [], []
            for i in range(first, min(count, first + 20_000)):
                result_id += 1
                answers.append(_answer(result_id, job_id, i, tags, start))
                links.append(_link(result_id, job_id, run_id, answers[-1]))
            with store.atomic():
                store.db["results"].insert_all(answers)
                store.db["job_results"].insert_all(links)
    store.close()


def _answer(result_id: int, job_id: str, i: int, tags: object, start: datetime) -> dict:
    path = f"/srv/photos/{job_id}/{2020 + i % 7}/IMG_{i:06d}.jpg"
    sha = hashlib.sha256(path.encode()).hexdigest()
    words = [WORDS[(result_id * 7 + k * 3) % len(WORDS)] for k in range(30)]
    return {
        "id": result_id,
        "media_paths": json.dumps([path]),
        "answer": " ".join(words).capitalize() + ".",
        "error": None,
        "prompt": "Write a one-sentence caption for this photo.",
        "job_id": job_id,
        "created_utc": _utc(start + timedelta(seconds=result_id)),
        "media_sha256": json.dumps([sha]),
        "cache_key": hashlib.sha256(f"{sha}/key".encode()).hexdigest(),
        "finish_reason": "stop",
        "prompt_tokens": 300,
        "image_tokens": 256,
        "output_tokens": 42,
        "tiles": 2,
        "preprocess_ms": 12.5,
        "vit_ms": 410.0,
        "prefill_ms": 220.0,
        "ttft_ms": 650.0,
        "decode_ms": 4100.0,
        "tokens_per_s": 10.2,
        "backend": "onnxruntime",
        "model_id": "InternVL3-2B@bench",
        "settings": json.dumps(SETTINGS),
        "tags": json.dumps(tags),
        "node": "bench",
    }


def _link(result_id: int, job_id: str, run_id: int, answer: dict) -> dict:
    return {
        "job_id": job_id,
        "run_id": run_id,
        "result_id": result_id,
        "reused": 0,
        "media_paths": answer["media_paths"],
        "media_sha256": answer["media_sha256"],
        "linked_utc": answer["created_utc"],
    }


def _utc(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def write_config(folder: Path) -> Path:
    (folder / "media").mkdir(exist_ok=True)
    config = folder / "config.yaml"
    config.write_text("spool:\n  dir: jobs\n  database: vlbatch.db\n  media_roots: [media]\n")
    return config


# Linux counts the memory a process had before exec into its peak: a child forked from this (large) process would
# report this one's size. A small launcher starts the export instead and reports the export's own peak.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(f"maxrss_kib={usage.ru_maxrss} exit={os.waitstatus_to_exitcode(status)}", file=sys.stderr)
"""


def export(config: Path, fmt: str, limit: int, out: Path, *more: str) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of one `vlbatch results` process, its stdout written to `out`."""
    command = [sys.executable, "-m", "batch", "--config", str(config), "--log-level", "warning", "results"]
    command += ["--format", fmt, "-n", str(limit), *more]
    with open(out, "wb") as stdout:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], stdout=stdout, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - started
    report = done.stderr.decode().strip().splitlines()[-1]
    fields = dict(part.split("=") for part in report.split())
    if fields.get("exit") != "0":
        raise SystemExit(f"vlbatch results --format {fmt} failed: {done.stderr.decode()}")
    return seconds, int(fields["maxrss_kib"])


def rows_in(path: Path, fmt: str) -> int:
    if fmt == "json":
        with open(path, encoding="utf-8") as handle:
            return len(json.load(handle))
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return sum(1 for _ in csv.reader(handle)) - 1  # the header
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder)
        started = time.perf_counter()
        fill(folder / "vlbatch.db", args.rows, args.jobs)
        size = (folder / "vlbatch.db").stat().st_size / 2**20
        seconds = time.perf_counter() - started
        print(f"filled {args.rows:,} answers of {args.jobs} jobs in {seconds:.1f} s ({size:.0f} MiB)")
        small = f"-n {args.small:,}"
        print(f"{'format':<13} {'rows':>8} {'seconds':>8} {'MiB out':>8} {'peak RSS':>10}   {small:>12}  ratio")
        for fmt in FORMATS:
            out = folder / f"out.{fmt}"
            seconds, peak = export(config, fmt, 0, out)
            written, megabytes = rows_in(out, fmt), out.stat().st_size / 2**20
            _, small_peak = export(config, fmt, args.small, folder / "small.out")
            assert rows_in(folder / "small.out", fmt) == min(args.small, args.rows)
            print(
                f"{fmt:<13} {written:>8,} {seconds:>8.1f} {megabytes:>8.1f} {peak / 1024:>6.1f} MiB"
                f"   {small_peak / 1024:>8.1f} MiB  {peak / small_peak:.2f}"
            )
        # -s reads every answer in scope (a literal search is a scan): a word no answer holds, against no search
        searched, _ = export(config, "jsonl", 0, folder / "search.out", "-s", "zeppelin-nowhere")
        assert rows_in(folder / "search.out", "jsonl") == 0
        baseline, _ = export(config, "jsonl", 0, folder / "none.out", "--tag", "no-such-tag")
        print(f"-s over {args.rows:,} answers, none matching: {searched:.2f} s; --tag matching none: {baseline:.2f} s")


if __name__ == "__main__":
    main()
