"""Algorithm registry, documented costs, refusals of unsuitable graphs/optimizers, modifiers and resumable state."""

from __future__ import annotations

import pytest
import torch

from lightning_decent.algorithms import (
    ALGORITHMS,
    DSGD,
    GUT,
    Algorithm,
    Bucket,
    Modified,
    get_algorithm,
)
from lightning_decent.algorithms import gut as gut_module
from lightning_decent.algorithms.gut_stability import gossip_spectral_radius
from lightning_decent.comm import SimulatedCommunicator
from lightning_decent.sim import Quadratic, simulate
from lightning_decent.topology import get_topology, lambda_min

#: The doubly stochastic per-step family, read from the class attributes. The push-sum algorithms (column-stochastic)
#: send an extra scalar, keep a per-node scalar and have graph-dependent rounds; their costs and refusals are tested
#: in tests/test_push_sum.py. The local-steps algorithms communicate once per H steps and take no modifier:
#: tests/test_local_steps.py.
NAMES = [name for name, cls in ALGORITHMS.items() if cls.needs_doubly_stochastic and cls.communicates_every_step]


# ---- registry -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("alias", "name"), [("d2", "exact_diffusion"), ("GT", "gradient_tracking"), ("qg-gut", "qg_gut")]
)
def test_names_and_aliases(alias: str, name: str) -> None:
    assert get_algorithm(alias).name == name


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown algorithm 'sgp'.*dsgd.*gradient_tracking.*d2=exact_diffusion"):
        get_algorithm("sgp")


def test_unknown_option_lists_the_accepted_ones() -> None:
    accepted = r"algorithm 'gut' does not take option\(s\) \['momentum'\].*mu, beta.*gossip_rounds"
    with pytest.raises(ValueError, match=accepted):
        get_algorithm("gut", momentum=0.9)


def test_modifier_options_wrap_any_algorithm_and_reach_it_by_name() -> None:
    algo = get_algorithm("gradient_tracking", global_average_every=4, gossip_rounds=2)
    assert isinstance(algo, Modified) and algo.name == "gradient_tracking+pga4+r2"
    assert (algo.rounds_per_step, algo.buffers_per_round, algo.extra_memory) == (2, 2, 2.0)
    assert algo.transforms_gradients
    assert get_algorithm(DSGD(), gossip_rounds=3).rounds_per_step == 3
    assert type(get_algorithm("dsgd", gossip_rounds=1)) is DSGD


