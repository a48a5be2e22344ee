"""Batched decode on an export: aggregate tokens/s at several row counts, and how close batched rows stay to alone.

    python bench/batched_decode.py MODEL_DIR [--rows 1 2 4 8] [--steps 32] [--prompt-tokens 408] [--prompts 16]
                                   [--rounds 3] [--threads 2]

Prefills --prompts prompts of --prompt-tokens random token ids (one caption's prompt: a one-tile photo is 408
tokens), then decodes --steps tokens:
- speed: for each row count B, B of the prompts decoded together (DecodeBatch's step: every row through each layer
  as one (B, 1, hidden) product); one row is the single-answer path (Pipeline.answer's). Rounds alternate the row
  counts (the machine drifts), the median per row count is printed with the aggregate tokens/s and its ratio over
  one row.
- correctness: every prompt decoded alone (greedy, --steps tokens), then the same prompts in batches of the largest
  row count, each row fed its alone tokens: the cosine of each step's batched logits against alone (lowest over all
  rows and steps), and the share of rows whose greedy token matched alone at every step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.infer.batching import decode_rows_step  # noqa: E402
from batch.infer.generate import decode_one_token, prefill  # noqa: E402
from batch.infer.kvcache import KVCache  # noqa: E402
from batch.infer.runtime.onnx_backend import OnnxBackend  # noqa: E402


def copy_cache(cache: KVCache) -> KVCache:
    out = KVCache(len(cache.k), cache.capacity, cache.k[0].shape[-1])
    for layer in range(len(cache.k)):
        out.k[layer][:, : cache.length] = cache.k[layer][:, : cache.length]
        out.v[layer][:, : cache.length] = cache.v[layer][:, : cache.length]
    out.length = cache.length
    return out


def alone(backend: OnnxBackend, embeddings: np.ndarray, first: int, cache: KVCache, steps: int):
    """Greedy decode of one prompt: (tokens fed, logits of each step, seconds)."""
    cache = copy_cache(cache)
    fed, logits = [first], []
    started = time.perf_counter()
    for _ in range(steps):
        out = decode_one_token(backend, embeddings[fed[-1]][None, None].astype(np.float32), cache)
        logits.append(out)
        fed.append(int(np.argmax(out)))
    return fed[:-1], logits, time.perf_counter() - started


def timed_rows(backend, embeddings, firsts, caches, rows: int, steps: int) -> float:
    """Seconds for `steps` decode steps of `rows` prompts together (one row: the single-answer path)."""
    if rows == 1:
        return alone(backend, embeddings, firsts[0], caches[0], steps)[2]
    cache = backend.new_row_cache(rows)
    for c in caches[:rows]:
        cache.add(c)
    tokens = list(firsts[:rows])
    started = time.perf_counter()
    for _ in range(steps):
        tokens = [int(t) for t in np.argmax(decode_rows_step(backend, embeddings, tokens, cache), axis=1)]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=408)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    backend = OnnxBackend(args.model_dir, threads=args.threads)
    if backend.max_rows < max(args.rows):
        sys.exit(f"{args.model_dir}: this export decodes one answer at a time (re-export it with `vlbatch export`)")
    embeddings = np.load(args.model_dir / "embed_tokens.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    n_prompts = max(args.prompts, max(args.rows))
    caches, firsts = [], []
    started = time.perf_counter()
    for _ in range(n_prompts):
        ids = rng.integers(0, min(len(embeddings), 150000), args.prompt_tokens)
        cache = backend.new_cache()
        firsts.append(int(np.argmax(backend.logits(prefill(backend, np.asarray(embeddings[ids], np.float32), cache)))))
        caches.append(cache)
    print(
        f"{args.model_dir.name}: {n_prompts} prompts of {args.prompt_tokens} tokens prefilled in "
        f"{time.perf_counter() - started:.1f} s; {args.threads} threads"
    )

    seconds: dict[int, list[float]] = {rows: [] for rows in args.rows}
    for _ in range(args.rounds):
        for rows in args.rows:
            seconds[rows].append(timed_rows(backend, embeddings, firsts, caches, rows, args.steps))
    one = args.steps / statistics.median(seconds[min(args.rows)]) / min(args.rows)
    print(f"decode, {args.steps} steps, median of {args.rounds} rounds:")
    for rows, times in seconds.items():
        ms = statistics.median(times) / args.steps * 1e3
        aggregate = rows * args.steps / statistics.median(times)
        print(
            f"  {rows} rows: {ms:7.1f} ms per step, {aggregate:6.1f} tokens/s together (x{aggregate / one:.2f}), "
            f"{aggregate / rows:5.1f} per stream"
        )

    width = max(args.rows)
    lowest, matched = 1.0, 0
    for start in range(0, n_prompts - width + 1, width):
        group = range(start, start + width)
        solo = [alone(backend, embeddings, firsts[i], caches[i], args.steps) for i in group]
        cache = backend.new_row_cache(width)
        for i in group:
            cache.add(caches[i])
        agree = [True] * width
        for step in range(args.steps):
            out = decode_rows_step(backend, embeddings, [fed[step] for fed, _, _ in solo], cache)
            for row, (fed, logits, _) in enumerate(solo):
                a, b = logits[step], out[row]
                lowest = min(lowest, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
                if step + 1 < args.steps and int(np.argmax(b)) != fed[step + 1]:
                    agree[row] = False
                if step + 1 == args.steps and int(np.argmax(b)) != int(np.argmax(a)):
                    agree[row] = False
        matched += sum(agree)
    checked = (n_prompts // width) * width
    print(
        f"correctness, batches of {width}: lowest logits cosine against alone {lowest:.6f}; greedy tokens equal "
        f"over {args.steps} steps for {matched}/{checked} rows ({100 * matched / checked:.0f}%)"
    )


if __name__ == "__main__":
    main()
