"""shampoo: multiply the update by inverse roots of the gradient's Kronecker factors.

The expected values come from a plain one-parameter loop written here from the op's docstring
(factors contracted with ``tensordot``, inverse roots from ``eigh``), in float64. eps is large
enough (1e-3) that the roots of rank-deficient early factors are well defined.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64, through eigh
SHAPES = [(4, 6), (4, 6), (5, 5), (6,), (2, 3, 4)]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors are tiny: intra-op threads only add contention (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grads(seed: int, n: int, shapes=SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(n)]


def _stats(g: torch.Tensor, k: int) -> torch.Tensor:
    other = [i for i in range(g.dim()) if i != k]
    return torch.tensordot(g, g, dims=(other, other))


def _inv_root(f: torch.Tensor, e: float, eps: float) -> torch.Tensor:
    """(F + eps I)^(-e) of a symmetric PSD matrix."""
    vals, vecs = torch.linalg.eigh(f + eps * torch.eye(f.size(0), dtype=f.dtype))
    return vecs @ torch.diag(vals ** (-e)) @ vecs.T


def _apply(x: torch.Tensor, ps: dict[int, torch.Tensor]) -> torch.Tensor:
    """x x_k P_k over the factored dims (P_L X P_R for a matrix, P symmetric)."""
    for k, p in ps.items():
        x = torch.tensordot(p, x, dims=([1], [k])).movedim(0, k)
    return x


def _exponent(exponent, ndim: int) -> float:
    if exponent == "classic":
        return 1.0 / (2 * max(1, ndim))
    if exponent == "power_half":
        return 0.5
    return float(exponent)


class _Ref:
    def __init__(self, shape, beta, eps, freq, start, exponent, max_dim=8192, bias_correction=True):
        self.dims = [k for k, d in enumerate(shape) if d <= max_dim]
        self.f = {k: torch.zeros(shape[k], shape[k], dtype=torch.float64) for k in self.dims}
        self.p: dict[int, torch.Tensor] | None = None
        self.beta, self.eps, self.freq = beta, eps, freq
        self.start = freq if start < 0 else start
        self.e = _exponent(exponent, len(shape))
        self.bias_correction = bias_correction
        self.t = 0

    def step(self, g: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """The stage's output for value x (default g); None while it passes the value through."""
        self.t += 1
        for k in self.dims:
            s = _stats(g, k)
            self.f[k] = self.f[k] + s if self.beta == 1.0 else self.beta * self.f[k] + (1 - self.beta) * s
        # ALGORITHMS.md 5.2: "before start_preconditioning_step (default = f): P = A", so the first
        # root comes at t == start; DistributedShampoo then refreshes at t % f == 0 for t > start
        if self.t == self.start or (self.t % self.freq == 0 and self.t > self.start):
            # the factors bias-corrected before eps meets them (none for sums, beta = 1)
            c = 1 - self.beta**self.t if self.bias_correction and self.beta != 1.0 else 1.0
            self.p = {k: _inv_root(self.f[k] / c, self.e, self.eps) for k in self.dims}
        if self.p is None:
            return None
        return _apply(g if x is None else x, self.p)


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g), "shampoo must not write into the gradient"
    return [b - p for b, p in zip(before, params)]


def _check(recipe: str, refs, shapes, seed: int, steps: int, **args) -> None:
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build(recipe, [(f"p{i}", p) for i, p in enumerate(params)], **args)
    for gs in _grads(seed, steps, shapes):
        updates = _step(opt, params, gs)
        for p, ref, g, u in zip(params, refs, gs, updates):
            want = ref.step(g)
            torch.testing.assert_close(u, g if want is None else want, **TOL)
            for k in ref.dims:
                torch.testing.assert_close(opt.state[p][f"0.shampoo.F{k}"], ref.f[k], **TOL)
                if ref.p is not None:
                    torch.testing.assert_close(opt.state[p][f"0.shampoo.P{k}"], ref.p[k], **TOL)
            assert opt.state[p]["0.shampoo.ready"] is (ref.p is not None)


