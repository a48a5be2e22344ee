"""Scale check: the skip-already-answered lookup with 1,000,000 result rows, and an inbox rescan of 10,000 files
(half of them with a `priority:` line: the first scan reads each file's head, later ones only what changed).

    python bench/spool_scale.py [--rows 1000000] [--files 10000]

Prints the median lookup time against the same lookup without the index (the baseline), the first scan's time
and the rescan time.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from batch.infer.settings import GenerationSettings, MediaSettings
from batch.service.spool.spool import Spool
from batch.service.store.records import cache_key
from batch.service.store.store import Store


def fill(store: Store, rows: int) -> list[str]:
    keys = []
    batch = []
    generation, media = GenerationSettings(), MediaSettings()
    for i in range(rows):
        key = cache_key([hashlib.sha256(str(i).encode()).hexdigest()], "Caption.", generation, media, "model@x")
        keys.append(key)
        batch.append({"job_id": f"job{i // 1000}", "cache_key": key, "prompt": "Caption.", "answer": f"answer {i}"})
        if len(batch) == 50_000:
            with store.atomic():
                store.db["results"].insert_all(batch)
            batch = []
    if batch:
        with store.atomic():
            store.db["results"].insert_all(batch)
    return keys


def time_lookups(store: Store, keys: list[str], n: int = 200) -> float:
    samples = []
    for key in keys[:: max(1, len(keys) // n)][:n]:
        t = time.perf_counter()
        assert store.previous_answer(key) is not None
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        t = time.perf_counter()
        keys = fill(store, args.rows)
        print(f"filled {args.rows:,} result rows in {time.perf_counter() - t:.1f} s")
        indexed = time_lookups(store, keys)
        store.db.execute("DROP INDEX idx_results_cache_key")
        baseline = time_lookups(store, keys, n=5)
        print(
            f"previous_answer lookup: {indexed:.3f} ms median with the index, {baseline:.1f} ms without "
            f"(x{baseline / indexed:.0f})"
        )
        store.close()

        spool = Spool(Path(tmp) / "spool").ensure()
        for i in range(args.files):
            priority = f"priority: {i % 7 - 3}\n" if i % 2 else ""
            (spool.inbox / f"job{i:05d}.yaml").write_text("prompt: hi\ninputs: x.png\n" + priority)
        old = time.time() - 60
        t = time.perf_counter()
        spool.pending(now=old + 3600)
        first = (time.perf_counter() - t) * 1e3
        print(f"first inbox scan of {args.files:,} files (each priority read): {first:.1f} ms")
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            ready, _ = spool.pending(now=old + 3600)
            samples.append(time.perf_counter() - t)
        assert len(ready) == args.files
        print(f"inbox rescan of {args.files:,} files: {statistics.median(samples) * 1e3:.1f} ms median of 5")


if __name__ == "__main__":
    main()
