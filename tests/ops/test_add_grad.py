"""add_grad: add a multiple of the raw gradient (in the current basis) to the update.

The expected values are written here from the op's docstring, per parameter, in float64.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl
from tests.conftest import assert_close_where_defined

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (3, 4), (5,), ()]


def _grads(seed: int, n: int, shapes=SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(n)]


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g), "add_grad must not write into the gradient"
    return [b - p for b, p in zip(before, params)]


def _build(pipeline: str, shapes=SHAPES, **args):
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    return soapdsl.build(pipeline, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0, **args), params


@pytest.mark.parametrize("coef", [0.1, -2.5, 0.0])
def test_adds_gradient_to_a_state_buffer(coef: float) -> None:
    """momentum hands over its buffer (not owned): the sum is a new tensor, the buffer is untouched."""
    beta = 0.9
    opt, params = _build(f"momentum({beta}) |> add_grad({coef})")
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for gs in _grads(0, 4):
        for i, (p, g, u) in enumerate(zip(params, gs, _step(opt, params, gs))):
            ms[i] = beta * ms[i] + (1 - beta) * g
            torch.testing.assert_close(u, ms[i] + coef * g, **TOL)
            torch.testing.assert_close(opt.state[p]["0.momentum.buf"], ms[i], **TOL)


def test_adds_gradient_to_an_owned_value() -> None:
    """After sign (a fresh tensor) the sum is taken in place."""
    opt, params = _build("sign |> add_grad(0.5)")
    for gs in _grads(1, 2):
        for g, u in zip(gs, _step(opt, params, gs)):
            torch.testing.assert_close(u, torch.sign(g) + 0.5 * g, **TOL)


def test_default_coef_is_one() -> None:
    opt, params = _build("scale(0.0) |> add_grad")
    for gs in _grads(2, 2):
        for g, u in zip(gs, _step(opt, params, gs)):
            torch.testing.assert_close(u, g, **TOL)


def test_pending_scale_applies_to_the_update_only() -> None:
    """A host-side factor before the stage scales the update, not the added gradient."""
    opt, params = _build("scale(2.0) |> add_grad(1.0) |> scale(-1.0)")
    for gs in _grads(3, 2):
        for g, u in zip(gs, _step(opt, params, gs)):
            torch.testing.assert_close(u, -(2.0 * g + g), **TOL)


def test_disabled_is_identity() -> None:
    a, pa = _build("momentum(0.9) |> add_grad(5.0, enabled=false)")
    b, pb = _build("momentum(0.9)")
    for gs in _grads(4, 3):
        for x, y in zip(_step(a, pa, gs), _step(b, pb, gs)):
            assert torch.equal(x, y)


def test_inside_rotate_adds_the_rotated_gradient() -> None:
    """SOAP-Muon's Nesterov term: m + (1 - b1) g in the rotated basis, with sign making the basis
    matter (a linear block would not show which gradient was added)."""
    b1 = 0.95
    shape = (5, 4)
    opt, params = _build(f"momentum({b1}) |> rotate(both, freq=100) {{ add_grad({1 - b1}) |> sign }}", [shape])
    (p,) = params
    m = torch.zeros(shape, dtype=torch.float64)
    for (g,) in _grads(5, 3, [shape]):
        (u,) = _step(opt, params, [g])
        m = b1 * m + (1 - b1) * g
        ql, qr = opt.state[p]["1.rotate.Q0"], opt.state[p]["1.rotate.Q1"]
        want = ql @ torch.sign(ql.T @ m @ qr + (1 - b1) * (ql.T @ g @ qr)) @ qr.T
        assert_close_where_defined(u, want, {0: ql, 1: qr}, m + (1 - b1) * g, **TOL)
        unrotated = ql @ torch.sign(ql.T @ m @ qr + (1 - b1) * g) @ qr.T  # what adding the raw g would give
        assert not torch.allclose(u, unrotated)


def test_coef_follows_recipe_parameter() -> None:
    """coef read from the param_group at every step, directly or through an expression."""
    for pipeline, key, values, coefs in [
        ("sign |> add_grad(c)", "c", [0.1, 0.1, -0.3, -0.3], [0.1, 0.1, -0.3, -0.3]),
        ("sign |> add_grad(1 - b)", "b", [0.9, 0.5, 0.5, 0.0], [0.1, 0.5, 0.5, 1.0]),
    ]:
        opt, params = _build(pipeline, **{key: values[0]})
        for value, coef, gs in zip(values, coefs, _grads(6, 4)):
            opt.param_groups[0][key] = value
            for g, u in zip(gs, _step(opt, params, gs)):
                torch.testing.assert_close(u, torch.sign(g) + coef * g, **TOL)
