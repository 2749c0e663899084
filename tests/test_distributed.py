"""Data-parallel training with ``build(..., distributed=True)``: two gloo ranks on the CPU.

Each test spawns two processes (torch.multiprocessing) that train a DDP-wrapped model. The
matrix work (eigenbasis refreshes, inverse roots, Newton-Schulz) is split between them; what
they end with must equal, bit for bit, one process stepping the same model on the same batches
(every matrix is computed by the same kernels, and its bytes are shared exactly). Every rank
uses one thread, as does the single process: a thread count of its own could round the
matrix products differently.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import soapdsl
from soapdsl.errors import SoapArgumentError
from tests.conftest import train_step
from tests.multiproc import WORLD, one_thread
from tests.multiproc import spawn as _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

F32 = torch.float32
# case -> recipe, build arguments and the model's dtype: short refresh periods, so that 10 steps
# refresh a few times
RECIPES = {
    "soap": ("soap", {"freq": 3}, F32),
    "soap_muon": ("soap_muon", {"freq": 3}, F32),
    "muon": ("muon", {}, F32),
    "shampoo": ("shampoo", {"freq": 3}, F32),
    "psoap": ("psoap", {"freq": 3}, F32),
    # momentum without Nesterov hands Newton-Schulz its state buffer, which it must not overwrite
    "muon nesterov=false": ("muon", {"nesterov": False}, F32),
    # in float64 a matrix product's last bits depend on its operands' layout: a shared result must
    # have the layout of one computed here (a QR's Q is column-major)
    "soap_muon float64": ("soap_muon", {"freq": 3}, torch.float64),
    # bfloat16 parameters rounded stochastically: every rank draws the same bits, uncommunicated
    "soap bfloat16 stochastic_round": ("soap", {"freq": 3, "stochastic_round": True}, torch.bfloat16),
    # a call with one matrix in all runs on every rank, uncopied: its momentum buffer must survive
    "lone matrix": (
        'recipe lone(lr=0.02):\n  route "2.weight": momentum(0.95) |> newton_schulz(5) |> lr\n'
        "  route default: adamw(0.9, 0.95, 1e-8, 0)\n",
        {},
        F32,
    ),
}


def _net(seed: int = 0, width: int = 16, dtype: torch.dtype = F32) -> torch.nn.Module:
    """Several matrices of one shape (split within a batch) and some of their own (split
    across batches), with biases."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, width),
        torch.nn.Tanh(),
        *(m for _ in range(3) for m in (torch.nn.Linear(width, width), torch.nn.Tanh())),
        torch.nn.Linear(width, 24),
        torch.nn.Tanh(),
        torch.nn.Linear(24, 5),
    ).to(dtype)


def _batches(n: int, dtype: torch.dtype = F32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 12, generator=g).to(dtype), torch.randint(0, 5, (32,), generator=g)) for _ in range(n)]


def _train_split(rank: int, recipes: dict[str, tuple[str, dict, torch.dtype]], steps: int) -> dict:
    out = {}
    for case, (recipe, kw, dtype) in recipes.items():
        model = _net(dtype=dtype)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = soapdsl.build(recipe, ddp, distributed=True, **kw)
        for batch in _batches(steps, dtype):
            train_step(ddp, opt, batch)
        out[case] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "state": opt.state_dict()["state"],
            "computed": dict(opt._split.computed),  # type: ignore[union-attr]
        }
    return out


def test_split_matrix_work_equals_one_process_bit_for_bit(tmp_path):
    steps = 10
    ranks = _spawn(_train_split, tmp_path, RECIPES, steps)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    with one_thread():
        for case, (recipe, kw, dtype) in RECIPES.items():
            model = _net(dtype=dtype)
            opt = soapdsl.build(recipe, model, **kw)
            for batch in _batches(steps, dtype):
                train_step(model, opt, batch)
            for r in ranks:
                got = r[case]
                for p, q in zip(model.parameters(), got["params"], strict=True):
                    assert torch.equal(p.detach(), q), case
                for i, st in opt.state_dict()["state"].items():
                    for key, value in st.items():
                        assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["state"][i][key])), (case, key)
            # the work was split: each rank computed some of the matrices, and together all of them
            here = [r[case]["computed"]["here"] for r in ranks]
            total = ranks[0][case]["computed"]["all"]
            # a lone matrix (a call with one in all) is computed on every rank alike
            everywhere = [r[case]["computed"]["everywhere"] for r in ranks]
            assert everywhere[0] == everywhere[1], (case, everywhere)
            if case == "lone matrix":
                assert total == 0 and everywhere[0] > 0, (case, total, everywhere)
            else:
                assert min(here) > 0 and sum(here) == total > 0, (case, here, total)


