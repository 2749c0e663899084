"""SoapOptimizer at the edges of torch's contract: values fixed at build time, copies and
pickling, the number types torch accepts for hyperparameters, bad parameter lists, hand-edited
state dicts, LR schedulers that cycle momentum."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import re
import zlib

import numpy as np
import pytest
import torch

import soapdsl
from soapdsl.errors import SoapArgumentError, SoapStateError


class _Net(torch.nn.Module):
    """An embedding, two matrices and their biases: three routes under muon and soap_muon."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 6)
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 6)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _Net().double()


def _grads(net: torch.nn.Module, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in net.parameters()] for _ in range(steps)]


def _run(net: torch.nn.Module, opt: torch.optim.Optimizer, grads: list[list[torch.Tensor]], before=None) -> None:
    for k, gs in enumerate(grads):
        for p, g in zip(net.parameters(), gs, strict=True):
            p.grad = g.clone()
        if before is not None:
            before(opt, k)
        opt.step()


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# -- values fixed when the optimizer is built ---------------------------------------------------


def test_a_fixed_value_written_into_a_group_is_refused_at_the_next_step():
    net = _net()
    opt = soapdsl.build("soap", net, freq=10)
    _run(net, opt, _grads(net, 1))
    opt.param_groups[0]["freq"] = 2
    with pytest.raises(SoapArgumentError) as info:
        opt.step()
    message = info.value.message
    assert "param_group['freq'] of route 'default' is 2, but this optimizer was built with freq=10" in message
    assert "fixed when the optimizer is built ('rotate' reads it once)" in message
    assert "build a new optimizer with freq=2" in message
    assert info.value.loc is not None and info.value.loc.file.endswith("soap.soap")


def test_a_value_a_route_does_not_read_may_change_and_one_it_follows_is_honoured():
    """muon's Adam routes never read `momentum`: writing it into every group (a momentum
    warmup loop) is no error there, and the Muon route follows it."""
    a, b = _net(), _net()
    grads = _grads(a, 3)
    built = soapdsl.build("muon", a, momentum=0.9)
    written = soapdsl.build("muon", b, momentum=0.95)
    for group in written.param_groups:
        group["momentum"] = 0.9
    _run(a, built, grads)
    _run(b, written, grads)
    _assert_same(a, b)


def test_a_value_a_route_setting_reads_is_refused_with_a_hint_at_lr():
    net = _net()
    opt = soapdsl.build("muon", net)
    for group in opt.param_groups:
        group["adam_lr"] = 1e-3
    with pytest.raises(SoapArgumentError, match=r"\[lr=adam_lr\] reads it once.*set param_group\['lr'\]"):
        _run(net, opt, _grads(net, 1))


def test_a_checkpoint_saved_with_another_fixed_value_is_refused_before_any_state_is_touched():
    net = _net()
    saved = soapdsl.build("muon", net, ns_steps=5)
    _run(net, saved, _grads(net, 2))
    opt = soapdsl.build("muon", net, ns_steps=1)
    with pytest.raises(
        SoapStateError,
        match=r"the checkpoint was saved with ns_steps=5, this optimizer was built with ns_steps=1 "
        r"\(route 'ndim >= 2' fixes it when the optimizer is built\); build it with ns_steps=5",
    ):
        opt.load_state_dict(saved.state_dict())
    assert len(opt.state) == 0
    assert [g["ns_steps"] for g in opt.param_groups] == [1, 1, 1]


@pytest.mark.parametrize(
    ("recipe", "args", "expected"),
    [
        ("soap", {"max_dim": 7}, "saved with max_dim=10000, this optimizer was built with max_dim=7"),
        ("soap", {"precondition_1d": True}, "saved with precondition_1d=false, this optimizer was built with"),
        ("soap", {"merge_dims": True}, "saved with merge_dims=false, this optimizer was built with merge_dims=true"),
        # max_dim moves the matrices to another route: the selectors read it
        ("soap_muon", {"max_dim": 7}, r"max_dim=7 \(the route selectors read it"),
    ],
)
def test_checkpoint_messages_name_the_fixed_value_that_differs(recipe, args, expected):
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Linear(12, 6))
    saved = soapdsl.build(recipe, net)
    for _ in range(2):
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        saved.step()
    with pytest.raises(SoapStateError, match=expected):
        soapdsl.build(recipe, net, **args).load_state_dict(saved.state_dict())


def test_a_checkpoint_loads_into_a_build_with_other_followed_values_and_setting_sources():
    """lr (followed) and adam_lr (read by a setting into the Adam routes' lr) may differ: the
    checkpoint's lr takes over, as documented, and training goes on without an error."""
    a, b = _net(), _net()
    grads = _grads(a, 4)
    saved = soapdsl.build("muon", a, lr=0.01, adam_lr=1e-3)
    _run(a, saved, grads[:2])
    opt = soapdsl.build("muon", b, lr=0.5, adam_lr=0.1)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            q.copy_(p)
    opt.load_state_dict(saved.state_dict())
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in saved.param_groups]
    _run(a, saved, grads[2:])
    _run(b, opt, grads[2:])
    _assert_same(a, b)


def test_the_routes_a_checkpoint_was_saved_for_are_compared():
    """Two routes with the same stages: a checkpoint whose parameters all took the head route
    must not load into an optimizer whose (equally many, equally shaped) parameters take the
    other route, even though every count and shape agrees."""
    text = 'recipe r(lr=0.01, head_lr=0.1):\n  route "head*" [lr=head_lr]: adamw\n  route default: adamw\n'
    head = [("head.weight", torch.nn.Parameter(torch.randn(3, 3)))]
    body = [("body.weight", torch.nn.Parameter(torch.randn(3, 3)))]
    saved = soapdsl.build(text, head)
    head[0][1].grad = torch.ones(3, 3)
    saved.step()
    with pytest.raises(SoapStateError, match=r"holds routes \['\"head\*\"'\].*take routes \['default'\]"):
        soapdsl.build(text, body).load_state_dict(saved.state_dict())


# -- torch's hyperparameter names that a recipe lacks ----------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "key", "value", "message"),
    [
        (
            "adamw",
            "betas",
            (0.5, 0.5),
            r"param_group\['betas'\] of route 'default' would be ignored: recipe 'adamw' has no parameter"
            r" 'betas'; write beta1 and beta2 \(torch's betas=\(beta1, beta2\) is 2 parameters here\)"
            r" \(parameters: lr, beta1, beta2, eps, weight_decay\)$",
        ),
        (
            "adamw",
            "momentum",
            0.5,
            r"param_group\['momentum'\] of route 'default' would be ignored: recipe 'adamw' has no parameter"
            r" 'momentum' \(parameters: lr, beta1, beta2, eps, weight_decay\)$",
        ),
        ("adamw", "amsgrad", True, r"recipe 'adamw' has no parameter 'amsgrad'"),
        ("adamw", "maximize", True, r"recipe 'adamw' has no parameter 'maximize'"),
        ("adamw", "foreach", True, r"has no parameter 'foreach'; soapdsl picks the kernel per route itself"),
        # card's header has no weight_decay (nor eps): a decay loop or a torch config sets it in vain
        ("card", "weight_decay", 0.1, r"recipe 'card' has no parameter 'weight_decay' \(parameters: lr, adam_lr\)"),
        ("sign |> lr", "eps", 1e-3, r"route 'default' would be ignored: recipe 'inline' has no parameter 'eps'"),
        ("muon", "betas", (0.9, 0.95), r"route 'default' would be ignored: recipe 'muon' has no parameter 'betas'"),
    ],
)
def test_a_torch_hyperparameter_the_recipe_lacks_is_refused_at_the_step(recipe, key, value, message):
    """A torch user's betas, momentum or weight_decay written into a group of a recipe that has
    no such parameter was ignored by every step: silently other numbers than the ones meant. The
    step refuses it before it writes any parameter, and goes on once the key is gone."""
    a, b = _net(), _net()
    grads = _grads(a, 3)
    opt, twin = soapdsl.build(recipe, a), soapdsl.build(recipe, b)
    _run(a, opt, grads[:1])
    _run(b, twin, grads[:1])
    before = [p.detach().clone() for p in a.parameters()]
    group = opt.param_groups[-1]
    group[key] = value
    with pytest.raises(SoapArgumentError, match=message):
        _run(a, opt, grads[1:2])
    for p, q in zip(a.parameters(), before, strict=True):
        assert torch.equal(p, q)
    del group[key]
    _run(a, opt, grads[1:])
    _run(b, twin, grads[1:])
    _assert_same(a, b)


