"""How soon a photo copied into a standing job's folder is answered under `vlbatch watch`.

Starts a real `vlbatch watch` on a temporary spool with one standing job over a folder, copies photos into the
folder one at a time (each written under its final name and closed, as `cp` does), and measures the seconds from
the end of each copy to its answer row in the database. Prints each latency and the median.

    python bench/watch_latency.py --model models/tiny-onnx --photos 20
"""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synthetic import synthetic_image  # noqa: E402


def answered(db: Path, name: str) -> bool:
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT 1 FROM job_results WHERE media_paths LIKE ? AND change IS NULL", [f'%/{name}"]']
            ).fetchone()
    except sqlite3.OperationalError:
        return False
    return row is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-onnx")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--settle", type=float, default=0.5, help="spool.settle_seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="watch-latency-") as tmp:
        root = Path(tmp)
        drop, staged = root / "photos", root / "staged"
        drop.mkdir()
        staged.mkdir()
        (root / "config.yaml").write_text(
            f"model:\n  dir: {args.model.resolve()}\ngeneration:\n  max_new_tokens: 16\n"
            f"spool:\n  dir: jobs\n  database: vlbatch.db\n  media_roots: [photos]\n"
            f"  settle_seconds: {args.settle}\n  rescan_seconds: 5\n"
        )
        (root / "jobs" / "standing").mkdir(parents=True)
        (root / "jobs" / "standing" / "drop.yaml").write_text(
            f"prompt: Caption it.\ninputs: {drop}\nmax_tiles: 1\nsidecar: true\n"
        )
        for i in range(args.photos):
            out = io.BytesIO()
            synthetic_image(640, 480, seed=i).save(out, "JPEG", quality=90)
            (staged / f"p{i:03d}.jpg").write_bytes(out.getvalue())
        log = root / "watch.log"
        command = [str(Path(sys.executable).parent / "vlbatch"), "--config", str(root / "config.yaml"), "watch"]
        with open(log, "w") as err:
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        latencies = []
        try:
            while "event=standing.scanned" not in log.read_text():
                if proc.poll() is not None:
                    raise SystemExit(log.read_text())
                time.sleep(0.05)
            for path in sorted(staged.iterdir()):
                shutil.copyfile(path, drop / path.name)
                copied = time.perf_counter()
                while not answered(root / "vlbatch.db", path.name):
                    time.sleep(0.01)
                latencies.append(time.perf_counter() - copied)
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        print("latency per photo (s): " + ", ".join(f"{s:.2f}" for s in latencies))
        print(
            f"median {statistics.median(latencies):.2f} s, min {min(latencies):.2f} s, max {max(latencies):.2f} s "
            f"over {len(latencies)} photos (settle_seconds {args.settle})"
        )


if __name__ == "__main__":
    main()
