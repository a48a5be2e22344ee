"""The exported ViT graph (vit_graph): its features against transformers' on the tiny model, several tiles per run
against one at a time, and the form the int8 ViT relies on (fused attention, every weight product quantized)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from batch.model.checkpoint import Checkpoint
from batch.model.export.exporter import _dynamic_int8, check_tiles
from batch.model.ort_options import session_options


def features(vit: Path, tiles: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(vit), session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": tiles})[0]


def test_features_match_transformers(tiny_onnx: Path, tiny_native: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.InternVLForConditionalGeneration.from_pretrained(
        tiny_native, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tiles = check_tiles(448, 2)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(tiles))
    theirs = (out if isinstance(out, torch.Tensor) else out.pooler_output).reshape(
        2, -1, model.config.text_config.hidden_size
    )
    ours = features(tiny_onnx / "vit.onnx", tiles)
    assert ours.shape == tuple(theirs.shape)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)


def test_tiles_in_one_run_match_one_at_a_time(tiny_onnx: Path):
    tiles = check_tiles(448, 3)
    one_by_one = np.concatenate([features(tiny_onnx / "vit.onnx", t[None]) for t in tiles])
    np.testing.assert_allclose(features(tiny_onnx / "vit.onnx", tiles), one_by_one, atol=1e-5, rtol=1e-5)


def test_attention_is_one_kernel_and_every_weight_product_is_int8(tiny_hf: Path, tiny_onnx: Path, tmp_path: Path):
    layers = Checkpoint(tiny_hf).spec.vision.num_layers
    fp32 = Counter(n.op_type for n in onnx.load(tiny_onnx / "vit.onnx").graph.node)
    assert fp32["MultiHeadAttention"] == layers and fp32["Softmax"] == 0
    assert fp32["Transpose"] == 3  # the patches' and the pixel shuffle's: none around the attention
    _dynamic_int8(tiny_onnx / "vit.onnx", tmp_path / "vit-int8.onnx")
    int8 = Counter(n.op_type for n in onnx.load(tmp_path / "vit-int8.onnx").graph.node)
    # q, k, v, proj, fc1, fc2 per layer and the projector's two: none left in float
    assert int8["MatMul"] == 0 and int8["MatMulInteger"] == 6 * layers + 2
