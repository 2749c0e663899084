"""A route compiled with torch.compile computes what the eager path computes (slow: compiling
takes tens of seconds per route on CPU); torch.compile(opt.step) runs the eager step."""

from __future__ import annotations

import pytest
import torch

import soapdsl
from tests.conftest import batches, eager_and_compiled, lockstep, make_net, max_rel_err, train_step, twin_params


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["adamw", "muon"])
def test_compiled_route_matches_eager(recipe):
    eager_model, compiled_model = make_net(), make_net()
    eager = soapdsl.build(recipe, eager_model)
    compiled = soapdsl.build(recipe, compiled_model, torch_compile=True)
    assert all(rp.options.get("compile") for rp in compiled.plan.routes)
    for batch in batches(12):
        train_step(eager_model, eager, batch)
        train_step(compiled_model, compiled, batch)
    assert max_rel_err(compiled_model, eager_model) < 1e-5


@pytest.mark.slow
def test_compiled_soap_matches_eager_on_well_conditioned_factors():
    """SOAP's first factors of a rectangular matrix are rank-deficient, so any rounding change
    (a fused compiled kernel) picks another null-space basis and the runs drift apart by design;
    square matrices and vectors have well-defined bases, and there the two paths agree."""
    shapes = {"a": (8, 8), "b": (8, 8), "c": (16, 16), "v": (8,)}
    eager_p, compiled_p = eager_and_compiled("soap", shapes, 12, freq=3)
    for n in shapes:
        torch.testing.assert_close(compiled_p[n], eager_p[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_gram_newton_schulz_matches_eager():
    """muon with ns_form=gram on shapes where the Gram form runs (wide, tall) and where it does not."""
    shapes = {"wide": (8, 32), "tall": (32, 8), "square": (8, 8)}
    eager_p, compiled_p = eager_and_compiled("muon", shapes, 6, ns_form="gram")
    for n in shapes:
        torch.testing.assert_close(compiled_p[n], eager_p[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_halved_newton_schulz_matches_eager(monkeypatch):
    """Eager muon takes the standard form by halves (threshold lowered so that these shapes take
    it; the odd one keeps the plain form); compiled, the plain form runs (the halved one compiles
    slower). The two routes agree to fp32 rounding."""
    from soapdsl.ops import _linalg

    monkeypatch.setattr(_linalg, "HALVES_MIN_ROWS", 2)
    shapes = {"wide": (8, 32), "tall": (32, 8), "square": (8, 8), "odd": (7, 12)}
    eager_p, compiled_p = eager_and_compiled("muon", shapes, 6)
    for n in shapes:
        torch.testing.assert_close(compiled_p[n], eager_p[n], rtol=1e-5, atol=1e-6)


def test_compile_route_option_is_accepted():
    text = "recipe r(lr=0.1):\n  route default [compile=true]: sign |> lr\n"
    plan = soapdsl.compile(text, [("w", torch.empty(3, device="meta"))])
    assert plan.routes[0].options == {"compile": True}


@pytest.mark.parametrize("recipe", ["adamw", "soap"])
def test_torch_compile_of_step_runs_the_eager_step(recipe):
    """torch.compile(opt.step), torch's recipe for its own optimizers, must not fail inside
    soapdsl (inductor asserted on the fused Adam call; dynamo mis-traced the host-side
    layout): the step breaks the graph and runs eagerly, with the eager numbers."""
    models = [make_net(), make_net()]
    opts = [soapdsl.build(recipe, m) for m in models]
    steps = [opts[0].step, torch.compile(opts[1].step)]
    for batch in batches(4):
        for model, opt, step in zip(models, opts, steps, strict=True):
            x, y = batch
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            step()
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(p, q)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _inverse(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))


def _one_cycle(opt):
    """OneCycleLR with its defaults: lr and, for muon, the momentum change at every step."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "kw", "shapes", "schedule"),
    [
        ("adamw", {}, {"w": (8, 12), "b": (12,)}, _inverse),
        ("muon", {}, {"w": (8, 12), "u": (12, 8), "b": (12,)}, _inverse),
        ("muon", {}, {"w": (8, 12), "u": (12, 8), "b": (12,)}, _one_cycle),
        ("soap", {"freq": 3}, {"a": (8, 8), "c": (16, 16), "v": (8,)}, _inverse),
        ("card", {}, {"a": (8, 8), "c": (16, 16), "v": (8,)}, _inverse),
    ],
)
def test_compiled_route_follows_an_lr_scheduler_without_compiling_again(recipe, kw, shapes, schedule):
    """A scheduler sets a new lr (OneCycleLR also a new momentum) at every step: a compiled route
    takes it as an input of the code it compiled (not a constant to compile again for, 8 times
    and then eagerly) and steps by it, as the eager route does. Graphs compiled after the first
    steps would be compilations for a new value: the routes' other variants (first step, a basis
    not ready yet, a refresh) come early."""
    torch._dynamo.reset()
    eager_p, compiled_p = twin_params(shapes)
    opts = [
        soapdsl.build(recipe, list(eager_p.items()), **kw),
        soapdsl.build(recipe, list(compiled_p.items()), torch_compile=True, **kw),
    ]
    scheds = [schedule(o) for o in opts]
    warm = 4
    for step in range(12):
        if step == warm:
            graphs = _graphs()
        lockstep(opts, [eager_p, compiled_p], shapes, 1, seed=step)
        for s in scheds:
            s.step()
    assert _graphs() == graphs, f"{recipe}: compiled again for a new {schedule.__name__} value"
    for n in shapes:
        torch.testing.assert_close(compiled_p[n], eager_p[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_muon_route_compiles_whole():
    """Each route's whole pipeline compiles as one graph: a graph break inside run_ops's loop
    (dynamo could not sort symbolic sizes in newton_schulz) made dynamo skip the route's frame
    and compile only the functions it calls, one graph each, while the route ran eagerly."""
    torch._dynamo.reset()
    shapes = {"w": (8, 12), "u": (12, 8), "b": (12,)}
    _, compiled_p = twin_params(shapes)
    opt = soapdsl.build("muon", list(compiled_p.items()), torch_compile=True)
    before = _graphs()
    lockstep([opt], [compiled_p], shapes, 3)
    routes = [rp for rp in opt.plan.routes if rp.params]
    assert len(routes) == 2
    assert _graphs() - before == len(routes)
