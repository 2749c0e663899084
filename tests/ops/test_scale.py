"""scale: multiply the update by a (possibly dynamic) factor, held on the host until needed.

Every expected value is computed by a plain loop written here from the op's docstring.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (5,)]


def _tensors(seed: int, n: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(n)]


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    return [b - p for b, p in zip(before, params)]


@pytest.mark.parametrize("factor", [0.5, 3.0, -2.0])
def test_multiplies_the_update(factor: float) -> None:
    (params,) = _tensors(0, 1)
    opt = soapdsl.build(f"scale({factor}) |> lr", params, lr=1.0)
    for gs in _tensors(1, 3):
        for u, g, p in zip(_step(opt, params, gs), gs, params):
            torch.testing.assert_close(u, factor * g, **TOL)
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize(("stage", "mult"), [("scale(f)", 1.0), ("scale(2 * f)", 2.0)])
def test_follows_a_recipe_parameter_changed_mid_run(stage: str, mult: float) -> None:
    (params,) = _tensors(2, 1)
    opt = soapdsl.build(f"{stage} |> lr", params, lr=1.0, f=0.5)
    for k, gs in enumerate(_tensors(3, 6)):
        f = (0.5, 0.5, 2.0, 2.0, -1.0, 0.25)[k]
        opt.param_groups[0]["f"] = f
        for u, g in zip(_step(opt, params, gs), gs):
            torch.testing.assert_close(u, mult * f * g, **TOL)


def test_applied_before_a_nonlinear_stage() -> None:
    """momentum is not linear in the host factor's sense: its buffer receives factor * g."""
    (params,) = _tensors(4, 1)
    opt = soapdsl.build("scale(0.5) |> momentum(0.9, kind=sgd) |> lr", params, lr=1.0)
    ms = [torch.zeros_like(p) for p in params]
    for gs in _tensors(5, 4):
        updates = _step(opt, params, gs)
        ms = [0.9 * m + 0.5 * g for m, g in zip(ms, gs)]
        for p, u, m in zip(params, updates, ms):
            torch.testing.assert_close(opt.state[p]["1.momentum.buf"], m, **TOL)
            torch.testing.assert_close(u, m, **TOL)


@pytest.mark.parametrize(("factor", "sign"), [(4.0, 1.0), (-2.0, -1.0), (0.0, 0.0)])
def test_before_a_scale_invariant_stage(factor: float, sign: float) -> None:
    """sign(c * x): a positive factor is dropped, a negative or zero one is applied first."""
    (params,) = _tensors(6, 1)
    opt = soapdsl.build(f"scale({factor}) |> sign |> lr", params, lr=1.0)
    for gs in _tensors(7, 2):
        for u, g in zip(_step(opt, params, gs), gs):
            torch.testing.assert_close(u, sign * torch.sign(g), **TOL)


def test_factors_multiply() -> None:
    (params,) = _tensors(8, 1)
    opt = soapdsl.build("scale(0.5) |> scale(-3) |> lr", params, lr=2.0)
    for gs in _tensors(9, 2):
        for u, g in zip(_step(opt, params, gs), gs):
            torch.testing.assert_close(u, 2.0 * 0.5 * -3.0 * g, **TOL)
