"""n virtual nodes in one process: the library's algorithms and topologies on stacked ``[n, dim]`` tensors."""

from lightning_decent.sim.delay import DelayCost, delay_costs, format_delay_table
from lightning_decent.sim.membership import MembershipChange, parse_membership
from lightning_decent.sim.problems import PROBLEMS, Digits, LeastSquares, Logistic, Problem, Quadratic, get_problem
from lightning_decent.sim.runner import (
    BASELINE,
    OPTIMIZERS,
    AlgorithmSpec,
    SimResult,
    compare,
    make_optimizer,
    simulate,
    stacked_average,
    transient_step,
)

__all__ = [
    "BASELINE",
    "OPTIMIZERS",
    "PROBLEMS",
    "AlgorithmSpec",
    "DelayCost",
    "Digits",
    "LeastSquares",
    "Logistic",
    "MembershipChange",
    "Problem",
    "Quadratic",
    "SimResult",
    "compare",
    "delay_costs",
    "format_delay_table",
    "get_problem",
    "make_optimizer",
    "parse_membership",
    "simulate",
    "stacked_average",
    "transient_step",
]
