"""Photos per hour with llama-server as the model (`model.backend: openai`) against vlbatch's own CPU path.

    python bench/server_photos.py speed GGUF_DIR MODEL_DIR [--photos 20] [--slots 1 2 4] [--threads 2]
    python bench/server_photos.py compare [--photos 12] [--max-new-tokens 32]

`speed`: one `vlbatch run` captioning the same N synthetic 2048x1536 photos (one tile each, 64 greedy tokens,
end-of-turn ignored) through llama-server started with `-np S` for each S in --slots, vlbatch asking with
`model.concurrency` S, then through vlbatch's own export in MODEL_DIR (model.batch 8): photos per hour after the
model's load, and the stages per photo. GGUF_DIR holds the language model (model-Q4_0.gguf) and the projector
(mmproj-f16-max1.gguf) of the same checkpoint (bench/peer_mtmd.py writes them). The server and vlbatch's own path
get the same threads.

`compare`: the tiny random-weight model, fp32 in vlbatch's export and f16 in llama.cpp's files, answering the same
photos greedily both ways: what the two preprocessings make of a photo (tiles, prompt tokens) and how many answers
come out the same.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from llama_server import LlamaServer, convert_for_llama  # noqa: E402
from photos_per_hour import worker_photos, write_photos  # noqa: E402


def speed(args: argparse.Namespace) -> None:
    from run_bench import machine

    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_features']}), {args.threads} threads")
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        write_photos(photos, args.photos)
        for slots in args.slots:
            server = LlamaServer(
                args.gguf_dir / "model-Q4_0.gguf",
                args.gguf_dir / "mmproj-f16-max1.gguf",
                Path(tmp),
                parallel=slots,
                ctx=slots * 1536,
                threads=args.threads,
            )
            server.start(timeout=600)
            try:
                result = worker_photos(
                    args.model_dir, photos, 1, 64, args.threads, ignore_eos=True, server=(server.url, slots)
                )
            finally:
                server.stop()
            rows.append((f"llama-server -np {slots}, concurrency {slots}", result))
            _print(*rows[-1])
        result = worker_photos(args.model_dir, photos, 1, 64, args.threads, ignore_eos=True)
        rows.append((f"vlbatch's own ({args.model_dir.name}, batch 8)", result))
        _print(*rows[-1])
    print(json.dumps({who: r for who, r in rows}, indent=1))


def _print(who: str, r: dict[str, Any]) -> None:
    print(
        f"{who:<52} {r['photos_per_hour']:7.0f} photos/h  {r['seconds_per_photo']:5.2f} s/photo  "
        f"prep {r['preparation_s']:.2f} s, ViT {r['vit_s']:.2f} s, prefill {r['prefill_s']:.2f} s, "
        f"decode {r['decode_s']:.2f} s per photo, prompt {r['prompt_tokens']:.0f} tokens",
        flush=True,
    )


def compare(args: argparse.Namespace) -> None:
    """The same photos answered by the tiny model in both runtimes: tiles, prompt tokens, equal answers."""
    from batch.model.export.exporter import export
    from batch.model.tinymodel import make_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_model(root / "tiny-hf", preset="tiny", seed=0)
        export(hf, root / "tiny-onnx")
        model, mmproj = convert_for_llama(hf, root / "gguf")
        photos = root / "photos"
        write_photos(photos, args.photos)
        own = _answers(root / "own", photos, {"dir": root / "tiny-onnx", "batch": 1}, args.max_new_tokens)
        with LlamaServer(model, mmproj, root, parallel=1, ctx=4096, threads=2) as server:
            served = _answers(
                root / "server", photos, {"backend": "openai", "url": server.url, "concurrency": 1}, args.max_new_tokens
            )
    same = sum(own[name]["answer"] == served[name]["answer"] for name in own)
    prefix = [
        _common_prefix(own[name]["answer"], served[name]["answer"]) / max(len(own[name]["answer"]), 1) for name in own
    ]
    print(f"{len(own)} photos (2048x1536), max_tiles 1, greedy, {args.max_new_tokens} tokens at most")
    for label, rows in (("vlbatch (fp32 export)", own), ("llama-server (f16 GGUF)", served)):
        tokens = sorted({r["prompt_tokens"] for r in rows.values()})
        print(f"{label:<26} prompt tokens per photo: {', '.join(map(str, tokens))}")
    shared = 100 * sum(prefix) / len(prefix)
    print(f"equal answers: {same}/{len(own)}; the two answers' common start: {shared:.0f}% of vlbatch's, on average")


def _answers(root: Path, photos: Path, model: dict[str, Any], max_new_tokens: int) -> dict[str, dict[str, Any]]:
    (root / "jobs" / "inbox").mkdir(parents=True)
    settings = "".join(f"  {k}: {v}\n" for k, v in model.items())
    (root / "config.yaml").write_text(
        f"model:\n{settings}generation:\n  max_new_tokens: {max_new_tokens}\n  temperature: 0\n"
        f"media:\n  max_tiles: 1\nspool:\n  media_roots: [{photos}]\n  settle_seconds: 0\n"
    )
    (root / "jobs" / "inbox" / "photos.yaml").write_text(f"prompt: Describe this photo.\ninputs: {photos}\n")
    from batch_throughput import vlbatch

    done = subprocess.run([*vlbatch(), "--config", str(root / "config.yaml"), "run"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    conn = sqlite3.connect(root / "vlbatch.db")
    conn.row_factory = sqlite3.Row
    rows = conn.execute("select media_paths, answer, prompt_tokens, tiles from results where error is null")
    out = {Path(json.loads(r["media_paths"])[0]).name: dict(r) for r in rows}
    conn.close()
    return out


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("gguf_dir", type=Path)
    s.add_argument("model_dir", type=Path)
    s.add_argument("--photos", type=int, default=20)
    s.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    s.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--photos", type=int, default=12)
    c.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    speed(args) if args.command == "speed" else compare(args)


if __name__ == "__main__":
    main()
