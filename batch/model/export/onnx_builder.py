"""A small imperative builder for ONNX graphs: named ops that return output names, weights as initializers."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by onnxruntime >= 1.12, which older boards ship
CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's own operators (RotaryEmbedding)

_ELEM = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.uint32): TensorProto.UINT32,
}


class GraphBuilder:
    """Accumulates nodes and initializers; each op method returns the name of its output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._ids = itertools.count()
        self._consts: dict[tuple, str] = {}

    # graph boundary -----------------------------------------------------------------------------
    def input(self, name: str, dtype: type, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _ELEM[np.dtype(dtype)], shape))
        return name

    def output(self, value: str, name: str, dtype: type, shape: list[int | str]) -> None:
        self.op("Identity", [value], out=name)
        self.outputs.append(helper.make_tensor_value_info(name, _ELEM[np.dtype(dtype)], shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: list[int] | list[float] | float, dtype: type = np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared between uses."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def build(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == CONTRIB_DOMAIN for node in self.nodes):
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="vlbatch")
        model.ir_version = IR_VERSION
        return model

    # ops --------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        out = out or f"{op_type.lower()}_{next(self._ids)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: object) -> list[str]:
        outs = [f"{op_type.lower()}_{next(self._ids)}" for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs

    def cast(self, x: str, dtype: type) -> str:
        return self.op("Cast", [x], to=_ELEM[np.dtype(dtype)])

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.op("Reshape", [x, self.const(shape)])

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", [x], perm=perm)

    def linear(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ weight.T (+ bias); `weight` is (out, in) as in PyTorch."""
        y = self.op("MatMul", [x, self.weight(prefix + ".weight_t", weight.T)])
        if bias is not None:
            y = self.op("Add", [y, self.weight(prefix + ".bias", bias)])
        return y

    def layer_norm(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.weight(prefix + ".weight", weight), self.weight(prefix + ".bias", bias)],
            axis=-1,
            epsilon=eps,
        )

    def rms_norm(self, x: str, prefix: str, weight: np.ndarray, eps: float) -> str:
        """x / sqrt(mean(x^2) + eps) * weight, in the form onnxruntime fuses into one SimplifiedLayerNormalization."""
        mean_sq = self.op("ReduceMean", [self.op("Pow", [x, self.const(2.0, np.float32)])], axes=[-1], keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [mean_sq, self.const(eps, np.float32)])])
        return self.op("Mul", [self.op("Div", [x, rms]), self.weight(prefix + ".weight", weight)])

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])
