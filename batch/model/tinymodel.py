"""Random-weight InternVL folders (`vlbatch make-model`): a tiny one for tests and the demo, a real-shape one
for benchmarks. Written in the original InternVL layout, or the transformers-native one on request."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from batch.model.checkpoint import ORIGINAL, Checkpoint, _native_name
from batch.model.modelspec import ModelSpec, TextSpec, VisionSpec
from batch.model.safetensors_io import save_file
from batch.model.tiny_tokenizer import build_tokenizer

PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        vision=VisionSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
        text=TextSpec(
            hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=1024
        ),
    ),
    # the tiny model with InternVL3-1B's tied word embeddings: no lm_head weight, logits use embed_tokens
    "tiny-tied": ModelSpec(
        vision=VisionSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
        text=TextSpec(
            hidden_size=64,
            intermediate_size=192,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            vocab_size=1024,
            tie_word_embeddings=True,
        ),
    ),
    # InternVL3-2B: InternViT-300M + Qwen2.5-1.5B shapes (random weights, so the cost but not the output is real)
    "real-shape": ModelSpec(
        vision=VisionSpec(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16),
        text=TextSpec(
            hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, vocab_size=151674
        ),
    ),
}
# tokens in each preset's tokenizer: InternVL3-2B's has ~151,670 with the specials (for its 151,674 embedding
# rows), so the real-shape benchmark pays the real detokenization, sampling and lm_head costs and answers in text
TOKENIZER_VOCAB = {"real-shape": 151_670}
SMALL_TOKENIZER_VOCAB = 1024


def make_model(out_dir: Path, preset: str = "tiny", seed: int = 0, layout: str = ORIGINAL) -> Path:
    """Write config.json, model.safetensors and a small tokenizer for `preset` into `out_dir`."""
    spec = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB.get(preset, SMALL_TOKENIZER_VOCAB), seed=seed)
    dtype = np.float32 if preset.startswith("tiny") else ml_dtypes.bfloat16
    weights = random_weights(spec, seed, dtype)
    if layout == ORIGINAL:
        config = original_config(spec)
    else:
        config = native_config(spec, _image_token_id(out_dir))
        weights = to_native_names(weights, spec)
    save_file(weights, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def convert_to_native(src: Path, dst: Path) -> Path:
    """Copy an original-layout folder as a transformers-native one (same weights, renamed)."""
    ckpt = Checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    weights = {name: ckpt.tensor(name) for name in ckpt.canonical_names()}
    save_file(to_native_names(weights, ckpt.spec), dst / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "config.json").write_text(json.dumps(native_config(ckpt.spec, _image_token_id(dst)), indent=2) + "\n")
    return dst


def random_weights(spec: ModelSpec, seed: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Weights whose activations stay O(1) through every layer, so greedy decoding is not degenerate."""
    rng = np.random.default_rng(seed)
    v, t = spec.vision, spec.text

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    def linear(out: int, inp: int, bias: bool = True, gain: float = 1.0) -> list[np.ndarray]:
        parts = [normal(out, inp, std=gain / np.sqrt(inp))]
        return parts + [normal(out, std=0.02)] if bias else parts

    def norm(n: int) -> list[np.ndarray]:
        return [(1 + normal(n, std=0.1)).astype(dtype), normal(n, std=0.02)]

    w: dict[str, np.ndarray] = {}

    def put(prefix: str, arrays: list[np.ndarray]) -> None:
        for kind, array in zip(("weight", "bias"), arrays, strict=False):
            w[f"{prefix}.{kind}"] = array

    e = "vision_model.embeddings."
    w[e + "class_embedding"] = normal(1, 1, v.hidden_size, std=0.5)
    w[e + "position_embedding"] = normal(1, v.grid * v.grid + 1, v.hidden_size, std=0.5)
    patch_in = 3 * v.patch_size * v.patch_size
    w[e + "patch_embedding.weight"] = normal(v.hidden_size, 3, v.patch_size, v.patch_size, std=1 / np.sqrt(patch_in))
    w[e + "patch_embedding.bias"] = normal(v.hidden_size, std=0.02)
    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        put(p + "norm1", norm(v.hidden_size))
        put(p + "attn.qkv", linear(3 * v.hidden_size, v.hidden_size, gain=2.0))
        put(p + "attn.proj", linear(v.hidden_size, v.hidden_size))
        w[p + "ls1"] = np.full(v.hidden_size, 0.5, dtype)
        w[p + "ls2"] = np.full(v.hidden_size, 0.5, dtype)
        put(p + "norm2", norm(v.hidden_size))
        put(p + "mlp.fc1", linear(v.intermediate_size, v.hidden_size))
        put(p + "mlp.fc2", linear(v.hidden_size, v.intermediate_size))
    put("mlp1.0", norm(spec.projector_input))
    put("mlp1.1", linear(t.hidden_size, spec.projector_input))
    put("mlp1.3", linear(t.hidden_size, t.hidden_size))

    m = "language_model.model."
    # tied: the logits are the final hidden state against embed_tokens, which would pick the input token again
    # while its own embedding dominates the residual stream; small embeddings (and a final norm that scales
    # them back up into sharp logits) leave the residual to the layers' outputs
    w[m + "embed_tokens.weight"] = normal(t.vocab_size, t.hidden_size, std=0.05 if t.tie_word_embeddings else 1.0)
    for i in range(t.num_layers):
        p = f"{m}layers.{i}."
        w[p + "input_layernorm.weight"] = norm(t.hidden_size)[0]
        put(p + "self_attn.q_proj", linear(t.num_heads * t.head_dim, t.hidden_size, gain=2.0))
        put(p + "self_attn.k_proj", linear(t.kv_dim, t.hidden_size, gain=2.0))
        put(p + "self_attn.v_proj", linear(t.kv_dim, t.hidden_size))
        put(p + "self_attn.o_proj", linear(t.hidden_size, t.num_heads * t.head_dim, bias=False))
        w[p + "post_attention_layernorm.weight"] = norm(t.hidden_size)[0]
        put(p + "mlp.gate_proj", linear(t.intermediate_size, t.hidden_size, bias=False))
        put(p + "mlp.up_proj", linear(t.intermediate_size, t.hidden_size, bias=False))
        put(p + "mlp.down_proj", linear(t.hidden_size, t.intermediate_size, bias=False))
    w[m + "norm.weight"] = norm(t.hidden_size)[0]
    if t.tie_word_embeddings:  # the logits use embed_tokens, as InternVL3-1B's do
        w[m + "norm.weight"] = (w[m + "norm.weight"].astype(np.float32) * 10).astype(dtype)
        return w
    # sharp logits: a clear winner per step keeps greedy paths apart from rounding noise
    w["language_model.lm_head.weight"] = normal(t.vocab_size, t.hidden_size, std=4 / np.sqrt(t.hidden_size))
    return w


