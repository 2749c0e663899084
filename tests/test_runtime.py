"""SoapOptimizer's torch contract: state dicts, closures, missing grads, dtypes, batching."""

from __future__ import annotations

import copy
import io
import pickle
from contextlib import nullcontext

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapArgumentError, SoapStateError
from soapdsl.library import shipped, shipped_names
from tests.conftest import batches, make_net, train_step

DATA = batches(100)
RECIPES = [
    ("adamw", {"lr": 3e-3, "weight_decay": 0.1}),
    ("adam", {"lr": 3e-3, "weight_decay": 0.01}),
    (
        "recipe ns(lr=0.02, mu=0.95):\n"
        "  route matrix: momentum(mu, nesterov=true) |> newton_schulz(5) |> decay(0.01) |> lr\n"
        "  route default: adamw(0.9, 0.95, 1e-8, 0)\n",
        {},
    ),
]


def _train(runs: list[tuple[torch.nn.Module, torch.optim.Optimizer]], data) -> None:
    """Train each (model, optimizer) on the same batches, in step with each other."""
    for batch in data:
        for model, opt in runs:
            train_step(model, opt, batch)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("recipe", "args"), RECIPES, ids=["adamw", "adam", "ns"])
def test_state_dict_resume_is_bit_identical(recipe, args):
    model = make_net()
    opt = soapdsl.build(recipe, model, **args)
    _train([(model, opt)], DATA[:60])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)

    _train([(model, opt)], DATA[60:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = make_net(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = soapdsl.build(recipe, resumed, **args)
    opt2.load_state_dict(saved["opt"])
    _train([(resumed, opt2)], DATA[60:])
    _assert_same(model, resumed)


class _Blocks(torch.nn.Module):
    """Every kind of parameter the shipped recipes route: an embedding and a head (Adam routes),
    two blocks of same-shape matrices (batched; soap_muon_shared shares their bases), a conv
    kernel, vectors and a 0-d scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"a": torch.nn.Linear(6, 6), "b": torch.nn.Linear(6, 8)}) for _ in range(2)
        )
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.scalar = torch.nn.Parameter(torch.tensor(0.5))


@pytest.mark.parametrize("recipe", shipped_names())
def test_every_shipped_recipe_resumes_bit_for_bit_across_refreshes(recipe):
    """state_dict() through torch.save and torch.load(weights_only=True) into a new optimizer of a
    new model: training goes on with the same bits as without the break, across the basis
    refreshes that follow it (freq 3), with a vector that skips some steps (its own count)."""
    freq = {"freq": 3} if "freq" in shipped(recipe).defaults() else {}

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _Blocks()
        return model, soapdsl.build(recipe, model, **freq)

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for k in steps:
            g = torch.Generator().manual_seed(k)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            if k % 3 == 1:
                model.conv.bias.grad = None
            opt.step()

    model, opt = build()
    train(model, opt, range(10))
    resumed, opt2 = build()
    train(resumed, opt2, range(4))
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt2 = build()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, range(4, 10))
    _assert_same(model, resumed)


def test_step_counters_are_views_of_one_tensor_per_cohort():
    """Each parameter's "step" is a 0-d float32 CPU tensor (torch.optim's convention), the
    counters of a cohort share one tensor (one add per step), and a parameter that skips a step
    gets its own count back out of it."""
    model = make_net()
    opt = soapdsl.build("adamw", model)
    _train([(model, opt)], DATA[:3])
    params = list(model.parameters())
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.shape == () and s.dtype == torch.float32 and s.device.type == "cpu" for s in steps)
    assert all(float(s) == 3 for s in steps)
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1
    params[0].grad = None  # the first parameter sits out one step: it forms its own cohort
    for p in params[1:]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 3
    assert all(float(opt.state[p]["step"]) == 4 for p in params[1:])
    sd = copy.deepcopy(opt.state_dict())
    assert [float(v["step"]) for v in sd["state"].values()] == [3.0] + [4.0] * (len(params) - 1)


def test_state_dict_records_format_and_recipe():
    model = make_net()
    opt = soapdsl.build("adamw", model)
    train_step(model, opt, DATA[0])
    sd = opt.state_dict()
    assert sd["soapdsl"]["format"] == 1
    assert sd["soapdsl"]["recipe"] == "adamw"
    assert sd["soapdsl"]["fingerprint"] == opt.plan.fingerprint
    assert float(sd["state"][0]["step"]) == 1.0


def test_fingerprint_ignores_how_a_string_is_spelled():
    """kind=sgd and kind="sgd" are one value: one fingerprint, so state dicts carry over;
    a different value is a different recipe."""
    model = make_net()
    bare = soapdsl.compile("recipe r(lr=0.1) = momentum(0.9, kind=sgd) |> lr", model)
    quoted = soapdsl.compile('recipe r(lr=0.1) = momentum(0.9, kind="sgd") |> lr', model)
    other = soapdsl.compile("recipe r(lr=0.1) = momentum(0.9, kind=ema) |> lr", model)
    assert bare.fingerprint == quoted.fingerprint != other.fingerprint
    a = soapdsl.build("recipe r(lr=0.1) = momentum(0.9, kind=sgd) |> lr", model)
    train_step(model, a, DATA[0])
    b = soapdsl.build('recipe r(lr=0.1) = momentum(0.9, kind="sgd") |> lr', model)
    b.load_state_dict(a.state_dict())


def test_state_dict_from_another_recipe_is_rejected():
    model = make_net()
    a = soapdsl.build("adam", model)
    train_step(model, a, DATA[0])
    b = soapdsl.build("adamw", model)
    with pytest.raises(SoapStateError, match=r"saved by recipe 'adam'.*runs recipe 'adamw'"):
        b.load_state_dict(a.state_dict())


def test_state_dict_from_torch_is_rejected():
    model = make_net()
    ref = torch.optim.AdamW(model.parameters())
    opt = soapdsl.build("adamw", model)
    with pytest.raises(SoapStateError, match="not saved by a soapdsl optimizer"):
        opt.load_state_dict(ref.state_dict())


def test_state_dict_for_another_model_is_rejected():
    a_model, b_model = make_net(), torch.nn.Linear(3, 3)
    a = soapdsl.build("adamw", a_model)
    train_step(a_model, a, DATA[0])
    b = soapdsl.build("adamw", b_model)
    with pytest.raises(SoapStateError, match="different model"):
        b.load_state_dict(a.state_dict())


def test_hyperparameters_hyperparameters_restored_from_state_dict():
    model = make_net()
    opt = soapdsl.build("adamw", model, lr=0.5)
    opt.param_groups[0]["lr"] = 0.125
    opt2 = soapdsl.build("adamw", make_net(), lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.125


def test_closure_and_return_value():
    model = make_net()
    opt = soapdsl.build("adamw", model)
    x, y = DATA[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.step() is None


def test_params_without_grad_are_skipped_and_keep_no_state():
    model = make_net()
    model.head.weight.requires_grad_(False)
    frozen = model.head.weight.detach().clone()
    opt = soapdsl.build("adamw", model)
    _train([(model, opt)], DATA[:3])
    assert torch.equal(model.head.weight, frozen)
    assert len(opt.state[model.head.weight]) == 0


def test_partial_grads_split_cohorts_correctly():
    """A parameter that misses steps keeps its own step count (bias correction per param)."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64)) for _ in range(3)]
    refs = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    recipe = (
        "recipe r(lr=0.01):\n"
        "  route default: momentum(0.9) |> newton_schulz(3) |> rms_normalize(0.99) |> bias_correct(0.9) |> lr\n"
    )
    opt = soapdsl.build(recipe, [(f"w{i}", w) for i, w in enumerate(ws)])
    solo = [soapdsl.build(recipe, [("w", r)]) for r in refs]
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in ws]
        for i, (w, r, o) in enumerate(zip(ws, refs, solo, strict=True)):
            skip = i == 1 and step in (1, 2)
            w.grad = None if skip else grads[i].clone()
            r.grad = None if skip else grads[i].clone()
            if not skip:
                o.step()
        opt.step()
    for w, r in zip(ws, refs, strict=True):
        torch.testing.assert_close(w, r, rtol=1e-12, atol=1e-14)
    assert float(opt.state[ws[1]]["step"]) == 4.0


def test_batched_equals_per_parameter():
    text = (
        "recipe r(lr=0.02):\n"
        "  route matrix{opt}: momentum(0.9, nesterov=true) |> newton_schulz(5, cleanup=2) |> lr\n"
        "  route default: adamw\n"
    )
    a_model, b_model = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    a = soapdsl.build(text.format(opt=""), a_model)
    b = soapdsl.build(text.format(opt=" [batch=false]"), b_model)
    assert a.plan.routes[0].batched and not b.plan.routes[0].batched
    for batch in batches(10, dtype=torch.float64):
        train_step(a_model, a, batch)
        train_step(b_model, b, batch)
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_batched_state_lives_in_slabs_with_per_param_views():
    ws = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(2)]
    opt = soapdsl.build("momentum(0.9) |> newton_schulz(2) |> lr", [("a", ws[0]), ("b", ws[1])])
    for w in ws:
        w.grad = torch.ones(3, 3)
    opt.step()
    a, b = (opt.state[w]["0.momentum.buf"] for w in ws)
    assert a._base is not None and a._base is b._base
    torch.testing.assert_close(a, torch.full((3, 3), 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtype_kept_and_state_at_least_fp32(dtype):
    model = make_net(dtype=dtype)
    opt = soapdsl.build("adamw", model)
    train_step(model, opt, batches(1, dtype=dtype)[0])
    for p in model.parameters():
        assert p.dtype == dtype
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.promote_types(dtype, torch.float32)


SHIPPED = shipped_names()
BF16_SHAPES = {"fc.weight": (12, 8), "square.weight": (6, 6), "conv.weight": (4, 3, 2, 2), "fc.bias": (8,)}


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_steps_bf16_parameters(recipe):
    """bf16 parameters (DESIGN.md 5: "QR has no bf16 kernel; dtype mismatches in factor updates"):
    every shipped recipe steps them with its factors, bases and moments in fp32, the refresh
    included (freq 2), and each parameter stays bf16, finite and moves. (The values are small so
    that a step of lr 1e-3 is over half a bf16 ulp: near 1 it is not, and a bf16 parameter does
    not move, with torch's optimizers as with ours.)"""
    torch.manual_seed(0)
    params = {n: torch.nn.Parameter((0.01 * torch.randn(s)).bfloat16()) for n, s in BF16_SHAPES.items()}
    start = {n: p.detach().clone() for n, p in params.items()}
    freq = {"freq": 2} if "freq" in shipped(recipe).defaults() else {}
    # names without a block index: the shared bases share nothing, and soapdsl says so
    shares = pytest.warns(soapdsl.SoapWarning, match="matches none") if recipe == "soap_muon_shared" else nullcontext()
    with shares:
        opt = soapdsl.build(recipe, list(params.items()), **freq)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt.step()
    for n, p in params.items():
        assert p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()), n
        assert not torch.equal(p, start[n]), n
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point() and value.ndim > 0:
                assert value.dtype == torch.float32, (n, key)


@pytest.mark.parametrize("recipe", ["adamw", "soap", "muon"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_converted_after_its_first_steps_trains_as_if_saved_and_loaded(recipe, dtype):
    """``model.double()`` after some steps failed inside torch ("expected dtype float for `end`
    but got dtype double"): the state now follows the parameters to their new dtype, where
    ``load_state_dict`` would put it, and training goes on as after a save and a load."""
    a, b = make_net(), make_net()
    opt_a, opt_b = soapdsl.build(recipe, a), soapdsl.build(recipe, b)
    _train([(a, opt_a), (b, opt_b)], DATA[:12])
    a.to(dtype)
    b.to(dtype)
    saved = opt_b.state_dict()
    opt_b = soapdsl.build(recipe, b)
    opt_b.load_state_dict(saved)
    data = [(x.to(dtype), y) for x, y in DATA[12:24]]
    _train([(a, opt_a), (b, opt_b)], data)
    _assert_same(a, b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert p.dtype == dtype
        for key, value in opt_a.state[p].items():
            if key != "step" and torch.is_tensor(value):
                assert value.dtype == opt_b.state[q][key].dtype == torch.promote_types(dtype, torch.float32), key


def test_zero_dim_and_empty_parameters():
    scalar = torch.nn.Parameter(torch.tensor(2.0))
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    opt = soapdsl.build("adamw", [("s", scalar), ("e", empty)], lr=0.1)
    scalar.grad = torch.tensor(1.0)
    empty.grad = torch.zeros(0, 3)
    opt.step()
    assert scalar.item() < 2.0
    assert empty.shape == (0, 3)


def test_loss_decreases():
    model = make_net()
    opt = soapdsl.build("adamw", model, lr=3e-3)
    x, y = DATA[0]
    losses = [train_step(model, opt, (x, y)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_param_groups_are_routes():
    model = make_net()
    text = 'recipe r(lr=0.01, head_lr=0.001):\n  route "head.*" [lr=head_lr]: adamw\n  route default: adamw\n'
    opt = soapdsl.build(text, model)
    assert [g["route"] for g in opt.param_groups] == ['"head.*"', "default"]
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.01]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(model.head.weight), id(model.head.bias)}
    with pytest.raises(SoapArgumentError, match="param_groups are its routes"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


def test_defaults_hold_the_recipe_header_values_as_built():
    """torch.optim's ``defaults`` holds each hyperparameter's value as the optimizer was built,
    and training code reads it: transformers' cosine_with_min_lr schedule computes
    ``min_lr / optimizer.defaults["lr"]``. A soapdsl optimizer's are its recipe's header
    values (the build's arguments, the rest at the recipe's defaults), the groups unchanged."""
    model = make_net()
    opt = soapdsl.build("muon", model, lr=0.05, adam_lr=1e-3)
    assert opt.defaults == opt.plan.args
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["adam_lr"]) == (0.05, 0.95, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.05, 1e-3]
    assert all("differentiable" not in g for g in opt.param_groups)
    # a floor at min_lr, as a ratio of the recipe's lr, reaches every route's group
    floor = 0.01 / opt.defaults["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(floor, 1.0 - step))
    train_step(model, opt, DATA[0])
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * floor, 0.01, 1e-3 * floor])
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.defaults == opt.defaults
    assert soapdsl.build("momentum(beta) |> sign |> lr", model, beta=0.9, lr=1e-2).defaults == {"beta": 0.9, "lr": 1e-2}


def test_deepcopy_and_hooks():
    model = make_net()
    opt = soapdsl.build("adamw", model)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    train_step(model, opt, DATA[0])
    assert calls == [1]
    sd = copy.deepcopy(opt.state_dict())
    assert sd["soapdsl"]["recipe"] == "adamw"


def test_inline_pipeline_with_declared_params():
    w = torch.nn.Parameter(torch.ones(3))
    opt = soapdsl.build("scale(f) |> lr", [("w", w)], lr=1.0, f=0.5)
    w.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.5))
    opt.param_groups[0]["f"] = 2.0
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), -1.5))


