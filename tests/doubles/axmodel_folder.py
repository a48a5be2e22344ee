"""Builds the prebuilt-axmodel folder layout from a `vlbatch export` folder, for the axengine test double."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from batch.infer.runtime.onnx_backend import read_manifest


def _node(name: str, dtype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def _write(path: Path, onnx_file: Path, groups: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"format": "axengine-double", "onnx": str(onnx_file), "groups": groups}))


def build_axmodel_folder(onnx_dir: Path, root: Path, chunk: int = 128, prefill_chunks: int = 3, kv: int = 1023) -> Path:
    """Write root/model_axmodel (layers, post, embeddings) and root/vit_axmodel; returns the model folder.

    `onnx_dir`'s decoder layers must have the NPU files' contract (an export of format 2, tests/format2.py)."""
    manifest = read_manifest(onnx_dir)
    assert manifest["version"] <= 2, f"{onnx_dir}: format 3 layers do not have the NPU contract"
    spec = manifest["spec"]
    hidden, kv_dim = spec["text"]["hidden_size"], spec["text"]["num_kv_heads"] * spec["text"]["head_dim"]
    size = spec["vision"]["image_size"]
    tokens = (size // spec["vision"]["patch_size"] // 2) ** 2
    vocab = spec["text"]["vocab_size"]
    model = root / "model_axmodel"
    vit_dir = root / "vit_axmodel"
    model.mkdir(parents=True)
    vit_dir.mkdir(parents=True)
    bf16 = "bfloat16"

    decode = {
        "inputs": [
            _node("K_cache", bf16, (1, kv, kv_dim)),
            _node("V_cache", bf16, (1, kv, kv_dim)),
            _node("indices", "uint32", (1, 1)),
            _node("input", bf16, (1, 1, hidden)),
            _node("mask", bf16, (1, 1, kv + 1)),
        ],
        "outputs": [
            _node("K_cache_out", bf16, (1, 1, kv_dim)),
            _node("V_cache_out", bf16, (1, 1, kv_dim)),
            _node("output", bf16, (1, 1, hidden)),
        ],
    }
    groups = [decode]
    for k in range(1, prefill_chunks + 1):
        history = (1, 1, hidden) if k == 1 else (1, chunk * (k - 1), kv_dim)
        groups.append(
            {
                "placeholder_history": k == 1,
                "kv_dim": kv_dim,
                "inputs": [
                    _node("K_cache", bf16, history),
                    _node("V_cache", bf16, history),
                    _node("indices", "uint32", (1, chunk)),
                    _node("input", bf16, (1, chunk, hidden)),
                    _node("mask", bf16, (1, chunk, chunk * k)),
                ],
                "outputs": [
                    _node("K_cache_out", bf16, (1, chunk, kv_dim)),
                    _node("V_cache_out", bf16, (1, chunk, kv_dim)),
                    _node("output", bf16, (1, chunk, hidden)),
                ],
            }
        )
    for i, name in enumerate(manifest["files"]["layers"]):
        _write(model / f"qwen2_p{chunk}_l{i}_together.axmodel", onnx_dir / name, groups)
    post = {"inputs": [_node("input", bf16, (1, 1, hidden))], "outputs": [_node("output", "float32", (1, 1, vocab))]}
    _write(model / "qwen2_post.axmodel", onnx_dir / manifest["files"]["post"], [post])
    vit = {
        "inputs": [_node("image", "float32", (1, 3, size, size))],
        "outputs": [_node("features", "float32", (1, tokens, hidden))],
    }
    _write(vit_dir / "internvl3_tiny_vit.axmodel", onnx_dir / manifest["files"]["vit"], [vit])
    shutil.copyfile(onnx_dir / manifest["files"]["embed"], model / "model.embed_tokens.weight.npy")
    return model
