"""Local steps with an outer optimizer (local SGD, DiLoCo, Streaming DiLoCo, GASLoC): the simulator, the
Hydra group, and one Lightning process with a checkpoint taken while an exchange is in flight.

The papers' recursions are written out by hand in ``tests/mp_scripts/local_steps_reference.py``; the
real multi-process runs are in ``tests/test_local_steps_multiprocess.py`` (slow).
"""

from __future__ import annotations

import io
import itertools
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_decent.train  # noqa: F401  (registers the config resolvers)
from lightning_decent import DecentralizedStrategy
from lightning_decent.algorithms import Algorithm, Bucket, get_algorithm
from lightning_decent.comm import NonFiniteValueError, SimulatedCommunicator, get_compressor
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule
from lightning_decent.sim import AlgorithmSpec, get_problem, simulate
from lightning_decent.sim.problems import LeastSquares, Problem
from lightning_decent.topology import get_topology

sys.path.insert(0, str(Path(__file__).resolve().parent / "mp_scripts"))
from local_steps_reference import diloco_reference, gasloc_reference
from test_checkpoint import make_trainer  # one process, 4 steps per epoch, validation on one batch

N, LR = 8, 0.05


def logistic(n: int = N) -> Problem:
    return get_problem("logistic", n=n, dim=10, samples=16, heterogeneity=1.0, seed=0)


# ---- special cases that must coincide ------------------------------------------------------------------
def test_local_sgd_with_h_1_is_dsgd_on_the_complete_graph_and_parallel_sgd() -> None:
    problem = logistic()
    local = simulate(problem, "local_sgd", "ring", steps=60, lr=LR, eval_every=60, H=1)
    dsgd = simulate(problem, "dsgd", "complete", steps=60, lr=LR, eval_every=60)
    assert (local.params - dsgd.params).abs().max() < 1e-6
    x = problem.initial_params()  # DDP with SGD: one step along the average gradient
    for _ in range(60):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(problem.local_losses(x.expand(N, -1)).mean(), x)
        x = x - LR * grad
    assert (local.params - x).abs().max() < 1e-6
    assert (local.params[0] - problem.initial_params()).abs().max() > 1e-2  # it moved


def test_gasloc_on_the_complete_graph_is_diloco() -> None:
    # a linear outer optimizer (Nesterov) of the averaged pseudo-gradient == the average of per-rank ones
    problem = logistic()
    options = {"H": 4, "fragments": 2, "delay": 1, "steps": 40, "lr": LR, "eval_every": 40}
    gasloc = simulate(problem, "gasloc", "complete", **options)
    diloco = simulate(problem, "diloco", "ring", **options)
    assert (gasloc.params - diloco.params).abs().max() < 1e-10


def test_warmup_steps_are_synchronous_sgd_then_local_steps_start() -> None:
    problem = logistic()
    warm = simulate(problem, "diloco", "ring", steps=6, lr=LR, eval_every=6, H=4, warmup_steps=6)
    dsgd = simulate(problem, "dsgd", "complete", steps=6, lr=LR, eval_every=6)
    assert (warm.params - dsgd.params).abs().max() < 1e-12
    later = simulate(problem, "diloco", "ring", steps=9, lr=LR, eval_every=9, H=4, warmup_steps=6)
    assert later.series["consensus"][-1] > 1e-8  # 3 local steps since the warm-up: the replicas differ


# ---- the papers' recursions, by hand -------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"H": 4},  # DiLoCo
        {"H": 4, "fragments": 2},  # streaming, blocking
        {"H": 6, "fragments": 3, "delay": 1, "mix": 0.5},  # streaming with overlap
        {"H": 4, "fragments": 4, "delay": 0, "warmup_steps": 5, "outer_lr": 0.5, "outer_momentum": 0.8},
    ],
)
def test_diloco_follows_the_hand_written_recursion(options: dict) -> None:
    problem = logistic()
    steps = 29  # several syncs, and a fragment in flight or a partial period at the end
    simulated = simulate(problem, "diloco", "ring", steps=steps, lr=LR, momentum=0.9, eval_every=steps, **options)
    reference = diloco_reference(problem, steps, LR, momentum=0.9, **options)
    assert (simulated.params - reference).abs().max() < 1e-10
    assert (reference - problem.initial_params()).abs().max() > 1e-2