def _with_empty(named: list) -> list:
    return [*named[:2], ("empty.weight", torch.nn.Parameter(torch.zeros(0, 16))), *named[2:]]


def _step_with_empty_parameters(rank: int | None, steps: int = 6) -> dict:
    """soap with a 0 x 16 weight among the split matrices; the same gradients on every rank."""
    named = _with_empty(list(_net().named_parameters()))
    opt = soapdsl.build("soap", named, distributed=rank is not None, freq=2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return {"params": [p.detach().clone() for _, p in named]}


def test_empty_parameters_with_split_work_equal_one_process(tmp_path):
    ranks = _spawn(_step_with_empty_parameters, tmp_path)
    assert all("error" not in r for r in ranks), [r.get("message") for r in ranks]
    with one_thread():
        alone = _step_with_empty_parameters(None)
    for r in ranks:
        for p, q in zip(alone["params"], r["params"], strict=True):
            assert torch.equal(p, q)
    assert alone["params"][2].shape == (0, 16)


def _mismatch(rank: int, what: str) -> dict:
    """Without DDP (which would itself hang on such ranks): the same data on every rank."""
    model = _net(width=16 if rank == 0 or what != "shapes" else 20)
    freq = 3 if what == "freq" and rank == 1 else 2  # rank 1 would refresh at other steps
    opt = soapdsl.build("soap_muon", model, distributed=True, freq=freq)
    x, y = _batches(1)[0]
    if what == "steps":  # each rank loads a checkpoint of another step: they would refresh at other steps
        alone = soapdsl.build("soap_muon", model, freq=2)
        for batch in _batches(1 + rank):
            train_step(model, alone, batch)
        opt.load_state_dict(alone.state_dict())
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if what == "grads" and rank == 1:
            model[2].weight.grad = None  # rank 1 would step one matrix fewer
        if what == "frozen":
            model[2].weight.grad = None  # on every rank: they still agree
        if what == "lr" and rank == 1:
            opt.param_groups[1]["lr"] = 0.5  # a scheduler stepped on rank 1 only, say
        if what == "same extras":  # the same values everywhere, and an object whose text differs
            opt.param_groups[1]["note"] = ("warm", 3)
            opt.param_groups[1]["hook"] = object()
        opt.step()
    return {}


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("shapes", r"differ in the parameters the optimizer was built for"),
        ("grads", r"differ in the parameters with a gradient at this step"),
        ("steps", r"or in their shapes or step counts"),
        ("freq", r"differ in the recipe, the values it fixed at build"),
        ("lr", r"route 'default' has lr="),
    ],
)
def test_ranks_that_would_split_different_work_get_one_clear_error(tmp_path, what, message):
    """Ranks that differ would pair up mismatched matrices and give wrong numbers; both stop."""
    ranks = _spawn(_mismatch, tmp_path, what)
    for r in ranks:
        assert r.get("error") == "SoapStateError", r
        assert message in r["message"]


def test_a_parameter_without_a_gradient_on_every_rank_is_no_mismatch(tmp_path):
    """The per-step check hashes ints only (in Python 3.11 the hash of None differs between
    processes)."""
    assert _spawn(_mismatch, tmp_path, "frozen") == [{}, {}]


def test_hyperparameters_that_differ_between_ranks_are_named_on_every_rank(tmp_path):
    """Under the split each rank updates its parameters with its own lr while the matrices are
    shared: ranks with different values would drift apart silently."""
    ranks = _spawn(_mismatch, tmp_path, "lr")
    here_there = [("0.004", "0.5"), ("0.5", "0.004")]
    for rank, (r, (here, there)) in enumerate(zip(ranks, here_there, strict=True)):
        assert f"has lr={here} on rank {rank} and lr={there} on rank {1 - rank}" in r["message"], r


def test_equal_extra_param_group_values_and_unprintable_ones_are_no_mismatch(tmp_path):
    assert _spawn(_mismatch, tmp_path, "same extras") == [{}, {}]


