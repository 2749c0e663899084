"""Shared fixtures: a small conv + MLP + LayerNorm model and deterministic data."""

from __future__ import annotations

import warnings

import pytest
import torch

import soapdsl

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

# torch.optim.Muon first shipped in torch 2.9; soapdsl needs torch 2.6, so on older releases the
# comparisons with torch's own Muon are skipped (those with the loop references still run)
needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9")


class SmallNet(torch.nn.Module):
    """conv -> MLP with a LayerNorm: matrices, 4-D kernels, vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = torch.nn.Linear(4 * 6 * 6, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        h = self.norm(torch.relu(self.fc1(h)))
        h = torch.relu(self.fc2(h))
        return self.head(h)


def in_basis(x: torch.Tensor, qs: dict[int, torch.Tensor]) -> torch.Tensor:
    """``x`` in the eigenbases ``qs`` (dim -> Q): x times Q_k along each dim k, Q_L^T X Q_R for a matrix."""
    for k, q in qs.items():
        x = torch.tensordot(q, x, dims=([0], [k])).movedim(0, k)
    return x


def assert_close_where_defined(
    u: torch.Tensor,
    want: torch.Tensor,
    qs: dict[int, torch.Tensor],
    source: torch.Tensor,
    rtol: float,
    atol: float,
) -> None:
    """Compare two updates in the basis ``qs`` at the coordinates where ``source`` (the rotated
    quantity the update is an elementwise function of) is more than rounding noise.

    A basis built from the same gradient diagonalises it (the SVD), and a basis of a
    rank-deficient factor has null directions: there the rotated value is 1e-16-sized rounding
    noise whose sign, root or ratio to eps depends on the CPU's SIMD kernels (AVX2 and AVX-512
    MKL differ), not on the algorithm. Those coordinates are left out; every other one must match.
    Rotating by an orthogonal Q adds only rounding of the order of the values' own."""
    rotated = in_basis(source, qs)
    defined = rotated.abs() > 1e-9 * rotated.abs().max()
    assert int(defined.sum()) >= min(rotated.shape), "too few defined coordinates to compare"
    torch.testing.assert_close(in_basis(u, qs)[defined], in_basis(want, qs)[defined], rtol=rtol, atol=atol)


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet().to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)
    ]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = batch
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def max_rel_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest over parameters of max|a - b| / max|b|."""
    return max(
        float((p - q).detach().abs().max() / q.detach().abs().max().clamp(min=1e-30))
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def twin_params(shapes, dtype=torch.float32, device="cpu"):
    """Two dicts of parameters by name holding the same random values (drawn after
    ``torch.manual_seed(0)`` on the CPU, then moved to ``device``)."""
    torch.manual_seed(0)
    base = {n: torch.randn(s, dtype=dtype).to(device) for n, s in shapes.items()}
    return tuple({n: torch.nn.Parameter(t.clone()) for n, t in base.items()} for _ in range(2))


def lockstep(opts, params, shapes, steps, seed=1, dtype=torch.float32, device="cpu") -> None:
    """Step every optimizer of ``opts`` ``steps`` times on the same gradients: one draw per
    parameter and step (on the CPU, from ``seed``), copied into each dict of ``params``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for n, shape in shapes.items():
            grad = torch.randn(shape, generator=g, dtype=dtype).to(device)
            for ps in params:
                ps[n].grad = grad.clone()
        for opt in opts:
            opt.step()


def worst_rel_err(ours, theirs) -> float:
    """Largest over the parameters (dicts by name) of max|ours - theirs| / max|theirs|."""
    return max(float((ours[n] - theirs[n]).detach().abs().max() / theirs[n].detach().abs().max()) for n in theirs)


def worst_moved_err(ours, theirs, start) -> float:
    """Largest over the parameters (dicts by name) of max|ours - theirs| / max|theirs - start|: the error as a
    fraction of how far the reference moved each parameter (a parameter that did not move is skipped)."""
    errs = [0.0]
    for n in theirs:
        moved = float((theirs[n] - start[n]).detach().abs().max())
        if moved > 0:
            errs.append(float((ours[n] - theirs[n]).detach().abs().max()) / moved)
    return max(errs)


