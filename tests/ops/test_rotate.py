"""rotate: run a block in the eigenbasis of Kronecker-factored gradient statistics (SOAP's basis).

The expected values come from a plain one-parameter loop written here from the op's docstring and
ALGORITHMS.md section 2.3 (mode products through ``tensordot``, ``eigh`` flipped to descending order,
the sort + one power iteration + QR refresh), in float64. Where a factor is rank-deficient at the
first step (a 4 x 6 gradient has a 6 x 6 right factor of rank 4) its null-space eigenvectors are
arbitrary: the reference then checks that the op's first basis is *an* eigenbasis in descending
order and adopts it; on full-rank factors it must equal ``eigh``'s up to the sign of each column.
"""

from __future__ import annotations

import copy

import pytest
import torch

import soapdsl
from tests.conftest import assert_close_where_defined, in_basis

TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64; eigh/QR and a divide by sqrt(v) amplify rounding a little

# body of the reference scope: Adam's direction in the rotated space (SOAP, eps on the raw root)
B1, B2, EPS = 0.9, 0.95, 1e-8
ADAM_IN = f"momentum({B1}) |> rms_normalize({B2}, {EPS}, eps_at=raw, correct=false)"
ADAM_ONLY = f"rms_normalize({B2}, {EPS}, eps_at=raw, correct=false)"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors are tiny: intra-op threads only add contention (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a plain reference, one parameter at a time ----------------------------------------------


_rot = in_basis  # x x_k Q_k^T along each dim k in qs (Q_L^T X Q_R for a matrix)


def _unrot(x: torch.Tensor, qs: dict[int, torch.Tensor]) -> torch.Tensor:
    """x x_k Q_k along each dim k in qs (Q_L X Q_R^T for a matrix)."""
    for k, q in qs.items():
        x = torch.tensordot(q, x, dims=([1], [k])).movedim(0, k)
    return x


def _stats(g: torch.Tensor, k: int) -> torch.Tensor:
    """G_(k) G_(k)^T: contract g with itself over every dim but k (outer product for a vector)."""
    other = [i for i in range(g.dim()) if i != k]
    return torch.tensordot(g, g, dims=(other, other))


def _eigh_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(m)
    return vals.flip(-1), vecs.flip(-1)


def _merge(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """ALGORITHMS.md 2.3, merge_dims."""
    out: list[int] = []
    c = 1
    for s in shape:
        if c * s > max_dim:
            if c > 1:
                out.append(c)
                c = s
            else:
                out.append(s)
        else:
            c *= s
    if c > 1 or not out:
        out.append(c)
    return tuple(out)


def _dims(side: str, shape: tuple[int, ...], max_dim: int = 10000, precondition_1d: bool = False) -> list[int]:
    """The factored dims, from the op's documentation of `side`, `max_dim` and `precondition_1d`."""
    if len(shape) == 0:
        return []
    if len(shape) == 1:
        return [0] if precondition_1d and shape[0] <= max_dim else []
    first, last = 0, len(shape) - 1
    dims = {
        "both": list(range(len(shape))),
        "left": [first],
        "right": [last],
        "smaller": [first] if shape[first] < shape[last] else [last],  # square: right
        "larger": [first] if shape[first] >= shape[last] else [last],  # square: left
    }[side]
    return [k for k in dims if shape[k] <= max_dim]


def _assert_descending_eigenbasis(q: torch.Tensor, m: torch.Tensor) -> None:
    """q is orthonormal and q^T m q = diag(eigenvalues of m, descending)."""
    eye = torch.eye(q.size(0), dtype=q.dtype)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
    vals = torch.linalg.eigvalsh(m).flip(0)
    scale = float(vals.abs().max()) + 1e-300
    torch.testing.assert_close(q.T @ m @ q, torch.diag(vals), rtol=0, atol=1e-11 * scale)


class _Ref:
    """One parameter through ``[momentum(B1) |>] rotate(...) { [momentum(B1) |>] rms_normalize(B2, raw) }``.

    ``momentum``: "in" (inside the scope, kept rotated), "out" (before the scope, original space) or
    "none". ``source``: "grad" (factors of the raw gradient; the block sees the rotated gradient)
    or "input" (factors of the value entering the scope, which doubles as the block's gradient).
    """

    def __init__(self, shape, dims, beta=0.95, freq=10, offset=0, momentum="in", source="grad", inner=None):
        self.shape = tuple(shape)
        self.inner = tuple(inner or shape)
        self.dims, self.beta, self.freq, self.offset = dims, beta, freq, offset
        self.momentum, self.source = momentum, source
        z = torch.zeros(self.inner, dtype=torch.float64)
        self.m_in, self.v = z.clone(), z.clone()
        self.m_out = torch.zeros(self.shape, dtype=torch.float64)
        self.gg = {k: torch.zeros(self.inner[k], self.inner[k], dtype=torch.float64) for k in dims}
        self.q: dict[int, torch.Tensor] | None = None
        self.t = 0

    def _update_factors(self, s: torch.Tensor) -> None:
        for k in self.dims:
            self.gg[k] = self.beta * self.gg[k] + (1 - self.beta) * _stats(s, k)

    def init(self, s: torch.Tensor, op_q: dict[int, torch.Tensor]) -> None:
        """First basis: check the op's is a descending eigenbasis of the first factor, then adopt it."""
        self._update_factors(s.reshape(self.inner))
        for k in self.dims:
            _assert_descending_eigenbasis(op_q[k], self.gg[k])
        self.q = {k: op_q[k].clone() for k in self.dims}

    def step(self, g: torch.Tensor) -> torch.Tensor:
        """One update (the basis already exists); returns the update."""
        assert self.q is not None
        self.t += 1
        x = g
        if self.momentum == "out":
            self.m_out = B1 * self.m_out + (1 - B1) * g
            x = self.m_out
        src = (x if self.source == "input" else g).reshape(self.inner)
        xr = _rot(x.reshape(self.inner), self.q)
        gr = _rot(src, self.q)
        if self.momentum == "in":
            self.m_in = B1 * self.m_in + (1 - B1) * xr
            xr = self.m_in
        self.v = B2 * self.v + (1 - B2) * gr * gr
        update = _unrot(xr / (self.v.sqrt() + EPS), self.q).reshape(self.shape)
        self._update_factors(src)
        if self.t % self.freq == self.offset % self.freq:
            self.refresh()
        return update

    def refresh(self) -> None:
        assert self.q is not None
        for k in self.dims:
            q_old, gg = self.q[k], self.gg[k]
            est = torch.diagonal(q_old.T @ gg @ q_old)
            idx = torch.argsort(est, descending=True)
            self.v = self.v.index_select(k, idx)
            q_new = torch.linalg.qr(gg @ q_old[:, idx]).Q
            self.m_in = _rot(_unrot(self.m_in, {k: q_old}), {k: q_new})  # exact re-rotation
            self.q[k] = q_new


# -- running the op ---------------------------------------------------------------------------


def _tensors(seed: int, shapes, n: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(n)]


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g), "rotate must not write into the gradient"
    return [b - p for b, p in zip(before, params)]


def _qs(opt, p, path: str, dims) -> dict[int, torch.Tensor]:
    return {k: opt.state[p][f"{path}.rotate.Q{k}"] for k in dims}


def _recipe(pipeline: str, batch: bool = True) -> str:
    settings = "" if batch else " [batch=false]"
    return f"recipe t(lr=1.0):\n  route default{settings}: {pipeline}"


MIXED = [(5, 5), (4, 6), (4, 6), (6, 4), (3, 4, 5)]


@pytest.mark.parametrize("batch", [True, False], ids=["stacked", "per_param"])
@pytest.mark.parametrize("side", ["both", "left", "right", "smaller", "larger"])
def test_matches_reference(side: str, batch: bool) -> None:
    """SOAP's step (momentum kept rotated) over 8 steps with refreshes at t = 3, 6, for mixed shapes."""
    beta, freq = 0.9, 3
    (params,) = _tensors(0, MIXED)
    grads = _tensors(1, MIXED, 9)
    opt = soapdsl.build(
        _recipe(f"rotate({side}, freq={freq}, beta={beta}, skip_first=true) {{ {ADAM_IN} }} |> lr", batch),
        [(f"p{i}", p) for i, p in enumerate(params)],
    )
    refs = [_Ref(p.shape, _dims(side, tuple(p.shape)), beta, freq) for p in params]
    for u in _step(opt, params, grads[0]):  # skip_first: the first step only builds the bases
        assert torch.count_nonzero(u) == 0
    for p, ref, g in zip(params, refs, grads[0]):
        assert set(k for k in opt.state[p] if k.startswith("0.rotate.Q")) == {f"0.rotate.Q{k}" for k in ref.dims}
        ref.init(g, _qs(opt, p, "0", ref.dims))
    for gs in grads[1:]:
        updates = _step(opt, params, gs)
        for p, ref, g, u in zip(params, refs, gs, updates):
            torch.testing.assert_close(u, ref.step(g), **TOL)
            torch.testing.assert_close(opt.state[p]["0.0.momentum.buf"], ref.m_in, **TOL)
            torch.testing.assert_close(opt.state[p]["0.1.rms_normalize.v"], ref.v, **TOL)
            for k in ref.dims:
                torch.testing.assert_close(opt.state[p][f"0.rotate.GG{k}"], ref.gg[k], **TOL)
                torch.testing.assert_close(opt.state[p][f"0.rotate.Q{k}"], ref.q[k], **TOL)


def test_skip_first_changes_nothing() -> None:
    """skip_first: the first step only builds the factors and bases; no stage runs, not even one
    placed before the scope, and the step count stays 0."""
    (params,) = _tensors(2, [(4, 6), (5,)])
    before = [p.clone() for p in params]
    opt = soapdsl.build("momentum(0.9) |> rotate(both, skip_first=true) { sign } |> lr", params, lr=1.0)
    (gs,) = _tensors(3, [(4, 6), (5,)])
    _step(opt, params, gs)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert float(opt.state[p]["step"]) == 0
        assert torch.count_nonzero(opt.state[p]["0.momentum.buf"]) == 0
        assert opt.state[p]["1.rotate.ready"] is True
    # the second step runs: momentum = 0.1 g, rotated, signed, rotated back
    (gs2,) = _tensors(4, [(4, 6), (5,)])
    updates = _step(opt, params, gs2)
    p = params[0]
    qs = _qs(opt, p, "1", [0, 1])
    torch.testing.assert_close(opt.state[p]["0.momentum.buf"], 0.1 * gs2[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(updates[0], _unrot(torch.sign(_rot(0.1 * gs2[0], qs)), qs), **TOL)
    torch.testing.assert_close(updates[1], torch.sign(gs2[1]), **TOL)  # a vector is not rotated


@pytest.mark.parametrize("shape", [(5, 5), (3, 4, 5), (6,)])
def test_first_basis_is_descending_eigh(shape: tuple[int, ...]) -> None:
    """GG_k = (1 - b) G0_(k) G0_(k)^T and Q_k = its eigenvectors, descending: unique up to the sign
    of each column for the full-rank factors of a square matrix and a 3-D tensor; a vector's
    rank-one factor fixes only its leading eigenvector."""
    beta = 0.8
    p = torch.zeros(shape, dtype=torch.float64)
    opt = soapdsl.build(f"rotate(both, beta={beta}, precondition_1d=true, skip_first=true) {{ sign }}", [p], lr=1.0)
    ((g,),) = _tensors(5, [shape])
    _step(opt, [p], [g])
    assert torch.count_nonzero(p) == 0
    for k in range(len(shape)):
        gg = opt.state[p][f"0.rotate.GG{k}"]
        torch.testing.assert_close(gg, (1 - beta) * _stats(g, k), rtol=1e-14, atol=1e-14)
        q = opt.state[p][f"0.rotate.Q{k}"]
        if len(shape) > 1:
            _, want = _eigh_desc(gg + 1e-30 * torch.eye(shape[k], dtype=gg.dtype))
            signs = torch.sign((q * want).sum(0))
            torch.testing.assert_close(q, want * signs, rtol=0, atol=1e-12)
        else:  # rank 1: the leading eigenvector is +-g/|g|, the rest span its complement
            torch.testing.assert_close(q[:, 0].abs(), (g / g.norm()).abs(), rtol=0, atol=1e-12)
            _assert_descending_eigenbasis(q, gg)


def test_first_step_without_skip_uses_its_own_basis() -> None:
    """Without skip_first the first step updates, in the basis built from its own gradient, and
    the factors take that gradient once (not again after the update)."""
    beta = 0.9
    shape = (5, 5)
    p = torch.zeros(shape, dtype=torch.float64)
    opt = soapdsl.build(f"rotate(both, beta={beta}, freq=1) {{ {ADAM_ONLY} }} |> lr", [p], lr=1.0)
    ((g,),) = _tensors(6, [shape])
    (u,) = _step(opt, [p], [g])
    assert float(opt.state[p]["step"]) == 1
    qs = _qs(opt, p, "0", [0, 1])
    for k in (0, 1):
        torch.testing.assert_close(opt.state[p][f"0.rotate.GG{k}"], (1 - beta) * _stats(g, k), rtol=1e-14, atol=1e-14)
        _assert_descending_eigenbasis(qs[k], (1 - beta) * _stats(g, k))
    gr = _rot(g, qs)
    v = (1 - B2) * gr * gr
    # the basis diagonalises g: its off-diagonal coordinates are rounding noise, divided by eps
    assert_close_where_defined(u, _unrot(gr / (v.sqrt() + EPS), qs), qs, g, **TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bases_stay_orthonormal(dtype: torch.dtype) -> None:
    """Q^T Q = I after many refreshes (freq=1: one per step), for every factored dim."""
    shapes = [(6, 4), (6, 4), (3, 4, 5), (7,)]
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    opt = soapdsl.build(f"rotate(both, freq=1, precondition_1d=true) {{ {ADAM_IN} }} |> lr", params, lr=1e-2)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for _ in range(12):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * torch.linspace(0.1, 3, p.shape[-1], dtype=dtype)
        opt.step()
    for p in params:
        for k in range(p.dim()):
            q = opt.state[p][f"0.rotate.Q{k}"]
            assert q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            torch.testing.assert_close(q.mT @ q, torch.eye(q.size(0), dtype=q.dtype), rtol=0, atol=atol)


@pytest.mark.parametrize(("freq", "offset"), [(3, 0), (3, 1), (3, 4), (1, 0), (4, 2)])
def test_refresh_schedule(freq: int, offset: int) -> None:
    """The basis changes after exactly the steps t with t % freq == offset % freq."""
    p = torch.zeros(5, 4, dtype=torch.float64)
    opt = soapdsl.build(f"rotate(both, freq={freq}, offset={offset}, skip_first=true) {{ sign }}", [p], lr=1.0)
    grads = _tensors(8, [(5, 4)], 13)
    _step(opt, [p], grads[0])
    for t, (g,) in enumerate(grads[1:], start=1):
        q_before = [opt.state[p][f"0.rotate.Q{k}"].clone() for k in (0, 1)]
        _step(opt, [p], [g])
        assert float(opt.state[p]["step"]) == t
        changed = [not torch.equal(q, opt.state[p][f"0.rotate.Q{k}"]) for k, q in zip((0, 1), q_before)]
        want = t % freq == offset % freq
        assert changed == [want, want], f"t={t}"


def test_one_refresh_by_hand() -> None:
    """At a refresh the momentum inside the block is re-rotated exactly into the new basis and
    rms_normalize's v is only permuted by the sorted eigenvalue estimates; computed here from the
    op's own state just before the refresh step."""
    beta, freq = 0.9, 2
    shape = (6, 4)
    p = torch.zeros(shape, dtype=torch.float64)
    opt = soapdsl.build(f"rotate(both, freq={freq}, beta={beta}, skip_first=true) {{ {ADAM_IN} }} |> lr", [p], lr=1.0)
    grads = _tensors(9, [shape], 3)
    _step(opt, [p], grads[0])  # init
    _step(opt, [p], grads[1])  # t = 1
    st = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    (g,) = grads[2]
    (u,) = _step(opt, [p], [g])  # t = 2: update, then refresh
    q_old = {k: st[f"0.rotate.Q{k}"] for k in (0, 1)}
    gr = _rot(g, q_old)
    m = B1 * st["0.0.momentum.buf"] + (1 - B1) * gr
    v = B2 * st["0.1.rms_normalize.v"] + (1 - B2) * gr * gr
    torch.testing.assert_close(u, _unrot(m / (v.sqrt() + EPS), q_old), **TOL)
    m_orig = _unrot(m, q_old)  # the momentum in the original space is basis-independent
    for k in (0, 1):
        gg = beta * st[f"0.rotate.GG{k}"] + (1 - beta) * _stats(g, k)
        torch.testing.assert_close(opt.state[p][f"0.rotate.GG{k}"], gg, **TOL)
        idx = torch.argsort(torch.diagonal(q_old[k].T @ gg @ q_old[k]), descending=True)
        assert not torch.equal(idx, torch.arange(shape[k])), "pick a seed where the refresh reorders"
        v = v.index_select(k, idx)
        q_new = torch.linalg.qr(gg @ q_old[k][:, idx]).Q
        torch.testing.assert_close(opt.state[p][f"0.rotate.Q{k}"], q_new, **TOL)
    q_new = {k: opt.state[p][f"0.rotate.Q{k}"] for k in (0, 1)}
    torch.testing.assert_close(opt.state[p]["0.1.rms_normalize.v"], v, **TOL)
    torch.testing.assert_close(opt.state[p]["0.0.momentum.buf"], _rot(m_orig, q_new), **TOL)


def test_momentum_inside_equals_momentum_outside() -> None:
    """ALGORITHMS.md 2.5: the rotated momentum (re-rotated at refreshes) and a momentum kept in the
    original space and rotated every step give the same updates, up to rounding."""
    shapes = [(5, 5), (4, 6), (3, 4, 5)]
    (a,) = _tensors(10, shapes)
    (b,) = _tensors(10, shapes)
    grads = _tensors(11, shapes, 9)
    inside = soapdsl.build(f"rotate(both, freq=2, skip_first=true) {{ {ADAM_IN} }} |> lr", a, lr=1.0)
    outside = soapdsl.build(
        f"momentum({B1}) |> rotate(both, freq=2, skip_first=true) {{ {ADAM_ONLY} }} |> lr", b, lr=1.0
    )
    refs = [_Ref(p.shape, _dims("both", tuple(p.shape)), 0.95, 2, momentum="out") for p in b]
    _step(inside, a, grads[0])
    _step(outside, b, grads[0])
    for p, ref, g in zip(b, refs, grads[0]):
        ref.init(g, _qs(outside, p, "1", ref.dims))
    for gs in grads[1:]:
        ua, ub = _step(inside, a, gs), _step(outside, b, gs)
        for x, y, ref, g in zip(ua, ub, refs, gs):
            torch.testing.assert_close(x, y, **TOL)
            torch.testing.assert_close(y, ref.step(g), **TOL)


def test_block_equals_bare_form() -> None:
    """`rotate(...) { body }` and `rotate(...) |> body` (the scope runs to the end) are the same."""
    shapes = [(4, 6), (4, 6), (5, 3), (7,)]
    (a,) = _tensors(12, shapes)
    (b,) = _tensors(12, shapes)
    block = soapdsl.build(f"rotate(both, freq=2, precondition_1d=true) {{ {ADAM_IN} }} |> lr", a, lr=0.1)
    bare = soapdsl.build(f"rotate(both, freq=2, precondition_1d=true) |> {ADAM_IN}", b, lr=0.1)
    for gs in _tensors(13, shapes, 6):
        _step(block, a, gs)
        _step(bare, b, gs)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
            assert block.state[p].keys() == bare.state[q].keys()
            for key, value in block.state[p].items():
                assert torch.equal(value, bare.state[q][key]) if torch.is_tensor(value) else value == bare.state[q][key]


def test_identity_basis_is_a_noop() -> None:
    """max_dim=0: no dim gets a factor, so the scope is exactly its body."""
    shapes = [(4, 6), (4, 6), (5,), ()]
    (a,) = _tensors(14, shapes)
    (b,) = _tensors(14, shapes)
    scoped = soapdsl.build(f"rotate(both, max_dim=0, freq=1, precondition_1d=true) {{ {ADAM_IN} }} |> lr", a, lr=1.0)
    plain = soapdsl.build(f"{ADAM_IN} |> lr", b, lr=1.0)
    for gs in _tensors(15, shapes, 5):
        _step(scoped, a, gs)
        _step(plain, b, gs)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
            assert not [k for k in scoped.state[p] if "GG" in k or ".Q" in k]
            assert torch.equal(scoped.state[p]["0.0.momentum.buf"], plain.state[q]["0.momentum.buf"])
            assert torch.equal(scoped.state[p]["0.1.rms_normalize.v"], plain.state[q]["1.rms_normalize.v"])


def _factor_keys(recipe: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    p = torch.zeros(shape)
    opt = soapdsl.build(recipe, [p], lr=1.0)
    p.grad = torch.ones(shape)
    opt.step()
    return {k.split(".")[-1]: tuple(v.shape) for k, v in opt.state[p].items() if ".rotate.GG" in k}


SIDES = {  # (side, shape) -> the factored dims and their sizes
    ("both", (6, 4)): {"GG0": (6, 6), "GG1": (4, 4)},
    ("left", (6, 4)): {"GG0": (6, 6)},
    ("right", (6, 4)): {"GG1": (4, 4)},
    ("smaller", (6, 4)): {"GG1": (4, 4)},
    ("larger", (6, 4)): {"GG0": (6, 6)},
    ("smaller", (4, 6)): {"GG0": (4, 4)},
    ("larger", (4, 6)): {"GG1": (6, 6)},
    ("smaller", (5, 5)): {"GG1": (5, 5)},  # square: right, as SOAP-Muon's "std"
    ("larger", (5, 5)): {"GG0": (5, 5)},
    ("left", (5, 5)): {"GG0": (5, 5)},
    ("right", (5, 5)): {"GG1": (5, 5)},
    ("both", (3, 4, 5)): {"GG0": (3, 3), "GG1": (4, 4), "GG2": (5, 5)},
    ("left", (3, 4, 5)): {"GG0": (3, 3)},
    ("right", (3, 4, 5)): {"GG2": (5, 5)},
    ("smaller", (3, 4, 5)): {"GG0": (3, 3)},
    ("larger", (3, 4, 5)): {"GG2": (5, 5)},
}


@pytest.mark.parametrize(("side", "shape"), list(SIDES), ids=[f"{s}-{'x'.join(map(str, d))}" for s, d in SIDES])
def test_side_picks_dims(side: str, shape: tuple[int, ...]) -> None:
    assert _factor_keys(f"rotate({side}) {{ sign }}", shape) == SIDES[(side, shape)]
    assert {f"GG{k}" for k in _dims(side, shape)} == set(SIDES[(side, shape)])


def test_dims_above_max_dim_get_no_factor() -> None:
    assert _factor_keys("rotate(both, max_dim=6) { sign }", (4, 12)) == {"GG0": (4, 4)}
    assert _factor_keys("rotate(smaller, max_dim=3) { sign }", (4, 12)) == {}
    assert _factor_keys("rotate(both, max_dim=6) { sign }", (7,)) == {}


def test_max_dim_none_has_no_bound() -> None:
    """max_dim=none: every dim that `side` names gets a factor, whatever its size (SOAP-Muon's
    "std" projection); the steps equal those with a bound above every dim."""
    big = soapdsl.build("rotate(smaller, max_dim=none) { sign } |> lr", [torch.zeros(2, 3)], lr=1.0)
    assert big.plan.routes[0].ops[0].factored((40000, 12000)) == [1]  # (the op itself: no 12000^2 eigh here)
    assert _factor_keys("rotate(smaller, max_dim=none) { sign }", (12, 11)) == {"GG1": (11, 11)}
    assert _factor_keys("rotate(both, max_dim=none, precondition_1d=true) { sign }", (7,)) == {"GG0": (7, 7)}
    merged = "rotate(both, max_dim=none, merge_dims=true) { sign }"
    assert _factor_keys(merged, (2, 3, 4)) == {"GG0": (24, 24)}
    shapes = [(9, 10), (11, 9), (3, 4, 5)]
    (a,) = _tensors(27, shapes)
    (b,) = _tensors(27, shapes)
    free = soapdsl.build(f"rotate(smaller, freq=2, max_dim=none) {{ {ADAM_IN} }} |> lr", a, lr=1.0)
    bound = soapdsl.build(f"rotate(smaller, freq=2, max_dim=11) {{ {ADAM_IN} }} |> lr", b, lr=1.0)
    for gs in _tensors(28, shapes, 5):
        _step(free, a, gs)
        _step(bound, b, gs)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    with pytest.raises(soapdsl.SoapArgumentError, match=r"must be >= 0, or none \(no bound\)"):
        soapdsl.build("rotate(smaller, max_dim=-1) { sign } |> lr", a, lr=1.0)


@pytest.mark.parametrize(
    ("shape", "max_dim", "fmt", "merged", "freq"),
    [
        ((3, 4, 5), 20, "channels_first", (12, 5), 2),
        # one 60 x 60 factor: it stays rank-deficient for 59 steps, where the power iteration's
        # null-space columns are rounding noise, so no refresh within the test
        ((3, 4, 5), 10000, "channels_first", (60,), 100),
        ((2, 3), 10, "channels_first", (6,), 5),  # the 50 x 100 quirk in small: one full factor
        ((7, 2, 3), 6, "channels_first", (7, 6), 2),  # 7 > max_dim: emitted alone, not factored
        ((2, 3, 3, 4), 8, "channels_last", (8, 3, 3), 2),  # NHWC -> NCHW (2, 4, 3, 3), then merged
        ((1, 1), 10, "channels_first", (1,), 2),  # nothing emitted before the end: the 1 is emitted
    ],
)
def test_merge_dims(shape, max_dim, fmt, merged, freq) -> None:
    """merge_dims rotates the reshaped tensor (ALGORITHMS.md 2.3's rule) and reshapes back."""
    assert _merge(shape if fmt == "channels_first" else (shape[0], shape[3], shape[1], shape[2]), max_dim) == merged
    recipe = (
        f"rotate(both, freq={freq}, merge_dims=true, max_dim={max_dim}, data_format={fmt}, skip_first=true)"
        f" {{ {ADAM_IN} }}"
    )
    dims = [k for k, d in enumerate(merged) if d <= max_dim]  # a merged dim may still be too large
    assert _factor_keys(recipe, shape) == {f"GG{k}": (merged[k], merged[k]) for k in dims}

    def to_inner(x):
        return (x.permute(0, 3, 1, 2) if fmt == "channels_last" else x).reshape(merged)

    def from_inner(y):
        if fmt == "channels_last":
            n, h, w, c = shape
            return y.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return y.reshape(shape)

    p = torch.zeros(shape, dtype=torch.float64)
    opt = soapdsl.build(recipe + " |> lr", [p], lr=1.0)
    grads = _tensors(16, [shape], 8)
    ref = _Ref(merged, dims, 0.95, freq)
    _step(opt, [p], grads[0])
    ref.init(to_inner(grads[0][0]), _qs(opt, p, "0", ref.dims))
    for (g,) in grads[1:]:
        (u,) = _step(opt, [p], [g])
        torch.testing.assert_close(u, from_inner(ref.step(to_inner(g))), **TOL)
        assert opt.state[p]["0.0.momentum.buf"].shape == merged


@pytest.mark.parametrize("precondition_1d", [False, True])
def test_vectors_and_scalars(precondition_1d: bool) -> None:
    """A vector gets a d x d factor only with precondition_1d; a 0-d parameter is never rotated."""
    shapes = [(7,), (7,), ()]
    (params,) = _tensors(17, shapes)
    flag = "true" if precondition_1d else "false"
    # a vector's factor gains rank 1 per step: refresh once it has full rank (7 gradients, t = 6)
    recipe = f"rotate(both, freq=6, precondition_1d={flag}, skip_first=true) {{ {ADAM_IN} }} |> lr"
    opt = soapdsl.build(recipe, params, lr=1.0)
    grads = _tensors(18, shapes, 9)
    refs = [_Ref(p.shape, _dims("both", tuple(p.shape), precondition_1d=precondition_1d), 0.95, 6) for p in params]
    _step(opt, params, grads[0])
    for p, ref, g in zip(params, refs, grads[0]):
        ref.init(g, _qs(opt, p, "0", ref.dims))
    assert refs[0].dims == ([0] if precondition_1d else []) and refs[2].dims == []
    for gs in grads[1:]:
        for u, ref, g in zip(_step(opt, params, gs), refs, gs):
            torch.testing.assert_close(u, ref.step(g), **TOL)


def test_source_input_uses_the_value_entering_the_scope() -> None:
    """source=input: the factors are of the scope's input (here a momentum), built at its first
    step, and the block's gradient is that input's rotation (iterative whitening)."""
    beta, freq = 0.9, 2
    shapes = [(5, 5), (4, 6)]
    (params,) = _tensors(19, shapes)
    opt = soapdsl.build(
        f"momentum({B1}) |> rotate(both, freq={freq}, beta={beta}, source=input) {{ {ADAM_ONLY} }} |> lr",
        params,
        lr=1.0,
    )
    grads = _tensors(20, shapes, 7)
    refs = [_Ref(p.shape, [0, 1], beta, freq, momentum="out", source="input") for p in params]
    for t, gs in enumerate(grads, start=1):
        updates = _step(opt, params, gs)
        for p, ref, g, u in zip(params, refs, gs, updates):
            if t == 1:  # the first step builds the basis from its own input, then runs the block in it
                qs = _qs(opt, p, "1", [0, 1])
                ref.init((1 - B1) * g, qs)
                first = dict(ref.gg)
                want = ref.step(g)
                ref.gg = first  # the factors take the first input once, not again after the update
                # that basis diagonalises the input: its off-diagonal coordinates are rounding noise
                assert_close_where_defined(u, want, qs, g, **TOL)
            else:
                want = ref.step(g)
                torch.testing.assert_close(u, want, **TOL)
            for k in (0, 1):
                torch.testing.assert_close(opt.state[p][f"1.rotate.GG{k}"], ref.gg[k], **TOL)


def test_negative_beta_falls_back() -> None:
    """beta < 0 means beta_fallback (SOAP's shampoo_beta=-1 meaning beta2)."""
    shapes = [(4, 6), (5, 5)]
    (a,) = _tensors(21, shapes)
    (b,) = _tensors(21, shapes)
    neg = soapdsl.build(f"rotate(both, freq=2, beta=-1, beta_fallback=0.7) {{ {ADAM_IN} }} |> lr", a, lr=1.0)
    pos = soapdsl.build(f"rotate(both, freq=2, beta=0.7) {{ {ADAM_IN} }} |> lr", b, lr=1.0)
    grads = _tensors(22, shapes, 5)
    for i, gs in enumerate(grads):
        _step(neg, a, gs)
        _step(pos, b, gs)
        if i == 0:
            for p, g in zip(a, gs):
                torch.testing.assert_close(neg.state[p]["0.rotate.GG0"], 0.3 * _stats(g, 0), rtol=1e-14, atol=1e-14)
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_zero_beta_keeps_only_the_latest_statistics() -> None:
    """beta = 0 is a decay like any other, not "unset": each factor is the last gradient's
    G_(k) G_(k)^T (SOAP's shampoo_beta=0 lerps with weight 1); only beta < 0 means beta_fallback."""
    shapes = [(4, 6), (5, 5)]
    (a,) = _tensors(21, shapes)
    opt = soapdsl.build(f"rotate(both, freq=2, beta=0, beta_fallback=0.7) {{ {ADAM_IN} }} |> lr", a, lr=1.0)
    for gs in _tensors(23, shapes, 5):
        _step(opt, a, gs)
        for p, g in zip(a, gs):
            for k in (0, 1):
                torch.testing.assert_close(opt.state[p][f"0.rotate.GG{k}"], _stats(g, k), rtol=1e-14, atol=1e-14)


FOLLOWED = (
    "recipe t(lr=1.0, b2=0.5):\n"
    "  route default: rotate(both, beta=-1, beta_fallback=b2, freq=100) { rms_normalize(b2, 1e-8) } |> lr"
)


def test_beta_is_resolved_at_each_parameters_first_step() -> None:
    """ALGORITHMS.md 2.2: SOAP's per-parameter state holds "the resolved shampoo_beta", fixed at
    the parameter's first step. A change of the recipe parameter later reaches the stage that
    follows it (rms_normalize) but not the factors; a parameter whose first step comes after the
    change resolves the new value."""
    p, q = torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64)
    opt = soapdsl.build(FOLLOWED, [p, q])
    gg = {p: torch.zeros(4, 4, dtype=torch.float64), q: torch.zeros(4, 4, dtype=torch.float64)}
    v = torch.zeros(4, 5, dtype=torch.float64)
    decay = {p: 0.5, q: 0.25}
    for i, (gp, gq) in enumerate(_tensors(23, [(4, 5), (4, 5)], 5)):
        b2 = 0.5 if i < 2 else 0.25
        opt.param_groups[0]["b2"] = b2
        p.grad, q.grad = gp.clone(), (gq.clone() if i >= 2 else None)  # q first steps at i = 2
        opt.step()
        for x, g in ((p, gp), (q, gq)):
            if x.grad is None:
                continue
            gg[x] = decay[x] * gg[x] + (1 - decay[x]) * _stats(g, 0)
            torch.testing.assert_close(opt.state[x]["0.rotate.GG0"], gg[x], rtol=1e-14, atol=1e-14)
            assert opt.state[x]["0.rotate.beta"] == decay[x]
        gr = _rot(gp, _qs(opt, p, "0", [0, 1]))  # the basis never refreshes (freq=100)
        v = b2 * v + (1 - b2) * gr * gr  # rms_normalize follows b2 at every step
        torch.testing.assert_close(opt.state[p]["0.0.rms_normalize.v"], v, rtol=1e-12, atol=1e-14)


def test_a_parameter_only_first_step_arguments_read_is_fixed() -> None:
    """With nothing else following it, a change could only reach parameters that have not
    stepped yet: the parameter is fixed when the optimizer is built, with the usual errors."""
    recipe = _recipe("rotate(both, beta=sb, freq=100) { sign } |> lr").replace("lr=1.0", "lr=1.0, sb=0.5")
    p = torch.zeros(4, 5, dtype=torch.float64)
    opt = soapdsl.build(recipe, [p])
    (g,) = _tensors(24, [(4, 5)])[0]
    _step(opt, [p], [g])
    saved = opt.state_dict()
    opt.param_groups[0]["sb"] = 0.25
    with pytest.raises(
        soapdsl.SoapArgumentError,
        match=r"sb is fixed when the optimizer is built \('rotate' reads it once, at each parameter's first step\)",
    ):
        _step(opt, [p], [g])
    other = soapdsl.build(recipe, [torch.zeros(4, 5, dtype=torch.float64)], sb=0.25)
    with pytest.raises(soapdsl.SoapStateError, match=r"the checkpoint was saved with sb=0.5"):
        other.load_state_dict(saved)


def test_resolved_beta_survives_a_state_dict_round_trip() -> None:
    """The resolved decay is host state of each parameter: a resumed run keeps it, whatever b2
    the new optimizer is built with, and continues bit for bit. A state dict without it (saved
    by an older soapdsl) resolves it from the param_group at the next step."""
    grads = _tensors(25, [(4, 5)], 6)
    p = torch.zeros(4, 5, dtype=torch.float64)
    opt = soapdsl.build(FOLLOWED, [p])
    for i, (g,) in enumerate(grads):
        if i == 2:
            opt.param_groups[0]["b2"] = 0.25
        _step(opt, [p], [g])
        if i == 3:
            saved, at = copy.deepcopy(opt.state_dict()), p.clone()
    q = at.clone()
    resumed = soapdsl.build(FOLLOWED, [q], b2=0.25)
    resumed.load_state_dict(saved)
    assert resumed.state[q]["0.rotate.beta"] == 0.5
    for (g,) in grads[4:]:
        _step(resumed, [q], [g])
    assert torch.equal(q, p)

    old = opt.state_dict()
    del old["state"][0]["0.rotate.beta"]
    r = p.clone()
    legacy = soapdsl.build(FOLLOWED, [r], b2=0.25)
    legacy.load_state_dict(old)
    _step(legacy, [r], grads[0])
    assert legacy.state[r]["0.rotate.beta"] == 0.25


def test_gradient_inside_is_rotated() -> None:
    """Inside the scope the raw gradient is the rotated one (add_grad reads it)."""
    p = torch.zeros(5, 4, dtype=torch.float64)
    opt = soapdsl.build("rotate(both, freq=100) { scale(0.0) |> add_grad(1.0) |> sign } |> lr", [p], lr=1.0)
    grads = _tensors(24, [(5, 4)], 3)
    for (g,) in grads:
        (u,) = _step(opt, [p], [g])
        qs = _qs(opt, p, "0", [0, 1])
        # the sign of a coordinate that is rounding noise (off the diagonal at the first step,
        # where the basis diagonalises g) is the machine's, not the algorithm's
        assert_close_where_defined(u, _unrot(torch.sign(_rot(g, qs)), qs), qs, g, **TOL)
        assert not torch.allclose(u, torch.sign(g))


def test_float32_parameters() -> None:
    """fp32 parameters keep fp32 state and match the float64 reference to fp32 precision."""
    shape = (5, 5)
    ((p64,),) = _tensors(25, [shape])
    p = p64.float()
    opt = soapdsl.build(f"rotate(both, freq=2, skip_first=true) {{ {ADAM_IN} }} |> lr", [p], lr=1.0)
    grads = _tensors(26, [shape], 5)
    ref = _Ref(shape, [0, 1], 0.95, 2)
    p.grad = grads[0][0].float()
    opt.step()
    # start the reference from the op's fp32 factors and bases (their eigh rounding is fp32's)
    ref.gg = {k: opt.state[p][f"0.rotate.GG{k}"].double() for k in (0, 1)}
    ref.q = {k: opt.state[p][f"0.rotate.Q{k}"].double() for k in (0, 1)}
    for (g,) in grads[1:]:
        before = p.clone()
        p.grad = g.float()
        opt.step()
        assert p.dtype == torch.float32 and opt.state[p]["0.rotate.Q0"].dtype == torch.float32
        want = ref.step(g.float().double())
        u = (before - p).double()
        assert float((u - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize(
    "recipe",
    [
        "rotate(left, source=input, skip_first=true) { sign }",
        "rotate(left) { rotate(right, skip_first=true) { sign } }",
    ],
    ids=["source_input", "nested"],
)
def test_skip_first_outside_a_top_level_grad_scope_is_an_error(recipe: str) -> None:
    """skip_first skips the step before the pipeline runs, so only a top-level scope over the raw
    gradient can honour it; anywhere else it is refused at build time, not silently ignored."""
    ((p,),) = _tensors(27, [(4, 6)])
    with pytest.raises(soapdsl.SoapRecipeError, match="skip_first needs a top-level rotate"):
        soapdsl.build(recipe, [p], lr=1.0)
