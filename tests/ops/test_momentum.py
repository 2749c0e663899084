"""momentum: EMA or SGD accumulation of the update, with and without the Nesterov look-ahead.

Every expected value is computed by a plain loop written here from the op's docstring.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (5,)]
STEPS = 5


def _grads(seed: int, steps: int = STEPS, shapes: list[tuple[int, ...]] = SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def _params(seed: int, shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _reference(grads: list[list[torch.Tensor]], beta: float, kind: str, nesterov: bool):
    """Updates and buffers of momentum, one list per step."""
    bufs = [torch.zeros_like(g) for g in grads[0]]
    updates, states = [], []
    for gs in grads:
        outs = []
        for i, g in enumerate(gs):
            if kind == "ema":
                bufs[i] = beta * bufs[i] + (1 - beta) * g
                out = (1 - beta) * g + beta * bufs[i] if nesterov else bufs[i]
            else:
                bufs[i] = beta * bufs[i] + g
                out = g + beta * bufs[i] if nesterov else bufs[i]
            outs.append(out)
        updates.append(outs)
        states.append([b.clone() for b in bufs])
    return updates, states


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("kind", ["ema", "sgd"])
def test_matches_reference(kind: str, nesterov: bool) -> None:
    beta = 0.9
    params = _params(0)
    grads = _grads(1)
    flag = "true" if nesterov else "false"
    opt = soapdsl.build(
        f"momentum({beta}, nesterov={flag}, kind={kind}) |> lr",
        [(f"p{i}", p) for i, p in enumerate(params)],
        lr=1.0,
    )
    expected_updates, expected_bufs = _reference(grads, beta, kind, nesterov)
    for gs, want_u, want_b in zip(grads, expected_updates, expected_bufs):
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, b, g, u, buf in zip(params, before, gs, want_u, want_b):
            torch.testing.assert_close(b - p, u, **TOL)
            torch.testing.assert_close(opt.state[p]["0.momentum.buf"], buf, **TOL)
            assert torch.equal(p.grad, g), "momentum must not write into the gradient"


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_kind_equals_torch_sgd(nesterov: bool) -> None:
    params = _params(2)
    ref = [p.clone() for p in params]
    grads = _grads(3, steps=6)
    flag = "true" if nesterov else "false"
    opt = soapdsl.build(f"momentum(0.8, nesterov={flag}, kind=sgd) |> lr", params, lr=0.05)
    torch_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.8, nesterov=nesterov)
    for gs in grads:
        for p, q, g in zip(params, ref, gs):
            p.grad = g.clone()
            q.grad = g.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)


def test_beta_follows_recipe_parameter() -> None:
    """`beta` given a recipe parameter is read from the param_group at every step."""
    params = _params(4)
    grads = _grads(5, steps=6)
    opt = soapdsl.build("momentum(b) |> lr", params, lr=1.0, b=0.9)
    bufs = [torch.zeros_like(p) for p in params]
    for step, gs in enumerate(grads):
        beta = 0.9 if step < 3 else 0.3
        opt.param_groups[0]["b"] = beta
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for i, (p, b, g) in enumerate(zip(params, before, gs)):
            bufs[i] = beta * bufs[i] + (1 - beta) * g
            torch.testing.assert_close(b - p, bufs[i], **TOL)


def test_float32_state_and_update() -> None:
    p = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    grads = [torch.randn(4, 3, generator=torch.Generator().manual_seed(7 + i)) for i in range(3)]
    opt = soapdsl.build("momentum(0.9, nesterov=true) |> lr", [p], lr=1.0)
    buf = torch.zeros(4, 3, dtype=torch.float64)
    for g in grads:
        before = p.clone()
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g.double()
        want = 0.1 * g.double() + 0.9 * buf
        assert p.dtype == torch.float32
        assert opt.state[p]["0.momentum.buf"].dtype == torch.float32
        torch.testing.assert_close((before - p).double(), want, rtol=1e-5, atol=1e-6)
