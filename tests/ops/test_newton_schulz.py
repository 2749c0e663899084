"""newton_schulz: orthogonalize each matrix (Muon's quintic iteration, optional cubic cleanup).

The expected values come from a plain per-matrix loop written here from the op's docstring, and
from the iteration's action on singular values: the polynomial p(X) = aX + bXX^TX + c(XX^T)^2X
maps each singular value s of X to a*s + b*s^3 + c*s^5 and keeps the singular vectors.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

COEFFS = (3.4445, -4.7750, 2.0315)  # the op's default (Muon's) coefficients
# fp32: each quintic step amplifies rounding by up to ~2x (|f'(s)| <= 2 on [0.68, 1.14])
FP32 = {"rtol": 1e-4, "atol": 2e-5}


def _ns_reference(
    g: torch.Tensor,
    steps: int,
    cleanup: int = 0,
    eps: float = 1e-7,
    eps_mode: str = "add",
    coeffs=COEFFS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One matrix at a time, in fp32 (or ``dtype``): flatten to [rows, rest], orient wide, normalize, iterate."""
    a, b, c = coeffs
    x = g.to(dtype).reshape(g.shape[0], -1)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = float(torch.linalg.norm(x))
    x = x / (norm + eps) if eps_mode == "add" else x / max(norm, eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    for _ in range(cleanup):
        x = 1.5 * x - 0.5 * (x @ x.T) @ x
    if tall:
        x = x.T
    return x.reshape(g.shape)


def _run(recipe: str, shapes, seed: int, dtype=torch.float32, steps: int = 1, **args):
    """Build ``recipe`` with lr=1; return [(grads, updates)] per step."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    opt = soapdsl.build(recipe, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0, **args)
    out = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        out.append((gs, [(b - p) for b, p in zip(before, params)]))
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g), "newton_schulz must not write into the gradient"
    return out


def _svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double().reshape(x.shape[0], -1))


SHAPES = {
    "wide": [(6, 10)] * 3,
    "tall": [(10, 6)] * 3,
    "square": [(8, 8)] * 2,
    "conv": [(8, 3, 3, 3)] * 2,  # [out, in, kh, kw] -> [8, 27]
    "tall_conv": [(24, 2, 2, 1)] * 2,  # -> [24, 4], transposed
    "mixed": [(6, 10), (10, 6), (6, 10), (5, 5)],
}


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_matches_reference_loop(kind: str) -> None:
    """Batched over same-shape parameters; each equals the per-matrix loop."""
    for gs, updates in _run("newton_schulz(5) |> lr", SHAPES[kind], 0, steps=2):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _ns_reference(g, 5), **FP32)


@pytest.mark.parametrize("eps_mode", ["add", "clamp"])
def test_normalization_and_eps_mode(eps_mode: str) -> None:
    """With no steps the result is the normalized input: x / (||x|| + eps) or x / max(||x||, eps).

    Matrices with Frobenius norm 0.5 and 3 against eps = 1 show both branches of clamp."""
    gen = torch.Generator().manual_seed(1)
    p = [torch.zeros(4, 6), torch.zeros(4, 6)]
    opt = soapdsl.build(f"newton_schulz(0, eps=1.0, eps_mode={eps_mode}) |> lr", p, lr=1.0)
    gs = [torch.randn(4, 6, generator=gen) for _ in p]
    gs = [g * (n / float(g.norm())) for g, n in zip(gs, (0.5, 3.0))]
    for q, g in zip(p, gs):
        q.grad = g.clone()
    opt.step()
    for q, g in zip(p, gs):
        norm = float(g.norm())
        want = g / (norm + 1.0) if eps_mode == "add" else g / max(norm, 1.0)
        torch.testing.assert_close(-q, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["standard", "gram"])
@pytest.mark.parametrize("norm", ["fro", "spectral"])
@pytest.mark.parametrize("eps_mode", ["add", "clamp"])
def test_eps_zero_keeps_a_zero_update_zero(eps_mode: str, norm: str, form: str) -> None:
    """eps=0 is in range (>= 0), and the only guard of the normalisation: a matrix whose update
    is all zero (a layer that got no gradient yet) was divided 0 / 0, and its NaN went into the
    parameter with no error. Orthogonalising zero gives zero, as renorm and graft give it; a
    nonzero matrix beside it in the same batch is unchanged."""
    gen = torch.Generator().manual_seed(2)
    p = [torch.nn.Parameter(torch.zeros(4, 10)) for _ in range(2)]
    opt = soapdsl.build(f"newton_schulz(3, eps=0, eps_mode={eps_mode}, norm={norm}, form={form}) |> lr", p, lr=1.0)
    g = torch.randn(4, 10, generator=gen)
    p[0].grad, p[1].grad = torch.zeros(4, 10), g.clone()
    opt.step()
    assert torch.equal(p[0].detach(), torch.zeros(4, 10))
    assert p[1].isfinite().all() and p[1].abs().max() > 0.1


@pytest.mark.parametrize("eps_mode", ["add", "clamp"])
def test_eps_mode_with_steps(eps_mode: str) -> None:
    """eps = 10 exceeds the gradients' norms (about 6), so add and clamp give different inputs."""
    for gs, updates in _run(f"newton_schulz(5, eps=10.0, eps_mode={eps_mode}) |> lr", [(5, 7)] * 2, 2):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _ns_reference(g, 5, eps=10.0, eps_mode=eps_mode), **FP32)


