"""vlbatch at InternVL3-2B's real shape (random weights): the upstream table's cases and a photo caption.

    python bench/run_bench.py [--weights int4+int8 int4 fp32] [--peers transformers llamacpp] [--threads 2]
                              [--decode-tokens 32] [--json out.json] [--allow-missing-peers]

Builds (once, cached under models/) the real-shape model and one export per --weights name (int4+int8: int4
decode layers with an int8 ViT and int8 prompt layers), then reports per export: model load time, ViT ms per 448
tile, TTFT for 0 images (128-token prompt), 1 image, 4 images and an 8-frame video, decode ms/token and tokens/s
over a fixed number of tokens (end-of-turn ignored), and the process's peak RSS. The planning cases caption a
4:3 photo (64 tokens) at max_tiles 12, 6 and 1: TTFT, the ViT's and the prefill's share of it, seconds per photo
and photos per hour, next to the same arithmetic from the published AX650N figures (computed, not measured). The
peers run afterwards, one subprocess each, on the same weights, prompts and thread count: transformers (torch
fp32) and llama.cpp (Q4_0, Q8_0); the ratios close the report.

Decode at each case's context: vlbatch decodes --decode-tokens tokens after each case's own prompt, and llama.cpp
is given prompts of the same lengths (128 tokens and the token counts of the 1-image, 4-image and video prompts as
the first export's run measured them; text token ids, since decode's cost follows the context's length, not what
filled it) and decodes as many tokens after each. A table, "decode tokens/s at each case's context", shows a row
per case (with its prompt tokens), a column per export and per llama.cpp quantization, and the int4 export's
ratio over Q4_0 (int4+int8's when there is no int4 export, else the first export's); a failed llama.cpp is a
FAILED column with its cause and no ratio. The JSON report holds it as `decode_at_contexts`. The comparison's
llama.cpp decode and prefill are at the 1-image prompt's length, as vlbatch's are.

The photo case (--peers mtmd) captions the same --photos synthetic 4:3 photos with the same prompt and
--caption-tokens new tokens (end-of-turn ignored) at --photo-max-tiles, through vlbatch's worker (one `vlbatch
run` of the first --weights export, bench/photos_per_hour.py) and through llama.cpp's own image pipeline (libmtmd
with the InternVL projector, Q4_0, its own tiling: bench/peer_mtmd.py), in --photo-rounds paired rounds
(vlbatch first, then llama.cpp first, ...; each a fresh process, photos per hour counted after the model's
load): the tiles per photo, the stages and photos per hour side by side, and the median of the per-round ratios.

A peer that gives no figures (a crash, a signal, a missing package, a time-out) is shown as FAILED with its
cause, no ratio is printed against it, and the run exits 1 unless --allow-missing-peers is given.
A benchmark, not a test: nothing checks these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from peers import PeerOutcome, run_peer  # noqa: E402
from photos_per_hour import worker_photos, write_photos  # noqa: E402
from synthetic import synthetic_image, write_demo_media  # noqa: E402

from batch.infer.generate import Timings  # noqa: E402
from batch.infer.media import choose_tile_cap, tile_count  # noqa: E402
from batch.infer.pipeline import Pipeline, Request  # noqa: E402
from batch.infer.settings import GenerationSettings, MediaSettings  # noqa: E402
from batch.model.export.exporter import export  # noqa: E402
from batch.model.tinymodel import convert_to_native, make_model  # noqa: E402
from batch.service.reports.planning import AX650N_PREFILL_CAPACITY, INT8_ARITHMETIC, ax650n_rates  # noqa: E402

PHOTO = (2048, 1536)  # a 4:3 photo, as most cameras and phones take them
CAPTION_PROMPT = "Write a caption for this photo."
PEER_INSTALL = "make bench-peers, or pip install -e '.[bench]'"


# --weights: an export's weights, or int4+int8: int4 decode layers with an int8 ViT and int8 prompt layers
EXPORTS = {
    "fp32": {"weights": "fp32"},
    "int8": {"weights": "int8"},
    "int4": {"weights": "int4"},
    INT8_ARITHMETIC: {"weights": "int4", "vit_weights": "int8", "prefill_weights": "int8"},
}


def cached_export(models: Path, preset: str, name: str) -> Path:
    hf = models / f"{preset}-hf"
    if not (hf / "config.json").exists():
        make_model(hf, preset=preset)
    out = models / f"{preset}-{name}"
    if not (out / "manifest.json").exists():
        export(hf, out, **EXPORTS[name])
    return out


def machine() -> dict[str, str | int]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []

    def first(*keys: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(keys)), "")

    cpu = first("model name") or platform.processor()
    flags = set(first("flags", "Features").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "asimddp", "sve", "i8mm")
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "cpu_features": " ".join(f for f in wanted if f in flags),
        "python": platform.python_version(),
    }


def run_case(pipeline: Pipeline, request: Request, decode_tokens: int) -> dict[str, float]:
    """One answer of decode_tokens + 1 tokens (end-of-turn ignored), timed stage by stage."""
    timings = Timings()
    settings = GenerationSettings(max_new_tokens=decode_tokens + 1, ignore_eos=True)
    started = time.perf_counter()
    for _ in pipeline.steps(request, settings, timings):
        pass
    return {
        "prompt_tokens": len(request.ids),
        "tiles": 0 if request.pixels is None else len(request.pixels),
        "image_tokens": int((request.ids == pipeline.image_token).sum()),
        "preprocess_ms": request.preprocess_ms,
        "vit_ms": timings.vit_ms,
        "prefill_ms": timings.prefill_ms,
        "ttft_ms": timings.ttft_ms,
        "decode_ms": timings.decode_ms,
        "decode_ms_per_token": timings.decode_ms / max(1, timings.decode_tokens),
        "decode_tok_s": timings.tokens_per_s,
        "answer_s": time.perf_counter() - started,
    }


def bench_export(
    folder: Path,
    threads: int,
    decode_tokens: int,
    caption_tokens: int,
    photo_tiles: list[int],
    media: Path,
    save_cases: Path | None = None,
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
    photos = {}
    for max_tiles in photo_tiles:  # the planning cases: one photo captioned, preparation included
        pipeline.vit_cache = type(pipeline.vit_cache)()
        request = pipeline.prepare(CAPTION_PROMPT, [media / "photo.jpg"], MediaSettings(max_tiles=max_tiles))
        r = photos[f"photo max_tiles {max_tiles}"] = run_case(pipeline, request, caption_tokens - 1)
        r["seconds_per_photo"] = r["preprocess_ms"] / 1e3 + r["answer_s"]
        print(
            f"  photo max_tiles {max_tiles:<2} {r['tiles']:>2} tiles {r['prompt_tokens']:>5} tokens  "
            f"TTFT {r['ttft_ms'] / 1e3:6.1f} s  {r['seconds_per_photo']:6.1f} s/photo",
            flush=True,
        )
    fused = bool(getattr(pipeline.backend, "fused_attention", False))
    pipeline.close()
    one = results["1 image"]
    return {
        "load_s": load_s,
        "fused_attention": fused,  # the layers' attention as one native node (batch/infer/runtime/native_attention.py)
        "vit_ms_per_tile": one["vit_ms"],
        "prefill_tok_s": one["prompt_tokens"] / (one["prefill_ms"] / 1e3),
        "cases": results,
        "photos": photos,
    }


def ax650n_photos(measured: dict[str, dict[str, float]], caption_tokens: int) -> dict[str, dict[str, Any]]:
    """The planning cases computed from the published AX650N figures, per published axmodel folder.

    Each folder prefills at most so many tokens (1152 for chunk_128, 2176 for chunk_128_2048), so the pipeline
    lowers max_tiles there exactly as it does on any backend; the text around the image is the measured case's.
    """
    rates = ax650n_rates()
    out: dict[str, dict[str, Any]] = {}
    for folder, capacity in AX650N_PREFILL_CAPACITY.items():
        out[folder] = {}
        for name, case in measured.items():
            settings = MediaSettings(max_tiles=int(name.rsplit(" ", 1)[1]))
            per_tile = case["image_tokens"] // case["tiles"]
            text = case["prompt_tokens"] - case["image_tokens"]
            cap = choose_tile_cap([PHOTO], settings, (capacity - text) // per_tile)
            tiles = tile_count(*PHOTO, cap, settings.image_size, settings.use_thumbnail)
            unit = rates.unit(tiles, text + tiles * per_tile, caption_tokens)
            out[folder][name] = {
                "tiles": tiles,
                "prompt_tokens": text + tiles * per_tile,
                "vit_ms": unit.vit_ms,
                "prefill_ms": unit.prefill_ms,
                "ttft_ms": unit.vit_prefill_ms,
                "seconds_per_photo": unit.total_ms / 1e3,
            }
    return out


def planning_table(report: dict[str, Any]) -> list[str]:
    """The 'how long will my folder take' rows: every export's measured photos, then AX650N computed. A measured
    TTFT holds the photo's preparation (preprocess_ms, batch/infer/timings.py) beside the ViT's and the prefill's
    shares; a computed one is ViT plus prefill only (the board's own CPU work is not in the published figures)."""
    lines = [
        f"{'who':<31} {'max_tiles':>9} {'tiles':>5} {'tokens':>6} {'TTFT s':>7} {'ViT %':>6} {'prefill %':>9} "
        f"{'s/photo':>8} {'photos/h':>8}"
    ]
    sources = [(f"vlbatch {w} (measured)", report[w]["photos"]) for w in report["weights"] if report.get(w)]
    for folder, photos in report.get("ax650n_photos", {}).items():
        sources.append((f"AX650N {folder} (computed)", photos))
    for who, photos in sources:
        for name, r in photos.items():
            ttft = r["ttft_ms"]
            lines.append(
                f"{who:<31} {name.rsplit(' ', 1)[1]:>9} {r['tiles']:>5} {r['prompt_tokens']:>6} {ttft / 1e3:>7.1f} "
                f"{100 * r['vit_ms'] / ttft:>5.0f}% {100 * r['prefill_ms'] / ttft:>8.0f}% "
                f"{r['seconds_per_photo']:>8.1f} {3600 / r['seconds_per_photo']:>8.0f}"
            )
    return lines


def case_prompt_tokens(report: dict[str, Any]) -> list[int]:
    """The prompt token counts of the cases, in case order and each once, as the first export's run saw them."""
    cases = report[report["weights"][0]]["cases"]
    return list(dict.fromkeys(int(r["prompt_tokens"]) for r in cases.values()))


def peers(
    names: list[str],
    models: Path,
    preset: str,
    threads: int,
    decode_tokens: int,
    cases: Path,
    timeout_s: float,
    prompt_tokens: list[int],
) -> dict[str, PeerOutcome]:
    """Each peer of --peers in its own subprocess; llama.cpp prefills, and decodes after, every prompt_tokens."""
    out: dict[str, PeerOutcome] = {}
    if "transformers" in names:
        native = models / f"{preset}-native"
        if not (native / "config.json").exists():
            convert_to_native(models / f"{preset}-hf", native)
        command = [sys.executable, str(REPO / "bench" / "peer_transformers.py"), str(native), str(cases)]
        command += ["--threads", str(threads), "--decode-tokens", str(decode_tokens)]
        out["transformers"] = run_peer("transformers", command, timeout_s, install_hint=PEER_INSTALL)
    if "llamacpp" in names:
        command = [sys.executable, str(REPO / "bench" / "peer_llamacpp.py"), str(models / f"{preset}-hf")]
        command += [str(models / f"{preset}-gguf"), "--threads", str(threads)]
        command += ["--prompt-tokens", *map(str, prompt_tokens), "--decode-tokens", str(decode_tokens)]
        out["llamacpp"] = run_peer("llamacpp", command, timeout_s, install_hint=PEER_INSTALL)
    return out


LLAMA_QUANTS = ("Q4_0", "Q8_0")


def ratio_export(weights: list[str]) -> str:
    """The export set against llama.cpp Q4_0 per context: int4, else int4+int8 (int4 decode layers too), else the
    first."""
    return next((w for w in ("int4", INT8_ARITHMETIC) if w in weights), weights[0])


def decode_at_contexts(report: dict[str, Any], llama: PeerOutcome | None, decode_tokens: int) -> dict[str, Any]:
    """Decode tokens/s at each case's context: per case (its prompt tokens), every export's own figure, llama.cpp's
    decode after a prompt of that length per quantization, and the ratio_export's ratio over Q4_0.

    `ratio` (what over what) is None, and so is every row's, unless llama.cpp gave Q4_0 figures; a failed
    llama.cpp is named in `llamacpp_failed`. A context llama.cpp has no figure for (a run with other lengths) is
    None, and so is that row's ratio.
    """
    exports = [w for w in report["weights"] if report.get(w)]
    figures = llama.figures if llama is not None else None
    theirs = figures or {}
    quants = [q for q in LLAMA_QUANTS if isinstance(theirs.get(q), dict)]
    ours = f"vlbatch {ratio_export(exports)}"
    ratio = {"of": ours, "over": "llama.cpp Q4_0"} if "Q4_0" in quants else None
    rows = []
    for case, first in report[exports[0]]["cases"].items():
        n = first["prompt_tokens"]
        speeds: dict[str, float | None] = {
            f"vlbatch {w}": report[w]["cases"].get(case, {}).get("decode_tok_s") for w in exports
        }
        for quant in quants:
            speeds[f"llama.cpp {quant}"] = theirs[quant].get(f"decode_after_{n}_tok_s")
        a, b = speeds.get(ours), speeds.get("llama.cpp Q4_0")
        rows.append({"case": case, "prompt_tokens": n, "decode_tok_s": speeds, "ratio": a / b if a and b else None})
    out: dict[str, Any] = {"decode_tokens": decode_tokens, "columns": list(rows[0]["decode_tok_s"]) if rows else []}
    out |= {"ratio": ratio, "rows": rows}
    if theirs.get("cpu_variant"):
        out["llamacpp_cpu_variant"] = theirs["cpu_variant"]
    if llama is not None and figures is None:
        out["llamacpp_failed"] = llama.failure or "no figures"
    return out


def decode_context_table(table: dict[str, Any]) -> list[str]:
    """decode_at_contexts as text: a row per case, a column per export and llama.cpp quantization, the ratio last;
    a failed llama.cpp is a FAILED column and a line with its cause, and no ratio."""
    failed = table.get("llamacpp_failed")
    heads = [*table["columns"], *(["llama.cpp"] if failed is not None else [])]
    ratio = table["ratio"]
    if ratio is not None:
        heads.append(f"{ratio['of'].removeprefix('vlbatch ')} / {ratio['over'].removeprefix('llama.cpp ')}")
    widths = [max(9, len(h)) for h in heads]
    variant = f"; llama.cpp's CPU variant {table['llamacpp_cpu_variant']}" if table.get("llamacpp_cpu_variant") else ""
    lines = [
        f"decode tokens/s at each case's context ({table['decode_tokens']} tokens decoded after each prompt{variant})",
        f"{'case':<16} {'tokens':>6}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)),
    ]
    for row in table["rows"]:
        cells = ["-" if v is None else f"{v:.2f}" for v in row["decode_tok_s"].values()]
        cells += ["FAILED"] if failed is not None else []
        if ratio is not None:
            cells.append("-" if row["ratio"] is None else f"x{row['ratio']:.2f}")
        lines.append(
            f"{row['case']:<16} {row['prompt_tokens']:>6}  "
            + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    if failed is not None:
        lines.append(f"llama.cpp FAILED: {failed}; no ratio against it")
    return lines


def comparison(report: dict[str, Any], outcomes: dict[str, PeerOutcome]) -> list[str]:
    """Decode, prefill, ViT and TTFT side by side, with vlbatch's ratio over each peer that gave figures.

    vlbatch's decode and prefill are its 1-image case's; llama.cpp's are after and of a prompt of that length
    (decode after its last prompt, and prefill of 400 tokens, from a peer run without that length).
    """
    rows: list[tuple[str, str, float | None]] = []
    measured = [w for w in report["weights"] if report.get(w)]
    one_image = report[measured[0]]["cases"]["1 image"]["prompt_tokens"] if measured else None
    for weights in report["weights"]:
        r = report.get(weights)
        if r:
            one = r["cases"]["1 image"]
            rows.append((f"vlbatch {weights}", "decode tok/s", one["decode_tok_s"]))
            rows.append((f"vlbatch {weights}", "prefill tok/s", r["prefill_tok_s"]))
            rows.append((f"vlbatch {weights}", "ViT ms/tile", r["vit_ms_per_tile"]))
            rows.append((f"vlbatch {weights}", "TTFT 1 image ms", one["ttft_ms"]))
    failed: list[tuple[str, str]] = []
    hf = outcomes.get("transformers")
    if hf is not None and hf.figures is not None:
        rows.append(("transformers fp32", "decode tok/s", hf.figures["decode_tok_s"]))
        rows.append(("transformers fp32", "ViT ms/tile", hf.figures["vit_ms_per_tile"]))
        rows.append(("transformers fp32", "TTFT 1 image ms", hf.figures["ttft_ms"]["1 image"]))
    elif hf is not None:
        failed.append(("transformers fp32", hf.failure or "no figures"))
    llama = outcomes.get("llamacpp")
    if llama is not None and llama.figures is not None:
        variant = llama.figures.get("cpu_variant")
        for quant, figures in llama.figures.items():
            if isinstance(figures, dict) and "decode_tok_s" in figures:
                who = f"llama.cpp {quant}" + (f" ({variant})" if variant else "")
                rows.append(
                    (who, "decode tok/s", figures.get(f"decode_after_{one_image}_tok_s", figures["decode_tok_s"]))
                )
                prefill = figures.get(f"prefill_{one_image}_tok_s", figures.get("prefill_400_tok_s"))
                if prefill is not None:
                    rows.append((who, "prefill tok/s", prefill))
    elif llama is not None:
        failed.append(("llama.cpp", llama.failure or "no figures"))
    mtmd = outcomes.get("mtmd")
    if mtmd is not None and mtmd.figures is not None:
        ours = [r["photos_per_hour"] for r in report["photo_case"]["vlbatch"]]
        rows.append((f"vlbatch {report['weights'][0]}", "photos/h", float(np.median(ours))))
        rows.append((f"llama.cpp mtmd {mtmd.figures['quant']}", "photos/h", mtmd.figures["median_photos_per_hour"]))
    elif mtmd is not None:
        failed.append(("llama.cpp mtmd", mtmd.failure or "no figures"))
    lines = [f"{'who':<28} {'metric':<16} {'value':>10}"]
    lines += [f"{who:<28} {metric:<16} {value:>10.2f}" for who, metric, value in rows]
    lines += [f"{who:<28} {'FAILED':<16} {cause}" for who, cause in failed]
    best = {m: v for who, m, v in rows if who == f"vlbatch {report['weights'][0]}"}
    for who, metric, value in rows:
        if who.startswith("vlbatch") or metric not in best or not value:
            continue
        higher_is_better = metric.endswith(("tok/s", "photos/h"))
        ratio = best[metric] / value if higher_is_better else value / best[metric]
        if metric == "photos/h":  # paired rounds: the median of the rounds' ratios, not the ratio of medians
            ratio = report["photo_case"]["median_ratio"]
        lines.append(f"vlbatch {report['weights'][0]} vs {who}: {metric} x{ratio:.2f}")
    lines += [f"vlbatch {report['weights'][0]} vs {who}: no ratio, the peer FAILED" for who, _ in failed]
    return lines


def photo_case(
    export_dir: Path, hf: Path, gguf_dir: Path, photos: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], PeerOutcome]:
    """vlbatch's worker and llama.cpp mtmd captioning the same photos in paired rounds (the order alternating).

    Returns the rounds' figures and the peer's outcome: its last round's figures with the median photos per
    hour over the rounds, or its failure (the first round it failed in ends the case).
    """
    command = [sys.executable, str(REPO / "bench" / "peer_mtmd.py"), str(hf), str(gguf_dir), str(photos)]
    command += ["--max-tiles", str(args.photo_max_tiles), "--max-new-tokens", str(args.caption_tokens)]
    command += ["--threads", str(args.threads)]
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    failure: str | None = None
    for i in range(args.photo_rounds):
        for side in ("vlbatch", "mtmd") if i % 2 == 0 else ("mtmd", "vlbatch"):
            if side == "vlbatch":
                r = worker_photos(
                    export_dir, photos, args.photo_max_tiles, args.caption_tokens, args.threads, ignore_eos=True
                )
                ours.append(r)
            else:
                outcome = run_peer("mtmd", command, args.peer_timeout, install_hint=PEER_INSTALL)
                if outcome.figures is None:
                    failure = outcome.failure or "no figures"
                    break
                theirs.append(r := outcome.figures)
            print(f"  round {i + 1} {side}: {r['photos_per_hour']:.0f} photos/h", flush=True)
        if failure:
            break
    ratios = [a["photos_per_hour"] / b["photos_per_hour"] for a, b in zip(ours, theirs, strict=False)]
    case: dict[str, Any] = {
        "photos": args.photos,
        "max_tiles": args.photo_max_tiles,
        "caption_tokens": args.caption_tokens,
        "weights": args.weights[0],
        "vlbatch": ours,
        "mtmd": theirs if failure is None else {"failed": failure},
        "ratios": ratios,
    }
    if failure is not None:
        return case, PeerOutcome("mtmd", None, failure)
    case["median_ratio"] = float(np.median(ratios))
    figures = {**theirs[-1], "median_photos_per_hour": float(np.median([r["photos_per_hour"] for r in theirs]))}
    return case, PeerOutcome("mtmd", figures)


def _tiles(per_photo: list[int]) -> str:
    return str(per_photo[0]) if len(set(per_photo)) == 1 else f"{min(per_photo)}-{max(per_photo)}"


def photo_table(case: dict[str, Any], outcome: PeerOutcome) -> list[str]:
    """The photo case side by side: per side the median round's stages, then every round and the median ratio."""
    lines = [
        f"photo case: {case['photos']} photos, max_tiles {case['max_tiles']}, {case['caption_tokens']} new tokens",
        f"{'who':<34} {'tiles':>5} {'prep s':>7} {'ViT s':>7} {'prefill s':>9} {'decode s':>8} {'s/photo':>8} "
        f"{'photos/h':>8}",
    ]
    sides = [(f"vlbatch {case['weights']} (worker)", case["vlbatch"])]
    if outcome.figures is not None:
        variant = outcome.figures.get("cpu_variant")
        sides.append((f"llama.cpp mtmd {outcome.figures.get('quant', '')} ({variant})", case["mtmd"]))
    for who, rounds in sides:
        r = sorted(rounds, key=lambda x: x["photos_per_hour"])[len(rounds) // 2]  # the median round
        lines.append(
            f"{who:<34} {_tiles(r['tiles_per_photo']):>5} {r['preparation_s']:>7.2f} {r['vit_s']:>7.2f} "
            f"{r['prefill_s']:>9.2f} {r['decode_s']:>8.2f} {r['seconds_per_photo']:>8.2f} "
            f"{r['photos_per_hour']:>8.0f}"
        )
    if outcome.figures is None:
        lines.append(f"{'llama.cpp mtmd':<34} FAILED {outcome.failure}")
        return lines
    for i, (a, b, ratio) in enumerate(zip(case["vlbatch"], case["mtmd"], case["ratios"], strict=True), 1):
        lines.append(
            f"round {i}: vlbatch {a['photos_per_hour']:.0f} photos/h, llama.cpp mtmd {b['photos_per_hour']:.0f} "
            f"photos/h, x{ratio:.2f}"
        )
    ratios = case["ratios"]
    lines.append(
        f"vlbatch {case['weights']} / llama.cpp mtmd photos/h: median x{case['median_ratio']:.2f} "
        f"(rounds from x{min(ratios):.2f} to x{max(ratios):.2f})"
    )
    return lines


def write_photo(folder: Path) -> None:
    synthetic_image(*PHOTO, seed=7).save(folder / "photo.jpg", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights", nargs="+", default=[INT8_ARITHMETIC, "int4", "fp32"], choices=list(EXPORTS), help="exports"
    )
    parser.add_argument("--peers", nargs="*", default=[], choices=["transformers", "llamacpp", "mtmd"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--caption-tokens", type=int, default=64, help="answer length of the planning cases")
    parser.add_argument("--photo-tiles", type=int, nargs="*", default=[12, 6, 1], help="max_tiles of the photo cases")
    parser.add_argument("--photos", type=int, default=20, help="photos of the photo case (--peers mtmd)")
    parser.add_argument("--photo-max-tiles", type=int, default=1, help="max_tiles of the photo case, both sides")
    parser.add_argument("--photo-rounds", type=int, default=3, help="paired rounds of the photo case")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--allow-missing-peers", action="store_true", help="exit 0 even when a peer failed (it is still shown)"
    )
    parser.add_argument("--peer-timeout", type=float, default=3600, help="seconds a peer may run (default 3600)")
    parser.add_argument("--preset", default="real-shape", help="model preset (tiny: a quick check of the script)")
    parser.add_argument("--models", type=Path, default=REPO / "models", help="where the models are cached")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {**machine(), "threads": args.threads},
        "model": f"{args.preset} (InternVL3-2B dimensions), random weights"
        if args.preset == "real-shape"
        else f"{args.preset}, random weights",
        "weights": args.weights,
    }
    print(f"machine: {report['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp)
        write_demo_media(media)
        write_photo(media)
        cases = Path(tmp) / "cases.npz"
        for weights in args.weights:
            folder = cached_export(args.models, args.preset, weights)
            print(f"{weights}:", flush=True)
            report[weights] = r = bench_export(
                folder, args.threads, args.decode_tokens, args.caption_tokens, args.photo_tiles, media, cases
            )
            summary = f"ViT {r['vit_ms_per_tile']:.0f} ms/tile, prefill {r['prefill_tok_s']:.1f} tok/s"
            print(f"  load {r['load_s']:.1f} s, {summary}")
        report["ax650n_photos"] = ax650n_photos(report[args.weights[0]]["photos"], args.caption_tokens)
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {report['peak_rss_mb']:.0f} MB")
        outcomes = peers(
            args.peers,
            args.models,
            args.preset,
            args.threads,
            args.decode_tokens,
            cases,
            args.peer_timeout,
            case_prompt_tokens(report),
        )
        if "mtmd" in args.peers:
            print(f"photo case: {args.photos} photos, max_tiles {args.photo_max_tiles}, {args.photo_rounds} rounds")
            photos = media / "photos"
            write_photos(photos, args.photos)
            report["photo_case"], outcomes["mtmd"] = photo_case(
                cached_export(args.models, args.preset, args.weights[0]),
                args.models / f"{args.preset}-hf",
                args.models / f"{args.preset}-gguf",
                photos,
                args,
            )
    report["peers"] = {name: o.figures if o.ok else {"failed": o.failure} for name, o in outcomes.items()}
    report["decode_at_contexts"] = decode_at_contexts(report, outcomes.get("llamacpp"), args.decode_tokens)
    print("\n".join(planning_table(report)))
    if "photo_case" in report:
        print("\n".join(photo_table(report["photo_case"], outcomes["mtmd"])))
    print("\n".join(decode_context_table(report["decode_at_contexts"])))
    print("\n".join(comparison(report, outcomes)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = [name for name, o in outcomes.items() if not o.ok]
    if failed and not args.allow_missing_peers:
        print(f"FAILED peers: {', '.join(failed)} (see above); --allow-missing-peers accepts a run without them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