def test_every_torch_hyperparameter_is_named_and_the_others_are_listed_in_a_note():
    net = _net()
    opt = soapdsl.build("adamw", net)
    opt.param_groups[0].update(momentum=0.9, nesterov=True, initial_lr=1e-3, dampening=0.1)
    with pytest.raises(SoapArgumentError) as info:
        _run(net, opt, _grads(net, 1))
    assert "param_group['momentum'] of route 'default'" in info.value.message
    assert info.value.notes == (
        "the group also holds 'nesterov', 'dampening', which the recipe has no parameter for either",
    )


def test_a_key_renamed_in_place_is_seen_though_the_group_keeps_its_size():
    """The check looks at a group's keys again whenever they changed, not only when their count
    did: eps renamed to torch's momentum leaves as many keys."""
    net = _net()
    opt = soapdsl.build("adamw", net)
    _run(net, opt, _grads(net, 1))
    group = opt.param_groups[0]
    group["momentum"] = group.pop("eps")
    with pytest.raises(SoapArgumentError, match=r"param_group\['momentum'\] of route 'default' would be ignored"):
        _run(net, opt, _grads(net, 1))


def test_a_config_route_override_names_its_own_recipe_and_takes_the_optimizers_defaults():
    """An override route's group holds the overriding recipe's parameters: torch's betas there
    names adamw's; the momentum that OneCycleLR writes into every group of muon (it is in
    opt.defaults) is muon's, which that route does not read, as muon's own Adam routes do not."""
    net = _net()
    opt = soapdsl.from_config(net, {"recipe": "muon", "routes": [{"match": "embed.*", "recipe": "adamw"}]})
    assert opt.param_groups[0]["route"] == '"embed.*"'
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6)
    for gs in _grads(net, 3):
        _run(net, opt, [gs])
        sched.step()
    assert all("momentum" in g and "max_momentum" in g for g in opt.param_groups)
    opt.param_groups[0]["betas"] = (0.9, 0.95)
    with pytest.raises(
        SoapArgumentError,
        match=r"""param_group\['betas'\] of route '"embed\.\*"' would be ignored: recipe 'adamw' has no parameter"""
        r" 'betas'; write beta1 and beta2 .*\(parameters: lr, beta1, beta2, eps, weight_decay\)$",
    ):
        _run(net, opt, _grads(net, 1))


def test_keys_of_schedulers_trainers_and_users_are_kept_and_change_nothing():
    """initial_lr (every LRScheduler), swa_lr (SWALR), max_lr and base_momentum style keys and a
    user's own ("name") are no torch hyperparameters: they stay in the groups, and the steps are
    those of an optimizer without them."""
    a, b = _net(), _net()
    grads = _grads(a, 4)
    opt, twin = soapdsl.build("adamw", a), soapdsl.build("adamw", b)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=3)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin, step_size=2, gamma=0.5)
    twin_swa = torch.optim.swa_utils.SWALR(twin, swa_lr=0.05, anneal_epochs=3)
    opt.param_groups[0].update(name="body", max_lr=1.0, min_lr=0.0, base_lr=1e-3, max_momentum=0.95)
    for gs in grads:
        _run(a, opt, [gs])
        _run(b, twin, [gs])
        for s in (sched, swa, twin_sched, twin_swa):
            s.step()
    assert {"initial_lr", "swa_lr", "name", "max_lr"} <= opt.param_groups[0].keys()
    _assert_same(a, b)


def test_a_copy_of_an_optimizer_whose_group_holds_a_torch_hyperparameter_refuses_it_too():
    net = _net()
    opt = soapdsl.build("adamw", net)
    opt.param_groups[0]["momentum"] = 0.9
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        with pytest.raises(SoapArgumentError, match=r"recipe 'adamw' has no parameter 'momentum'"):
            copied.step()


def test_a_checkpoint_whose_group_holds_a_torch_hyperparameter_the_recipe_lacks_is_refused():
    """load_state_dict copies each saved group's keys into the group: a betas saved there
    (written by hand, or saved by a soapdsl that ignored it) would be refused at the next step,
    far from its cause; the load refuses it, before touching any state, and says how to load."""
    net = _net()
    saved = soapdsl.build("adamw", net)
    _run(net, saved, _grads(net, 2))
    sd = saved.state_dict()
    sd["param_groups"][0]["betas"] = (0.5, 0.5)
    opt = soapdsl.build("adamw", net)
    with pytest.raises(
        SoapStateError,
        match=r"the state dict's param_groups\[0\] \(route 'default'\) holds 'betas', but recipe 'adamw' has no"
        r" parameter 'betas'; write beta1 and beta2 .*: the optimizer that saved it ignored it, and so would this"
        r" one; delete sd\['param_groups'\]\[0\]\['betas'\] to load the checkpoint$",
    ):
        opt.load_state_dict(sd)
    assert len(opt.state) == 0 and "betas" not in opt.param_groups[0]
    del sd["param_groups"][0]["betas"]
    sd["param_groups"][0]["initial_lr"] = 1e-3  # a scheduler's key loads as before
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["initial_lr"] == 1e-3
    _run(net, opt, _grads(net, 1))


def test_a_torch_optimizers_stepped_state_dict_is_refused_as_not_soapdsls():
    """torch's AdamW saves betas, amsgrad, foreach... in its groups: its checkpoint is refused
    as not a soapdsl one before any of those keys is looked at."""
    net = _net()
    ref = torch.optim.AdamW(net.parameters())
    _run(net, ref, _grads(net, 1))
    with pytest.raises(SoapStateError, match="not saved by a soapdsl optimizer"):
        soapdsl.build("adamw", net).load_state_dict(ref.state_dict())


def test_the_torch_hyperparameter_names_cover_every_torch_optimizer():
    """The names are every keyword of torch.optim's optimizers' constructors (lr aside, which every
    group holds): a torch that adds one fails here, to add it."""
    from soapdsl.runtime.optimizer import TORCH_HYPERPARAMETERS

    names = set()
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            names |= set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"}
    assert names <= TORCH_HYPERPARAMETERS, sorted(names - TORCH_HYPERPARAMETERS)
    assert {"betas", "momentum", "weight_decay", "eps", "nesterov"} <= TORCH_HYPERPARAMETERS
    # what schedulers and trainers write must not be among them
    assert not {"lr", "initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum", "swa_lr"} & (
        TORCH_HYPERPARAMETERS
    )


# -- copies and pickling ------------------------------------------------------------------------


def test_deepcopy_gives_a_working_independent_optimizer():
    net = _net()
    opt = soapdsl.build("soap_muon", net, freq=2)
    _run(net, opt, _grads(net, 2))
    twin = copy.deepcopy(opt)
    assert repr(twin) == repr(opt)
    ps = [p for g in opt.param_groups for p in g["params"]]
    qs = [q for g in twin.param_groups for q in g["params"]]  # copies: it was copied alone
    assert all(q is not p and torch.equal(q, p) for p, q in zip(ps, qs, strict=True))
    mine = {v.data_ptr() for q in qs for v in twin.state[q].values() if torch.is_tensor(v)}
    theirs = {v.data_ptr() for p in ps for v in opt.state[p].values() if torch.is_tensor(v)}
    assert not mine & theirs
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))
    assert twin.state_dict()["soapdsl"] == opt.state_dict()["soapdsl"]
    opt.step()  # stepping one leaves the other's state alone
    assert float(twin.state[qs[0]]["step"]) == 5 and float(opt.state[ps[0]]["step"]) == 6


