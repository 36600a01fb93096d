"""Membership changes: every algorithm's rule restores its invariants exactly, and the simulator runs them.

The simulator's change runs the same ``cancel_pending``/``change_membership`` as an elastic real run. The
invariants are checked right before and right after ``change_membership`` (float64, so "exactly" is
1e-12), and whole runs with a leave and a join end where an uninterrupted run of the final members ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_decent.algorithms import ALGORITHMS, Algorithm, Bucket, get_algorithm
from lightning_decent.algorithms.error_feedback import RESIDUAL, SHARD_RESIDUAL
from lightning_decent.algorithms.local_steps import ANCHOR, IN_FLIGHT, OUTER_OPTIMIZER
from lightning_decent.comm import Communicator
from lightning_decent.sim import get_problem, simulate, stacked_average
from lightning_decent.sim.cli import main as sim_main
from lightning_decent.sim.membership import MembershipChange, parse_membership
from lightning_decent.topology import get_topology

ROOT = Path(__file__).resolve().parents[1]
LEAVE_AND_JOIN = [(6, {"leave": [3]}), (12, {"join_from": [0]})]  # n: 8 -> 7 -> 8


@pytest.fixture(scope="module")
def problem():
    return get_problem("logistic", n=8, dim=6, samples=8, heterogeneity=1.0, seed=0)


@pytest.fixture(scope="module")
def convex():
    """Better conditioned (l2 = 0.1): whole runs reach their fixed point to 1e-10 in 600 steps."""
    return get_problem("logistic", n=8, dim=6, samples=8, heterogeneity=1.0, seed=0, l2=0.1)


Extract = Callable[[Bucket, Communicator], dict[str, Any]]


def around_change(algo: Algorithm, extract: Extract) -> list[dict[str, Any]]:
    """Record ``extract`` of the (new) bucket right before and right after every ``change_membership``."""
    records: list[dict[str, Any]] = []
    original = algo.change_membership

    def recorded(buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        before = extract(buckets[0], comm)
        original(buckets, comm, step, joined)
        records.append({"before": before, "after": extract(buckets[0], comm), "joined": joined.clone()})

    algo.change_membership = recorded  # type: ignore[method-assign]
    return records


def run(problem, algo: Algorithm | str, topology: str = "ring", steps: int = 16, **options: Any):
    settings = dict(steps=steps, lr=0.1, eval_every=steps, membership=LEAVE_AND_JOIN)
    return simulate(problem, algo, topology, **settings, **options)


def spread(t: torch.Tensor) -> float:
    """Largest difference between the rows of a stacked tensor."""
    return (t - t[:1]).abs().max().item()


# ---- the machinery: a change that keeps the members changes nothing ---------------------------------------
@pytest.mark.parametrize(
    ("name", "topology", "options"),
    [
        ("dsgd", "ring", {}),
        ("dsgd", "ring", {"overlap": True}),  # the round in flight is dropped and sent again: none is lost
        ("dsgd", "ring", {"momentum": 0.9}),  # the local optimizer's state is carried row by row
        ("dsgd", "ring", {"optimizer": "adam", "momentum": 0.0}),
        ("dsgd", "ring", {"optimizer": "accum_adam", "momentum": 0.0}),
        ("dsgd", "one_peer_exponential", {"global_average_every": 4}),
        ("qg_dsgdm", "ring", {}),
        ("gradient_tracking", "ring", {"momentum": 0.5}),
        ("gradient_tracking", "ring", {"momentum": 0.5, "overlap": True}),  # the round in flight is sent again
        ("exact_diffusion", "ring", {}),
        ("exact_diffusion", "ring", {"overlap": True}),
        ("push_sum", "ring", {}),
        ("push_diging", "ring", {}),
        ("diloco", "ring", {"H": 4}),
        ("gasloc", "ring", {"H": 4, "gossip_momentum": 0.5}),
    ],
)
def test_a_change_that_keeps_every_member_leaves_the_run_as_it_was(problem, name, topology, options) -> None:
    settings = dict(steps=20, lr=0.1, eval_every=20, **options)
    plain = simulate(problem, name, topology, **settings)
    changed = simulate(problem, name, topology, membership=[(7, {})], **settings)
    assert changed.changes == [{"step": 7, "n": 8, "shards": list(range(8))}]
    assert (changed.params - plain.params).abs().max().item() < 1e-12
    assert (plain.params - problem.initial_params()).abs().max().item() > 1e-2  # it trained


def test_survivors_keep_their_rows_and_a_joiner_copies_its_source(problem) -> None:
    algo = get_algorithm("qg_dsgdm")
    before: list[torch.Tensor] = []
    original = algo.cancel_pending

    def cancel(buckets: list[Bucket]) -> None:
        before.append(buckets[0].params.clone())
        original(buckets)

    algo.cancel_pending = cancel  # type: ignore[method-assign]
    records = around_change(algo, lambda b, c: {"params": b.params.clone(), "momentum": b.state["momentum"].clone()})
    simulate(problem, algo, "ring", steps=8, lr=0.1, membership=[(5, {"leave": [1, 6], "join_from": [4]})])
    rows = [0, 2, 3, 4, 5, 7, 4]
    assert torch.equal(records[0]["after"]["params"], before[0][rows])
    assert torch.equal(records[0]["after"]["momentum"], records[0]["before"]["momentum"])  # the rule keeps u
    assert torch.equal(records[0]["joined"].flatten(), torch.tensor([False] * 6 + [True]))


# ---- trackers and corrections: their network sums hold exactly again ---------------------------------
@pytest.mark.parametrize("overlap", [False, True])  # overlapped: the tracker holds y^{k-1} between steps
def test_gradient_tracking_restores_sum_of_trackers_equal_to_sum_of_previous_gradients(problem, overlap) -> None:
    algo = get_algorithm("gradient_tracking", overlap=overlap)
    records = around_change(
        algo, lambda b, c: {"gap": (b.state["tracker"].sum(0) - b.state["previous_grad"].sum(0)).abs().max().item()}
    )
    run(problem, algo)
    for record in records:  # the leave, then the join (the joiner's copy counts its source twice)
        assert record["before"]["gap"] > 1e-3
        assert record["after"]["gap"] < 1e-12


@pytest.mark.parametrize("overlap", [False, True])
def test_exact_diffusion_restores_corrections_summing_to_zero(problem, overlap) -> None:
    algo = get_algorithm("exact_diffusion", overlap=overlap)
    records = around_change(algo, lambda b, c: {"sum": b.state["correction"].sum(0).abs().max().item()})
    run(problem, algo)
    for record in records:
        assert record["before"]["sum"] > 1e-4
        assert record["after"]["sum"] < 1e-12


@pytest.mark.parametrize(
    ("name", "topology", "mu"),
    [("gut", "ring", 0.9), ("gut", "one_peer_exponential", 0.3), ("qg_gut", "ring", 0.06)],  # static, time-varying
)
def test_gut_restarts_its_tracking_with_zero_sums_and_keeps_its_momentum(problem, name, topology, mu) -> None:
    algo = get_algorithm(name, mu=mu)

    def extract(b: Bucket, comm: Communicator) -> dict[str, Any]:
        state = b.state
        return {
            "gossip_sum": (state["previous_mixed"] - state["previous_params"]).sum(0).abs().max().item(),
            "update_sum": state["previous_update"].sum(0).abs().max().item(),
            "previous_is_current": torch.equal(state["previous_params"], b.params),
            "momentum": state.get("momentum", torch.zeros(0)).clone(),
        }

    records = around_change(algo, extract)
    run(problem, algo, topology)
    for record in records:
        after = record["after"]
        assert record["before"]["update_sum"] > 1e-4
        assert after["gossip_sum"] < 1e-12 and after["update_sum"] < 1e-12 and after["previous_is_current"]
        assert torch.equal(after["momentum"], record["before"]["momentum"])


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential"])
def test_gut_first_step_after_a_change_is_a_dsgd_step_at_the_gossiped_model(problem, topology) -> None:
    """``Y^t = D^t``: ``x^{t+1} = W'x^t - lr g(W'x^t)``, GUT's own first step, on either mixing form."""
    algo = get_algorithm("gut", mu=0.3)
    seen: dict[str, Any] = {}
    change, after_step = algo.change_membership, algo.after_step

    def changed(buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        change(buckets, comm, step, joined)
        seen.update(x=buckets[0].params.clone(), comm=comm, step=step)

    def stepped(buckets: list[Bucket], comm: Communicator, step: int) -> None:
        after_step(buckets, comm, step)
        if step == seen.get("step"):
            seen["next"] = buckets[0].params.clone()

    algo.change_membership, algo.after_step = changed, stepped  # type: ignore[method-assign]
    simulate(problem, algo, topology, steps=8, lr=0.1, membership=[(5, {"leave": [3]})])
    gossiped = seen["x"].clone()
    seen["comm"].mix([gossiped], seen["step"])
    gossiped.requires_grad_(True)
    losses = problem.local_losses(gossiped, nodes=torch.tensor([0, 1, 2, 4, 5, 6, 7]))
    (gradient,) = torch.autograd.grad(losses.sum(), gossiped)
    assert (seen["next"] - (gossiped - 0.1 * gradient)).abs().max().item() < 1e-14


# ---- push-sum: the mass restarts from the de-biased models -------------------------------------------
@pytest.mark.parametrize("name", ["push_sum", "push_diging"])
def test_push_sum_restarts_with_total_weight_n_and_unchanged_models(problem, name) -> None:
    algo = get_algorithm(name)

    def extract(b: Bucket, comm: Communicator) -> dict[str, Any]:
        values = {"weight_gap": abs(b.state["push_weight"].sum().item() - b.params.shape[0]), "z": b.params.clone()}
        if "tracker" in b.state:
            gap = b.state["tracker"].sum(0) - b.state["previous_grad"].sum(0)
            values["tracker_gap"] = gap.abs().max().item()
        return values

    records = around_change(algo, extract)
    result = run(problem, algo, "challenging_digraph")
    for record in records:
        before, after = record["before"], record["after"]
        assert before["weight_gap"] > 1e-3 and after["weight_gap"] < 1e-12  # sum v = n' (7, then 8)
        assert torch.equal(after["z"], before["z"])  # every member's model is continuous
        if "tracker_gap" in after:
            assert before["tracker_gap"] > 1e-4 and after["tracker_gap"] < 1e-12
    assert result.push_weights is not None and result.push_weights.shape == (8, 1)


# ---- CHOCO: public copies and neighbour sums on the new graph -----------------------------------------
@pytest.mark.parametrize("overlap", [False, True])
def test_choco_neighbour_sums_equal_the_new_graphs_weighted_public_copies(problem, overlap) -> None:
    algo = get_algorithm("choco", compression="int8", compression_options={"block": 4}, overlap=overlap)

    def extract(b: Bucket, comm: Communicator) -> dict[str, Any]:
        w = torch.tensor(comm.topology.matrix(0), dtype=b.params.dtype)
        public, sums = b.state["public"], b.state["neighbour_sum"]
        return {
            "sums": (sums - w @ public).abs().max().item(),
            "copies": (public - b.params).abs().max().item(),
            "in_flight": int(b.state["in_flight"]) if overlap else -1,
        }

    records = around_change(algo, extract)
    run(problem, algo)
    for record in records:
        assert record["before"]["sums"] > 1e-3
        assert record["after"]["sums"] < 1e-12 and record["after"]["copies"] == 0.0
        # overlapped: the round sent after the last step was dropped; no one adds its q's to the rebuilt sums
        assert record["before"]["in_flight"] == record["after"]["in_flight"] == -1


def test_overlapped_choco_applies_no_dropped_round_after_a_change(problem) -> None:
    # Right after the change the sums are W' x_hat exactly; the first step after it receives nothing, so its
    # consensus step uses exactly the rebuilt sums: s_i - x_hat_i = (W' x - x)_i.
    algo = get_algorithm("choco", compression="int8", compression_options={"block": 4}, overlap=True)
    gaps: list[float] = []
    original = algo._receive

    def receive(buckets: list[Bucket]) -> None:
        before = buckets[0].state["neighbour_sum"].clone()
        original(buckets)
        gaps.append((buckets[0].state["neighbour_sum"] - before).abs().max().item())

    algo._receive = receive  # type: ignore[method-assign]
    run(problem, algo)
    assert gaps[6] == 0.0 and gaps[12] == 0.0  # the first steps after the leave and the join
    assert min(gaps[1:6] + gaps[7:12] + gaps[13:]) > 0.0  # every other step adds its round


# ---- local steps: anchors, outer state, fragments in flight, residuals ------------------------------
def test_diloco_anchors_and_outer_momentum_are_identical_on_every_member_and_a_joiner_starts_at_the_anchor(
    problem,
) -> None:
    algo = get_algorithm("diloco", H=4)

    def extract(b: Bucket, comm: Communicator) -> dict[str, Any]:
        momentum = algo.bucket_state_dict(b)[OUTER_OPTIMIZER]["state"][0]["momentum_buffer"]
        return {"anchor": b.state[ANCHOR].clone(), "momentum": momentum.clone(), "params": b.params.clone()}

    records = around_change(algo, extract)
    schedule = [(6, {"leave": [3]}), (14, {"join_from": [0]})]  # both mid-period (H = 4)
    result = simulate(problem, algo, "ring", steps=20, lr=0.1, membership=schedule)  # ends right after a sync
    join = records[1]
    for record in records:
        after = record["after"]
        assert spread(after["anchor"]) == 0.0 and spread(after["momentum"]) == 0.0
        assert after["momentum"].abs().max() > 1e-3  # the outer momentum is in use
    joined = join["joined"].flatten()
    assert torch.equal(join["after"]["params"][joined], join["after"]["anchor"][joined])
    assert not torch.equal(join["before"]["params"][joined], join["before"]["anchor"][joined])  # mid-period
    assert spread(result.params) == 0.0  # x = a after the last synchronisation, the same on all 8


@pytest.mark.parametrize("name", ["diloco", "gasloc"])
def test_a_fragment_in_flight_is_dropped_without_waiting_and_the_anchors_stay_consistent(problem, name) -> None:
    """Streaming, F = 2, tau = 1: fragment 0 starts after step 1 and would be applied after step 2; the
    members change before step 2. DiLoCo's model and anchor stay as they were (its progress goes out at
    the fragment's next sync); GASLoC, whose outer step already moved the anchor to y_i, completes the
    fragment with W = I (the model merged with its anchor)."""
    algo = get_algorithm(name, H=4, fragments=2, delay=1)
    seen: dict[str, Any] = {}
    original = algo.cancel_pending

    def cancel(buckets: list[Bucket]) -> None:
        b = buckets[0]
        seen.update(in_flight=b.state[IN_FLIGHT].tolist(), params=b.params.clone(), anchor=b.state[ANCHOR].clone())
        original(buckets)
        seen.update(after_in_flight=b.state[IN_FLIGHT].tolist(), after_params=b.params.clone())
        seen.update(after_anchor=b.state[ANCHOR].clone(), half=b.params.shape[1] // 2)

    algo.cancel_pending = cancel  # type: ignore[method-assign]
    result = simulate(problem, algo, "ring", steps=12, lr=0.1, membership=[(2, {"leave": [5]})])
    assert seen["in_flight"] == [1, -1] and seen["after_in_flight"] == [-1, -1]
    assert torch.equal(seen["after_anchor"], seen["anchor"])
    fragment = slice(0, seen["half"])
    if name == "diloco":
        assert torch.equal(seen["after_params"], seen["params"])
    else:
        assert torch.equal(seen["after_params"][:, fragment], seen["anchor"][:, fragment])
        assert not torch.equal(seen["params"][:, fragment], seen["anchor"][:, fragment])
    assert result.params.shape[0] == 7


def test_diloco_anchors_stay_identical_after_a_change_with_a_fragment_in_flight(problem) -> None:
    algo = get_algorithm("diloco", H=4, fragments=2, delay=1)
    anchors: list[torch.Tensor] = []
    original = algo.finish_pending

    def finish(buckets: list[Bucket]) -> None:  # the end of training
        anchors.append(buckets[0].state[ANCHOR].clone())
        original(buckets)

    algo.finish_pending = finish  # type: ignore[method-assign]
    simulate(problem, algo, "ring", steps=12, lr=0.1, membership=[(2, {"leave": [5]}), (6, {"join_from": [2]})])
    assert spread(anchors[0]) == 0.0 and anchors[0].shape[0] == 8


@pytest.mark.parametrize("name", ["diloco", "gasloc"])
def test_error_feedback_residuals_restart_at_zero(problem, name) -> None:
    algo = get_algorithm(name, H=2, compression="int8", compression_options={"block": 4})
    keys = [k for k in (RESIDUAL, SHARD_RESIDUAL) if name == "diloco" or k == RESIDUAL]
    records = around_change(algo, lambda b, c: {k: b.state[k].abs().max().item() for k in keys})
    run(problem, algo)
    for record in records:
        assert max(record["before"].values()) > 0.0
        assert max(record["after"].values()) == 0.0


# ---- modifiers and DDP ---------------------------------------------------------------------------
def test_adaptive_global_averaging_restarts_the_periods_loss_sums_and_keeps_its_schedule(problem) -> None:
    algo = get_algorithm("dsgd", global_average_every=4, adaptive_global_average=True)
    seen: list[tuple] = []
    original = algo.base.change_membership

    def base_change(buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        seen.append((algo._loss_sum, algo._loss_count, algo.next_global_step, step))
        original(buckets, comm, step, joined)

    algo.base.change_membership = base_change  # type: ignore[method-assign]
    run(problem, algo)
    (loss_sum, count, next_global, step), _ = seen
    assert loss_sum is None and count == 0 and next_global == 7 and step == 6


def test_ddp_replicas_stay_identical_across_a_leave_and_a_join(problem) -> None:
    result = run(problem, "ddp")
    assert result.params.shape[0] == 8 and spread(result.params) == 0.0


# ---- whole runs: a leave and a join, then the same end as an uninterrupted run ------------------------
LEAVE_THEN_JOIN = [(100, {"leave": [3]}), (200, {"join_from": [0]})]
RULES_THAT_MATTER = {"gradient_tracking", "exact_diffusion", "push_sum", "push_diging", "choco"}


@pytest.mark.parametrize(
    ("name", "topology", "options"),
    [
        ("dsgd", "ring", {}),
        ("dsgd", "ring", {"overlap": True}),
        ("qg_dsgdm", "ring", {}),
        ("gradient_tracking", "ring", {}),
        ("gradient_tracking", "ring", {"global_average_every": 5}),
        ("exact_diffusion", "ring", {}),
        ("gut", "one_peer_exponential", {"mu": 0.3}),
        ("qg_gut", "ring", {"steps": 1200}),  # momentum methods settle slower
        ("push_sum", "challenging_digraph", {}),
        ("push_diging", "challenging_digraph", {"lr": 0.15, "steps": 1200}),  # lr 0.3 does not converge here
        ("choco", "ring", {"compression": "int8"}),
        ("gradient_tracking", "ring", {"overlap": True}),
        ("exact_diffusion", "ring", {"overlap": True}),
        ("choco", "ring", {"compression": "int8", "overlap": True}),
        ("diloco", "ring", {"H": 4, "fragments": 2, "delay": 1, "steps": 1200}),
        ("gasloc", "ring", {"H": 4, "steps": 1500}),
        ("ddp", "ring", {}),
    ],
)
def test_a_run_with_a_leave_and_a_join_ends_where_an_uninterrupted_run_of_its_final_members_ends(
    convex, name, topology, options
) -> None:
    """Exact gradients and a constant step: each algorithm has one fixed point for a member set and graph,
    so after the leave (node 3, step 100) and the join (shard 3 again, copying row 0, step 200) the run
    must reach the fixed point of an uninterrupted run of the final members, in the same order."""
    settings = {"steps": 600, "lr": 0.3, **options}
    settings["eval_every"] = settings["steps"]
    changed = simulate(convex, name, topology, membership=LEAVE_THEN_JOIN, **settings)
    assert changed.members == [0, 1, 2, 4, 5, 6, 7, 3]
    reference = simulate(convex, name, topology, nodes=changed.members, **settings)
    end, expected = (stacked_average(r.params, r.push_weights) for r in (changed, reference))
    assert (end - expected).abs().max().item() < 1e-8
    assert changed.final("loss") < 0.75 * changed.series["loss"][0]
    if name in RULES_THAT_MATTER:  # without the rule the run settles elsewhere (or drifts)
        algorithm_options = {k: v for k, v in options.items() if k not in ("steps", "lr")}
        algo = get_algorithm(name, **algorithm_options)
        algo.change_membership = lambda *args: None  # type: ignore[method-assign]
        ruleless_settings = {k: v for k, v in settings.items() if k not in algorithm_options}
        ruleless = simulate(convex, algo, topology, membership=LEAVE_THEN_JOIN, **ruleless_settings)
        assert (stacked_average(ruleless.params, ruleless.push_weights) - expected).abs().max().item() > 1e-2


def test_exact_methods_reach_the_whole_problems_optimum_after_a_leave_and_a_join(convex) -> None:
    for name in ("gradient_tracking", "exact_diffusion"):
        result = simulate(convex, name, "ring", steps=600, lr=0.3, eval_every=600, membership=LEAVE_AND_JOIN)
        assert (result.params - convex.optimum).abs().max().item() < 1e-10


# ---- the schedule, its errors, the command line, the docs ---------------------------------------
def test_node_params_returns_the_row_of_the_member_holding_a_shard(problem) -> None:
    result = simulate(problem, "dsgd", "ring", steps=4, lr=0.1, membership=[(2, {"leave": [0, 3], "join_from": [1]})])
    assert result.members == [1, 2, 4, 5, 6, 7, 0]
    assert torch.equal(result.node_params(0), result.params[6]) and torch.equal(result.node_params(4), result.params[2])
    with pytest.raises(ValueError, match="no member holds data shard 3"):
        result.node_params(3)


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ([(2, {"leave": [8]})], r"leave=\[8\] names rows \[8\]; members are rows 0..7"),
        ([(2, {"leave": [1, 1]})], "names a member twice"),
        ([(2, {"leave": [1], "join_from": [1]})], "joiners copy rows \\[1\\], which leave"),
        ([(2, {"join_from": [0]})], "only 0 of the problem's 8 are free"),
        ([(2, {"leave": [1], "join_from": [0], "shards": [2]})], r"shards \[2\] are held by a member"),
        ([(2, {"leave": list(range(8))})], "every member leaves"),
        ([(9, {"leave": [1]})], "never happens in a run of 4 steps"),
        ([(2, {"leave": [1]}), (2, {"leave": [2]})], "two membership changes at step 2"),
        ([(2, {"go": [1]})], r"unknown key\(s\) \['go'\]"),
        ("2:leave", "write STEP:leave=ROWS:join_from=ROWS"),
        ([(0, {"leave": [1], "during_exchange": True})], "during_exchange needs a step before it"),
    ],
)
def test_a_schedule_that_cannot_run_is_refused_naming_the_fix(problem, schedule, match) -> None:
    with pytest.raises(ValueError, match=match):
        simulate(problem, "dsgd", "ring", steps=4, lr=0.1, membership=schedule)


def test_a_change_during_an_exchange_drops_that_steps_mixing_and_nothing_else(problem) -> None:
    """D-SGD, x <- W (x - lr grad): with the exchange of step 2 lost, step 2 is the local update alone."""
    steps, lr, dropped = 5, 0.1, 2
    result = simulate(
        problem,
        "dsgd",
        "ring",
        steps=steps,
        lr=lr,
        eval_every=steps,
        membership=[(dropped + 1, {"during_exchange": True})],
    )
    w = get_topology("ring", problem.n).weights(0).to(torch.float64)
    x = problem.initial_params().to(torch.float64).expand(problem.n, -1).clone()
    for k in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(problem.local_losses(x).sum(), x)
        x = (x - lr * grad).detach()
        if k != dropped:
            x = w @ x
    assert (result.params - x).abs().max().item() < 1e-12
    uninterrupted = simulate(problem, "dsgd", "ring", steps=steps, lr=lr, eval_every=steps)
    assert (result.params - uninterrupted.params).abs().max().item() > 1e-4


def test_gradient_tracking_restores_its_sum_after_a_change_during_an_exchange(problem) -> None:
    """The lost exchange leaves the trackers updated but unmixed; the rule restores sum z = sum g^prev over the
    survivors, and it runs with the interrupted step's index."""
    algo = get_algorithm("gradient_tracking")
    steps: list[int] = []
    original = algo.change_membership

    def change(buckets: list[Bucket], comm: Communicator, step: int, joined: torch.Tensor) -> None:
        steps.append(step)
        original(buckets, comm, step, joined)

    algo.change_membership = change  # type: ignore[method-assign]
    records = around_change(
        algo, lambda b, c: {"gap": (b.state["tracker"].sum(0) - b.state["previous_grad"].sum(0)).abs().max().item()}
    )
    simulate(problem, algo, "ring", steps=8, lr=0.1, membership=[(5, {"leave": [3], "during_exchange": True})])
    assert steps == [4]
    assert records[0]["before"]["gap"] > 1e-3 and records[0]["after"]["gap"] < 1e-12


def test_membership_needs_the_topology_by_name(problem) -> None:
    from lightning_decent.topology import ring

    with pytest.raises(ValueError, match="give it by name"):
        simulate(problem, "dsgd", ring(8), steps=4, lr=0.1, membership=[(1, {"leave": [0]})])


def test_the_command_line_text_parses_into_changes() -> None:
    assert parse_membership("100:leave=3; 200:join_from=0+1:shards=3+5; 300:leave=1:during_exchange=1") == [
        MembershipChange(step=100, leave=(3,)),
        MembershipChange(step=200, join_from=(0, 1), shards=(3, 5)),
        MembershipChange(step=300, leave=(1,), during_exchange=True),
    ]


def test_the_simulator_cli_runs_a_membership_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run.json"
    args = ["--problem", "least_squares", "--n", "6", "--dim", "5", "--steps", "40", "--lr", "0.1"]
    args += ["--algorithms", "gradient_tracking", "--membership", "10:leave=2;20:join_from=0", "--json", str(out)]
    assert sim_main(args) == 0
    changes = json.loads(out.read_text())["results"]["gradient_tracking"]["membership_changes"]
    assert changes == [
        {"step": 10, "n": 5, "shards": [0, 1, 3, 4, 5]},
        {"step": 20, "n": 6, "shards": [0, 1, 3, 4, 5, 2]},  # the joiner takes the free shard back
    ]
    assert "gradient_tracking" in capsys.readouterr().out


def test_every_algorithm_states_its_membership_rule_in_the_docs() -> None:
    page = (ROOT / "docs" / "elastic.md").read_text()
    for name, cls in ALGORITHMS.items():
        assert getattr(cls, "membership_rule", "")
        assert f"`{name}`" in page
