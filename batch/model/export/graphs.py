"""The three ONNX graphs of the CPU layout: ViT+projector, one decoder layer, and the post (norm + lm_head).

They mirror the NPU files' contract (see docs/models.md): a decoder layer takes the K/V history
rows, the positions (`indices`), the chunk's hidden states (`input`) and an additive `mask` over
history + chunk, and returns the chunk's new K/V rows and hidden states. On the CPU all lengths are
dynamic, activations are float32, and the decoder layers and the post graph take a leading rows dimension: one row
for a prompt chunk (the NPU's shape), several for a batched decode step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from batch.errors import ModelFolderError
from batch.model.export.onnx_builder import CONTRIB_DOMAIN, GraphBuilder
from batch.model.modelspec import ModelSpec

Weights = Callable[[str], np.ndarray]

LAYER_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")
LAYER_OUTPUTS = ("K_out", "V_out", "output")


def _norm(g: GraphBuilder, x: str, prefix: str, w: Weights, kind: str, eps: float) -> str:
    if kind == "rms_norm":
        return g.rms_norm(x, prefix, w(prefix + ".weight"), eps)
    return g.layer_norm(x, prefix, w(prefix + ".weight"), w(prefix + ".bias"), eps)


def vit_graph(spec: ModelSpec, w: Weights) -> onnx.ModelProto:
    """image (N, 3, S, S) float32 -> features (N, tokens_per_tile, llm_hidden) float32."""
    v = spec.vision
    if v.qk_normalization:
        raise ModelFolderError("vision towers with qk_normalization (InternViT-6B) are not supported")
    c, heads = v.hidden_size, v.num_heads
    d = c // heads
    g = GraphBuilder("internvl_vit")
    image = g.input("image", np.float32, ["tiles", 3, v.image_size, v.image_size])

    e = "vision_model.embeddings."
    patches = g.op(
        "Conv",
        [
            image,
            g.weight(e + "patch.w", w(e + "patch_embedding.weight")),
            g.weight(e + "patch.b", w(e + "patch_embedding.bias")),
        ],
        kernel_shape=[v.patch_size, v.patch_size],
        strides=[v.patch_size, v.patch_size],
    )  # (N, C, grid, grid)
    patches = g.transpose(g.reshape(patches, [0, c, -1]), [0, 2, 1])  # (N, grid*grid, C)
    batch = g.op("Slice", [g.op("Shape", [image]), g.const([0]), g.const([1])])
    cls = g.op(
        "Expand",
        [g.weight(e + "cls", w(e + "class_embedding")), g.op("Concat", [batch, g.const([1, c])], axis=0)],
    )
    x = g.op("Concat", [cls, patches], axis=1)
    x = g.op("Add", [x, g.weight(e + "pos", w(e + "position_embedding"))])  # (N, T, C)

    def gelu(value: str) -> str:  # onnxruntime's exact (erf) GELU as one kernel; the decomposed form stays unfused
        return g.op("Gelu", [value], domain=CONTRIB_DOMAIN)

    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        h = _norm(g, x, p + "norm1", w, v.norm_type, v.layer_norm_eps)
        # q, k and v as three products of h (no Split to copy), each quantizable by the int8 ViT's quantizer, into
        # onnxruntime's MultiHeadAttention: (N, T, C) in and out, no layout changes in the graph, and on the CPU a
        # tiled (flash) kernel that never writes the (N, heads, T, T) scores out
        weights = np.split(w(p + "attn.qkv.weight"), 3)
        biases = np.split(w(p + "attn.qkv.bias"), 3) if v.qkv_bias else [None] * 3
        q, k, val = (g.linear(h, f"{p}attn.{n}", wt, b) for n, wt, b in zip("qkv", weights, biases, strict=True))
        attn = g.op("MultiHeadAttention", [q, k, val], domain=CONTRIB_DOMAIN, num_heads=heads, scale=d**-0.5)
        # the layer scales ls1/ls2 folded into the output rows of proj and fc2 (per-channel int8 scales absorb them)
        ls1, ls2 = w(p + "ls1")[:, None], w(p + "ls2")[:, None]
        attn = g.linear(attn, p + "attn.proj", w(p + "attn.proj.weight") * ls1, w(p + "attn.proj.bias") * ls1[:, 0])
        x = g.op("Add", [x, attn])
        h = _norm(g, x, p + "norm2", w, v.norm_type, v.layer_norm_eps)
        h = gelu(g.linear(h, p + "mlp.fc1", w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias")))
        h = g.linear(h, p + "mlp.fc2", w(p + "mlp.fc2.weight") * ls2, w(p + "mlp.fc2.bias") * ls2[:, 0])
        x = g.op("Add", [x, h])

    # drop the class token, then pixel-shuffle 2x2 neighbours into channels (InternVL ps_version v2)
    grid, r = v.grid, int(round(1 / spec.downsample_ratio))
    x = g.op("Slice", [x, g.const([1]), g.const([2**62]), g.const([1])])
    x = g.reshape(x, [-1, grid, grid // r, c * r])  # (N, grid, grid/r, C*r)
    x = g.transpose(x, [0, 2, 1, 3])
    x = g.reshape(x, [-1, grid // r, grid // r, c * r * r])
    x = g.transpose(x, [0, 2, 1, 3])
    x = g.reshape(x, [-1, (grid // r) ** 2, c * r * r])  # (N, tokens_per_tile, C*r*r)

    x = g.layer_norm(x, "mlp1.0", w("mlp1.0.weight"), w("mlp1.0.bias"), 1e-5)  # nn.LayerNorm default eps
    x = gelu(g.linear(x, "mlp1.1", w("mlp1.1.weight"), w("mlp1.1.bias")))
    x = g.linear(x, "mlp1.3", w("mlp1.3.weight"), w("mlp1.3.bias"))
    g.output(x, "features", np.float32, ["tiles", spec.image_tokens_per_tile, spec.text.hidden_size])
    return g.build()


def decoder_layer_graph(spec: ModelSpec, layer: int, w: Weights) -> onnx.ModelProto:
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


def post_graph(spec: ModelSpec, w: Weights) -> onnx.ModelProto:
    """input (B, S, hidden) -> logits (B, S, vocab): final RMSNorm and lm_head."""
    t = spec.text
    g = GraphBuilder("qwen2_post")
    x = g.input("input", np.float32, ["rows", "chunk", t.hidden_size])
    x = g.rms_norm(x, "norm", w("language_model.model.norm.weight"), t.rms_norm_eps)
    head = "language_model.model.embed_tokens.weight" if t.tie_word_embeddings else "language_model.lm_head.weight"
    g.output(g.linear(x, "lm_head", w(head)), "logits", np.float32, ["rows", "chunk", t.vocab_size])
    return g.build()