@pytest.mark.parametrize("batch", [True, False], ids=["stacked", "per_param"])
@pytest.mark.parametrize("exponent", ["classic", "power_half", "0.3"])
def test_matches_reference(exponent: str, batch: bool) -> None:
    """Roots at t = 2, 4, 6 from the factors including that step's gradient; pass-through at t = 1."""
    beta, eps, freq = 0.9, 1e-3, 2
    refs = [_Ref(s, beta, eps, freq, -1, exponent) for s in SHAPES]
    settings = "" if batch else " [batch=false]"
    recipe = (
        f"recipe t(lr=1.0):\n  route default{settings}: shampoo({beta}, {eps}, freq={freq}, exponent={exponent}) |> lr"
    )
    _check(recipe, refs, SHAPES, 0, 7)


def test_bias_correction_false_roots_the_factors_themselves() -> None:
    """bias_correction=false: (F + eps I)^(-e), ALGORITHMS.md 5.2's formula as written; the default
    (DistributedShampoo's) roots F / (1 - beta^t), and the two differ at this eps."""
    beta, eps, freq = 0.9, 1e-3, 2
    for correct in (True, False):
        refs = [_Ref(s, beta, eps, freq, -1, "classic", bias_correction=correct) for s in SHAPES]
        flag = "true" if correct else "false"
        _check(f"shampoo({beta}, {eps}, freq={freq}, bias_correction={flag}) |> lr", refs, SHAPES, 4, 5, lr=1.0)
    a, b = (_Ref((4, 6), beta, eps, freq, -1, "classic", bias_correction=c) for c in (True, False))
    (g,) = _grads(4, 1, [(4, 6)])[0]
    a.step(g), b.step(g)
    assert not torch.allclose(a.step(g), b.step(g), rtol=1e-3)


def test_classic_exponent_per_order() -> None:
    """classic: 1/(2 ndim) per factor: 1/2 for a vector, 1/4 for a matrix, 1/6 for a 3-D tensor."""
    assert [_exponent("classic", len(s)) for s in [(6,), (4, 6), (2, 3, 4)]] == [0.5, 0.25, 1 / 6]
    shapes = [(6,), (4, 6), (2, 3, 4)]
    # with a single gradient and power 1/(2 ndim), a vector g gives (g g^T + eps)^(-1/2) g
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build("shampoo(0.0, 1e-3, freq=1) |> lr", params, lr=1.0)
    (gs,) = _grads(1, 1, shapes)
    u = _step(opt, params, gs)
    g = gs[0]
    torch.testing.assert_close(u[0], _inv_root(torch.outer(g, g), 0.5, 1e-3) @ g, **TOL)


def test_beta_one_accumulates_sums() -> None:
    """beta = 1: F_k += G_(k) G_(k)^T (AdaGrad-style sums)."""
    refs = [_Ref(s, 1.0, 1e-3, 1, -1, "power_half") for s in SHAPES]
    _check("shampoo(1.0, 1e-3, freq=1, exponent=power_half) |> lr", refs, SHAPES, 2, 4, lr=1.0)
    params = [torch.zeros(5, 5, dtype=torch.float64)]
    opt = soapdsl.build("shampoo(1.0, freq=3) |> lr", params, lr=1.0)
    grads = _grads(3, 3, [(5, 5)])
    for (g,) in grads:
        _step(opt, params, [g])
    total = sum(g @ g.T for (g,) in grads)
    torch.testing.assert_close(opt.state[params[0]]["0.shampoo.F0"], total, **TOL)


def test_factors_take_the_current_gradient_before_use() -> None:
    """freq=1, beta=0: each step's root comes from that step's gradient alone."""
    shape = (5, 3)
    params = [torch.zeros(shape, dtype=torch.float64)]
    opt = soapdsl.build("shampoo(0.0, 1e-2, freq=1, exponent=power_half) |> lr", params, lr=1.0)
    for (g,) in _grads(4, 3, [shape]):
        (u,) = _step(opt, params, [g])
        want = _inv_root(g @ g.T, 0.5, 1e-2) @ g @ _inv_root(g.T @ g, 0.5, 1e-2)
        torch.testing.assert_close(u, want, **TOL)


