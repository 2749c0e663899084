"""decay: decoupled weight decay of the parameter, before or after the update is applied.

Every expected value is computed by a plain loop written here from the op's docstring, and the
AdamW composition is compared with torch.optim.AdamW.
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


def _set_grads(params, gs) -> None:
    for p, g in zip(params, gs):
        p.grad = g.clone()


@pytest.mark.parametrize("lr_scaled", [True, False])
@pytest.mark.parametrize("where", ["before", "after"])
def test_matches_reference(where: str, lr_scaled: bool) -> None:
    lr, wd = 0.1, 0.3
    (params,) = _tensors(0, 1)
    ref = [p.clone() for p in params]
    stage = f"decay({wd}, lr_scaled={'true' if lr_scaled else 'false'})"
    recipe = f"{stage} |> lr" if where == "before" else f"lr |> {stage}"
    opt = soapdsl.build(recipe, params, lr=lr)
    rate = lr * wd if lr_scaled else wd
    for gs in _tensors(1, 5):
        _set_grads(params, gs)
        opt.step()
        for i, g in enumerate(gs):
            if where == "before":
                ref[i] = ref[i] * (1 - rate) - lr * g
            else:
                ref[i] = (ref[i] - lr * g) * (1 - rate)
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)


def test_follows_the_group_lr_and_a_recipe_parameter() -> None:
    """The rate uses the param_group's current lr (schedulers) and weight_decay (recipe parameter)."""
    (params,) = _tensors(2, 1)
    ref = [p.clone() for p in params]
    opt = soapdsl.build("decay(w) |> lr", params, lr=0.1, w=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    for k, gs in enumerate(_tensors(3, 6)):
        wd = 0.5 if k < 3 else 0.2
        opt.param_groups[0]["w"] = wd
        lr = 0.1 / (1 + k)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        _set_grads(params, gs)
        opt.step()
        sched.step()
        ref = [q * (1 - lr * wd) - lr * g for q, g in zip(ref, gs)]
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("recipe", ["decay(0) |> lr", "lr |> decay(0)", "decay(w) |> lr"])
def test_skipped_when_zero(recipe: str) -> None:
    """A zero rate writes nothing: the parameter's version counter moves only for the update."""
    (params,) = _tensors(4, 1)
    plain = [p.clone() for p in params]
    opt = soapdsl.build(recipe, params, lr=0.1, **({"w": 0.0} if "(w)" in recipe else {}))
    opt_plain = soapdsl.build("lr", plain, lr=0.1)
    for gs in _tensors(5, 3):
        _set_grads(params, gs)
        _set_grads(plain, gs)
        versions = [p._version for p in params]
        versions_plain = [p._version for p in plain]
        opt.step()
        opt_plain.step()
        for p, q, v, vq in zip(params, plain, versions, versions_plain):
            assert torch.equal(p, q)
            assert p._version - v == q._version - vq


def test_decay_is_not_added_to_the_update() -> None:
    """Decoupled: a momentum after decay sees the gradient only."""
    (params,) = _tensors(6, 1)
    opt = soapdsl.build("decay(0.5) |> momentum(0.9) |> lr", params, lr=0.1)
    ms = [torch.zeros_like(p) for p in params]
    for gs in _tensors(7, 3):
        _set_grads(params, gs)
        opt.step()
        ms = [0.9 * m + 0.1 * g for m, g in zip(ms, gs)]
        for p, m in zip(params, ms):
            torch.testing.assert_close(opt.state[p]["1.momentum.buf"], m, **TOL)


def test_adam_with_decay_first_equals_torch_adamw() -> None:
    (params,) = _tensors(8, 1)
    ref = [p.clone() for p in params]
    opt = soapdsl.build(
        "decay(0.1) |> momentum(0.9) |> rms_normalize(0.999, 1e-8) |> bias_correct(0.9) |> lr", params, lr=0.01
    )
    torch_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for gs in _tensors(9, 8):
        _set_grads(params, gs)
        _set_grads(ref, gs)
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL)
