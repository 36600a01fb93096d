"""Builders for the standard gossip graphs, and the name registry used by configs and the CLI.

Every builder takes the number of nodes ``n`` (plus options) and returns a :class:`Topology` in the
pull convention of ``base.py``: ``W[i, j]`` is the weight node ``i`` gives to node ``j``'s value. Each
builder cites the paper its weights come from; undirected graphs without closed-form weights get
Metropolis–Hastings weights (Xiao, Boyd & Lall, IPSN 2005). ``tests/test_topology*.py`` checks the
consensus rates they produce against independent computations. Families with their own module are registered here
too: Base-(k+1) graphs (``finite_time.py``), EquiTopo (``equitopo.py``) and two-level clusters
(``hierarchical.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from lightning_decent._extras import require
from lightning_decent.registry import Registry
from lightning_decent.topology.base import Topology
from lightning_decent.topology.equitopo import equidyn, equistatic
from lightning_decent.topology.finite_time import base
from lightning_decent.topology.hierarchical import HierarchicalTopology

if TYPE_CHECKING:
    import networkx as nx

_SUM_TOL = 1e-9
_ER_MAX_ATTEMPTS = 100


# ---- shared constructions -----------------------------------------------------------------------
def _check_n(n: int, name: str, minimum: int = 1) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise ValueError(f"{name} needs an integer number of nodes n >= {minimum}; got n={n!r}.")


def _circulant(n: int, offsets: Iterable[int]) -> sp.csr_array:
    """``W[i, (i + o) mod n] = 1/|O|`` for each distinct offset ``o`` in ``O`` (node i pulls from i+o), sparse."""
    distinct = sorted({o % n for o in offsets})
    rows = np.repeat(np.arange(n), len(distinct))
    cols = (rows + np.tile(distinct, n)) % n
    return sp.csr_array((np.full(rows.size, 1.0 / len(distinct)), (rows, cols)), shape=(n, n))


def _metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
    """Metropolis–Hastings weights of an undirected graph with degrees ``d`` (self excluded):
    ``W[i, j] = 1 / (1 + max(d_i, d_j))`` on each edge and ``W[i, i] = 1 - sum_{j != i} W[i, j]``
    (the weights of BlueFog's ``MeshGrid2DGraph``/``StarGraph``)."""
    adj = adjacency.astype(bool) & ~np.eye(len(adjacency), dtype=bool)
    deg = adj.sum(axis=1)
    w = np.where(adj, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def _group_average(groups: Iterable[Sequence[int]], n: int) -> np.ndarray:
    """Every rank of a group takes the exact average of its group: ``W[i, j] = 1/|R|`` for i, j in R."""
    w = np.zeros((n, n))
    for group in groups:
        w[np.ix_(group, group)] = 1.0 / len(group)
    return w


def _networkx() -> ModuleType:
    """networkx, which the connectivity checks of ``erdos_renyi`` and the directed graphs use."""
    return require("networkx", "app", "the connectivity check of this topology")


def _unreachable_message(graph: nx.DiGraph) -> str:
    """Name the nodes that node 0 cannot reach, or those that cannot reach node 0."""
    nx = _networkx()
    cannot_be_reached = sorted(set(graph) - nx.descendants(graph, 0) - {0})
    if cannot_be_reached:
        return f"node 0 cannot reach nodes {cannot_be_reached}"
    cannot_reach = sorted(set(graph) - nx.ancestors(graph, 0) - {0})
    return f"nodes {cannot_reach} cannot reach node 0"


def _check_strongly_connected(adjacency: np.ndarray, what: str) -> None:
    """Raise unless every node can reach every other; ``adjacency[i, j]`` means j sends to i."""
    nx = _networkx()
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(adjacency)))
    graph.add_edges_from((int(j), int(i)) for i, j in zip(*np.nonzero(adjacency)) if i != j)
    if not nx.is_strongly_connected(graph):
        raise ValueError(
            f"{what} is not strongly connected ({_unreachable_message(graph)}), so gossip can never "
            "reach the average; add edges so that every node can reach every other."
        )


# ---- static undirected graphs ---------------------------------------------------------------------
def complete(n: int) -> Topology:
    """Complete graph: ``W = 11^T / n`` (one gossip round is an exact all-reduce average)."""
    _check_n(n, "complete")
    everyone = sp.csr_array(
        (np.full(n * n, 1.0 / n), np.tile(np.arange(n), n), np.arange(0, n * n + 1, n)), shape=(n, n)
    )
    return Topology([everyone], name="complete")


