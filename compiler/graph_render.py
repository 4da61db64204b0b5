"""Draw a model graph: DOT text (pydot) or a picture (matplotlib), chosen by the file's suffix, as bytes;
the caller writes them (the compiler may not import runtime/atomic.py, the one way to write a file)."""
from __future__ import annotations

import io
from pathlib import Path

import networkx as nx

from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.shapes import fmt_shape

PICTURES = (".svg", ".png", ".pdf")


def render_graph(graph: ModelGraph, path: str) -> bytes:
    """The drawing of `graph` in the format named by `path`'s suffix (.dot, .svg, .png or .pdf)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".dot":
        return _dot(graph).encode("utf-8")
    if suffix in PICTURES:
        return _picture(_display_graph(graph), suffix[1:])
    raise ValueError(f"--graph {path}: use a .dot, .svg, .png or .pdf file name")


def _display_graph(graph: ModelGraph) -> nx.DiGraph:
    out = nx.DiGraph()
    for node_id, data in graph.nodes():
        shape = fmt_shape(data["outputs"][0][0])
        where = data["module"] or node_id
        out.add_node(node_id, label=f"{data['op']}\n{where}\n{shape}")
    for a, b in graph.g.edges():
        out.add_edge(a, b)
    return out


def _dot(graph: ModelGraph) -> str:
    import pydot
    dot = pydot.Dot(graph.name, graph_type="digraph", rankdir="TB")
    g = _display_graph(graph)
    for n, data in g.nodes(data=True):
        dot.add_node(pydot.Node(n, label=data["label"], shape="box"))
    for a, b in g.edges():
        dot.add_edge(pydot.Edge(a, b))
    return dot.to_string()


def _picture(g: nx.DiGraph, fmt: str) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for depth, layer in enumerate(nx.topological_generations(g)):
        for n in layer:
            g.nodes[n]["depth"] = -depth
    pos = nx.multipartite_layout(g, subset_key="depth", align="horizontal")
    height = max(4, 0.6 * (1 - min(d for _, d in g.nodes(data="depth"))))
    fig = Figure(figsize=(10, height))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    nx.draw_networkx(g, pos, ax=ax, labels=nx.get_node_attributes(g, "label"), node_shape="s",
                     node_color="#dde7f3", node_size=300, font_size=6, arrowsize=8)
    ax.axis("off")
    out = io.BytesIO()
    fig.savefig(out, format=fmt, bbox_inches="tight")
    return out.getvalue()
