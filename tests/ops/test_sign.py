"""sign: elementwise sign of the update (0 where it is 0).

Every expected value is computed here with torch.sign on plain tensors.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (5,)]


def _tensors(seed: int, n: int) -> list[list[torch.Tensor]]:
    """Random tensors with some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ts = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for t in ts:
            t.view(-1)[::3] = 0.0
        out.append(ts)
    return out


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    return [b - p for b, p in zip(before, params)]


def test_sign_of_the_gradient() -> None:
    (params,) = _tensors(0, 1)
    opt = soapdsl.build("sign |> lr", params, lr=1.0)
    for gs in _tensors(1, 3):
        for p, u, g in zip(params, _step(opt, params, gs), gs):
            torch.testing.assert_close(u, torch.sign(g), **TOL)
            assert bool((u[g == 0] == 0).all())
            assert torch.equal(p.grad, g), "sign must not write into the gradient"


@pytest.mark.parametrize("nesterov", [False, True])
def test_sign_of_a_momentum(nesterov: bool) -> None:
    """Lion-like: sign of the momentum (or its look-ahead); the buffer itself stays unsigned."""
    (params,) = _tensors(2, 1)
    opt = soapdsl.build(f"momentum(0.9, nesterov={'true' if nesterov else 'false'}) |> sign |> lr", params, lr=1.0)
    ms = [torch.zeros_like(p) for p in params]
    for gs in _tensors(3, 4):
        updates = _step(opt, params, gs)
        ms = [0.9 * m + 0.1 * g for m, g in zip(ms, gs)]
        for p, u, m, g in zip(params, updates, ms, gs):
            look = 0.1 * g + 0.9 * m if nesterov else m
            torch.testing.assert_close(u, torch.sign(look), **TOL)
            torch.testing.assert_close(opt.state[p]["0.momentum.buf"], m, **TOL)


def test_scaled_sign() -> None:
    (params,) = _tensors(4, 1)
    opt = soapdsl.build("sign |> scale(0.1) |> lr", params, lr=2.0)
    for gs in _tensors(5, 2):
        for u, g in zip(_step(opt, params, gs), gs):
            torch.testing.assert_close(u, 0.2 * torch.sign(g), **TOL)
