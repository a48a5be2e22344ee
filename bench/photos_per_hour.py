"""Photos per hour through the worker: one caption job over N photos, one `vlbatch run`.

    python bench/photos_per_hour.py MODEL_DIR [--photos 20] [--max-tiles 1] [--max-new-tokens 64] [--threads 2]

Writes N synthetic 2048x1536 (4:3) photos and one job (mode each) captioning them greedily, runs the worker once
over it, and prints the wall time, the model's load time and photos per hour after the load, with the stages'
shares from the answers stored (preparation, ViT, prefill, decode). Run it before and after a change on the same
machine; the answers are the same both times (greedy), so only the speed differs. `write_photos` and
`worker_photos` are the same run for other scripts (bench/run_bench.py's photo case against llama.cpp).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlite_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from batch_throughput import vlbatch  # noqa: E402
from synthetic import synthetic_image  # noqa: E402

from batch.service.store.records import DECODE_SHARE_MS, DECODE_TOKENS  # noqa: E402

PROMPT = "Write a caption for this photo."
PHOTO_SIZE = (2048, 1536)


def write_photos(folder: Path, n: int) -> list[Path]:
    """N synthetic 4:3 photos, NNNN.jpg (seeds 0..N-1), in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        synthetic_image(*PHOTO_SIZE, seed=i).save(path, quality=90)
    return paths


def worker_photos(
    model_dir: Path,
    photos: Path,
    max_tiles: int = 1,
    max_new_tokens: int = 64,
    threads: int = 2,
    ignore_eos: bool = False,
    prompt: str = PROMPT,
    batch: int | None = None,
    server: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """One `vlbatch run` captioning every photo in `photos` (one job): wall and load time, photos per hour after
    the load, tiles per photo and the stages per photo from the answers stored; exits if the worker fails.

    With `server` (url, concurrency), a model server answers (model.backend openai; its model is loaded before)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jobs" / "inbox").mkdir(parents=True)
        photos = photos.resolve()
        generation = f"  max_new_tokens: {max_new_tokens}\n  temperature: 0\n"
        if ignore_eos:
            generation += "  ignore_eos: true\n"
        model = f"  dir: {model_dir.resolve()}\n  threads: {threads}\n"
        if server is not None:
            model = f"  backend: openai\n  url: {server[0]}\n  concurrency: {server[1]}\n  timeout_seconds: 1800\n"
        (root / "config.yaml").write_text(
            f"model:\n{model}" + (f"  batch: {batch}\n" if batch is not None else "") + f"generation:\n{generation}"
            f"media:\n  max_tiles: {max_tiles}\nspool:\n  media_roots: [{photos}]\n  settle_seconds: 0\n"
        )
        (root / "jobs" / "inbox" / "captions.yaml").write_text(f"prompt: {prompt}\ninputs: {photos}\n")
        started = time.perf_counter()
        proc = subprocess.run(
            [*vlbatch(), "--config", str(root / "config.yaml"), "run"], capture_output=True, text=True, cwd=root
        )
        wall_s = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"vlbatch run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        loaded = re.search(r"event=model.loaded \S+ ms=([\d.]+)", proc.stderr)
        load_s = float(loaded.group(1)) / 1e3 if loaded else 0.0  # a server loaded its model before
        db = sqlite_utils.Database(root / "vlbatch.db")
        rows = list(
            db.query(
                f"select preprocess_ms, vit_ms, prefill_ms, {DECODE_SHARE_MS} as decode_ms, "
                f"{DECODE_TOKENS} as decode_tokens, decode_rows, output_tokens, prompt_tokens, tiles from results "
                "where error is null"
            )
        )
    answers = len(rows)
    if not answers:
        sys.exit(f"vlbatch run stored no answer:\n{proc.stderr[-3000:]}")

    def total(key: str) -> float:
        return float(sum(r[key] or 0 for r in rows))

    served = wall_s - load_s
    return {
        "photos": answers,
        "max_tiles": max_tiles,
        "tiles_per_photo": [int(r["tiles"]) for r in rows],
        "output_tokens": int(total("output_tokens")),
        "wall_s": wall_s,
        "load_s": load_s,
        "seconds_per_photo": served / answers,
        "photos_per_hour": 3600 * answers / served,
        "photos_per_hour_wall": 3600 * answers / wall_s,
        "preparation_s": total("preprocess_ms") / answers / 1e3,
        "vit_s": total("vit_ms") / answers / 1e3,
        "prefill_s": total("prefill_ms") / answers / 1e3,
        "decode_s": total("decode_ms") / answers / 1e3,  # each answer's share of the steps it took part in
        "decode_rows": total("decode_rows") / answers,
        "prompt_tokens": total("prompt_tokens") / answers,
        "decode_tok_s": total("decode_tokens") / (total("decode_ms") / 1e3),  # all but each answer's first
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--max-tiles", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, help="model.batch: answers decoded together (default: the config's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp), args.photos)
        r = worker_photos(
            args.model_dir, Path(tmp), args.max_tiles, args.max_new_tokens, args.threads, batch=args.batch
        )
    from run_bench import machine  # here: run_bench imports this module

    answers = r["photos"]
    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_features']}), {args.threads} threads; model {args.model_dir.name}")
    tiles, tokens = sum(r["tiles_per_photo"]), r["output_tokens"]
    print(f"{answers} photos, {tiles} tiles, {tokens} output tokens (max {args.max_new_tokens} each)")
    wall, load, each = r["wall_s"], r["load_s"], r["seconds_per_photo"]
    print(f"wall {wall:.1f} s, model load {load:.1f} s, {each:.2f} s per photo after the load")
    print(f"photos per hour: {r['photos_per_hour']:.0f} (after the load), {r['photos_per_hour_wall']:.0f} (wall)")
    stages = {"preparation": r["preparation_s"], "ViT": r["vit_s"], "prefill": r["prefill_s"], "decode": r["decode_s"]}
    print("  ".join(f"{name} {s:.2f} s" for name, s in stages.items()) + "  (per photo)")
    rows = r["decode_rows"]
    print(f"decode {r['decode_tok_s']:.1f} tokens/s over the answers, {rows:.2f} answers at once on average")


if __name__ == "__main__":
    main()
