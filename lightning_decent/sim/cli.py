"""``python -m lightning_decent.sim``: compare algorithms on n simulated nodes against parallel SGD.

Examples::

    python -m lightning_decent.sim --problem logistic --n 32 --dim 100 --topology ring \\
        --algorithms dsgd,gradient_tracking,exact_diffusion --steps 2000 --lr 0.05 \\
        --heterogeneity 1.0 --noise 0 --seed 0 --json out.json --plot out.png
    python -m lightning_decent.sim --problem digits --alpha 0.1 --n 16 --algorithms dsgd,gut,qg_gut --lr 0.1
    python -m lightning_decent.sim --algorithms "dsgd,dsgd:momentum=0.9,dsgd:global_average_every=8"
    python -m lightning_decent.sim --problem digits --topology ring --optimizer adam --lr 0.003 \
        --algorithms "dsgd,dsgd:opt=accum_adam:accum_iter=4"
    python -m lightning_decent.sim --problem quadratic --n 8 --topology challenging_digraph --lr 0.05 \
        --algorithms "push_sum,push_diging,mg_push_diging"
    python -m lightning_decent.sim --problem logistic --n 8 --algorithms gradient_tracking,exact_diffusion \
        --membership "500:leave=3;1000:join_from=0"
    python -m lightning_decent.sim --problem logistic --n 16 --algorithms dsgd,choco,gradient_tracking \
        --overlap-cost --seeds 3
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from lightning_decent.sim.delay import delay_costs, format_delay_table
from lightning_decent.sim.problems import PROBLEMS, Problem, get_problem
from lightning_decent.sim.report import format_table, plot, write_json
from lightning_decent.sim.runner import OPTIMIZERS, AlgorithmSpec, compare


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_decent.sim",
        description="Simulate decentralized algorithms on n virtual nodes and compare them with parallel SGD.",
    )
    p.add_argument("--problem", default="logistic", choices=list(PROBLEMS))
    p.add_argument("--n", type=int, default=32, help="number of nodes")
    p.add_argument("--topology", default="ring", help="a topology name (python -m lightning_decent.topology)")
    p.add_argument(
        "--algorithms",
        default="dsgd,gradient_tracking,exact_diffusion",
        help="comma-separated specs name[:key=value...]; the keys opt, lr, momentum, weight_decay, accum_iter, "
        "beta1, beta2, eps set that spec's local optimizer",
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0, help="local SGD momentum (default for every spec)")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=list(OPTIMIZERS),
        help="local optimizer for every spec and the baseline (adam: DAdam; accum_adam: AccumAdam)",
    )
    p.add_argument("--accum-iter", type=int, default=4, help="AccumAdam's accumulation length s")
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to gradients (0: exact)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the gradient noise")
    p.add_argument("--eval-every", type=int, default=0, help="record metrics every k steps (0: about 200 points)")
    p.add_argument("--factor", type=float, default=2.0, help="transient: stay within this factor of P-SGD")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument(
        "--membership",
        help="membership changes, e.g. '500:leave=3;1000:join_from=0' (before step 500 row 3 leaves; before step "
        "1000 a joiner receives row 0's state and takes a free data shard); rows joined by '+'; "
        "':during_exchange=1' drops the previous step's exchange, as a rank killed in a step does",
    )
    linear = p.add_argument_group("least_squares / logistic")
    linear.add_argument("--dim", type=int, default=100)
    linear.add_argument("--samples", type=int, default=32, help="samples per node")
    linear.add_argument("--heterogeneity", type=float, default=1.0, help="spread of the nodes' own optima")
    linear.add_argument("--l2", type=float, default=1e-2, help="logistic L2 regularisation")
    digits = p.add_argument_group("digits")
    digits.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label skew (0.1 non-iid, 100 ~iid)")
    digits.add_argument("--hidden", type=int, default=32)
    digits.add_argument("--batch-size", type=int, default=32, help="per-node mini-batch (0: full local data)")
    p.add_argument(
        "--overlap-cost",
        action="store_true",
        help="run every spec blocking and with overlap=true on --seeds seeds and print what the delay costs",
    )
    p.add_argument("--seeds", type=int, default=3, help="--overlap-cost: seeds --seed, --seed + 1, ...")
    p.add_argument("--json", help="write every series and the settings to this JSON file")
    p.add_argument("--plot", help="write the curves to this PNG file")
    return p


def build_problem(args: argparse.Namespace, seed: int | None = None) -> Problem:
    """The problem the arguments describe (only the options that problem takes are passed), with its data
    drawn from ``seed`` (default: ``--seed``)."""
    options: dict[str, Any] = {"n": args.n}
    if args.problem != "quadratic":
        options["seed"] = args.seed if seed is None else seed
    if args.problem in ("least_squares", "logistic"):
        options.update(dim=args.dim, samples=args.samples, heterogeneity=args.heterogeneity)
        if args.problem == "logistic":
            options["l2"] = args.l2
    elif args.problem == "digits":
        options.update(alpha=args.alpha, hidden=args.hidden, batch_size=args.batch_size)
    return get_problem(args.problem, **options)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    specs = [AlgorithmSpec.parse(s) for s in args.algorithms.split(",") if s.strip()]
    dtype = getattr(torch, args.dtype)
    if args.overlap_cost:
        return _overlap_cost(args, specs, dtype)
    problem = build_problem(args).to(dtype)
    eval_every = args.eval_every or max(1, args.steps // 200)
    results = compare(
        problem,
        specs,
        args.topology,
        steps=args.steps,
        lr=args.lr,
        momentum=args.momentum,
        optimizer=args.optimizer,
        accum_iter=args.accum_iter,
        noise=args.noise,
        eval_every=eval_every,
        seed=args.seed,
        dtype=dtype,
        factor=args.factor,
        membership=args.membership,
    )
    title = f"{problem.name}, n={problem.n}, {args.topology}, {args.optimizer}, lr={args.lr:g}, noise={args.noise:g}"
    print(title)
    print(format_table(results))
    if args.json:
        write_json(results, vars(args), args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, title, factor=args.factor)
        print(f"wrote {args.plot}")
    return 0


def _overlap_cost(args: argparse.Namespace, specs: list[AlgorithmSpec], dtype: torch.dtype) -> int:
    seeds = list(range(args.seed, args.seed + args.seeds))
    costs = delay_costs(
        lambda seed: build_problem(args, seed).to(dtype),
        specs,
        args.topology,
        seeds,
        steps=args.steps,
        lr=args.lr,
        momentum=args.momentum,
        optimizer=args.optimizer,
        accum_iter=args.accum_iter,
        noise=args.noise,
        dtype=dtype,
    )
    print(
        f"{args.problem}, n={args.n}, {args.topology}, {args.optimizer}, lr={args.lr:g}, noise={args.noise:g}, "
        f"{args.steps} steps, seeds {seeds}: final metrics (mean over seeds), blocking vs overlapped"
    )
    print(format_delay_table(costs))
    return 0