def test_deepcopy_of_model_and_optimizer_together_keys_the_copy_by_the_copied_parameters():
    """As with torch's optimizers (EMA and checkpoint copies): one deepcopy of both keeps the
    copy's param_groups and state on the copied model's parameters."""
    net = _net()
    grads = _grads(net, 4)
    opt = soapdsl.build("muon", net)
    _run(net, opt, grads[:2])
    copied = copy.deepcopy({"net": net, "opt": opt})
    net2, opt2 = copied["net"], copied["opt"]
    params2 = set(map(id, net2.parameters()))
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == params2
    assert {id(p) for p in opt2.state} == params2
    before = [p.detach().clone() for p in net.parameters()]
    _run(net2, opt2, grads[2:])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    _run(net, opt, grads[2:])
    _assert_same(net, net2)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickled_optimizer_comes_back_working(how):
    net = _net()
    grads = _grads(net, 4)
    opt = soapdsl.build("adamw", net)
    _run(net, opt, grads[:2])
    if how == "pickle":
        net2, opt2 = pickle.loads(pickle.dumps((net, opt)))
    else:
        buf = io.BytesIO()
        torch.save((net, opt), buf)
        buf.seek(0)
        net2, opt2 = torch.load(buf, weights_only=False)
    _run(net, opt, grads[2:])
    _run(net2, opt2, grads[2:])
    _assert_same(net, net2)


def test_unpickling_an_optimizer_without_a_plan_says_to_use_state_dict():
    opt = soapdsl.build("adamw", _net())
    state = torch.optim.Optimizer.__getstate__(opt)  # what a pickle made by an older soapdsl holds
    fresh = object.__new__(type(opt))
    with pytest.raises(SoapStateError, match=r"save and load opt\.state_dict\(\) instead"):
        fresh.__setstate__(state)


# -- hyperparameter values at step time -----------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda v: np.float32(v), lambda v: np.float64(v), lambda v: torch.tensor(v, dtype=torch.float32)]
)
def test_lr_may_be_a_numpy_scalar_or_a_0d_cpu_tensor(make):
    a, b = _net(), _net()
    grads = _grads(a, 3)
    ref, opt = soapdsl.build("adamw", a), soapdsl.build("adamw", b)

    def schedule(o, k):
        for group in o.param_groups:
            value = make(1e-2 / (k + 1))
            group["lr"] = float(value) if o is ref else value

    _run(a, ref, grads, schedule)
    _run(b, opt, grads, schedule)
    _assert_same(a, b)
    assert type(opt.param_groups[0]["lr"]) is type(make(0.5))  # the group keeps what was written


@pytest.mark.parametrize(
    ("recipe", "key", "value"),
    [
        ("soap", "eps", 10**30),
        ("ademamix", "eps", 2**63),
    ],
)
def test_an_integer_past_int64_that_a_stage_follows_steps_as_its_float(recipe, key, value):
    """A recipe parameter given as a Python int too large for int64 reached torch as it was, and
    the step raised OverflowError (int too big to convert) from a foreach kernel; a literal of
    the same size in recipe text was always read as a float."""
    a, b = _net(), _net()
    grads = _grads(a, 2)
    _run(a, soapdsl.build(recipe, a, **{key: float(value)}), grads)
    _run(b, soapdsl.build(recipe, b, **{key: value}), grads)
    _assert_same(a, b)


def test_a_tensor_lr_changed_in_place_takes_effect():
    w = torch.nn.Parameter(torch.zeros(3))
    lr = torch.tensor(1.0)
    opt = soapdsl.build("scale(1.0) |> lr", [("w", w)], lr=1.0)
    opt.param_groups[0]["lr"] = lr
    w.grad = torch.ones(3)
    opt.step()
    lr.fill_(0.5)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), -1.5))


def test_a_loaded_tensor_lr_is_a_copy_as_torch_loads_it():
    """A scheduler writes a tensor lr in place (fill_). load_state_dict put the checkpoint's
    tensor itself into the group, so an optimizer loaded from another's state_dict() shared its
    lr: the other's scheduler moved both, without a word. torch copies the saved groups."""
    a, b = _net(), _net()
    src, dst = soapdsl.build("adamw", a), soapdsl.build("adamw", b)
    src.param_groups[0]["lr"] = torch.tensor(0.01)
    sd = src.state_dict()
    dst.load_state_dict(sd)
    assert dst.param_groups[0]["lr"] is not src.param_groups[0]["lr"]
    torch.optim.lr_scheduler.LambdaLR(src, lambda epoch: 0.1)  # src's lr.fill_(0.001)
    assert float(src.param_groups[0]["lr"]) == pytest.approx(0.001)
    assert float(dst.param_groups[0]["lr"]) == pytest.approx(0.01)
    assert float(sd["param_groups"][0]["lr"]) == pytest.approx(0.001)  # sd holds src's own, as torch's does


def test_a_tensor_lr_loaded_inside_inference_mode_is_an_ordinary_tensor():
    """A load under torch.inference_mode makes ordinary state tensors; the group's copied tensor
    lr was made there too, an inference tensor, so a scheduler's fill_ outside failed."""
    a, b = _net(), _net()
    src, dst = soapdsl.build("adamw", a), soapdsl.build("adamw", b)
    src.param_groups[0]["lr"] = torch.tensor(0.01)
    with torch.inference_mode():
        dst.load_state_dict(src.state_dict())
    assert not dst.param_groups[0]["lr"].is_inference()
    torch.optim.lr_scheduler.LambdaLR(dst, lambda epoch: 0.1)  # dst's lr.fill_(0.001)
    assert float(dst.param_groups[0]["lr"]) == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-0.1, r"param_group\['lr'\] of route 'default' is -0\.1; the learning rate must be a finite number >= 0"),
        (float("nan"), r"is nan; the learning rate must be a finite number >= 0"),
        (float("inf"), r"is inf; the learning rate must be a finite number >= 0"),
        (True, r"param_group\['lr'\] of route 'default' must be a number, got bool"),
        (torch.tensor([0.1, 0.2]), r"must be a number or a 0-d real tensor, got a torch\.float32 tensor of shape"),
        (torch.tensor(0.1, device="meta"), r"is a tensor on meta; soapdsl reads hyperparameters on the host"),
    ],
)
def test_bad_lr_values_written_at_run_time_are_refused(value, message):
    net = _net()
    opt = soapdsl.build("adamw", net)
    opt.param_groups[0]["lr"] = value
    with pytest.raises(SoapArgumentError, match=message):
        _run(net, opt, _grads(net, 1))


@pytest.mark.parametrize("fault", ["nan_lr", "sparse_grad"])
def test_a_refused_step_writes_no_parameter_and_a_retry_steps_once(fault):
    """muon steps its embedding and matrix routes before its vectors' route 'default'. A value or
    gradient of a later route that the step refuses was found only after the earlier routes had
    stepped: their parameters and state had moved, and fixing the cause and stepping again
    stepped them twice with the same gradients."""
    a, b = _net(), _net()
    grads = _grads(a, 1)
    opt, twin = soapdsl.build("muon", a), soapdsl.build("muon", b)
    assert [g["route"] for g in opt.param_groups][1:] == ["ndim >= 2", "default"]
    before = [p.detach().clone() for p in a.parameters()]
    for p, g in zip(a.parameters(), grads[0], strict=True):
        p.grad = g.clone()
    last = opt.param_groups[-1]
    if fault == "nan_lr":
        lr, last["lr"] = last["lr"], float("nan")
    else:
        bias = a.fc2.bias
        dense, bias.grad = bias.grad, bias.grad.to_sparse()
    with pytest.raises(SoapArgumentError, match="is nan" if fault == "nan_lr" else "'fc2.bias' has a sparse gradient"):
        opt.step()
    for p, q in zip(a.parameters(), before, strict=True):
        assert torch.equal(p, q)
    if fault == "nan_lr":
        last["lr"] = lr
    else:
        bias.grad = dense
    opt.step()
    _run(b, twin, grads)
    _assert_same(a, b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(opt.state[p].values(), twin.state[q].values(), strict=True))


