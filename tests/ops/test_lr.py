"""lr: p <- p - lr * x, with lr read from the route's param_group and pending factors folded in.

Every expected value is computed by a plain loop written here from the op's docstring.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(3, 4), (5,), ()]


def _tensors(seed: int, n: int, dtype=torch.float64) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(n)]


def _set_grads(params, gs) -> None:
    for p, g in zip(params, gs):
        p.grad = g.clone()


def test_applies_the_update_with_the_group_lr() -> None:
    """A scheduler (or a user) changing param_groups[0]['lr'] changes the step."""
    (params,) = _tensors(0, 1)
    ref = [p.clone() for p in params]
    opt = soapdsl.build("lr", params, lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for k, gs in enumerate(_tensors(1, 6)):
        lr = 0.5 * 0.1 ** (k // 2)
        _set_grads(params, gs)
        opt.step()
        sched.step()
        ref = [q - lr * g for q, g in zip(ref, gs)]
        for p, q, g in zip(params, ref, gs):
            torch.testing.assert_close(p, q, **TOL)
            assert torch.equal(p.grad, g)


def test_implicit_lr_is_appended() -> None:
    (params,) = _tensors(2, 1)
    explicit = [p.clone() for p in params]
    opt = soapdsl.build("sign", params, lr=0.1)
    opt_explicit = soapdsl.build("sign |> lr", explicit, lr=0.1)
    for gs in _tensors(3, 3):
        _set_grads(params, gs)
        _set_grads(explicit, gs)
        opt.step()
        opt_explicit.step()
        for p, q in zip(params, explicit):
            assert torch.equal(p, q)


def test_folds_pending_factors() -> None:
    (params,) = _tensors(4, 1)
    ref = [p.clone() for p in params]
    opt = soapdsl.build("scale(0.5) |> bias_correct(0.9, 0.99) |> lr", params, lr=0.2)
    for t, gs in enumerate(_tensors(5, 4), start=1):
        _set_grads(params, gs)
        opt.step()
        factor = 0.2 * 0.5 * (1 - 0.99**t) ** 0.5 / (1 - 0.9**t)
        ref = [q - factor * g for q, g in zip(ref, gs)]
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)


def test_applied_only_once() -> None:
    with pytest.raises(soapdsl.SoapRecipeError, match="applied twice"):
        soapdsl.build("lr |> sign |> lr", [torch.zeros(3)], lr=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_parameters(dtype: torch.dtype) -> None:
    """The update (fp32 state) is written into the parameter in the parameter's dtype."""
    (params,) = _tensors(6, 1, dtype)
    ref = [p.double() for p in params]
    opt = soapdsl.build("momentum(0.9) |> lr", params, lr=0.1)
    ms = [torch.zeros_like(q) for q in ref]
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for gs in _tensors(7, 3, dtype):
        _set_grads(params, gs)
        opt.step()
        ms = [0.9 * m + 0.1 * g.double() for m, g in zip(ms, gs)]
        ref = [q - 0.1 * m for q, m in zip(ref, ms)]
        for p, q in zip(params, ref):
            assert p.dtype == dtype
            torch.testing.assert_close(p.double(), q, **tol)
