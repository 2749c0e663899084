"""graft: keep the update's direction, take its magnitude from a reference point of the pipeline.

The expected values are written here from the op's docstring, per parameter, in float64: the
reference is the input of the stage before `graft`, a labelled stage's output, or a branch run on
that input with its own state. Gradients of very different sizes per parameter make a norm taken
over the wrong set of parameters visible.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapRecipeError

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64
SHAPES = [(4, 6), (4, 6), (4, 6), (6, 4), (2, 3, 4)]
EPS = 1e-16  # the op's default


def _grads(seed: int, n: int, shapes=SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
        for _ in range(n)
    ]


def _step(opt, params, gs) -> list[torch.Tensor]:
    before = [p.clone() for p in params]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g), "graft must not write into the gradient"
    return [b - p for b, p in zip(before, params)]


def _build(pipeline: str, shapes=SHAPES, batch: bool = True, **args):
    """``pipeline`` then a matrix op that changes nothing (so same-shape parameters are stacked)."""
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    tail = " |> shape_scale(none)" if batch else ""
    opt = soapdsl.build(pipeline + tail, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0, **args)
    assert opt.plan.routes[0].batched == batch
    return opt, params


def _graft(x: torch.Tensor, ref: torch.Tensor, mode: str = "norm", eps: float = EPS) -> torch.Tensor:
    target = ref.norm() if mode == "norm" else ref.norm() / math.sqrt(ref.numel())
    return x * target / (x.norm() + eps)


def _assert_same_updates(first: str, second: str, seed: int, steps: int) -> None:
    """The two pipelines give the same update at every step (float64)."""
    a, pa = _build(first)
    b, pb = _build(second)
    for gs in _grads(seed, steps):
        for u, w in zip(_step(a, pa, gs), _step(b, pb, gs)):
            torch.testing.assert_close(u, w, **TOL)


@pytest.mark.parametrize("mode", ["norm", "rms"])
@pytest.mark.parametrize("batch", [True, False], ids=["stacked", "per_param"])
def test_default_reference_is_input_of_preceding_stage(mode: str, batch: bool) -> None:
    """momentum |> sign |> graft: sign(m) with the norm (or RMS) of m, per parameter."""
    beta = 0.9
    opt, params = _build(f"momentum({beta}) |> sign |> graft({mode})", batch=batch)
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for gs in _grads(0, 4):
        for i, (g, u) in enumerate(zip(gs, _step(opt, params, gs))):
            ms[i] = beta * ms[i] + (1 - beta) * g
            torch.testing.assert_close(u, _graft(torch.sign(ms[i]), ms[i], mode), **TOL)
            want = float(ms[i].norm()) if mode == "norm" else float(ms[i].norm()) / math.sqrt(g.numel())
            assert math.isclose(float(u.norm()), want, rel_tol=1e-12)


def test_rms_mode_on_vectors_and_scalars() -> None:
    """||out||_F = RMS(ref) for any shape; a 0-d reference has RMS |ref|."""
    shapes = [(7,), (), (3, 5)]
    opt, params = _build("scale(3.0) |> sign |> graft(rms)", shapes, batch=False)
    for gs in _grads(1, 2, shapes):
        for g, u in zip(gs, _step(opt, params, gs)):
            torch.testing.assert_close(u, _graft(torch.sign(g), 3.0 * g, "rms"), **TOL)


def test_label_reference() -> None:
    """from=NAME reads the output of the stage labelled NAME, with its pending scale applied."""
    beta = 0.8
    opt, params = _build(f"momentum({beta}) |> bias_correct({beta}) as m |> sign |> scale(5.0) |> graft(norm, from=m)")
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t, gs in enumerate(_grads(2, 4), start=1):
        for i, (g, u) in enumerate(zip(gs, _step(opt, params, gs))):
            ms[i] = beta * ms[i] + (1 - beta) * g
            corrected = ms[i] / (1 - beta**t)
            torch.testing.assert_close(u, _graft(torch.sign(ms[i]), corrected), **TOL)


def test_branch_reference_has_its_own_state() -> None:
    """from={ ... } runs the branch on the input of the stage before graft, with its own state:
    here Adam's direction of the momentum grafts its norm onto sign(m)."""
    b1, b2, eps = 0.9, 0.95, 1e-8
    opt, params = _build(
        f"momentum({b1}) |> sign |> graft(norm, from={{ rms_normalize({b2}, {eps}) |> momentum(0.5) }})"
    )
    ms = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    vs = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    bs = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t, gs in enumerate(_grads(3, 4), start=1):
        updates = _step(opt, params, gs)
        for i, (p, g, u) in enumerate(zip(params, gs, updates)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g  # of the raw gradient
            bs[i] = 0.5 * bs[i] + 0.5 * ms[i] / ((vs[i] / (1 - b2**t)).sqrt() + eps)
            torch.testing.assert_close(u, _graft(torch.sign(ms[i]), bs[i]), **TOL)
            torch.testing.assert_close(opt.state[p]["0.momentum.buf"], ms[i], **TOL)
            torch.testing.assert_close(opt.state[p]["2.from.0.rms_normalize.v"], vs[i], **TOL)
            torch.testing.assert_close(opt.state[p]["2.from.1.momentum.buf"], bs[i], **TOL)


def test_branch_pending_scale_is_applied_and_does_not_leak() -> None:
    """A branch ending in host-side factors (scale, rms_normalize's folded correction) counts
    them in its norm; they do not reach the main pipeline, whose own factor before the
    reference point is part of the branch's input."""
    b2, eps = 0.9, 1e-3
    opt, params = _build(
        f"scale(2.0) |> sign"
        f" |> graft(norm, from={{ rms_normalize({b2}, {eps}, eps_at=raw) |> scale(7.0) }}) |> scale(0.5)"
    )
    vs = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t, gs in enumerate(_grads(4, 3), start=1):
        for i, (g, u) in enumerate(zip(gs, _step(opt, params, gs))):
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            branch = 7.0 * math.sqrt(1 - b2**t) * (2.0 * g) / (vs[i].sqrt() + eps)
            torch.testing.assert_close(u, 0.5 * _graft(torch.sign(g), branch), **TOL)


def test_grafting_a_branch_onto_itself_is_identity() -> None:
    """The branch repeats the stage before graft: the update is that stage's output."""
    stage = "rms_normalize(0.95, 1e-8)"
    _assert_same_updates(
        f"momentum(0.9) |> {stage} |> graft(norm, from={{ {stage} }})", f"momentum(0.9) |> {stage}", 5, 4
    )


def test_factor_between_reference_and_graft() -> None:
    """graft fixes the norm, so a positive factor between the reference point and graft has no
    effect; a negative one flips the direction."""
    a, pa = _build(
        "momentum(0.5) as r |> sign |> bias_correct(0.9) |> scale(-3.0) |> scale(-1.0) |> graft(norm, from=r)"
    )
    b, pb = _build("momentum(0.5) as r |> sign |> graft(norm, from=r)")
    c, pc = _build("momentum(0.5) as r |> sign |> scale(-2.0) |> graft(norm, from=r)")
    for gs in _grads(6, 3):
        for x, y, z in zip(_step(a, pa, gs), _step(b, pb, gs), _step(c, pc, gs)):
            torch.testing.assert_close(x, y, **TOL)
            torch.testing.assert_close(z, -y, **TOL)


def test_default_reference_includes_factors_before_it() -> None:
    """The input of the stage before graft carries every factor pending there."""
    opt, params = _build("sign |> bias_correct(0.9) |> scale(-3.0) |> graft(norm)")
    for t, gs in enumerate(_grads(10, 3), start=1):
        for g, u in zip(gs, _step(opt, params, gs)):
            ref = torch.sign(g) / (1 - 0.9**t)  # the input of scale(-3.0)
            torch.testing.assert_close(u, _graft(-3.0 * ref, ref), **TOL)


def test_eps_guards_the_division() -> None:
    eps = 0.5  # comparable to the norms, so its place in the formula shows
    opt, params = _build(f"sign |> graft(norm, eps={eps})", [(2, 3), (2, 3)])
    for gs in _grads(7, 2, [(2, 3), (2, 3)]):
        for g, u in zip(gs, _step(opt, params, gs)):
            torch.testing.assert_close(u, torch.sign(g) * g.norm() / (torch.sign(g).norm() + eps), **TOL)


def test_zero_update_stays_zero() -> None:
    opt, params = _build("scale(0.0) |> graft(norm)", [(3, 4)])
    _step(opt, params, _grads(8, 1, [(3, 4)])[0])
    assert torch.count_nonzero(params[0]) == 0


@pytest.mark.parametrize(
    ("pipeline", "pattern"),
    [
        ("graft(norm) |> sign", r"'graft' reads the input of the stage before it, and there is none here"),
        ("graft(norm, from={ sign })", r"reads the input of the stage before it"),
        ("rotate(left) { graft(norm) }", r"reads the input of the stage before it"),
        ("sign |> graft(norm, from=m)", r"stage labelled 'm', which is not an earlier stage"),
        ("sign |> graft(norm, from=m) |> momentum(0.9) as m", r"stage labelled 'm', which is not an earlier stage"),
        ("sign as m2 |> graft(norm, from=m)", r"did you mean 'm2'"),
        (
            "rotate(left) { sign |> graft(norm, from=m) } |> momentum(0.9) as m",
            r"not an earlier stage of this pipeline or of one around it",
        ),
        (
            "momentum(0.9) as mom |> rotate(left) { sign |> graft(norm, from=mon) }",
            r"stage labelled 'mon'.*did you mean 'mom'",
        ),
    ],
)
def test_missing_reference_is_a_recipe_error(pipeline: str, pattern: str) -> None:
    with pytest.raises(SoapRecipeError, match=pattern):
        soapdsl.compile(pipeline, [("w", torch.zeros(4, 6))])


def test_label_on_the_preceding_stage_equals_default_reference_of_next() -> None:
    """`a as r |> b |> graft(from=r)` and `a |> b |> c |> graft` read the same point when c = identity."""
    _assert_same_updates(
        "momentum(0.9) as r |> sign |> graft(norm, from=r)", "momentum(0.9) |> scale(1.0) |> sign |> graft(norm)", 9, 3
    )


@pytest.mark.parametrize("mode", ["norm", "rms"])
@pytest.mark.parametrize("merge", [False, True])
def test_label_outside_a_scope(mode: str, merge: bool) -> None:
    """A stage inside a scope may read a label of the pipeline around it: the rotation is
    orthogonal, so grafting inside and leaving the basis equals leaving and then grafting."""
    rot = f"rotate(left, merge_dims={'true' if merge else 'false'})"
    _assert_same_updates(
        f"momentum(0.9) as m |> {rot} {{ sign |> graft({mode}, from=m) }}",
        f"momentum(0.9) as m |> {rot} {{ sign }} |> graft({mode}, from=m)",
        11,
        4,
    )


def test_inner_label_shadows_outer() -> None:
    _assert_same_updates(
        "sign as m |> rotate(left) { momentum(0.9) as m |> sign |> graft(norm, from=m) }",
        "sign |> rotate(left) { momentum(0.9) as m |> sign |> graft(norm, from=m) }",
        12,
        3,
    )
