"""adafactor: normalization by a factored (row x column) second moment.

The expected values come from a plain one-parameter loop written here from the op's docstring, in
float64, with a visible eps (1e-3) and an update (a momentum) different from the gradient, so that
it is clear which of the two feeds the moments.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(4, 6), (4, 6), (6, 4), (5,), (), (2, 3, 4)]


def _grads(seed: int, n: int, shapes=SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(n)]


class _Ref:
    """One parameter: r, c (or a full v below two dims) of g^2 + eps; out = x / sqrt(V / (1 - beta^t))."""

    def __init__(self, shape, beta: float, eps: float, correct: bool):
        self.shape, self.beta, self.eps, self.correct = tuple(shape), beta, eps, correct
        self.factored = len(shape) >= 2
        if self.factored:
            self.r = torch.zeros(shape[:-1], dtype=torch.float64)
            self.c = torch.zeros((*shape[:-2], shape[-1]), dtype=torch.float64)
        else:
            self.v = torch.zeros(shape, dtype=torch.float64)
        self.t = 0

    def step(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.t += 1
        b = self.beta
        g2 = g * g + self.eps
        if self.factored:
            self.r = b * self.r + (1 - b) * g2.sum(-1)
            self.c = b * self.c + (1 - b) * g2.sum(-2)
            total = self.r.sum(-1)[..., None, None]
            v = self.r[..., :, None] * self.c[..., None, :] / total
        else:
            self.v = b * self.v + (1 - b) * g2
            v = self.v
        c = 1 - b**self.t if self.correct else 1.0
        return x / (v / c).sqrt()


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g), "adafactor must not write into the gradient"
    return [b - p for b, p in zip(before, params)]


@pytest.mark.parametrize("batch", [True, False], ids=["stacked", "per_param"])
@pytest.mark.parametrize("correct", [True, False])
def test_matches_reference(correct: bool, batch: bool) -> None:
    beta, eps, mu = 0.9, 1e-3, 0.5
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    flag = "true" if correct else "false"
    # a stacked route needs a matrix op; `rotate(both, max_dim=0) { ... }` is one that changes nothing
    body = f"momentum({mu}) |> adafactor({beta}, {eps}, correct={flag})"
    pipeline = f"rotate(both, max_dim=0) {{ {body} }}" if batch else body
    opt = soapdsl.build(pipeline, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0)
    assert opt.plan.routes[0].batched == batch
    prefix = "0.1." if batch else "1."
    refs = [_Ref(s, beta, eps, correct) for s in SHAPES]
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for gs in _grads(0, 5):
        updates = _step(opt, params, gs)
        for i, (p, ref, g, u) in enumerate(zip(params, refs, gs, updates)):
            ms[i] = mu * ms[i] + (1 - mu) * g
            torch.testing.assert_close(u, ref.step(g, ms[i]), **TOL)
            if ref.factored:
                torch.testing.assert_close(opt.state[p][prefix + "adafactor.row"], ref.r, **TOL)
                torch.testing.assert_close(opt.state[p][prefix + "adafactor.col"], ref.c, **TOL)
            else:
                torch.testing.assert_close(opt.state[p][prefix + "adafactor.v"], ref.v, **TOL)


def test_state_shapes() -> None:
    """Matrices: a row and a column moment; fewer dims: a full v; 3-D: the last two dims factored
    per leading index."""
    shapes = [(4, 6), (5,), (), (2, 3, 4)]
    params = [torch.zeros(s) for s in shapes]
    opt = soapdsl.build("adafactor", params, lr=1.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()

    def layout(p):
        return {k.split(".")[-1]: tuple(v.shape) for k, v in opt.state[p].items() if "adafactor" in k}

    assert [layout(p) for p in params] == [
        {"row": (4,), "col": (6,)},
        {"v": (5,)},
        {"v": ()},
        {"row": (2, 3), "col": (2, 4)},
    ]


def test_rank_one_squares_are_exact() -> None:
    """If g^2 is a rank-one outer product, r c^T / sum(r) = g^2 (beta = 0, eps = 0): the update is
    sign(g), as with the full second moment."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(4, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    signs = torch.sign(torch.randn(4, 6, generator=gen, dtype=torch.float64))
    g = signs * torch.outer(a, b).sqrt()
    p = torch.zeros(4, 6, dtype=torch.float64)
    opt = soapdsl.build("adafactor(0.0, 0.0) |> lr", [p], lr=1.0)
    (u,) = _step(opt, [p], [g])
    torch.testing.assert_close(u, signs, **TOL)


def test_beta_follows_recipe_parameter() -> None:
    shapes = [(3, 5), (4,)]
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build("adafactor(b, 1e-3) |> lr", params, lr=1.0, b=0.9)
    refs = [_Ref(s, 0.9, 1e-3, True) for s in shapes]
    for t, gs in enumerate(_grads(2, 4, shapes), start=1):
        if t == 3:
            opt.param_groups[0]["b"] = 0.5
            for r in refs:
                r.beta = 0.5
        for ref, g, u in zip(refs, gs, _step(opt, params, gs)):
            torch.testing.assert_close(u, ref.step(g, g), **TOL)


def test_float32_parameters() -> None:
    p = torch.zeros(4, 6)
    opt = soapdsl.build("adafactor(0.99) |> lr", [p], lr=1.0)
    ref = _Ref((4, 6), 0.99, 1e-30, True)
    for (g,) in _grads(3, 3, [(4, 6)]):
        before = p.clone()
        p.grad = g.float()
        opt.step()
        assert p.dtype == torch.float32 and opt.state[p]["0.adafactor.row"].dtype == torch.float32
        gf = g.float().double()
        torch.testing.assert_close((before - p).double(), ref.step(gf, gf), rtol=1e-5, atol=1e-5)
