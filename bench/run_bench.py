"""vlbatch at InternVL3-2B's real shape (random weights): the upstream table's cases on this CPU.

    python bench/run_bench.py [--weights int4 fp32] [--peers transformers llamacpp] [--threads 2]
                              [--decode-tokens 32] [--json out.json]

Builds (once, cached under models/) the real-shape model and one export per weight format, then reports
per export: model load time, ViT ms per 448 tile, TTFT for 0 images (128-token prompt), 1 image, 4 images
and an 8-frame video, decode ms/token and tokens/s over a fixed number of tokens (end-of-turn ignored),
and the process's peak RSS. The peers run afterwards, one subprocess each, on the same weights, prompts
and thread count: transformers (torch fp32) and llama.cpp (Q4_0, Q8_0); the ratios close the report.
A benchmark, not a test: nothing checks these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synthetic import write_demo_media  # noqa: E402

from batch.infer.generate import Timings  # noqa: E402
from batch.infer.media import MediaSettings  # noqa: E402
from batch.infer.pipeline import Pipeline, Request  # noqa: E402
from batch.infer.settings import GenerationSettings  # noqa: E402
from batch.model.export.exporter import export  # noqa: E402
from batch.model.tinymodel import convert_to_native, make_model  # noqa: E402

MODELS = REPO / "models"


def cached_export(weights: str) -> Path:
    hf = MODELS / "real-shape-hf"
    if not (hf / "config.json").exists():
        make_model(hf, preset="real-shape")
    out = MODELS / f"real-shape-{weights}"
    if not (out / "manifest.json").exists():
        export(hf, out, weights=weights)
    return out


def machine() -> dict[str, str | int]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "python": platform.python_version()}


def run_case(pipeline: Pipeline, request: Request, decode_tokens: int) -> dict[str, float]:
    timings = Timings()
    settings = GenerationSettings(max_new_tokens=decode_tokens + 1, ignore_eos=True)
    for _ in pipeline.steps(request, settings, timings):
        pass
    return {
        "prompt_tokens": len(request.ids),
        "vit_ms": timings.vit_ms,
        "prefill_ms": timings.prefill_ms,
        "ttft_ms": timings.ttft_ms,
        "decode_ms_per_token": timings.decode_ms / max(1, timings.decode_tokens),
        "decode_tok_s": timings.tokens_per_s,
    }


def bench_export(
    folder: Path, threads: int, decode_tokens: int, media: Path, save_cases: Path | None = None
) -> dict[str, object]:
    started = time.perf_counter()
    pipeline = Pipeline.open(folder, threads=threads, media=MediaSettings(max_tiles=1))
    load_s = time.perf_counter() - started
    text = Request(np.random.default_rng(0).integers(0, 1000, 128), None, None, 0.0)
    cases = {
        "0 images": text,
        "1 image": pipeline.prepare("Describe the image.", [media / "beach.jpg"]),
        "4 images": pipeline.prepare(
            "Compare.", [media / n for n in ("beach.jpg", "street.png", "market.jpg", "harbor.png")]
        ),
        "video 8 frames": pipeline.prepare("What happens?", [media / "clip.mp4"]),
    }
    if save_cases is not None:  # the same prompts for the transformers peer
        arrays = {f"{name}_ids": r.ids for name, r in cases.items()}
        arrays |= {f"{name}_pixels": r.pixels for name, r in cases.items() if r.pixels is not None}
        np.savez(save_cases, **arrays)
    results = {}
    for name, request in cases.items():
        pipeline.vit_cache = type(pipeline.vit_cache)()  # time the ViT every time
        results[name] = run_case(pipeline, request, decode_tokens)
        r = results[name]
        print(
            f"  {name:<15} {r['prompt_tokens']:>5} tokens  ViT {r['vit_ms']:8.0f} ms  TTFT {r['ttft_ms']:8.0f} ms  "
            f"decode {r['decode_tok_s']:5.2f} tok/s",
            flush=True,
        )
    pipeline.close()
    one = results["1 image"]
    return {
        "load_s": load_s,
        "vit_ms_per_tile": one["vit_ms"],
        "prefill_tok_s": one["prompt_tokens"] / (one["prefill_ms"] / 1e3),
        "cases": results,
    }


def run_peer(command: list[str]) -> dict[str, object]:
    print("$ " + " ".join(command), flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:])
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peers(names: list[str], threads: int, decode_tokens: int, cases: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    if "transformers" in names:
        native = MODELS / "real-shape-native"
        if not (native / "config.json").exists():
            convert_to_native(MODELS / "real-shape-hf", native)
        out["transformers"] = run_peer(
            [
                sys.executable,
                str(REPO / "bench" / "peer_transformers.py"),
                str(native),
                str(cases),
                "--threads",
                str(threads),
                "--decode-tokens",
                str(decode_tokens),
            ]
        )
    if "llamacpp" in names:
        out["llamacpp"] = run_peer(
            [
                sys.executable,
                str(REPO / "bench" / "peer_llamacpp.py"),
                str(MODELS / "real-shape-hf"),
                str(MODELS / "real-shape-gguf"),
                "--threads",
                str(threads),
                "--prompt-tokens",
                "128",
                "400",
                "--decode-tokens",
                str(decode_tokens),
            ]
        )
    return out


def comparison(report: dict[str, Any]) -> list[str]:
    """Decode, prefill, ViT and TTFT side by side, with vlbatch's ratio over each peer."""
    rows: list[tuple[str, str, float | None]] = []
    for weights in ("int4", "int8", "fp32"):
        r = report.get(weights)
        if r:
            one = r["cases"]["1 image"]
            rows.append((f"vlbatch {weights}", "decode tok/s", one["decode_tok_s"]))
            rows.append((f"vlbatch {weights}", "prefill tok/s", r["prefill_tok_s"]))
            rows.append((f"vlbatch {weights}", "ViT ms/tile", r["vit_ms_per_tile"]))
            rows.append((f"vlbatch {weights}", "TTFT 1 image ms", one["ttft_ms"]))
    hf = report.get("peers", {}).get("transformers", {})
    if "decode_tok_s" in hf:
        rows.append(("transformers fp32", "decode tok/s", hf["decode_tok_s"]))
        rows.append(("transformers fp32", "ViT ms/tile", hf["vit_ms_per_tile"]))
        rows.append(("transformers fp32", "TTFT 1 image ms", hf["ttft_ms"]["1 image"]))
    for quant, figures in report.get("peers", {}).get("llamacpp", {}).items():
        if isinstance(figures, dict):
            rows.append((f"llama.cpp {quant}", "decode tok/s", figures["decode_tok_s"]))
            rows.append((f"llama.cpp {quant}", "prefill tok/s", figures["prefill_400_tok_s"]))
    lines = [f"{'who':<20} {'metric':<16} {'value':>10}"]
    lines += [f"{who:<20} {metric:<16} {value:>10.2f}" for who, metric, value in rows]
    best = {m: v for who, m, v in rows if who == f"vlbatch {report['weights'][0]}"}
    for who, metric, value in rows:
        if who.startswith("vlbatch") or metric not in best:
            continue
        higher_is_better = metric.endswith("tok/s")
        ratio = best[metric] / value if higher_is_better else value / best[metric]
        lines.append(f"vlbatch {report['weights'][0]} vs {who}: {metric} x{ratio:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=["int4", "fp32"], choices=["fp32", "int8", "int4"])
    parser.add_argument("--peers", nargs="*", default=[], choices=["transformers", "llamacpp"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {**machine(), "threads": args.threads},
        "model": "real-shape (InternVL3-2B dimensions), random weights",
        "weights": args.weights,
    }
    print(f"machine: {report['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp)
        write_demo_media(media)
        cases = Path(tmp) / "cases.npz"
        for weights in args.weights:
            folder = cached_export(weights)
            print(f"{weights}:", flush=True)
            report[weights] = bench_export(folder, args.threads, args.decode_tokens, media, cases)
            r = report[weights]
            summary = f"ViT {r['vit_ms_per_tile']:.0f} ms/tile, prefill {r['prefill_tok_s']:.1f} tok/s"
            print(f"  load {r['load_s']:.1f} s, {summary}")
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {report['peak_rss_mb']:.0f} MB")
        report["peers"] = peers(args.peers, args.threads, args.decode_tokens, cases)
    print("\n".join(comparison(report)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