def test_built_algorithm_refuses_its_own_options() -> None:
    with pytest.raises(ValueError, match="only apply to an algorithm given by name"):
        get_algorithm(GUT(), mu=0.5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"gossip_rounds": 0}, "gossip_rounds must be an integer >= 1"),
        ({"global_average_every": 0}, "global_average_every must be an integer >= 1"),
        ({"adaptive_global_average": True}, "needs the initial period: set global_average_every"),
        ({"mu": 1.0}, "0 <= mu < 1"),
        ({"beta": -0.1}, "0 <= beta < 1"),
    ],
)
def test_bad_option_values(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_algorithm("gut", **options)


# ---- declared costs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_declared_extra_memory_is_the_state_the_algorithm_keeps(name: str) -> None:
    algo = get_algorithm(name)
    bucket = Bucket(torch.zeros(4, 10), torch.zeros(4, 10))
    algo.init_state(bucket)
    persistent = sum(t.numel() for t in bucket.state.values()) / bucket.params.numel()
    assert persistent == algo.extra_memory == ALGORITHMS[name].extra_memory


@pytest.mark.parametrize("name", [name for name in NAMES if name not in ("choco", "ddp")])  # choco: test_choco.py
def test_bytes_sent_per_step_are_rounds_times_buffers_times_out_degree(name: str) -> None:
    problem = Quadratic(n=8)
    result = simulate(problem, name, "ring", steps=5, lr=0.1, eval_every=5, gossip_rounds=2)
    model_bytes = problem.dim * 8
    cls = ALGORITHMS[name]  # gossip_rounds=2 repeats each round; the ring's out-degree is 2
    assert result.bytes_sent_per_node_step == 2 * cls.rounds_per_step * cls.buffers_per_round * 2 * model_bytes


def test_ddp_sends_one_ring_all_reduce_of_the_gradient_per_step() -> None:
    assert (ALGORITHMS["ddp"].rounds_per_step, ALGORITHMS["ddp"].buffers_per_round) == (0, 0)  # no gossip
    problem = Quadratic(n=8)
    result = simulate(problem, "ddp", "ring", steps=5, lr=0.1, eval_every=5)
    assert result.bytes_sent_per_node_step == 2 * (8 - 1) / 8 * problem.dim * 8  # no gossip: 2 (n - 1) / n models


# ---- refusals ------------------------------------------------------------------------------------------
def test_exact_diffusion_refuses_the_even_ring_without_lazy_mixing() -> None:
    ring = get_topology("ring", 8)
    assert lambda_min(ring) == pytest.approx(-1 / 3)
    with pytest.raises(ValueError, match=r"lambda_min\(W\) > -1/3.*-0.333333.*lazy_mixing=True"):
        get_algorithm("exact_diffusion", lazy_mixing=False).prepare_topology(ring)
    lazy = get_algorithm("exact_diffusion").prepare_topology(ring)
    assert lazy.name == "lazy_ring" and lambda_min(lazy) >= 0


def test_exact_diffusion_accepts_an_odd_ring_as_is() -> None:
    ring = get_topology("ring", 5)
    assert get_algorithm("exact_diffusion", lazy_mixing=False).prepare_topology(ring) is ring


@pytest.mark.parametrize(
    ("topology", "match"), [("exponential", "directed"), ("one_peer_exponential", "changes every")]
)
def test_exact_diffusion_refuses_non_symmetric_and_time_varying_graphs(topology: str, match: str) -> None:
    with pytest.raises(ValueError, match=f"{match}.*use gradient_tracking or gut"):
        get_algorithm("exact_diffusion").prepare_topology(get_topology(topology, 8))


def test_exact_diffusion_refuses_global_averaging() -> None:
    with pytest.raises(ValueError, match=r"exact_diffusion needs the same W every step.*gradient_tracking"):
        get_algorithm("exact_diffusion", global_average_every=4).prepare_topology(get_topology("ring", 8))


@pytest.mark.parametrize("name", NAMES)
def test_column_stochastic_graphs_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"needs a doubly stochastic mixing matrix.*push-sum"):
        get_algorithm(name).prepare_topology(get_topology("challenging_digraph", 4))


@pytest.mark.parametrize("name", ["qg_dsgdm", "gut", "qg_gut"])
def test_algorithms_that_own_their_momentum_refuse_optimizer_momentum(name: str) -> None:
    algo = get_algorithm(name)
    params = [torch.nn.Parameter(torch.zeros(3))]
    beta = f"{algo.beta:g}"
    fix = f"use torch.optim.SGD without momentum; {name} applies momentum beta={beta} itself"
    with pytest.raises(ValueError, match=f"SGD with momentum=0.9: {fix}"):
        algo.check_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match=f"got Adam: {fix}"):
        algo.check_optimizer(torch.optim.Adam(params))
    algo.check_optimizer(torch.optim.SGD(params, lr=0.1, weight_decay=1e-4))


def test_gut_refuses_a_graph_on_which_its_gossip_diverges_and_names_a_stable_mu() -> None:
    one_peer = get_topology("one_peer_exponential", 8)
    with pytest.raises(ValueError, match=r"gut with mu=0.9, beta=0 is unstable.*1\.19\d+ per step.*Use mu <= 0.6"):
        get_algorithm("gut").prepare_topology(one_peer)
    get_algorithm("gut", mu=0.6).prepare_topology(one_peer)
    with pytest.raises(ValueError, match=r"qg_gut with mu=0.06, beta=0.9 is unstable.*Lower beta"):
        get_algorithm("qg_gut").prepare_topology(get_topology("exponential", 8))


