"""Self-consistency checks of the independent reference optimizers in tests/references.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import needs_torch_muon
from tests.references import (
    AdamSoapConventionsRef,
    MuonRef,
    ShampooRef,
    SoapMuonRef,
    SoapV1Ref,
    SoapV2Ref,
    merge_dims,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: intra-op threads only add contention on a busy machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = [(8, 8), (12, 5), (5, 12), (7,), (3, 4, 5), (4, 2, 3, 3), ()]


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


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def max_rel(a, b):
    return max(
        float((p.detach() - q.detach()).abs().max() / q.detach().abs().max().clamp(min=1e-30)) for p, q in zip(a, b)
    )


def test_merge_dims_rule():
    assert merge_dims([50, 100], 10000) == [5000]  # the quirk of 2.3
    assert merge_dims([20000, 5], 10000) == [20000, 5]
    assert merge_dims([5, 20000], 10000) == [5, 20000]
    assert merge_dims([100, 200, 3], 10000) == [100, 600]
    assert merge_dims([], 10000) == [1]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(precondition_1d=True, weight_decay=0.05),
        dict(merge_dims=True, max_precond_dim=30, precondition_1d=True),
        dict(normalize_grads=True, correct_bias=False, shampoo_beta=0.9),
        dict(max_precond_dim=8),  # some dims unfactored (12 > 8, 5 <= 8)
    ],
)
def test_soap_v1_equals_v2(kw):
    dtype = torch.float64
    p1 = make_params(SHAPES, dtype)
    p2 = clone_params(p1)
    grads = grad_stream(SHAPES, 60, dtype)
    common = dict(lr=1e-2, precondition_frequency=5)
    run(SoapV1Ref(p1, **common, **kw), p1, grads)
    run(SoapV2Ref(p2, **common, **kw), p2, grads)
    assert max_rel(p1, p2) < 1e-10
    moved = max_rel(p1, make_params(SHAPES, dtype))
    assert moved > 1e-3  # the params really moved


def test_soap_first_step_is_skipped():
    params = make_params(SHAPES, torch.float64)
    before = [p.detach().clone() for p in params]
    run(SoapV1Ref(params, weight_decay=0.1), params, grad_stream(SHAPES, 1, torch.float64))
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_soap_without_factors_is_adam_with_soap_conventions():
    dtype = torch.float64
    shapes = SHAPES
    p1 = make_params(shapes, dtype)
    p2 = clone_params(p1)
    grads = grad_stream(shapes, 40, dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    run(SoapV1Ref(p1, max_precond_dim=0, precondition_frequency=5, precondition_1d=True, **kw), p1, grads)
    run(AdamSoapConventionsRef(p2, **kw), p2, grads)
    assert max_rel(p1, p2) < 1e-12


def test_soap_bases_stay_orthonormal_fp32():
    shapes = [(16, 16), (24, 10), (3, 4, 5), (9,)]
    params = make_params(shapes, torch.float32)
    opt = SoapV1Ref(params, precondition_frequency=3, precondition_1d=True)
    run(opt, params, grad_stream(shapes, 31, torch.float32))  # t = 30: ten refreshes
    n_checked = 0
    for p in params:
        for q in opt.state[p]["Q"]:
            assert q is not None and q.dtype == torch.float32
            eye = torch.eye(q.shape[0])
            assert (q.T @ q - eye).abs().max() < 1e-5
            n_checked += 1
    assert n_checked == 2 + 2 + 3 + 1


@pytest.mark.parametrize("shape", [(8, 8), (12, 6), (6, 12)])
@pytest.mark.parametrize("max_precond_dim", [10000, 10])
def test_soap_muon_update_norm(shape, max_precond_dim):
    dtype = torch.float64
    (p,) = make_params([shape], dtype)
    grads = grad_stream([shape], 25, dtype)
    lr, b1, b2 = 2e-2, 0.9, 0.95
    opt = SoapMuonRef([p], lr=lr, betas=(b1, b2), precondition_frequency=4, max_precond_dim=max_precond_dim)
    m, n = shape
    if max(m, n) < max_precond_dim:
        target = math.sqrt(min(m, n)) * math.sqrt(max(1.0, m / n))
    else:  # soap_muon10 RMS-1 branch
        target = math.sqrt(m * n)
    for i, (g,) in enumerate(grads):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        delta = torch.linalg.matrix_norm(p.detach() - before)
        if i == 0:
            assert delta == 0  # first step skipped
            continue
        t = i
        ss = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        assert delta == pytest.approx(ss * target, rel=1e-10)
    side_dim = opt.state[p]["Q"].shape[0]
    assert side_dim == min(m, n)  # the factor sits on the smaller side (right when square)
    assert torch.isfinite(p).all()


def test_soap_muon_fp32_runs():
    shapes = [(8, 8), (16, 6), (6, 16), (5,)]
    params = make_params(shapes, torch.float32)
    run(SoapMuonRef(params, precondition_frequency=3), params, grad_stream(shapes, 12, torch.float32))
    assert all(torch.isfinite(p).all() for p in params)


@needs_torch_muon
def test_muon_ref_bf16_matches_torch_muon():
    shapes = [(16, 16), (24, 10), (10, 24)]
    dtype = torch.float32
    p1 = make_params(shapes, dtype)
    p2 = clone_params(p1)
    grads = grad_stream(shapes, 20, dtype)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, eps=1e-7)
    run(MuonRef(p1, ns_dtype=torch.bfloat16, **kw), p1, grads)
    run(torch.optim.Muon(p2, **kw), p2, grads)
    rel = max_rel(p1, p2)
    # Observed on CPU (torch 2.13): max|p_ref - p_torch| / max|p_torch| = 9.6e-4 after 20 steps (2.5e-4 after
    # one step). The difference is rounding only: torch.optim.Muon computes `b A + c A A` and `a X + B X` with
    # a fused bf16 addmm (one rounding each) and its Frobenius norm in one reduction, while MuonRef rounds every
    # op separately in bf16 (unit roundoff 2^-8 ~ 3.9e-3). The update directions differ by ~1-4% (relative
    # Frobenius), each step moves the params by ~0.02 per entry, and the entries are ~1, hence this bound.
    # (With torch.addmm in place of the separate ops the two agree bitwise.)
    assert rel < 2e-3
    moved = max_rel(p1, make_params(shapes, dtype))
    assert moved > 0.05


def test_muon_ref_fp64_deterministic():
    shapes = [(16, 16), (24, 10), (10, 24)]
    dtype = torch.float64
    kw = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float64, adjust_lr_fn="match_rms_adamw")
    results = []
    grads = grad_stream(shapes, 10, dtype)
    for _ in range(2):
        params = make_params(shapes, dtype)
        run(MuonRef(params, **kw), params, grads)
        assert all(p.dtype == torch.float64 for p in params)
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_muon_ref_first_step_by_hand():
    """One fp64 step written out: nesterov of a zero buffer is (1 - mu^2) g... up to NS normalisation."""
    (p,) = make_params([(6, 4)], torch.float64)
    before = p.detach().clone()
    g = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p.grad = g.clone()
    MuonRef([p], lr=0.1, weight_decay=0.0, ns_dtype=torch.float64, ns_steps=3).step()
    x = g.T / torch.linalg.matrix_norm(g)
    for _ in range(3):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    expected = before - 0.1 * math.sqrt(6 / 4) * x.T
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("exponent", ["power_half", "classic"])
def test_shampoo_decreases_quadratic(exponent):
    """Minibatch least squares with an ill-conditioned design; a weight matrix and a bias (1-D factor)."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(512, 10, generator=gen, dtype=dtype) @ torch.diag(torch.logspace(-1, 1, 10, dtype=dtype))
    w_star = torch.randn(10, 6, generator=gen, dtype=dtype)
    y = x @ w_star + 0.1 * torch.randn(512, 6, generator=gen, dtype=dtype)
    w = torch.nn.Parameter(torch.zeros(10, 6, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(6, dtype=dtype))

    def loss_fn(xx, yy):
        return ((xx @ w + b - yy) ** 2).mean()

    opt = ShampooRef([w, b], lr=0.05, precondition_frequency=5, exponent=exponent)
    with torch.no_grad():
        initial = float(loss_fn(x, y))
    for _ in range(100):
        idx = torch.randint(0, 512, (16,), generator=gen)
        opt.zero_grad()
        loss_fn(x[idx], y[idx]).backward()
        opt.step()
    with torch.no_grad():
        final = float(loss_fn(x, y))
    # observed: ~1.4 (power_half) and ~1.1 (classic) from ~67
    assert math.isfinite(final)
    assert final < 0.1 * initial
    assert opt.state[w]["has_root"] and opt.state[b]["has_root"]


@pytest.mark.parametrize(("exponent", "power"), [("classic", 0.0), ("power_half", -1.0)])
def test_shampoo_direction_for_a_constant_gradient(exponent, power):
    """With a constant full-rank G = U S V^T: L ~ U S^2 U^T, R ~ V S^2 V^T, so classic (1/4 per side) gives the
    direction U V^T and power_half (1/2 per side) gives U S^-1 V^T, rescaled to the Adam graft norm."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(4, 4, generator=gen, dtype=dtype)
    (p,) = make_params([(4, 4)], dtype)
    f = 5
    opt = ShampooRef([p], lr=0.1, precondition_frequency=f, exponent=exponent, graft_eps=1e-8)
    for _ in range(f - 1):
        p.grad = g.clone()
        opt.step()
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()  # t = f: the first inverse roots, computed with the current G
    u, s, vh = torch.linalg.svd(g)
    direction = u @ torch.diag(s**power) @ vh
    graft = g / (g.abs() + 1e-8)  # M = G and sqrt(v_hat) = |G| for a constant gradient
    expected = before - 0.1 * direction * torch.linalg.matrix_norm(graft) / torch.linalg.matrix_norm(direction)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-9)


def test_shampoo_graft_before_start_is_adam_direction():
    """Before the first inverse root, the update is the bias-corrected Adam graft direction."""
    (p,) = make_params([(5, 3)], torch.float64)
    before = p.detach().clone()
    g = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p.grad = g.clone()
    ShampooRef([p], lr=0.1, graft_eps=1e-8).step()
    # t = 1: M = g, sqrt(v_hat) = |g|, so the step is lr * g / (|g| + eps)
    assert torch.allclose(p.detach(), before - 0.1 * g / (g.abs() + 1e-8), rtol=0, atol=1e-14)