def test_unnamed_parameters_and_modules_accepted():
    model = make_net()
    a = soapdsl.build("adamw", model.parameters())
    b = soapdsl.build("adamw", list(model.named_parameters()))
    assert len(a.param_groups[0]["params"]) == len(b.param_groups[0]["params"])
    with pytest.raises(SoapArgumentError, match="empty parameter list"):
        soapdsl.build("adamw", [])


def test_param_group_changes_are_revalidated_with_a_location():
    w = torch.nn.Parameter(torch.ones(3))
    opt = soapdsl.build("momentum(b) |> bias_correct(b) |> lr", [("w", w)], lr=1.0, b=0.9)
    w.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["b"] = 1.0
    with pytest.raises(SoapArgumentError, match=r"'momentum' argument beta became invalid.*\['b'\] = 1\.0") as info:
        opt.step()
    assert info.value.loc is not None and info.value.loc.col == 1
    opt.param_groups[0]["b"] = "x"
    with pytest.raises(SoapArgumentError, match=r"param_group\['b'\] .* must be a number"):
        opt.step()
    opt.param_groups[0]["b"] = 0.5
    opt.step()  # valid again: training goes on


def test_l2_after_decay_sees_the_decayed_parameter_in_stacked_routes():
    text = (
        "recipe r(lr=1.0):\n"
        "  route default{o}: l2(0.1) |> decay(0.5, lr_scaled=false) |> l2(0.1) |> newton_schulz(1) |> lr\n"
    )
    results = []
    for o in ("", " [batch=false]"):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64)) for _ in range(2)]
        opt = soapdsl.build(text.format(o=o), [(f"w{i}", w) for i, w in enumerate(ws)])
        for w in ws:
            w.grad = torch.ones(3, 3, dtype=torch.float64)
        opt.step()
        results.append([w.detach().clone() for w in ws])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


