"""bias_correct: multiply the update by sqrt(1 - beta2^t) / (1 - beta1^t), t counted from 1.

Every expected value is computed by a plain loop written here from the op's docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(4, 3), (5,)]


def _tensors(seed: int, n: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(n)]


def _run(recipe: str, seed: int, steps: int = 6, **args):
    """Yield (t, grads, updates) for each step of ``recipe`` built with lr=1."""
    (params,) = _tensors(seed, 1)
    grads = _tensors(seed + 1, steps)
    opt = soapdsl.build(recipe, params, lr=1.0, **args)
    for t, gs in enumerate(grads, start=1):
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        yield t, gs, [b - p for b, p in zip(before, params)]


def test_first_moment_correction() -> None:
    b1 = 0.9
    ms = None
    for t, gs, updates in _run(f"momentum({b1}) |> bias_correct({b1}) |> lr", 0):
        ms = [b1 * m + (1 - b1) * g for m, g in zip(ms or [0 * g for g in gs], gs)]
        for m, u in zip(ms, updates):
            torch.testing.assert_close(u, m / (1 - b1**t), **TOL)


@pytest.mark.parametrize(("b1", "b2"), [(0.9, 0.99), (0.0, 0.95), (0.5, 0.0)])
def test_factor_with_beta2(b1: float, b2: float) -> None:
    for t, gs, updates in _run(f"bias_correct({b1}, {b2}) |> lr", 2):
        factor = math.sqrt(1 - b2**t) / (1 - b1**t)
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, factor * g, **TOL)


def test_defaults_are_the_identity() -> None:
    for _, gs, updates in _run("bias_correct |> lr", 4):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, g, **TOL)


def test_soap_style_correction_of_a_raw_root() -> None:
    """SOAP: eps on the raw root, both corrections folded into the step by bias_correct(b1, b2)."""
    b1, b2, eps = 0.9, 0.95, 0.1
    recipe = (
        f"momentum({b1}) |> rms_normalize({b2}, {eps}, eps_at=raw, correct=false) |> bias_correct({b1}, {b2}) |> lr"
    )
    ms = vs = None
    for t, gs, updates in _run(recipe, 6):
        ms = [b1 * m + (1 - b1) * g for m, g in zip(ms or [0 * g for g in gs], gs)]
        vs = [b2 * v + (1 - b2) * g * g for v, g in zip(vs or [0 * g for g in gs], gs)]
        for m, v, u in zip(ms, vs, updates):
            want = math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
            torch.testing.assert_close(u, want, **TOL)


def test_disabled_is_the_identity() -> None:
    ms = None
    for _, gs, updates in _run("momentum(0.9) |> bias_correct(0.9, 0.99, enabled=false) |> lr", 8):
        ms = [0.9 * m + 0.1 * g for m, g in zip(ms or [0 * g for g in gs], gs)]
        for m, u in zip(ms, updates):
            torch.testing.assert_close(u, m, **TOL)


def test_factor_is_applied_before_a_nonlinear_stage() -> None:
    """A pending factor multiplies the value before clip sees it (clip is not scale-invariant)."""
    b1, max_norm = 0.9, 3.0
    for t, gs, updates in _run(f"bias_correct({b1}) |> clip({max_norm}, eps=0) |> lr", 10):
        for g, u in zip(gs, updates):
            y = g / (1 - b1**t)
            want = y * min(1.0, max_norm / float(y.norm()))
            torch.testing.assert_close(u, want, **TOL)


def test_factor_is_dropped_before_a_scale_invariant_stage() -> None:
    for _, gs, updates in _run("bias_correct(0.9) |> sign |> lr", 12):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, torch.sign(g), **TOL)


def test_betas_follow_recipe_parameters() -> None:
    """beta1 and beta2 given recipe parameters are read from the param_group at every step."""
    (params,) = _tensors(16, 1)
    grads = _tensors(17, 4)
    opt = soapdsl.build("bias_correct(a, b) |> lr", params, lr=1.0, a=0.9, b=0.99)
    for t, gs in enumerate(grads, start=1):
        a, b = (0.9, 0.99) if t <= 2 else (0.5, 0.9)
        opt.param_groups[0]["a"] = a
        opt.param_groups[0]["b"] = b
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, q, g in zip(params, before, gs):
            torch.testing.assert_close(q - p, math.sqrt(1 - b**t) / (1 - a**t) * g, **TOL)
