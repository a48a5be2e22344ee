"""The three ONNX graphs of the CPU layout: ViT+projector, one decoder layer, and the post (norm + lm_head).

As the NPU files do (see docs/models.md), a decoder layer takes the K/V history, the chunk's hidden states
(`input`) and an additive `mask` over history + chunk, and returns the chunk's new K/V rows and hidden states. The
CPU layer keeps its history in the form that serves a CPU (format 3 of the export): head-major and 16-bit, with
the rotary tables fed in once per step (see decoder_layer_graph). All lengths are dynamic, activations are float32,
and the decoder layers and the post graph take a leading rows dimension: one row for a prompt chunk, several for
a batched decode step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from batch.errors import ModelFolderError
from batch.model.export.manifest import CACHE_DTYPES
from batch.model.export.onnx_builder import CONTRIB_DOMAIN, GraphBuilder
from batch.model.modelspec import ModelSpec

Weights = Callable[[str], np.ndarray]


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


def decoder_layer_graph(spec: ModelSpec, layer: int, w: Weights, cache_dtype: str = "fp16") -> onnx.ModelProto:
    """One Qwen2 decoder layer over B rows of S new tokens each, over a history `width` positions wide (all dynamic).

    A prompt chunk is one row of S tokens; a batched decode step is B rows of one token, each with its own history,
    mask and rotary rows. Every projection runs on all B*S tokens at once, so a decode step of B rows reads each
    weight once; q, k and v are one product, as are gate and up.

    The K/V history is head-major, (B, kv_heads, width, head_dim), in `cache_dtype`: each KV head's rows lie
    together, so each head scores its own group's queries against them as they are; a 16-bit history is read at 2
    bytes per value and widened to float32 for the arithmetic. The positions past a row's length are masked
    (`mask`, (B, S, width + S)). The rotary tables come in as inputs (`cos`, `sin`, one row per token, and
    `rope_rows`, the row of each (b, s)): computed once per step, not once per layer.
    """
    t = spec.text
    hid, nh, nkv, d = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    kv_dim = t.kv_dim
    cache = CACHE_DTYPES[cache_dtype]
    p = f"language_model.model.layers.{layer}."
    a, m = p + "self_attn.", p + "mlp."
    g = GraphBuilder(f"qwen2_layer_{layer}")
    k_hist = g.input("K_cache", cache, ["rows", nkv, "width", d])
    v_hist = g.input("V_cache", cache, ["rows", nkv, "width", d])
    x = g.input("input", np.float32, ["rows", "chunk", hid])
    mask = g.input("mask", np.float32, ["rows", "chunk", "total"])
    cos = g.input("cos", np.float32, ["tokens", d // 2])
    sin = g.input("sin", np.float32, ["tokens", d // 2])
    rope_rows = g.input("rope_rows", np.int64, ["rows", "chunk"])

    h = g.rms_norm(x, p + "input_layernorm", w(p + "input_layernorm.weight"), t.rms_norm_eps)
    qkv_weight = np.concatenate([w(a + f"{n}_proj.weight") for n in "qkv"])
    qkv_bias = np.concatenate([w(a + f"{n}_proj.bias") for n in "qkv"])
    qkv = g.linear(h, a + "qkv_proj", qkv_weight, qkv_bias)
    q, k, v = g.ops("Split", [qkv, g.const([nh * d, kv_dim, kv_dim])], 3, axis=-1)

    def rope(states: str) -> str:  # rotate_half (not interleaved), token (b, s) with table row rope_rows[b, s]
        return g.op("RotaryEmbedding", [states, rope_rows, cos, sin], domain=CONTRIB_DOMAIN, interleaved=0)

    def heads(states: str, count: int) -> str:  # (B, S, count*d) -> (B, count, S, d)
        return g.transpose(g.reshape(states, [0, 0, count, d]), [0, 2, 1, 3])

    k_new, v_new = heads(rope(k), nkv), heads(v, nkv)
    if cache == np.float32:
        g.output(k_new, "K_out", cache, ["rows", nkv, "chunk", d])
        g.output(v_new, "V_out", cache, ["rows", nkv, "chunk", d])
    else:  # stored in 16 bits; the arithmetic stays float32 (the history widened as it is read)
        g.output(g.cast(k_new, cache), "K_out", cache, ["rows", nkv, "chunk", d])
        g.output(g.cast(v_new, cache), "V_out", cache, ["rows", nkv, "chunk", d])
        k_hist, v_hist = g.cast(k_hist, np.float32), g.cast(v_hist, np.float32)

    # each KV head's group of query heads, S rows each: (B, kv_heads, group*S, d)
    q_groups = g.reshape(heads(rope(q), nh), [0, nkv, -1, d])
    attn = _attention(g, q_groups, (k_hist, v_hist), (k_new, v_new), mask, nkv, nh, d)
    attn = g.reshape(g.transpose(g.reshape(attn, [0, nh, -1, d]), [0, 2, 1, 3]), [0, 0, nh * d])
    attn = g.linear(attn, a + "o_proj", w(a + "o_proj.weight"))

    # the residual sum and the second norm in one kernel
    post_norm = g.weight(p + "post_attention_layernorm.weight", w(p + "post_attention_layernorm.weight"))
    h, _, _, x = g.ops(
        "SkipSimplifiedLayerNormalization", [attn, x, post_norm], 4, domain=CONTRIB_DOMAIN, epsilon=t.rms_norm_eps
    )
    gate_up = g.linear(h, m + "gate_up_proj", np.concatenate([w(m + "gate_proj.weight"), w(m + "up_proj.weight")]))
    inter = t.intermediate_size
    gate, up = g.ops("Split", [gate_up, g.const([inter, inter])], 2, axis=-1)
    down = g.linear(g.op("Mul", [g.silu(gate), up]), m + "down_proj", w(m + "down_proj.weight"))
    g.output(g.op("Add", [x, down]), "output", np.float32, ["rows", "chunk", hid])
    return g.build()


def _attention(
    g: GraphBuilder, q: str, history: tuple[str, str], chunk: tuple[str, str], mask: str, nkv: int, nh: int, d: int
) -> str:
    """Each KV head's queries (B, kv_heads, group*S, d) over its history (B, kv_heads, width, d) and the chunk's
    own rows (B, kv_heads, S, d): (B, kv_heads, group*S, d).

    Each head's group is scored in one product against its own rows only, reading the history where it lies;
    scores against the history and against the chunk are two products (no concatenation of the cache with the new
    rows), and only the small score and probability rows are joined and split.
    """
    (k_hist, v_hist), (k_new, v_new) = history, chunk
    scale = float(d**-0.5)

    def scores_over(keys: str) -> str:
        return g.op("FusedMatMul", [q, keys], domain=CONTRIB_DOMAIN, transB=1, alpha=scale)

    joined = g.op("Concat", [scores_over(k_hist), scores_over(k_new)], axis=3)  # (B, nkv, group*S, T)
    scores = g.op("Add", [g.reshape(joined, [0, nh, -1, 0]), g.op("Unsqueeze", [mask, g.const([1])])])  # (B, nh, S, T)
    probs = g.reshape(g.op("Softmax", [scores], axis=-1), [0, nkv, -1, 0])
    sizes = g.op("Concat", [g.op("Shape", [k_hist], start=2, end=3), g.op("Shape", [k_new], start=2, end=3)], axis=0)
    p_past, p_now = g.ops("Split", [probs, sizes], 2, axis=3)
    return g.op("Add", [g.op("MatMul", [p_past, v_hist]), g.op("MatMul", [p_now, v_new])])


def post_graph(spec: ModelSpec, w: Weights) -> onnx.ModelProto:
    """input (B, S, hidden) -> logits (B, S, vocab): final RMSNorm and lm_head."""
    t = spec.text
    g = GraphBuilder("qwen2_post")
    x = g.input("input", np.float32, ["rows", "chunk", t.hidden_size])
    x = g.rms_norm(x, "norm", w("language_model.model.norm.weight"), t.rms_norm_eps)
    head = "language_model.model.embed_tokens.weight" if t.tie_word_embeddings else "language_model.lm_head.weight"
    g.output(g.linear(x, "lm_head", w(head)), "logits", np.float32, ["rows", "chunk", t.vocab_size])
    return g.build()