def assert_descending_eigenbasis(gg: torch.Tensor, q: torch.Tensor, atol: float, what: object = None) -> None:
    """``q``'s columns diagonalise the symmetric factor ``gg`` (Q^T GG Q diagonal to ``atol``),
    in descending order of eigenvalue (up to ``atol``): a valid first basis, whatever the
    arbitrary choice inside a rank-deficient factor's null space."""
    lam = torch.diagonal(q.T @ gg @ q)
    torch.testing.assert_close(q.T @ gg @ q, torch.diag(lam), rtol=0, atol=atol)
    assert bool((lam[:-1] >= lam[1:] - atol).all()), what


def race(recipe, kw, ref_cls, ref_kw, shapes, steps=60, dtype=torch.float64, seed=1, device="cpu"):
    """Run a recipe and a reference optimizer on identical gradients for ``steps`` steps.

    ``shapes`` maps parameter names to shapes; ``ref_kw`` may be a callable taking the reference's
    parameters by name (for references that need them, such as share groups). Values are drawn
    on the CPU and moved to ``device``, so every device sees the same ones. Returns the worst
    error relative to the reference's movement, max|ours - ref| / max|ref - start| over the
    parameters: a parameter moves by about 1/40 of its size in these runs, so a relative error
    of the parameter itself would hide all but the largest mistakes in the update.
    """
    ours, theirs = twin_params(shapes, dtype, device)
    start = {n: t.detach().clone() for n, t in theirs.items()}
    opt = soapdsl.build(recipe, list(ours.items()), **kw)
    ref = ref_cls(list(theirs.values()), **(ref_kw(theirs) if callable(ref_kw) else ref_kw))
    lockstep([opt, ref], [ours, theirs], shapes, steps, seed, dtype, device)
    return worst_moved_err(ours, theirs, start)


def muon_vs_torch(ours_factory, steps: int = 20, device: str = "cpu") -> float:
    """Run ``ours_factory(named params)`` and torch.optim.Muon (lr 0.02, weight decay 0.1) on the
    same square, tall and wide matrices and gradients; the worst relative error after ``steps``."""
    shapes = {"square": (32, 32), "tall": (48, 16), "wide": (16, 48)}
    a, b = twin_params(shapes, device=device)
    ours = ours_factory(list(a.items()))
    ref = torch.optim.Muon(list(b.values()), lr=0.02, weight_decay=0.1)
    lockstep([ours, ref], [a, b], shapes, steps, device=device)
    return worst_rel_err(a, b)


def eager_and_compiled(recipe, shapes, steps, device="cpu", **kw):
    """The same random parameters and gradients through ``recipe`` built eagerly and with
    ``torch_compile=True``: the two parameter dicts after ``steps`` steps."""
    eager_p, compiled_p = twin_params(shapes, device=device)
    eager = soapdsl.build(recipe, list(eager_p.items()), **kw)
    compiled = soapdsl.build(recipe, list(compiled_p.items()), torch_compile=True, **kw)
    lockstep([eager, compiled], [eager_p, compiled_p], shapes, steps, device=device)
    return eager_p, compiled_p


@pytest.fixture
def net() -> SmallNet:
    return make_net()


@pytest.fixture
def spectral_everywhere(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every fp32 CPU batch take the spectral evaluation; returns a list that counts its
    calls (a call that falls back to iterating counts too)."""
    from soapdsl.ops import _linalg

    calls: list[int] = []
    spectral = _linalg._spectral_newton_schulz

    def counted(*args, **kw):
        calls.append(1)
        return spectral(*args, **kw)

    monkeypatch.setattr(_linalg, "SPECTRAL_MIN_ROWS", 1)
    monkeypatch.setattr(_linalg, "spectral_cost", lambda r, c: -1)
    monkeypatch.setattr(_linalg, "_spectral_newton_schulz", counted)
    return calls


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        help="rewrite the golden files of `soapdsl compile` output (review the diff!)",
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))
