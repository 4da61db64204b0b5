"""Draw a model graph: DOT text (pydot) or a picture (matplotlib), chosen by the file's suffix."""
from __future__ import annotations

import os
from pathlib import Path

import networkx as nx

from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.shapes import fmt_shape


def _display_graph(graph: ModelGraph) -> nx.DiGraph:
    out = nx.DiGraph()
    for node_id, data in graph.nodes():
        shape = fmt_shape(data["outputs"][0][0])
        where = data["module"] or node_id
        out.add_node(node_id, label=f"{data['op']}\n{where}\n{shape}")
    for a, b in graph.g.edges():
        out.add_edge(a, b)
    return out


def write_graph(graph: ModelGraph, path: str) -> None:
    suffix = Path(path).suffix.lower()
    tmp = f"{path}.tmp-{os.getpid()}"
    g = _display_graph(graph)
    if suffix == ".dot":
        import pydot
        dot = pydot.Dot(graph.name, graph_type="digraph", rankdir="TB")
        for n, data in g.nodes(data=True):
            dot.add_node(pydot.Node(n, label=data["label"], shape="box"))
        for a, b in g.edges():
            dot.add_edge(pydot.Edge(a, b))
        Path(tmp).write_text(dot.to_string())
    elif suffix in (".svg", ".png", ".pdf"):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        for depth, layer in enumerate(nx.topological_generations(g)):
            for n in layer:
                g.nodes[n]["depth"] = -depth
        pos = nx.multipartite_layout(g, subset_key="depth", align="horizontal")
        height = max(4, 0.6 * (1 - min(d for _, d in g.nodes(data="depth"))))
        fig, ax = plt.subplots(figsize=(10, height))
        nx.draw_networkx(g, pos, ax=ax, labels=nx.get_node_attributes(g, "label"), node_shape="s",
                         node_color="#dde7f3", node_size=300, font_size=6, arrowsize=8)
        ax.axis("off")
        fig.savefig(tmp, format=suffix[1:], bbox_inches="tight")
        plt.close(fig)
    else:
        raise ValueError(f"--graph {path}: use a .dot, .svg, .png or .pdf file name")
    os.replace(tmp, path)
