"""FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo ranks on the CPU.

Each rank holds half of every parameter's rows. Pointwise routes (Adam's) step each rank's rows
with state of their shape; every other route steps each parameter whole on its owner rank
(runtime/fsdp.py). Given the same gradients, the parameters and the state must equal, bit for
bit, one process stepping the whole model; the state of an owned parameter lives on its owner
only. Every rank and the single process use one thread.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.distributed as dist

import soapdsl
from tests.multiproc import WORLD, one_thread, skip_on_torch_gap, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

# case -> recipe and build arguments: short refresh periods, so that a few steps refresh
CASES = {
    "adamw": ("adamw", {}),
    "muon": ("muon", {}),
    "soap": ("soap", {"freq": 3}),
    "soap_muon": ("soap_muon", {"freq": 3}),
    # blocks 0-1 and 2-3 share an eigenbasis: each pair must go to one owner
    "soap_muon_shared": ("soap_muon_shared", {"freq": 3}),
    "shampoo": ("shampoo", {"freq": 3}),
    # a route reducing over all its parameters goes whole to one owner
    # bfloat16 and float16 parameters rounded stochastically: a rank's rows draw the whole
    # parameter's bits (every stage pointwise), and an owner draws them for the whole parameter
    "adamw bfloat16 stochastic_round": ("adamw", {"stochastic_round": True}),
    "adamw float16 stochastic_round": ("adamw", {"stochastic_round": True}),
    "soap_muon bfloat16 stochastic_round": ("soap_muon", {"freq": 3, "stochastic_round": True}),
    "clip over the route": (
        "recipe clipped(lr=0.01):\n  route matrix: clip(1.0, per=route) |> momentum(0.9) |> newton_schulz(5) |> lr\n"
        "  route default: adamw(0.9, 0.95, 1e-8, 0.1)\n",
        {},
    ),
}


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class _Net(torch.nn.Module):
    """Matrices of one shape (the blocks, which soap_muon_shared pairs up), others of their
    own, rows that two ranks split unevenly (5) and a matrix of one row (rank 1 holds none)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, width)
        self.blocks = torch.nn.ModuleList(_Block(width) for _ in range(4))
        self.out = torch.nn.Linear(width, 5)
        self.tiny = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = b(h)
        return self.out(h) + self.tiny(h)


def _dtype(case: str) -> torch.dtype:
    return torch.bfloat16 if "bfloat16" in case else torch.float16 if "float16" in case else torch.float32


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> _Net:
    torch.manual_seed(seed)
    return _Net().to(dtype)


def _sharded(seed: int = 0, world: int = WORLD, dtype: torch.dtype = torch.float32) -> _Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model(seed, dtype)
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _grads(step: int, model: torch.nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()]


def _set_grads(step: int, model: torch.nn.Module) -> None:
    """The same whole gradients on every rank, each rank given its rows."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    for p, g in zip(model.parameters(), _grads(step, model), strict=True):
        p.grad = distribute_tensor(g, p.device_mesh, [Shard(0)]) if isinstance(p, DTensor) else g


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    """Step ``opt`` at each step of ``steps`` on that step's gradients (_grads)."""
    for step in steps:
        _set_grads(step, model)
        opt.step()
        opt.zero_grad()


def _rows(p: torch.Tensor, rank: int) -> tuple[int, int]:
    """The first row and the number of rows that ``rank`` holds of the DTensor ``p``."""
    size = math.ceil(p.shape[0] / WORLD)
    first = min(rank * size, p.shape[0])
    return first, int(p.to_local().shape[0])


