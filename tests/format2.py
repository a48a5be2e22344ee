"""Exports of format 2, as vlbatch wrote them before format 3: a float32 token-major K/V history and the positions
as `indices`. Tests write one from the tiny model to hold the runtime to loading exports made by earlier versions.

The layer graph below is format 2's own, kept as it was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from batch.model.checkpoint import Checkpoint
from batch.model.export.graphs import Weights
from batch.model.export.manifest import MANIFEST
from batch.model.export.onnx_builder import CONTRIB_DOMAIN, GraphBuilder
from batch.model.modelspec import ModelSpec


def write_format2(hf_dir: Path, export_dir: Path, out: Path, version: int = 2) -> Path:
    """A copy of the export at `export_dir` whose decoder layers (fp32, from `hf_dir`'s weights) and manifest are
    format `version` (1 or 2)'s; its ViT, post graph and embeddings stay the export's."""
    manifest = json.loads((export_dir / MANIFEST).read_text())
    layers = manifest["files"]["layers"]
    out.mkdir(parents=True)
    for source in export_dir.iterdir():
        if source.name.startswith(("llm_layer_", "llm_prefill_")):
            continue
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, out / source.name)
    ckpt = Checkpoint(hf_dir)
    for i, name in enumerate(layers):
        onnx.save_model(_format2_layer(ckpt.spec, i, ckpt.tensor), out / name)
    manifest["files"].pop("prefill_layers", None)
    manifest.update(version=version, weights="fp32", prefill_weights="same")
    manifest.pop("kv_cache", None)
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _format2_layer(spec: ModelSpec, layer: int, w: Weights) -> onnx.ModelProto:
    """One Qwen2 decoder layer over B rows of S new tokens each, over P history rows per row (all dynamic).

    A prompt chunk is one row of S tokens; a batched decode step is B rows of one token, each at its own position
    (`indices`) with its own history and mask. Every projection runs on all B*S tokens at once, so a decode step of
    B rows reads each weight once.
    """
    t = spec.text
    hid, nh, nkv, d = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    group = nh // nkv
    p = f"language_model.model.layers.{layer}."
    g = GraphBuilder(f"qwen2_layer_{layer}")
    k_hist = g.input("K_cache", np.float32, ["rows", "history", t.kv_dim])
    v_hist = g.input("V_cache", np.float32, ["rows", "history", t.kv_dim])
    indices = g.input("indices", np.uint32, ["rows", "chunk"])
    x = g.input("input", np.float32, ["rows", "chunk", hid])
    mask = g.input("mask", np.float32, ["rows", "chunk", "total"])

    # rotary tables, one row per token (B*S, d/2); onnxruntime's RotaryEmbedding rotates the halves of each head
    # (rotate_half, not interleaved), token (b, s) with table row b*S+s (its position_ids)
    inv_freq = 1.0 / (t.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv_freq = (inv_freq / t.rope_scaling_factor).astype(np.float32)
    pos = g.reshape(g.op("Cast", [indices], to=onnx.TensorProto.FLOAT), [-1, 1])  # (B*S, 1)
    angles = g.op("Mul", [pos, g.weight("rope.inv_freq", inv_freq)])  # (B*S, d/2)
    cos, sin = g.op("Cos", [angles]), g.op("Sin", [angles])
    tokens = g.op("Range", [g.const(0), g.op("Size", [indices]), g.const(1)])
    table_rows = g.op("Reshape", [tokens, g.op("Shape", [indices])])  # (B, S): b*S+s

    def rope(states: str) -> str:
        return g.op("RotaryEmbedding", [states, table_rows, cos, sin], domain=CONTRIB_DOMAIN, interleaved=0)

    h = g.rms_norm(x, p + "input_layernorm", w(p + "input_layernorm.weight"), t.rms_norm_eps)
    a = p + "self_attn."
    q = g.linear(h, a + "q_proj", w(a + "q_proj.weight"), w(a + "q_proj.bias"))
    k = g.linear(h, a + "k_proj", w(a + "k_proj.weight"), w(a + "k_proj.bias"))
    v = g.linear(h, a + "v_proj", w(a + "v_proj.weight"), w(a + "v_proj.bias"))
    q = rope(q)  # (B, S, nh*d)
    k_new = rope(k)  # (B, S, kv_dim)
    g.output(k_new, "K_out", np.float32, ["rows", "chunk", t.kv_dim])
    g.output(v, "V_out", np.float32, ["rows", "chunk", t.kv_dim])

    attn = _attention(g, q, k_hist, v_hist, k_new, v, mask, nkv, group, d)  # (B, S, hidden)
    x = g.op("Add", [x, g.linear(attn, a + "o_proj", w(a + "o_proj.weight"))])

    h = g.rms_norm(x, p + "post_attention_layernorm", w(p + "post_attention_layernorm.weight"), t.rms_norm_eps)
    m = p + "mlp."
    gate = g.silu(g.linear(h, m + "gate_proj", w(m + "gate_proj.weight")))
    up = g.linear(h, m + "up_proj", w(m + "up_proj.weight"))
    down = g.linear(g.op("Mul", [gate, up]), m + "down_proj", w(m + "down_proj.weight"))
    g.output(g.op("Add", [x, down]), "output", np.float32, ["rows", "chunk", hid])
    return g.build()


def _attention(
    g: GraphBuilder, q: str, k_hist: str, v_hist: str, k_new: str, v_new: str, mask: str, nkv: int, group: int, d: int
) -> str:
    """Grouped-query attention of each row over its own history + chunk, reading the history where it lies.

    Each query head is spread into a row of width kv_dim holding its values in its KV group's slice and zeros
    elsewhere, so scores against all KV heads at once are one product per row with the (P, kv_dim) history as it
    is (FusedMatMul with transB: no transpose, no concatenation with the new rows); the values come back the same
    way and each head keeps its own group's slice. Only the small score and probability rows are ever concatenated
    or split, so a decode step costs no copy of the cache.
    """
    kv_dim, heads = nkv * d, nkv * group
    onehot = np.eye(nkv, dtype=np.float32).reshape(1, 1, nkv, 1, nkv, 1)  # (1, 1, g, 1, slot, 1)
    spread = g.weight("attn.group_onehot", onehot)
    q6 = g.op("Unsqueeze", [g.reshape(q, [0, 0, nkv, group, d]), g.const([4])])  # (B, S, g, group, 1, d)
    q_rows = g.reshape(g.op("Mul", [q6, spread]), [0, -1, kv_dim])  # (B, S*heads, kv_dim)
    scale = float(d**-0.5)

    def scores_over(keys: str) -> str:
        return g.op("FusedMatMul", [q_rows, keys], domain=CONTRIB_DOMAIN, transB=1, alpha=scale)

    past, now = scores_over(k_hist), scores_over(k_new)  # (B, S*heads, P), (B, S*heads, S)
    joined = g.op("Concat", [past, now], axis=2)  # (B, S*heads, T) with T = P+S
    total = g.op("Shape", [joined], start=2, end=3)
    scores = g.op("Reshape", [joined, g.op("Concat", [g.const([0, -1, heads]), total], axis=0)])  # (B, S, heads, T)
    scores = g.op("Add", [scores, g.op("Unsqueeze", [mask, g.const([2])])])  # mask (B, S, T) -> (B, S, 1, T)
    probs = g.op("Reshape", [g.op("Softmax", [scores], axis=-1), g.op("Concat", [g.const([0, -1]), total], axis=0)])
    history = g.op("Shape", [k_hist], start=1, end=2)
    p_past, p_now = g.ops(
        "Split", [probs, g.op("Concat", [history, g.op("Shape", [k_new], start=1, end=2)], axis=0)], 2, axis=2
    )
    out = g.op("Add", [g.op("MatMul", [p_past, v_hist]), g.op("MatMul", [p_now, v_new])])  # (B, S*heads, kv_dim)
    out = g.op("Mul", [g.reshape(out, [0, -1, nkv, group, nkv, d]), spread])
    out = g.op("ReduceSum", [out, g.const([4])], keepdims=0)  # (B, S, g, group, d): each head's own group
    return g.reshape(out, [0, 0, heads * d])
