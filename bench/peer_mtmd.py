"""Peer: llama.cpp's own image pipeline (libmtmd with the InternVL projector) captioning photos: photos per hour.

    python bench/peer_mtmd.py HF_DIR GGUF_DIR PHOTO_DIR [--max-tiles 1] [--max-new-tokens 64] [--threads 2]
                              [--quant Q4_0] [--cpu-variant NAME] [--allow-amx] [--llama-src DIR]

The language model is bench/peer_llamacpp.py's GGUF (its writer, with the folder's tokenizer.json vocabulary,
so the <img> and </img> that mtmd puts around an image are the model's own special tokens), quantized to
--quant. The projector (GGUF_DIR/mmproj-f16-maxN.gguf) comes from llama.cpp's converter, `convert_hf_to_gguf.py
--mmproj`, of the llama.cpp source that llama-cpp-python was built from (`make bench-peers` unpacks the pinned
sdist into .venv/llama-src), run on the ORIGINAL InternVL folder (vision_model.*, mlp1.*) with
max_dynamic_patch set to --max-tiles: llama.cpp then tiles each photo itself (its llava-uhd slicing with
InternVL's grids and thumbnail) up to that many tiles.

Every photo in PHOTO_DIR gets vlbatch's chat template around the question (system turn, the image before the
question), and exactly --max-new-tokens greedy tokens (end-of-turn ignored): llama.cpp decodes the JPEG and
slices it (mtmd_helper_bitmap_init_from_file, mtmd_tokenize: "preparation"), encodes the tiles
(mtmd_encode_chunk: "ViT"), puts the text and the image rows through the language model (prefill) and decodes
token by token, the KV cache cleared between photos. Prints one JSON object: photos per hour after the model's
load, seconds per stage per photo, tiles per photo, the prompt's tokens and the first answer.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from peer_llamacpp import cached_gguf, load_cpu_backend  # noqa: E402

from batch.infer.media import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from batch.infer.prompt import build_prompt  # noqa: E402
from batch.model.checkpoint import Checkpoint  # noqa: E402

PROMPT = "Write a caption for this photo."
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

# The converter maps the projector's mlp1.{0,1,3} through the vision tower's block numbers, so a tower of fewer
# than 4 layers (the tiny preset has 2) would leave mlp1.3 unmapped; the map is widened to 4 blocks, which
# changes nothing for a real tower (24 layers).
_CONVERT = """
import runpy, sys
source = sys.argv[1]
sys.path[:0] = [source, source + "/gguf-py"]
import gguf
_map = gguf.get_tensor_name_map
gguf.get_tensor_name_map = lambda arch, n: _map(arch, max(n, 4) if arch == gguf.MODEL_ARCH.MMPROJ else n)
script = source + "/convert_hf_to_gguf.py"
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def llama_source(explicit: Path | None = None) -> Path:
    """The vendored llama.cpp of the installed llama-cpp-python's sdist, as `make bench-peers` unpacks it."""
    if explicit is not None:
        return explicit
    version = importlib.metadata.version("llama-cpp-python")
    return Path(sys.prefix) / "llama-src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def convert_mmproj(hf_dir: Path, out: Path, max_tiles: int, source: Path) -> Path:
    """OUT from llama.cpp's converter (--mmproj, f16) on the original-layout folder, at max_tiles tiles."""
    if out.exists():
        return out
    if not (source / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"{source}/convert_hf_to_gguf.py: missing (make bench-peers unpacks it)")
    config = json.loads((hf_dir / "config.json").read_text())
    if "vision_config" not in config or "llm_config" not in config:
        raise ValueError(f"{hf_dir}: not the original InternVL layout (llm_config, vision_model.*, mlp1.*)")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)  # the folder as is, but for the tile range the projector's metadata carries
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                (staged / item.name).symlink_to(item.resolve())
        config["min_dynamic_patch"], config["max_dynamic_patch"] = 1, max_tiles
        (staged / "config.json").write_text(json.dumps(config))
        if not (staged / "preprocessor_config.json").exists():  # InternVL's published one; vlbatch's normalization
            size = config["vision_config"]["image_size"]
            (staged / "preprocessor_config.json").write_text(
                json.dumps(
                    {
                        "image_mean": IMAGENET_MEAN.tolist(),
                        "image_std": IMAGENET_STD.tolist(),
                        "size": size,
                        "crop_size": size,
                    }
                )
            )
        partial = out.with_suffix(".partial")
        command = [sys.executable, "-c", _CONVERT, str(source), str(staged), "--mmproj", "--outtype", "f16"]
        command += ["--outfile", str(partial)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the vendored gguf-py comes first
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"convert_hf_to_gguf.py --mmproj failed: {lines[-1] if lines else proc.returncode}")
        partial.replace(out)
    return out


def photo_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