def test_singular_values_follow_the_scalar_polynomial() -> None:
    """s_i(out) = h^cleanup(f^steps(s_i(g) / (||g|| + eps))), f(s) = as + bs^3 + cs^5, h(s) = 1.5s - 0.5s^3."""
    a, b, c = COEFFS
    for gs, updates in _run("newton_schulz(4, cleanup=2) |> lr", [(6, 9)] * 3, 3):
        for g, u in zip(gs, updates):
            s = _svals(g) / (float(g.double().norm()) + 1e-7)
            for _ in range(4):
                s = a * s + b * s**3 + c * s**5
            for _ in range(2):
                s = 1.5 * s - 0.5 * s**3
            torch.testing.assert_close(_svals(u), s.sort(descending=True).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["wide", "tall", "conv"])
def test_singular_values_near_one(kind: str) -> None:
    """10 quintic steps keep the singular values in the coefficients' band [0.68, 1.14] (f(1) = a + b + c
    = 0.701 and the iteration settles on [0.6818, 1.1344]); 5 cleanup steps pull them to 1."""
    for cleanup in (0, 5):
        for _, updates in _run(f"newton_schulz(10, cleanup={cleanup}) |> lr", SHAPES[kind], 4):
            for u in updates:
                s = _svals(u)
                if cleanup:
                    assert float((s - 1).abs().max()) < 1e-4, s
                else:
                    assert 0.68 <= float(s.min()) and float(s.max()) <= 1.14, s