def test_the_gut_stability_check_predicts_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    # The refused setting really diverges (the reference code diverges there too), the accepted one does not.
    monkeypatch.setattr(gut_module, "check_gossip_stability", lambda *args, **kwargs: None)
    problem = Quadratic(n=8)
    bad = simulate(problem, "gut", "one_peer_exponential", mu=0.9, steps=300, lr=0.1, eval_every=300)
    good = simulate(problem, "gut", "one_peer_exponential", mu=0.6, steps=300, lr=0.1, eval_every=300)
    assert bad.final("consensus") > 1e6
    assert good.final("consensus") < 1e-1


@pytest.mark.parametrize(("name", "lr", "unstable", "stable"), [("qg_gut", 0.1, 4, 8), ("gut", 0.01, 4, 8)])
def test_gut_with_periodic_global_averaging_is_checked_on_its_whole_schedule(
    monkeypatch: pytest.MonkeyPatch, name: str, lr: float, unstable: int, stable: int
) -> None:
    # The check was once skipped with global averaging, and qg_gut with H = 4 on the ring (n = 8)
    # reached an excess loss of 6e27. An exact average every H steps does not reset GUT's memory terms.
    problem, ring = Quadratic(n=8), get_topology("ring", 8)
    run = {"steps": 1000, "lr": lr, "eval_every": 1000}
    with pytest.raises(ValueError, match=rf"{name} with .* is unstable on topology 'ring' \(n=8\) with an exact "
                       rf"global average every {unstable} steps.*global_average_every in \[1, 2, .*8\]"):  # fmt: skip
        simulate(problem, name, ring, global_average_every=unstable, **run)
    accepted = simulate(problem, name, ring, global_average_every=stable, **run)
    assert accepted.final("excess_loss") < 1e-2
    monkeypatch.setattr(gut_module, "check_gossip_stability", lambda *args, **kwargs: None)
    refused = simulate(problem, name, ring, global_average_every=unstable, **run)
    assert not refused.final("excess_loss") < 1e6  # diverges (inf or above 1e6)


def test_gut_refuses_an_adaptive_global_averaging_period() -> None:
    algorithm = get_algorithm("qg_gut", global_average_every=8, adaptive_global_average=True)
    with pytest.raises(ValueError, match=r"cannot use adaptive_global_average.*fixed global_average_every"):
        algorithm.prepare_topology(get_topology("ring", 8))


def test_gut_stability_counts_gossip_rounds() -> None:
    # Three one-peer rounds average 8 nodes exactly, so the recursion with gossip_rounds=3 is stable where one
    # round per step (radius 1.196) is not.
    one_peer = get_topology("one_peer_exponential", 8)
    assert gossip_spectral_radius(one_peer, 0.9, 0.0) == pytest.approx(1.1958, abs=1e-4)
    assert gossip_spectral_radius(one_peer, 0.9, 0.0, gossip_rounds=3) == pytest.approx(0.0, abs=1e-6)


# ---- modifiers ------------------------------------------------------------------------------------------
def test_gossip_rounds_mix_with_consecutive_phases() -> None:
    problem = Quadratic(n=8)
    one_peer = get_topology("one_peer_exponential", 8)
    result = simulate(problem, "dsgd", one_peer, steps=1, lr=0.1, eval_every=1, gossip_rounds=3)
    x = -0.1 * problem.curvature * (0 - problem.centers)  # one SGD step from x^0 = 0
    for k in range(3):
        x = one_peer.weights(k) @ x
    torch.testing.assert_close(result.params, x)
    assert result.final("consensus") < 1e-28  # three one-peer phases average 8 nodes exactly


