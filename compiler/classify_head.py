"""The classification rewrite: a language model's vocabulary head replaced by a head that maps the
hidden state of each text's last real token to class logits (Raschka, "Build a Large Language Model
from Scratch", ch. 6), as a change of the ModelGraph so that analysis, lowering and checkpoints see it.

    tokens [batch, seq] ──…blocks…──▶ ln_f ──▶ lm_head ──▶ logits [batch, seq, vocab]
becomes
    tokens [batch, seq] ──…blocks…──▶ ln_f ──▶ last_token(·, lengths) ──▶ classifier ──▶ logits [batch, classes]
    lengths [batch] ─────────────────────────────┘

Padding: batches are padded on the right, and the model gets a second input, `lengths`, the number
of real tokens in each row. With causal attention no position sees the ones after it, so the state
at lengths - 1 is exactly what the unpadded text gives: predictions do not depend on the pad token
or the padded length. (The book reads the last position of a batch padded with <|endoftext|>, which
makes a text's prediction depend on how much padding it got.) The rewrite therefore refuses models
with non-causal attention.
"""
from __future__ import annotations

import dataclasses

from .build import OpCall
from .graph import ModelGraph, Param
from .registry import OpError, get_op
from .rewrites import RewriteError
from .shapes import fmt_shape
from .values import TensorRef

HEAD_MODULE = "classifier"  # the new head's parameters: classifier.weight [classes, dim], classifier.bias
LENGTHS_INPUT = "lengths"


def classification_head(graph: ModelGraph, classes: int, labels: list[str] | None = None) -> ModelGraph:
    """A copy of `graph` rewritten into a classifier of `classes` classes."""
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise RewriteError(f"classify: needs at least 2 classes, got {classes!r}")
    if labels is not None and len(labels) != classes:
        raise RewriteError(f"classify: {len(labels)} labels for {classes} classes")
    logits = _vocab_output(graph)
    head, features = _lm_head(graph, logits)
    _check_causal(graph)
    graph = dataclasses.replace(graph, g=graph.g.copy(), params=dict(graph.params), inputs=list(graph.inputs),
                                outputs=list(graph.outputs))
    span = graph.g.nodes[head[0]]["span"]
    for node in head:
        graph.g.remove_node(node)
    graph.params = {name: p for name, p in graph.params.items() if p.node not in head}

    batch = features.shape[0]
    lengths = _add_input(graph, LENGTHS_INPUT, (batch,), "i64", span)
    last = _add_op(graph, "last_token", {"x": features, "lengths": lengths}, span, module=None)
    out = _add_op(graph, "linear", {"x": last, "out": classes, "bias": True, "tie": None}, span, module=HEAD_MODULE)
    graph.outputs = [(graph.outputs[0][0], out)]
    return graph


def _vocab_output(graph: ModelGraph) -> TensorRef:
    """The model's one output, [batch, seq, vocab] over the first input's [batch, seq]."""
    shapes = ", ".join(f"{name}: {fmt_shape(ref.shape)}" for name, ref in graph.outputs)
    if len(graph.outputs) != 1:
        raise RewriteError(f"classify: needs a model with one output [batch, seq, vocab], "
                           f"{graph.name} has {len(graph.outputs)} ({shapes})")
    _, ref = graph.outputs[0]
    tokens = graph.g.nodes[graph.inputs[0]]["outputs"][0][0] if graph.inputs else ()
    if len(ref.shape) != 3 or tuple(ref.shape[:2]) != tuple(tokens) or not isinstance(ref.shape[2], int):
        raise RewriteError(f"classify: needs the output to be [batch, seq, vocab] logits over the input "
                           f"tokens {fmt_shape(tokens)}; {graph.name}'s is {shapes}")
    return ref


def _lm_head(graph: ModelGraph, logits: TensorRef) -> tuple[list[str], TensorRef]:
    """The nodes from the vocabulary projection (a linear) to the output, and that linear's input:
    the final hidden states [batch, seq, dim]. Ops after the linear (a logit softcap) go with it."""
    chain, node = [], logits.node
    while True:
        data = graph.g.nodes[node]
        chain.append(node)
        x = data["args"].get("x")
        if data["op"] == "linear" and isinstance(x, TensorRef):
            break
        if not isinstance(x, TensorRef) or data["op"] == "input":
            raise RewriteError(f"classify: found no linear layer that makes {graph.name}'s logits "
                               f"(the chain back from the output reaches '{data['label']}', a {data['op']})")
        node = x.node
    for n in chain[1:]:
        users = set(graph.g.successors(n)) - set(chain)
        if users:
            raise RewriteError(f"classify: the logits' '{graph.g.nodes[n]['label']}' also feeds "
                               f"{', '.join(sorted(users))}, so the LM head cannot be removed")
    return list(reversed(chain)), x


def _check_causal(graph: ModelGraph) -> None:
    for _, data in graph.nodes():
        if data["op"] == "attention" and not data["args"].get("causal"):
            raise RewriteError(f"classify: attention '{data['module']}' is not causal; reading the last real "
                               f"token is independent of the padding after it only under causal attention")


def _fresh_id(graph: ModelGraph, base: str) -> str:
    node_id, k = base, 1
    while node_id in graph.g:
        node_id, k = f"{base}_{k}", k + 1
    return node_id


def _add_input(graph: ModelGraph, name: str, shape: tuple, dtype: str, span) -> TensorRef:
    taken = {graph.g.nodes[n]["args"]["name"] for n in graph.inputs}
    if name in taken:
        raise RewriteError(f"classify: {graph.name} already has an input named '{name}'")
    node_id = _fresh_id(graph, name)
    graph.add_node(node_id, "input", {"name": name}, [(shape, dtype)], span, None, name, None)
    graph.inputs.append(node_id)
    return TensorRef(node_id, 0, shape, dtype)


def _add_op(graph: ModelGraph, op_name: str, args: dict, span, module: str | None) -> TensorRef:
    """One op node, shape-checked and its parameters declared, through the op registry."""
    op = get_op(op_name)
    call = OpCall(op, args, graph)
    try:
        (shape, dtype), params = op.infer(call), op.params(call)
    except OpError as err:
        raise RewriteError(f"classify: {op_name}: {err}") from None
    if module is not None and any(p.name.startswith(module + ".") for p in graph.params.values()):
        raise RewriteError(f"classify: {graph.name} already has a module named '{module}'")
    node_id = _fresh_id(graph, module or op_name)
    graph.add_node(node_id, op_name, args, [(shape, dtype)], span, module, module or op_name, None)
    for local, pshape in params.items():
        graph.params[f"{module}.{local}"] = Param(f"{module}.{local}", tuple(pshape), node_id)
    return TensorRef(node_id, 0, shape, dtype)
