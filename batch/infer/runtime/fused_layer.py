"""A format 3 decoder layer graph with its attention as one node: com.vlbatch::FusedAttention (see
batch/infer/runtime/native/fused_attention.c) in place of the nodes the exporter wrote for it
(batch/model/export/graphs.py, _attention), which widen the whole fp16 history to float32 before scoring it.

The rewrite is made as a layer is loaded, on the graph in memory: the files on disk stay the plain ONNX that any
onnxruntime runs. It recognises the attention by its structure (scores over the history and over the chunk, one
softmax, two weighted sums joined by an Add) and leaves a graph it does not recognise as it is.
"""

from __future__ import annotations

from typing import Any

from batch.infer.runtime.onnx_messages import EXTERNAL, FLOAT, FLOAT16, message_classes

DOMAIN = "com.vlbatch"
OP = "FusedAttention"
_ENDS = ("q", "K_cache", "V_cache", "k", "v", "mask")


def _attention(graph: Any) -> dict[str, Any] | None:
    """The attention of a format 3 layer: its inputs (q, K_cache, V_cache, k, v, mask: tensor names), its output,
    its scale and its nodes (their indices in graph.node); None where the graph has no attention of that shape."""
    nodes = list(graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}
    inputs = {value.name: value.type.tensor_type.elem_type for value in graph.input}
    if inputs.get("K_cache") != FLOAT16 or inputs.get("V_cache") != FLOAT16 or "mask" not in inputs:
        return None  # the operator reads a 16-bit history only

    def made_by(name: str) -> Any:
        return nodes[producer[name]] if name in producer else None

    def source(name: str) -> str:  # the graph input behind a Cast, if any
        node = made_by(name)
        return node.input[0] if node is not None and node.op_type == "Cast" else name

    def only(indices: list[int]) -> int | None:
        return indices[0] if len(indices) == 1 else None

    def read(name: str, op: str) -> list[int]:  # the nodes of type `op` that read `name`
        return [i for i, node in enumerate(nodes) if node.op_type == op and name in node.input]

    # the scores: q against the history's keys (widened), and the same q against the chunk's own keys
    past_scores = only(
        [i for i, n in enumerate(nodes) if n.op_type == "FusedMatMul" and source(n.input[1]) == "K_cache"]
    )
    if past_scores is None:
        return None
    q = nodes[past_scores].input[0]
    own_scores = only([i for i in read(q, "FusedMatMul") if i != past_scores])
    # the weighted sums: over the history's values (widened) and over the chunk's own, joined by an Add
    past_sum = only([i for i, n in enumerate(nodes) if n.op_type == "MatMul" and source(n.input[1]) == "V_cache"])
    join = only(read(nodes[past_sum].output[0], "Add")) if past_sum is not None else None
    if own_scores is None or past_sum is None or join is None:
        return None
    output = nodes[join].output[0]
    own_sum = made_by(next((name for name in nodes[join].input if name != nodes[past_sum].output[0]), ""))
    scale = [attr.f for attr in nodes[past_scores].attribute if attr.name == "alpha"]
    if own_sum is None or own_sum.op_type != "MatMul" or len(scale) != 1:
        return None
    names = (q, "K_cache", "V_cache", nodes[own_scores].input[1], own_sum.input[1], "mask")
    ends = dict(zip(_ENDS, names, strict=True))
    # every node between those inputs and the join
    stop, pending, cone = set(ends.values()), [output], set()
    while pending:
        index = producer.get(pending.pop())
        if index is None or index in cone:
            continue
        cone.add(index)
        pending.extend(name for name in nodes[index].input if name and name not in stop)
    produced = {out for index in cone for out in nodes[index].output}
    outside = [node for index, node in enumerate(nodes) if index not in cone]
    if any(name in produced for node in outside for name in node.input if name != output):
        return None  # something else reads a tensor of the attention: not the graph this knows
    if any(node.op_type == "Softmax" for node in outside) or not any(nodes[i].op_type == "Softmax" for i in cone):
        return None
    return {"ends": ends, "output": output, "scale": scale[0], "nodes": cone, "join": join}


def fuse_attention(model: Any) -> bool:
    """Put one FusedAttention node in place of the attention of a format 3 layer `model` (a ModelProto of
    onnx_messages, changed in place); False, and the model untouched, where it has no attention this recognises or
    its weights lie in files beside it (the edited graph is handed to onnxruntime as bytes, with no folder)."""
    if any(init.data_location == EXTERNAL for init in model.graph.initializer):
        return False
    found = _attention(model.graph)
    if found is None:
        return False
    messages = message_classes()
    graph = model.graph

    def copied(node: Any) -> Any:
        copy = messages["NodeProto"]()
        copy.CopyFrom(node)
        return copy

    kept = [copied(node) for index, node in enumerate(graph.node) if index not in found["nodes"]]
    # where the join was: every input of the attention is made before it, every reader of its output after it
    position = sum(1 for index in range(found["join"]) if index not in found["nodes"])
    fused = messages["NodeProto"](
        input=[found["ends"][name] for name in _ENDS],
        output=[found["output"]],
        name="fused_attention",
        op_type=OP,
        domain=DOMAIN,
        attribute=[messages["AttributeProto"](name="scale", f=found["scale"], type=FLOAT)],
    )
    del graph.node[:]
    graph.node.extend(kept[:position] + [fused] + kept[position:])
    used = {name for node in graph.node for name in node.input}
    for name in [init.name for init in graph.initializer if init.name not in used]:  # the removed nodes' constants
        graph.initializer.remove(next(init for init in graph.initializer if init.name == name))
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)
    return True
