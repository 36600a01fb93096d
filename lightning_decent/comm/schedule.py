"""Link-aware order of a gossip round: the directed edges of ``W(step)`` split into matchings.

A node's link carries one stream per direction at full speed; if a node sends to ``d`` peers at
once, the ``d`` streams share its uplink, and a receiver fed by several senders shares its
downlink. The schedule splits the edges ``j -> i`` (``W[i, j] != 0``, ``i != j``) of one phase into
*rounds* in which every node sends to at most one peer and receives from at most one: a proper
edge colouring of the bipartite graph (senders on one side, receivers on the other). By König's
theorem ``Delta = max(max out-degree, max in-degree)`` rounds suffice, so a node with ``d`` peers
needs ``d`` rounds and a round moves one model per link and direction: ``d * M / B`` in total.

Every rank computes the same schedule from ``W`` alone (a deterministic function of the matrix),
so no coordination is needed.
"""

from __future__ import annotations

import numpy as np

Edge = tuple[int, int]  # (sender, receiver)


def directed_edges(matrix: np.ndarray, tol: float = 1e-10) -> list[Edge]:
    """``(j, i)`` for every ``W[i, j] != 0`` with ``i != j`` (node ``j`` sends to ``i``), sorted."""
    receivers, senders = np.nonzero(np.abs(matrix) > tol)
    return sorted((int(j), int(i)) for i, j in zip(receivers, senders) if i != j)


def gossip_rounds(matrix: np.ndarray) -> list[list[Edge]]:
    """Split the directed edges of ``matrix`` into the fewest rounds of sends and receives that are
    matchings (each node sends to at most one peer and receives from at most one per round).

    Edges are coloured one at a time (sorted order). An edge ``u -> v`` takes a colour ``a`` free at
    sender ``u``; if ``a`` is taken at receiver ``v``, the path from ``v`` alternating colours ``a``
    and ``b`` (``b`` free at ``v``) has its two colours swapped first, which frees ``a`` at ``v`` and
    cannot reach ``u`` (the graph is bipartite and ``a`` is free at ``u``). Every colour then stays
    a matching and no more than ``Delta`` colours are used.

    Returns:
        ``rounds[c]``: the ``(sender, receiver)`` pairs of round ``c``, sorted; ``Delta`` rounds (none
        for a graph without edges).
    """
    edges = directed_edges(matrix)
    if not edges:
        return []
    n = matrix.shape[0]
    out_degree = np.bincount([u for u, _ in edges], minlength=n)
    in_degree = np.bincount([v for _, v in edges], minlength=n)
    colours = int(max(out_degree.max(), in_degree.max()))
    sends: list[dict[int, int]] = [{} for _ in range(n)]  # sends[u][c] = receiver of u's colour-c edge
    receives: list[dict[int, int]] = [{} for _ in range(n)]  # receives[v][c] = sender of v's colour-c edge
    for u, v in edges:
        a = _free_colour(sends[u], colours)
        if a in receives[v]:
            _swap_alternating_path(v, a, _free_colour(receives[v], colours), sends, receives)
        sends[u][a] = v
        receives[v][a] = u
    rounds: list[list[Edge]] = [[] for _ in range(colours)]
    for u in range(n):
        for c, v in sends[u].items():
            rounds[c].append((u, v))
    return [sorted(r) for r in rounds]


def _free_colour(used: dict[int, int], colours: int) -> int:
    return next(c for c in range(colours) if c not in used)


def _swap_alternating_path(
    start: int, a: int, b: int, sends: list[dict[int, int]], receives: list[dict[int, int]]
) -> None:
    """Swap colours ``a`` and ``b`` on the path that leaves receiver ``start`` by its colour-``a`` edge,
    then alternates: from a sender along its colour-``b`` edge, from a receiver along its colour-``a`` edge."""
    path: list[tuple[int, int, int]] = []  # (sender, receiver, colour)
    receiver: int | None = start
    while receiver is not None and a in receives[receiver]:
        sender = receives[receiver][a]
        path.append((sender, receiver, a))
        receiver = sends[sender].get(b)
        if receiver is not None:
            path.append((sender, receiver, b))
    for sender, receiver, colour in path:
        del sends[sender][colour]
        del receives[receiver][colour]
    for sender, receiver, colour in path:
        swapped = b if colour == a else a
        sends[sender][swapped] = receiver
        receives[receiver][swapped] = sender