RESETS = {
    "assign": lambda opt, p: setattr(opt, "state", __import__("collections").defaultdict(dict)),
    "clear": lambda opt, p: opt.state.clear(),
    "del_one": lambda opt, p: opt.state.__delitem__(p),
    "empty_one": lambda opt, p: opt.state.__setitem__(p, {}),
    "pop_one": lambda opt, p: opt.state.pop(p),
}


@pytest.mark.parametrize("how", sorted(RESETS))
@pytest.mark.parametrize("recipe", ["adamw", "soap"])
def test_state_reset_from_outside_restarts_the_state(recipe, how):
    """Resetting opt.state as one would a torch optimizer's (after re-initialising a layer,
    say) restarts the reset parameters from fresh state, and a checkpoint holds the new state.
    The optimizer's cached layout must not keep running on the old slabs. The expected run:
    a new optimizer (whole reset), or one loaded from a checkpoint without the parameter's
    state (one parameter reset)."""
    model = make_net()
    opt = soapdsl.build(recipe, model, lr=3e-3)
    _train([(model, opt)], DATA[:4])
    params = list(model.parameters())
    target = model.fc2.weight
    index = [id(p) for p in params].index(id(target))
    sd = copy.deepcopy(opt.state_dict())
    RESETS[how](opt, target)
    expected_model = make_net(seed=5)
    expected_model.load_state_dict(model.state_dict())
    expected = soapdsl.build(recipe, expected_model, lr=3e-3)
    if how not in ("assign", "clear"):
        del sd["state"][index]
        expected.load_state_dict(sd)
    _train([(model, opt), (expected_model, expected)], DATA[4:8])
    _assert_same(model, expected_model)
    saved, wanted = opt.state_dict()["state"], expected.state_dict()["state"]
    assert sorted(saved) == sorted(wanted) == list(range(len(params)))
    assert all(torch.equal(saved[i]["step"], wanted[i]["step"]) for i in saved)
    assert float(saved[index]["step"]) < float(saved[0 if index else 1]["step"]) or how in ("assign", "clear")


