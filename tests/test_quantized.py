"""Quantized exports stay close to fp32: the language model's weights (int8, int4 through onnxruntime's MatMulNBits),
the ViT (int8, kept only when its features hold) and the prompt layers (int8, kept only when each layer holds)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from synthetic import synthetic_image

from batch.errors import VlbatchError
from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline
from batch.infer.runtime.onnx_backend import OnnxBackend
from batch.infer.settings import GenerationSettings
from batch.model.export import exporter
from batch.model.export.exporter import PREFILL_INT8_MIN_COSINE, VIT_INT8_MIN_COSINE, export

# measured on the tiny model (hidden 64, sharp random logits): int8 cos 0.9993, int4 cos 0.963, int8 prompt
# layers (fp32 decode layers) 0.9995
BOUNDS = {"int8": 0.995, "int4": 0.95, "int8 prefill": 0.995}


@pytest.fixture(scope="module")
def reference(tiny_onnx):
    pipeline = Pipeline.open(tiny_onnx)
    request = pipeline.prepare("Describe a red car by the sea.")
    steps = pipeline.steps(request, GenerationSettings(max_new_tokens=1), Timings())
    yield request, next(iter(steps)).logits
    pipeline.close()


EXPORTS = {"int8": {"weights": "int8"}, "int4": {"weights": "int4"}, "int8 prefill": {"prefill_weights": "int8"}}


@pytest.mark.parametrize("name", EXPORTS)
def test_quantized_logits_stay_close_to_fp32(tiny_hf, tmp_path, reference, name):
    export(tiny_hf, tmp_path, **EXPORTS[name])
    ops = {n.op_type for n in onnx.load(tmp_path / "llm_layer_00.onnx").graph.node}
    assert ("MatMulNBits" in ops) == ("weights" in EXPORTS[name])  # int8 prompt layers beside fp32 decode ones
    request, fp32 = reference
    pipeline = Pipeline.open(tmp_path)
    logits = next(iter(pipeline.steps(request, GenerationSettings(max_new_tokens=1), Timings()))).logits
    pipeline.close()
    cosine = float(fp32 @ logits / np.linalg.norm(fp32) / np.linalg.norm(logits))
    print(f"\n{name}: cosine {cosine:.4f}, max |diff| {np.abs(fp32 - logits).max():.3f}")
    assert BOUNDS[name] < cosine < 1.0


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


def _layer_ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_int8_prefill_layers_are_kept_recorded_and_run_only_for_prompts(tiny_hf, tiny_onnx, tmp_path):
    export(tiny_hf, tmp_path, prefill_weights="int8")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["prefill_weights"] == "int8"
    assert PREFILL_INT8_MIN_COSINE <= manifest["prefill_int8_cosine"] < 1.0
    names = manifest["files"]["prefill_layers"]
    assert names == [f"llm_prefill_{i:02d}.onnx" for i in range(len(manifest["files"]["layers"]))]
    assert _layer_ops(tmp_path / names[0]) & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger"}
    assert "MatMulNBits" not in _layer_ops(tmp_path / "llm_layer_00.onnx")  # the decode layers keep --weights
    assert not list(tmp_path.glob("*.fp32.onnx"))  # the exporter's own check files are gone

    fp32, mixed = OnnxBackend(tiny_onnx), OnnxBackend(tmp_path)
    rng = np.random.default_rng(3)
    prompt = rng.standard_normal((1, 9, fp32.spec.text.hidden_size)).astype(np.float32)
    caches = [fp32.new_cache(), mixed.new_cache()]
    outs = [backend.prefill_chunk(0, prompt, 0, cache) for backend, cache in zip((fp32, mixed), caches, strict=True)]
    assert not np.array_equal(*outs)  # the prompt ran through the int8 layer
    cosine = float((outs[0] * outs[1]).sum() / np.linalg.norm(outs[0]) / np.linalg.norm(outs[1]))
    assert cosine > 0.99
    token = rng.standard_normal((1, 1, fp32.spec.text.hidden_size)).astype(np.float32)
    steps = [backend.decode(0, token, 9, caches[0]) for backend in (fp32, mixed)]
    np.testing.assert_array_equal(*steps)  # a decode step runs the same fp32 layer in both exports


def test_int8_prefill_layers_that_drift_are_refused_and_name_the_cosine(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "PREFILL_INT8_MIN_COSINE", 1.01)
    with pytest.raises(VlbatchError, match=r"llm_prefill_00\.onnx: .*cosine 0\.9\d+ < 1\.01.*--prefill-weights same"):
        export(tiny_hf, tmp_path, prefill_weights="int8")
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("llm_prefill_*"))


def test_unknown_prefill_format_is_refused(tiny_hf, tmp_path):
    with pytest.raises(ValueError, match="same, int8"):
        export(tiny_hf, tmp_path, prefill_weights="int4")
