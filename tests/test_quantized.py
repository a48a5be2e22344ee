"""Quantized exports stay close to fp32: the language model's weights (int8, int4 through onnxruntime's MatMulNBits)
and the ViT (int8, kept only when its features hold)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from synthetic import synthetic_image

from batch.errors import VlbatchError
from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline
from batch.infer.settings import GenerationSettings
from batch.model.export import exporter
from batch.model.export.exporter import VIT_INT8_MIN_COSINE, export

# measured on the tiny model (hidden 64, sharp random logits): int8 cos 0.9993, int4 cos 0.964
BOUNDS = {"int8": 0.995, "int4": 0.95}


@pytest.fixture(scope="module")
def reference(tiny_onnx):
    pipeline = Pipeline.open(tiny_onnx)
    request = pipeline.prepare("Describe a red car by the sea.")
    steps = pipeline.steps(request, GenerationSettings(max_new_tokens=1), Timings())
    yield request, next(iter(steps)).logits
    pipeline.close()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_logits_stay_close_to_fp32(tiny_hf, tmp_path, reference, weights):
    export(tiny_hf, tmp_path, weights=weights)
    ops = {n.op_type for n in onnx.load(tmp_path / "llm_layer_00.onnx").graph.node}
    assert "MatMulNBits" in ops
    request, fp32 = reference
    pipeline = Pipeline.open(tmp_path)
    logits = next(iter(pipeline.steps(request, GenerationSettings(max_new_tokens=1), Timings()))).logits
    pipeline.close()
    cosine = float(fp32 @ logits / np.linalg.norm(fp32) / np.linalg.norm(logits))
    print(f"\n{weights}: cosine {cosine:.4f}, max |diff| {np.abs(fp32 - logits).max():.3f}")
    assert BOUNDS[weights] < cosine < 1.0


def test_unknown_weight_format_is_refused(tiny_hf, tmp_path):
    with pytest.raises(ValueError, match="fp32, int8, int4"):
        export(tiny_hf, tmp_path, weights="int3")


def test_an_int8_vit_is_kept_when_its_features_hold_and_recorded(tiny_hf, tiny_onnx, tmp_path):
    export(tiny_hf, tmp_path, vit_weights="int8")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["vit_weights"] == "int8" and VIT_INT8_MIN_COSINE <= manifest["vit_int8_cosine"] < 1.0
    ops = {n.op_type for n in onnx.load(tmp_path / "vit.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    image = tmp_path / "photo.png"
    synthetic_image(640, 480, seed=5).save(image)
    features = []
    for folder in (tiny_onnx, tmp_path):
        pipeline = Pipeline.open(folder)
        features.append(pipeline.backend.vit(pipeline.prepare("Describe.", [image]).pixels).ravel())
        pipeline.close()
    fp32, int8 = features
    assert float(fp32 @ int8 / np.linalg.norm(fp32) / np.linalg.norm(int8)) > 0.98  # a photo, not the check tiles


def test_an_int8_vit_that_drifts_is_refused_and_names_the_cosine(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "VIT_INT8_MIN_COSINE", 1.01)
    with pytest.raises(VlbatchError, match=r"cosine 0\.9\d+ < 1\.01.*--vit-weights fp32"):
        export(tiny_hf, tmp_path, vit_weights="int8")
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "vit-int8.onnx").exists()