def test_state_reset_of_one_parameter_matches_torch():
    """``del opt.state[p]`` mid-run: the same numbers as torch's fused AdamW given the same."""
    model, ref = make_net(), make_net()
    opt = soapdsl.build("adamw", model, lr=3e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, fused=True)
    _train([(model, opt), (ref, opt_ref)], DATA[:4])
    del opt.state[model.fc2.weight]
    del opt_ref.state[ref.fc2.weight]
    _train([(model, opt), (ref, opt_ref)], DATA[4:8])
    _assert_same(model, ref)


def test_state_tensor_replaced_from_outside_is_the_one_used():
    """As in torch.optim.AdamW: a state tensor replaced by assignment is read and updated by
    the next step (soapdsl's adamw is bit-identical to torch's fused AdamW)."""
    model, ref = make_net(), make_net()
    opt = soapdsl.build("adamw", model, lr=3e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, fused=True)
    _train([(model, opt), (ref, opt_ref)], DATA[:3])
    new = torch.zeros_like(model.fc2.weight)
    opt.state[model.fc2.weight]["1.momentum.buf"] = new
    opt_ref.state[ref.fc2.weight]["exp_avg"] = torch.zeros_like(ref.fc2.weight)
    _train([(model, opt), (ref, opt_ref)], DATA[3:6])
    assert opt.state[model.fc2.weight]["1.momentum.buf"] is new or torch.equal(
        opt.state[model.fc2.weight]["1.momentum.buf"], new
    )
    assert torch.equal(new, opt_ref.state[ref.fc2.weight]["exp_avg"])
    _assert_same(model, ref)


