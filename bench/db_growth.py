"""How the database grows over nights, measured on real files built by the store's own write paths.

For each kind of nightly job, builds a database with `Store` (start_job, add_result, link, save_standing,
finish_job: the calls the worker makes) over FILES synthetic files for NIGHTS nights, with NEW percent new files
a night and synthetic answers of about 300 characters (no model runs):
- standing: a standing job; night 1 answers every file, later nights only the new ones;
- nightly: a plain job file with the same id re-run every night over the whole folder (answers reused by cache
  key, every file linked each night).
Prints the bytes per file and per night measured (file size after a WAL checkpoint; dbstat per table), then
times `db prune` (keeping the last PRUNE nights), `db vacuum` and `db backup` on the nightly database, and
projects both kinds to 100,000 files x 365 nights with and without pruning (`maintenance.project`, the same
arithmetic as `vlbatch db size`).

    python bench/db_growth.py --files 10000 --nights 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.service.spool.states import JobState  # noqa: E402
from batch.service.store import maintenance  # noqa: E402
from batch.service.store.store import Store, utc_now  # noqa: E402

PROMPT = "Describe this photo in one or two sentences for a photo archive."
SETTINGS = json.dumps(
    {
        "GenerationSettings": {"max_new_tokens": 256, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None},
        "MediaSettings": {"image_size": 448, "max_tiles": 12, "use_thumbnail": True, "video_frames": 8},
    }
)
UNITS_PER_TRANSACTION = 1000


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(size)]


class Folder:
    """FILES synthetic photos and the ones that appear night after night: paths, hashes and answers."""

    def __init__(self, files: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary(self.rng)
        self.count = 0
        self.grow(files)

    def grow(self, count: int) -> list[int]:
        added = list(range(self.count, self.count + count))
        self.count += count
        return added

    @staticmethod
    def path(i: int) -> str:
        return f"/srv/photos/{2020 + i % 7}/d{i // 200:05d}/IMG_{i:06d}.jpg"

    @staticmethod
    def sha(i: int) -> str:
        return hashlib.sha256(f"photo {i}".encode()).hexdigest()

    def key(self, i: int) -> str:
        return hashlib.sha256(f"{self.sha(i)} {PROMPT} {SETTINGS}".encode()).hexdigest()

    def answer_row(self, i: int) -> dict[str, Any]:
        answer = " ".join(self.rng.choice(self.words) for _ in range(self.rng.randint(35, 60)))
        tokens = len(answer) // 4
        return {
            "media_paths": json.dumps([self.path(i)]),
            "media_sha256": json.dumps([self.sha(i)]),
            "cache_key": self.key(i),
            "prompt": PROMPT,
            "answer": answer.capitalize() + ".",
            "finish_reason": "stop",
            "prompt_tokens": 3100,
            "image_tokens": 3072,
            "output_tokens": tokens,
            "tiles": 12,
            "preprocess_ms": (preprocess := self.rng.uniform(20, 60)),
            "vit_ms": (vit := self.rng.uniform(800, 1200)),
            "prefill_ms": (prefill := self.rng.uniform(2000, 3000)),
            "ttft_ms": preprocess + vit + prefill + self.rng.uniform(5, 20),  # as batch/infer/timings.py defines it
            "decode_ms": self.rng.uniform(3000, 9000),
            "tokens_per_s": self.rng.uniform(8, 12),
            "backend": "axengine",
            "model_id": "InternVL3-2B-axmodel@3f2a9c1b7d4e",
            "settings": SETTINGS,
            "tags": json.dumps(["archive"]),
            "node": "ax650-01",
        }


def job_fields(job_id: str, standing: bool, media: int) -> dict[str, Any]:
    return {
        "source": f"/srv/vlbatch/jobs/{'standing' if standing else 'work'}/{job_id}.yaml",
        "job_sha256": hashlib.sha256(job_id.encode()).hexdigest(),
        "prompt": PROMPT,
        "mode": "each",
        "tags": json.dumps(["archive"]),
        "media_count": media,
        "claim": f"{job_id}.yaml.ax650-01.1234",
        "standing": int(standing),
    }


def standing_night(store: Store, folder: Folder, new: list[int]) -> None:
    """A standing job's pass: the new files answered, linked and tracked; the others left unread."""
    run_id, _ = store.start_job("archive", job_fields("archive", True, len(new)), "ax650-01:1234")
    for start in range(0, len(new), UNITS_PER_TRANSACTION):
        with store.atomic():
            for i in new[start : start + UNITS_PER_TRANSACTION]:
                store.add_result("archive", run_id, folder.answer_row(i))
    now = utc_now()
    rows = [
        {
            "job_id": "archive",
            "path": json.loads(link["media_paths"])[0],
            "size": 4_000_000,
            "mtime_ns": 1_700_000_000_000_000_000,
            "sha256": json.loads(link["media_sha256"])[0],
            "basis": "b" * 64,
            "cache_key": link["cache_key"],
            "result_id": link["result_id"],
            "link_id": link["link_id"],
            "state": "answered",
            "error_class": None,
            "first_seen_utc": now,
            "updated_utc": now,
            "run_id": run_id,
        }
        for link in store.run_links(run_id)
    ]
    store.save_standing(rows)
    store.finish_job("archive", JobState.DONE, counts={"new_failures": 0, "unchanged": folder.count - len(new)})