def _train_sharded(rank: int, cases: dict, steps: int) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for case, (recipe, kw) in cases.items():
        model = _sharded(dtype=_dtype(case))
        opt = soapdsl.build(recipe, model, **kw)
        _steps(model, opt, range(steps))
        sd = opt.state_dict()
        state = _by_name(model, opt, sd["state"])
        out[case] = {
            "params": [p.full_tensor() for p in model.parameters()],
            "rows": {n: _rows(p, rank) for n, p in model.named_parameters()},
            "state": {n: {k: _local(v) for k, v in st.items()} for n, st in state.items()},
            # which state tensors the state dict holds as DTensors, sharded as their parameter
            "sharded": {
                n: sorted(k for k, v in st.items() if isinstance(v, DTensor) and v.placements == p.placements)
                for n, st in state.items()
                for p in [dict(model.named_parameters())[n]]
            },
            "owners": dict(sd["soapdsl"]["shards"]["owners"]),
        }
    return out


def _local(v):
    """A state value as this rank holds it: a DTensor's local rows."""
    from torch.distributed.tensor import DTensor

    return v.to_local() if isinstance(v, DTensor) else v


def _by_name(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> dict:
    """A state dict's state keyed by parameter name (it is keyed by position in the param_groups)."""
    name = {id(p): n for n, p in model.named_parameters()}
    order = [name[id(p)] for g in opt.param_groups for p in g["params"]]
    return {order[i]: st for i, st in state.items()}


def _train_whole(recipe: str, kw: dict, steps: int, dtype: torch.dtype = torch.float32) -> tuple[_Net, dict]:
    model = _model(dtype=dtype)
    opt = soapdsl.build(recipe, model, **kw)
    for step in range(steps):
        for p, g in zip(model.parameters(), _grads(step, model), strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return model, _by_name(model, opt, opt.state_dict()["state"])


def test_sharded_parameters_step_as_one_process_bit_for_bit(tmp_path):
    steps = 7
    ranks = spawn(_train_sharded, tmp_path, CASES, steps)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    with one_thread():
        for case, (recipe, kw) in CASES.items():
            model, state = _train_whole(recipe, kw, steps, _dtype(case))
            names = [n for n, _ in model.named_parameters()]
            for r in ranks:
                for n, p, q in zip(names, model.parameters(), r[case]["params"], strict=True):
                    assert torch.equal(p.detach(), q), (case, n)
            owners = ranks[0][case]["owners"]
            assert owners == ranks[1][case]["owners"]
            for name in names:
                if name in owners:  # stepped whole on its owner, which alone holds its state
                    owner = owners[name]
                    # an entry naming the owner (torch.distributed.checkpoint wants one for every parameter)
                    assert ranks[1 - owner][case]["state"][name] == {"soapdsl.fsdp2_owner": owner}, (case, name)
                    assert ranks[owner][case]["sharded"][name] == [], (case, name)
                    got = ranks[owner][case]["state"][name]
                    assert got.keys() == state[name].keys(), (case, name)
                    for key, value in state[name].items():
                        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), (case, name, key)
                else:  # stepped on each rank's rows, whose state has their shape
                    for r in ranks:
                        first, rows = r[case]["rows"][name]
                        got = r[case]["state"][name]
                        # a checkpointer (torch.distributed.checkpoint) sees rows of a sharded tensor
                        assert r[case]["sharded"][name] == sorted(k for k in got if k != "step"), (case, name)
                        for key, value in state[name].items():
                            if key == "step":
                                assert float(got[key]) == float(value) == steps
                            else:
                                assert torch.equal(got[key], value[first : first + rows]), (case, name, key)
            if recipe == "adamw":
                assert owners == {}
            elif case == "clip over the route":  # the route's matrices together, on one rank
                assert {r for n, r in owners.items() if n.endswith("weight")} == {0}, owners
            else:  # the matrices are spread over both ranks
                assert set(owners.values()) == {0, 1}, (case, owners)
            if case == "soap_muon_shared":
                for a, b in ((0, 1), (2, 3)):
                    assert owners[f"blocks.{a}.fc.weight"] == owners[f"blocks.{b}.fc.weight"], owners


def _real_backward(rank: int, steps: int) -> dict:
    """FSDP's own forward and backward (its lazy initialisation moves each rank's rows into
    new storage at the first forward, which the optimizer must follow). Each step's whole
    gradients are recorded for the single process to replay."""
    model = _sharded()
    opt = soapdsl.build("soap_muon", model, freq=2)
    g = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        x, y = torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank])
        loss.backward()
        grads.append([p.grad.full_tensor() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    return {"params": [p.full_tensor() for p in model.parameters()], "grads": grads}


def test_training_through_fsdp_steps_as_one_process(tmp_path):
    """With FSDP's own gradients (reduce-scattered from the ranks' halves of each batch): one
    process given the same gradients ends with the same parameters, bit for bit."""
    ranks = spawn(_real_backward, tmp_path, 4)
    skip_on_torch_gap(ranks)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    with one_thread():
        model = _model()
        opt = soapdsl.build("soap_muon", model, freq=2)
        for grads in ranks[0]["grads"]:
            for p, grad in zip(model.parameters(), grads, strict=True):
                p.grad = grad
            opt.step()
            opt.zero_grad()
    start = _model()
    for r in ranks:
        for p, q, p0 in zip(model.parameters(), r["params"], start.parameters(), strict=True):
            assert not torch.equal(q, p0)  # it trained
            assert torch.equal(q, p.detach())


def _checkpoint(rank: int, tmp: str) -> dict:
    import os

    path = os.path.join(tmp, f"opt{rank}.pt")
    model = _sharded()
    opt = soapdsl.build("soap_muon", model, freq=3)
    _steps(model, opt, range(4))
    torch.save(opt.state_dict(), path)
    rows = [p.to_local().clone() for p in model.parameters()]
    dist.barrier()
    _steps(model, opt, range(4, 8))
    out: dict = {"straight": [p.full_tensor() for p in model.parameters()]}
    # each rank loads its own share into a new optimizer, for the model as it was, and goes on
    model2 = _sharded()
    with torch.no_grad():
        for p, q in zip(model2.parameters(), rows, strict=True):
            p.to_local().copy_(q)
    opt2 = soapdsl.build("soap_muon", model2, freq=3)
    opt2.load_state_dict(torch.load(path, weights_only=True))
    _steps(model2, opt2, range(4, 8))
    out["resumed"] = [p.full_tensor() for p in model2.parameters()]
    # another rank's share is refused
    try:
        opt2.load_state_dict(torch.load(os.path.join(tmp, f"opt{1 - rank}.pt"), weights_only=True))
        out["other"] = "loaded"
    except soapdsl.SoapError as e:
        out["other"] = f"{type(e).__name__}: {e}"
    return out


def test_each_rank_saves_and_loads_its_own_share(tmp_path):
    ranks = spawn(_checkpoint, tmp_path, str(tmp_path))
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    for r in ranks:
        for a, b in zip(r["straight"], r["resumed"], strict=True):
            assert torch.equal(a, b)
        assert r["other"].startswith("SoapStateError: error: this state dict was saved by rank"), r["other"]


WHOLE = {"soap_muon": {"freq": 3}, "adamw": {}}


def _whole(rank: int) -> dict:
    """Whole checkpoints both ways: one process's, loaded by the sharded ranks; and the
    sharded ranks' ``full_state_dict()``, against one process's."""
    out = {}
    for recipe, kw in WHOLE.items():
        model = _model()
        opt = soapdsl.build(recipe, model, **kw)
        for step in range(8):
            if step == 4:
                at4 = [p.detach().clone() for p in model.parameters()]
                sd4 = copy.deepcopy(opt.state_dict())  # its tensors are the live state
            for p, g in zip(model.parameters(), _grads(step, model), strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad()
        # one process's checkpoint after 4 steps, into the sharded ranks, then 4 more steps
        sharded = _sharded()
        with torch.no_grad():
            for p, q in zip(sharded.parameters(), at4, strict=True):
                p.to_local().copy_(q[slice(*_span(p, rank))])
        resumed = soapdsl.build(recipe, sharded, **kw)
        resumed.load_state_dict(sd4)
        _steps(sharded, resumed, range(4, 8))
        # the sharded ranks' whole checkpoint after 4 steps
        fresh = _sharded()
        opt4 = soapdsl.build(recipe, fresh, **kw)
        _steps(fresh, opt4, range(4))
        full = opt4.full_state_dict()
        out[recipe] = {
            "resumed": all(
                torch.equal(p.full_tensor(), q.detach())
                for p, q in zip(sharded.parameters(), model.parameters(), strict=True)
            ),
            "full": full,
            "one": sd4,
        }
    return out


def _span(p: torch.Tensor, rank: int) -> tuple[int, int]:
    first, rows = _rows(p, rank)
    return first, first + rows


def test_whole_checkpoints_load_into_sharded_ranks_and_come_out_of_them(tmp_path):
    """A checkpoint saved by one process loads into the sharded ranks (each takes its part),
    and ``full_state_dict()`` gathers the ranks' shares into what one process saves."""
    ranks = spawn(_whole, tmp_path)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    for r in ranks:
        for recipe in WHOLE:
            got = r[recipe]
            assert got["resumed"], recipe
            full, one = got["full"], got["one"]
            assert full["param_groups"] == one["param_groups"] and full["soapdsl"] == one["soapdsl"]
            assert full["state"].keys() == one["state"].keys(), recipe
            for k, st in one["state"].items():
                assert full["state"][k].keys() == st.keys()
                for key, value in st.items():
                    assert torch.equal(torch.as_tensor(full["state"][k][key]), torch.as_tensor(value)), (k, key)


def _lr_schedule(rank: int, steps: int) -> dict:
    model = _sharded()
    opt = soapdsl.build("muon", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(steps):
        _set_grads(step, model)
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"params": [p.full_tensor() for p in model.parameters()]}


def _state_view(rank: int) -> dict:
    """``opt.state`` kept across steps shows this rank's share after each one, and a state it
    is given (a reset) reaches the steps."""
    model = _sharded()
    opt = soapdsl.build("muon", model)
    view = opt.state
    out = {"sizes": []}
    for step in range(3):
        _set_grads(step, model)
        opt.step()
        out["sizes"].append(sorted(float(st["step"]) for st in view.values()))
    view.clear()  # every parameter starts afresh at the next step
    _set_grads(3, model)
    opt.step()
    out["after reset"] = sorted({float(st["step"]) for st in opt.state.values()})
    out["same mapping"] = opt.state is view
    return out


def test_opt_state_kept_across_steps_shows_the_share(tmp_path):
    for r in spawn(_state_view, tmp_path):
        assert "error" not in r, r.get("message")
        assert [set(s) for s in r["sizes"]] == [{1.0}, {2.0}, {3.0}] and all(r["sizes"]), r
        assert r["after reset"] == [1.0] and r["same mapping"], r


def test_a_scheduler_changes_the_sharded_steps(tmp_path):
    """The routes read the outer optimizer's param_groups, which schedulers change."""
    steps = 4
    ranks = spawn(_lr_schedule, tmp_path, steps)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    with one_thread():
        model = _model()
        opt = soapdsl.build("muon", model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for step in range(steps):
            for p, g in zip(model.parameters(), _grads(step, model), strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad()
            sched.step()
    for r in ranks:
        for p, q in zip(model.parameters(), r["params"], strict=True):
            assert torch.equal(p.detach(), q)


def _with_group(rank: int) -> dict:
    model = _sharded()
    soapdsl.build("muon", model, distributed=dist.group.WORLD)
    return {}


def test_a_process_group_is_refused_for_fsdp_parameters(tmp_path):
    """FSDP2's parameters carry their mesh's process group; another would pair up other ranks."""
    for r in spawn(_with_group, tmp_path):
        assert r.get("error") == "SoapArgumentError", r
        assert "carry their process group" in r["message"]


def _nan_on_the_owner(rank: int) -> dict:
    """A gradient whose eigenbasis cannot be computed, on whichever rank owns the matrix."""
    model = _sharded()
    opt = soapdsl.build("soap", model)
    _set_grads(0, model)
    model.blocks[1].fc.weight.grad.to_local().fill_(float("nan"))
    before = [p.full_tensor() for p in model.parameters()]
    try:
        opt.step()
    except soapdsl.SoapError as e:
        owner = dict(opt.state_dict()["soapdsl"]["shards"]["owners"])["blocks.1.fc.weight"]
        after = [p.full_tensor() for p in model.parameters()]
        unchanged = [
            n for (n, _), a, b in zip(model.named_parameters(), before, after, strict=True) if torch.equal(a, b)
        ]
        return {"error": type(e).__name__, "message": str(e), "owner": owner, "unchanged": unchanged}
    return {}


def test_a_failure_on_the_owner_stops_every_rank(tmp_path):
    """The owner raises the located error; the other rank learns of it in the exchange that
    would have brought it the new values, instead of waiting for it, and writes none."""
    ranks = spawn(_nan_on_the_owner, tmp_path)
    owner = ranks[0]["owner"]
    assert ranks[0]["owner"] == ranks[1]["owner"]
    mine, other = ranks[owner], ranks[1 - owner]
    assert mine["error"] == "SoapArgumentError" and "'blocks.1.fc.weight'" in mine["message"], mine
    assert other["error"] == "SoapError", other
    assert f"rank {owner} failed in its share of the step" in other["message"]
    # no matrix stepped by an owner took a value from the failed step
    assert "blocks.1.fc.weight" in other["unchanged"] and "inp.weight" in other["unchanged"], other


def _nan_before_a_refresh(rank: int) -> dict:
    """A non-finite gradient after the first basis: the owner's QR refresh at t = 2 finds it."""
    model = _sharded()
    opt = soapdsl.build("soap", model, freq=2)
    try:
        for step in range(3):
            _set_grads(step, model)
            if step == 1:
                model.blocks[1].fc.weight.grad.to_local().fill_(float("inf"))
            opt.step()
    except soapdsl.SoapError as e:
        return {"error": type(e).__name__, "message": str(e), "step": step}
    return {}


def test_a_non_finite_factor_at_a_refresh_stops_every_rank(tmp_path):
    ranks = spawn(_nan_before_a_refresh, tmp_path)
    assert {r.get("step") for r in ranks} == {2}, ranks
    errors = sorted(r.get("error") for r in ranks)
    assert errors == ["SoapArgumentError", "SoapError"], ranks
    mine = next(r for r in ranks if r["error"] == "SoapArgumentError")
    assert "'blocks.1.fc.weight'" in mine["message"] and "non-finite" in mine["message"], mine


def _copied(rank: int) -> dict:
    model = _sharded()
    opt = soapdsl.build("adamw", model)
    copy.deepcopy(opt)
    return {}


def test_a_sharded_optimizer_is_not_copied(tmp_path):
    for r in spawn(_copied, tmp_path):
        assert r.get("error") == "SoapStateError", r
        assert "cannot be copied or unpickled" in r["message"]


def _partly_sharded() -> _Net:
    """Only the blocks sharded: the other parameters stay plain tensors, whole on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    return model


def _misuses(rank: int) -> dict:
    """Each misuse on every rank, with the error (or the lack of one) it met."""
    out = {}

    def attempt(case: str, fn) -> None:
        try:
            fn()
            out[case] = "no error"
        except soapdsl.SoapError as e:
            out[case] = f"{type(e).__name__}: {e}"

    # a route clipped by its global norm, over sharded blocks and plain matrices: the owner
    # would step them all, every other rank its plain ones alone (with another norm)
    clipped = CASES["clip over the route"][0]
    attempt("sharded and plain stepped together", lambda: soapdsl.build(clipped, _partly_sharded()))
    # the outer param_groups changed after building: the inner optimizer must not miss it
    for case in ("a key deleted", "a parameter added"):
        model = _sharded()
        opt = soapdsl.build("adamw", model)
        _set_grads(0, model)
        opt.step()
        if case == "a key deleted":
            del opt.param_groups[0]["weight_decay"]
        else:
            extra = torch.nn.Parameter(torch.zeros(3, 3))
            extra.grad = torch.ones(3, 3)
            opt.param_groups[0]["params"].append(extra)
        attempt(case, opt.step)
    return out


def test_misuses_are_refused_on_every_rank(tmp_path):
    ranks = spawn(_misuses, tmp_path)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    for r in ranks:
        got = r["sharded and plain stepped together"]
        assert got.startswith("SoapArgumentError: error: parameters 'blocks.0.fc.weight' (FSDP2-sharded) and"), got
        assert "(not sharded) of route 'matrix' must be stepped together" in got, got
        got = r["a key deleted"]
        assert got == "SoapArgumentError: error: param_group of route 'default' lost its key 'weight_decay'", got
        got = r["a parameter added"]
        assert got.startswith("SoapArgumentError: error: param_group['params'] of route 'default' no longer"), got


def _faulty_whole(rank: int) -> dict:
    """Whole state dicts with a fault, each loaded by both ranks: the fault in the state of a
    parameter that one rank owns, or an entry for a parameter the optimizer lacks; and a rank's
    share where a whole state dict is needed."""
    model = _model()
    one = soapdsl.build("muon", model)
    for p, g in zip(model.parameters(), _grads(0, model), strict=True):
        p.grad = g
    one.step()
    good = one.state_dict()
    sharded = _sharded()
    opt = soapdsl.build("muon", sharded)
    names = [n for g in opt.param_groups for p in g["params"] for n, q in sharded.named_parameters() if q is p]
    owners = dict(opt.state_dict()["soapdsl"]["shards"]["owners"])
    out: dict = {}
    for case in ("owned by rank 0", "owned by rank 1", "an extra index"):
        sd = copy.deepcopy(good)
        if case == "an extra index":
            sd["state"][len(names)] = sd["state"][0]
        else:
            k = names.index(next(n for n, r in owners.items() if r == int(case[-1])))
            buf = next(key for key in sd["state"][k] if "momentum" in key)
            sd["state"][k][buf] = torch.zeros(3, 3)
        try:
            opt.load_state_dict(sd)
            out[case] = "loaded"
        except soapdsl.SoapError as e:
            out[case] = f"{type(e).__name__}: {e}"
    opt.load_state_dict(good)  # the ranks are still in step
    _set_grads(1, sharded)
    opt.step()
    # this rank's share, into an optimizer of parameters that are not sharded (shampoo's
    # parameters all go whole to one rank or the other: loaded as a whole state dict, those of
    # the other rank would start afresh)
    sharded = _sharded()
    opt = soapdsl.build("shampoo", sharded)
    _set_grads(0, sharded)
    opt.step()
    try:
        soapdsl.build("shampoo", _model()).load_state_dict(opt.state_dict())
        out["a rank's share, unsharded"] = "loaded"
    except soapdsl.SoapError as e:
        out["a rank's share, unsharded"] = f"{type(e).__name__}: {e}".replace(f"rank {rank} of", "rank r of")
    return out


def test_a_faulty_whole_state_dict_is_refused_on_every_rank(tmp_path):
    """Every rank checks all of a whole state dict: a fault that only a parameter's owner would
    find would leave the other rank waiting for it at the next step."""
    ranks = spawn(_faulty_whole, tmp_path)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    assert ranks[0] == ranks[1], ranks
    for case, got in ranks[0].items():
        assert got.startswith("SoapStateError: error: "), (case, got)
    assert "has shape [3, 3], expected" in ranks[0]["owned by rank 1"]
    assert "parameter index 14, which this optimizer lacks" in ranks[0]["an extra index"]
    assert "the share of the state of rank r of 2 under FSDP2" in ranks[0]["a rank's share, unsharded"]


# -- torch.distributed.checkpoint ----------------------------------------------------------------


def _dcp_round_trip(rank: int, ckpt: str, recipe: str, kw: dict) -> dict:
    """Train, save model and optimizer with torch.distributed.checkpoint, load both into a new
    model and optimizer (built from other weights), and train both on: they must stay equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _sharded()
    opt = soapdsl.build(recipe, model, **kw)
    _steps(model, opt, range(3))
    share = get_optimizer_state_dict(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": share}, checkpoint_id=ckpt)
    saved = opt.full_state_dict()
    try:  # a share handed as it is to an optimizer of whole parameters: its rows are not the whole
        whole = _model()
        set_optimizer_state_dict(whole, soapdsl.build(recipe, whole, **kw), share)
        refused = ""
    except soapdsl.SoapStateError as e:
        refused = str(e)
    model2 = _sharded(seed=1)
    opt2 = soapdsl.build(recipe, model2, **kw)
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    loaded = opt2.full_state_dict()
    for step in range(3, 6):
        for m, o in ((model, opt), (model2, opt2)):
            _set_grads(step, m)
            o.step()
            o.zero_grad()
    return {
        "saved": saved,
        "loaded": loaded,
        "refused": refused,
        "equal": [
            torch.equal(p.full_tensor(), q.full_tensor())
            for p, q in zip(model.parameters(), model2.parameters(), strict=True)
        ],
    }


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.load(no_dist=True)
@pytest.mark.filterwarnings("ignore:torch.distributed is unavailable or uninitialized:UserWarning")  # torch 2.6
@pytest.mark.parametrize(("recipe", "kw"), [CASES[c] for c in ("soap_muon", "adamw", "soap_muon_shared", "shampoo")])
def test_distributed_checkpoint_saves_and_loads_shares_and_loads_whole_in_one_process(tmp_path, recipe, kw):
    """torch.distributed.checkpoint (get_/set_optimizer_state_dict with dcp.save/load), as FSDP2
    training scripts checkpoint: each rank's rows of a pointwise route's state are saved as
    the shards of a DTensor, each owner's whole state by its owner. Loaded into a new sharded
    optimizer, training goes on bit for bit; loaded into one process's optimizer of the whole
    model (dcp.load(no_dist=True)), the state equals what the ranks' full_state_dict() gave."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ckpt = str(tmp_path / "ckpt")
    ranks = spawn(_dcp_round_trip, tmp_path, ckpt, recipe, kw)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    for r in ranks:
        assert all(r["equal"]), r["equal"]
        _assert_same_state(r["loaded"], r["saved"])
        # refused at the first parameter whose rows (DTensors) or owner (another rank) show it
        refused = r["refused"]
        assert "(an FSDP2 rank's share)" in refused or "under FSDP2: this state dict is one rank's share" in refused
    model = _model(seed=1)
    opt = soapdsl.build(recipe, model, **kw)
    sd = {"optim": get_optimizer_state_dict(model, opt)}
    # torch 2.6's dcp.load has no no_dist: a process with no process group loads alone anyway
    alone = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
    dcp.load(sd, checkpoint_id=ckpt, **alone)
    set_optimizer_state_dict(model, opt, sd["optim"])
    _assert_same_state(opt.state_dict(), ranks[0]["saved"])


def _dcp_load_on_one_rank(rank: int, ckpt: str, recipe: str, kw: dict) -> dict:
    """A new job of one rank loads a two-rank checkpoint: every parameter's owner and all of
    every row are now here."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = _sharded(seed=1, world=1)
    opt = soapdsl.build(recipe, model, **kw)
    sd = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_optimizer_state_dict(model, opt, sd["optim"])
    return {"loaded": opt.full_state_dict()}


def test_a_distributed_checkpoint_of_two_ranks_loads_into_one_sharded_rank(tmp_path):
    """Resharding through torch.distributed.checkpoint: saved by two FSDP2 ranks, loaded by one
    (its rows are the whole parameters and it owns every matrix), the state is the same."""
    recipe, kw = "soap_muon", {"freq": 2}
    ckpt = str(tmp_path / "ckpt")
    ranks = spawn(_dcp_round_trip, tmp_path, ckpt, recipe, kw)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    (one,) = spawn(_dcp_load_on_one_rank, tmp_path, ckpt, recipe, kw, world=1)
    assert "error" not in one, one.get("message")
    _assert_same_state(one["loaded"], ranks[0]["saved"])


def _assert_same_state(got: dict, want: dict) -> None:
    assert got["state"].keys() == want["state"].keys()
    for k, st in want["state"].items():
        assert got["state"][k].keys() == st.keys(), k
        for key, v in st.items():
            a = got["state"][k][key]
            if torch.is_tensor(v):
                assert torch.equal(torch.as_tensor(a).cpu(), v), (k, key)
            else:
                assert a == v, (k, key)


def _lr_on_one_rank(rank: int) -> dict:
    model = _sharded()
    opt = soapdsl.build("muon", model)
    if rank == 1:
        opt.param_groups[0]["lr"] = 0.5
    _set_grads(0, model)
    opt.step()
    return {}


def test_hyperparameters_that_differ_between_ranks_stop_every_rank(tmp_path):
    """An owner steps a whole matrix with its own lr, every rank its own rows with its own:
    ranks with different values would hold a model of mixed updates."""
    for rank, r in enumerate(spawn(_lr_on_one_rank, tmp_path)):
        assert r.get("error") == "SoapStateError", r
        assert r["message"].startswith("error: FSDP2: route ") and f"on rank {rank} and lr=" in r["message"], r


class _WithEmpties(_Net):
    """_Net and empty parameters: rows of nothing (a 0 x 16 weight, an empty bias) and a 5 x 0
    weight whose rows the ranks split; they take no part in the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.none = torch.nn.Linear(16, 0)
        self.thin = torch.nn.Linear(0, 5, bias=False)


def _empties(seed: int = 0, world: int = WORLD) -> _WithEmpties:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = _WithEmpties()
    if world:
        mesh = init_device_mesh("cpu", (world,))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


EMPTY_CASES = {"adamw": {}, "soap": {"freq": 2}, "muon": {}}


def _train_with_empties(rank: int, steps: int) -> dict:
    out = {}
    for recipe, kw in EMPTY_CASES.items():
        model = _empties()
        opt = soapdsl.build(recipe, model, **kw)
        _steps(model, opt, range(steps))
        whole = opt.full_state_dict()
        out[recipe] = {"params": [p.full_tensor() for p in model.parameters()], "keys": sorted(whole["state"])}
    return out


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_empty_parameters_are_left_out_on_every_rank(tmp_path):
    """An empty parameter is stepped by no rank and keeps no state, as in one process; a rank
    that holds no rows of a parameter that is not empty still steps it (runtime/fsdp.py)."""
    steps = 3
    ranks = spawn(_train_with_empties, tmp_path, steps)
    skip_on_torch_gap(ranks)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    with one_thread():
        for recipe, kw in EMPTY_CASES.items():
            model = _empties(world=0)
            opt = soapdsl.build(recipe, model, **kw)
            for step in range(steps):
                for p, g in zip(model.parameters(), _grads(step, model), strict=True):
                    p.grad = g
                opt.step()
            keys = sorted(opt.state_dict()["state"])
            assert len(keys) == sum(1 for p in model.parameters() if p.numel())
            for r in ranks:
                assert r[recipe]["keys"] == keys, recipe
                for p, q in zip(model.parameters(), r[recipe]["params"], strict=True):
                    assert torch.equal(p.detach(), q), recipe
