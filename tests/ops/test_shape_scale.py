"""shape_scale: multiply each parameter's update by a function of two of its dims.

The factors are written here from the op's docstring and ALGORITHMS.md 4.3/4.4 (torch.optim.Muon's
adjust_lr_fn, Moonshot's match_rms_adamw, dion's spectral_norm), per parameter.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapShapeError

TOL = {"rtol": 1e-12, "atol": 1e-14}  # float64 (the update is read back as p_before - p_after)
MIXED = [(4, 6), (6, 4), (6, 4), (5, 5), (8, 3, 3, 3), (3, 8, 1, 5), (2, 3, 5)]

RULES = {
    "original": lambda a, b: math.sqrt(max(1.0, a / b)),
    "match_rms_adamw": lambda a, b: 0.2 * math.sqrt(max(a, b)),
    "spectral": lambda a, b: math.sqrt(a / b),
    "none": lambda a, b: 1.0,
}


def _factor(mode: str, dims: str, shape: tuple[int, ...]) -> float:
    a, b = shape[:2] if dims == "first" else shape[-2:]
    return RULES[mode](a, b)


def _run(recipe: str, shapes, seed: int, steps: int = 2, **args):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    opt = soapdsl.build(recipe, [(f"p{i}", p) for i, p in enumerate(params)], lr=1.0, **args)
    out = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g), "shape_scale must not write into the gradient"
        out.append((gs, [b - p for b, p in zip(before, params)]))
    return opt, out


@pytest.mark.parametrize("batch", [True, False], ids=["stacked", "per_param"])
@pytest.mark.parametrize("dims", ["first", "last"])
@pytest.mark.parametrize("mode", sorted(RULES))
def test_mixed_shapes_in_one_route(mode: str, dims: str, batch: bool) -> None:
    """Matrices, conv kernels [out, in, kh, kw] and 3-D tensors, each with its own factor."""
    settings = "" if batch else " [batch=false]"
    recipe = f"recipe t(lr=1.0):\n  route default{settings}: momentum(0.5) |> shape_scale({mode}, dims={dims}) |> lr"
    opt, steps = _run(recipe, MIXED, 0, steps=3)
    assert opt.plan.routes[0].batched == batch
    ms = [torch.zeros(s, dtype=torch.float64) for s in MIXED]
    for gs, updates in steps:
        for i, (s, g, u) in enumerate(zip(MIXED, gs, updates)):
            ms[i] = 0.5 * ms[i] + 0.5 * g
            torch.testing.assert_close(u, _factor(mode, dims, s) * ms[i], **TOL)


def test_conv_kernel_dims() -> None:
    """A conv kernel [8, 3, 3, 3]: first reads out x in (8, 3), last reads kh x kw (3, 3)."""
    assert _factor("original", "first", (8, 3, 3, 3)) == math.sqrt(8 / 3)
    assert _factor("original", "last", (8, 3, 3, 3)) == 1.0
    for dims, want in (("first", math.sqrt(8 / 3)), ("last", 1.0)):
        _, steps = _run(f"shape_scale(original, dims={dims}) |> lr", [(8, 3, 3, 3)], 1, steps=1)
        ((g,), (u,)) = steps[0]
        torch.testing.assert_close(u, want * g, **TOL)


@pytest.mark.parametrize("mode", sorted(RULES))
def test_shared_factor_is_folded_into_the_step(mode: str) -> None:
    """Parameters sharing a factor (and a pending scale before the stage) give the same result."""
    shapes = [(6, 4), (6, 4), (12, 8)]  # 6/4 == 12/8: one factor for 'original' and 'spectral'
    _, steps = _run(f"scale(-2.0) |> shape_scale({mode}) |> lr", shapes, 2)
    for gs, updates in steps:
        for s, g, u in zip(shapes, gs, updates):
            torch.testing.assert_close(u, -2.0 * _factor(mode, "first", s) * g, **TOL)


def test_default_is_original_on_first_dims() -> None:
    _, steps = _run("shape_scale |> lr", [(9, 4), (4, 9)], 3, steps=1)
    ((g1, g2), (u1, u2)) = steps[0]
    torch.testing.assert_close(u1, 1.5 * g1, **TOL)
    torch.testing.assert_close(u2, g2, **TOL)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_vector_is_a_shape_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(SoapShapeError, match=r"'shape_scale' needs a matrix"):
        soapdsl.compile("shape_scale(original)", [("b", torch.zeros(shape))])


def test_float32_parameters() -> None:
    p = torch.zeros(12, 3)
    opt = soapdsl.build("shape_scale(match_rms_adamw) |> lr", [p], lr=1.0)
    g = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    p.grad = g.clone()
    opt.step()
    assert p.dtype == torch.float32
    torch.testing.assert_close(-p, 0.2 * math.sqrt(12) * g)


@pytest.mark.parametrize("mode", ["original", "match_rms_adamw", "spectral", "none"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 3)])
def test_empty_matrices_are_left_as_they_are(mode, shape):
    """A (3, 0) matrix divided by zero in `original` and `spectral` (ZeroDivisionError at step)."""
    out = soapdsl.apply(f"shape_scale({mode})", torch.ones(shape))
    assert out.shape == shape
    p = torch.nn.Parameter(torch.randn(shape))
    opt = soapdsl.build("muon", [("w", p)])
    p.grad = torch.zeros(shape)
    opt.step()
