"""Hugging Face InternVL model folders read as data: config.json, safetensors weights, canonical names.

Two layouts are understood: the original InternVL one (`llm_config`, `vision_model.*`, `mlp1.*`,
`language_model.model.*`) and the transformers-native one (`text_config`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`). Everything downstream uses the original
names ("canonical names"); nothing from the folder is ever imported or executed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from batch.errors import ModelFolderError
from batch.model.modelspec import ModelSpec, TextSpec, VisionSpec
from batch.model.safetensors_io import SafetensorsFile

ORIGINAL = "internvl"
NATIVE = "transformers"

_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_SUPPORTED_ROPE = ("default", "dynamic", "linear")

# canonical (original InternVL) name pattern -> transformers-native name template
_NATIVE_NAMES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (
        r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.layernorm_before.\2",
    ),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.layernorm_after.\2",
    ),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.attention.projection_layer.\2",
    ),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.attention.\2.\3",
    ),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.mlp.\2.\3",
    ),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
]
_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")

# Every prefix naming transformers' InternVLForConditionalGeneration loader accepts (its "llava" conversion
# mapping, the InternVLModel -> LlavaModel one, and the base-model prefix "model"), rewritten to the in-memory
# names above. Each tower's prefix is independent of the others'; the first matching rule wins.
#   transformers 5 save_pretrained: model.language_model.*, lm_head.*, model.vision_tower.*,
#                                   model.multi_modal_projector.*
#   transformers 4.x "-hf" repos:   language_model.model.*, language_model.lm_head.*, vision_tower.*,
#                                   multi_modal_projector.*
#   InternVLModel (no lm_head):     language_model.* or language_model.model.*, vision_tower.*, multi_modal_projector.*
NATIVE_PREFIXES: list[tuple[str, str]] = [
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.model.", "model.language_model."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def native_key(stored: str) -> str:
    """The in-memory transformers name of a weight stored under any naming its loader accepts."""
    for prefix, replacement in NATIVE_PREFIXES:
        if stored.startswith(prefix):
            return replacement + stored[len(prefix) :]
    return stored


def _native_name(canonical: str) -> str:
    for pattern, template in _NATIVE_NAMES:
        if re.fullmatch(pattern, canonical):
            return re.sub(pattern, template, canonical)
    raise KeyError(canonical)


class Checkpoint:
    """An InternVL folder: its parsed `ModelSpec` and float32 access to weights by canonical name."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFolderError(f"{self.path}: model folder not found")
        self.config, self.layout, self.spec = read_config(self.path)
        self._files = _open_weights(self.path)
        self._where: dict[str, SafetensorsFile] = {}
        self._stored: dict[str, str] = {}  # name used here -> name in the file, where they differ
        for file in self._files:
            for stored in file.keys():
                name = native_key(stored) if self.layout == NATIVE else stored
                if name in self._stored or (name != stored and name in self._where):
                    first = self._stored.get(name, name)
                    raise ModelFolderError(f"{self.path}: weights {first} and {stored} are the same weight ({name})")
                self._where[name] = file
                if name != stored:
                    self._stored[name] = stored

    def has(self, canonical: str) -> bool:
        if self.layout == ORIGINAL:
            return canonical in self._where
        qkv = _QKV.fullmatch(canonical)
        if qkv:
            return self._native_qkv_names(qkv)[0] in self._where
        try:
            return _native_name(canonical) in self._where
        except KeyError:
            return False

    def tensor(self, canonical: str) -> np.ndarray:
        """The weight named `canonical` as a float32 array (bf16/fp16 upcast exactly)."""
        if self.layout == ORIGINAL:
            return self._load(canonical)
        qkv = _QKV.fullmatch(canonical)
        if qkv:
            return np.concatenate([self._load(n) for n in self._native_qkv_names(qkv)], axis=0)
        try:
            return self._load(_native_name(canonical))
        except KeyError:
            raise ModelFolderError(f"{self.path}: no weight maps to {canonical}") from None

    @staticmethod
    def _native_qkv_names(match: re.Match[str]) -> list[str]:
        layer, kind = match.groups()
        return [f"model.vision_tower.encoder.layer.{layer}.attention.{p}_proj.{kind}" for p in "qkv"]

    def _load(self, name: str) -> np.ndarray:
        try:
            file = self._where[name]
        except KeyError:
            raise ModelFolderError(f"{self.path}: weight {name} is missing") from None
        return np.asarray(file.get(self._stored.get(name, name)), dtype=np.float32)

    def canonical_names(self) -> list[str]:
        """Every weight the exporter needs, by canonical name, in export order."""
        spec = self.spec
        names = [
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.position_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.patch_embedding.bias",
        ]
        for i in range(spec.vision.num_layers):
            names += vision_layer_names(i, spec.vision.qkv_bias, spec.vision.qk_normalization)
        names += [f"mlp1.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")]
        names.append("language_model.model.embed_tokens.weight")
        for i in range(spec.text.num_layers):
            names += text_layer_names(i)
        names.append("language_model.model.norm.weight")
        if not spec.text.tie_word_embeddings:
            names.append("language_model.lm_head.weight")
        return names

    def shape(self, canonical: str) -> tuple[int, ...]:
        """The shape of a weight without reading it (native q/k/v parts stacked as one qkv)."""
        if self.layout == ORIGINAL:
            names = [canonical]
        else:
            qkv = _QKV.fullmatch(canonical)
            names = self._native_qkv_names(qkv) if qkv else [_native_name(canonical)]
        shapes = [self._where[n].shape(self._stored.get(n, n)) for n in names]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def layers_held(self, tower: str) -> int:
        """How many `tower` ("language" or "vision") layers the weights hold: the highest layer index + 1."""
        if self.layout == ORIGINAL:
            prefix = "language_model.model.layers." if tower == "language" else "vision_model.encoder.layers."
        else:
            prefix = "model.language_model.layers." if tower == "language" else "model.vision_tower.encoder.layer."
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        indices = [int(m.group(1)) for m in map(pattern.match, self._where) if m]
        return max(indices, default=-1) + 1

    def check_complete(self) -> None:
        """Raise ModelFolderError naming the first missing weight, or one whose shape config.json contradicts."""
        for tower, wanted in (("language", self.spec.text.num_layers), ("vision", self.spec.vision.num_layers)):
            held = self.layers_held(tower)
            if held < wanted:
                raise ModelFolderError(
                    f"{self.path}: config.json says {wanted} {tower} layers, the weights hold {held}"
                )
        missing = [n for n in self.canonical_names() if not self.has(n)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelFolderError(f"{self.path}: weight {missing[0]} is missing{more}")
        for name, expected in expected_shapes(self.spec).items():
            actual = self.shape(name)
            if actual != expected:
                raise ModelFolderError(
                    f"{self.path}: weight {name} has shape {actual}, but config.json implies {expected}"
                )


def read_config(folder: Path) -> tuple[dict[str, Any], str, ModelSpec]:
    """Parse `folder/config.json` (either layout) without touching the weights: (raw config, layout, spec)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if "llm_config" not in config and "text_config" not in config:
        raise ModelFolderError(f"{folder / 'config.json'}: not an InternVL config (no llm_config or text_config)")
    layout = NATIVE if "text_config" in config else ORIGINAL
    return config, layout, _parse_spec(config, layout, folder / "config.json")


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes the config fixes for the weights that define each dimension (first layer of each tower)."""
    v, t = spec.vision, spec.text
    vl, tl = "vision_model.encoder.layers.0.", "language_model.model.layers.0."
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
        "vision_model.embeddings.position_embedding": (1, v.grid * v.grid + 1, v.hidden_size),
        vl + "attn.qkv.weight": (3 * v.hidden_size, v.hidden_size),
        vl + "mlp.fc1.weight": (v.intermediate_size, v.hidden_size),
        "mlp1.0.weight": (spec.projector_input,),
        "mlp1.1.weight": (t.hidden_size, spec.projector_input),
        "mlp1.3.weight": (t.hidden_size, t.hidden_size),
        "language_model.model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        tl + "self_attn.q_proj.weight": (t.num_heads * t.head_dim, t.hidden_size),
        tl + "self_attn.k_proj.weight": (t.kv_dim, t.hidden_size),
        tl + "self_attn.v_proj.weight": (t.kv_dim, t.hidden_size),
        tl + "mlp.gate_proj.weight": (t.intermediate_size, t.hidden_size),
    }
    if not t.tie_word_embeddings:
        shapes["language_model.lm_head.weight"] = (t.vocab_size, t.hidden_size)
    return shapes