def ring(n: int) -> Topology:
    """Undirected ring: ``W[i, i] = W[i, i±1 mod n] = 1/3``. For ``n = 2`` both weights
    are 1/2 (the two neighbours coincide); for ``n = 1``, ``W = [[1]]``."""
    _check_n(n, "ring")
    return Topology([_circulant(n, (0, 1, -1))], name="ring")


def star(n: int, center: int = 0) -> Topology:
    """Star around ``center`` with Metropolis–Hastings weights: ``W[c, i] = W[i, c] = 1/n``,
    ``W[i, i] = 1 - 1/n`` for leaves ``i`` and ``W[c, c] = 1/n`` (= BlueFog ``StarGraph``)."""
    _check_n(n, "star")
    if not 0 <= center < n:
        raise ValueError(f"star needs 0 <= center < n; got center={center} for n={n}.")
    adj = np.zeros((n, n), dtype=bool)
    adj[center, :] = adj[:, center] = True
    return Topology([_metropolis_hastings(adj)], name="star")


def _mesh_shape(n: int, rows: int | None, cols: int | None, name: str) -> tuple[int, int]:
    """``(rows, cols)`` of a 2-D mesh: explicit, or rows = the largest divisor of n that is <= sqrt(n)
    (BlueFog's rule). A prime n > 3 would give a 1 x n path, which is refused."""
    for label, size in (("rows", rows), ("cols", cols)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} needs a positive integer {label}=; got {label}={size!r}.")
    if rows is None and cols is None:
        rows = next(r for r in range(math.isqrt(n), 0, -1) if n % r == 0)
        if rows == 1 and n > 3:
            raise ValueError(
                f"{name} needs a composite n to form a 2-D mesh; n={n} is prime and would give a 1 x {n} "
                "path. Use ring or exponential, a composite n, or pass rows=1 to accept the 1 x n shape."
            )
    rows = rows if rows is not None else n // cols
    cols = cols if cols is not None else n // rows
    if rows * cols != n:
        raise ValueError(f"{name} needs rows * cols == n; got rows={rows}, cols={cols}, n={n}.")
    return rows, cols


def _lattice(rows: int, cols: int, wrap: bool) -> np.ndarray:
    """Adjacency of the 4-neighbour lattice on ``rows x cols`` nodes (node ``a * cols + b`` at (a, b));
    with ``wrap`` the sides close into a torus and duplicate neighbours merge."""
    adj = np.zeros((rows * cols, rows * cols), dtype=bool)
    for a in range(rows):
        for b in range(cols):
            for da, db in ((1, 0), (0, 1)):
                p, q = a + da, b + db
                if wrap:
                    p, q = p % rows, q % cols
                elif p >= rows or q >= cols:
                    continue
                adj[a * cols + b, p * cols + q] = adj[p * cols + q, a * cols + b] = True
    np.fill_diagonal(adj, False)
    return adj


def grid(n: int, rows: int | None = None, cols: int | None = None) -> Topology:
    """2-D mesh ``rows x cols`` without wrap-around, Metropolis–Hastings weights (BlueFog
    ``MeshGrid2DGraph``): ``W[i, j] = 1/(1 + max(d_i, d_j))`` for lattice neighbours. By default
    rows = the largest divisor of n that is <= sqrt(n); a prime n > 3 is refused."""
    _check_n(n, "grid")
    r, c = _mesh_shape(n, rows, cols, "grid")
    return Topology([_metropolis_hastings(_lattice(r, c, wrap=False))], name="grid")


def torus(n: int, rows: int | None = None, cols: int | None = None) -> Topology:
    """2-D torus ``rows x cols`` (the mesh of :func:`grid` with wrap-around), Metropolis–Hastings
    weights, i.e. ``1/(deg + 1)`` since it is regular: 1/5 for sides >= 3; a side of length 2
    merges duplicate neighbours (degree 3) and a side of length 1 gives a ring. Prime n > 3 is refused."""
    _check_n(n, "torus")
    r, c = _mesh_shape(n, rows, cols, "torus")
    return Topology([_metropolis_hastings(_lattice(r, c, wrap=True))], name="torus")


