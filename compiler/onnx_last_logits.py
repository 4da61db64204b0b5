"""Let the caller of an exported language model ask for the logits of the last positions only.

Generation reads one row of logits per prompt, yet the exported graph computes them for every
position: for a 512-token prompt of GPT-2 small the LM head is the largest product of the prefill,
and its 103 MB result is then copied out. This rewrite slices the head's input to the last
`logits_to_keep` positions (Hugging Face's name and meaning: 0 keeps them all). The input is an
overridable initializer whose value is 0, so a runtime that does not know it (onnxruntime-genai,
Optimum, the parity check) gets the whole logits as before, and onnxruntime does not fold it away
as a constant.
"""
from __future__ import annotations

LOGITS_TO_KEEP = "logits_to_keep"
KEPT_POSITIONS = "kept_positions"  # the logits' second dim once sliced

# ops that act on each position alone, between the LM head and the logits (bias, soft-capping, casts)
_POSITIONWISE = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Identity"}


def add_logits_to_keep(model) -> bool:
    """Rewrite `model` (an onnx ModelProto) in place; False (and the model untouched) where the logits
    do not come from one MatMul of a 3-d activation by a constant weight, followed only by positionwise ops."""
    from onnx import TensorProto, helper

    graph = model.graph
    head = _head_matmul(graph)
    if head is None or any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    hidden = head.input[0]
    kept = f"{hidden}_last_positions"
    graph.initializer.append(helper.make_tensor(LOGITS_TO_KEEP, TensorProto.INT64, [], [0]))
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    names = {"start": f"{LOGITS_TO_KEEP}_start", "starts": f"{LOGITS_TO_KEEP}_starts",
             "ends": f"{LOGITS_TO_KEEP}_ends", "axes": f"{LOGITS_TO_KEEP}_axes", "zero": f"{LOGITS_TO_KEEP}_zero"}
    graph.initializer.extend([
        helper.make_tensor(names["ends"], TensorProto.INT64, [1], [2 ** 62]),
        helper.make_tensor(names["axes"], TensorProto.INT64, [1], [1]),
        helper.make_tensor(names["zero"], TensorProto.INT64, [1], [0]),
    ])
    slicing = [
        # -k keeps the last k positions, and -0 = 0 all of them
        helper.make_node("Neg", [LOGITS_TO_KEEP], [names["start"]], name=f"{LOGITS_TO_KEEP}_neg"),
        helper.make_node("Unsqueeze", [names["start"], names["zero"]], [names["starts"]],
                         name=f"{LOGITS_TO_KEEP}_unsqueeze"),
        helper.make_node("Slice", [hidden, names["starts"], names["ends"], names["axes"]], [kept],
                         name=f"{LOGITS_TO_KEEP}_slice"),
    ]
    head.input[0] = kept
    at = list(graph.node).index(head)
    for offset, node in enumerate(slicing):
        graph.node.insert(at + offset, node)
    # the tensors after the slice no longer have the sequence's length
    downstream = _downstream(graph, kept)
    kept_values = [v for v in graph.value_info if v.name not in downstream]
    del graph.value_info[:]
    graph.value_info.extend(kept_values)
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].ClearField("dim_value")
    logits.type.tensor_type.shape.dim[1].dim_param = KEPT_POSITIONS
    return True


def _head_matmul(graph):
    """The MatMul whose output becomes the logits through positionwise ops only, or None."""
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    producer = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant" or (node.input and all(i in constant or not i for i in node.input)):
            constant.update(node.output)
    outputs = [o for o in graph.output if o.name == "logits"]
    if not outputs or len(outputs[0].type.tensor_type.shape.dim) != 3:
        return None
    name = "logits"
    while name in producer:
        node = producer[name]
        if node.op_type == "MatMul":
            return node if node.input[1] in constant and node.input[0] not in constant else None
        varying = [i for i in node.input if i and i not in constant]
        if node.op_type not in _POSITIONWISE or len(varying) != 1:
            return None
        name = varying[0]
    return None


def _downstream(graph, name: str) -> set[str]:
    """Every value computed from `name` (the graph's nodes are in topological order)."""
    reached = {name}
    for node in graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return reached
