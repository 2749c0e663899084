"""ademamix: fast + slow EMA mix with AdEMAMix's schedulers, against a hand-written loop."""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl
from soapdsl.ops.ademamix import alpha_at, beta3_at

TOL = {"rtol": 1e-12, "atol": 1e-14}


def _updates(text, grads, **args):
    p = torch.nn.Parameter(torch.zeros(grads[0].shape, dtype=torch.float64))
    opt = soapdsl.build(text, [("w", p)], lr=1.0, **args)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(before - p.detach())
    return out, opt, p


@pytest.mark.parametrize(("ta", "tb"), [(0, 0), (5, 7)])
def test_matches_loop(ta, tb):
    torch.manual_seed(0)
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(10)]
    b1, b3, alpha = 0.8, 0.99, 3.0
    got, opt, p = _updates(f"ademamix(0.8, 0.99, 3.0, alpha_warmup={ta}, beta3_warmup={tb})", grads)
    m1 = torch.zeros(4, 3, dtype=torch.float64)
    m2 = torch.zeros(4, 3, dtype=torch.float64)
    for t, (g, u) in enumerate(zip(grads, got, strict=True), 1):
        a = min(t * alpha / ta, alpha) if ta else alpha
        if tb:
            f = t / tb
            b3t = min(math.exp(math.log(b1) * math.log(b3) / ((1 - f) * math.log(b3) + f * math.log(b1))), b3)
        else:
            b3t = b3
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3t * m2 + (1 - b3t) * g
        torch.testing.assert_close(u, m1 / (1 - b1**t) + a * m2, **TOL)
    torch.testing.assert_close(opt.state[p]["0.ademamix.m1"], m1, **TOL)
    torch.testing.assert_close(opt.state[p]["0.ademamix.m2"], m2, **TOL)


def test_schedulers():
    assert alpha_at(0, 5.0, 10) == 0.0 and alpha_at(10, 5.0, 10) == 5.0 and alpha_at(99, 5.0, 10) == 5.0
    assert alpha_at(3, 5.0, 0) == 5.0
    assert beta3_at(0, 0.9, 0.9999, 100) == pytest.approx(0.9)
    assert beta3_at(100, 0.9, 0.9999, 100) == pytest.approx(0.9999)
    assert beta3_at(1000, 0.9, 0.9999, 100) == 0.9999
    # the half-life grows linearly (the Apple form of the same curve)
    half = [math.log(0.5) / math.log(beta3_at(t, 0.9, 0.999, 100)) for t in (0, 50, 100)]
    assert half[1] - half[0] == pytest.approx(half[2] - half[1], rel=1e-9)


def _half_life(b):
    return math.log(0.5) / math.log(b)


def test_beta3_schedule_from_zero_beta1_grows_the_half_life_from_zero():
    """The b3 scheduler interpolates the half-life ln 0.5 / ln b linearly from b1's to b3's
    (ALGORITHMS.md, section 6). A beta1 of 0 has half-life 0, so b3(t) = b3^(T/t), not 0."""
    b3, T = 0.999, 30
    assert beta3_at(0, 0.0, b3, T) == 0.0
    for t in range(1, T):
        got = beta3_at(t, 0.0, b3, T)
        assert 0.0 < got < b3
        assert _half_life(got) == pytest.approx(t / T * _half_life(b3), rel=1e-12)
        # the limit of the beta1 > 0 curve: a tiny beta1 lands next to it
        assert beta3_at(t, 1e-9, b3, T) == pytest.approx(got, abs=1e-4)
    assert beta3_at(T, 0.0, b3, T) == b3 and beta3_at(5 * T, 0.0, b3, T) == b3
    # beta3 = 0 caps the schedule at 0 (the min), without taking log(0)
    assert beta3_at(3, 0.9, 0.0, 10) == 0.0 and beta3_at(3, 0.0, 0.0, 10) == 0.0


def test_zero_beta1_with_beta3_warmup_matches_loop():
    torch.manual_seed(1)
    grads = [torch.randn(3, 2, dtype=torch.float64) for _ in range(9)]
    b3, alpha, T = 0.99, 3.0, 6
    got, _, _ = _updates(f"ademamix(0.0, {b3}, {alpha}, beta3_warmup={T})", grads)
    m2 = torch.zeros(3, 2, dtype=torch.float64)
    for t, (g, u) in enumerate(zip(grads, got, strict=True), 1):
        # the slow EMA's half-life grows linearly from 0 (beta1's) to b3's over T steps
        b3t = 0.5 ** (1 / (min(t / T, 1.0) * _half_life(b3)))
        m2 = b3t * m2 + (1 - b3t) * g
        torch.testing.assert_close(u, g + alpha * m2, **TOL)  # beta1 = 0: the fast EMA is g


def test_zero_alpha_is_the_fast_ema_bias_corrected():
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    got, _, _ = _updates("ademamix(0.9, 0.999, 0.0)", grads)
    m = torch.zeros(5, dtype=torch.float64)
    for t, (g, u) in enumerate(zip(grads, got, strict=True), 1):
        m = 0.9 * m + 0.1 * g
        torch.testing.assert_close(u, m / (1 - 0.9**t), **TOL)