def erdos_renyi(n: int, p: float | None = None, seed: int = 0) -> Topology:
    """Erdős–Rényi ``G(n, p)`` with Metropolis–Hastings weights, drawn deterministically:
    ``U = numpy.random.default_rng(seed).random((n, n))``, edge ``{i, j}`` (i < j) iff ``U[i, j] < p``
    (a deterministic draw, so that tests and runs agree). A disconnected draw is redrawn with
    ``seed + 1, seed + 2, ...`` (at most 100 attempts)."""
    _check_n(n, "erdos_renyi")
    if p is None or not 0.0 < p <= 1.0:
        raise ValueError(f"erdos_renyi needs an edge probability p= in (0, 1], e.g. p=0.5; got p={p!r}.")
    nx = _networkx()
    for attempt in range(_ER_MAX_ATTEMPTS):
        upper = np.triu(np.random.default_rng(seed + attempt).random((n, n)) < p, k=1)
        adj = upper | upper.T
        if nx.is_connected(nx.from_numpy_array(adj.astype(int))):
            return Topology([_metropolis_hastings(adj)], name="erdos_renyi")
    raise ValueError(
        f"erdos_renyi found no connected G(n={n}, p={p}) in {_ER_MAX_ATTEMPTS} draws from seed={seed}; "
        "use a larger p (connectivity needs about p > ln(n)/n)."
    )


# ---- exponential and time-varying graphs ------------------------------------------------------------
def _tau(n: int) -> int:
    """``tau = ceil(log2 n)``: the number of distinct hops ``2^0 .. 2^floor(log2(n-1))``."""
    return (n - 1).bit_length()


def exponential(n: int) -> Topology:
    """Static exponential graph (Ying, Yuan, Chen, Hu, Pan & Yin, NeurIPS 2021):
    ``W[i, j] = 1/(tau + 1)`` if ``(j - i) mod n`` is 0 or a power of two ``2^0 .. 2^floor(log2(n-1))``,
    ``tau = ceil(log2 n)``. Node i pulls from ``i + 2^k`` (its transpose, pulling from ``i - 2^k``, has
    the same consensus rate). Doubly stochastic, not symmetric for n >= 4."""
    _check_n(n, "exponential")
    return Topology([_circulant(n, [0] + [2**k for k in range(_tau(n))])], name="exponential")


def one_peer_exponential(n: int) -> Topology:
    """One-peer exponential graph (Ying et al., NeurIPS 2021), period ``tau = ceil(log2 n)``:
    ``W^(k)[i, i] = 1/2`` and ``W^(k)[i, (i + 2^(k mod tau)) mod n] = 1/2``.

    Every phase is doubly stochastic with one peer per node. The product of any ``tau`` consecutive
    phases is exactly ``11^T/n`` only when n is a power of two; for other n it is still a valid
    (primitive) gossip schedule that averages asymptotically.
    """
    _check_n(n, "one_peer_exponential", minimum=2)
    return Topology([_circulant(n, (0, 2**k)) for k in range(_tau(n))], name="one_peer_exponential")


def _ranks_per_machine(local_world_size: int | None, name: str) -> int:
    """``local_world_size``, or ``$LOCAL_WORLD_SIZE`` (set by torchrun) when it is ``None``."""
    if local_world_size is not None:
        return local_world_size
    if "LOCAL_WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"{name} needs the number of ranks per machine: pass local_world_size=L (or set LOCAL_WORLD_SIZE)."
        )
    return int(os.environ["LOCAL_WORLD_SIZE"])


def _machine_ranks(machine: int, local: int) -> list[int]:
    return list(range(machine * local, (machine + 1) * local))


def _aer_phases(machines: int, local: int) -> list[list[list[int]]]:
    """The rank groups of each AER phase: for hop ``2^i`` machines ``j`` and ``j XOR 2^i`` pair up;
    a pair counter (not reset between hops) decides whether the pair averages within each machine
    first and across the pair second (even count) or the reverse (odd count)."""
    phases = []
    count = 0
    for i in range(machines.bit_length() - 1):
        first: list[list[int]] = []
        second: list[list[int]] = []
        for j in range(machines):
            t = j ^ (1 << i)
            if t < j:
                continue
            intra = [_machine_ranks(j, local), _machine_ranks(t, local)]
            inter = [_machine_ranks(j, local) + _machine_ranks(t, local)]
            first += intra if count % 2 == 0 else inter
            second += inter if count % 2 == 0 else intra
            count += 1
        phases += [first, second]
    return phases