@pytest.mark.parametrize(
    ("freq", "start", "first"), [(2, 3, 3), (3, -1, 3), (2, 0, 2), (1, 1, 1), (4, 5, 5), (4, 2, 2), (5, 12, 12)]
)
def test_first_root_at_start(freq: int, start: int, first: int) -> None:
    """Steps before `start` pass the update through unchanged; step `start` is preconditioned,
    also when it is not a multiple of freq (start=0 has no step of its own: the first multiple)."""
    refs = [_Ref(s, 0.9, 1e-3, freq, start, "classic") for s in SHAPES]
    recipe = f"shampoo(0.9, 1e-3, freq={freq}, start={start}) |> lr"
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    opt = soapdsl.build(recipe, params, lr=1.0)
    for t, gs in enumerate(_grads(5, first + 2), start=1):
        updates = _step(opt, params, gs)
        for ref, g, u in zip(refs, gs, updates):
            want = ref.step(g)
            assert (want is None) == (t < first)
            if t < first:
                torch.testing.assert_close(u, g, **TOL)  # up to the rounding of p - g + ...
            else:
                torch.testing.assert_close(u, want, **TOL)


def test_graft_branch_is_used_until_the_first_root() -> None:
    """Before the first root a following `graft(norm, from={...})` returns the branch's output
    itself; afterwards the preconditioned update takes the branch's norm (DistributedShampoo's
    Adam grafting). start=3 is not a multiple of freq=2: the first root still comes at t = 3."""
    b1, b2, geps = 0.9, 0.95, 1e-8
    recipe = (
        f"momentum({b1}) |> shampoo(0.9, 1e-3, freq=2, start=3)"
        f" |> graft(norm, from={{ rms_normalize({b2}, {geps}) }}) |> lr"
    )
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    opt = soapdsl.build(recipe, params, lr=1.0)
    refs = [_Ref(s, 0.9, 1e-3, 2, 3, "classic") for s in SHAPES]
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    vs = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t, gs in enumerate(_grads(6, 6), start=1):
        updates = _step(opt, params, gs)
        for i, (ref, g, u) in enumerate(zip(refs, gs, updates)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            adam = ms[i] / ((vs[i] / (1 - b2**t)).sqrt() + geps)
            pre = ref.step(g, ms[i])
            if t < 3:
                assert pre is None
                torch.testing.assert_close(u, adam, **TOL)
            else:
                torch.testing.assert_close(u, pre * adam.norm() / (pre.norm() + 1e-16), **TOL)


@pytest.mark.parametrize(
    ("freq", "start", "roots"),
    [(3, 4, [4, 6, 9, 12]), (4, 2, [2, 4, 8, 12]), (5, 7, [7, 10]), (3, -1, [3, 6, 9, 12]), (1, 3, list(range(3, 13)))],
)
def test_roots_at_start_then_at_multiples_of_freq(freq: int, start: int, roots: list[int]) -> None:
    """The inverse roots are computed at t == start and at t % freq == 0 for t > start
    (DistributedShampoo's schedule), each time from the factors including that step's gradient."""
    shape = (4, 6)
    params = [torch.zeros(shape, dtype=torch.float64)]
    opt = soapdsl.build(f"shampoo(0.9, 1e-3, freq={freq}, start={start}) |> lr", params, lr=1.0)
    ref = _Ref(shape, 0.9, 1e-3, freq, start, "classic")
    computed, last = [], torch.zeros(shape[0], shape[0], dtype=torch.float64)  # P starts at zero
    for t, (g,) in enumerate(_grads(10, 12, [shape]), start=1):
        (u,) = _step(opt, params, [g])
        if not torch.equal(last, opt.state[params[0]]["0.shampoo.P0"]):
            computed.append(t)
            last = opt.state[params[0]]["0.shampoo.P0"].clone()
        want = ref.step(g)
        torch.testing.assert_close(u, g if want is None else want, **TOL)
        if ref.p is not None:
            torch.testing.assert_close(opt.state[params[0]]["0.shampoo.P0"], ref.p[0], **TOL)
    assert computed == roots


def test_dims_above_max_dim_are_not_factored() -> None:
    shapes = [(4, 12), (12, 4), (3, 8, 2), (12,)]
    refs = [_Ref(s, 0.9, 1e-3, 1, -1, "classic", max_dim=6) for s in shapes]
    assert [r.dims for r in refs] == [[0], [1], [0, 2], []]
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build("shampoo(0.9, 1e-3, freq=1, max_dim=6) |> lr", params, lr=1.0)
    for gs in _grads(7, 3, shapes):
        updates = _step(opt, params, gs)
        for p, ref, g, u in zip(params, refs, gs, updates):
            torch.testing.assert_close(u, ref.step(g), **TOL)
            assert sorted(k for k in opt.state[p] if ".F" in k) == [f"0.shampoo.F{k}" for k in ref.dims]
    # the classic exponent still counts every dim: 1/(2*3) for the 3-D tensor
    assert refs[2].e == 1 / 6


def test_beta_and_eps_follow_recipe_parameters() -> None:
    shape = (4, 5)
    params = [torch.zeros(shape, dtype=torch.float64)]
    opt = soapdsl.build("shampoo(b, e, freq=1) |> lr", params, lr=1.0, b=0.9, e=1e-3)
    ref = _Ref(shape, 0.9, 1e-3, 1, -1, "classic")
    for t, (g,) in enumerate(_grads(8, 4, [shape]), start=1):
        if t == 3:
            opt.param_groups[0]["b"] = 0.5
            opt.param_groups[0]["e"] = 1e-1
            ref.beta, ref.eps = 0.5, 1e-1
        (u,) = _step(opt, params, [g])
        torch.testing.assert_close(u, ref.step(g), **TOL)


def test_negative_eigenvalues_are_shifted_to_zero_before_eps() -> None:
    """Rounding leaves a PSD factor with small negative eigenvalues (in fp32 about 1e-7 of the
    largest, far past the recipe's eps of 1e-12). As DistributedShampoo does, the spectrum is
    shifted up by -lambda_min before eps is added, so the root stays bounded instead of raising
    a clamped negative number to -e. The factor is set in the state to have eigenvalue -1e-4."""
    eps = 1e-6
    p = torch.zeros(6, dtype=torch.float64)
    opt = soapdsl.build(f"shampoo(1.0, {eps}, freq=1) |> lr", [p], lr=1.0)  # a vector: exponent 1/2
    g1, g2 = (g for (g,) in _grads(11, 2, [(6,)]))
    _step(opt, [p], [g1])
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64))
    lam = torch.tensor([2.0, 1.0, 0.5, 0.1, 1e-3, -1e-4], dtype=torch.float64)
    factor = q @ torch.diag(lam) @ q.T
    opt.state[p]["0.shampoo.F0"].copy_(factor - torch.outer(g2, g2))  # the step adds g2 g2^T back
    (u,) = _step(opt, [p], [g2])
    root = q @ torch.diag((lam - lam.min() + eps) ** -0.5) @ q.T
    torch.testing.assert_close(opt.state[p]["0.shampoo.P0"], root, **TOL)
    torch.testing.assert_close(u, root @ g2, **TOL)


