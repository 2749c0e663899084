"""Self-consistency checks of the variant reference optimizers in tests/references_variants.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.references import SoapMuonRef, SoapV1Ref, SoapV2Ref, rotate, unrotate
from tests.references_variants import (
    AdEMAMixRef,
    CautiousAdamRef,
    PSoapRef,
    SharedSoapMuonRef,
    SoapAdEMAMixRef,
    SoapScheduleRef,
    SoapSoapRef,
    ademamix_alpha,
    ademamix_beta3,
    schedule_every,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: intra-op threads only add contention on a busy machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = [(8, 8), (12, 5), (5, 12), (7,), (3, 4, 5), ()]
F64 = torch.float64


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grad_stream(shapes, steps, dtype, seed=1):
    """Deterministic gradients, one list per step, with a fixed anisotropic scale per param."""
    g = torch.Generator().manual_seed(seed)
    scales = [torch.rand(s, generator=g, dtype=dtype) * 3 + 0.1 for s in shapes]
    return [[torch.randn(s, generator=g, dtype=dtype) * sc for s, sc in zip(shapes, scales)] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def run(opt, params, grads):
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()


def max_rel(a, b):
    return max(
        float((p.detach() - q.detach()).abs().max() / q.detach().abs().max().clamp(min=1e-30)) for p, q in zip(a, b)
    )


def all_equal(a, b):
    return all(torch.equal(p.detach(), q.detach()) for p, q in zip(a, b))


def eigvecs_desc(m):
    _, q = torch.linalg.eigh(m)
    return torch.flip(q, [1])


def assert_orthonormal(q, tol):
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    assert (q.T @ q - eye).abs().max() < tol


# --------------------------------------------------------------------------------------------------------------
# 1. AdEMAMix
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmups", [dict(), dict(alpha_warmup=7, beta3_warmup=11)])
def test_ademamix_alpha0_equals_adamw(warmups):
    p1 = make_params(SHAPES, F64)
    p2 = clone_params(p1)
    grads = grad_stream(SHAPES, 30, F64)
    kw = dict(lr=1e-2, eps=1e-8, weight_decay=0.05)
    run(AdEMAMixRef(p1, betas=(0.9, 0.99, 0.999), alpha=0.0, **kw, **warmups), p1, grads)
    run(torch.optim.AdamW(p2, betas=(0.9, 0.99), foreach=False, **kw), p2, grads)
    assert max_rel(p1, p2) < 1e-12
    assert max_rel(p1, make_params(SHAPES, F64)) > 1e-3


def test_ademamix_beta3_scheduler_endpoints_and_shape():
    b1, b3, T = 0.9, 0.9999, 100
    assert ademamix_beta3(0, b1, b3, T) == pytest.approx(b1, abs=1e-14)
    assert ademamix_beta3(T, b1, b3, T) == pytest.approx(b3, abs=1e-14)
    values = [ademamix_beta3(t, b1, b3, T) for t in range(0, 2 * T)]
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values))  # non-decreasing
    assert all(v <= b3 for v in values)
    assert values[-1] == b3  # clamped after T
    # the half-life ln 0.5 / ln b is linear in t between the endpoints
    half = [math.log(0.5) / math.log(ademamix_beta3(t, b1, b3, T)) for t in (0, 25, 50, 100)]
    assert half[2] - half[0] == pytest.approx(0.5 * (half[3] - half[0]), rel=1e-10)
    assert half[1] - half[0] == pytest.approx(0.25 * (half[3] - half[0]), rel=1e-10)
    assert ademamix_beta3(5, b1, b3, 0) == b3  # off
    assert ademamix_beta3(5, b1, b3, None) == b3


def _beta3_apple(t, b1, b3, T):
    """apple/ml-ademamix form: f(b) = ln 0.5 / ln(b + 1e-8) - 1, lerp f, b = 0.5^(1 / (f + 1)), clamped at b3."""

    def f(b):
        return math.log(0.5) / math.log(b + 1e-8) - 1

    s = t / T
    ft = (1 - s) * f(b1) + s * f(b3)
    return min(0.5 ** (1 / (ft + 1)), b3)


@pytest.mark.parametrize(("b1", "b3", "T"), [(0.9, 0.9999, 1000), (0.95, 0.999, 37), (0.5, 0.99, 10)])
def test_ademamix_beta3_matches_apple_form(b1, b3, T):
    for t in list(range(0, T + 1, max(1, T // 50))) + [T, 2 * T]:
        assert ademamix_beta3(t, b1, b3, T) == pytest.approx(_beta3_apple(t, b1, b3, T), abs=1e-6)


def test_ademamix_alpha_scheduler():
    assert [ademamix_alpha(t, 5.0, 4) for t in range(6)] == [0.0, 1.25, 2.5, 3.75, 5.0, 5.0]
    assert ademamix_alpha(3, 5.0, 0) == 5.0
    assert ademamix_alpha(3, 5.0, None) == 5.0


def test_ademamix_two_steps_by_hand():
    """Two steps written out, with both schedulers on: t = 1, 2 (no first-step skip)."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(4, 3, generator=gen, dtype=F64)
    g1, g2 = torch.randn(2, 4, 3, generator=gen, dtype=F64)
    lr, b1, b2, b3, alpha, eps, wd, ta, tb = 0.1, 0.9, 0.99, 0.999, 6.0, 1e-8, 0.1, 3, 5
    p = torch.nn.Parameter(p0.clone())
    opt = AdEMAMixRef(
        [p], lr=lr, betas=(b1, b2, b3), alpha=alpha, eps=eps, weight_decay=wd, alpha_warmup=ta, beta3_warmup=tb
    )
    m1 = m2 = nu = torch.zeros_like(p0)
    expected = p0.clone()
    for t, g in ((1, g1), (2, g2)):
        a_t = alpha * t / ta
        lb1, lb3 = math.log(b1), math.log(b3)
        b3_t = math.exp(lb1 * lb3 / ((1 - t / tb) * lb3 + (t / tb) * lb1))
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3_t * m2 + (1 - b3_t) * g
        nu = b2 * nu + (1 - b2) * g * g
        upd = (m1 / (1 - b1**t) + a_t * m2) / (torch.sqrt(nu / (1 - b2**t)) + eps)
        expected = expected - lr * (upd + wd * expected)
        p.grad = g.clone()
        opt.step()
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------------------
# 2. SOAP + AdEMAMix
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("soap", [SoapV1Ref, SoapV2Ref])
def test_soap_ademamix_alpha0_is_soap(soap):
    p1 = make_params(SHAPES, F64)
    p2 = clone_params(p1)
    grads = grad_stream(SHAPES, 40, F64)
    kw = dict(lr=1e-2, eps=1e-8, weight_decay=0.05, precondition_frequency=4)
    run(SoapAdEMAMixRef(p1, betas=(0.9, 0.95, 0.999), alpha=0.0, beta3_warmup=9, **kw), p1, grads)
    run(soap(p2, betas=(0.9, 0.95), **kw), p2, grads)
    assert max_rel(p1, p2) < 1e-10
    assert max_rel(p1, make_params(SHAPES, F64)) > 1e-3