@pytest.mark.parametrize(("topology", "gamma"), [("one_peer_exponential", 0.0), ("ring", 0.5)])
def test_gasloc_follows_the_papers_recursion(topology: str, gamma: float) -> None:
    problem = logistic()
    graph = get_topology(topology, N)
    options = {"outer_optimizer": "sgd", "outer_lr": 0.8, "outer_momentum": 0.0, "gossip_momentum": gamma}
    simulated = simulate(problem, "gasloc", topology, steps=30, lr=LR, eval_every=30, H=3, **options)
    reference = gasloc_reference(problem, graph, 30, LR, 3, outer_lr=0.8, gamma=gamma)
    assert (simulated.params - reference).abs().max() < 1e-10


@pytest.mark.parametrize("options", [{"H": 4}, {"H": 6, "fragments": 3, "delay": 1}])
def test_compressed_diloco_follows_the_two_stage_error_feedback_recursion(options: dict) -> None:
    problem, compressor = logistic(), get_compressor("int8", block=2)
    steps = 29
    simulated = simulate(
        problem, "diloco", "ring", steps=steps, lr=LR, momentum=0.9, eval_every=steps, compression=compressor, **options
    )
    reference = diloco_reference(problem, steps, LR, momentum=0.9, compressor=compressor, **options)
    exact = diloco_reference(problem, steps, LR, momentum=0.9, **options)
    assert (simulated.params - reference).abs().max() < 1e-10
    assert (reference - exact).abs().max() > 1e-6  # the compression changed something


@pytest.mark.parametrize("topology", ["one_peer_exponential", "ring"])
def test_compressed_gasloc_follows_the_error_feedback_recursion(topology: str) -> None:
    problem, graph, compressor = logistic(), get_topology(topology, N), get_compressor("int8", block=4)
    options = {"outer_optimizer": "sgd", "outer_lr": 0.8, "outer_momentum": 0.0, "gossip_momentum": 0.5}
    simulated = simulate(
        problem, "gasloc", topology, steps=30, lr=LR, eval_every=30, H=3, compression=compressor, **options
    )
    reference = gasloc_reference(problem, graph, 30, LR, 3, outer_lr=0.8, gamma=0.5, compressor=compressor)
    exact = gasloc_reference(problem, graph, 30, LR, 3, outer_lr=0.8, gamma=0.5)
    assert (simulated.params - reference).abs().max() < 1e-10
    assert (reference - exact).abs().max() > 1e-6


def test_compressed_syncs_send_the_payload_bytes() -> None:
    problem = get_problem("logistic", n=N, dim=4096, samples=4, heterogeneity=1.0, seed=0)
    runs = {
        (name, compression): simulate(
            problem, name, "one_peer_exponential", steps=8, lr=LR, eval_every=8, H=4, compression=compression
        ).bytes_sent_per_node_step
        for name in ("diloco", "gasloc")
        for compression in ("none", "int8")
    }
    int8 = get_compressor("int8").payload_bytes(4096, torch.float64) / (4096 * 8)  # 1 byte + block scales
    for name in ("diloco", "gasloc"):
        assert runs[(name, "int8")] / runs[(name, "none")] == pytest.approx(int8, rel=0.02)
    assert get_algorithm("diloco", compression="int8").extra_memory == get_algorithm("diloco").extra_memory + 2
    assert get_algorithm("gasloc", compression="int8").extra_memory == get_algorithm("gasloc").extra_memory + 1


# ---- consensus of GASLoC's anchors ---------------------------------------------------------------------
def _run(algo: Algorithm, problem: Problem, topology: str, steps: range, state: tuple | None = None) -> tuple:
    """Drive ``algo`` like the simulator (inner SGD) and return (params, optimizer, bucket, comm)."""
    params, opt, bucket = state if state is not None else _fresh(algo, problem)
    comm = SimulatedCommunicator(algo.prepare_topology(get_topology(topology, problem.n)))
    for k in steps:
        algo.before_step([bucket], comm, k)
        opt.zero_grad(set_to_none=False)
        problem.local_losses(params).sum().backward()
        opt.step()
        algo.after_step([bucket], comm, k)
    return params, opt, bucket


def _fresh(algo: Algorithm, problem: Problem) -> tuple:
    params = torch.nn.Parameter(problem.initial_params().expand(problem.n, -1).clone())
    params.grad = torch.zeros_like(params)
    opt = torch.optim.SGD([params], lr=LR, momentum=0.5)
    bucket = Bucket(params.data)
    algo.init_state(bucket)
    return params, opt, bucket