@pytest.mark.parametrize("recipe", ["adamw", "muon"])
def test_a_gradient_that_turns_sparse_after_the_first_step_is_refused_by_name(recipe):
    """The sparse check ran only when a route's layout was built: an embedding whose gradient
    was dense at the first step and sparse at the next (F.embedding(..., sparse=True) from then
    on, or a gradient set by hand) reached momentum's lerp_ and raised torch's
    NotImplementedError for the SparseCPU backend."""
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3))
    opt = soapdsl.build(recipe, model)
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    emb = model[0].weight
    emb.grad = emb.grad.to_sparse()
    with pytest.raises(SoapArgumentError, match=r"parameter '0\.weight' has a sparse gradient"):
        opt.step()
    emb.grad = emb.grad.to_dense()
    opt.step()
    assert float(opt.state[emb]["step"]) == 2


def test_run_time_range_errors_use_the_build_time_words():
    net = _net()
    with pytest.raises(SoapArgumentError, match=r"must be < 1\.0"):
        soapdsl.build("adamw", net, beta1=1.5)
    opt = soapdsl.build("adamw", net)
    opt.param_groups[0]["beta1"] = 1.5
    with pytest.raises(SoapArgumentError) as info:
        _run(net, opt, _grads(net, 1))
    assert "argument beta became invalid during training (param_group['beta1'] = 1.5): must be < 1.0" in str(info.value)
    assert "Input should" not in str(info.value)


# -- parameter lists -------------------------------------------------------------------------------


def test_one_tensor_passed_twice_is_refused():
    w = torch.nn.Parameter(torch.randn(11, 6))
    with pytest.raises(
        SoapArgumentError,
        match=r"parameter 'blocks\.0\.fc\.weight' is the same tensor as 'embed\.weight' \(tied weights\): pass it once",
    ):
        soapdsl.build("soap_muon", [("embed.weight", w), ("blocks.0.fc.weight", w)])
    with pytest.raises(SoapArgumentError, match=r"parameter 'param\.1' is the same tensor as 'param\.0'"):
        soapdsl.build("adamw", [w, w])


def test_two_tensors_under_one_name_are_refused():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(SoapArgumentError, match=r"two different parameters are named 'x'"):
        soapdsl.build("adamw", [("x", a), ("x", b)])


@pytest.mark.parametrize(
    ("recipe", "line"),
    [
        ("soap", "recipes/soap.soap:14:5"),
        ("soap_muon", "recipes/soap_muon.soap:24:5"),
        ("soap_soap", "recipes/soap_soap.soap:24:8"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_after_the_first_basis_is_named_at_the_next_refresh(recipe, line, bad):
    """The first basis's eigh fails on a NaN; later refreshes use QR, which passed NaN and inf on
    into every basis after without a word. On a CPU the refresh now reads the factors (no device
    synchronisation there) and names the parameter, as the first step and shampoo do."""
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5, 5))
    opt = soapdsl.build(recipe, [("fc.weight", w), ("ok.weight", v)], freq=3)
    for step in range(3):  # t = 0 (the skipped first step), 1, 2
        w.grad, v.grad = torch.randn(6, 4), torch.randn(5, 5)
        if step == 2:
            w.grad[1, 2] = bad
        opt.step()
    w.grad, v.grad = torch.randn(6, 4), torch.randn(5, 5)
    with pytest.raises(SoapArgumentError) as info:
        opt.step()  # the refresh at t = 3
    message = str(info.value)
    assert line in message and "cannot compute the eigenbasis of parameter 'fc.weight'" in message, message
    assert "'ok.weight'" not in message and "non-finite values" in message


def test_tied_weights_of_a_module_are_optimized_once():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(11, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight

    opt = soapdsl.build("adamw", Tied())
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


class _TiedLM(torch.nn.Module):
    """GPT-2's names: the head is the embedding (transformers' tie_word_embeddings)."""

    def __init__(self, head: str = "lm_head") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(11, 6)
        self.transformer.h = torch.nn.Linear(6, 6)
        setattr(self, head, torch.nn.Linear(6, 11, bias=False))
        getattr(self, head).weight = self.transformer.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(next(n for n in ("lm_head", "unembed") if hasattr(self, n)))(
            self.transformer.h(self.transformer.wte(x))
        )


TIED_WARNING = [
    "warning: parameter 'transformer.wte.weight' is also named 'lm_head.weight' (tied weights), and the names"
    ' select different routes: \'transformer.wte.weight\' selects route \'"*embed*" or "*wte*" or "*wpe*"\''
    ' (route 0), \'lm_head.weight\' selects route \'"*lm_head*" or "head.*" or "*.head.*" or "output.*"\''
    " (route 1); it is stepped once, by route 0, its first name's (nn.Module.named_parameters() lists a tied"
    " tensor once, under its first name)",
    "  note: to route it by 'lm_head.weight' (route 1), pass the parameters with that name only: [(n, p) for n, p"
    " in model.named_parameters(remove_duplicate=False) if n != '{prefix}transformer.wte.weight']",
    "  note: to keep it on route 0 without this warning, pass model.named_parameters()",
]


def _tied_steps(opt: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    x = torch.tensor([[1, 4, 7], [2, 3, 10]])
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("wrap", ["none", "compile", "data_parallel"])
def test_tied_weights_whose_names_select_different_routes_warn(wrap):
    """A GPT-2's head (lm_head.weight) is its embedding (transformer.wte.weight): under soap_muon
    the tensor took the embedding's route, lr 0.4, not the head's 4e-3, without a word, and the
    loss rose from 3.9 to 8-10. The warning names both routes, the one taken and how to take the
    other; a wrapped model's names leave the wrapper out, as its routes do."""
    model = _TiedLM()
    wrapped = {"none": model, "compile": torch.compile(model), "data_parallel": torch.nn.DataParallel(model)}[wrap]
    with pytest.warns(soapdsl.SoapWarning) as record:
        opt = soapdsl.build("soap_muon", wrapped)
    (w,) = [r.message for r in record]
    prefix = {"none": "", "compile": "_orig_mod.", "data_parallel": "module."}[wrap]
    assert str(w).splitlines() == [line.replace("{prefix}", prefix) for line in TIED_WARNING]
    assert record[0].filename == __file__
    (group,) = [g for g in opt.param_groups if any(p is model.lm_head.weight for p in g["params"])]
    assert (group["route"], group["lr"]) == ('"*embed*" or "*wte*" or "*wpe*"', 0.4)
    # stepped as passing the names torch lists, which routes it the same way without a word
    same = _TiedLM()
    _tied_steps(opt, model)
    _tied_steps(soapdsl.build("soap_muon", same.named_parameters()), same)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters(), strict=True))


def test_tied_weights_route_by_the_name_passed_for_them():
    """What the warning's note says: the pairs of named_parameters(remove_duplicate=False) less
    the first name route the tensor by its other name, here the head's route (lr 4e-3)."""
    model = _TiedLM()
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if n != "transformer.wte.weight"]
    opt = soapdsl.build("soap_muon", params)  # SoapWarning is an error in the tests
    (group,) = [g for g in opt.param_groups if any(p is model.lm_head.weight for p in g["params"])]
    assert (group["route"], group["lr"]) == ('"*lm_head*" or "head.*" or "*.head.*" or "output.*"', 4e-3)
    before = model.lm_head.weight.detach().clone()
    _tied_steps(opt, model)
    assert not torch.equal(model.lm_head.weight, before)