def caption_photos(
    lm: Path,
    mmproj: Path,
    photos: list[Path],
    max_new_tokens: int,
    threads: int,
    tokens_per_tile: int,
    max_tiles: int,
) -> dict[str, Any]:
    """Caption every photo through llama.cpp mtmd, greedily, timed stage by stage."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    started = time.perf_counter()
    n_batch = 512
    llm = llama_cpp.Llama(
        model_path=str(lm),
        n_ctx=tokens_per_tile * (max_tiles + 1) + 512 + max_new_tokens,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, threads
    mctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not mctx:
        raise RuntimeError(f"mtmd_init_from_file failed for {mmproj}")
    load_s = time.perf_counter() - started
    lctx, memory = llm.ctx, llama_cpp.llama_get_memory(llm.ctx)
    n_vocab = llm.n_vocab()
    marker = mtmd.mtmd_default_marker().decode()
    prompt = build_prompt(f"{marker}\n{PROMPT}", None, tokens_per_tile).encode()
    null_callback = mtmd.mtmd_helper_post_decode_callback()
    stages = {"preparation": 0.0, "vit": 0.0, "prefill": 0.0, "decode": 0.0}
    tiles: list[int] = []
    prompt_tokens: list[int] = []
    decoded = 0
    first_answer: list[int] = []
    loop_started = time.perf_counter()
    for index, path in enumerate(photos):
        llama_cpp.llama_memory_clear(memory, True)
        t = time.perf_counter()
        bitmap = mtmd.mtmd_helper_bitmap_init_from_file(mctx, str(path).encode(), False)
        if not bitmap:
            raise RuntimeError(f"{path}: mtmd could not read the image")
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text(prompt, len(prompt), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError(f"{path}: mtmd_tokenize failed")
        stages["preparation"] += time.perf_counter() - t
        n_past, new_n_past = 0, llama_cpp.llama_pos(0)
        n_chunks = mtmd.mtmd_input_chunks_size(chunks)
        image_tokens = 0
        for i in range(n_chunks):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                t = time.perf_counter()
                if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
                    raise RuntimeError(f"{path}: mtmd_encode_chunk failed")
                stages["vit"] += time.perf_counter() - t
                image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                t = time.perf_counter()
                rc = mtmd.mtmd_helper_decode_image_chunk(
                    mctx,
                    lctx,
                    chunk,
                    mtmd.mtmd_get_output_embd(mctx),
                    n_past,
                    0,
                    n_batch,
                    ctypes.byref(new_n_past),
                    null_callback,
                    None,
                )
            else:
                t = time.perf_counter()
                last = i == n_chunks - 1
                rc = mtmd.mtmd_helper_eval_chunk_single(
                    mctx, lctx, chunk, n_past, 0, n_batch, last, ctypes.byref(new_n_past)
                )
            if rc != 0:
                raise RuntimeError(f"{path}: llama_decode of the prompt returned {rc}")
            stages["prefill"] += time.perf_counter() - t
            n_past = new_n_past.value
        prompt_tokens.append(int(mtmd.mtmd_helper_get_n_tokens(chunks)))
        tiles.append(image_tokens // tokens_per_tile)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        t = time.perf_counter()
        answer = []
        for k in range(max_new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            answer.append(token)
            if k == max_new_tokens - 1:
                break
            rc = llama_cpp.llama_decode(lctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1))
            if rc != 0:
                raise RuntimeError(f"{path}: llama_decode returned {rc} at token {k + 1}")
            decoded += 1
        stages["decode"] += time.perf_counter() - t
        if index == 0:
            first_answer = answer
    served = time.perf_counter() - loop_started
    n = len(photos)
    result: dict[str, Any] = {
        "photos": n,
        "max_tiles": max_tiles,
        "tiles_per_photo": tiles,
        "prompt_tokens": prompt_tokens,
        "output_tokens": n * max_new_tokens,
        "load_s": load_s,
        "served_s": served,
        "seconds_per_photo": served / n,
        "photos_per_hour": 3600 * n / served,
        "photos_per_hour_wall": 3600 * n / (served + load_s),
    }
    result |= {f"{name}_s": seconds / n for name, seconds in stages.items()}
    result["decode_tok_s"] = decoded / stages["decode"] if stages["decode"] else 0.0
    result["answer_first"] = llm.detokenize(first_answer).decode(errors="replace")
    mtmd.mtmd_free(mctx)
    llm.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, help="the original-layout InternVL folder")
    parser.add_argument("gguf_dir", type=Path, help="where the GGUF files are cached")
    parser.add_argument("photo_dir", type=Path, help="the photos to caption (.jpg, .jpeg, .png)")
    parser.add_argument("--max-tiles", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="Q4_0", choices=["Q4_0", "Q8_0"])
    parser.add_argument("--cpu-variant", help="run this CPU variant (default: the best this CPU runs, AMX aside)")
    parser.add_argument("--allow-amx", action="store_true", help="let the default choice take the AMX variant")
    parser.add_argument("--llama-src", type=Path, help="the vendored llama.cpp (default: .venv/llama-src/...)")
    args = parser.parse_args()
    photos = photo_paths(args.photo_dir)
    if not photos:
        sys.exit(f"{args.photo_dir}: no photos")
    variant, _ = load_cpu_backend(args.cpu_variant, args.allow_amx, False)
    lm = cached_gguf(args.hf_dir, args.gguf_dir, args.quant, args.threads)
    mmproj = convert_mmproj(
        args.hf_dir,
        args.gguf_dir / f"mmproj-f16-max{args.max_tiles}.gguf",
        args.max_tiles,
        llama_source(args.llama_src),
    )
    tokens_per_tile = Checkpoint(args.hf_dir).spec.image_tokens_per_tile
    result = caption_photos(lm, mmproj, photos, args.max_new_tokens, args.threads, tokens_per_tile, args.max_tiles)
    print(json.dumps({"cpu_variant": variant, "quant": args.quant, **result}))


if __name__ == "__main__":
    main()
