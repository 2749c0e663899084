"""rms_normalize: divide the update by the root of the raw gradient's second moment.

Every expected value is computed by a plain loop written here from the op's docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (6,)]


def _tensors(seed: int, n: int, shapes: list[tuple[int, ...]] = SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(n)]


def _normalize(x, v, t, beta, eps, eps_at, correct):
    c = 1 - beta**t if correct else 1.0
    if eps_at == "corrected":
        return x / (v.sqrt() / math.sqrt(c) + eps)
    return math.sqrt(c) * x / (v.sqrt() + eps)


def _step(opt, params, gs):
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    return [b - p for b, p in zip(before, params)]


@pytest.mark.parametrize("correct", [True, False])
@pytest.mark.parametrize("eps_at", ["corrected", "raw"])
def test_matches_reference(eps_at: str, correct: bool) -> None:
    beta, eps = 0.9, 0.1  # a large eps makes its placement visible
    (params,) = _tensors(0, 1)
    grads = _tensors(1, 6)
    flag = "true" if correct else "false"
    opt = soapdsl.build(f"rms_normalize({beta}, {eps}, eps_at={eps_at}, correct={flag}) |> lr", params, lr=1.0)
    vs = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        updates = _step(opt, params, gs)
        for i, (p, g, u) in enumerate(zip(params, gs, updates)):
            vs[i] = beta * vs[i] + (1 - beta) * g * g
            torch.testing.assert_close(u, _normalize(g, vs[i], t, beta, eps, eps_at, correct), **TOL)
            torch.testing.assert_close(opt.state[p]["0.rms_normalize.v"], vs[i], **TOL)


@pytest.mark.parametrize("before", ["sign", "momentum(0.5)"])
@pytest.mark.parametrize("eps_at", ["corrected", "raw"])
def test_second_moment_is_of_the_raw_gradient(before: str, eps_at: str) -> None:
    """The update (here sign(g) or a momentum) is divided by the root of the *gradient's* moment."""
    beta, eps = 0.8, 1e-3
    (params,) = _tensors(2, 1)
    grads = _tensors(3, 5)
    opt = soapdsl.build(f"{before} |> rms_normalize({beta}, {eps}, eps_at={eps_at}) |> lr", params, lr=1.0)
    vs = [torch.zeros_like(p) for p in params]
    ms = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        updates = _step(opt, params, gs)
        for i, (g, u) in enumerate(zip(gs, updates)):
            vs[i] = beta * vs[i] + (1 - beta) * g * g
            ms[i] = 0.5 * ms[i] + 0.5 * g
            x = torch.sign(g) if before == "sign" else ms[i]
            torch.testing.assert_close(u, _normalize(x, vs[i], t, beta, eps, eps_at, True), **TOL)
        if before != "sign":  # the momentum buffer handed to rms_normalize is not overwritten
            for p, m in zip(params, ms):
                torch.testing.assert_close(opt.state[p]["0.momentum.buf"], m, **TOL)


def test_adam_direction_equals_torch_adam() -> None:
    """momentum |> rms_normalize |> bias_correct is torch.optim.Adam (eps on the corrected root)."""
    (params,) = _tensors(4, 1)
    ref = [p.clone() for p in params]
    grads = _tensors(5, 8)
    opt = soapdsl.build("momentum(0.9) |> rms_normalize(0.99, 1e-3) |> bias_correct(0.9) |> lr", params, lr=0.01)
    torch_opt = torch.optim.Adam(ref, lr=0.01, betas=(0.9, 0.99), eps=1e-3, foreach=False)
    for gs in grads:
        for p, q, g in zip(params, ref, gs):
            p.grad = g.clone()
            q.grad = g.clone()
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)


def test_beta_and_eps_follow_recipe_parameters() -> None:
    (params,) = _tensors(6, 1)
    grads = _tensors(7, 6)
    opt = soapdsl.build("rms_normalize(b, e) |> lr", params, lr=1.0, b=0.9, e=0.1)
    vs = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        beta, eps = (0.9, 0.1) if t <= 3 else (0.5, 0.01)
        opt.param_groups[0]["b"] = beta
        opt.param_groups[0]["e"] = eps
        updates = _step(opt, params, gs)
        for i, (g, u) in enumerate(zip(gs, updates)):
            vs[i] = beta * vs[i] + (1 - beta) * g * g
            torch.testing.assert_close(u, _normalize(g, vs[i], t, beta, eps, "corrected", True), **TOL)


def test_gradient_left_untouched() -> None:
    (params,) = _tensors(8, 1)
    (gs,) = _tensors(9, 1)
    opt = soapdsl.build("rms_normalize(0.9) |> lr", params, lr=1.0)
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g)