def vision_layer_names(i: int, qkv_bias: bool = True, qk_norm: bool = False) -> list[str]:
    p = f"vision_model.encoder.layers.{i}."
    names = [p + "norm1.weight", p + "norm1.bias", p + "attn.qkv.weight"]
    if qkv_bias:
        names.append(p + "attn.qkv.bias")
    if qk_norm:
        names += [p + "attn.q_norm.weight", p + "attn.k_norm.weight"]
    names += [p + "attn.proj.weight", p + "attn.proj.bias", p + "ls1", p + "ls2"]
    names += [p + "norm2.weight", p + "norm2.bias"]
    names += [p + f"mlp.{fc}.{k}" for fc in ("fc1", "fc2") for k in ("weight", "bias")]
    return names


def text_layer_names(i: int) -> list[str]:
    p = f"language_model.model.layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += [p + f"self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")]
    names.append(p + "self_attn.o_proj.weight")
    names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (a model folder needs its config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def _open_weights(folder: Path) -> list[SafetensorsFile]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFolderError(f"{index}: shard {missing[0]} is missing")
        paths = [folder / n for n in names]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        pickled = [p.name for pattern in _PICKLED for p in folder.glob(pattern)]
        if pickled:
            raise ModelFolderError(
                f"{folder}: only pickled weights ({', '.join(sorted(pickled)[:3])}); vlbatch reads safetensors "
                "only, since loading pickles can run code. Convert the weights to .safetensors first."
            )
        raise ModelFolderError(f"{folder}: no .safetensors weights found")
    files = []
    for path in paths:
        try:
            files.append(SafetensorsFile(path))
        except (OSError, ValueError) as exc:
            raise ModelFolderError(str(exc)) from exc
    return files


def _scalar(value: Any) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


def _parse_spec(config: dict[str, Any], layout: str, where: Path) -> ModelSpec:
    try:
        if layout == ORIGINAL:
            vcfg, tcfg = config["vision_config"], config["llm_config"]
            if config.get("select_layer", -1) != -1:
                raise ModelFolderError(f"{where}: select_layer {config['select_layer']} is not supported (only -1)")
            if config.get("ps_version", "v2") != "v2":
                raise ModelFolderError(f"{where}: ps_version {config['ps_version']} is not supported (only v2)")
            image_size = config.get("force_image_size") or vcfg.get("image_size", 448)
            vision = VisionSpec(
                hidden_size=int(vcfg["hidden_size"]),
                intermediate_size=int(vcfg["intermediate_size"]),
                num_layers=int(vcfg["num_hidden_layers"]),
                num_heads=int(vcfg["num_attention_heads"]),
                image_size=_scalar(image_size),
                patch_size=_scalar(vcfg.get("patch_size", 14)),
                layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-6)),
                norm_type=str(vcfg.get("norm_type", "layer_norm")),
                qkv_bias=bool(vcfg.get("qkv_bias", True)),
                qk_normalization=bool(vcfg.get("qk_normalization", False)),
            )
            image_token_id = -1
            tie = bool(tcfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        else:
            vcfg, tcfg = config["vision_config"], config["text_config"]
            if config.get("vision_feature_layer", -1) != -1:
                raise ModelFolderError(f"{where}: vision_feature_layer other than -1 is not supported")
            vision = VisionSpec(
                hidden_size=int(vcfg["hidden_size"]),
                intermediate_size=int(vcfg["intermediate_size"]),
                num_layers=int(vcfg["num_hidden_layers"]),
                num_heads=int(vcfg["num_attention_heads"]),
                image_size=_scalar(vcfg.get("image_size", 448)),
                patch_size=_scalar(vcfg.get("patch_size", 14)),
                layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-6)),
                norm_type=str(vcfg.get("norm_type", "layer_norm")),
                qkv_bias=bool(vcfg.get("attention_bias", False)),
                qk_normalization=bool(vcfg.get("use_qk_norm", False)),
            )
            image_token_id = int(config.get("image_token_id", -1))
            tie = bool(config.get("tie_word_embeddings", tcfg.get("tie_word_embeddings", False)))
        text = _parse_text(tcfg, tie, where)
    except KeyError as exc:
        raise ModelFolderError(f"{where}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{where}: bad value ({exc})") from None
    if vision.norm_type not in ("layer_norm", "rms_norm"):
        raise ModelFolderError(f"{where}: vision norm_type {vision.norm_type!r} is not supported")
    ratio = float(config.get("downsample_ratio", 0.5))
    if vision.image_size % vision.patch_size or (vision.grid * ratio) != int(vision.grid * ratio):
        raise ModelFolderError(f"{where}: image_size/patch_size/downsample_ratio do not divide evenly")
    return ModelSpec(
        vision=vision,
        text=text,
        downsample_ratio=ratio,
        image_token_id=image_token_id,
        max_dynamic_patch=int(config.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(config.get("use_thumbnail", True)),
        extra={"template": config.get("template"), "layout": layout},
    )


def _parse_text(tcfg: dict[str, Any], tie: bool, where: Path) -> TextSpec:
    rope = tcfg.get("rope_parameters") or {}
    theta = float(tcfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = tcfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or rope.get("rope_type") or "default"
    if kind not in _SUPPORTED_ROPE:
        raise ModelFolderError(f"{where}: rope scaling {kind!r} is not supported ({', '.join(_SUPPORTED_ROPE)})")
    # "dynamic" NTK scaling only changes positions beyond max_position_embeddings, which the
    # prefill capacity never reaches; "linear" divides every position by the factor.
    factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    heads = int(tcfg["num_attention_heads"])
    return TextSpec(
        hidden_size=int(tcfg["hidden_size"]),
        intermediate_size=int(tcfg["intermediate_size"]),
        num_layers=int(tcfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(tcfg.get("num_key_value_heads") or heads),
        vocab_size=int(tcfg["vocab_size"]),
        rms_norm_eps=float(tcfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=int(tcfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=tie,
        head_dim=int(tcfg.get("head_dim") or 0),
    )