def test_tied_weights_whose_names_select_one_route_do_not_warn():
    model = _TiedLM(head="unembed")  # "*embed*" selects both names
    opt = soapdsl.build("soap_muon", model)  # SoapWarning is an error in the tests
    assert sum(len(g["params"]) for g in opt.param_groups) == 3
    soapdsl.build("adamw", _TiedLM())  # one route for all


@pytest.mark.parametrize(
    "dtype", [torch.complex64, torch.complex128, torch.int64, torch.int8, torch.bool, torch.float8_e4m3fn]
)
def test_parameters_of_other_than_real_float_dtypes_are_refused(dtype):
    """Complex ones would lose their imaginary part; integer and bool ones failed inside a
    stage at the first step (or, with soap, silently did nothing); float8 ones failed inside the
    compiler. `apply` shares the check: it returned a bool matrix for newton_schulz."""
    w = torch.zeros(4, 3).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        SoapArgumentError, match=rf"parameter 'w' is {name}; soapdsl optimizes real floating-point parameters only"
    ):
        soapdsl.build("adam", [("w", w)])
    with pytest.raises(SoapArgumentError, match="real floating-point parameters only"):
        soapdsl.apply("newton_schulz", torch.ones(3, 3).to(dtype))


@pytest.mark.parametrize("recipe", ["adamw", "soap", "muon"])
def test_parameters_on_the_meta_device_are_refused_at_build_and_planned_by_compile(recipe):
    """They failed at the first step inside torch ("unknown device type for autocast"). torch's
    optimizers step them as a no-op, but a model on the meta device is materialized with new
    parameters (model.to_empty), which an optimizer built before never steps: an error at build
    says so. soapdsl.compile plans for meta tensors, as `soapdsl compile --shapes` does."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, device="meta"))
    with pytest.raises(
        SoapArgumentError,
        match=r"^error: parameter '1\.weight' is on the meta device, which holds no values to optimize: build the"
        r" optimizer for the model once it is materialized \(model\.to_empty\(device=\.\.\.\) gives it new",
    ):
        soapdsl.build(recipe, model)
    meta = torch.nn.Linear(4, 3, device="meta")
    assert soapdsl.compile(recipe, meta).state_bytes() == soapdsl.compile(recipe, torch.nn.Linear(4, 3)).state_bytes()


def test_parameters_of_a_lazy_module_are_refused_by_name_until_materialized():
    """An nn.LazyLinear's parameters have no shape before the first forward pass: build and
    compile raised torch's "Can't access the shape of an uninitialized parameter" from inside the
    compiler. After a forward pass the same model builds."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LazyLinear(2))
    for make in (soapdsl.build, soapdsl.compile):
        with pytest.raises(
            SoapArgumentError,
            match=r"^error: parameter '1\.weight' is not initialized yet \(a lazy module's, such as"
            r" nn\.LazyLinear's\), so it has no shape to route it by: run a forward pass",
        ):
            make("muon", model)
    model(torch.randn(2, 4))
    assert [g["route"] for g in soapdsl.build("muon", model).param_groups] == ["ndim >= 2", "default"]


def test_a_non_leaf_parameter_is_refused_by_name():
    """torch's own "can't optimize a non-leaf Tensor" came through without saying which one."""
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(SoapArgumentError, match=r"^error: parameter 'scaled' is not a leaf tensor \(it was computed"):
        soapdsl.build("adamw", [("w", w), ("scaled", w * 2)])


def test_a_checkpoint_with_state_on_the_meta_device_is_refused_by_name():
    """Loading it failed inside torch: "Cannot copy out of meta tensor; no data!"."""
    for key, value in (
        ("1.momentum.buf", torch.empty(3, 4, device="meta")),
        ("step", torch.tensor(1.0, device="meta")),
    ):
        net, sd = _saved()
        sd["state"][0][key] = value
        with pytest.raises(
            SoapStateError, match=rf"state '{re.escape(key)}' of parameter 'weight' is on the meta device"
        ):
            soapdsl.build("adamw", net).load_state_dict(sd)


# -- empty parameters ------------------------------------------------------------------------------

#: square, tall and wide matrices and a vector, in two blocks (soap_muon_shared shares a basis
#: between them), and empty ones among them: a zero-size dimension anywhere, two empty ones in
#: one share group
_FULL = {
    "blocks.0.fc.weight": (6, 4),
    "blocks.1.fc.weight": (6, 4),
    "blocks.0.proj.weight": (4, 6),
    "blocks.0.sq.weight": (5, 5),
    "blocks.0.fc.bias": (4,),
}
_EMPTY = {
    "blocks.0.conv.weight": (3, 0, 2),
    "blocks.0.head.weight": (0, 5),
    "blocks.1.head.weight": (0, 5),
    "blocks.0.tall.weight": (5, 0),
    "blocks.0.gate.bias": (0,),
}


def _with_empties(empty: bool) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    full = [(n, torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))) for n, s in _FULL.items()]
    if not empty:
        return full
    empties = [(n, torch.nn.Parameter(torch.zeros(s, dtype=torch.float64))) for n, s in _EMPTY.items()]
    return [item for pair in zip(empties, full, strict=True) for item in pair]  # one before each


def _steps(params: list[tuple[str, torch.nn.Parameter]], opt: torch.optim.Optimizer, steps: range) -> None:
    for k in steps:
        for name, p in params:
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("recipe", soapdsl.library.shipped_names())
def test_empty_parameters_are_stepped_as_a_no_op_beside_the_others(recipe):
    """A zero-size dimension crashed the first step of the rotating recipes, shampoo and muon
    inside their matrix work (reshape, eigh). torch's optimizers step an empty parameter as a
    no-op: here it takes no part in the step and keeps no state, the other parameters move
    exactly as without it, and a checkpoint taken mid-run continues bit for bit."""
    args = {"freq": 2} if "freq" in soapdsl.library.shipped(recipe).defaults() else {}
    plain, mixed = _with_empties(False), _with_empties(True)
    opt_plain, opt_mixed = soapdsl.build(recipe, plain, **args), soapdsl.build(recipe, mixed, **args)
    _steps(plain, opt_plain, range(3))
    _steps(mixed, opt_mixed, range(3))
    sd = opt_mixed.state_dict()
    empties = {name: p for name, p in mixed if p.numel() == 0}
    assert not any(p in opt_mixed.state for p in empties.values())
    by_index = [p for g in opt_mixed.param_groups for p in g["params"]]  # the state dict's keys
    assert sorted(sd["state"]) == [i for i, p in enumerate(by_index) if p.numel()]
    resumed = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in mixed]
    opt_resumed = soapdsl.build(recipe, resumed, **args)
    opt_resumed.load_state_dict(copy.deepcopy(sd))
    _steps(plain, opt_plain, range(3, 6))
    _steps(mixed, opt_mixed, range(3, 6))
    _steps(resumed, opt_resumed, range(3, 6))
    moved = dict(plain)
    for name, p in mixed:
        if name in empties:
            assert p.shape == _EMPTY[name]
        else:
            assert torch.equal(p, moved[name]), name
            assert not torch.equal(p, dict(_with_empties(False))[name]), name
    for (name, p), (_, q) in zip(mixed, resumed, strict=True):
        assert torch.equal(p, q), name
    assert opt_resumed.state_dict()["state"].keys() == opt_mixed.state_dict()["state"].keys()


