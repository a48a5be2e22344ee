"""How fast a running `vlbatch watch` obeys the operator: pause, resume, cancel, and a job of higher priority.

Starts a real `vlbatch watch` on a temporary spool and, for each round, drops a long job (`--files` photos of
900x600) and waits for its first answers, then measures:
- pause: from the request (what `vlbatch pause` writes) to the worker's row saying `paused` (it finishes the
  file it is on first), and resume: from the request to the next answer;
- cancel: from the request (what `vlbatch cancel` writes) to the job file in `cancelled/`;
- pre-emption: from dropping a one-photo job with `priority: 10` to its answer, against the time the long job
  still needed (what the photo would have waited without priority).

    python bench/control_latency.py --model models/tiny-onnx --rounds 5
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synthetic import synthetic_image  # noqa: E402

from batch.config import load_config  # noqa: E402
from batch.service.worker.control import PAUSE, RESUME, ask_workers, cancel_jobs  # noqa: E402

VLBATCH = str(Path(sys.executable).parent / "vlbatch")


def until(predicate: Callable[[], object], timeout: float = 300.0) -> float:
    """Poll `predicate` every 10 ms; the time.perf_counter() at which it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {predicate}")
        time.sleep(0.01)
    return time.perf_counter()


class Site:
    """A temporary spool, its database and its config, with one `vlbatch watch` on it."""

    def __init__(self, root: Path, model: Path, beat: float, files: int) -> None:
        self.root = root
        self.config = root / "config.yaml"
        self.db = root / "vlbatch.db"
        self.inbox = root / "jobs" / "inbox"
        self.inbox.mkdir(parents=True)
        (root / "media" / "long").mkdir(parents=True)
        self.config.write_text(
            f"model:\n  dir: {model.resolve()}\ngeneration:\n  max_new_tokens: 48\n"
            "spool:\n  dir: jobs\n  database: vlbatch.db\n  media_roots: [media]\n  settle_seconds: 0.2\n"
            f"  rescan_seconds: 1\n  heartbeat_seconds: {beat}\n"
        )
        for i in range(files):
            synthetic_image(900, 600, seed=i).save(root / "media" / "long" / f"{i:03d}.png")
        synthetic_image(640, 480, seed=999).save(root / "media" / "urgent.png")
        self.log = root / "watch.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [VLBATCH, "--config", str(self.config), "watch"], stdout=subprocess.DEVNULL, stderr=err
            )

    def ask(self, request: str) -> float:
        """`vlbatch pause` or `resume`, in this process (a command's own start-up is not measured)."""
        ask_workers(load_config(self.config, environ={}), request, [])
        return time.perf_counter()

    def cancel(self, job_id: str) -> float:
        (done,) = cancel_jobs(load_config(self.config, environ={}), [job_id])
        assert done["ok"], done
        return time.perf_counter()

    def drop(self, name: str, text: str) -> float:
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(text)
        os.rename(tmp, self.inbox / name)
        return time.perf_counter()

    def value(self, sql: str, *args: object) -> object:
        try:
            with sqlite3.connect(self.db) as conn:
                row = conn.execute(sql, args).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def worker_state(self, worker: str) -> object:
        return self.value("SELECT state FROM workers WHERE id = ?", worker)

    def answers(self, job_id: str) -> int:
        return int(self.value("SELECT count(*) FROM job_results WHERE job_id = ?", job_id) or 0)

    def long_job(self, job_id: str) -> None:
        """A job over every long photo, asked anew (its own prompt: no stored answer is reused)."""
        self.drop(f"{job_id}.yaml", f"id: {job_id}\nprompt: Describe ({job_id}).\ninputs: ../../media/long/\n")
        until(lambda: self.answers(job_id) >= 2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-onnx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=60, help="photos in the long job")
    parser.add_argument("--beat", type=float, default=5.0, help="spool.heartbeat_seconds")
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"pause": [], "resume": [], "cancel": [], "urgent": [], "waited": []}
    with tempfile.TemporaryDirectory(prefix="control-latency-") as tmp:
        site = Site(Path(tmp), args.model, args.beat, args.files)
        worker = f"{os.uname().nodename}:{site.proc.pid}"
        try:
            for n in range(args.rounds):
                site.long_job(f"paused{n}")
                asked = site.ask(PAUSE)
                figures["pause"].append(until(lambda: site.worker_state(worker) == "paused") - asked)
                held = site.answers(f"paused{n}")
                asked = site.ask(RESUME)
                figures["resume"].append(until(lambda: site.answers(f"paused{n}") > held) - asked)  # noqa: B023
                until(lambda: (site.root / "jobs" / "done" / f"paused{n}.yaml").exists())  # noqa: B023

                site.long_job(f"cancelled{n}")
                asked = site.cancel(f"cancelled{n}")
                moved = site.root / "jobs" / "cancelled" / f"cancelled{n}.yaml"
                figures["cancel"].append(until(moved.exists) - asked)

                site.long_job(f"backfill{n}")
                urgent = f"urgent{n}"
                job = f"prompt: Caption ({urgent}).\ninputs: ../../media/urgent.png\npriority: 10\n"
                dropped = site.drop(f"{urgent}.yaml", job)
                answered = until(lambda: site.answers(urgent) >= 1)  # noqa: B023
                figures["urgent"].append(answered - dropped)
                # the rest of the long job: what the photo would have waited for without its priority
                figures["waited"].append(until((site.root / "jobs" / "done" / f"backfill{n}.yaml").exists) - answered)
        finally:
            site.stop()
            if os.environ.get("SHOW_LOG"):
                print(site.log.read_text())
    print(f"{args.rounds} rounds, {args.files} photos of 900x600 per long job, heartbeat_seconds {args.beat:g}:")
    for name, what in [
        ("pause", "pause -> the worker says paused"),
        ("resume", "resume -> its next answer"),
        ("cancel", "cancel -> the job file in cancelled/"),
        ("urgent", "a priority-10 photo dropped during a long job -> its answer"),
        ("waited", "what it would have waited for the long job without priority"),
    ]:
        values = figures[name]
        print(f"  {what}: median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