def _anchor_consensus(bucket: Bucket) -> float:
    anchors = bucket.state["anchor"]
    return (anchors - anchors.mean(dim=0)).pow(2).sum(dim=1).mean().item()


def test_gasloc_anchors_reach_consensus_on_a_problem_with_a_common_optimum() -> None:
    problem = LeastSquares(n=N, dim=6, samples=24, heterogeneity=0.0, seed=0)  # every f_i has the same minimiser
    algo = get_algorithm("gasloc", H=4)
    state = _fresh(algo, problem)
    distances = []
    for sync in range(80):
        state = _run(algo, problem, "one_peer_exponential", range(4 * sync, 4 * sync + 4), state)
        distances.append(_anchor_consensus(state[2]))
    assert max(distances[:5]) > 1e-3  # the anchors really differ after their local steps
    blocks = [max(distances[i : i + 10]) for i in range(0, 80, 10)]
    assert all(later < earlier for earlier, later in itertools.pairwise(blocks))  # measured: 4e-2 ... 1e-12
    assert distances[-1] < 1e-9 * max(distances)
    assert (state[2].state["anchor"] - problem.optimum).abs().max() < 1e-5  # at the common optimum


# ---- checkpoints: bucket state and outer optimizer, mid-period, across a sync, in flight ---------------
@pytest.mark.parametrize(
    ("name", "options", "stop"),
    [
        ("diloco", {"H": 5}, 12),  # mid-period
        ("local_sgd", {"H": 4, "warmup_steps": 3}, 11),  # right after a sync
        ("diloco", {"H": 8, "fragments": 4, "delay": 1}, 12),  # a fragment in flight
        ("gasloc", {"H": 8, "fragments": 4, "delay": 1, "gossip_momentum": 0.5}, 12),
        ("gasloc", {"H": 3, "outer_optimizer": "adam", "outer_lr": 0.05}, 7),
    ],
)
def test_checkpoint_state_resumes_bitwise(name: str, options: dict, stop: int) -> None:
    problem = logistic()
    algo = get_algorithm(name, **options)
    straight = _run(algo, problem, "ring", range(30))[0].detach().clone()

    algo = get_algorithm(name, **options)
    params, opt, bucket = _run(algo, problem, "ring", range(stop))
    algo.wait_pending()  # what the strategy does before saving
    saved = (params.detach().clone(), opt.state_dict(), algo.bucket_state_dict(bucket), algo.state_dict())
    saved = torch.load(_roundtrip(saved), weights_only=True)  # what a checkpoint file keeps

    algo = get_algorithm(name, **options)
    params, opt, bucket = _fresh(algo, problem)
    with torch.no_grad():
        params.copy_(saved[0])
    opt.load_state_dict(saved[1])
    algo.load_state_dict(saved[3])
    algo.load_bucket_state_dict(bucket, saved[2])
    resumed = _run(algo, problem, "ring", range(stop, 30), (params, opt, bucket))[0]
    assert torch.equal(resumed.detach(), straight)


