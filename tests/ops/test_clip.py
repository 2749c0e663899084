"""clip: rescale the update to norm at most max_norm, per parameter or over the whole route.

The expected values follow torch.nn.utils.clip_grad_norm_, applied to copies of the gradients
(per parameter for per=tensor, to all of them together for per=route), and a hand-written
formula for a custom eps.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapArgumentError

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (7,), ()]


def _grads(seed: int, n: int, shapes=SHAPES) -> list[list[torch.Tensor]]:
    """Gradients whose norms straddle the bound: some steps are clipped, some are not."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = (0.05, 1.0, 3.0)[i % 3]
        out.append([size * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes])
    return out


def _params(seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _clip_torch(gs: list[torch.Tensor], max_norm: float, per: str) -> list[torch.Tensor]:
    ts = [g.clone().requires_grad_() for g in gs]
    for t, g in zip(ts, gs):
        t.grad = g.clone()
    if per == "route":
        torch.nn.utils.clip_grad_norm_(ts, max_norm)
    else:
        for t in ts:
            torch.nn.utils.clip_grad_norm_([t], max_norm)
    return [t.grad for t in ts]


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    return [b - p for b, p in zip(before, params)]


@pytest.mark.parametrize("per", ["tensor", "route"])
def test_matches_clip_grad_norm(per: str) -> None:
    max_norm = 1.5
    params = _params(0)
    opt = soapdsl.build(f"clip({max_norm}, per={per}) |> lr", params, lr=1.0)
    for gs in _grads(1, 6):
        updates = _step(opt, params, gs)
        for u, want, p, g in zip(updates, _clip_torch(gs, max_norm, per), params, gs):
            torch.testing.assert_close(u, want, **TOL)
            assert torch.equal(p.grad, g), "clip must not write into the gradient"


@pytest.mark.parametrize("per", ["tensor", "route"])
def test_custom_eps(per: str) -> None:
    max_norm, eps = 1.0, 0.5
    params = _params(2)
    opt = soapdsl.build(f"clip({max_norm}, per={per}, eps={eps}) |> lr", params, lr=1.0)
    for gs in _grads(3, 6):
        updates = _step(opt, params, gs)
        if per == "route":
            total = sum(float(g.square().sum()) for g in gs) ** 0.5
            coefs = [min(1.0, max_norm / (total + eps))] * len(gs)
        else:
            coefs = [min(1.0, max_norm / (float(g.norm()) + eps)) for g in gs]
        for u, g, c in zip(updates, gs, coefs):
            torch.testing.assert_close(u, c * g, **TOL)


@pytest.mark.parametrize("per", ["tensor", "route"])
def test_stacked_buckets(per: str) -> None:
    """In a batched route (stacked same-shape parameters, two shapes) the norms stay per parameter
    (per=tensor) or span every bucket (per=route). The clipped value is read from a momentum buffer
    (kind=sgd, beta=0 stores its input)."""
    shapes = [(4, 5), (4, 5), (4, 5), (3, 3), (3, 3)]
    max_norm = 2.0
    params = _params(4, shapes)
    opt = soapdsl.build(
        f"clip({max_norm}, per={per}) |> momentum(0, kind=sgd) |> newton_schulz(1) |> lr", params, lr=0.1
    )
    for gs in _grads(5, 3, shapes):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, want in zip(params, _clip_torch(gs, max_norm, per)):
            torch.testing.assert_close(opt.state[p]["1.momentum.buf"], want, **TOL)


def test_max_norm_follows_recipe_parameter() -> None:
    params = _params(6)
    opt = soapdsl.build("clip(m, per=route) |> lr", params, lr=1.0, m=2.0)
    for i, gs in enumerate(_grads(7, 6)):
        max_norm = 2.0 if i < 3 else 0.1
        opt.param_groups[0]["m"] = max_norm
        updates = _step(opt, params, gs)
        for u, want in zip(updates, _clip_torch(gs, max_norm, "route")):
            torch.testing.assert_close(u, want, **TOL)


def test_clips_the_update_not_the_gradient() -> None:
    """After momentum, the norm is the momentum's; the momentum buffer itself is left as it is."""
    params = _params(8)
    opt = soapdsl.build("momentum(0.5) |> clip(0.2) |> lr", params, lr=1.0)
    ms = [torch.zeros_like(p) for p in params]
    for gs in _grads(9, 4):
        updates = _step(opt, params, gs)
        ms = [0.5 * m + 0.5 * g for m, g in zip(ms, gs)]
        for p, u, want, m in zip(params, updates, _clip_torch(ms, 0.2, "tensor"), ms):
            torch.testing.assert_close(u, want, **TOL)
            torch.testing.assert_close(opt.state[p]["0.momentum.buf"], m, **TOL)


def test_per_route_refuses_parameters_with_different_step_counts() -> None:
    """A route-wide norm over parameters that took different numbers of steps would be partial:
    soapdsl refuses it with a located error instead of computing wrong numbers."""
    a, b = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    opt = soapdsl.build("clip(1.0, per=route) |> lr", [a, b], lr=1.0)
    a.grad = torch.ones(3, dtype=torch.float64)
    opt.step()  # b has no gradient: from now on a and b have taken different numbers of steps
    a.grad = torch.full((3,), 3.0, dtype=torch.float64)
    b.grad = torch.full((3,), 4.0, dtype=torch.float64)
    with pytest.raises(SoapArgumentError, match=r"reduces over all parameters.*different numbers of steps"):
        opt.step()


def test_per_route_step_without_a_gradient_takes_the_norm_of_those_present() -> None:
    """operators.md: a step that lacks a parameter's gradient clips by the norm of the gradients
    present, as clip_grad_norm_ skips a parameter whose .grad is None (the error comes later)."""
    a, b = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    opt = soapdsl.build("clip(1.0, per=route) |> lr", [a, b], lr=1.0)
    a.grad = torch.full((3,), 2.0, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(a, -a.grad / (a.grad.norm() + 1e-6))
    assert torch.equal(b, torch.zeros(3, dtype=torch.float64))
