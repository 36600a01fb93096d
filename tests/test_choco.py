"""CHOCO-SGD: the paper's recursion, D-SGD as its uncompressed limit, linear consensus, refusals, options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import Bucket, Choco, get_algorithm
from lightning_decent.comm import SimulatedCommunicator, get_compressor
from lightning_decent.sim import Quadratic, get_problem, simulate
from lightning_decent.topology import get_topology

K, LR = 300, 0.1


@pytest.fixture(scope="module")
def quadratic() -> Quadratic:
    return Quadratic(n=8)


def test_identity_and_gamma_one_is_dsgd(quadratic: Quadratic) -> None:
    dsgd = simulate(quadratic, "dsgd", "ring", steps=K, lr=LR, momentum=0.9, eval_every=K)
    choco = simulate(
        quadratic, "choco", "ring", steps=K, lr=LR, momentum=0.9, eval_every=K, compression="none", gamma=1
    )
    torch.testing.assert_close(choco.params, dsgd.params, rtol=0, atol=1e-12)
    assert choco.bytes_sent_per_node_step == dsgd.bytes_sent_per_node_step  # the identity sends the raw values


def test_identity_and_gamma_one_is_dsgd_on_digits_mini_batches() -> None:
    problem = get_problem("digits", n=4, alpha=0.1, hidden=8, batch_size=16, seed=0)
    common = {"steps": 12, "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3, "eval_every": 12, "seed": 3}
    dsgd = simulate(problem, "dsgd", "exponential", **common)
    choco = simulate(problem, "choco", "exponential", compression="none", gamma=1.0, **common)
    torch.testing.assert_close(choco.params, dsgd.params, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("compression", "options", "gamma"),
    [("topk", {"fraction": 0.5}, 0.5), ("int8", {"block": 1}, 0.7), ("randomk", {"fraction": 0.5}, 0.3)],
)
def test_memory_efficient_form_equals_the_papers_algorithm(quadratic, compression, options, gamma) -> None:
    # Algorithm 2 of the paper, written with every node's public copy x_hat_j kept explicitly (as each
    # neighbour would) and the full gossip sum; ours keeps only x_hat_i and s_i = sum_j w_ij x_hat_j.
    # top-k with fraction 0.5 on d = 2 is the paper's top-1.
    compressor = get_compressor(compression, **options)
    w = get_topology("ring", 8).weights(0)
    x, x_hat = torch.zeros(8, 2, dtype=torch.float64), torch.zeros(8, 2, dtype=torch.float64)
    for t in range(K):
        x_half = x - LR * quadratic.curvature * (x - quadratic.centers)
        q = compressor.roundtrip(x_half - x_hat, key=(t, 0))
        x_hat = x_hat + q
        x = x_half + gamma * (w @ x_hat - x_hat)
    ours = simulate(
        quadratic, "choco", "ring", steps=K, lr=LR, eval_every=K, compression=compression,
        compression_options=options, gamma=gamma,
    )  # fmt: skip
    torch.testing.assert_close(ours.params, x, rtol=0, atol=1e-12)
    assert np.linalg.norm(x.mean(0) - quadratic.optimum) < 0.5  # it optimises


@pytest.mark.parametrize(
    ("compression", "options", "gamma", "steps", "final"),
    [("int8", {}, None, 60, 1e-11), ("int4", {}, None, 150, 3e-9), ("topk", {"fraction": 0.25}, 0.2, 150, 1e-5)],
)
def test_choco_gossip_reaches_the_exact_average_linearly(compression, options, gamma, steps, final) -> None:
    # CHOCO-Gossip (no local steps) converges linearly to the average of the starting values (the
    # paper's Theorem 2): every third of the run divides the spread by a constant factor (measured
    # 6000x, 1000x, 60x; a sublinear rate would not keep it), and the doubly stochastic W keeps the mean.
    algorithm = get_algorithm("choco", compression=compression, compression_options=options, gamma=gamma)
    comm = SimulatedCommunicator(algorithm.prepare_topology(get_topology("ring", 8)))
    x = torch.randn(8, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start, bucket = x.clone(), Bucket(x)
    algorithm.init_state(bucket)
    spreads = []
    for step in range(steps):
        algorithm.after_step([bucket], comm, step)
        if (step + 1) % (steps // 3) == 0:
            spreads.append(((x - x.mean(0)).pow(2).sum() / (start - start.mean(0)).pow(2).sum()).item())
    assert spreads[-1] < final
    assert spreads[1] / spreads[0] < 0.05 and spreads[2] / spreads[1] < 0.05
    torch.testing.assert_close(x.mean(0), start.mean(0), rtol=0, atol=1e-12)


def test_bytes_on_the_wire_are_the_compressed_payload(quadratic) -> None:
    problem = get_problem("logistic", n=8, dim=1000, samples=4, seed=0).to(torch.float32)
    dsgd = simulate(problem, "dsgd", "ring", steps=2, lr=LR, eval_every=2, dtype=torch.float32)
    choco = simulate(problem, "choco", "ring", steps=2, lr=LR, eval_every=2, dtype=torch.float32)
    assert choco.bytes_sent_per_node_step == 2 * get_compressor("int8").payload_bytes(1000)
    assert choco.bytes_sent_per_node_step <= 0.27 * dsgd.bytes_sent_per_node_step


def test_default_gamma_follows_the_compressor() -> None:
    # The paper's tuned values at 1 % (top-k 0.04, random-k 0.01), i.e. 4 omega and omega.
    assert get_algorithm("choco", compression="topk", compression_options={"fraction": 0.01}).gamma == 0.04
    assert get_algorithm("choco", compression="randomk", compression_options={"fraction": 0.01}).gamma == 0.01
    assert get_algorithm("choco", compression="topk", compression_options={"fraction": 0.1}).gamma == 0.4
    assert get_algorithm("choco", compression="topk", compression_options={"fraction": 0.5}).gamma == 1.0
    assert [get_algorithm("choco", compression=c).gamma for c in ("none", "bf16", "fp16", "int8", "int4")] == [1.0] * 5
    assert get_algorithm("choco", compression="int4", gamma=0.5).gamma == 0.5


# ---- refusals ----------------------------------------------------------------------------------------------
def test_time_varying_graphs_are_refused_naming_static_ones() -> None:
    with pytest.raises(
        ValueError, match=r"choco needs a static graph.*'one_peer_exponential' changes every step.*ring"
    ):
        get_algorithm("choco").prepare_topology(get_topology("one_peer_exponential", 8))


@pytest.mark.parametrize("modifier", [{"global_average_every": 4}, {"gossip_rounds": 2}])
def test_modifiers_are_refused(modifier: dict) -> None:
    with pytest.raises(ValueError, match=r"choco takes no modifiers.*one compressed round"):
        get_algorithm("choco", **modifier)


def test_bad_gamma_is_refused_and_overlap_accepted_with_the_compressor() -> None:
    strategy = DecentralizedStrategy(algorithm="choco", compression="int4", overlap=True)
    assert strategy.overlap and strategy.algorithm.name == "choco[int4(block=64)]"
    for gamma in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
            Choco(gamma=gamma)


# ---- the strategy option -----------------------------------------------------------------------------------
def test_strategy_compression_reaches_choco() -> None:
    strategy = DecentralizedStrategy(algorithm="choco", compression="topk", compression_options={"fraction": 0.05})
    assert strategy.algorithm.name == "choco[topk(fraction=0.05)]" and strategy.algorithm.gamma == 0.2
    built = get_compressor("int4", block=32)
    assert DecentralizedStrategy(algorithm="choco", compression=built).algorithm.compressor is built
    assert DecentralizedStrategy(algorithm="choco").algorithm.compressor.describe() == "int8(block=256)"


@pytest.mark.parametrize("algorithm", ["dsgd", "gradient_tracking", "push_sum"])
def test_algorithms_that_cannot_compress_refuse_naming_choco(algorithm: str) -> None:
    with pytest.raises(ValueError, match=rf"algorithm='{algorithm}' cannot send compressed.*use algorithm='choco'"):
        DecentralizedStrategy(algorithm=algorithm, compression="int8")
    assert DecentralizedStrategy(algorithm=algorithm, compression="none").algorithm.name == algorithm  # lossless


def test_bad_compression_input() -> None:
    with pytest.raises(ValueError, match=r"Unknown compressor 'int3'; valid names"):
        DecentralizedStrategy(algorithm="choco", compression="int3")
    with pytest.raises(ValueError, match=r"need compression=\.\.\."):
        DecentralizedStrategy(algorithm="choco", compression_options={"block": 64})
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        DecentralizedStrategy(algorithm="choco", compression="topk", compression_options={"fraction": 2})


def test_hydra_selects_choco_with_a_static_graph_and_the_strategys_compression(tmp_path) -> None:
    from lightning_decent.app.resolvers import register_resolvers

    register_resolvers()  # the app's config reads them; alone, this test ran before anything registered them
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(conf, version_base="1.3"):
        overrides = [f"paths.output_dir={tmp_path}", "algorithm=choco"]
        default = compose("train", overrides=overrides)
        assert default.topology.name == "ring"  # the default one-peer exponential graph changes every step
        assert instantiate(default.strategy).algorithm.name == "choco[int8(block=256)]"
        topk = ["topology=torus", "strategy.compression=topk", "strategy.compression_options={fraction:0.05}"]
        cfg = compose("train", overrides=[*overrides, *topk])
        strategy = instantiate(cfg.strategy)
        assert (cfg.topology.name, strategy.algorithm.name) == ("torus", "choco[topk(fraction=0.05)]")
        with pytest.raises(Exception, match=r"use algorithm='choco'"):
            instantiate(
                compose("train", overrides=[f"paths.output_dir={tmp_path}", "strategy.compression=int8"]).strategy
            )
    GlobalHydra.instance().clear()
