"""The topology inspector: ``python -m lightning_decent.topology NAME [NAME ...] --n N``.

Prints one row per topology (degree, period, consensus rates, spectral gaps, D-SGD transient
iterations and, for digraphs, the push-sum metrics), and optionally writes the rows as JSON and a
picture of the graphs with their consensus-error curves.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from collections.abc import Sequence

import numpy as np

from lightning_decent._extras import require
from lightning_decent.topology.base import Topology
from lightning_decent.topology.graphs import TOPOLOGIES, get_topology, topology_options
from lightning_decent.topology.metrics import (
    consensus_rate_over_period,
    consensus_rate_per_round,
    equilibrium,
    equilibrium_skewness,
    generalized_consensus_rate,
    period_product,
    transient_iterations,
)


# ---- arguments ------------------------------------------------------------------------------------
def _parse_option(text: str) -> tuple[str, object]:
    """``key=value`` -> ``(key, value)``; the value is a Python literal if it parses as one
    (``p=0.5``, ``edges=[(0,1),(1,0)]``), else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects key=value, e.g. p=0.5; got {text!r}.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().replace("-", "_"), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_decent.topology",
        description="Inspect gossip topologies: consensus rates, spectral gaps, transient iterations.",
        epilog=f"Topologies: {', '.join(TOPOLOGIES)} (any may be prefixed with lazy_).",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="topology names, e.g. ring exponential")
    parser.add_argument("--n", type=int, required=True, help="number of nodes")
    parser.add_argument(
        "--option",
        type=_parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder option, passed to every topology that accepts it (e.g. p=0.5, local_world_size=2)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw the graphs and their consensus error")
    parser.add_argument("--json", metavar="FILE", help="write the table rows as a JSON list")
    parser.add_argument("--rounds", type=int, default=50, help="gossip rounds in the plot (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plot's random x^0 (default 0)")
    return parser


def _build(names: Sequence[str], n: int, options: dict[str, object]) -> list[Topology]:
    """Build each named topology, giving it the options it accepts; an option no topology accepts
    is an error."""
    accepted = {name: set(topology_options(name)) for name in names}
    unused = sorted(set(options) - set().union(*accepted.values()))
    if unused:
        raise ValueError(
            f"No topology among {list(names)} takes option(s) {unused}; see the topology table in the README."
        )
    return [get_topology(name, n, **{k: v for k, v in options.items() if k in accepted[name]}) for name in names]


# ---- rows -----------------------------------------------------------------------------------------
def inspect_topology(topology: Topology) -> dict[str, object]:
    """The table row of one topology. Gaps and transient iterations are given for doubly stochastic
    graphs (where ``rho`` is the consensus rate); ``beta_pi``, ``kappa_pi`` and ``pi`` (of the
    period's product) for column-stochastic ones, which gossip with push-sum."""
    rho_round = consensus_rate_per_round(topology)
    rho_period = consensus_rate_over_period(topology)
    row: dict[str, object] = {
        "name": topology.name,
        "n": topology.n,
        "max_degree": topology.max_degree,
        "period": topology.period,
        "directed": topology.directed,
        "doubly_stochastic": topology.doubly_stochastic,
        "rho_per_round": rho_round,
        "rho_over_period": rho_period,
        "gap_over_period": None,
        "gap_per_round": None,
        "transient_iid": None,
        "transient_non_iid": None,
        "beta_pi": None,
        "kappa_pi": None,
        "pi": None,
    }
    if topology.doubly_stochastic:
        row["gap_over_period"] = 1.0 - rho_period
        row["gap_per_round"] = 1.0 - rho_round
        rho_step = effective_rate_per_step(rho_round, rho_period, topology.period)
        row["transient_iid"] = transient_iterations(rho_step, topology.n, "iid")
        row["transient_non_iid"] = transient_iterations(rho_step, topology.n, "non_iid")
    elif topology.column_stochastic:
        product = period_product(topology)
        row["beta_pi"] = generalized_consensus_rate(product)
        row["kappa_pi"] = equilibrium_skewness(product)
        row["pi"] = equilibrium(product).tolist()
    return row


def effective_rate_per_step(rho_round: float, rho_period: float, period: int) -> float:
    """The per-step ``rho`` the transient counts use: ``rho/round`` for a static graph; for a time-varying
    one the smaller of ``rho/round`` and ``1 - (1 - rho/period) / period`` (the period's gap spread over
    its steps). One-peer exponential with ``n = 2^tau`` averages exactly over a period, so its gap is
    ``1/tau`` and the iid count ``~ n^3 log2(n)^2``, the Õ(n³) of Ying et al. (NeurIPS 2021); its single
    phases alone do not mix the whole graph (``rho/round = 1``)."""
    if period == 1:
        return rho_round
    return min(rho_round, 1.0 - (1.0 - rho_period) / period)


def _fmt(value: object, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{round(value, 12) + 0.0:.4f}"  # no "-0.0000" from rounding noise
    if kind == "count":
        return "inf" if math.isinf(value) else "0" if value == 0 else f"{value:.3e}"
    if kind == "ratio":
        return f"{value:.4g}"
    return str(value)


_COLUMNS = [
    ("topology", "name", "text"),
    ("n", "n", "text"),
    ("max deg", "max_degree", "text"),
    ("period", "period", "text"),
    ("rho/round", "rho_per_round", "rate"),
    ("rho/period", "rho_over_period", "rate"),
    ("gap/period", "gap_over_period", "rate"),
    ("gap/round", "gap_per_round", "rate"),
    ("T iid*", "transient_iid", "count"),
    ("T non-iid*", "transient_non_iid", "count"),
]
_DIGRAPH_COLUMNS = [("beta_pi", "beta_pi", "rate"), ("kappa_pi", "kappa_pi", "ratio")]


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """The rows as an aligned text table followed by footnotes."""
    has_digraph = any(row["pi"] is not None for row in rows)
    columns = _COLUMNS + (_DIGRAPH_COLUMNS if has_digraph else [])
    cells = [[header for header, _, _ in columns]]
    cells += [[_fmt(row[key], kind) for _, key, kind in columns] for row in rows]
    widths = [max(len(line[c]) for line in cells) for c in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        "rho = ||W - 11^T/n||_2: rho/round is the worst single phase, rho/period that of the product of one",
        "period (equal for static graphs); gap = 1 - rho.",
        "* D-SGD transient iterations, constants dropped: iid rho^4 n^3/(1-rho)^2, non-iid rho^4 n^3/(1-rho)^4,",
        "  with rho = rho/round (static graphs) or, for time-varying ones, min(rho/round, 1 - gap/period / period);",
        "  inf when even a whole period does not mix the graph.",
    ]
    if has_digraph:
        lines += [
            "Digraphs (not doubly stochastic) gossip with push-sum; their rho is not a consensus rate. beta_pi,",
            "kappa_pi and the equilibrium pi (W pi = pi, sum 1) are those of the period's product:",
        ]
        lines += [
            f"  pi({row['name']}) = {np.array2string(np.array(row['pi']), precision=4)}" for row in rows if row["pi"]
        ]
    return "\n".join(lines)


def _json_value(value: object) -> object:
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def write_json(rows: Sequence[dict[str, object]], path: str) -> None:
    """Write the rows as a JSON list (an infinite transient count is written as the string "inf")."""
    with open(path, "w") as f:
        json.dump([{k: _json_value(v) for k, v in row.items()} for row in rows], f, indent=2, allow_nan=False)


# ---- entry point ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the inspector; returns the process exit status (2 on a bad topology or option)."""
    args = _parser().parse_args(argv)
    try:
        topologies = _build(args.names, args.n, dict(args.option))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [inspect_topology(t) for t in topologies]
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        for module in ("matplotlib", "networkx"):
            require(module, "app", "--plot")
        from lightning_decent.topology.drawing import plot

        plot(topologies, args.plot, rounds=args.rounds, seed=args.seed)
    return 0
