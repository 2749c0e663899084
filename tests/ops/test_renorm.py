"""renorm: per-parameter normalisation of the update to unit RMS or unit Frobenius norm.

The expected values are written here from the op's docstring, per parameter, in float64, with a
visible eps so its place in the formula shows. Gradients of very different sizes per parameter
make a norm over the wrong set of parameters visible.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
STACKED = [(4, 6), (4, 6), (6, 4), (2, 3, 4)]
LOOSE = [(4, 6), (7,), (), (2, 3, 4)]


def _grads(seed: int, n: int, shapes) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 1) for i, s in enumerate(shapes)]
        for _ in range(n)
    ]


def _renorm(x: torch.Tensor, target: str, eps: float) -> torch.Tensor:
    n = x.norm()
    if target == "rms":
        n = n / math.sqrt(x.numel())
    return x / (eps + n)


def _run(recipe: str, shapes, seed: int, steps: int = 2):
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build(recipe, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0)
    out = []
    for gs in _grads(seed, steps, shapes):
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g), "renorm must not write into the gradient"
        out.append((gs, [b - p for b, p in zip(before, params)]))
    return opt, out


@pytest.mark.parametrize("eps", [1e-30, 0.5])
@pytest.mark.parametrize("target", ["rms", "fro"])
def test_stacked_matches_reference(target: str, eps: float) -> None:
    """Per parameter inside stacked buckets (shape_scale(none): a matrix op that changes nothing)."""
    opt, steps = _run(f"momentum(0.5) |> renorm({target}, eps={eps}) |> shape_scale(none) |> lr", STACKED, 0, 3)
    assert opt.plan.routes[0].batched
    ms = [torch.zeros(s, dtype=torch.float64) for s in STACKED]
    for gs, updates in steps:
        for i, (g, u) in enumerate(zip(gs, updates)):
            ms[i] = 0.5 * ms[i] + 0.5 * g
            torch.testing.assert_close(u, _renorm(ms[i], target, eps), **TOL)
    for p, m in zip(opt.param_groups[0]["params"], ms):  # the buffer handed to renorm is not overwritten
        torch.testing.assert_close(opt.state[p]["0.momentum.buf"], m, **TOL)


@pytest.mark.parametrize("target", ["rms", "fro"])
def test_vectors_and_scalars(target: str) -> None:
    _, steps = _run(f"renorm({target}, eps=0.25) |> lr", LOOSE, 1)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _renorm(g, target, 0.25), **TOL)


def test_default_is_unit_rms() -> None:
    """renorm = renorm(rms, eps=1e-30): SOAP's normalize_grads, U / (1e-30 + RMS(U))."""
    _, steps = _run("sign |> scale(3.0) |> renorm |> lr", LOOSE, 2, 1)
    for _, updates in steps:
        for u in updates:
            assert math.isclose(float(u.norm()) / math.sqrt(u.numel()), 1.0, rel_tol=1e-12)


def test_disabled_is_identity() -> None:
    _, a = _run("momentum(0.5) |> renorm(fro, enabled=false) |> lr", LOOSE, 3)
    _, b = _run("momentum(0.5) |> lr", LOOSE, 3)
    for (_, ua), (_, ub) in zip(a, b):
        for x, y in zip(ua, ub):
            assert torch.equal(x, y)


def test_positive_pending_scale_is_dropped() -> None:
    """Without eps the result does not depend on a positive factor before the stage."""
    _, a = _run("sign |> scale(7.0) |> renorm(fro, eps=0.0) |> lr", STACKED, 4)
    _, b = _run("sign |> renorm(fro, eps=0.0) |> lr", STACKED, 4)
    for (_, ua), (_, ub) in zip(a, b):
        for x, y in zip(ua, ub):
            torch.testing.assert_close(x, y, **TOL)


def test_negative_pending_scale_flips() -> None:
    _, steps = _run("scale(-2.0) |> renorm(rms) |> lr", STACKED, 5)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, -_renorm(g, "rms", 0.0), **TOL)


def test_disabled_keeps_a_pending_scale() -> None:
    _, steps = _run("scale(2.0) |> renorm(rms, enabled=false) |> lr", LOOSE, 6, 1)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, 2.0 * g, **TOL)


def test_eps_sees_a_pending_scale() -> None:
    """out = x / (eps + ||x||) of the stage's input 2g, per the docstring."""
    _, steps = _run("scale(2.0) |> renorm(fro, eps=1.0) |> lr", LOOSE, 7, 1)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _renorm(2.0 * g, "fro", 1.0), **TOL)


def test_zero_update_with_default_eps() -> None:
    p = torch.zeros(3, 4, dtype=torch.float64)
    opt = soapdsl.build("renorm |> lr", [p], lr=1.0)
    p.grad = torch.zeros(3, 4, dtype=torch.float64)
    opt.step()
    assert torch.count_nonzero(p) == 0