def to_native_names(weights: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Rename canonical weights to transformers' InternVLForConditionalGeneration names (qkv split in three)."""
    out: dict[str, np.ndarray] = {}
    c = spec.vision.hidden_size
    for name, array in weights.items():
        qkv = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if qkv:
            layer, kind = qkv.groups()
            for j, part in enumerate("qkv"):
                out[f"model.vision_tower.encoder.layer.{layer}.attention.{part}_proj.{kind}"] = array[
                    j * c : (j + 1) * c
                ]
        else:
            out[_native_name(name)] = array
    return out


def original_config(spec: ModelSpec) -> dict[str, Any]:
    v, t = spec.vision, spec.text
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "downsample_ratio": spec.downsample_ratio,
        "force_image_size": v.image_size,
        "dynamic_image_size": True,
        "max_dynamic_patch": spec.max_dynamic_patch,
        "min_dynamic_patch": 1,
        "use_thumbnail": spec.use_thumbnail,
        "ps_version": "v2",
        "select_layer": -1,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_heads,
            "num_hidden_layers": v.num_layers,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "norm_type": v.norm_type,
            "qkv_bias": v.qkv_bias,
            "qk_normalization": v.qk_normalization,
            "hidden_act": "gelu",
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **_text_config(t),
        },
    }


def native_config(spec: ModelSpec, image_token_id: int) -> dict[str, Any]:
    v, t = spec.vision, spec.text
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": spec.downsample_ratio,
        "image_token_id": image_token_id,
        "image_seq_length": spec.image_tokens_per_tile,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_heads,
            "num_hidden_layers": v.num_layers,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "layer_norm_eps": v.layer_norm_eps,
            "norm_type": v.norm_type,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_normalization,
            "hidden_act": "gelu",
            "use_mean_pooling": True,
        },
        "text_config": {"model_type": "qwen2", **_text_config(t)},
    }


def _text_config(t: TextSpec) -> dict[str, Any]:
    return {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "num_hidden_layers": t.num_layers,
        "vocab_size": t.vocab_size,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu",
    }


def _image_token_id(folder: Path) -> int:
    vocab = json.loads((folder / "tokenizer.json").read_text())
    for token in vocab.get("added_tokens", []):
        if token["content"] == "<IMG_CONTEXT>":
            return int(token["id"])
    raise ValueError(f"{folder}: tokenizer has no <IMG_CONTEXT> token")