def test_unchanged_state_keeps_its_layout_and_pickles_plain():
    """A step that finds opt.state as the last one left it reuses the layout (the state views
    stay the same objects), and the state pickles as torch's plain defaultdict(dict), so a
    checkpoint loads with weights_only=True; a deep copy notices changes to its own state."""
    model = make_net()
    opt = soapdsl.build("adamw", model)
    train_step(model, opt, DATA[0])
    views = {k: v for k, v in opt.state[model.fc2.weight].items()}
    train_step(model, opt, DATA[1])
    assert all(opt.state[model.fc2.weight][k] is v for k, v in views.items())
    assert not opt.state.dirty
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert type(loaded["state"][0]) is dict
    pair = copy.deepcopy({"model": model, "opt": opt})
    twin_model, twin = pair["model"], pair["opt"]
    twin.state.clear()
    assert len(opt.state) == len(list(model.parameters()))
    fresh_model = copy.deepcopy(model)
    fresh = soapdsl.build("adamw", fresh_model)
    train_step(twin_model, twin, DATA[2])
    train_step(fresh_model, fresh, DATA[2])
    _assert_same(twin_model, fresh_model)


def test_state_dict_hooks_see_what_torch_hooks_see():
    """A state-dict post hook sees the finished dict, the 'soapdsl' entry included; a load pre
    hook gets a copy of the caller's dict (torch's conventions), so it may rewrite its keys."""
    model = make_net()
    opt = soapdsl.build("adamw", model)
    train_step(model, opt, DATA[0])
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    sd = opt.state_dict()
    assert seen == [["param_groups", "soapdsl", "state"]]

    def pre(o, sd):
        sd["soapdsl"] = dict(sd["soapdsl"])
        sd.pop("extra")

    opt.register_load_state_dict_pre_hook(pre)
    mine = {**sd, "extra": 1}
    opt.load_state_dict(mine)
    assert "extra" in mine


