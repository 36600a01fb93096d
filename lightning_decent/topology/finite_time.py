"""Base-(k+1) graphs (registry name ``base``): exact averaging in a finite number of rounds for any n, at most k
peers per round.

Takezawa, Sato, Bao, Niwa & Yamada, "Beyond Exponential Graph: Communication-Efficient Topologies
for Decentralized Learning via Finite-time Convergence", NeurIPS 2023 (arXiv:2305.11420). Three
constructions, each a periodic sequence of doubly stochastic, symmetric mixing matrices whose
product over one period is exactly ``11^T/n``; the period is the number of rounds to exact
consensus. The derivations and worked examples are in ``docs/topologies.md``.

* :func:`hyper_hypercube` (the paper's k-peer hyper-hypercube graph): for ``n`` whose prime factors
  are all ``<= k+1``. Write ``n = f_0 f_1 ... f_{L-1}`` with every ``2 <= f_l <= k+1`` (greedy: the
  largest factor first, listed in increasing order) and give node ``i`` its mixed-radix digits
  ``i = sum_l d_l s_l``, ``s_l = f_0 ... f_{l-1}``. Round ``l`` averages exactly over the cliques of
  nodes that differ only in digit ``l`` (``f_l`` nodes, weight ``1/f_l``): ``L`` rounds, ``f_l - 1 <= k``
  peers each.
* :func:`simple_base` (the simple Base-(k+1) graph): for any ``n``. Write ``n`` in base ``b = k+1``,
  ``n = sum_l a_l b^(p_l)`` (non-zero digits ``1 <= a_l <= k``, ``p_0 > p_1 > ...``), and split the nodes
  into consecutive blocks ``V_l`` of ``a_l b^(p_l)`` nodes, each cut into ``a_l`` sub-blocks ``V_{l,s}``
  of ``b^(p_l)``. (1) Every block averages itself with its hyper-hypercube (``T_1`` rounds, those of
  ``V_0``; shorter ones repeat). (2) For ``t = 0 .. L-2``, every node ``i`` of a later block takes one
  free node ``j`` from each sub-block of ``V_t`` and mixes with weight ``r_t / a_t`` on each edge,
  ``r_t = |V_t| / |V_t u V_{t+1} u ...|``: ``x_i <- (1 - r_t) x_i + (r_t / a_t) sum_j x_j`` and
  ``x_j <- (1 - r_t / a_t) x_j + (r_t / a_t) x_i``, which gives ``V_{>t}`` the average of ``V_{>=t}``; the
  free nodes of ``V_t`` left over average in consecutive cliques of ``<= b`` (they hold equal values
  then, so these edges only matter once training interleaves gradient steps). Blocks already bridged
  meanwhile run their sub-blocks' hyper-hypercubes, which is also what (3) does after the last bridge
  until ``V_0``'s sub-blocks have had their ``p_0`` rounds.
* :func:`base` (the Base-(k+1) graph): ``n = n_power x n_rest`` with ``n_power`` the largest divisor of
  ``n`` whose prime factors are ``<= k+1``. The ``n_power`` consecutive blocks of ``n_rest`` nodes each
  run the simple Base-(k+1) graph of ``n_rest``; then the ``n_rest`` strided sets ``{j, j + n_rest, ...}``
  run the hyper-hypercube of ``n_power``. The simple graph of ``n`` is used instead when it has fewer
  rounds. ``k = 1`` and ``n = 2^r`` is the hypercube: ``r`` rounds of pairwise averaging.

Rounds to exact consensus (the period): ``L`` for the hyper-hypercube, ``T_1 + 1 + p_0`` for the simple
graph, at most ``2 log_{k+1}(n) + 2`` for all of them (checked for n = 1..512, k = 1..6 in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from lightning_decent.topology.base import Topology

Groups = np.ndarray  # one round: [groups, size] disjoint groups of node positions that average exactly


@dataclass
class _Round:
    """One mixing matrix under construction: self weights, off-diagonal entries (symmetric pairs)."""

    n: int
    diagonal: np.ndarray = field(init=False)
    rows: list[np.ndarray] = field(default_factory=list)
    cols: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.diagonal = np.ones(self.n)

    def average(self, groups: np.ndarray) -> None:
        """Every row of ``groups`` (``[g, size]`` node ids) takes its exact average (weight ``1/size``)."""
        groups = np.atleast_2d(groups)
        size = groups.shape[1]
        if size < 2:
            return
        self.diagonal[groups.ravel()] = 1.0 / size
        rows = np.repeat(groups, size, axis=1).ravel()
        cols = np.tile(groups, (1, size)).ravel()
        off = rows != cols
        self._add(rows[off], cols[off], np.full(int(off.sum()), 1.0 / size))

    def bridge(self, node: int, partners: list[int], share: float) -> None:
        """``x_node <- (1 - share) x_node + (share / a) sum_j x_j`` over its ``a`` partners, and each partner
        ``x_j <- (1 - share / a) x_j + (share / a) x_node``."""
        weight = share / len(partners)
        self.diagonal[node] = 1.0 - share
        self.diagonal[partners] = 1.0 - weight
        ends = np.asarray(partners)
        start = np.full(len(partners), node)
        self._add(np.concatenate([start, ends]), np.concatenate([ends, start]), np.full(2 * len(partners), weight))

    def _add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        self.rows.append(np.asarray(rows, dtype=np.int64))
        self.cols.append(np.asarray(cols, dtype=np.int64))
        self.values.append(np.asarray(values, dtype=np.float64))

    def matrix(self) -> sp.csr_array:
        nodes = np.arange(self.n)
        rows = np.concatenate([nodes, *self.rows])
        cols = np.concatenate([nodes, *self.cols])
        values = np.concatenate([self.diagonal, *self.values])
        return sp.csr_array((values, (rows, cols)), shape=(self.n, self.n))


# ---- number theory --------------------------------------------------------------------------------
def _check(n: int, k: int, name: str) -> None:
    for label, value, minimum in (("n", n, 1), ("k", k, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} needs an integer {label} >= {minimum}; got {label}={value!r}.")


def hyper_hypercube_factors(n: int, k: int) -> list[int]:
    """``n = f_0 f_1 ... f_{L-1}`` with ``2 <= f_l <= k+1``: divide by the largest factor first, then list
    the factors in increasing order (the rounds' clique sizes). Empty for ``n = 1``.

    Raises:
        ValueError: if ``n`` has a prime factor larger than ``k+1``.
    """
    factors: list[int] = []
    rest = n
    for factor in range(k + 1, 1, -1):
        while rest % factor == 0:
            factors.append(factor)
            rest //= factor
    if rest != 1:
        raise ValueError(
            f"hyper_hypercube needs every prime factor of n to be <= k+1; n={n} = {n // rest} x {rest} and "
            f"{rest} has a larger one for k={k}. Use base (any n) or a larger k."
        )
    return factors[::-1]


def smooth_part(n: int, k: int) -> int:
    """The largest divisor of ``n`` whose prime factors are all ``<= k+1``."""
    part = 1
    for prime in range(2, k + 2):
        while n % (part * prime) == 0:
            part *= prime
    return part


def base_digits(n: int, base: int) -> list[tuple[int, int]]:
    """``(a_l, p_l)`` with ``n = sum_l a_l base^p_l``, the non-zero digits from the highest power down."""
    digits, power = [], 0
    while n:
        n, digit = divmod(n, base)
        if digit:
            digits.append((digit, power))
        power += 1
    return digits[::-1]


# ---- rounds as groups of positions ------------------------------------------------------------------
def _hyper_rounds(size: int, k: int) -> list[Groups]:
    """The cliques of each round of the hyper-hypercube on positions ``0 .. size-1``, ``[groups, f_l]``
    per round (one round without cliques for ``size = 1``)."""
    factors = hyper_hypercube_factors(size, k)
    if not factors:
        return [np.zeros((1, 1), dtype=np.int64)]
    digits = np.arange(size).reshape(factors[::-1])  # C order: digit 0 varies fastest
    return [
        np.moveaxis(digits, len(factors) - 1 - level, -1).reshape(-1, factor) for level, factor in enumerate(factors)
    ]


def _apply(rnd: _Round, groups: Groups, nodes: np.ndarray) -> None:
    rnd.average(nodes[groups])


def _hyper_matrices(n: int, k: int) -> list[sp.csr_array]:
    matrices = []
    for groups in _hyper_rounds(n, k):
        rnd = _Round(n)
        _apply(rnd, groups, np.arange(n))
        matrices.append(rnd.matrix())
    return matrices


def _simple_base_matrices(n: int, k: int) -> list[sp.csr_array]:
    if smooth_part(n, k) == n:  # every prime factor <= k+1 (and n = 1): the hyper-hypercube itself
        return _hyper_matrices(n, k)
    base = k + 1
    digits = base_digits(n, base)
    starts = np.cumsum([0] + [a * base**p for a, p in digits])
    blocks = [np.arange(starts[i], starts[i + 1]) for i in range(len(digits))]
    sub_blocks = [list(block.reshape(a, base**p)) for block, (a, p) in zip(blocks, digits)]
    block_rounds = [_hyper_rounds(len(block), k) for block in blocks]
    sub_rounds = [_hyper_rounds(base**p, k) for _, p in digits]
    counters = [0] * len(digits)

    def settle(rnd: _Round, level: int) -> None:
        """A block already bridged runs the next round of its sub-blocks' hyper-hypercubes."""
        if digits[level][1] == 0:  # a block of a < b single nodes: its own clique
            _apply(rnd, block_rounds[level][counters[level] % len(block_rounds[level])], blocks[level])
        else:
            groups = sub_rounds[level][counters[level] % len(sub_rounds[level])]
            for sub_block in sub_blocks[level]:
                _apply(rnd, groups, sub_block)
        counters[level] += 1

    rounds = []
    for m in range(len(block_rounds[0])):  # (1) every block averages itself
        rnd = _Round(n)
        for block, block_round in zip(blocks, block_rounds):
            _apply(rnd, block_round[m % len(block_round)], block)
        rounds.append(rnd)
    for target in range(len(digits) - 1):  # (2) bridge V_target to the blocks after it
        rnd = _Round(n)
        for level in range(target):
            settle(rnd, level)
        free = [list(sub_block) for sub_block in sub_blocks[target]]
        share = len(blocks[target]) / (n - starts[target])
        for level in reversed(range(target + 1, len(digits))):
            for node in blocks[level]:
                rnd.bridge(int(node), [int(sub_block.pop()) for sub_block in free], share)
        leftover = np.array([node for sub_block in free for node in sub_block], dtype=np.int64)
        for start in range(0, len(leftover) - 1, base):
            rnd.average(leftover[start : start + base])
        rounds.append(rnd)
    while counters[0] < len(sub_rounds[0]):  # (3) settle until V_0's sub-blocks are averaged
        rnd = _Round(n)
        for level in range(len(digits)):
            settle(rnd, level)
        rounds.append(rnd)
    return [rnd.matrix() for rnd in rounds]


def _base_matrices(n: int, k: int) -> list[sp.csr_array]:
    power = smooth_part(n, k)
    rest = n // power
    simple = _simple_base_matrices(n, k)
    inner = _simple_base_matrices(rest, k)
    outer = _hyper_matrices(power, k)
    if len(simple) < len(inner) + len(outer):
        return simple
    # Node i * rest + j: block i of `rest` consecutive nodes runs the simple graph of `rest` (I (x) W),
    # then the strided set {j, j + rest, ...} runs the hyper-hypercube of `power` (W (x) I).
    blocks = [sp.kron(sp.eye_array(power), w, format="csr") for w in inner]
    strided = [sp.kron(w, sp.eye_array(rest), format="csr") for w in outer]
    return blocks + strided


# ---- builders ----------------------------------------------------------------------------------------
def hyper_hypercube(n: int, k: int = 1) -> Topology:
    """The k-peer hyper-hypercube graph (Takezawa et al. 2023): ``L`` rounds of exact clique averages,
    ``n = f_0 ... f_{L-1}`` with every ``f_l <= k+1`` (see the module docstring)."""
    _check(n, k, "hyper_hypercube")
    hyper_hypercube_factors(n, k)  # fail early, naming the prime factor that is too large
    return Topology(_hyper_matrices(n, k), name="hyper_hypercube")


def simple_base(n: int, k: int = 1) -> Topology:
    """The simple Base-(k+1) graph (Takezawa et al. 2023): any n, at most k peers per round, exact
    average after one period (see the module docstring)."""
    _check(n, k, "simple_base")
    return Topology(_simple_base_matrices(n, k), name="simple_base")


def base(n: int, k: int = 1) -> Topology:
    """The Base-(k+1) graph (Takezawa et al. 2023): any n, at most ``k`` peers per round, symmetric
    doubly stochastic rounds whose product over one period is exactly ``11^T/n``; the period is
    at most ``2 log_{k+1}(n) + 2`` (see the module docstring). ``k=1``: one peer per round."""
    _check(n, k, "base")
    return Topology(_base_matrices(n, k), name="base")
