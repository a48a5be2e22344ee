"""Decode speed against llama.cpp in paired rounds, for machines whose speed drifts from minute to minute.

    python bench/decode_rounds.py models/real-shape-int4 models/real-shape-gguf/model-Q4_0.gguf
                                  [--rounds 8] [--context 400] [--tokens 64] [--threads 2]

Decoding reads every weight from memory once per token, so on a shared machine its speed follows whatever else
uses the memory bus, and two runs minutes apart (as in bench/run_bench.py, where the peers run last) can differ
by 10-15%. Here both runtimes are loaded once, each in its own process, with the same context already
prefilled (--context tokens), and then decode --tokens tokens from that context in turn: vlbatch, llama.cpp,
llama.cpp, vlbatch, ... (the idle one waits on a pipe, using no CPU). Each round gives both figures seconds apart;
the script prints every round and the median of the per-round ratios. Build the GGUF file with
`make bench` (bench/peer_llamacpp.py writes models/real-shape-gguf/) first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peer_llamacpp import load_cpu_backend, prompt_tokens  # noqa: E402


def serve_vlbatch(model_dir: Path, context: int, threads: int) -> None:
    from batch.infer.generate import decode_one_token, prefill
    from batch.infer.pipeline import Pipeline

    pipeline = Pipeline.open(model_dir, threads=threads)
    backend, embeddings = pipeline.backend, pipeline.embeddings
    cache = backend.new_cache()
    prefill(backend, np.asarray(embeddings[prompt_tokens(context)], dtype=np.float32), cache)

    def decode(tokens: int) -> None:
        cache.length = context  # each round decodes from the same context, over the rows the last one wrote
        for i in range(tokens):
            decode_one_token(backend, embeddings[2000 + i][None, None].astype(np.float32), cache)

    _serve(decode)


def serve_llamacpp(gguf: Path, context: int, threads: int) -> None:
    load_cpu_backend(None, allow_amx=False, force=False)
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=4096, n_batch=512, verbose=False
    )
    llm.eval(prompt_tokens(context))

    def decode(tokens: int) -> None:
        llm.n_tokens = context  # eval() drops the cache rows from here on
        for i in range(tokens):
            llm.eval([2000 + i])

    _serve(decode)


def _serve(decode) -> None:  # noqa: ANN001 - a callable taking the token count
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        tokens = int(line)
        started = time.perf_counter()
        decode(tokens)
        print(json.dumps({"ms_per_token": (time.perf_counter() - started) / tokens * 1e3}), flush=True)


class Runner:
    def __init__(self, kind: str, path: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, str(path), str(path), "--serve", kind]  # the worker reads the first
        command += ["--context", str(args.context), "--threads", str(args.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._reply()

    def _reply(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"{self.process.args[5]} worker ended (exit {self.process.wait()})")
        return json.loads(line)

    def decode(self, tokens: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{tokens}\n")
        self.process.stdin.flush()
        return float(self._reply()["ms_per_token"])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", choices=["vlbatch", "llamacpp"], help=argparse.SUPPRESS)  # a worker's side
    args = parser.parse_args()
    if args.serve == "vlbatch":
        serve_vlbatch(args.model_dir, args.context, args.threads)
        return 0
    if args.serve == "llamacpp":
        serve_llamacpp(args.model_dir, args.context, args.threads)
        return 0
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf}: missing (make bench writes it)")
    from run_bench import machine

    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_features']}), {args.threads} threads")
    print(f"{args.model_dir.name} against llama.cpp {args.gguf.name}: {args.tokens} tokens after {args.context}")
    ours, theirs = Runner("vlbatch", args.model_dir, args), Runner("llamacpp", args.gguf, args)
    ours.decode(4)  # first touches of the weights
    theirs.decode(4)
    ratios = []
    for i in range(args.rounds):
        pair = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        ms = {id(runner): runner.decode(args.tokens) for runner in pair}
        a, b = 1e3 / ms[id(ours)], 1e3 / ms[id(theirs)]
        ratios.append(a / b)
        print(f"round {i + 1}: vlbatch {a:5.1f} tokens/s, llama.cpp {b:5.1f} tokens/s, x{a / b:.2f}", flush=True)
    ours.close()
    theirs.close()
    print(
        f"vlbatch / llama.cpp decode: median x{np.median(ratios):.2f} (rounds from x{min(ratios):.2f} to "
        f"x{max(ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
