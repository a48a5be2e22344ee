"""Folders written by transformers itself, under every weight naming its InternVL loader accepts, against
transformers' own InternVLForConditionalGeneration loaded from the same folder (the oracle of test_oracle)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_oracle import QUESTION, check

from batch.errors import ModelFolderError
from batch.infer.pipeline import Pipeline
from batch.infer.settings import MediaSettings
from batch.model.checkpoint import NATIVE, Checkpoint, native_key
from batch.model.export.exporter import export
from batch.model.safetensors_io import SafetensorsFile, save_file
from batch.model.tinymodel import convert_to_native, make_model

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
# transformers 4.x "-hf" repos (what OpenGVLab/InternVL3-*-hf hold): the llava names
LEGACY = [
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.", ""),
]
# InternVLModel's own in-memory names under the base-model prefix (the loader adds "model.")
BASE = [(r"^model\.language_model\.", "language_model."), (r"^model\.", "")]


def load_reference(folder: Path):
    model, info = transformers.InternVLForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def save_with_transformers(src: Path, dst: Path, **kwargs) -> Path:
    """What a user downloads: `save_pretrained` of the model transformers loads from `src`, plus the tokenizer."""
    model = load_reference(src)
    dtype = kwargs.pop("dtype", None)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(dst, safe_serialization=True, **kwargs)
    for name in TOKENIZER:
        shutil.copyfile(src / name, dst / name)
    return dst


def renamed(src: Path, dst: Path, rules: list[tuple[str, str]]) -> Path:
    """`src` with its weights stored under other names (first matching rule per name)."""
    shutil.copytree(src, dst)
    f = SafetensorsFile(src / "model.safetensors")
    out = {}
    for key in f.keys():
        new = key
        for pattern, template in rules:
            if re.match(pattern, key):
                new = re.sub(pattern, template, key, count=1)
                break
        out[new] = np.asarray(f.get(key))
    save_file(out, dst / "model.safetensors")
    return dst


def state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def folders(tiny_native: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_layouts")
    saved = save_with_transformers(tiny_native, root / "saved")
    out = {
        "saved": saved,
        "legacy": renamed(saved, root / "legacy", LEGACY),
        "base-prefix": renamed(saved, root / "base", BASE),
        "bf16-sharded": save_with_transformers(
            tiny_native, root / "bf16", dtype=torch.bfloat16, max_shard_size="100KB"
        ),
    }
    tied_original = make_model(root / "tied_original", preset="tiny-tied", seed=1)
    out["tied"] = save_with_transformers(convert_to_native(tied_original, root / "tied_native"), root / "tied")
    out["tied-original"] = tied_original  # InternVL's own layout, llm_config.tie_word_embeddings, no lm_head
    return out


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_layouts_onnx")
    # a float32 K/V history: the layouts are held to the oracle's 1e-3 (test_oracle.py)
    return {name: export(folder, root / name, kv_cache="fp32").parent for name, folder in folders.items()}


def test_transformers_folders_are_what_they_claim(folders, tiny_native):
    """Each folder loads in transformers with nothing missing or unexpected, to the same weights."""
    reference = load_reference(tiny_native)
    for name in ("saved", "legacy", "base-prefix"):
        assert state_equal(load_reference(folders[name]), reference), name
    keys = set(SafetensorsFile(folders["legacy"] / "model.safetensors").keys())
    assert "language_model.lm_head.weight" in keys and "vision_tower.embeddings.cls_token" in keys
    assert "multi_modal_projector.linear_1.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    base = set(SafetensorsFile(folders["base-prefix"] / "model.safetensors").keys())
    assert "language_model.layers.0.self_attn.q_proj.weight" in base
    bf16 = folders["bf16-sharded"]
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    tied = folders["tied"]
    assert not any("lm_head" in k for k in SafetensorsFile(tied / "model.safetensors").keys())
    assert json.loads((tied / "config.json").read_text())["text_config"]["tie_word_embeddings"] is True


@pytest.mark.parametrize("name", ["saved", "legacy", "base-prefix", "bf16-sharded"])
def test_every_naming_reads_to_the_same_canonical_weights(folders, tiny_hf, name):
    ckpt, original = Checkpoint(folders[name]), Checkpoint(tiny_hf)
    assert ckpt.layout == NATIVE
    ckpt.check_complete()
    for weight in original.canonical_names():
        expected = original.tensor(weight)
        if name == "bf16-sharded":
            expected = torch.tensor(expected).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(ckpt.tensor(weight), expected, err_msg=weight)


def test_native_key_covers_each_loader_naming():
    for stored, expected in [
        ("lm_head.weight", "lm_head.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("model.language_model.norm.weight", "model.language_model.norm.weight"),
        ("model.language_model.model.norm.weight", "model.language_model.norm.weight"),
        ("language_model.model.norm.weight", "model.language_model.norm.weight"),
        ("language_model.norm.weight", "model.language_model.norm.weight"),
        ("vision_tower.embeddings.cls_token", "model.vision_tower.embeddings.cls_token"),
        ("model.vision_tower.embeddings.cls_token", "model.vision_tower.embeddings.cls_token"),
        ("multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.bias"),
        ("model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.bias"),
    ]:
        assert native_key(stored) == expected, stored


def test_the_same_weight_under_two_namings_is_refused(folders, tmp_path):
    folder = shutil.copytree(folders["saved"], tmp_path / "twice")
    f = SafetensorsFile(folders["saved"] / "model.safetensors")
    weights = {k: np.array(f.get(k)) for k in f.keys()}
    weights["language_model.lm_head.weight"] = weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelFolderError, match="are the same weight"):
        Checkpoint(folder)


@pytest.mark.parametrize("name", ["saved", "legacy", "base-prefix", "bf16-sharded", "tied", "tied-original"])
@pytest.mark.parametrize("media", ["text", "image", "video"])
def test_matches_transformers(folders, exported, media_dir, record, name, media):
    reference = load_reference(folders["tied" if name == "tied-original" else name])
    if name.startswith("tied"):
        assert reference.lm_head.weight.data_ptr() == reference.model.language_model.embed_tokens.weight.data_ptr()
    pipeline = Pipeline.open(exported[name], backend="onnxruntime")
    try:
        if media == "text":
            request = pipeline.prepare("What is the capital of a country with a red flag?")
        elif media == "image":
            request = pipeline.prepare(QUESTION, [media_dir / "square.png"])
            assert request.pixels.shape[0] == 1
        else:
            request = pipeline.prepare("What happens?", [media_dir / "clip.mp4"], MediaSettings(video_frames=4))
            assert request.media.kind == "video" and request.media.tiles == (1,) * 4
        check(pipeline, reference, request, record)
    finally:
        pipeline.close()
