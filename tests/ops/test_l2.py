"""l2: coupled L2 regularisation, added to the update and to the raw gradient later stages see.

Every expected value is computed by a plain loop written here from the op's docstring, and the
Adam composition is compared with torch.optim.Adam(weight_decay=...).
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (5,)]


def _tensors(seed: int, n: int, shapes=SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(n)]


def _step(opt, params, gs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step once; return (parameters before, updates)."""
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    return before, [b - p for b, p in zip(before, params)]


def test_adds_the_decay_term_to_the_update() -> None:
    wd = 0.3
    (params,) = _tensors(0, 1)
    opt = soapdsl.build(f"l2({wd}) |> lr", params, lr=1.0)
    for gs in _tensors(1, 4):
        before, updates = _step(opt, params, gs)
        for p, q, g, u in zip(params, before, gs, updates):
            torch.testing.assert_close(u, g + wd * q, **TOL)
            assert torch.equal(p.grad, g), "l2 must not write into the gradient"


def test_adam_with_l2_equals_torch_adam() -> None:
    wd, b1, b2, eps = 0.1, 0.9, 0.99, 1e-8
    (params,) = _tensors(2, 1)
    ref = [p.clone() for p in params]
    opt = soapdsl.build(
        f"l2({wd}) |> momentum({b1}) |> rms_normalize({b2}, {eps}) |> bias_correct({b1}) |> lr", params, lr=0.01
    )
    torch_opt = torch.optim.Adam(ref, lr=0.01, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
    for gs in _tensors(3, 10):
        _step(opt, params, gs)
        for q, g in zip(ref, gs):
            q.grad = g.clone()
        torch_opt.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)


def test_decay_term_reaches_the_second_moment_when_the_update_is_not_the_gradient() -> None:
    """After sign, l2 adds wd * p to sign(g) and, separately, to the raw g that rms_normalize squares."""
    wd, beta, eps = 0.5, 0.9, 1e-3
    (params,) = _tensors(4, 1)
    opt = soapdsl.build(f"sign |> l2({wd}) |> rms_normalize({beta}, {eps}) |> lr", params, lr=1.0)
    vs = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(_tensors(5, 5), start=1):
        before, updates = _step(opt, params, gs)
        for i, (q, g, u) in enumerate(zip(before, gs, updates)):
            g2 = g + wd * q
            vs[i] = beta * vs[i] + (1 - beta) * g2 * g2
            x = torch.sign(g) + wd * q
            want = x / (vs[i].sqrt() / (1 - beta**t) ** 0.5 + eps)
            torch.testing.assert_close(u, want, **TOL)


@pytest.mark.parametrize("recipe", ["l2(0) |> momentum(0.9) |> lr", "l2(w) |> momentum(0.9) |> lr"])
def test_skipped_when_zero(recipe: str) -> None:
    (params,) = _tensors(6, 1)
    plain = [p.clone() for p in params]
    opt = soapdsl.build(recipe, params, lr=0.1, **({"w": 0.0} if "(w)" in recipe else {}))
    opt_plain = soapdsl.build("momentum(0.9) |> lr", plain, lr=0.1)
    for gs in _tensors(7, 3):
        _step(opt, params, gs)
        _step(opt_plain, plain, gs)
        for p, q in zip(params, plain):
            assert torch.equal(p, q)


def test_weight_decay_follows_recipe_parameter() -> None:
    (params,) = _tensors(8, 1)
    opt = soapdsl.build("l2(w) |> lr", params, lr=1.0, w=0.5)
    for k, gs in enumerate(_tensors(9, 4)):
        wd = 0.5 if k < 2 else 0.05
        opt.param_groups[0]["w"] = wd
        before, updates = _step(opt, params, gs)
        for q, g, u in zip(before, gs, updates):
            torch.testing.assert_close(u, g + wd * q, **TOL)


def test_stacked_route_uses_each_parameter() -> None:
    """In a batched route the decay term is each stacked parameter's own (read from a momentum
    buffer with kind=sgd, beta=0, which stores its input)."""
    shapes = [(4, 3)] * 3
    wd = 0.25
    (params,) = _tensors(10, 1, shapes)
    opt = soapdsl.build(f"l2({wd}) |> momentum(0, kind=sgd) |> newton_schulz(1) |> lr", params, lr=0.1)
    for gs in _tensors(11, 3, shapes):
        before, _ = _step(opt, params, gs)
        for p, q, g in zip(params, before, gs):
            torch.testing.assert_close(opt.state[p]["1.momentum.buf"], g + wd * q, **TOL)
            assert torch.equal(p.grad, g)
