"""One answer's decode with the fused attention and without it, in one process, taking turns.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/fused_attention_ab.py models/real-shape-int4 \\
        --context 128,400,1000,2200 --rounds 6 --tokens 48

The export is opened twice: once with VLBATCH_FUSED_ATTENTION=0 (every layer's attention as exported) and once
with the fused attention (batch/infer/runtime/native_attention.py; it must be available here). Each context's
prompt is prefilled once per side; every round then visits every context and decodes a new answer of --tokens
tokens from the prompt's cache with one side, then the other (the order alternating by round), so both run in
the same process, seconds apart: a worker process's own speed, which moves from one start to the next, is the
same for both. Prints tokens/s per side and context (medians over the rounds), the ratio, and each side's decode
after the last context against after the first. GLIBC_TUNABLES as above gives the weights the huge pages the
`vlbatch` model commands ask for (batch/huge_pages.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch.infer.generate import decode_one_token, prefill  # noqa: E402
from batch.infer.pipeline import Pipeline  # noqa: E402
from batch.infer.runtime import native_attention  # noqa: E402


def open_side(folder: Path, fused: bool, threads: int) -> Pipeline:
    os.environ[native_attention.SWITCH] = "1" if fused else "0"
    native_attention.library.cache_clear()
    pipeline = Pipeline.open(folder, threads=threads)
    if pipeline.backend.fused_attention != fused:
        sys.exit(f"the fused attention is not available here: see {native_attention.__file__}")
    return pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a format 3 export with an fp16 history")
    parser.add_argument("--context", default="128,400,1000,2200", help="prompt lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48, help="tokens decoded per answer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    contexts = [int(c) for c in args.context.split(",")]
    sides = {"off": open_side(args.model_dir, False, args.threads), "on": open_side(args.model_dir, True, args.threads)}
    table = sides["off"].embeddings
    vocab = len(table)

    def embed(token: int) -> np.ndarray:
        return table[token % vocab][None, None].astype(np.float32)

    prompts = {}
    for name, pipeline in sides.items():
        for context in contexts:
            cache = pipeline.backend.new_cache()
            prefill(pipeline.backend, np.asarray(table[np.arange(context) % vocab], np.float32), cache)
            prompts[name, context] = cache

    def decode(name: str, context: int) -> float:
        """tokens/s of a new answer from the prompt's cache, as prefill left it"""
        backend, cache = sides[name].backend, copy.deepcopy(prompts[name, context])
        cache.binding = None
        decode_one_token(backend, embed(0), cache)  # the answer's first step: its buffers bound
        started = time.perf_counter()
        for i in range(args.tokens):
            decode_one_token(backend, embed(i + 1), cache)
        return args.tokens / (time.perf_counter() - started)

    for context in contexts:  # an uncounted first pass: a worker's first answers run slower while memory settles
        for name in sides:
            decode(name, context)
    rates = {(name, context): [] for name in sides for context in contexts}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for context in contexts if round_ % 2 == 0 else contexts[::-1]:
            for name in order:
                rates[name, context].append(decode(name, context))
    print(f"{args.model_dir.name}: {args.tokens} tokens per answer, {args.rounds} rounds, medians in tokens/s")
    print("| context | off | on | on / off |")
    print("|---|---|---|---|")
    for context in contexts:
        off, on = np.median(rates["off", context]), np.median(rates["on", context])
        print(f"| {context:,} | {off:.1f} | {on:.1f} | x{on / off:.2f} |")
    first, last = contexts[0], contexts[-1]
    for name in sides:
        kept = [a / b for a, b in zip(rates[name, last], rates[name, first], strict=True)]
        print(f"{name}: decode after {last:,} tokens against after {first:,}: {np.median(kept):.1%} (median of rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