class _Heads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.output = torch.nn.Linear(8, 4)
        self.module = torch.nn.Linear(4, 4)  # a model's own `module` keeps its name


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "compile_inside"])
def test_wrapped_models_route_and_checkpoint_as_the_plain_model(wrap):
    """torch.compile names parameters `_orig_mod.<name>`, DDP and DataParallel `module.<name>`;
    name routes (muon's "output.*") must still pick them, and a checkpoint of the plain model's
    optimizer must load into the wrapped one's."""
    torch.manual_seed(0)
    model = _Heads()
    if wrap == "compile":
        wrapped: torch.nn.Module = torch.compile(model)
    elif wrap == "data_parallel":
        wrapped = torch.nn.DataParallel(model)
    else:
        wrapped = torch.nn.Sequential()
        wrapped.add_module("net", torch.compile(model))
    assert any(w in n for n, _ in wrapped.named_parameters() for w in ("_orig_mod", "module.body"))
    plain = soapdsl.compile("muon", model)
    other = soapdsl.compile("muon", wrapped)
    prefix = "net." if wrap == "compile_inside" else ""
    names = [prefix + n for n, _ in model.named_parameters()]
    assert sorted(e.name for rp in other.routes for e in rp.params) == sorted(names)
    if not prefix:
        assert [[e.name for e in rp.params] for rp in plain.routes] == [
            [e.name for e in rp.params] for rp in other.routes
        ]
    assert ["output.weight", "output.bias"] == [e.name for e in plain.routes[0].params]
    if not prefix:
        opt = soapdsl.build("muon", model)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        soapdsl.build("muon", wrapped).load_state_dict(opt.state_dict())


def test_given_names_leave_out_torch_wrapper_segments():
    from soapdsl.compiler import named_parameters

    model = torch.compile(_Heads())
    assert [n for n, _ in named_parameters(model.named_parameters())] == [
        "body.weight",
        "body.bias",
        "output.weight",
        "output.bias",
        "module.weight",
        "module.bias",
    ]


@pytest.mark.parametrize("recipe", ["soap", "shampoo", "muon"])
def test_step_under_autocast_runs_as_without(recipe):
    """A loop that wraps the whole iteration in autocast: the step's matrix work must not run
    in bf16 (the factor EMA failed on a bf16 product; other products would lose precision)."""
    runs = []
    for cast in (False, True):
        model = make_net()
        opt = soapdsl.build(recipe, model)
        for batch in DATA[:3]:
            x, y = batch
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
                opt.step()
        runs.append(model)
    _assert_same(runs[0], runs[1])