@pytest.mark.parametrize("warmups", [dict(), dict(alpha_warmup=6, beta3_warmup=15)])
def test_soap_ademamix_without_factors_is_ademamix(warmups):
    """max_precond_dim=0: AdEMAMix with SOAP conventions. With eps = 0 and wd = 0 the only difference left is the
    first-step skip, so SOAP-AdEMAMix on grads[0:] equals AdEMAMix on grads[1:]."""
    p1 = make_params(SHAPES, F64)
    p2 = clone_params(p1)
    grads = grad_stream(SHAPES, 30, F64)
    kw = dict(lr=1e-2, betas=(0.9, 0.95, 0.99), alpha=4.0, eps=0.0, weight_decay=0.0, **warmups)
    run(SoapAdEMAMixRef(p1, max_precond_dim=0, precondition_frequency=3, **kw), p1, grads)
    run(AdEMAMixRef(p2, **kw), p2, grads[1:])
    assert max_rel(p1, p2) < 1e-10
    assert max_rel(p1, make_params(SHAPES, F64)) > 1e-3


def test_soap_ademamix_emas_are_rerotated_exactly():
    """Both EMAs, mapped back to the original space, equal EMAs of the raw gradients (any refresh must re-rotate
    them exactly, never just permute them)."""
    shapes = [(6, 6), (9, 4), (3, 4, 5), (5,)]
    params = make_params(shapes, F64)
    grads = grad_stream(shapes, 23, F64)
    b1, b2, b3, tb = 0.9, 0.95, 0.99, 8
    opt = SoapAdEMAMixRef(params, betas=(b1, b2, b3), precondition_frequency=3, beta3_warmup=tb)
    run(opt, params, grads)
    for k, p in enumerate(params):
        m1 = torch.zeros(shapes[k], dtype=F64)
        m2 = torch.zeros(shapes[k], dtype=F64)
        for t, step_grads in enumerate(grads[1:], start=1):
            b3_t = ademamix_beta3(t, b1, b3, tb)
            m1 = b1 * m1 + (1 - b1) * step_grads[k]
            m2 = b3_t * m2 + (1 - b3_t) * step_grads[k]
        state = opt.state[p]
        assert state["step"] == 22
        assert torch.allclose(unrotate(state["exp_avg"], state["Q"]), m1, rtol=0, atol=1e-12)
        assert torch.allclose(unrotate(state["exp_avg_slow"], state["Q"]), m2, rtol=0, atol=1e-12)
        n_factors = sum(q is not None for q in state["Q"])
        assert n_factors == (0 if len(shapes[k]) == 1 else len(shapes[k]))


