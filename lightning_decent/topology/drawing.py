"""The topology inspector's picture: the graphs and their consensus-error curves (matplotlib, networkx)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightning_decent.topology.base import Topology
from lightning_decent.topology.metrics import consensus_error_curve

_ERROR_FLOOR = 1e-16
_MAX_LABELLED_NODES = 32
_PHASE_COLORS = colormaps["Dark2"]  # graph edges: distinct from the C0..C9 colours of the curves


# ---- picture --------------------------------------------------------------------------------------
def _phase_edges(topology: Topology, step: int) -> list[tuple[int, int]]:
    """``(j, i)`` for every ``j -> i`` (``W[i, j] > 0``, ``i != j``); one per pair if undirected."""
    m = topology.sparse(step).tocoo()
    pairs = [(int(j), int(i)) for i, j in zip(m.row, m.col) if i != j and (topology.directed or j < i)]
    return sorted(pairs)


def _draw_graph(ax: Axes, topology: Topology, title_color: str) -> None:
    """The union of the period's edges on a circle, one colour per phase (a period longer than the
    palette, e.g. a random sequence, in one colour), arrows for digraphs."""
    n = topology.n
    graph = nx.DiGraph() if topology.directed else nx.Graph()
    graph.add_nodes_from(range(n))
    pos = nx.circular_layout(graph)
    node_size = 260 if n <= 16 else 120 if n <= _MAX_LABELLED_NODES else 8
    width = 0.9 if n <= _MAX_LABELLED_NODES else 0.5
    nx.draw_networkx_nodes(
        graph, pos, ax=ax, node_size=node_size, node_color="#dfe8f3", edgecolors="#34495e", linewidths=width
    )
    if n <= _MAX_LABELLED_NODES:
        nx.draw_networkx_labels(graph, pos, ax=ax, font_size=7 if n > 16 else 8)
    style = {"arrows": True, "arrowsize": 8, "connectionstyle": "arc3,rad=0.08"} if topology.directed else {}
    coloured = topology.period <= _PHASE_COLORS.N  # a long (random) sequence is drawn as one union
    phase_colors = [_PHASE_COLORS(k) for k in range(topology.period)] if coloured else [_PHASE_COLORS(0)]
    edge_sets = [_phase_edges(topology, k) for k in range(topology.period)]
    if not coloured:
        edge_sets = [sorted(set().union(*edge_sets))]
    for edges, color in zip(edge_sets, phase_colors):
        nx.draw_networkx_edges(
            graph, pos, edgelist=edges, ax=ax, edge_color=[color], width=width, node_size=node_size, **style
        )
    kind = "static" if topology.period == 1 else f"union of {topology.period} phases"
    ax.set_title(f"{topology.name}\n(n={n}, {kind})", fontsize=10, color=title_color)
    if topology.period > 1 and coloured:
        handles = [Line2D([], [], color=c, label=f"phase {k}") for k, c in enumerate(phase_colors)]
        ax.legend(
            handles=handles,
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.02),
            ncols=min(topology.period, 4),
            frameon=False,
        )
    ax.set_axis_off()


def _draw_consensus(ax: Axes, topologies: Sequence[Topology], rounds: int, seed: int) -> None:
    """Consensus error of repeated gossip from the same random ``x^0``, log scale."""
    for idx, topology in enumerate(topologies):
        curve = np.maximum(consensus_error_curve(topology, rounds, seed), _ERROR_FLOOR)
        label = topology.name + ("" if topology.doubly_stochastic else " (push-sum z/v)")
        ax.semilogy(np.arange(rounds + 1), curve, color=_line_color(idx), marker=".", label=label)
    ax.set_xlabel("gossip round k")
    ax.set_ylabel(r"$\|x^k-\bar{x}\|\,/\,\|x^0-\bar{x}\|$")
    ax.set_title(f"Consensus error of repeated gossip (x$^0$ ~ N(0, I), seed {seed}; floor {_ERROR_FLOOR:g})")
    ax.set_ylim(_ERROR_FLOOR / 3, 2.0)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9)


def _line_color(idx: int) -> str:
    return f"C{idx % 10}"


def plot(topologies: Sequence[Topology], path: str, rounds: int = 50, seed: int = 0) -> None:
    """Save a PNG: one panel per graph on top, one shared consensus-error panel below."""
    cols = min(len(topologies), 4)
    graph_rows = math.ceil(len(topologies) / cols)
    fig = Figure(figsize=(3.6 * max(cols, 2), 3.6 * graph_rows + 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(graph_rows + 1, cols, height_ratios=[3.6] * graph_rows + [4.2])
    for idx, topology in enumerate(topologies):
        _draw_graph(fig.add_subplot(grid[idx // cols, idx % cols]), topology, _line_color(idx))
    _draw_consensus(fig.add_subplot(grid[graph_rows, :]), topologies, rounds, seed)
    fig.savefig(path, dpi=110)