def test_float32_parameters() -> None:
    """fp32 parameters keep fp32 factors; the update matches the float64 loop to fp32 precision."""
    shape = (6, 4)
    p = torch.zeros(shape)
    opt = soapdsl.build("shampoo(0.9, 1e-3, freq=1) |> lr", [p], lr=1.0)
    ref = _Ref(shape, 0.9, 1e-3, 1, -1, "classic")
    for (g,) in _grads(9, 4, [shape]):
        before = p.clone()
        p.grad = g.float()
        opt.step()
        want = ref.step(g.float().double())
        assert p.dtype == torch.float32 and opt.state[p]["0.shampoo.F0"].dtype == torch.float32
        assert float(((before - p).double() - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("exponent", [4, 2, 1.5, 0, -0.25])
def test_exponent_outside_0_1_is_refused_with_the_root_it_means(exponent):
    """exponent is the power itself: 4 (DistributedShampoo's override spelling of an inverse
    4th root) froze training from the first preconditioner, and larger values gave NaN."""
    with pytest.raises(soapdsl.SoapArgumentError, match=r"must be in \(0, 1\]"):
        soapdsl.build("shampoo", torch.nn.Linear(4, 3), exponent=exponent)
    if exponent == 4:
        with pytest.raises(soapdsl.SoapArgumentError, match=r"inverse 4th root is exponent=0\.25"):
            soapdsl.build("shampoo", torch.nn.Linear(4, 3), exponent=exponent)
