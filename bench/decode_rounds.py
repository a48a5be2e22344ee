"""Decode speed against llama.cpp in paired rounds, for machines whose speed drifts from minute to minute.

    python bench/decode_rounds.py models/real-shape-int4 models/real-shape-gguf/model-Q4_0.gguf
                                  [--rounds 8] [--context 400[,1000,2200]] [--tokens 64] [--threads 2]

Decoding reads every weight from memory once per token, so on a shared machine its speed follows whatever else
uses the memory bus, and two runs minutes apart (as in bench/run_bench.py, where the peers run last) can differ
by 10-15%. Here both runtimes are loaded once, each in its own process. For each context in --context (a
comma-separated list) both prefill the same prompt of that many tokens, then decode --tokens tokens from it in
turn: vlbatch, llama.cpp, llama.cpp, vlbatch, ... (the idle one waits on a pipe, using no CPU). Each round gives
both figures seconds apart; the script prints every round, the median of the per-round ratios per context, and a
table of the contexts with each runtime's decode at that context against its decode at the first (smallest)
one. Build the GGUF file with `make bench` (bench/peer_llamacpp.py writes models/real-shape-gguf/) first.
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

from peer_llamacpp import decode_token, load_cpu_backend, prompt_tokens  # noqa: E402

from batch.huge_pages import TUNABLE, environment, thp_mode  # noqa: E402


def serve_vlbatch(model_dir: Path, threads: int) -> None:
    from batch.infer.generate import decode_one_token, prefill
    from batch.infer.pipeline import Pipeline

    pipeline = Pipeline.open(model_dir, threads=threads)
    backend, embeddings = pipeline.backend, pipeline.embeddings
    vocab = embeddings.shape[0]
    state: dict = {}

    def decode(context: int, tokens: int) -> None:
        if state.get("context") != context:
            state["cache"] = cache = backend.new_cache()
            prefill(backend, np.asarray(embeddings[prompt_tokens(context, vocab)], dtype=np.float32), cache)
            state["context"] = context
        cache = state["cache"]
        cache.length = context  # each round decodes from the same context, over the rows the last one wrote
        for i in range(tokens):
            decode_one_token(backend, embeddings[decode_token(i, vocab)][None, None].astype(np.float32), cache)

    _serve(decode)


def serve_llamacpp(gguf: Path, threads: int) -> None:
    load_cpu_backend(None, allow_amx=False, force=False)
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=4096, n_batch=512, verbose=False
    )
    vocab = llm.n_vocab()
    state: dict = {}

    def decode(context: int, tokens: int) -> None:
        if state.get("context") != context:
            llm.reset()
            llm.eval(prompt_tokens(context, vocab))
            state["context"] = context
        llm.n_tokens = context  # eval() drops the cache rows from here on
        for i in range(tokens):
            llm.eval([decode_token(i, vocab)])

    _serve(decode)


def _serve(decode) -> None:  # noqa: ANN001 - a callable taking the context and the token count
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        decode(ask["context"], 4)  # the context's prefill, and first touches of what its decode reads
        started = time.perf_counter()
        decode(ask["context"], ask["tokens"])
        print(json.dumps({"ms_per_token": (time.perf_counter() - started) / ask["tokens"] * 1e3}), flush=True)


class Runner:
    def __init__(self, kind: str, path: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, str(path), str(path), "--serve", kind, "--threads", str(args.threads)]
        # vlbatch's worker starts as the `vlbatch` model commands restart themselves: with huge pages where wanted
        env = environment() if kind == "vlbatch" else None
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._reply()

    def _reply(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"{self.process.args[5]} worker ended (exit {self.process.wait()})")
        return json.loads(line)

    def decode(self, context: int, tokens: int) -> float:
        """Tokens per second decoding `tokens` tokens after `context` prompt tokens."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"context": context, "tokens": tokens}) + "\n")
        self.process.stdin.flush()
        return 1e3 / float(self._reply()["ms_per_token"])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def contexts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--context takes positive token counts separated by commas, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--context", type=contexts, default=[400], help="prompt tokens, e.g. 400 or 128,400,2200")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", choices=["vlbatch", "llamacpp"], help=argparse.SUPPRESS)  # a worker's side
    args = parser.parse_args()
    if args.serve == "vlbatch":
        serve_vlbatch(args.model_dir, args.threads)
        return 0
    if args.serve == "llamacpp":
        serve_llamacpp(args.model_dir, args.threads)
        return 0
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf}: missing (make bench writes it)")
    from run_bench import machine

    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_features']}), {args.threads} threads")
    huge = TUNABLE in environment().get("GLIBC_TUNABLES", "")
    asked = "asked for" if huge else "not asked for"
    print(f"vlbatch's worker: huge pages {asked} (THP mode {thp_mode()}), as the vlbatch model commands run")
    print(f"{args.model_dir.name} against llama.cpp {args.gguf.name}: {args.tokens} tokens per round")
    ours, theirs = Runner("vlbatch", args.model_dir, args), Runner("llamacpp", args.gguf, args)
    table = []
    for context in args.context:
        rates: dict[str, list[float]] = {"vlbatch": [], "llama.cpp": []}
        for i in range(args.rounds):
            pair = [("vlbatch", ours), ("llama.cpp", theirs)]
            for name, runner in pair if i % 2 == 0 else pair[::-1]:
                rates[name].append(runner.decode(context, args.tokens))
            a, b = rates["vlbatch"][-1], rates["llama.cpp"][-1]
            print(f"context {context}, round {i + 1}: vlbatch {a:5.1f} tokens/s, llama.cpp {b:5.1f}, x{a / b:.2f}")
        ratios = np.array(rates["vlbatch"]) / np.array(rates["llama.cpp"])
        print(
            f"context {context}: vlbatch / llama.cpp decode median x{np.median(ratios):.2f} "
            f"(rounds from x{ratios.min():.2f} to x{ratios.max():.2f})",
            flush=True,
        )
        table.append((context, rates, ratios))
    ours.close()
    theirs.close()
    first = table[0][1]
    print(
        f"\n| context | rounds | vlbatch tokens/s | llama.cpp tokens/s | median ratio | lowest round | "
        f"vlbatch vs {table[0][0]} | llama.cpp vs {table[0][0]} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for context, rates, ratios in table:
        ours_rate, theirs_rate = rates["vlbatch"], rates["llama.cpp"]
        own = np.median(ours_rate) / np.median(first["vlbatch"])
        peer = np.median(theirs_rate) / np.median(first["llama.cpp"])
        print(
            f"| {context:,} | {len(ratios)} | {min(ours_rate):.1f}-{max(ours_rate):.1f} | "
            f"{min(theirs_rate):.1f}-{max(theirs_rate):.1f} | x{np.median(ratios):.2f} | x{ratios.min():.2f} | "
            f"{own:.0%} | {peer:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
