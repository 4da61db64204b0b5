"""The reference for compiler/lower.py's meta-device build: how lmspec built and initialised a model
before, kept here so that tests and bench/materialise.py can check the weights stay the same."""
from __future__ import annotations

import math

import torch


def built_on_the_cpu(graph, seed: int):
    """The model made on the CPU, then each parameter initialised in place from one generator in the
    graph's order, LoRA adapters from a second: lmspec's build before it built on `meta`."""
    from lmspec.compiler.analysis import residual_params
    from lmspec.compiler.lora import lora_parameter_names
    from lmspec.compiler.lower import _Lowering
    from lmspec.compiler.registry import get_op

    model = _Lowering(graph).run()
    gen = torch.Generator().manual_seed(seed)
    residual = residual_params(graph)
    scale = 1.0 / math.sqrt(len(residual)) if residual else 1.0
    adapters = lora_parameter_names(graph)
    with torch.no_grad():
        for name, p in graph.params.items():
            if p.tied_to is not None or name in adapters:
                continue
            node = graph.g.nodes[p.node]
            kind, std = get_op(node["op"]).init(name[len(node["module"]) + 1:], node["args"])
            tensor = model.get_parameter(name)
            if kind == "zeros":
                tensor.zero_()
            elif kind == "fill":
                tensor.fill_(std)
            else:
                tensor.normal_(0.0, std * (scale if name in residual else 1.0), generator=gen)
        lora = torch.Generator().manual_seed(seed)
        for name in adapters:
            tensor = model.get_parameter(name)
            if name.endswith(".lora_b"):
                tensor.zero_()
            else:
                tensor.uniform_(-tensor.shape[1] ** -0.5, tensor.shape[1] ** -0.5, generator=lora)
    return model