def test_soap_ademamix_first_step_skipped_and_fp32():
    shapes = [(16, 16), (24, 10), (9,)]
    params = make_params(shapes, torch.float32)
    before = [p.detach().clone() for p in params]
    grads = grad_stream(shapes, 31, torch.float32)
    opt = SoapAdEMAMixRef(params, precondition_frequency=3, alpha_warmup=10, beta3_warmup=10)
    run(opt, params, grads[:1])
    assert all_equal(params, before)
    run(opt, params, grads[1:])
    assert all(torch.isfinite(p).all() for p in params)
    for p in params[:2]:
        for q in opt.state[p]["Q"]:
            assert q.dtype == torch.float32
            assert_orthonormal(q, 1e-5)


# --------------------------------------------------------------------------------------------------------------
# 3. pSOAP
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(precondition_1d=True, weight_decay=0.05, normalize_grads=True),
        dict(merge_dims=True, max_precond_dim=30, precondition_1d=True),
        dict(max_precond_dim=8, correct_bias=False),
    ],
)
def test_psoap_power_one_is_soap_bitwise(kw):
    p1 = make_params(SHAPES, F64)
    p2 = clone_params(p1)
    grads = grad_stream(SHAPES, 25, F64)
    common = dict(lr=1e-2, precondition_frequency=4)
    run(PSoapRef(p1, power=1.0, **common, **kw), p1, grads)
    run(SoapV1Ref(p2, **common, **kw), p2, grads)
    assert all_equal(p1, p2)


@pytest.mark.parametrize("power", [0.5, 1.3])
def test_psoap_keeps_soap_norm_changes_direction(power):
    """States (m, v, GG, Q) only depend on the gradients, so run pSOAP and SOAP side by side: every step has the same
    Frobenius norm; the direction differs for the matrices and 3-D params within the size bound, and nothing else."""
    shapes = [(8, 8), (12, 5), (3, 4, 5), (7,), ()]
    p1 = make_params(shapes, F64)
    p2 = clone_params(p1)
    grads = grad_stream(shapes, 20, F64)
    kw = dict(lr=1e-2, weight_decay=0.0, precondition_frequency=4, max_precond_dim=10)  # 12 x 5: plain SOAP
    o1, o2 = PSoapRef(p1, power=power, **kw), SoapV1Ref(p2, **kw)
    for step_grads in grads:
        b1 = [p.detach().clone() for p in p1]
        b2 = [p.detach().clone() for p in p2]
        set_grads(p1, step_grads)
        set_grads(p2, step_grads)
        o1.step()
        o2.step()
        for k in range(len(shapes)):
            d1 = p1[k].detach() - b1[k]
            d2 = p2[k].detach() - b2[k]
            assert float(d1.pow(2).sum().sqrt()) == pytest.approx(float(d2.pow(2).sum().sqrt()), rel=1e-9, abs=0)
    for k in (0, 2):
        assert max_rel([p1[k]], [p2[k]]) > 1e-4
    for k in (1, 3, 4):
        assert torch.equal(p1[k], p2[k])


