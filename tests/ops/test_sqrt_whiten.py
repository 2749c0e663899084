"""sqrt_whiten: signed elementwise root, then rescale each parameter's update to a target norm.

Expected values are written here from the op's docstring, one parameter at a time, in float64.
Parameters get gradients of very different sizes so a per-route (rather than per-parameter) norm
would show.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapShapeError

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64

STACKED = [(4, 6), (4, 6), (4, 6), (6, 4), (6, 4), (2, 3, 4)]  # with a matrix op: three stacked buckets
LOOSE = [(4, 6), (7,), (), (2, 3, 4)]  # elementwise route: one bucket per parameter


def _grads(seed: int, shapes, n: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
        for _ in range(n)
    ]


def _target(target: str, x: torch.Tensor) -> float:
    shape = tuple(x.shape)
    if target == "input":
        return float(x.norm())
    if target == "unit":
        return 1.0
    if target == "rms":
        return math.sqrt(math.prod(shape))
    return math.sqrt(min(shape[0], math.prod(shape[1:])))  # semi_orthogonal


def _reference(x: torch.Tensor, target: str, power: float) -> torch.Tensor:
    y = torch.sign(x) * x.abs() ** power
    return y / y.norm() * _target(target, x)


def _run(recipe: str, shapes, seed: int, steps: int = 2, **args):
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build(recipe, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0, **args)
    out = []
    for gs in _grads(seed, shapes, steps):
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g), "sqrt_whiten must not write into the gradient"
        out.append((gs, [b - p for b, p in zip(before, params)]))
    return opt, out


@pytest.mark.parametrize("power", [0.5, 0.25, 2.0])
@pytest.mark.parametrize("target", ["input", "semi_orthogonal", "unit", "rms"])
def test_stacked_matches_reference(target: str, power: float) -> None:
    """Per parameter inside stacked buckets (shape_scale(none) is a matrix op that changes nothing)."""
    opt, steps = _run(f"sqrt_whiten(target={target}, power={power}) |> shape_scale(none) |> lr", STACKED, 0)
    assert opt.plan.routes[0].batched
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _reference(g, target, power), **TOL)
            assert math.isclose(float(u.norm()), _target(target, g), rel_tol=1e-12)


@pytest.mark.parametrize("target", ["input", "unit", "rms"])
def test_unbatched_shapes_match_reference(target: str) -> None:
    """Vectors, 0-d and 3-D parameters in an elementwise route."""
    opt, steps = _run(f"sqrt_whiten(target={target}) |> lr", LOOSE, 1)
    assert not opt.plan.routes[0].batched
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _reference(g, target, 0.5), **TOL)


def test_default_is_square_root_to_input_norm() -> None:
    _, steps = _run("sqrt_whiten |> lr", LOOSE, 2, steps=1)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, torch.sign(g) * g.abs().sqrt() * g.norm() / g.abs().sqrt().norm(), **TOL)


@pytest.mark.parametrize("target", ["input", "unit", "rms", "semi_orthogonal"])
def test_power_one_keeps_direction(target: str) -> None:
    """power=1 only renormalises: out = x / ||x|| * n (for target=input, out = x)."""
    _, steps = _run(f"sqrt_whiten(target={target}, power=1) |> shape_scale(none) |> lr", STACKED, 3)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, g / g.norm() * _target(target, g), **TOL)
            if target == "input":
                torch.testing.assert_close(u, g, **TOL)


def test_semi_orthogonal_norm_of_each_shape() -> None:
    """sqrt(min(m, n)), with n the product of the trailing dims: 4x6 -> 2, 6x4 -> 2, 2x3x4 -> sqrt(2)."""
    _, steps = _run("sqrt_whiten(target=semi_orthogonal) |> shape_scale(none) |> lr", STACKED, 4, steps=1)
    want = [2.0, 2.0, 2.0, 2.0, 2.0, math.sqrt(2.0)]
    for _, updates in steps:
        assert [round(float(u.norm()), 12) for u in updates] == [round(w, 12) for w in want]


def test_input_norm_includes_a_pending_scale() -> None:
    """A host-side factor before the stage is part of the norm it restores."""
    _, steps = _run("scale(3.0) |> sqrt_whiten |> lr", [(4, 6), (5,)], 5)
    for gs, updates in steps:
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _reference(3.0 * g, "input", 0.5), **TOL)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_semi_orthogonal_needs_a_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(SoapShapeError, match=r"semi_orthogonal.*needs a matrix"):
        soapdsl.compile("sqrt_whiten(target=semi_orthogonal)", [("v", torch.zeros(shape))])


def test_zero_update_stays_zero() -> None:
    p = torch.zeros(3, 4, dtype=torch.float64)
    opt = soapdsl.build("sqrt_whiten(target=unit) |> lr", [p], lr=1.0)
    p.grad = torch.zeros(3, 4, dtype=torch.float64)
    opt.step()
    assert torch.count_nonzero(p) == 0


def test_acts_in_the_rotated_basis() -> None:
    """Elementwise, so basis dependent: inside rotate it acts on the rotated coordinates. (A wide
    gradient, so that its left factor has full rank: a null direction would hold rounding noise,
    whose square root is 1e-8-sized and machine dependent.)"""
    p = torch.zeros(4, 5, dtype=torch.float64)
    opt = soapdsl.build("rotate(left, freq=100) { sqrt_whiten } |> lr", [p], lr=1.0)
    ((g,),) = _grads(6, [(4, 5)])
    p.grad = g.clone()
    opt.step()
    q = opt.state[p]["0.rotate.Q0"]
    torch.testing.assert_close(-p, q @ _reference(q.T @ g, "input", 0.5), **TOL)
    assert not torch.allclose(-p, _reference(g, "input", 0.5))


def test_apply_and_float32() -> None:
    """soapdsl.apply on a bare tensor; fp32 in, fp32 out."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 9, generator=gen)
    y = soapdsl.apply("sqrt_whiten(target=semi_orthogonal, power=0.5)", x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x.double(), "semi_orthogonal", 0.5), rtol=1e-5, atol=1e-6)