def _nan_grad(rank: int) -> dict:
    model = _net()
    opt = soapdsl.build("soap", model, distributed=True)
    x, y = _batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad.fill_(float("nan"))  # its eigh fails on whichever rank computes it
    opt.step()
    return {}


def test_a_failed_decomposition_is_raised_on_every_rank(tmp_path):
    """An eigh that fails on one rank must not leave the other waiting in the collective."""
    ranks = _spawn(_nan_grad, tmp_path)
    for r in ranks:
        assert r.get("error") == "SoapArgumentError", r
        assert "'2.weight'" in r["message"] and "eigenbasis" in r["message"], r["message"]


def _nan_grad_before_a_refresh(rank: int) -> dict:
    model = _net()
    opt = soapdsl.build("soap", model, distributed=True, freq=2)
    for step, (x, y) in enumerate(_batches(3)):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == 1:
            model[2].weight.grad[0, 0] = float("nan")  # reaches the factor; the QR refresh at t = 2 reads it
        opt.step()
        opt.zero_grad()
    return {}


def test_a_non_finite_factor_at_a_refresh_is_raised_on_every_rank(tmp_path):
    ranks = _spawn(_nan_grad_before_a_refresh, tmp_path)
    for r in ranks:
        assert r.get("error") == "SoapArgumentError", r
        assert "'2.weight'" in r["message"] and "non-finite" in r["message"], r["message"]


def _fails_on_rank_1(rank: int) -> dict:
    """Rank 1's Newton-Schulz raises (as running out of memory would) on its share of a step."""
    import soapdsl.ops.newton_schulz as ns

    if rank == 1:

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        ns.newton_schulz = broken  # type: ignore[assignment]
    model = _net()
    opt = soapdsl.build("muon", model, distributed=True)
    x, y = _batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return {}


def test_another_failure_on_one_rank_stops_every_rank(tmp_path):
    """The failing rank raises its own error; the other learns of it from the gather, instead
    of waiting in a collective the failing rank never joins."""
    failing, other = _spawn(_fails_on_rank_1, tmp_path)[::-1]
    assert failing.get("error") == "internal" and "out of memory (simulated)" in failing["message"], failing
    assert other.get("error") == "SoapError", other
    assert "rank 1 failed while computing its share of the matrix work" in other["message"]


def _dtensor(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(1)]))
    soapdsl.build("adamw", [("w", w)])
    return {}


def test_dtensors_sharded_otherwise_than_fsdp2_are_refused_by_name(tmp_path):
    """soapdsl steps FSDP2's layout (rows on a 1-D mesh, tests/test_fsdp.py); columns (tensor
    parallelism) would need other exchanges."""
    for r in _spawn(_dtensor, tmp_path):
        assert r.get("error") == "SoapArgumentError", r
        assert "parameter 'w' is a DTensor placed (Shard(dim=1),)" in r["message"]
        assert "tensor parallelism and HSDP are not supported" in r["message"]


def test_distributed_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(SoapArgumentError, match=r"needs torch\.distributed initialised first"):
        soapdsl.build("muon", _net(), distributed=True)
    with pytest.raises(SoapArgumentError, match=r"distributed must be True, False or a torch\.distributed process"):
        soapdsl.build("muon", _net(), distributed="yes")


def test_a_conv_kernel_through_rotate_and_newton_schulz_equals_one_process(tmp_path):
    """card rotates a conv kernel's first dim into its basis, which leaves the matrices handed
    to Newton-Schulz strided, not contiguous. One process iterated on them as they were; a split
    hands each rank contiguous copies, and a matrix product's last bits depend on its operands'
    layout: even one rank of one thread ended 5e-7 away from one process after two steps. Every
    per-matrix computation now takes contiguous matrices, here as on the ranks."""
    shapes = {"conv.weight": (3, 2, 3, 3), "a.weight": (6, 6), "b.weight": (6, 6), "a.bias": (6,)}
    runs = []
    with one_thread():
        for distributed in (False, True):
            if distributed:
                dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
            try:
                torch.manual_seed(0)
                params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in shapes.items()}
                opt = soapdsl.build("card", list(params.items()), distributed=distributed)
                g = torch.Generator().manual_seed(1)
                for _ in range(4):
                    for p in params.values():
                        p.grad = torch.randn(p.shape, generator=g)
                    opt.step()
            finally:
                if distributed:
                    dist.destroy_process_group()
            runs.append(params)
    for n, p in runs[0].items():
        assert torch.equal(p, runs[1][n]), n