def test_psoap_direction_formula():
    """Without a refresh during the step, Q and the moments after the step give the update: Mr / d^p, rescaled."""
    power, lr, b1, b2, eps = 0.5, 0.02, 0.9, 0.95, 1e-8
    (p,) = make_params([(6, 5)], F64)
    grads = grad_stream([(6, 5)], 5, F64)
    opt = PSoapRef([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, precondition_frequency=100, power=power)
    run(opt, [p], grads[:4])
    before = p.detach().clone()
    run(opt, [p], grads[4:])
    state = opt.state[p]
    t = state["step"]
    assert t == 4
    mr = rotate(state["exp_avg"], state["Q"])
    d = state["exp_avg_sq"].sqrt() + eps
    n = mr / d**power
    n = n * torch.linalg.matrix_norm(mr / d) / torch.linalg.matrix_norm(n)
    expected = before - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * unrotate(n, state["Q"])
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------------------
# 4. SOAP-SOAP
# --------------------------------------------------------------------------------------------------------------


def test_soapsoap_decreases_quadratic():
    dtype = F64
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(512, 10, generator=gen, dtype=dtype) @ torch.diag(torch.logspace(-1, 1, 10, dtype=dtype))
    w_star = torch.randn(10, 6, generator=gen, dtype=dtype)
    y = x @ w_star + 0.1 * torch.randn(512, 6, generator=gen, dtype=dtype)
    w = torch.nn.Parameter(torch.zeros(10, 6, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(6, dtype=dtype))

    def loss_fn(xx, yy):
        return ((xx @ w + b - yy) ** 2).mean()

    opt = SoapSoapRef([w, b], lr=0.05, weight_decay=0.0, precondition_frequency=5)
    with torch.no_grad():
        initial = float(loss_fn(x, y))
    for _ in range(150):
        idx = torch.randint(0, 512, (16,), generator=gen)
        opt.zero_grad()
        loss_fn(x[idx], y[idx]).backward()
        opt.step()
    with torch.no_grad():
        final = float(loss_fn(x, y))
    assert math.isfinite(final)
    assert final < 0.1 * initial
    assert opt.state[w]["Q2"] is not None and "Q1" not in opt.state[b] and "Q2" not in opt.state[b]


@pytest.mark.parametrize("f", [4, 5, 1])
def test_soapsoap_refresh_timing(f):
    """Both bases exist after the first call; Q1 changes exactly at t % f == 0, Q2 at t % f == f // 2."""
    shape = (6, 7)
    (p,) = make_params([shape], F64)
    grads = grad_stream([shape], 3 * f + 6, F64)
    opt = SoapSoapRef([p], lr=1e-2, precondition_frequency=f)
    set_grads([p], grads[0])
    opt.step()
    state = opt.state[p]
    assert state["step"] == 0 and state["Q1"].shape == (6, 6) and state["Q2"].shape == (7, 7)
    q1, q2 = state["Q1"].clone(), state["Q2"].clone()
    for step_grads in grads[1:]:
        set_grads([p], step_grads)
        opt.step()
        t = state["step"]
        assert (not torch.equal(state["Q1"], q1)) == (t % f == 0), t
        assert (not torch.equal(state["Q2"], q2)) == (t % f == f // 2), t
        q1, q2 = state["Q1"].clone(), state["Q2"].clone()
        assert_orthonormal(state["Q1"], 1e-12)
        assert_orthonormal(state["Q2"], 1e-12)


@pytest.mark.parametrize(("shape", "first"), [((6, 6), "R"), ((5, 7), "L"), ((7, 5), "R")])
def test_soapsoap_sides(shape, first):
    """'std': the smaller side first, the right one of a square matrix; then the other side."""
    second = {"L": "R", "R": "L"}[first]
    assert SoapSoapRef.sides(shape, 10) == (first, second)
    assert SoapSoapRef.sides((7,), 10) == (None, None)
    assert SoapSoapRef.sides((12, 5), 10) == ("R", None)  # only_right
    assert SoapSoapRef.sides((5, 12), 10) == ("L", None)  # only_left
    assert SoapSoapRef.sides((12, 11), 10) == (None, None)  # identity


def test_soapsoap_first_update_by_hand():
    """t = 1 of a square matrix written out: basis 1 on the right, basis 2 on the left, both from the raw first
    gradient (the update is invariant to eigenvector signs)."""
    lr, b1, b2, eps, wd = 0.05, 0.9, 0.95, 1e-8, 0.01
    gen = torch.Generator().manual_seed(8)
    p0 = torch.randn(6, 6, generator=gen, dtype=F64)
    g0, g1 = torch.randn(2, 6, 6, generator=gen, dtype=F64)
    p = torch.nn.Parameter(p0.clone())
    opt = SoapSoapRef([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, precondition_frequency=10)
    run(opt, [p], [[g0], [g1]])
    for stats in (g0.T @ g0, g0 @ g0.T):  # well separated spectra: the bases are unique up to sign
        lam = torch.linalg.eigvalsh(stats)
        assert float((lam[1:] - lam[:-1]).min() / lam[-1]) > 1e-2
    q1 = eigvecs_desc(g0.T @ g0)  # right
    q2 = eigvecs_desc(g0 @ g0.T)  # left
    gp1 = g1 @ q1
    white1 = gp1 / (math.sqrt(1 - b2) * gp1.abs() + eps)
    x1 = (1 - b1) * white1  # project1(m) / d1 with m = (1 - b1) g1
    g2 = q2.T @ white1
    u = q2 @ ((q2.T @ x1) / (math.sqrt(1 - b2) * g2.abs() + eps)) @ q1.T
    expected = p0 - lr * math.sqrt(1 - b2) / (1 - b1) * u
    expected = expected - lr * wd * expected
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-10)
    state = opt.state[p]
    # GG2 started from the raw gradient, then took G1's statistics
    assert torch.allclose(state["GG2"], (1 - b2) * (b2 * g0 @ g0.T + white1 @ white1.T), rtol=1e-12, atol=1e-12)
    assert torch.allclose(state["GG1"], (1 - b2) * (b2 * g0.T @ g0 + g1.T @ g1), rtol=1e-12, atol=1e-12)


def test_soapsoap_divides_twice_without_a_second_basis():
    """A vector (no basis) and a matrix with its larger side over max_precond_dim (basis 1 only): the update is
    divided by d1 and by d2, the root of the EMA of (G1)^2 where G1 = project1(G) / d1."""
    lr, b1, b2, eps = 0.05, 0.9, 0.95, 1e-8
    gen = torch.Generator().manual_seed(3)
    v0, w0 = torch.randn(7, generator=gen, dtype=F64), torch.randn(12, 5, generator=gen, dtype=F64)
    gv0, gv1 = torch.randn(2, 7, generator=gen, dtype=F64)
    gw0, gw1 = torch.randn(2, 12, 5, generator=gen, dtype=F64)
    v, w = torch.nn.Parameter(v0.clone()), torch.nn.Parameter(w0.clone())
    opt = SoapSoapRef([v, w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, max_precond_dim=10)
    run(opt, [v, w], [[gv0, gw0], [gv1, gw1]])
    ss = lr * math.sqrt(1 - b2) / (1 - b1)
    root = math.sqrt(1 - b2)
    white = gv1 / (root * gv1.abs() + eps)
    expected_v = v0 - ss * ((1 - b1) * white) / (root * white.abs() + eps)
    assert torch.allclose(v.detach(), expected_v, rtol=0, atol=1e-12)
    q = eigvecs_desc(gw0.T @ gw0)  # the right side (5), the smaller; the left (12) is over max_precond_dim
    gp = gw1 @ q
    white = gp / (root * gp.abs() + eps)
    expected_w = w0 - ss * (((1 - b1) * white) / (root * white.abs() + eps)) @ q.T
    assert torch.allclose(w.detach(), expected_w, rtol=0, atol=1e-10)
    assert "GG2" not in opt.state[w] and "GG1" not in opt.state[v]


def test_soapsoap_permutes_only_the_second_moment_of_the_second_basis():
    """At a refresh of basis 1, v2 is permuted along basis 1's dim and v1 is not; a refresh of basis 2 permutes
    nothing. Checked on the state just around one refresh with a reordering."""
    (p,) = make_params([(6, 7)], F64)
    grads = grad_stream([(6, 7)], 12, F64)
    opt = SoapSoapRef([p], lr=1e-2, precondition_frequency=4)
    state = opt.state
    saw = set()
    for k, step_grads in enumerate(grads):
        set_grads([p], step_grads)
        if k == 0:
            opt.step()
            continue
        st = state[p]
        t = st["step"] + 1
        # what this step's moment updates will make of v1 and v2, computed beside the optimizer
        b2 = 0.95
        gp1 = st["Q1"].T @ p.grad
        v1 = b2 * st["v1"] + (1 - b2) * gp1.square()
        g1 = gp1 / (v1.sqrt() + 1e-8)
        v2 = b2 * st["v2"] + (1 - b2) * (g1 @ st["Q2"]).square()
        q1_before = st["Q1"].clone()
        opt.step()
        assert torch.equal(st["v1"], v1) or torch.allclose(st["v1"], v1, rtol=1e-15, atol=0), t
        if t % 4 == 0:
            idx = torch.argsort(torch.diag(q1_before.T @ st["GG1"] @ q1_before), descending=True, stable=True)
            assert torch.allclose(st["v2"], v2[idx], rtol=1e-15, atol=0), t
            saw.add("1" if not torch.equal(idx, torch.arange(6)) else "1-identity")
        else:
            assert torch.allclose(st["v2"], v2, rtol=1e-15, atol=0), t
    assert "1" in saw  # a refresh reordered basis 1


def test_soapsoap_fp32_bases_orthonormal():
    shapes = [(16, 16), (24, 10), (10, 24)]
    params = make_params(shapes, torch.float32)
    opt = SoapSoapRef(params, precondition_frequency=4)
    run(opt, params, grad_stream(shapes, 31, torch.float32))
    for p in params:
        st = opt.state[p]
        assert st["Q1"].dtype == torch.float32 and st["Q2"].dtype == torch.float32
        assert_orthonormal(st["Q1"], 1e-5)
        assert_orthonormal(st["Q2"], 1e-5)
        assert torch.isfinite(p).all()


# --------------------------------------------------------------------------------------------------------------
# 5. SOAP-Muon with shared bases
# --------------------------------------------------------------------------------------------------------------

MUON_SHAPES = [(8, 8), (12, 6), (6, 12), (12, 6), (5,)]


@pytest.mark.parametrize("listed", [False, True])
def test_shared_soap_muon_singletons_are_soap_muon(listed):
    p1 = make_params(MUON_SHAPES, F64)
    p2 = clone_params(p1)
    grads = grad_stream(MUON_SHAPES, 25, F64)
    kw = dict(lr=2e-2, betas=(0.9, 0.95), precondition_frequency=4, weight_decay=0.01)
    groups = [[p] for p in p1[:3]] if listed else []
    run(SharedSoapMuonRef(p1, groups, **kw), p1, grads)
    run(SoapMuonRef(p2, **kw), p2, grads)
    assert all_equal(p1, p2)


def test_shared_soap_muon_first_basis_is_eigh_of_summed_statistics():
    b2 = 0.95
    shapes = [(12, 6), (12, 6), (5, 9), (5, 9), (5, 9)]
    params = make_params(shapes, F64)
    grads = grad_stream(shapes, 1, F64)
    opt = SharedSoapMuonRef(params, [params[:2], params[2:]], betas=(0.9, b2))
    before = [p.detach().clone() for p in params]
    run(opt, params, grads)
    assert all_equal(params, before)  # first step: statistics only
    (g,) = grads
    right = (1 - b2) * (g[0].T @ g[0] + g[1].T @ g[1])  # 12 x 6: the right (smaller) side
    left = (1 - b2) * (g[2] @ g[2].T + g[3] @ g[3].T + g[4] @ g[4].T)  # 5 x 9: the left side
    for members, stats in ((params[:2], right), (params[2:], left)):
        q = opt.state[members[0]]["shared"]["Q"]
        assert all(opt.state[p]["shared"]["Q"] is q for p in members)
        assert torch.allclose(opt.state[members[0]]["shared"]["GG"], stats, rtol=1e-12, atol=1e-12)
        q_ind = eigvecs_desc(stats)
        overlap = (q.T @ q_ind).abs()  # equal up to column signs
        assert torch.allclose(overlap, torch.eye(q.shape[0], dtype=F64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("shape", [(12, 6), (6, 12), (8, 8)])
def test_shared_soap_muon_same_gradient_equals_single(shape):
    """Two members fed the same gradient: GG_group = 2 GG_single, the same eigenbasis and sort order, so each member
    follows SoapMuonRef on one param fed that gradient (through several refreshes)."""
    (p,) = make_params([shape], F64)
    a, b = clone_params([p, p])
    grads = grad_stream([shape], 30, F64)
    kw = dict(lr=2e-2, betas=(0.9, 0.95), precondition_frequency=3, weight_decay=0.01)
    opt = SharedSoapMuonRef([a, b], [[a, b]], **kw)
    ref = SoapMuonRef([p], **kw)
    for (g,) in grads:
        set_grads([a, b, p], [g, g, g])
        opt.step()
        ref.step()
    assert max_rel([a, b], [p, p]) < 1e-9
    assert torch.allclose(opt.state[a]["shared"]["GG"], 2 * ref.state[p]["GG"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(opt.state[a]["exp_avg_sq"], ref.state[p]["exp_avg_sq"], rtol=1e-9, atol=1e-12)
    assert torch.allclose(opt.state[b]["exp_avg_sq"], ref.state[p]["exp_avg_sq"], rtol=1e-9, atol=1e-12)
    assert max_rel([p], make_params([shape], F64)) > 1e-3


def test_shared_soap_muon_shared_gg_is_ema_of_sums():
    shapes = [(9, 4), (9, 4), (9, 4)]
    params = make_params(shapes, F64)
    grads = grad_stream(shapes, 12, F64)
    b2 = 0.9
    opt = SharedSoapMuonRef(params, [params], betas=(0.95, b2), precondition_frequency=5)
    run(opt, params, grads)
    gg = torch.zeros(4, 4, dtype=F64)
    for step_grads in grads:
        gg = b2 * gg + (1 - b2) * sum(g.T @ g for g in step_grads)
    shared = opt.state[params[0]]["shared"]
    assert shared["step"] == 11
    assert torch.allclose(shared["GG"], gg, rtol=1e-12, atol=1e-12)
    assert_orthonormal(shared["Q"], 1e-12)
    assert all(torch.isfinite(p).all() for p in params)


def test_shared_soap_muon_rejects_bad_groups():
    a, b = make_params([(4, 6), (6, 4)], F64)
    with pytest.raises(ValueError):
        SharedSoapMuonRef([a, b], [[a, b]])
    (c,) = make_params([(4, 6)], F64)
    with pytest.raises(ValueError):
        SharedSoapMuonRef([a, b], [[a, c]])
    opt = SharedSoapMuonRef([a, c], [[a, c]])
    a.grad = torch.ones_like(a)
    with pytest.raises(ValueError):
        opt.step()


# --------------------------------------------------------------------------------------------------------------
# 6. SOAP with a refresh-frequency schedule
# --------------------------------------------------------------------------------------------------------------


def test_schedule_every():
    sched = [(100, 1), 10]
    assert [schedule_every(t, sched) for t in (1, 100, 101, 1000)] == [1, 1, 10, 10]
    sched = [(6, 1), (20, 4), 10]
    assert [schedule_every(t, sched) for t in (1, 6, 7, 20, 21)] == [1, 1, 4, 4, 10]
    assert schedule_every(5, [7]) == 7


@pytest.mark.parametrize("kw", [dict(), dict(merge_dims=True, max_precond_dim=30, precondition_1d=True)])
@pytest.mark.parametrize("schedule", ["pair", "final_only", "none"])
def test_soap_schedule_constant_equals_soap(kw, schedule):
    f = 4
    sched = {"pair": [(0, 1), f], "final_only": [f], "none": None}[schedule]
    p1 = make_params(SHAPES, F64)
    p2 = clone_params(p1)
    grads = grad_stream(SHAPES, 25, F64)
    run(SoapScheduleRef(p1, lr=1e-2, precondition_frequency=f, freq_schedule=sched, **kw), p1, grads)
    run(SoapV1Ref(p2, lr=1e-2, precondition_frequency=f, **kw), p2, grads)
    assert all_equal(p1, p2)


def test_soap_schedule_refresh_steps():
    shape = (6, 5)
    (p,) = make_params([shape], F64)
    grads = grad_stream([shape], 45, F64)
    opt = SoapScheduleRef([p], lr=1e-2, precondition_frequency=999, freq_schedule=[(6, 1), (20, 4), 10])
    set_grads([p], grads[0])
    opt.step()
    state = opt.state[p]
    refreshed = []
    for step_grads in grads[1:]:
        before = [q.clone() for q in state["Q"]]
        set_grads([p], step_grads)
        opt.step()
        if not all(torch.equal(a, b) for a, b in zip(before, state["Q"])):
            refreshed.append(state["step"])
    assert refreshed == [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 30, 40]


def test_soap_schedule_rejects_bad_schedules():
    (p,) = make_params([(3, 3)], F64)
    for bad in ([], [(10, 1), (5, 2), 10], [(10, 0), 10], [0]):
        with pytest.raises(ValueError):
            SoapScheduleRef([p], freq_schedule=bad)


# --------------------------------------------------------------------------------------------------------------
# 7. Cautious Adam
# --------------------------------------------------------------------------------------------------------------


def test_cautious_adam_without_sign_conflicts_is_adamw():
    """Gradients of a fixed sign per entry: m, u and g always agree in sign, the mask is all ones."""
    shapes = [(6, 5), (7,), ()]
    p1 = make_params(shapes, F64)
    p2 = clone_params(p1)
    signs = [torch.sign(torch.randn(s, generator=torch.Generator().manual_seed(4), dtype=F64)) for s in shapes]
    grads = [[g.abs() * s for g, s in zip(step, signs)] for step in grad_stream(shapes, 20, F64)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    run(CautiousAdamRef(p1, **kw), p1, grads)
    run(torch.optim.AdamW(p2, foreach=False, **kw), p2, grads)
    assert max_rel(p1, p2) < 1e-12


def test_cautious_adam_two_steps_by_hand():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.05
    gen = torch.Generator().manual_seed(8)
    p0 = torch.randn(10, generator=gen, dtype=F64)
    g1 = torch.randn(10, generator=gen, dtype=F64)
    flip = torch.tensor([1.0, -1.0] * 5, dtype=F64)
    g2 = g1 * flip * 0.5  # half of the entries reverse: m keeps g1's sign there, so u * g2 < 0
    p = torch.nn.Parameter(p0.clone())
    opt = CautiousAdamRef([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = v = torch.zeros(10, dtype=F64)
    expected = p0.clone()
    for t, g in ((1, g1), (2, g2)):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        mask = (u * g > 0).to(F64)
        if t == 1:
            assert mask.sum() == 10
        else:
            assert torch.equal(mask, (flip > 0).to(F64))
        u = u * mask / max(float(mask.mean()), 1e-3)
        expected = expected * (1 - lr * wd) - lr * u
        p.grad = g.clone()
        opt.step()
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-14)


def test_cautious_adam_all_masked_is_weight_decay_only():
    (p,) = make_params([(4, 3)], F64)
    g1 = grad_stream([(4, 3)], 1, F64)[0][0]
    opt = CautiousAdamRef([p], lr=0.1, weight_decay=0.2)
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = -0.01 * g1  # m keeps g1's sign everywhere: every entry conflicts, mean(mask) = 0 -> clamp
    opt.step()
    assert torch.equal(p.detach(), before * (1 - 0.1 * 0.2))
