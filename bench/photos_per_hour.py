"""Photos per hour through the worker: one caption job over N photos, one `vlbatch run`.

    python bench/photos_per_hour.py MODEL_DIR [--photos 20] [--max-tiles 1] [--max-new-tokens 64] [--threads 2]

Writes N synthetic 2048x1536 (4:3) photos and one job (mode each) captioning them greedily, runs the worker once
over it, and prints the wall time, the model's load time and photos per hour after the load, with the stages'
shares from the answers stored (preparation, ViT, prefill, decode). Run it before and after a change on the same
machine; the answers are the same both times (greedy), so only the speed differs.
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
sys.path.insert(0, str(REPO / "bench"))

from batch_throughput import vlbatch  # noqa: E402
from run_bench import machine  # noqa: E402
from synthetic import synthetic_image  # noqa: E402

PROMPT = "Write a caption for this photo."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--max-tiles", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "photos").mkdir()
        (root / "jobs" / "inbox").mkdir(parents=True)
        for i in range(args.photos):
            synthetic_image(2048, 1536, seed=i).save(root / "photos" / f"{i:04d}.jpg", quality=90)
        (root / "config.yaml").write_text(
            f"model:\n  dir: {args.model_dir.resolve()}\n  threads: {args.threads}\n"
            f"generation:\n  max_new_tokens: {args.max_new_tokens}\n  temperature: 0\n"
            f"media:\n  max_tiles: {args.max_tiles}\nspool:\n  media_roots: [photos]\n  settle_seconds: 0\n"
        )
        (root / "jobs" / "inbox" / "captions.yaml").write_text(f"prompt: {PROMPT}\ninputs: {root / 'photos'}\n")
        started = time.perf_counter()
        proc = subprocess.run(
            [*vlbatch(), "--config", str(root / "config.yaml"), "run"], capture_output=True, text=True, cwd=root
        )
        wall_s = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"vlbatch run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        load_s = float(re.search(r"event=model.loaded \S+ ms=([\d.]+)", proc.stderr).group(1)) / 1e3
        db = sqlite_utils.Database(root / "vlbatch.db")
        row = db.execute(
            "select count(*), sum(preprocess_ms), sum(vit_ms), sum(prefill_ms), sum(decode_ms), sum(output_tokens), "
            "sum(tiles) from results where error is null"
        ).fetchone()
    answers, prep, vit, prefill, decode, tokens, tiles = row
    served = wall_s - load_s
    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_features']}), {args.threads} threads; model {args.model_dir.name}")
    print(f"{answers} photos, {tiles} tiles, {tokens} output tokens (max {args.max_new_tokens} each)")
    print(f"wall {wall_s:.1f} s, model load {load_s:.1f} s, {served / answers:.2f} s per photo after the load")
    print(f"photos per hour: {3600 * answers / served:.0f} (after the load), {3600 * answers / wall_s:.0f} (wall)")
    stages = {"preparation": prep, "ViT": vit, "prefill": prefill, "decode": decode}
    print("  ".join(f"{name} {ms / answers / 1e3:.2f} s" for name, ms in stages.items()) + "  (per photo)")
    print(f"decode {tokens / (decode / 1e3):.1f} tokens/s over the answers")


if __name__ == "__main__":
    main()