def test_the_plan_gives_an_empty_parameter_no_state_and_says_so():
    plan = soapdsl.compile("soap", [(n, torch.empty(s, device="meta")) for n, s in {**_FULL, **_EMPTY}.items()])
    entries = {e.name: e for e in plan.params}
    for name in _EMPTY:
        assert entries[name].state_bytes == 0 and entries[name].notes == ["empty: never stepped, no state"]
    assert all(entries[name].state_bytes > 0 for name in _FULL)
    (route,) = plan.to_dict()["routes"]
    assert route["buckets"] == {"[6, 4]": 2, "[4, 6]": 1, "[5, 5]": 1, "[4]": 1}
    # the state rows cover the shapes that keep any, the empty ones not
    assert re.search(r"0\.rotate\.GG0 +\[d0, d0\]; none for \[4\]\n", plan.to_text())
    rows = plan.to_text().split("state per parameter")[1].split("under FSDP2")[0]
    assert not any(str(list(shape)) in rows for shape in _EMPTY.values()), rows


def test_state_a_checkpoint_holds_for_an_empty_parameter_is_dropped():
    """adam stepped empty parameters before and saved their (empty) moments and step."""
    w, e = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.zeros(0, 2))
    opt = soapdsl.build("adam", [("w", w), ("e", e)])
    w.grad, e.grad = torch.ones(3, 2), torch.zeros(0, 2)
    opt.step()
    sd = opt.state_dict()
    sd["state"][1] = {"step": torch.tensor(1.0), "0.adam.m": torch.zeros(0, 2), "junk": 1}
    opt.load_state_dict(sd)
    assert e not in opt.state and float(opt.state[w]["step"]) == 1
    opt.step()
    assert list(opt.state_dict()["state"]) == [0]


@pytest.mark.parametrize("recipe", ["adamw", "soap", "muon"])
@pytest.mark.parametrize(
    ("built", "resized"), [((4, 3), (0,)), ((4, 3), (0, 3)), ((0,), (4, 3)), ((0, 3), (4, 3))], ids=str
)
@pytest.mark.parametrize("stepped_first", [False, True], ids=["before-its-first-step", "after-a-step"])
def test_a_parameter_resized_to_or_from_zero_elements_is_named_at_the_step(recipe, built, resized, stepped_first):
    """Emptied before its first step, a parameter was given state at its empty shape, which an
    empty parameter never keeps, or broke inside muon's Newton-Schulz (a reshape traceback);
    emptied after, it was refused for its state's shape. Filled, it was left out of every step
    without a word: its values never moved."""
    w, b = torch.nn.Parameter(torch.randn(built)), torch.nn.Parameter(torch.randn(3))
    opt = soapdsl.build(recipe, [("w", w), ("b", b)])

    def step():
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()

    if stepped_first:
        step()
    w.data = torch.randn(resized)
    why = "its route, shape checks and state were laid out for" if 0 in resized else "it would never be stepped"
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        step()
    assert info.value.message.startswith(
        f"parameter 'w' was resized from {list(built)} to {list(resized)} after the optimizer was built: "
    )
    assert why in info.value.message
    assert info.value.message.endswith("; build a new optimizer for the resized parameters")
    assert (w in opt.state) == (stepped_first and 0 not in built)  # no state laid out for the new shape


def test_a_matrix_resized_into_a_vector_before_its_first_step_is_named_at_the_stage():
    """muon's Newton-Schulz was handed the vector and raised an IndexError from inside
    shape_scale: the build's shape checks had passed the matrix it was then."""
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    opt = soapdsl.build("muon", [("w", w), ("b", b)])
    w.data = torch.randn(12)
    w.grad, b.grad = torch.randn(12), torch.randn(3)
    with pytest.raises(soapdsl.SoapShapeError) as info:
        opt.step()
    assert info.value.message == (
        "parameter 'w' was resized from [4, 3] to [12] after the optimizer was built and cannot go through this"
        " stage: 'newton_schulz' needs a matrix (ndim >= 2), got shape [12]; build a new optimizer for the"
        " resized parameters"
    )
    assert info.value.loc is not None and info.value.loc.file == "recipes/muon.soap"
    w.data = torch.randn(3, 4)  # a shape its stages take is stepped, from fresh state, as before
    w.grad = torch.randn(3, 4)
    opt.step()
    assert opt.state[w]["1.momentum.buf"].shape == (3, 4)


def test_an_empty_parameter_resized_to_another_empty_shape_steps_as_before():
    w, b = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.randn(3))
    opt = soapdsl.build("muon", [("w", w), ("b", b)])
    w.data = torch.zeros(5, 0)
    w.grad, b.grad = torch.zeros(5, 0), torch.randn(3)
    opt.step()
    assert w not in opt.state and float(opt.state[b]["step"]) == 1


# -- hand-edited state dicts ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["adamw", "soap", "muon"])
@pytest.mark.parametrize("how", ["checkpoint", "state"])
def test_an_entry_of_its_own_in_a_parameters_state_is_kept_and_changes_nothing(recipe, how):
    """torch's optimizers keep a key they do not know in a parameter's state, whatever its
    value. soapdsl grouped parameters by every value in their state that is no tensor, so a
    list or a dict (a tool's note in a checkpoint, or one written into opt.state) failed the
    next step inside it with 'unhashable type: list'; a number or a string split the batch."""
    runs = []
    for note in (False, True):
        net = _net()
        opt = soapdsl.build(recipe, net, **({"freq": 2} if recipe == "soap" else {}))
        grads = _grads(net, 5)
        _run(net, opt, grads[:2])
        weights = [p for p in net.parameters() if p.ndim == 2]
        if note and how == "checkpoint":
            sd = copy.deepcopy(opt.state_dict())
            for i, st in sd["state"].items():
                st["note"] = [i, "from a tool"] if i % 2 else {"i": i}
            opt = soapdsl.build(recipe, net, **({"freq": 2} if recipe == "soap" else {}))
            opt.load_state_dict(sd)
        elif note:
            for i, p in enumerate(weights):
                opt.state[p]["note"] = [i] if i % 2 else i
        _run(net, opt, grads[2:])
        if note:
            assert all("note" in opt.state[p] for p in weights)
        runs.append(net)
    _assert_same(*runs)


def _saved() -> tuple[torch.nn.Module, dict]:
    net = torch.nn.Linear(4, 3)
    opt = soapdsl.build("adamw", net)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    return net, opt.state_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda st: st.__setitem__("1.momentum.buf", "x"), r"state '1\.momentum\.buf' of parameter 'weight' is a str"),
        (lambda st: st.__setitem__("step", "x"), r"state 'step' of parameter 'weight' is a str, expected a step count"),
        (lambda st: st.__setitem__("step", torch.zeros(2)), r"state 'step' of parameter 'weight' is a tensor of shape"),
        (lambda st: st.__setitem__("step", -1.0), r"state 'step' of parameter 'weight' is -1\.0, expected a whole"),
    ],
)
def test_hand_edited_state_values_are_refused_by_name(edit, message):
    net, sd = _saved()
    edit(sd["state"][0])
    opt = soapdsl.build("adamw", net)
    with pytest.raises(SoapStateError, match=message):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_a_state_tensor_of_no_floating_dtype_is_refused_by_name(dtype):
    """Every state tensor soapdsl saves is floating point. A complex one was loaded with its
    imaginary part dropped (a torch warning from inside soapdsl), a bool or integer one as 0s
    and 1s or whole numbers, and training went on from them."""
    net, sd = _saved()
    sd["state"][0]["1.momentum.buf"] = sd["state"][0]["1.momentum.buf"].to(dtype)
    with pytest.raises(SoapStateError, match=rf"state '1\.momentum\.buf' of parameter 'weight' is a {dtype} tensor"):
        soapdsl.build("adamw", net).load_state_dict(sd)


def test_a_state_entry_that_is_no_dict_is_refused():
    net, sd = _saved()
    sd["state"][0] = "x"
    with pytest.raises(SoapStateError, match=r"the state of parameter 'weight' is a str, not a dict"):
        soapdsl.build("adamw", net).load_state_dict(sd)