def alternating_exponential_ring(n: int, local_world_size: int | None = None) -> Topology:
    """decent-dp's ``alternating-exp-ring`` (Wang, Zhang, Wu & Johansson, ICLR 2025): ``n = N x L`` ranks on ``N = 2^r``
    machines of ``L = local_world_size`` ranks (machine ``m`` holds ranks ``mL .. mL + L - 1``).

    Period ``2r``. For each hop ``2^i`` machines pair as ``j <-> j XOR 2^i``; in one of the two phases
    a pair averages exactly over its ``2L`` ranks (inter-machine), in the other each machine averages
    its own ``L`` ranks (intra-machine), alternating by pair so each phase uses the network for half of
    the pairs. Every group takes its exact average (``W[i, j] = 1/|group|``). ``L = 1`` is allowed:
    a single-rank group keeps its own value. ``local_world_size`` defaults to ``$LOCAL_WORLD_SIZE``.
    """
    _check_n(n, "alternating_exponential_ring", minimum=2)
    local = _ranks_per_machine(local_world_size, "alternating_exponential_ring")
    machines = n // local if isinstance(local, int) and local >= 1 else 0
    if machines * local != n or machines < 2 or machines & (machines - 1):
        raise ValueError(
            "alternating_exponential_ring needs n = N x local_world_size with N = 2, 4, 8, ... machines; "
            f"got n={n}, local_world_size={local!r}. Choose a local_world_size that divides n into a "
            "power-of-two number of machines, or use one_peer_exponential."
        )
    return Topology(
        [_group_average(groups, n) for groups in _aer_phases(machines, local)],
        name="alternating_exponential_ring",
    )


# ---- directed graphs (column-stochastic, for push-sum) ---------------------------------------------
def directed_ring(n: int) -> Topology:
    """Directed ring: ``W[i, i] = 1/2``, ``W[i, i-1 mod n] = 1/2`` (node i receives from i-1 and sends
    to i+1). Doubly stochastic, one peer per node."""
    _check_n(n, "directed_ring")
    return Topology([_circulant(n, (0, -1))], name="directed_ring")


def _edge_pairs(n: int, edges: Iterable[Sequence[int]]) -> set[tuple[int, int]]:
    """Validated ``(src, dst)`` pairs, duplicates merged and self-loops dropped (they are implicit)."""
    pairs = set()
    for edge in edges:
        if len(edge) != 2 or not all(isinstance(v, (int, np.integer)) and 0 <= v < n for v in edge):
            raise ValueError(f"directed_graph edges must be (src, dst) pairs of node ids in [0, {n}); got {edge!r}.")
        if edge[0] != edge[1]:
            pairs.add((int(edge[0]), int(edge[1])))
    return pairs


def directed_graph(n: int, edges: Iterable[Sequence[int]] | None = None) -> Topology:
    """Column-stochastic weights on a user's directed graph (those of Nedić & Olshevsky, IEEE TAC 2015,
    with the sender's out-degree):
    ``W[i, j] = 1/(1 + d_j^out)`` if ``j -> i`` or ``i == j``, else 0. ``edges`` lists ``(src, dst)``
    pairs (``src`` sends to ``dst``). The graph must be strongly connected. Use it with push-sum."""
    _check_n(n, "directed_graph")
    if edges is None:
        raise ValueError("directed_graph needs edges=[(src, dst), ...] listing who sends to whom.")
    pairs = _edge_pairs(n, edges)
    adj = np.eye(n, dtype=bool)
    for src, dst in pairs:
        adj[dst, src] = True
    _check_strongly_connected(adj, f"directed_graph with edges {sorted(pairs)}")
    return Topology([adj / adj.sum(axis=0, keepdims=True)], name="directed_graph")


def challenging_digraph(n: int) -> Topology:
    """The "challenging" column-stochastic digraph of Liang, Huang, Xin & Yuan (arXiv:2312.04928):
    first row ``(1/2, ..., 1/2, 1)``, sub-diagonal ``W[j+1, j] = 1/2``, all else 0.
    Its equilibrium is ``pi ∝ (2^(n-1), ..., 2, 1)``, so ``kappa_pi = 2^(n-1)``, and
    ``beta_pi = 1/sqrt(2)`` for n >= 3."""
    _check_n(n, "challenging_digraph")
    w = np.zeros((n, n))
    w[0, :] = 0.5
    w[0, n - 1] = 1.0
    w[np.arange(1, n), np.arange(n - 1)] = 0.5
    return Topology([w], name="challenging_digraph")