def test_adaptive_period_follows_the_aga_rule() -> None:
    algo = get_algorithm("dsgd", global_average_every=4, adaptive_global_average=True)
    comm = SimulatedCommunicator(get_topology("ring", 4))
    spread = torch.arange(4.0).unsqueeze(1)
    bucket = Bucket(spread.clone())
    algo.init_state(bucket)
    global_steps = []
    losses = [16.0] * 4 + [1.0] * 20
    for step, loss in enumerate(losses):
        algo.observe_loss(torch.full((4,), loss))
        algo.after_step([bucket], comm, step)
        if torch.allclose(bucket.params, bucket.params.mean()):  # exact average, not one ring round
            global_steps.append(step)
            bucket.params += spread
    # The first period (H0 = 4) measures f0 = 16; the second still has H = 4 (its length was set when
    # only f0 was known); from then on the loss is 1 and H = ceil(4 (16/1)^(1/4)) = 8.
    assert global_steps == [3, 7, 15, 23]
    assert algo.period == 8


def test_adaptive_period_without_losses_warns_and_keeps_the_period() -> None:
    algo = get_algorithm("dsgd", global_average_every=2, adaptive_global_average=True)
    comm = SimulatedCommunicator(get_topology("ring", 4))
    bucket = Bucket(torch.zeros(4, 1))
    with pytest.warns(UserWarning, match="saw no training loss.*stays at 2"):
        for step in range(4):
            algo.after_step([bucket], comm, step)
    assert algo.period == 2


# ---- resumable state -------------------------------------------------------------------------------
def _run(algo: Algorithm, params: torch.nn.Parameter, opt: torch.optim.Optimizer, bucket: Bucket, steps: range) -> None:
    problem, comm = Quadratic(n=8), SimulatedCommunicator(algo.prepare_topology(get_topology("ring", 8)))
    for k in steps:
        algo.before_step([bucket], comm, k)
        opt.zero_grad(set_to_none=False)
        losses = problem.local_losses(params)
        losses.sum().backward()
        if algo.transforms_gradients:
            bucket.grads = params.grad
            algo.transform_gradients([bucket], comm, k)
        opt.step()
        algo.observe_loss(losses.detach())
        algo.after_step([bucket], comm, k)


def _fresh(
    name: str, options: dict, momentum: float
) -> tuple[Algorithm, torch.nn.Parameter, torch.optim.Optimizer, Bucket]:
    algo = get_algorithm(name, **options)
    params = torch.nn.Parameter(torch.zeros(8, 2, dtype=torch.float64))
    params.grad = torch.zeros_like(params)
    opt = torch.optim.SGD([params], lr=0.1, momentum=momentum)
    bucket = Bucket(params.data, params.grad)
    algo.init_state(bucket)
    return algo, params, opt, bucket


@pytest.mark.parametrize(
    ("name", "options", "momentum"),
    [
        ("dsgd", {}, 0.9),
        ("qg_dsgdm", {}, 0.0),
        ("exact_diffusion", {}, 0.0),
        ("gradient_tracking", {}, 0.5),
        ("gut", {}, 0.0),
        ("qg_gut", {}, 0.0),
        ("dsgd", {"global_average_every": 2, "adaptive_global_average": True}, 0.0),
        ("choco", {"compression": "randomk", "compression_options": {"fraction": 0.5}}, 0.9),
    ],
)
def test_bucket_state_and_state_dict_resume_exactly(name: str, options: dict, momentum: float) -> None:
    algo, params, opt, bucket = _fresh(name, options, momentum)
    _run(algo, params, opt, bucket, range(20))
    straight = params.detach().clone()

    algo, params, opt, bucket = _fresh(name, options, momentum)
    _run(algo, params, opt, bucket, range(9))
    saved = (
        params.detach().clone(),
        opt.state_dict(),
        {k: t.clone() for k, t in bucket.state.items()},
        algo.state_dict(),
    )
    algo, params, opt, bucket = _fresh(name, options, momentum)
    with torch.no_grad():
        params.copy_(saved[0])
    opt.load_state_dict(saved[1])
    for key, tensor in saved[2].items():
        bucket.state[key].copy_(tensor)
    algo.load_state_dict(saved[3])
    _run(algo, params, opt, bucket, range(9, 20))
    assert torch.equal(params.detach(), straight)