@pytest.mark.parametrize("params", [5, None, "01", torch.tensor([0, 1])], ids=["int", "None", "str", "tensor"])
def test_a_group_whose_params_are_no_list_of_indices_is_refused(params):
    """A group's 'params' that is no list raised torch's TypeError (`object of type 'int' has no
    len()`) from inside load_state_dict, or was read character by character."""
    net, sd = _saved()
    sd["param_groups"][0]["params"] = params
    with pytest.raises(SoapStateError, match=r"param_groups\[0\]\['params'\] is a \w+, expected the list"):
        soapdsl.build("adamw", net).load_state_dict(sd)


_STEP_TYPES = {
    "int64": lambda t: t.long(),
    "float16": lambda t: t.half(),
    "float64": lambda t: t.double(),
    "shape [1]": lambda t: t.reshape(1),
    "int": lambda t: int(t),
}


@pytest.mark.parametrize("recipe", ["adamw", "muon", "soap"])
@pytest.mark.parametrize("how", ["loaded", "set"])
@pytest.mark.parametrize("kind", list(_STEP_TYPES))
def test_a_step_count_of_another_type_is_taken_as_a_float32_count(recipe, how, kind):
    """torch's optimizers count on whatever 'step' tensor a checkpoint or the user gives them. An
    int64 one (a conversion script's, or `opt.state[p]["step"] = torch.tensor(n)`) made the next
    step raise torch's "result type Float can't be cast to ... Long" from inside the step, and a
    float16 one stopped counting at 2048: each is now read as the 0-d float32 count it spells."""
    a, b = _net(), _net()
    grads = _grads(a, 5)
    opt, other = soapdsl.build(recipe, a), soapdsl.build(recipe, b)
    _run(a, opt, grads[:3])
    _run(b, other, grads[:3])
    convert = _STEP_TYPES[kind]
    if how == "loaded":
        sd = copy.deepcopy(other.state_dict())
        for st in sd["state"].values():
            st["step"] = convert(st["step"])
        other = soapdsl.build(recipe, b)
        other.load_state_dict(sd)
    else:
        for st in other.state.values():
            st["step"] = convert(st["step"].clone())
    _run(a, opt, grads[3:])
    _run(b, other, grads[3:])
    _assert_same(a, b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        step = other.state[q]["step"]
        assert step.dtype == torch.float32 and step.shape == () and torch.equal(step, opt.state[p]["step"])


def test_a_float16_step_count_goes_on_counting_past_2048():
    net = torch.nn.Linear(4, 3)
    opt = soapdsl.build("adamw", net)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for st in sd["state"].values():
        st["step"] = torch.tensor(2048.0, dtype=torch.float16)
    opt.load_state_dict(sd)
    opt.step()
    assert [float(st["step"]) for st in opt.state.values()] == [2049.0, 2049.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", r"is a str, expected a step count"),
        (torch.tensor(1.5, dtype=torch.float64), r"is 1\.5, expected a whole"),
        # a 0-d float32 CPU tensor, the counter's own type, is no count either when it holds none
        (torch.tensor(1.5), r"is 1\.5, expected a whole"),
        (torch.tensor(-2.0), r"is -2\.0, expected a whole"),
        (torch.tensor(float("nan")), r"is nan, expected a whole"),
    ],
)
def test_a_step_count_set_to_no_count_is_refused_by_name(value, message):
    net = torch.nn.Linear(4, 3)
    opt = soapdsl.build("adamw", net)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.state[net.weight]["step"] = value
    with pytest.raises(SoapStateError, match=rf"state 'step' of parameter 'weight' {message}"):
        opt.step()


# -- LR schedulers --------------------------------------------------------------------------------


def test_one_cycle_lr_needs_cycle_momentum_false_and_then_drives_every_route():
    """A recipe whose header names no `momentum` (adamw, soap: beta1) gives torch's momentum
    cycling nothing to cycle, and torch refuses it; with cycle_momentum=False OneCycleLR sets
    each route's lr exactly as setting it by hand does."""
    with pytest.raises(ValueError, match="cycle_momentum"):
        torch.optim.lr_scheduler.OneCycleLR(soapdsl.build("adamw", _net()), max_lr=0.05, total_steps=6)
    a, b = _net(), _net()
    grads = _grads(a, 6)
    scheduled, by_hand = soapdsl.build("muon", a), soapdsl.build("muon", b)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        scheduled, max_lr=[0.05, 0.02, 0.01], total_steps=6, cycle_momentum=False
    )
    lrs = []
    for gs in grads:
        lrs.append([g["lr"] for g in scheduled.param_groups])
        for group, lr in zip(by_hand.param_groups, lrs[-1], strict=True):
            group["lr"] = lr
        _run(a, scheduled, [gs])
        _run(b, by_hand, [gs])
        sched.step()
    assert len({tuple(x) for x in lrs}) == len(lrs)  # it did move every step
    assert len(scheduled.param_groups) == 3
    _assert_same(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 1e-3, 0.05, step_size_up=2),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_momentum_cycling_schedules_muons_momentum(make):
    """muon's header names its momentum `momentum`, as torch.optim.Muon's does, so OneCycleLR
    and CyclicLR cycle it by default (it is in opt.defaults): the Muon route follows the value
    they write at every step, as if set by hand. (The Adam routes read adam_beta1, not it.)"""
    a, b, c = _net(), _net(), _net()
    grads = _grads(a, 6)
    scheduled, by_hand, lr_only = soapdsl.build("muon", a), soapdsl.build("muon", b), soapdsl.build("muon", c)
    sched = make(scheduled)
    momenta = []
    for gs in grads:
        momenta.append(scheduled.param_groups[1]["momentum"])
        for ours, hand, plain in zip(scheduled.param_groups, by_hand.param_groups, lr_only.param_groups, strict=True):
            hand["lr"] = plain["lr"] = ours["lr"]
            hand["momentum"] = ours["momentum"]
        _run(a, scheduled, [gs])
        _run(b, by_hand, [gs])
        _run(c, lr_only, [gs])
        sched.step()
    assert len(set(momenta)) > 2 and all(0.8 <= m <= 0.95 for m in momenta)
    _assert_same(a, b)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)  # the cycled momentum was not ignored
    assert torch.equal(a.fc1.bias, c.fc1.bias)  # an Adam route: adam_beta1 is its momentum


@pytest.mark.parametrize("recipe", ["adamw", "soap", "muon"])
@pytest.mark.parametrize("rows", [7, 3])
def test_parameter_resized_in_place_is_named_not_stepped(recipe, rows):
    """An embedding grown (or cut) in place after its first step no longer fits its state. The
    fused Adam kernel would run past the state's memory (or, cut, step on the wrong entries):
    the step must stop with the parameter's name, and a reset of its state lets it go on."""
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3))
    opt = soapdsl.build(recipe, model)
    x = torch.tensor([0, 1, 2])
    model(x).sum().backward()
    opt.step()
    emb = model[0].weight
    emb.data = torch.randn(rows, 4)
    opt.zero_grad()
    model(x).sum().backward()
    with pytest.raises(
        soapdsl.SoapShapeError,
        match=rf"'0\.weight' has shape \[{rows}, 4\], but its state '[^']+' has shape \[5, [45]\], not \[{rows}, ",
    ):
        opt.step()
    del opt.state[emb]
    opt.step()
    assert float(opt.state[emb]["step"]) >= 0 and opt.state[emb]["step"].shape == ()