def _roundtrip(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_resuming_with_another_schedule_is_refused() -> None:
    state = get_algorithm("diloco", H=16).state_dict()
    with pytest.raises(ValueError, match=r"H=16 \(now 32\).*resume_from_average=True.*application: strategy.resume"):
        get_algorithm("diloco", H=32).load_state_dict(state)


def test_adamw_outer_optimizer_decays_only_when_asked() -> None:
    # Before, torch's AdamW default weight_decay=0.01 applied silently: a zero pseudo-gradient shrank the anchor by
    # lr x 0.01 = 0.7 % per synchronisation.
    def anchor_after_a_zero_sync(**options: float) -> torch.Tensor:
        algo = get_algorithm("diloco", H=1, outer_optimizer="adamw", **options)
        bucket = Bucket(torch.ones(1, 8))
        algo.init_state(bucket)
        algo.after_step([bucket], SimulatedCommunicator(get_topology("complete", 1)), step=0)  # model == anchor
        return bucket.state["anchor"]

    assert torch.equal(anchor_after_a_zero_sync(), torch.ones(1, 8))
    assert torch.allclose(anchor_after_a_zero_sync(outer_weight_decay=0.1), torch.full((1, 8), 1 - 0.7 * 0.1))


def test_a_checkpoint_from_before_outer_weight_decay_resumes_with_its_implicit_value() -> None:
    old = get_algorithm("diloco", outer_optimizer="adamw").state_dict()
    del old["config"]["outer_weight_decay"]  # saved by a version that used torch's AdamW default
    with pytest.raises(ValueError, match=r"outer_weight_decay=0.01 \(now 0.0\)"):
        get_algorithm("diloco", outer_optimizer="adamw").load_state_dict(old)
    get_algorithm("diloco", outer_optimizer="adamw", outer_weight_decay=0.01).load_state_dict(old)


# ---- cost ------------------------------------------------------------------------------------------------
def test_bytes_per_step_are_one_model_per_sync() -> None:
    problem = logistic()
    model = problem.dim * 8
    diloco = simulate(problem, "diloco", "ring", steps=16, lr=LR, eval_every=16, H=4)
    assert diloco.bytes_sent_per_node_step == pytest.approx(2 * (N - 1) / N * model / 4)  # a ring all-reduce
    gasloc = simulate(problem, "gasloc", "one_peer_exponential", steps=16, lr=LR, eval_every=16, H=4, fragments=2)
    assert gasloc.bytes_sent_per_node_step == pytest.approx(model / 4)  # one peer, every fragment once per period


def test_extra_memory_counts_anchor_outer_state_and_buffers_in_flight() -> None:
    assert get_algorithm("local_sgd").extra_memory == 1  # the anchor
    assert get_algorithm("diloco").extra_memory == 2  # + Nesterov momentum
    assert get_algorithm("diloco", H=4, delay=1, fragments=2).extra_memory == 3  # + the exchange in flight
    assert get_algorithm("gasloc", outer_optimizer="adam", gossip_momentum=0.5).extra_memory == 4
    algo = get_algorithm("gasloc", H=4, fragments=2, delay=1, gossip_momentum=0.5)
    bucket = Bucket(torch.zeros(3, 10))
    algo.init_state(bucket)
    models = sum(t.numel() for t in bucket.state.values() if t.is_floating_point()) / bucket.params.numel()
    assert models == algo.extra_memory - 1  # the outer momentum lives in the torch optimizer


# ---- by name: Python, simulator specs ---------------------------------------------------------------------
def test_spec_syntax_reaches_the_algorithm() -> None:
    spec = AlgorithmSpec.parse("diloco:H=16:outer_lr=0.7:fragments=4:delay=2:mix=0.5:lr=0.1")
    assert spec.options == {"H": 16, "outer_lr": 0.7, "fragments": 4, "delay": 2, "mix": 0.5}
    assert spec.optimizer == {"lr": 0.1}
    algo = get_algorithm(spec.name, **spec.options)
    assert (algo.schedule.period, algo.schedule.fragments, algo.schedule.delay, algo.mix) == (16, 4, 2, 0.5)


def test_strategy_builds_it_by_name() -> None:
    strategy = DecentralizedStrategy(topology="one_peer_exponential", algorithm="gasloc", algorithm_options={"H": 8})
    assert strategy.algorithm.name == "gasloc" and strategy.algorithm.schedule.period == 8


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"H": 0}, r"H \(the number of local steps between synchronisations\) must be an integer >= 1"),
        ({"H": 6, "fragments": 4}, "fragments=4 must divide H=6"),
        ({"H": 2, "fragments": 4}, "fragments=4 must divide H=2"),
        ({"H": 8, "fragments": 4, "delay": 2}, "delay=2 must be smaller than H/fragments=2"),
        ({"outer_optimizer": "lamb"}, "Unknown outer_optimizer='lamb'; valid: sgd, nesterov, adam, adamw"),
        ({"outer_momentum": 0.0}, "'nesterov' needs outer_momentum > 0"),
        ({"outer_lr": 0.0}, "outer_lr must be positive"),
        ({"H": 4, "delay": 1, "mix": 1.5}, r"mix must be in \[0, 1\]"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"outer_weight_decay": -0.1}, "outer_weight_decay must be >= 0"),
        ({"global_average_every": 4}, r"synchronises every H steps itself; the modifiers \['global_average_every'\]"),
    ],
)
def test_bad_options_are_refused_with_the_fix(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_algorithm("diloco", **options)


def test_overlap_flag_and_tiny_buckets_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"option delay=tau.*algorithm_options=\{'delay': 1\}"):
        DecentralizedStrategy(algorithm="diloco", overlap=True)
    with pytest.raises(ValueError, match="bucket of 3 elements cannot be split into fragments=4"):
        get_algorithm("diloco", H=4, fragments=4).init_state(Bucket(torch.zeros(3)))