@pytest.mark.parametrize("shape", [(8, 8), (5, 9), (9, 5)])
def test_orthogonal_input_is_returned(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(5)
    m, n = shape
    q, _ = torch.linalg.qr(torch.randn(max(m, n), min(m, n), generator=gen, dtype=torch.float64))
    q = (q if m >= n else q.T).float()  # orthonormal columns (tall) or rows (wide)
    p = torch.zeros(shape)
    opt = soapdsl.build("newton_schulz(10, cleanup=5) |> lr", [p], lr=1.0)
    p.grad = q.clone()
    opt.step()
    torch.testing.assert_close(-p, q, rtol=1e-5, atol=1e-5)


def test_bf16_iteration_is_close_to_fp32() -> None:
    """bf16 has an 8-bit mantissa (relative rounding 2^-9); 5 steps of three matmuls stay within 5%."""
    shapes = [(16, 24)] * 3
    fp32 = _run("newton_schulz(5) |> lr", shapes, 6)
    bf16 = _run("newton_schulz(5, dtype=bf16) |> lr", shapes, 6)
    for (g32, u32), (g16, u16) in zip(fp32, bf16):
        for a, b, u, v in zip(g32, g16, u32, u16):
            assert torch.equal(a, b)
            assert v.dtype == torch.float32
            assert float((u - v).norm() / u.norm()) < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameter_dtype_is_kept(dtype: torch.dtype) -> None:
    """Other parameter dtypes iterate in fp32 (the op's dtype) and are written back in their own."""
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else FP32
    gen = torch.Generator().manual_seed(7)
    params = [torch.zeros(6, 10, dtype=dtype) for _ in range(2)]
    opt = soapdsl.build("newton_schulz(5) |> lr", params, lr=1.0)
    gs = [torch.randn(6, 10, generator=gen).to(dtype) for _ in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert p.dtype == dtype
        torch.testing.assert_close(-p.float(), _ns_reference(g, 5), **tol)


@pytest.mark.parametrize("kind", ["wide", "tall", "conv"])
def test_unbatched_route_matches_reference(kind: str) -> None:
    """[batch=false]: each parameter is its own matrix (a conv kernel flattened), not a batch of rows."""
    recipe = "recipe t(lr=1.0):\n  route default [batch=false]: newton_schulz(5) |> lr"
    for gs, updates in _run(recipe, SHAPES[kind], 8):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _ns_reference(g, 5), **FP32)


def test_spectral_norm_divides_by_the_top_singular_value() -> None:
    torch.manual_seed(3)
    g = torch.randn(24, 40, dtype=torch.float64) * torch.linspace(0.01, 1.0, 40, dtype=torch.float64)
    x = soapdsl.apply("newton_schulz(0, norm=spectral, power_iters=50)", g)
    sigma = torch.linalg.svdvals(g)[0]
    torch.testing.assert_close(x, g / (sigma + 1e-7), rtol=1e-6, atol=1e-12)


def test_spectral_norm_converges_in_fewer_steps_than_frobenius() -> None:
    torch.manual_seed(4)
    g = torch.randn(32, 96) * torch.linspace(0.01, 1.0, 96)
    fro = torch.linalg.svdvals(soapdsl.apply("newton_schulz(1)", g))
    spectral = torch.linalg.svdvals(soapdsl.apply("newton_schulz(1, norm=spectral)", g))
    assert spectral.min() > fro.min()
    assert spectral.max() < 1.25  # the largest singular value started at (about) 1


# -- form=gram --------------------------------------------------------------------------------

# wide enough (long side > 1.5x the short one) for the Gram form to pay, in every orientation
GRAM_SHAPES = {
    "wide": [(6, 20)] * 3,
    "tall": [(20, 6)] * 2,
    "conv": [(6, 5, 2, 2)] * 2,  # -> [6, 20]
    "tall_conv": [(20, 3, 2, 1)] * 2,  # -> [20, 6], transposed
    "mixed": [(6, 20), (20, 6), (8, 8)],  # the square one keeps the standard form
}


@pytest.mark.parametrize("kind", sorted(GRAM_SHAPES))
@pytest.mark.parametrize(("steps", "cleanup"), [(5, 0), (10, 2)])
def test_gram_form_equals_the_loop_in_float64(kind: str, steps: int, cleanup: int) -> None:
    """The Gram form is the standard iteration rearranged: in float64 it equals the loop to rounding."""
    recipe = f"newton_schulz({steps}, cleanup={cleanup}, form=gram, restart=3) |> lr"
    for gs, updates in _run(recipe, GRAM_SHAPES[kind], 11, dtype=torch.float64, steps=2):
        for g, u in zip(gs, updates):
            assert u.dtype == torch.float64
            want = _ns_reference(g, steps, cleanup, dtype=torch.float64)
            torch.testing.assert_close(u, want, rtol=1e-10, atol=1e-12)


def _matmul_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_gram_form_does_fewer_matmul_flops_where_it_applies() -> None:
    """Counted by torch's flop counter. Standard: 5 x (X X^T, A A, B X) = 5 (4 r^2 c + 2 r^3).
    Gram with restart 3 runs [3, 2] iterations: each run builds R (2 r^2 c) and applies Q (2 r^2 c);
    inside, R R every iteration, P Q from the second, P R P (4 r^3) before the last: 8 r^2 c + 28 r^3."""
    from soapdsl.ops._linalg import newton_schulz

    r, c, batch = 8, 40, 3
    g = torch.randn(batch, r, c)
    standard = _matmul_flops(lambda: newton_schulz(g, 5, COEFFS))
    gram = _matmul_flops(lambda: newton_schulz(g, 5, COEFFS, form="gram", restart=3))
    assert standard == batch * 5 * (4 * r * r * c + 2 * r**3)
    assert gram == batch * (8 * r * r * c + 28 * r**3)
    assert gram < 0.62 * standard
    # transposed the same; square: the Gram form would cost more, so the standard one runs
    assert _matmul_flops(lambda: newton_schulz(g.mT, 5, COEFFS, form="gram")) == gram
    sq = torch.randn(batch, r, r)
    assert _matmul_flops(lambda: newton_schulz(sq, 5, COEFFS, form="gram")) == batch * 5 * 6 * r**3


def _ill_conditioned(r: int, c: int, seed: int) -> torch.Tensor:
    """[4, r, c] with singular values spread log-evenly over [1e-6, 1] (what momentum looks like
    late in training, and where the Gram matrix's squared spread hurts)."""
    gen = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(4, r, c, generator=gen, dtype=torch.float64), full_matrices=False)
    return (u * torch.logspace(0, -6, r, dtype=torch.float64)) @ vh


