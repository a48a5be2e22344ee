"""Weight-only quantized exports (int8, int4 through onnxruntime's MatMulNBits) stay close to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from batch.infer.generate import Timings
from batch.infer.pipeline import Pipeline
from batch.infer.settings import GenerationSettings
from batch.model.export.exporter import export

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
