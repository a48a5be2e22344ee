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
    its scale and its nodes; None where the graph has no attention of that shape."""
    producer = {out: node for node in graph.node for out in node.output}
    inputs = {value.name: value.type.tensor_type.elem_type for value in graph.input}
    if inputs.get("K_cache") != FLOAT16 or inputs.get("V_cache") != FLOAT16 or "mask" not in inputs:
        return None  # the operator reads a 16-bit history only

    def source(name: str) -> str:  # the graph input behind a Cast, if any
        node = producer.get(name)
        return node.input[0] if node is not None and node.op_type == "Cast" else name

    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(nodes: list[Any]) -> Any:
        return nodes[0] if len(nodes) == 1 else None

    # the scores: q against the history's keys (widened), and the same q against the chunk's own keys
    past_scores = only([n for n in graph.node if n.op_type == "FusedMatMul" and source(n.input[1]) == "K_cache"])
    if past_scores is None:
        return None
    own_scores = only(
        [n for n in consumers.get(past_scores.input[0], []) if n.op_type == "FusedMatMul" and n is not past_scores]
    )
    # the weighted sums: over the history's values (widened) and over the chunk's own, joined by an Add
    past_sum = only([n for n in graph.node if n.op_type == "MatMul" and source(n.input[1]) == "V_cache"])
    join = only([n for n in consumers.get(past_sum.output[0], []) if n.op_type == "Add"]) if past_sum else None
    if own_scores is None or join is None:
        return None
    own_sum = producer.get(next((name for name in join.input if name != past_sum.output[0]), ""))
    scale = [attr.f for attr in past_scores.attribute if attr.name == "alpha"]
    if own_sum is None or own_sum.op_type != "MatMul" or len(scale) != 1:
        return None
    k_new, v_new = own_scores.input[1], own_sum.input[1]
    ends = dict(zip(_ENDS, (past_scores.input[0], "K_cache", "V_cache", k_new, v_new, "mask"), strict=True))
    # every node between those inputs and the join
    stop, names, cone = set(ends.values()), [join.output[0]], []
    while names:
        node = producer.get(names.pop())
        if node is None or any(node is seen for seen in cone):
            continue
        cone.append(node)
        names.extend(name for name in node.input if name and name not in stop)
    produced = {out for node in cone for out in node.output}
    outside = [node for node in graph.node if not any(node is seen for seen in cone)]
    if any(name in produced for node in outside for name in node.input if name != join.output[0]):
        return None  # something else reads a tensor of the attention: not the graph this knows
    if any(node.op_type == "Softmax" for node in outside) or not any(node.op_type == "Softmax" for node in cone):
        return None
    return {"ends": ends, "output": join.output[0], "scale": scale[0], "nodes": cone}


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
    removed = found["nodes"]
    join = next(index for index, node in enumerate(graph.node) if found["output"] in node.output)
    kept = [node for node in graph.node if not any(node is gone for gone in removed)]
    position = sum(1 for node in graph.node[:join] if not any(node is gone for gone in removed))
    fused = messages["NodeProto"](
        input=[found["ends"][name] for name in _ENDS],
        output=[found["output"]],
        name="fused_attention",
        op_type=OP,
        domain=DOMAIN,
        attribute=[messages["AttributeProto"](name="scale", f=found["scale"], type=FLOAT)],
    )
    # where the join was: every input of the attention is made before it, every reader of its output after it
    del graph.node[:]
    graph.node.extend(kept[:position] + [fused] + kept[position:])
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]  # the removed nodes' constants
    for init in unused:
        graph.initializer.remove(init)
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)
    return True