# ---- transformations and user matrices ----------------------------------------------------------------
def lazy(topology: Topology) -> Topology:
    """Every phase replaced by ``(W + I)/2``: the same graph with self weights raised, which moves all
    eigenvalues into ``[0, 1]`` for symmetric W (e.g. to meet Exact-Diffusion's ``lambda_min > -1/3``)."""
    eye = sp.eye_array(topology.n, format="csr")
    mats = [(topology.sparse(k) + eye) / 2.0 for k in range(topology.period)]
    return Topology(mats, name=f"lazy_{topology.name}")


def _float64(m: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    """A writable float64 copy (the caller's array is never aliased)."""
    return np.array(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float64)


def _as_phases(w: np.ndarray | torch.Tensor | Sequence) -> list[np.ndarray]:
    """One float64 matrix per phase from a matrix, an ``[period, n, n]`` stack or a list of matrices."""
    if isinstance(w, Sequence) and len(w) > 0 and isinstance(w[0], (np.ndarray, torch.Tensor)):
        stack = [_float64(m) for m in w]
    else:
        arr = _float64(w)
        stack = list(arr) if arr.ndim == 3 else [arr]
    for m in stack:
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape != stack[0].shape:
            raise ValueError(
                f"from_matrix needs square n x n matrices of one size (or a [period, n, n] stack); got shape {m.shape}."
            )
    return stack


def _check_sums(m: np.ndarray, axis: int, label: str) -> None:
    sums = m.sum(axis=axis)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOL)
    if bad.size:
        kind, fix = ("rows", "W / W.sum(axis=1, keepdims=True)") if axis == 1 else ("columns", "W / W.sum(axis=0)")
        raise ValueError(
            f"{kind} of {label} must sum to 1 ({kind[:-1]} {bad[0]} sums to {sums[bad[0]]:.6g}); "
            f"normalise them ({fix}) or choose another require= ('doubly', 'row', 'column' or None)."
        )


def from_matrix(
    w: np.ndarray | torch.Tensor | Sequence,
    require: str | None = "doubly",
    name: str = "custom",
) -> Topology:
    """A topology from a user's own mixing matrix, or a list of matrices for a time-varying graph
    (phase ``k`` is used at gossip steps ``k, k + period, ...``), in the pull convention
    ``x_i <- sum_j W[i, j] x_j``.

    Args:
        w: an ``n x n`` matrix, a ``[period, n, n]`` stack or a list of ``n x n`` matrices.
        require: ``"doubly"`` (rows and columns sum to 1: D-SGD and friends), ``"row"``,
            ``"column"`` (push-sum) or ``None`` (only non-negativity and connectivity are checked).
        name: the topology's name in logs and tables.

    Raises:
        ValueError: naming the violated property (non-square, negative or non-finite entries, a row
            or column sum != 1, a union graph that is not strongly connected) and how to fix it.
    """
    if require not in ("doubly", "row", "column", None):
        raise ValueError(f"require must be 'doubly', 'row', 'column' or None; got {require!r}.")
    mats = _as_phases(w)
    for k, m in enumerate(mats):
        label = "W" if len(mats) == 1 else f"W({k})"
        if not np.isfinite(m).all():
            raise ValueError(f"{label} has non-finite entries; every weight must be a finite number.")
        if (m < -_SUM_TOL).any():
            i, j = np.argwhere(m < -_SUM_TOL)[0]
            raise ValueError(f"{label}[{i}, {j}] = {m[i, j]:.6g} is negative; mixing weights must be >= 0.")
        if require in ("doubly", "row"):
            _check_sums(m, axis=1, label=label)
        if require in ("doubly", "column"):
            _check_sums(m, axis=0, label=label)
    union = np.any([m > 0 for m in mats], axis=0)
    _check_strongly_connected(union, "the graph of W" if len(mats) == 1 else "the union graph of the phases")
    return Topology(mats, name=name)


