"""Overlapped D-SGD (one-step-delayed mixing) in a single process: the recursion, the refusals, no-ops.

The multi-process checks (real gloo training against the same recursion, clipping, accumulation,
schedulers, evaluation and exact resume) are in ``tests/test_overlap_multiprocess.py``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import ALGORITHMS, DSGD, Bucket, LocalSteps, get_algorithm
from lightning_decent.algorithms.base import OVERLAPPED
from lightning_decent.comm import SimulatedCommunicator
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule
from lightning_decent.topology import get_topology

N, DIM, STEPS, LR, MOMENTUM, DECAY = 8, 5, 12, 0.1, 0.9, 0.01


@pytest.fixture(autouse=True, scope="module")
def _own_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Node i minimises ``0.5 ||A_i x - b_i||^2`` (distinct A_i, b_i); all nodes start at x0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, DIM, DIM, generator=g, dtype=torch.float64)
    b = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    return a, b, torch.randn(DIM, generator=g, dtype=torch.float64)


def gradients(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nji,nj->ni", a, torch.einsum("nij,nj->ni", a, x) - b)


def lian_reference(topology: str, steps: int) -> torch.Tensor:
    """``x^{k+1} = W(k) x^k - lr m^{k+1}``, ``m^{k+1} = mu m^k + g(x^k) + wd x^k``: written out by hand."""
    a, b, x0 = problem()
    graph = get_topology(topology, N)
    x, m = x0.expand(N, DIM).clone(), torch.zeros(N, DIM, dtype=torch.float64)
    for k in range(steps):
        m = MOMENTUM * m + gradients(a, b, x) + DECAY * x
        x = graph.weights(k) @ x - LR * m
    return x


def simulate_overlapped(topology: str, steps: int, finish: bool = False) -> torch.Tensor:
    """The library's DSGD(overlap=True) + SimulatedCommunicator, hooks in the strategy's order."""
    a, b, x0 = problem()
    comm = SimulatedCommunicator(get_topology(topology, N))
    params = torch.nn.Parameter(x0.expand(N, DIM).clone())
    optimizer = torch.optim.SGD([params], lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    algorithm = DSGD(overlap=True)
    bucket = Bucket(params.data)
    algorithm.init_state(bucket)
    for k in range(steps):
        algorithm.before_step([bucket], comm, k)
        params.grad = gradients(a, b, params.detach())
        optimizer.step()
        algorithm.after_step([bucket], comm, k)
    if finish:
        algorithm.finish_pending([bucket])
    return params.detach()


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential", "exponential", "directed_ring"])
def test_simulated_overlap_is_the_one_step_delayed_recursion(topology: str) -> None:
    torch.testing.assert_close(
        simulate_overlapped(topology, STEPS), lian_reference(topology, STEPS), rtol=0, atol=1e-12
    )


def test_finishing_the_pending_round_applies_the_last_mixing() -> None:
    expected = get_topology("one_peer_exponential", N).weights(STEPS) @ lian_reference("one_peer_exponential", STEPS)
    got = simulate_overlapped("one_peer_exponential", STEPS, finish=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_overlap_differs_from_adapt_then_combine() -> None:
    a, b, x0 = problem()
    graph = get_topology("ring", N)
    x, m = x0.expand(N, DIM).clone(), torch.zeros(N, DIM, dtype=torch.float64)
    for k in range(STEPS):
        m = MOMENTUM * m + gradients(a, b, x) + DECAY * x
        x = graph.weights(k) @ (x - LR * m)
    assert (x - simulate_overlapped("ring", STEPS)).abs().max() > 1e-6


def test_the_simulator_accepts_the_overlapped_form_by_name() -> None:
    assert get_algorithm("dsgd", overlap=True).overlap
    assert not get_algorithm("dsgd").overlap


LOCAL_STEPS = {name for name, cls in ALGORITHMS.items() if issubclass(cls, LocalSteps)}


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - set(OVERLAPPED) - LOCAL_STEPS))
def test_algorithms_without_an_overlapped_form_refuse_it_naming_those_with_one(name: str) -> None:
    listed = "dsgd, choco, gradient_tracking, exact_diffusion"
    with pytest.raises(ValueError, match=rf"algorithm='{name}' cannot overlap.*overlap=False.*form: {listed} "):
        DecentralizedStrategy(algorithm=name, overlap=True)


@pytest.mark.parametrize("name", OVERLAPPED)
def test_algorithms_with_an_overlapped_form_accept_it(name: str) -> None:
    assert DecentralizedStrategy(algorithm=name, overlap=True).overlap
    assert get_algorithm(name, overlap=True).overlap and not get_algorithm(name).overlap


@pytest.mark.parametrize("name", sorted(LOCAL_STEPS))
def test_local_steps_refuse_overlap_naming_their_own_delay_option(name: str) -> None:
    with pytest.raises(ValueError, match=rf"algorithm='{name}' overlaps its synchronisation.*'delay': 1"):
        DecentralizedStrategy(algorithm=name, overlap=True)


def test_modified_dsgd_refuses_overlap() -> None:
    with pytest.raises(ValueError, match="cannot overlap"):
        DecentralizedStrategy(algorithm="dsgd", algorithm_options={"global_average_every": 4}, overlap=True)


def test_overlap_needs_the_p2p_communicator() -> None:
    with pytest.raises(ValueError, match="communicator='p2p'"):
        DecentralizedStrategy(communicator="allreduce", overlap=True)


def test_overlap_is_off_by_default_and_reported() -> None:
    assert not DecentralizedStrategy().overlap
    assert DecentralizedStrategy(overlap=True).overlap


def fit_one_rank(overlap: bool, tmp_path) -> tuple[torch.Tensor, DecentralizedStrategy]:
    pl.seed_everything(0)
    model = DigitsClassifier()
    strategy = DecentralizedStrategy(overlap=overlap)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=6,
        limit_val_batches=1,
        val_check_interval=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DigitsDataModule())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), strategy


def test_one_rank_with_overlap_trains_exactly_as_without(tmp_path) -> None:
    with_overlap, strategy = fit_one_rank(True, tmp_path)
    without, _ = fit_one_rank(False, tmp_path)
    assert torch.equal(with_overlap, without)
    assert strategy.gossip_step == 6 and strategy.comm_stats.bytes_sent == 0