@pytest.mark.parametrize(("steps", "cleanup"), [(5, 0), (10, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gram_form_fp32_error_stays_at_the_standard_forms_level(steps: int, cleanup: int, seed: int) -> None:
    """Against a float64 run: with restarts every 3 iterations the fp32 Gram form's error is the
    standard form's (0.6-1.6x measured). Without restarts it is 40x and more after 5 iterations
    and NaN after 12: that is what ``restart`` is for."""
    from soapdsl.ops._linalg import newton_schulz

    g = _ill_conditioned(32, 128, seed)
    exact = newton_schulz(g, steps, COEFFS, cleanup)

    def err(**kw) -> float:
        out = newton_schulz(g.float(), steps, COEFFS, cleanup, **kw).double()
        return float((out - exact).abs().max() / exact.abs().max())

    standard = err()
    assert standard < 1e-2
    assert err(form="gram", restart=3) < 2 * standard
    unrestarted = err(form="gram", restart=99)
    assert not unrestarted < 10 * standard  # NaN compares False


def test_gram_form_iterates_bf16_in_fp32() -> None:
    """A bf16 update with dtype=auto iterates in bf16 in the standard form; the Gram form promotes
    it to fp32, so it is the fp32 loop's result up to the final bf16 rounding (2^-8 relative)."""
    from soapdsl.ops._linalg import newton_schulz

    gen = torch.Generator().manual_seed(12)
    g = torch.randn(3, 6, 20, generator=gen).to(torch.bfloat16)
    want = torch.stack([_ns_reference(m, 5) for m in g])
    gram = newton_schulz(g, 5, COEFFS, form="gram")
    assert gram.dtype == torch.bfloat16
    torch.testing.assert_close(gram.float(), want, rtol=2**-8, atol=1e-5)
    standard = newton_schulz(g, 5, COEFFS)  # bf16 all the way: 8x further off, measured
    assert float((standard.float() - want).abs().max()) > 5 * float((gram.float() - want).abs().max())


# -- the halved standard form (CPU, fp32/fp64, r even and >= HALVES_MIN_ROWS) -------------------


@pytest.fixture
def halves_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower the threshold so that the small test shapes take the halved form where r is even."""
    from soapdsl.ops import _linalg

    monkeypatch.setattr(_linalg, "HALVES_MIN_ROWS", 2)


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize(("steps", "cleanup"), [(5, 0), (10, 2)])
def test_halved_form_equals_the_loop_in_float64(kind: str, steps: int, cleanup: int, halves_everywhere) -> None:
    """Computing X X^T and A^2 by their upper blocks is the same iteration: in float64 it equals
    the loop to rounding (the odd 5 x 5 in "mixed" keeps the plain form)."""
    recipe = f"newton_schulz({steps}, cleanup={cleanup}) |> lr"
    for gs, updates in _run(recipe, SHAPES[kind], 13, dtype=torch.float64, steps=2):
        for g, u in zip(gs, updates):
            want = _ns_reference(g, steps, cleanup, dtype=torch.float64)
            torch.testing.assert_close(u, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_halved_form_matches_the_fp32_loop(kind: str, halves_everywhere) -> None:
    for gs, updates in _run("newton_schulz(5) |> lr", SHAPES[kind], 14, steps=2):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _ns_reference(g, 5), **FP32)


def _halved_flops(r: int, c: int, steps: int, cleanup: int) -> int:
    """Per matrix: a quintic step computes 3 of the 4 blocks of X X^T (3/4 of 2 r^2 c) and of
    A A (3/4 of 2 r^3), and all of M X (2 r^2 c); a cubic one has no A A."""
    sym = 3 * r * r * c // 2  # 3/4 of X X^T
    return steps * (sym + 3 * r**3 // 2 + 2 * r * r * c) + cleanup * (sym + 2 * r * r * c)


def test_halved_form_counts_three_quarters_of_the_symmetric_products(halves_everywhere) -> None:
    from soapdsl.ops._linalg import newton_schulz, newton_schulz_flops

    r, c, batch = 8, 40, 3
    g = torch.randn(batch, r, c)
    assert _matmul_flops(lambda: newton_schulz(g, 5, COEFFS, 2)) == batch * _halved_flops(r, c, 5, 2)
    assert _matmul_flops(lambda: newton_schulz(g.mT, 5, COEFFS, 2)) == batch * _halved_flops(r, c, 5, 2)
    assert newton_schulz_flops(r, c, 5, 2, "halved") == _halved_flops(r, c, 5, 2)
    # the plain count: odd r, bf16 (each half sum would round once more), or fp32 on the meta device
    plain = newton_schulz_flops
    odd = torch.randn(batch, 7, c)
    assert _matmul_flops(lambda: newton_schulz(odd, 5, COEFFS, 2)) == batch * plain(7, c, 5, 2)
    assert _matmul_flops(lambda: newton_schulz(g.bfloat16(), 5, COEFFS, 2)) == batch * plain(r, c, 5, 2)
    meta = g.to("meta")
    assert _matmul_flops(lambda: newton_schulz(meta, 5, COEFFS, 2)) == batch * plain(r, c, 5, 2)


def test_halved_form_runs_from_the_default_threshold() -> None:
    from soapdsl.ops._linalg import HALVES_MIN_ROWS, newton_schulz, newton_schulz_flops

    r, c = HALVES_MIN_ROWS, HALVES_MIN_ROWS + 64
    for rows, want in ((r, _halved_flops(r, c, 5, 0)), (r - 2, newton_schulz_flops(r - 2, c, 5, 0))):
        g = torch.randn(1, c, rows)  # tall: the threshold is on the short side
        assert _matmul_flops(lambda g=g: newton_schulz(g, 5, COEFFS)) == want


@pytest.mark.parametrize(("steps", "cleanup"), [(5, 0), (10, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_halved_form_fp32_error_stays_at_the_plain_forms_level(
    steps: int, cleanup: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a float64 run on ill-conditioned matrices of the benchmark's width, the halved fp32
    iteration is as close as the plain one (0.87-1.24x its error measured over 4 seeds; the
    halves' sums round in another order)."""
    from soapdsl.ops import _linalg

    g = _ill_conditioned(256, 512, seed)
    exact = _linalg.newton_schulz(g, steps, COEFFS, cleanup)

    def err() -> float:
        out = _linalg.newton_schulz(g.float(), steps, COEFFS, cleanup).double()
        return float((out - exact).abs().max() / exact.abs().max())

    monkeypatch.setattr(_linalg, "SPECTRAL_MIN_ROWS", 10**9)  # (10, 2) would run spectrally
    halved = err()
    monkeypatch.setattr(_linalg, "HALVES_MIN_ROWS", 10**9)
    plain = err()
    assert plain < 1e-2
    assert halved < 1.5 * plain


@pytest.mark.parametrize(
    ("min_rows", "form"), [(2, "standard"), (10**9, "standard"), (10**9, "gram")], ids=["halved", "plain", "gram"]
)
def test_tall_batches_are_iterated_in_place_and_come_back_contiguous(min_rows: int, form: str, monkeypatch) -> None:
    """A tall batch iterates as the transpose (A = X^T X, X <- a X + X M; the Gram form
    X <- X Q^T) instead of on a transposed copy, so the result needs no strided pass in the
    stages after it."""
    from soapdsl.ops import _linalg

    monkeypatch.setattr(_linalg, "HALVES_MIN_ROWS", min_rows)
    g = torch.randn(3, 20, 6, dtype=torch.float64)
    out = _linalg.newton_schulz(g, 5, COEFFS, 2, form=form)
    assert out.is_contiguous()
    want = _linalg.newton_schulz(g.mT.contiguous(), 5, COEFFS, 2, form=form).mT
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    ("min_rows", "form", "shape"),
    [
        (2, "standard", (3, 6, 20)),
        (2, "standard", (3, 20, 6)),
        (10**9, "standard", (3, 20, 6)),
        (10**9, "gram", (3, 6, 20)),
        (10**9, "gram", (3, 20, 6)),
    ],
)
def test_scratch_memory_changes_nothing(min_rows: int, form: str, shape: tuple[int, ...], monkeypatch) -> None:
    """The op hands its own temporary input in as scratch: the iteration may use that memory
    (even when it is the input itself) and must give the same result; a scratch of another
    shape, dtype or layout is ignored."""
    from soapdsl.ops import _linalg

    monkeypatch.setattr(_linalg, "HALVES_MIN_ROWS", min_rows)
    g = torch.randn(shape, dtype=torch.float64)
    want = _linalg.newton_schulz(g, 5, COEFFS, 2, form=form)
    own = g.clone()  # the input is its own scratch
    torch.testing.assert_close(_linalg.newton_schulz(own, 5, COEFFS, 2, form=form, scratch=own), want, rtol=0, atol=0)
    got = _linalg.newton_schulz(g, 5, COEFFS, 2, form=form, scratch=torch.empty_like(g))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    wrong_dtype = torch.full(shape, 7.0)
    wrong_layout = torch.full((shape[0], shape[2], shape[1]), 7.0, dtype=torch.float64).mT
    for scratch in (wrong_dtype, wrong_layout):
        got = _linalg.newton_schulz(g, 5, COEFFS, 2, form=form, scratch=scratch)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert bool((scratch == 7.0).all())


# -- the spectral evaluation (standard form, fp32 on a CPU, where spectral_pays) ---------------


def _iterated(g: torch.Tensor, *args, **kw) -> torch.Tensor:
    """newton_schulz with the spectral evaluation switched off (halves where they pay)."""
    from soapdsl.ops import _linalg

    saved = _linalg.SPECTRAL_MIN_ROWS
    _linalg.SPECTRAL_MIN_ROWS = 10**9
    try:
        return _linalg.newton_schulz(g, *args, **kw)
    finally:
        _linalg.SPECTRAL_MIN_ROWS = saved


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize(("steps", "cleanup"), [(5, 0), (10, 2)])
def test_spectral_form_matches_the_fp32_loop(kind: str, steps: int, cleanup: int, spectral_everywhere) -> None:
    """The same polynomial through the eigenvalues of X X^T: the per-matrix fp32 loop's result,
    for wide, tall, square and conv batches and with the cubic cleanup."""
    recipe = f"newton_schulz({steps}, cleanup={cleanup}) |> lr"
    for gs, updates in _run(recipe, SHAPES[kind], 15, steps=2):
        for g, u in zip(gs, updates):
            torch.testing.assert_close(u, _ns_reference(g, steps, cleanup), **FP32)
    assert spectral_everywhere


def _low_rank(r: int, c: int, seed: int) -> torch.Tensor:
    """[2, r, c]: rank 8 plus noise 1e-3 of it (a momentum dominated by a few directions)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(2, r, 8, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 8, c, generator=gen, dtype=torch.float64
    )
    return low + 1e-3 * torch.randn(2, r, c, generator=gen, dtype=torch.float64)


def _heavy_tailed(r: int, c: int, seed: int) -> torch.Tensor:
    """[2, r, c] of cubed normals (entries over 5 orders of magnitude, like m / sqrt(v))."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, r, c, generator=gen, dtype=torch.float64) ** 3


@pytest.mark.parametrize("make", [_ill_conditioned, _low_rank, _heavy_tailed], ids=["ill", "low_rank", "heavy"])
@pytest.mark.parametrize("shape", [(256, 512), (512, 256), (128, 384)], ids=["wide", "tall", "r128"])
def test_spectral_form_fp32_error_is_at_most_the_iterations(make, shape: tuple[int, int]) -> None:
    """Against a float64 iteration, SOAP-Muon's 10 + 2 steps in fp32 at the sizes where the
    spectral evaluation runs by default: it is closer than the fp32 iteration (0.16-0.72x the
    iteration's error, measured over 3 seeds; what is left is mostly the rounding of the input
    to fp32). In fp32 the Gram matrix would lose the small singular values (errors of 1e-3 to
    7 measured), which is why the spectral form works in float64."""
    from soapdsl.ops import _linalg

    r, c = shape
    g = make(min(r, c), max(r, c), 0)
    if r > c:
        g = g.mT.contiguous()
    exact = _linalg.newton_schulz(g, 10, COEFFS, 2)
    g32 = g.float()
    wide = g32 if r <= c else g32.mT
    assert _linalg.spectral_pays(wide, 10, 2)

    def err(out: torch.Tensor) -> float:
        return float((out.double() - exact).abs().max() / exact.abs().max())

    spectral = _linalg.newton_schulz(g32, 10, COEFFS, 2)
    iterated = _iterated(g32, 10, COEFFS, 2)
    assert spectral.dtype == torch.float32 and spectral.is_contiguous()
    assert err(iterated) < 1e-2
    assert err(spectral) <= err(iterated)


def test_spectral_form_runs_where_it_counts_less() -> None:
    """SOAP-Muon's 10 + 2 steps on rectangular fp32 matrices from 128 rows on a CPU; not Muon's
    5 steps (the iteration is cheaper), not square 256 x 256, not below 128 rows, not fp64 (it
    would need more than float64 to stay as accurate), bf16 or off the CPU."""
    from soapdsl.ops._linalg import spectral_pays

    def pays(shape, steps=10, cleanup=2, dtype=torch.float32, device="cpu") -> bool:
        return spectral_pays(torch.empty(shape, dtype=dtype, device=device), steps, cleanup)

    assert pays((4, 256, 1024)) and pays((1, 256, 768)) and pays((1, 128, 512)) and pays((1, 512, 1024))
    assert not pays((4, 256, 1024), 5, 0)
    assert not pays((1, 256, 256)) and not pays((1, 128, 256)) and not pays((1, 64, 256))
    assert not pays((1, 256, 1024), dtype=torch.float64) and not pays((1, 256, 1024), dtype=torch.bfloat16)
    assert not pays((1, 256, 1024), device="meta")


def test_spectral_form_is_what_soap_muon_runs_at_full_width(monkeypatch) -> None:
    """Through the op: a tall 768 x 256 and a wide 256 x 1024 batch take the spectral evaluation
    under SOAP-Muon's steps, and Muon's 5 steps keep iterating."""
    from soapdsl.ops import _linalg

    shapes = []
    spectral = _linalg._spectral_newton_schulz
    monkeypatch.setattr(
        _linalg, "_spectral_newton_schulz", lambda x, *a: shapes.append(tuple(x.shape)) or spectral(x, *a)
    )
    _run("newton_schulz(10, cleanup=2) |> lr", [(768, 256), (256, 1024), (256, 256)], 16)
    assert sorted(shapes) == [(1, 256, 1024), (1, 768, 256)]
    shapes.clear()
    _run("newton_schulz(5) |> lr", [(768, 256), (256, 1024)], 16)
    assert shapes == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_spectral_form_iterates_a_non_finite_batch(bad: float, spectral_everywhere) -> None:
    """A NaN or inf entry makes the Gram matrix non-finite, and LAPACK must not see it: the batch
    iterates instead and gives what the iteration gives (NaN where it spreads, as Muon does)."""
    g = torch.randn(2, 6, 10)
    g[0, 1, 2] = bad
    from soapdsl.ops._linalg import newton_schulz

    got = newton_schulz(g, 10, COEFFS, 2)
    assert spectral_everywhere
    want = _iterated(g, 10, COEFFS, 2)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[0].isnan().all())
    torch.testing.assert_close(got[1], want[1], **FP32)  # the finite matrix beside it is spectral


def test_spectral_form_iterates_when_lapack_fails(spectral_everywhere, monkeypatch) -> None:
    def fails(m):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    g = torch.randn(3, 6, 10)
    want = _iterated(g, 10, COEFFS, 2)
    monkeypatch.setattr(torch.linalg, "eigh", fails)
    from soapdsl.ops._linalg import newton_schulz

    torch.testing.assert_close(newton_schulz(g, 10, COEFFS, 2), want, rtol=0, atol=0)
    assert spectral_everywhere


@pytest.mark.parametrize("norm", ["fro", "spectral"])
@pytest.mark.parametrize("eps_mode", ["add", "clamp"])
def test_spectral_form_normalises_as_the_iteration(norm: str, eps_mode: str, spectral_everywhere) -> None:
    """The normalisation is the iteration's own (Frobenius or top singular value, eps added or
    clamped; eps=10 exceeds some of the norms), and eps=0 keeps a zero matrix zero."""
    from soapdsl.ops._linalg import newton_schulz

    gen = torch.Generator().manual_seed(17)
    g = torch.randn(3, 6, 10, generator=gen) * torch.tensor([0.5, 3.0, 30.0]).view(3, 1, 1)
    for eps in (1e-7, 10.0):
        got = newton_schulz(g, 10, COEFFS, 2, eps, eps_mode, norm_kind=norm)
        torch.testing.assert_close(got, _iterated(g, 10, COEFFS, 2, eps, eps_mode, norm_kind=norm), **FP32)
    g[1] = 0
    got = newton_schulz(g, 10, COEFFS, 2, 0.0, eps_mode, norm_kind=norm)
    assert torch.equal(got[1], torch.zeros(6, 10)) and bool(got.isfinite().all())
    assert spectral_everywhere


@pytest.mark.parametrize("shape", [(3, 6, 20), (3, 20, 6)], ids=["wide", "tall"])
def test_spectral_form_scratch_memory_changes_nothing(shape: tuple[int, ...], spectral_everywhere) -> None:
    """The input handed in as its own scratch may receive the result (it is read first, into
    float64); a scratch of another dtype or layout is ignored."""
    from soapdsl.ops._linalg import newton_schulz

    g = torch.randn(shape)
    want = newton_schulz(g, 10, COEFFS, 2)
    own = g.clone()
    torch.testing.assert_close(newton_schulz(own, 10, COEFFS, 2, scratch=own), want, rtol=0, atol=0)
    for scratch in (torch.full(shape, 7.0, dtype=torch.float64), torch.full(shape[:1] + shape[:0:-1], 7.0).mT):
        torch.testing.assert_close(newton_schulz(g, 10, COEFFS, 2, scratch=scratch), want, rtol=0, atol=0)
        assert bool((scratch == 7.0).all())
    assert spectral_everywhere


@pytest.mark.parametrize("shape", [(3, 6, 20), (3, 20, 6)], ids=["wide", "tall"])
def test_spectral_form_in_parts_is_the_same(shape: tuple[int, ...], spectral_everywhere, monkeypatch) -> None:
    """A large batch goes to float64 in parts along its long side (SPECTRAL_PART elements at a
    time, so it is never held in float64 whole): the Gram matrix summed over the parts and the
    result written part by part, also into the input itself, is the one-part result to fp32
    rounding."""
    from soapdsl.ops import _linalg

    g = torch.randn(shape)
    whole = _linalg.newton_schulz(g, 10, COEFFS, 2)
    tall = shape[1] > shape[2]
    monkeypatch.setattr(_linalg, "SPECTRAL_PART", 7 * 3 * 6)  # 7 of the long side's 20 a part: 7, 7, 6
    assert [p.size(-2 if tall else -1) for p in _linalg._long_parts(g, tall)] == [7, 7, 6]
    torch.testing.assert_close(_linalg.newton_schulz(g, 10, COEFFS, 2), whole, rtol=1e-6, atol=1e-7)
    own = g.clone()
    torch.testing.assert_close(_linalg.newton_schulz(own, 10, COEFFS, 2, scratch=own), whole, rtol=1e-6, atol=1e-7)
    assert len(spectral_everywhere) == 3