@pytest.mark.parametrize("edit", ["append_other_route", "append_twice", "append_new", "add_group", "clear_groups"])
def test_hand_edited_param_groups_are_refused_at_the_step(edit):
    """add_param_group is refused; the same done by editing param_groups went around every check
    the build makes (a bias appended to muon's Newton-Schulz route was stepped as a matrix, a
    tensor listed twice was stepped twice) or failed inside soapdsl (a zip over the routes)."""
    model = torch.nn.Linear(4, 3)
    opt = soapdsl.build("muon", model)
    groups = opt.param_groups
    matrix = next(g for g in groups if any(p is model.weight for p in g["params"]))
    if edit == "append_other_route":
        matrix["params"].append(model.bias)
    elif edit == "append_twice":
        matrix["params"].append(model.weight)
    elif edit == "append_new":
        matrix["params"].append(torch.nn.Parameter(torch.randn(3, 4)))
    elif edit == "add_group":
        groups.append({"params": [], "lr": 0.1})
    else:
        groups.clear()
    for p in [*model.parameters(), *(q for g in groups for q in g["params"])]:
        p.grad = torch.ones_like(p)
    with pytest.raises(SoapArgumentError, match="param_groups are its routes"):
        opt.step()


def test_a_parameter_taken_out_of_its_group_stops_moving():
    """Removing a parameter from its group's list (freezing it) stays allowed."""
    model = torch.nn.Linear(4, 3)
    opt = soapdsl.build("adamw", model)
    params = opt.param_groups[0]["params"]
    del params[next(i for i, p in enumerate(params) if p is model.bias)]
    before = model.bias.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert torch.equal(model.bias, before)


def test_a_dict_of_parameters_gets_a_hint():
    """Iterating a dict gives its keys: 'parameter 'param.0' is a str' said nothing useful."""
    w = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(SoapArgumentError, match=r"params is a dict: pass its \.items\(\)"):
        soapdsl.build("adamw", {"w": w})
    assert soapdsl.build("adamw", {"w": w}.items()).param_groups[0]["params"] == [w]


@pytest.mark.parametrize("kind", [set, frozenset])
@pytest.mark.parametrize("named", [False, True])
def test_a_set_of_parameters_is_refused_as_torch_refuses_it(kind, named):
    """A set's order follows the tensors' ids, which differ from run to run, and a state dict
    keys the state by position: loaded into another run's optimizer, the state of one
    parameter would silently go to another of the same shape. torch.optim refuses a set."""
    net = torch.nn.Linear(4, 4)
    params = kind(net.named_parameters()) if named else kind(net.parameters())
    with pytest.raises(SoapArgumentError, match=rf"params is a {kind.__name__}, whose order .* a list"):
        soapdsl.build("adamw", params)
    with pytest.raises(SoapArgumentError, match=rf"params is a {kind.__name__}"):
        soapdsl.compile("adamw", params)


@pytest.mark.parametrize("lr", [1e39, 10**400])
def test_an_lr_past_float32_is_refused_at_build_and_at_the_step(lr):
    """It multiplies float32 tensors: 1e39 failed inside torch ("cannot be converted to type
    float without overflow"), and an int past float's range raised OverflowError."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SoapArgumentError, match="the learning rate must be"):
        soapdsl.build("sign |> lr", model, lr=lr)
    opt = soapdsl.build("sign |> lr", model, lr=1e-3)
    model(torch.randn(1, 2)).sum().backward()
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(
        SoapArgumentError, match=r"param_group\['lr'\] of route 'default' is .*the learning rate must be"
    ):
        opt.step()


@pytest.mark.parametrize("alpha", [1e39, -1e39])
def test_a_float_argument_past_float32_is_refused_at_build_and_at_the_step(alpha):
    """Any float argument scales float32 tensors: ademamix(alpha=1e39) failed inside torch at
    the first step ("value cannot be converted to type float without overflow")."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SoapArgumentError, match=r"invalid alpha=.*must be at most 3\.403e\+38 in magnitude"):
        soapdsl.build("ademamix", model, alpha=alpha)
    opt = soapdsl.build("ademamix", model)
    model(torch.randn(1, 2)).sum().backward()
    opt.step()
    opt.param_groups[0]["alpha"] = alpha
    with pytest.raises(SoapArgumentError, match=r"alpha became invalid during training .*largest float32"):
        opt.step()
    opt.param_groups[0]["alpha"] = 3e38  # the largest float32 and below still work
    opt.step()


# -- step factors past a parameter's dtype ----------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "args", "dtype", "message", "col"),
    [
        (
            "scale(1e20) |> lr",
            {"lr": 1e20},
            torch.float32,
            r"^'lr' would step parameter 'weight' by -1e\+40 times its update, past the largest float32"
            r" \(3\.403e\+38\): param_group\['lr'\] of route 'default' is 1e\+20, times 1e\+20, the factor that"
            r" stages before 'lr' \(such as scale and bias_correct\) fold into the update on the host; lower the"
            r" learning rate or those factors$",
            16,
        ),
        (
            "sign |> lr",
            {"lr": 1e5},
            torch.float16,
            r"^'lr' would step parameter 'weight' by -1e\+05 times its update, past the largest float16 \(6\.55e\+04\):"
            r" param_group\['lr'\] of route 'default' is 100000\.0; lower the learning rate$",
            9,
        ),
        (
            "scale(1e30) |> scale(1e30) |> clip(1.0) |> lr",
            {"lr": 1.0},
            torch.float32,
            r"^the update of parameter 'weight' carries before 'clip' a factor of 1e\+60, past the largest float32"
            r" \(3\.403e\+38\): the product of the factors that stages such as scale and bias_correct fold into it",
            31,
        ),
        (
            "decay(1e5, lr_scaled=false) |> sign |> lr",
            {"lr": 1e-3},
            torch.float16,
            r"^'decay' would multiply parameter 'weight' by 1 - weight_decay = -1e\+05, past the largest float16"
            r" \(6\.55e\+04\): weight_decay is 1e\+05; lower the weight decay$",
            1,
        ),
    ],
)
def test_a_step_factor_past_the_parameters_dtype_is_refused_by_its_stage(recipe, args, dtype, message, col):
    """lr and every factor are each at most the largest float32, but their product need not be:
    torch refused the step size as an alpha ("value cannot be converted to type float without
    overflow"), and multiplied by a decay or a folded factor as by an infinity."""
    model = torch.nn.Linear(3, 2).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = soapdsl.build(recipe, model, **args)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(SoapArgumentError) as info:
        opt.step()
    assert re.match(message, info.value.message), info.value.message
    assert (info.value.loc.file, info.value.loc.line, info.value.loc.col) == ("<inline>", 1, col)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_adamw_whose_decay_factor_overflows_leaves_the_fused_kernel_for_the_stages_check():
    """torch's fused AdamW kernel multiplied the parameters by 1 - lr * wd = -1e40: -inf, silently."""
    model = torch.nn.Linear(3, 2)
    opt = soapdsl.build("adamw", model, lr=1e20, weight_decay=1e20)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(
        SoapArgumentError,
        match=r"'decay' would multiply parameter 'weight' by 1 - weight_decay \* lr = -1e\+40, past the largest"
        r" float32 \(3\.403e\+38\): weight_decay is 1e\+20 and param_group\['lr'\] of route 'default' is 1e\+20;"
        r" lower the weight decay or the learning rate",
    ) as info:
        opt.step()
    assert info.value.loc.file == "recipes/prelude.soap"
    assert torch.isfinite(model.weight).all()


def test_a_step_factor_set_by_a_scheduler_is_checked_and_one_a_float64_holds_is_applied():
    """The same recipe and lr: refused once lr makes the step size overflow float32, applied
    exactly in float64, which holds it."""
    text = "scale(1e20) |> lr"
    model = torch.nn.Linear(3, 2)
    opt = soapdsl.build(text, model, lr=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["lr"] = 1e20
    with pytest.raises(SoapArgumentError, match=r"param_group\['lr'\] of route 'default' is 1e\+20, times 1e\+20"):
        opt.step()
    wide = torch.nn.Linear(3, 2).double()
    start = [p.detach().clone() for p in wide.parameters()]
    opt = soapdsl.build(text, wide, lr=1e20)
    for p in wide.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    for p, p0 in zip(wide.parameters(), start, strict=True):
        assert torch.equal(p, p0 - 1e40 * 0.5)
