"""Every CPU variant of the llama.cpp build, run on this CPU: which ones ggml would pick, and what each does.

    python bench/llama_cpu_variants.py [--threads 2] [--decode-tokens 16] [--variants haswell zen4 ...]
                                       [--no-force]

For each CPU library of a GGML_BACKEND_DL / GGML_CPU_ALL_VARIANTS build (see `make bench`), prints ggml's score
on this CPU (0 = it needs an instruction this CPU lacks), then runs the llama.cpp peer pinned to that variant
(Q4_0, real-shape language model): prefill and decode tokens/s. Variants scored 0 are run too (--force-variant)
to show the crash a build for a fixed feature list has on this CPU; --no-force skips them. The default choice
(the best score, the AMX variant aside) is marked. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from peer_llamacpp import cpu_variants, default_variant, library_dir, variant_scores  # noqa: E402
from peers import run_peer  # noqa: E402
from run_bench import cached_export, machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--variants", nargs="*", help="only these (default: every variant built)")
    parser.add_argument("--no-force", action="store_true", help="skip the variants this CPU cannot run")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    args = parser.parse_args()
    variants = cpu_variants(library_dir())
    if not variants:
        print(f"{library_dir()}: a static build (one CPU library); rebuild with `make bench` for the variants")
        return 1
    scores = variant_scores(variants)
    default = default_variant(scores)
    info = machine()
    print(f"machine: {info['cpu']}; features: {info['cpu_features']}")
    hf = cached_export(args.models, "real-shape", "int4").parent / "real-shape-hf"
    gguf = args.models / "real-shape-gguf"
    rows = []
    for name in args.variants or list(variants):
        if name not in variants:
            rows.append((name, "-", "not built"))
            continue
        if scores[name] == 0 and args.no_force:
            rows.append((name, "0", "skipped (this CPU cannot run it)"))
            continue
        command = [sys.executable, str(REPO / "bench" / "peer_llamacpp.py"), str(hf), str(gguf), "--quants", "Q4_0"]
        command += ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens)]
        command += ["--decode-tokens", str(args.decode_tokens), "--cpu-variant", name]
        command += ["--force-variant"] if scores[name] == 0 else []
        outcome = run_peer(name, command, timeout_s=1800)
        if outcome.figures is not None:
            q4 = outcome.figures["Q4_0"]
            prefill = q4[f"prefill_{args.prompt_tokens}_tok_s"]
            result = f"prefill {prefill:6.1f} tok/s, decode {q4['decode_tok_s']:5.1f} tok/s"
        else:
            result = f"FAILED: {outcome.failure}"
        rows.append((name + (" (default)" if name == default else ""), str(scores[name]), result))
    print(f"\n{'variant':<26} {'score':>5}  Q4_0, {args.threads} threads")
    for name, score, result in rows:
        print(f"{name:<26} {score:>5}  {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