def test_hydra_group_overrides_reach_the_strategy(tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        overrides = [
            "algorithm=gasloc",
            "algorithm.H=64",
            "algorithm.fragments=4",
            "algorithm.delay=1",
            "algorithm.mix=0.5",
        ]
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    algo = instantiate(cfg.strategy).algorithm
    assert algo.name == "gasloc" and (algo.schedule.period, algo.schedule.fragments, algo.schedule.delay) == (64, 4, 1)
    assert algo.mix == 0.5 and algo.outer_optimizer == "nesterov"


# ---- through Lightning: a checkpoint with an exchange in flight, one process ----------------------------
@pytest.fixture
def _own_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_lightning_checkpoint_with_an_exchange_in_flight_resumes_bitwise(tmp_path: Path, _own_process_group) -> None:
    # fragment 1 starts after the 4th step, the end of epoch 1: in flight at the checkpoint (validation,
    # which completes an exchange early, runs at every epoch end of both runs)
    options = {"H": 6, "fragments": 3, "delay": 1, "mix": 0.5}

    def fit(epochs: int, callbacks=(), ckpt_path=None) -> DigitsClassifier:
        pl.seed_everything(0)
        model = DigitsClassifier()
        strategy = {"algorithm": "diloco", "algorithm_options": options, "final_model": "local"}
        make_trainer(tmp_path, epochs, callbacks, **strategy).fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
        return model

    straight = fit(2)
    fit(1, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt.shards" / "rank_0.ckpt", weights_only=True)["decentralized"]
    assert saved["buckets"][0][0]["in_flight"].tolist() == [-1, 3, -1]  # started after step index 3
    assert saved["buckets"][0][0]["outer_optimizer"]["state"]  # Nesterov momentum of fragment 0
    resumed = fit(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "options", "part"),
    [
        ("diloco", {"H": 1}, "fragment 0"),
        ("diloco", {"H": 1, "compression": "int8"}, "fragment 0"),
        ("local_sgd", {"H": 4, "fragments": 2, "delay": 1}, "fragment 1"),
        ("diloco", {"H": 4, "warmup_steps": 2}, "the whole model"),
        ("gasloc", {"H": 1}, "fragment 0"),
    ],
)
def test_an_outer_sync_refuses_to_send_nan_naming_the_rank(name: str, options: dict, part: str) -> None:
    # Before: NaN in one rank's model went into the outer average (plain, int8, streaming) and every parameter
    # of every rank became NaN, with exit code 0.
    comm = SimulatedCommunicator(get_topology("complete", 1))
    comm.rank, comm.check_finite = 2, True
    algo = get_algorithm(name, **options)
    bucket = Bucket(torch.ones(1, 8))
    algo.init_state(bucket)
    bucket.params[0, -1] = float("nan")  # in the last fragment
    step = 3 if options.get("fragments") else 0  # streaming: fragment 0 syncs after step 1, fragment 1 after 3
    for earlier in range(step):
        algo.after_step([bucket], comm, step=earlier)
    with pytest.raises(NonFiniteValueError, match=rf"rank 2: NaN or Inf in buffer 0 \({part}\) about to be sent at "
                       rf"the synchronisation after step {step}"):  # fmt: skip
        algo.after_step([bucket], comm, step=step)


class _RecordingCommunicator(SimulatedCommunicator):
    """Records how a gossip round at each call would be named in errors."""

    def __init__(self) -> None:
        super().__init__(get_topology("complete", 1))
        self.named: list[str] = []

    def mix(self, buffers, step: int) -> None:
        self.named.append(self.step_name(step))
        super().mix(buffers, step)


def test_errors_of_a_streaming_gossip_sync_name_the_training_step_not_the_round() -> None:
    # Before: a stopped neighbour during streaming GASLoC's sync after step 5 was reported "at gossip step 0"
    # (the fragment's synchronisation round, which selects W).
    algo = get_algorithm("gasloc", H=4, fragments=2)
    bucket = Bucket(torch.ones(1, 8))
    algo.init_state(bucket)
    comm = _RecordingCommunicator()
    for step in range(8):
        algo.after_step([bucket], comm, step=step)
    assert comm.named == [
        "gossip step 1 (synchronisation round 0)",  # fragment 0
        "gossip step 3 (synchronisation round 0)",  # fragment 1
        "gossip step 5 (synchronisation round 1)",
        "gossip step 7 (synchronisation round 1)",
    ]
    assert comm.reported_step is None and comm.step_name(5) == "gossip step 5"  # outside a sync: the step itself