def plain_night(store: Store, folder: Folder) -> None:
    """A plain job over the whole folder: answers reused by cache key (a link each), new files answered."""
    run_id, _ = store.start_job("archive", job_fields("archive", False, folder.count), "ax650-01:1234")
    for start in range(0, folder.count, UNITS_PER_TRANSACTION):
        with store.atomic():
            for i in range(start, min(folder.count, start + UNITS_PER_TRANSACTION)):
                previous = store.previous_answer(folder.key(i))
                if previous is None:
                    store.add_result("archive", run_id, folder.answer_row(i))
                else:
                    paths, hashes = json.dumps([folder.path(i)]), json.dumps([folder.sha(i)])
                    store.link("archive", run_id, previous, paths, hashes, reused=True)
    store.finish_job("archive", JobState.DONE)


def file_size(store: Store) -> int:
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.path.stat().st_size


def build(path: Path, kind: str, files: int, nights: int, new_share: float) -> tuple[list[int], list[str]]:
    """The database of `kind` after each night: sizes after each night, and when each night started."""
    store = Store(path)
    folder = Folder(files)
    sizes, starts = [], []
    for night in range(nights):
        new = list(range(files)) if night == 0 else folder.grow(round(files * new_share))
        starts.append(utc_now())
        if kind == "standing":
            standing_night(store, folder, new)
        else:
            plain_night(store, folder)
        sizes.append(file_size(store))
    store.close()
    return sizes, starts


def run_row_bytes(path: Path, runs: int = 2000) -> float:
    """Bytes per `runs` row (with its indexes), from a database of `runs` runs that linked nothing."""
    store = Store(path)
    for _ in range(runs):
        store.start_job("quiet", job_fields("quiet", True, 0), "ax650-01:1234")
        store.finish_job("quiet", JobState.DONE, counts={"new_failures": 0, "unchanged": 100_000})
    store.close()
    return maintenance.row_costs(maintenance.measure(path)).run


def report_growth(kind: str, sizes: list[int], files: int, nights: int, new_share: float, build_s: float) -> None:
    per_night = (sizes[-1] - sizes[0]) / max(1, nights - 1)
    print(
        f"{kind:<9} night 1: {maintenance.human_bytes(sizes[0])} ({sizes[0] / files:,.0f} bytes per file); "
        f"later nights +{maintenance.human_bytes(per_night)} each ({round(files * new_share):,} new files); "
        f"after {nights}: {maintenance.human_bytes(sizes[-1])} (built in {build_s:.0f} s)"
    )


def measure_prune_vacuum_backup(path: Path, cutoff: str, keep: int) -> None:
    """`db prune` to the last `keep` nights, `db vacuum`, `db backup`, on a copy built like the nightly one."""
    store = Store(path)
    before = maintenance.file_bytes(path)[0]
    report = maintenance.prune(store, cutoff, delete=True)
    store.close()
    print(
        f"prune to the last {keep} nights: {report.runs} runs, {report.job_results:,} links, {report.results:,} "
        f"answers deleted in {report.seconds:.1f} s ({report.batches} transactions, the longest holding the write "
        f"lock {report.longest_batch_ms:.0f} ms)"
    )
    vacuumed = maintenance.vacuum(path, 30.0)
    print(
        f"vacuum: {maintenance.human_bytes(before)} -> {maintenance.human_bytes(vacuumed.bytes_after)} "
        f"in {vacuumed.seconds:.1f} s"
    )
    copy = maintenance.backup(path, path.with_name("backup.db"))
    print(f"backup: {maintenance.human_bytes(copy.bytes)} copied and checked in {copy.seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--new", type=float, default=1.0, help="new files a night, percent of --files")
    parser.add_argument("--prune-keep", type=int, default=3, help="nights the measured prune keeps")
    parser.add_argument("--project-files", type=int, default=100_000)
    parser.add_argument("--project-nights", type=int, default=365)
    parser.add_argument("--prune-days", type=int, default=90)
    args = parser.parse_args()
    share = args.new / 100
    with tempfile.TemporaryDirectory(prefix="db-growth-") as tmp:
        costs = {}
        for kind in ("standing", "nightly"):
            path = Path(tmp) / f"{kind}.db"
            started = time.perf_counter()
            sizes, starts = build(path, kind, args.files, args.nights, share)
            report_growth(kind, sizes, args.files, args.nights, share, time.perf_counter() - started)
            costs[kind] = maintenance.row_costs(maintenance.measure(path))
            if kind == "nightly":
                measure_prune_vacuum_backup(path, starts[args.nights - args.prune_keep], args.prune_keep)
        # links from the nightly database (most links), answers and tracked files from the standing one
        merged = maintenance.RowCosts(
            run=run_row_bytes(Path(tmp) / "runs.db"),
            link=costs["nightly"].link,
            result=costs["standing"].result,
            standing_file=costs["standing"].standing_file,
        )
        print(
            f"bytes per row: run {merged.run:.0f}, link {merged.link:.0f}, answer {merged.result:.0f} "
            f"(with its full-text index), tracked file {merged.standing_file:.0f}"
        )
        print(
            f"projection: {args.project_files:,} files, {args.project_nights} nights, {args.new:g}% new files a night"
        )
        for p in maintenance.project(merged, args.project_files, args.project_nights, share, args.prune_days):
            print(f"  {p.what:<58}{maintenance.human_bytes(p.bytes):>11}  ({p.runs:,} runs, {p.links:,} links)")


if __name__ == "__main__":
    main()
