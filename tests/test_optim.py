"""AccumAdam against Adam and a hand-computed reference; weight-decay grouping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_decent.optim import AccumAdam, weight_decay_groups


def quadratic_grads(x: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic, step-dependent gradient so that accumulation windows matter."""
    return (x - torch.arange(x.numel(), dtype=x.dtype)) * (1 + 0.5 * math.sin(step))


def run(optimizer_cls, steps: int, **kwargs) -> torch.Tensor:
    x = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
    opt = optimizer_cls([x], **kwargs)
    for k in range(steps):
        x.grad = quadratic_grads(x.detach(), k)
        opt.step()
    return x.detach()


def test_accum_iter_one_is_adam() -> None:
    ours = run(AccumAdam, 20, lr=0.05, accum_iter=1, weight_decay=0.01)
    torch_adam = run(torch.optim.Adam, 20, lr=0.05, weight_decay=0.01)
    torch.testing.assert_close(ours, torch_adam, rtol=1e-12, atol=1e-12)


def test_decoupled_accum_iter_one_is_adamw() -> None:
    ours = run(AccumAdam, 20, lr=0.05, accum_iter=1, weight_decay=0.1, decoupled_weight_decay=True)
    torch_adamw = run(torch.optim.AdamW, 20, lr=0.05, weight_decay=0.1)
    torch.testing.assert_close(ours, torch_adamw, rtol=1e-12, atol=1e-12)


def hand_reference(steps: int, s: int, lr: float, b1: float, b2: float, eps: float, wd: float) -> list[float]:
    """The update written out with Python floats, one coordinate at a time."""
    xs = [float(v) for v in torch.linspace(-1, 1, 5, dtype=torch.float64)]
    out = []
    for i, x in enumerate(xs):
        m_hat = v_hat = acc = 0.0
        for t in range(1, steps + 1):
            g = (x - i) * (1 + 0.5 * math.sin(t - 1)) + wd * x
            acc += g / s
            window = math.ceil(t / s)
            m = b1 * m_hat + (1 - b1) * g
            v = b2 * v_hat + (1 - b2) * g * g
            x -= lr * (m / (1 - b1**window)) / (math.sqrt(v) / math.sqrt(1 - b2**window) + eps)
            if t % s == 0:
                m_hat = b1 * m_hat + (1 - b1) * acc
                v_hat = b2 * v_hat + (1 - b2) * acc * acc
                acc = 0.0
        out.append(x)
    return out


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_accum_adam_matches_the_hand_computed_update(steps: int) -> None:
    ours = run(AccumAdam, steps, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, accum_iter=3)
    expected = hand_reference(steps, s=3, lr=0.1, b1=0.9, b2=0.99, eps=1e-8, wd=0.01)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_accumulation_changes_the_trajectory() -> None:
    assert not torch.allclose(run(AccumAdam, 8, accum_iter=4, lr=0.1), run(AccumAdam, 8, accum_iter=1, lr=0.1))


def test_state_round_trips_through_state_dict() -> None:
    x = torch.nn.Parameter(torch.ones(3))
    opt = AccumAdam([x], accum_iter=2)
    for k in range(3):
        x.grad = torch.full((3,), float(k + 1))
        opt.step()
    clone = AccumAdam([torch.nn.Parameter(x.detach().clone())], accum_iter=2)
    clone.load_state_dict(opt.state_dict())
    state = clone.state[clone.param_groups[0]["params"][0]]
    assert state["step"] == 3
    torch.testing.assert_close(state["grad_sum"], torch.full((3,), 1.5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"accum_iter": 0}, "accum_iter"), ({"betas": (1.0, 0.9)}, "betas"), ({"lr": -1.0}, "lr")],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccumAdam([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_weight_decay_groups_exempt_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.Embedding(3, 8))
    decayed, exempt = weight_decay_groups(model)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert exempt["weight_decay"] == 0.0
    assert {id(p) for p in exempt["params"]} == {
        id(p)
        for m in (model[0], model[1], model[2])
        for n, p in m.named_parameters()
        if n != "weight" or m is not model[0]
    }
    opt = torch.optim.AdamW(weight_decay_groups(model), weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
