"""The few parts of an ONNX model that the CPU runtime edits as it loads a layer (fused_layer.py), declared from the
ONNX format's own field numbers over the protobuf package onnxruntime already brings, so the runtime needs no
`onnx` package (that stays the exporter's: the `export` extra).

Only the fields the edit reads or writes are declared: a model's opset imports and graph; a graph's nodes,
initializers' names and places, and inputs' element types; a node's inputs, outputs, type, domain and float
attributes. Every other field (weights, shapes, documentation, ...) is kept as protobuf keeps any field it does not
know, and written back unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

FLOAT = 1  # AttributeProto.AttributeType.FLOAT, and TensorProto.DataType.FLOAT
FLOAT16 = 10  # TensorProto.DataType.FLOAT16
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# message: (field, number, type, repeated, message type); types as in descriptor.proto
_STRING, _INT64, _FLOAT, _INT32, _MESSAGE = 9, 3, 2, 5, 11
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "OperatorSetIdProto": [("domain", 1, _STRING, False, ""), ("version", 2, _INT64, False, "")],
    "AttributeProto": [("name", 1, _STRING, False, ""), ("f", 2, _FLOAT, False, ""), ("type", 20, _INT32, False, "")],
    "NodeProto": [
        ("input", 1, _STRING, True, ""),
        ("output", 2, _STRING, True, ""),
        ("name", 3, _STRING, False, ""),
        ("op_type", 4, _STRING, False, ""),
        ("attribute", 5, _MESSAGE, True, "AttributeProto"),
        ("domain", 7, _STRING, False, ""),
    ],
    "TensorProto": [("name", 8, _STRING, False, ""), ("data_location", 14, _INT32, False, "")],
    "TensorTypeProto": [("elem_type", 1, _INT32, False, "")],
    "TypeProto": [("tensor_type", 1, _MESSAGE, False, "TensorTypeProto")],
    "ValueInfoProto": [("name", 1, _STRING, False, ""), ("type", 2, _MESSAGE, False, "TypeProto")],
    "GraphProto": [
        ("node", 1, _MESSAGE, True, "NodeProto"),
        ("initializer", 5, _MESSAGE, True, "TensorProto"),
        ("input", 11, _MESSAGE, True, "ValueInfoProto"),
    ],
    "ModelProto": [
        ("graph", 7, _MESSAGE, False, "GraphProto"),
        ("opset_import", 8, _MESSAGE, True, "OperatorSetIdProto"),
    ],
}
_PACKAGE = "vlbatch.onnx_subset"


@functools.cache
def message_classes() -> dict[str, Any]:
    """The declared messages' classes, by name (ModelProto, GraphProto, NodeProto, AttributeProto, ...)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="vlbatch_onnx_subset.proto", package=_PACKAGE, syntax="proto2")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            declared = message.field.add(name=field, number=number, type=kind)
            declared.label = declared.LABEL_REPEATED if repeated else declared.LABEL_OPTIONAL
            if type_name:
                declared.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = getattr(message_factory, "GetMessageClass", None)
    if get is None:  # protobuf before 4.21
        factory = message_factory.MessageFactory(pool)
        get = factory.GetPrototype
    return {name: get(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in _MESSAGES}


def load_model(data: bytes) -> Any:
    """A serialized ONNX model as a ModelProto of the declared fields (the rest kept and written back as it was)."""
    return message_classes()["ModelProto"].FromString(data)