@pytest.mark.parametrize("recipe", SHIPPED)
def test_a_step_inside_inference_mode_leaves_state_the_next_steps_can_update(recipe):
    """A step taken under torch.inference_mode (an evaluation loop that steps, a test harness)
    created the state there as inference tensors, which no step outside may update in place:
    the next step failed inside a stage with torch's 'Inplace update to inference tensor outside
    InferenceMode'. Now the step makes ordinary tensors, and the run equals one without it."""
    runs = []
    for inference in (False, True):
        torch.manual_seed(0)
        params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in BF16_SHAPES.items()}
        freq = {"freq": 2} if "freq" in shipped(recipe).defaults() else {}
        shares = pytest.warns(soapdsl.SoapWarning) if recipe == "soap_muon_shared" else nullcontext()
        with shares:
            opt = soapdsl.build(recipe, list(params.items()), **freq)
        g = torch.Generator().manual_seed(1)
        for k in range(5):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            with torch.inference_mode(inference and k in (0, 2)):
                opt.step()
        assert not any(t.is_inference() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
        runs.append(params)
    for n, p in runs[0].items():
        assert torch.equal(p, runs[1][n]), n


@pytest.mark.parametrize("recipe", SHIPPED)
def test_a_checkpoint_loaded_inside_inference_mode_trains_on(recipe):
    """torch's optimizers load a checkpoint under torch.inference_mode (a script that loads
    everything there, then trains) and step on; soapdsl copied the state into inference tensors,
    and the first step after failed inside a stage. Now it trains on as after a plain load."""
    runs = []
    for inference in (False, True):
        torch.manual_seed(0)
        params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in BF16_SHAPES.items()}
        freq = {"freq": 2} if "freq" in shipped(recipe).defaults() else {}
        with pytest.warns(soapdsl.SoapWarning) if recipe == "soap_muon_shared" else nullcontext():
            opt = soapdsl.build(recipe, list(params.items()), **freq)
        g = torch.Generator().manual_seed(1)
        for k in range(5):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            if k == 2:
                with torch.inference_mode(inference):
                    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        runs.append(params)
    for n, p in runs[0].items():
        assert torch.equal(p, runs[1][n]), n


def test_state_dict_without_top_level_entry_loads_from_its_param_groups():
    """Checkpointers that rebuild the dict from 'state' and 'param_groups' (torch's
    distributed checkpoint) drop the top-level 'soapdsl' entry; the groups carry the recipe's
    name and fingerprint, so the dict still loads, and still refuses another recipe."""
    model = make_net()
    opt = soapdsl.build("soap", model)
    _train([(model, opt)], DATA[:3])
    sd = opt.state_dict()
    del sd["soapdsl"]
    twin = make_net(seed=4)
    twin.load_state_dict(model.state_dict())
    opt2 = soapdsl.build("soap", twin)
    opt2.load_state_dict(sd)
    _train([(model, opt), (twin, opt2)], DATA[3:6])
    _assert_same(model, twin)
    with pytest.raises(SoapStateError, match="saved by recipe 'soap'"):
        soapdsl.build("soap_muon", make_net()).load_state_dict(sd)


def test_distributed_checkpoint_state_dict_round_trip(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_net()
        opt = soapdsl.build("soap", model)
        _train([(model, opt)], DATA[:3])
        osd = get_optimizer_state_dict(model, opt)
        twin = make_net(seed=4)
        twin.load_state_dict(model.state_dict())
        opt2 = soapdsl.build("soap", twin)
        set_optimizer_state_dict(twin, opt2, osd)
    finally:
        dist.destroy_process_group()
    _train([(model, opt), (twin, opt2)], DATA[3:6])
    _assert_same(model, twin)


def test_numpy_scalars_and_0d_tensors_are_taken_as_python_numbers():
    """As torch.optim takes them; stored as Python numbers, so that a checkpoint loads with
    torch.load(weights_only=True)."""
    np = pytest.importorskip("numpy")
    for lr in (np.float32(1e-3), np.float64(1e-3), np.int64(1), torch.tensor(1e-3)):
        model = make_net()
        opt = soapdsl.build("adamw", model, lr=lr, weight_decay=np.float64(0.1))
        assert type(opt.param_groups[0]["lr"]) in (float, int)
        assert type(opt.param_groups[0]["weight_decay"]) is float
        train_step(model, opt, DATA[0])
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    with pytest.raises(SoapArgumentError, match="must be a number"):
        soapdsl.build("adamw", make_net(), lr=torch.ones(2))