# ---- two-level clusters ------------------------------------------------------------------------------
def hierarchical(
    n: int,
    local_world_size: int | None = None,
    machines: str = "one_peer_exponential",
    machine_options: dict[str, object] | None = None,
) -> HierarchicalTopology:
    """Exact averaging inside each machine, gossip between machines: ``W(k) = W_M(k) (x) 11^T/L`` with
    ``W_M`` the registered topology ``machines`` (with ``machine_options``) built for ``M = n / L``
    machines (a single machine: ``W = 11^T/n``). ``L = local_world_size`` defaults to
    ``$LOCAL_WORLD_SIZE`` (the strategy passes its devices per node); machine ``m`` holds ranks
    ``mL .. mL + L - 1``. The strategy runs it with
    :class:`~lightning_decent.comm.HierarchicalCommunicator` (``1/L`` of the model per rank across
    machines); see :mod:`lightning_decent.topology.hierarchical`."""
    _check_n(n, "hierarchical")
    local = _ranks_per_machine(local_world_size, "hierarchical")
    if isinstance(local, bool) or not isinstance(local, (int, np.integer)) or local < 1 or n % local:
        raise ValueError(
            f"hierarchical needs n = machines x local_world_size; got n={n}, local_world_size={local!r}. "
            "Set local_world_size to the number of ranks per machine (a divisor of n)."
        )
    if isinstance(machines, str) and TOPOLOGIES.resolve(_split_lazy(machines)[0]) == "hierarchical":
        raise ValueError("hierarchical cannot nest itself; choose a flat machine topology such as base or ring.")
    count = n // local
    machine_graph = complete(1) if count == 1 else get_topology(machines, count, **(machine_options or {}))
    return HierarchicalTopology(machine_graph, local)


# ---- registry --------------------------------------------------------------------------------------
_LAZY_PREFIX = "lazy_"

#: The registered topologies by name; every builder takes the node count ``n`` first, then its options.
TOPOLOGIES: Registry[Topology] = Registry(
    "topology",
    {
        "complete": complete,
        "ring": ring,
        "directed_ring": directed_ring,
        "star": star,
        "grid": grid,
        "torus": torus,
        "erdos_renyi": erdos_renyi,
        "exponential": exponential,
        "one_peer_exponential": one_peer_exponential,
        "alternating_exponential_ring": alternating_exponential_ring,
        "directed_graph": directed_graph,
        "challenging_digraph": challenging_digraph,
        "base": base,
        "equistatic": equistatic,
        "equidyn": equidyn,
        "hierarchical": hierarchical,
    },
    leading=1,
    note=f"any of them may be prefixed with '{_LAZY_PREFIX}'",
)


def _split_lazy(name: str) -> tuple[str, bool]:
    """``(registry name, is_lazy)``: a ``lazy_`` prefix asks for :func:`lazy` of the graph."""
    key = name.strip().lower().replace("-", "_")
    if key.startswith(_LAZY_PREFIX):
        return key.removeprefix(_LAZY_PREFIX), True
    return name, False


def topology_options(name: str) -> tuple[str, ...]:
    """The keyword options a registry name accepts besides ``n`` (e.g. ``('p', 'seed')``)."""
    return TOPOLOGIES.options(_split_lazy(name)[0])


def check_topology_options(name: str, options: Mapping[str, object]) -> None:
    """Raise ``ValueError`` for an unknown topology name, or an option it does not take, naming the valid ones."""
    TOPOLOGIES.check_options(_split_lazy(name)[0], options)


def get_topology(name: str | Topology, n: int, **options: object) -> Topology:
    """Build a registered topology for ``n`` nodes, e.g. ``get_topology("erdos_renyi", 16, p=0.5)``.

    ``name`` may use '-' for '_' and a ``lazy_`` prefix (``lazy_ring`` = ``lazy(ring(n))``). An
    already built :class:`Topology` is returned as is after checking that it has ``n`` nodes.
    """
    if isinstance(name, Topology):
        if name.n != n:
            raise ValueError(
                f"The given topology {name.name!r} has n={name.n} nodes but the world has n={n}; "
                "build it for this world size (or pass its name and let it be built here)."
            )
        if options:
            raise ValueError("Options only apply to a topology given by name; build the Topology with them.")
        return name
    check_topology_options(name, options)
    key, is_lazy = _split_lazy(name)
    topology = TOPOLOGIES[TOPOLOGIES.resolve(key)](n, **options)
    return lazy(topology) if is_lazy else topology
