"""Peer: transformers' InternVLForConditionalGeneration (torch CPU, fp32) on the same weights and prompts.

    python bench/peer_transformers.py NATIVE_DIR CASES.npz --threads 2 --decode-tokens 32

CASES.npz holds the prompts vlbatch ran (`<case>_ids`, and `<case>_pixels` where there are images). Prints one
JSON object: ViT ms per tile, TTFT per case, decode ms/token and tokens/s after the one-image prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import InternVLForConditionalGeneration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("native_dir", type=Path)
    parser.add_argument("cases", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = InternVLForConditionalGeneration.from_pretrained(args.native_dir, dtype=torch.float32).eval()
    result: dict[str, object] = {"load_s": time.perf_counter() - started, "ttft_ms": {}}
    data = np.load(args.cases)
    names = sorted({key.rsplit("_", 1)[0] for key in data.files})
    with torch.inference_mode():
        tile = torch.from_numpy(data["1 image_pixels"][:1])
        model.model.get_image_features(pixel_values=tile)  # warm-up
        t = time.perf_counter()
        model.model.get_image_features(pixel_values=tile)
        result["vit_ms_per_tile"] = (time.perf_counter() - t) * 1e3
        for name in names:
            ids = torch.from_numpy(data[f"{name}_ids"][None])
            extra = {"pixel_values": torch.from_numpy(data[f"{name}_pixels"])} if f"{name}_pixels" in data else {}
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **extra)
            result["ttft_ms"][name] = (time.perf_counter() - t) * 1e3
            if name == "1 image":
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t = time.perf_counter()
                for _ in range(args.decode_tokens):
                    out = model(input_ids=token, cache=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                seconds = time.perf_counter() - t
                result["decode_ms_per_token"] = seconds / args.decode_tokens * 1e3
                result["decode_tok_s"] = args.decode_tokens / seconds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
