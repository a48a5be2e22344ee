"""Decode speed against llama.cpp in paired rounds, for machines whose speed drifts from minute to minute.

    python bench/decode_rounds.py models/real-shape-int4 models/real-shape-gguf/model-Q4_0.gguf
                                  [--rounds 8] [--context 400[,1000,2200]] [--tokens 64] [--threads 2]

Decoding reads every weight from memory once per token, so on a shared machine its speed follows whatever else
uses the memory bus, and two runs minutes apart (as in bench/run_bench.py, where the peers run last) can differ
by 10-15%. Here both runtimes are loaded once, each in its own process, and each prefills the same prompt of
every context in --context (a comma-separated list) once and keeps it (vlbatch its K/V cache, llama.cpp its
saved state). Every decode starts a new answer from it, as prefill left it: vlbatch's history then widens as the
answer grows, as it does for a user, not from where an earlier round left it.

An uncounted first pass decodes from every context with both (a worker's first answers run slower while its
memory settles). Each round then visits every context, forwards in odd rounds and backwards in even ones, and at
each decodes --tokens tokens with one runtime, then the other (who goes first alternates; the idle one waits on
a pipe, using no CPU). So each round gives both runtimes' figures at every context within a minute or so: the
ratio of the two runtimes at a context, and each runtime's decode at a context against its own at the first
(smallest) one, are taken within the round, and the script prints every round and the medians of those
per-round ratios. Build the GGUF file with `make bench` (bench/peer_llamacpp.py writes models/real-shape-gguf/)
first.
"""

from __future__ import annotations

import argparse
import copy
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
from batch.infer.runtime import native_attention  # noqa: E402


def serve_vlbatch(model_dir: Path, threads: int) -> None:
    from batch.infer.generate import decode_one_token, prefill
    from batch.infer.pipeline import Pipeline

    pipeline = Pipeline.open(model_dir, threads=threads)
    backend, embeddings = pipeline.backend, pipeline.embeddings
    vocab = embeddings.shape[0]
    prompts: dict[int, object] = {}  # context -> its prompt's cache as prefill left it (never decoded from)
    answer: list = []

    def decode(context: int, tokens: int, fresh: bool) -> None:
        if fresh:  # a new answer: a copy of the prompt's cache, as wide as prefill left it
            if context not in prompts:
                prompts[context] = prompt = backend.new_cache()
                prefill(backend, np.asarray(embeddings[prompt_tokens(context, vocab)], dtype=np.float32), prompt)
            answer[:] = [copy.deepcopy(prompts[context])]
        cache = answer[0]
        cache.length = context
        for i in range(tokens):
            decode_one_token(backend, embeddings[decode_token(i, vocab)][None, None].astype(np.float32), cache)

    _serve(decode, fused_attention=bool(getattr(backend, "fused_attention", False)))


def serve_llamacpp(gguf: Path, threads: int) -> None:
    load_cpu_backend(None, allow_amx=False, force=False)
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=4096, n_batch=512, verbose=False
    )
    vocab = llm.n_vocab()
    prompts: dict[int, llama_cpp.LlamaState] = {}  # context -> the state right after its prompt

    def decode(context: int, tokens: int, fresh: bool) -> None:
        if fresh:  # a new answer: the state as prefill left it
            if context in prompts:
                llm.load_state(prompts[context])
            else:
                llm.reset()
                llm.eval(prompt_tokens(context, vocab))
                prompts[context] = llm.save_state()
        llm.n_tokens = context  # eval() drops the cache rows from here on
        for i in range(tokens):
            llm.eval([decode_token(i, vocab)])

    _serve(decode)


def _serve(decode, **about: object) -> None:  # noqa: ANN001 - decode takes the context, token count and `fresh`
    print(json.dumps({"ready": True, **about}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        decode(ask["context"], 4, fresh=True)  # a new answer from the context's prompt, and first touches
        started = time.perf_counter()
        decode(ask["context"], ask["tokens"], fresh=False)  # from the same context again, timed
        print(json.dumps({"ms_per_token": (time.perf_counter() - started) / ask["tokens"] * 1e3}), flush=True)


class Runner:
    def __init__(self, kind: str, path: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, str(path), str(path), "--serve", kind, "--threads", str(args.threads)]
        # vlbatch's worker starts as the `vlbatch` model commands restart themselves: with huge pages where wanted
        env = environment() if kind == "vlbatch" else None
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.about = self._reply()  # what the worker says of itself when ready

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
    fused = "on" if ours.about.get("fused_attention") else f"off (see {native_attention.__name__})"
    print(f"vlbatch's worker: fused attention {fused}")
    runners = {"vlbatch": ours, "llama.cpp": theirs}
    for context in args.context:  # every prompt prefilled, and a first answer from each, before any round counts
        for runner in runners.values():
            runner.decode(context, args.tokens)
    rates = {context: {name: [] for name in runners} for context in args.context}
    for i in range(args.rounds):
        for j, context in enumerate(args.context if i % 2 == 0 else args.context[::-1]):
            names = list(runners) if (i + j) % 2 == 0 else list(runners)[::-1]
            for name in names:
                rates[context][name].append(runners[name].decode(context, args.tokens))
            a, b = rates[context]["vlbatch"][-1], rates[context]["llama.cpp"][-1]
            print(f"round {i + 1}, context {context}: vlbatch {a:5.1f} tokens/s, llama.cpp {b:5.1f}, x{a / b:.2f}")
        print(flush=True)
    ours.close()
    theirs.close()
    first = args.context[0]
    print(
        f"| context | rounds | vlbatch tokens/s | llama.cpp tokens/s | median ratio | lowest round | "
        f"vlbatch vs {first:,} | llama.cpp vs {first:,} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for context in args.context:
        ours_rate, theirs_rate = (np.array(rates[context][name]) for name in runners)
        ratios = ours_rate / theirs_rate
        own = np.median(ours_rate / np.array(rates[first]["vlbatch"]))  # within each round, then the median
        peer = np.median(theirs_rate / np.array(rates[first]["llama.cpp"]))
        print(
            f"| {context:,} | {len(ratios)} | {ours_rate.min():.1f}-{ours_rate.max():.1f} | "
            f"{theirs_rate.min():.1f}-{theirs_rate.max():.1f} | x{np.median(ratios):.2f} | x{ratios.min():.2f} | "
            f"{own:.0%} | {peer:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
