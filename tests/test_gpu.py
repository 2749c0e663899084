"""The shipped recipes on a CUDA device (``pytest -m gpu``; skipped without one).

* fidelity: the same independent references as on the CPU (torch.optim.AdamW and Adam, the loop
  references of tests/references.py, torch.optim.Muon), run on the GPU, at the CPU's tolerances;
* the fused Adam path: bit-identical to ``torch.optim.AdamW(fused=True)`` on the same device, its
  device-side step counts kept in step with the host's through fallbacks and a state-dict load;
* no host-device synchronisation inside ``step()`` (``torch.cuda.set_sync_debug_mode``), outside
  the steps that decompose a matrix with ``eigh`` (which checks for convergence on the host);
* state dicts move between devices, and so does the state of a model moved after its first steps.
"""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl
from tests import references as R
from tests import references_variants as RV
from tests.conftest import (
    batches,
    eager_and_compiled,
    lockstep,
    make_net,
    muon_vs_torch,
    needs_torch_muon,
    race,
    train_step,
    twin_params,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = "cuda"
MATS = {"square": (6, 6), "tall": (10, 4), "wide": (4, 10)}
ALL = {**MATS, "vector": (7,), "over_max_dim": (12, 5), "conv": (3, 2, 3, 3)}


def _cuda_batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.to(CUDA), y.to(CUDA)) for x, y in batches(n, dtype=dtype)]


# -- fidelity against the independent references, on the GPU ------------------------------------


@pytest.mark.parametrize(
    ("recipe", "torch_cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)], ids=["adamw", "adam"]
)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_adam_matches_torch_on_cuda(recipe: str, torch_cls: type, foreach: bool) -> None:
    """The stage-by-stage path (``[fused=false]``) against torch's non-fused implementations."""
    kw = dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)
    ours_model, ref_model = make_net().to(CUDA), make_net().to(CUDA)
    pipeline = (
        "decay(0.05) |> adam(0.85, 0.98, 1e-7) |> lr"
        if recipe == "adamw"
        else "l2(0.05) |> adam(0.85, 0.98, 1e-7) |> lr"
    )
    text = f"recipe r(lr=3e-3):\n  route default [fused=false]: {pipeline}\n"
    ours = soapdsl.build(text, ours_model)
    assert all(rp.fused is None for rp in ours._routes)
    ref = torch_cls(ref_model.parameters(), foreach=foreach, **kw)
    for batch in _cuda_batches(60):
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_soap_equals_the_loop_reference_on_cuda() -> None:
    err = race(
        "soap", {"freq": 5, "max_dim": 8}, R.SoapV2Ref, {"precondition_frequency": 5, "max_precond_dim": 8}, ALL,
        device=CUDA,
    )  # fmt: skip
    assert err < 1e-9


def test_soap_muon_equals_the_loop_reference_on_cuda() -> None:
    err = race("soap_muon", {"freq": 5}, R.SoapMuonRef, {"precondition_frequency": 5}, MATS, device=CUDA)
    assert err < 1e-9


def test_shampoo_equals_the_loop_reference_on_cuda() -> None:
    """At the defaults, as the CPU test: the first inverse roots come at step 10, when every
    factor here has full rank (earlier, a vector's rank-deficient factor meets eps=1e-12 and
    rounding in its null space is amplified by eps^(-1/4) on any device)."""
    err = race("shampoo", {}, R.ShampooRef, {}, ALL, device=CUDA)
    assert err < 1e-9


def test_ademamix_equals_the_loop_reference_on_cuda() -> None:
    err = race("ademamix", {}, RV.AdEMAMixRef, {}, ALL, device=CUDA)
    assert err < 1e-9


@pytest.mark.parametrize("form", ["standard", "gram"])
def test_muon_fp64_equals_the_loop_reference_on_cuda(form: str) -> None:
    err = race(
        "muon",
        {"lr": 0.02, "weight_decay": 0.1, "ns_form": form},
        R.MuonRef,
        {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": torch.float64},
        MATS,
        device=CUDA,
    )
    assert err < 1e-9


@needs_torch_muon
def test_muon_bf16_matches_torch_muon_on_cuda() -> None:
    """As on the CPU (tests/test_recipes.py): bf16 Newton-Schulz differs from torch's by bf16
    rounding only, no more than an independent bf16 loop implementation does."""
    noise = muon_vs_torch(
        lambda ps: R.MuonRef([p for _, p in ps], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16), device=CUDA
    )
    ours = muon_vs_torch(lambda ps: soapdsl.build("muon", ps, lr=0.02, weight_decay=0.1, ns_dtype="bf16"), device=CUDA)
    assert noise < 2e-3
    assert ours < 2e-3


# -- the fused Adam path on CUDA -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    ("recipe", "torch_cls"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)], ids=["adamw", "adam"]
)
def test_fused_bit_identical_to_torch_fused_on_cuda(recipe: str, torch_cls: type, dtype: torch.dtype) -> None:
    """(bf16 and fp16 parameters keep fp32 state, which the kernel cannot take: the stage path.)"""
    ours_model, ref_model = make_net(dtype=dtype).to(CUDA), make_net(dtype=dtype).to(CUDA)
    ours = soapdsl.build(recipe, ours_model, lr=3e-3, beta1=0.85, beta2=0.98, eps=1e-7, weight_decay=0.05)
    assert all(rp.fused is not None for rp in ours._routes)
    ref = torch_cls(ref_model.parameters(), lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05, fused=True)
    for batch in _cuda_batches(30, dtype=dtype):
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fused_conv_model_bit_identical_to_torch_fused_on_cuda(layout: str) -> None:
    """A conv model in either memory format runs the fused kernel with moments in the weight's
    layout, which is what torch's fused AdamW does: the two agree bit for bit."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        return conv.to(CUDA).to(memory_format=fmt)

    ours_net, ref_net = net(), net()
    ours = soapdsl.build("adamw", ours_net, lr=1e-2, weight_decay=0.05)
    assert all(rp.fused is not None for rp in ours._routes)
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    g = torch.Generator(device=CUDA).manual_seed(1)
    for _ in range(8):
        x = torch.randn(4, 3, 9, 9, generator=g, device=CUDA).contiguous(memory_format=fmt)
        for model, opt in ((ours_net, ours), (ref_net, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(ours_net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(p, q)
        assert ours.state[p]["1.momentum.buf"].stride() == p.stride()
        assert torch.equal(ours.state[p]["1.momentum.buf"], ref.state[q]["exp_avg"])


def test_gradient_laid_out_unlike_its_parameter_gives_adams_numbers_on_cuda() -> None:
    """A gradient with other strides than its parameter (set by hand) takes the stage path on the
    GPU too, and gives torch's single-tensor AdamW's numbers."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    w0 = torch.randn(4, 2, 3, 3, generator=g, device=CUDA, dtype=torch.float64)
    grads = [torch.randn(4, 2, 3, 3, generator=g, device=CUDA, dtype=torch.float64) for _ in range(4)]
    ours = torch.nn.Parameter(w0.clone().contiguous(memory_format=torch.channels_last))
    ref = torch.nn.Parameter(w0.clone())
    opt = soapdsl.build("adamw", [("w", ours)], lr=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, foreach=False)
    for grad in grads:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-15)


def test_fused_device_step_counts_follow_fallbacks_and_loads() -> None:
    """Steps that leave Adam's shape (a scheduler moving beta1 away from bias_correct's) take the
    stage path and count on the host only; the fused kernel's device-side counts must catch up,
    also after a state-dict load. Checked against the stage path throughout."""
    pipeline = "momentum(beta1) |> rms_normalize(0.99, 1e-8) |> bias_correct(0.9) |> lr"
    text = f"recipe r(lr=1e-2, beta1=0.9):\n  route default: {pipeline}\n"
    staged_text = f"recipe r(lr=1e-2, beta1=0.9):\n  route default [fused=false]: {pipeline}\n"
    fused_model, staged_model = make_net(dtype=torch.float64).to(CUDA), make_net(dtype=torch.float64).to(CUDA)
    fused, staged = soapdsl.build(text, fused_model), soapdsl.build(staged_text, staged_model)
    assert fused._routes[0].fused is not None
    data = _cuda_batches(24, dtype=torch.float64)

    def run(opt, model, part):
        for k, batch in part:
            opt.param_groups[0]["beta1"] = 0.5 if 5 <= k < 9 else 0.9  # steps 5-8 leave Adam's shape
            train_step(model, opt, batch)

    run(fused, fused_model, list(enumerate(data))[:12])
    run(staged, staged_model, list(enumerate(data))[:12])
    reloaded = soapdsl.build(text, fused_model)
    reloaded.load_state_dict(fused.state_dict())
    run(reloaded, fused_model, list(enumerate(data))[12:])
    run(staged, staged_model, list(enumerate(data))[12:])
    for p, q in zip(fused_model.parameters(), staged_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert float(reloaded.state[next(fused_model.parameters())]["step"]) == 24


# -- no host-device synchronisation ----------------------------------------------------------------

# (recipe arguments, the last step with a first decomposition): freq past the test's steps, so
# the first bases' eigh (step 1; soap_soap's inner basis starts on step 2) is the only one
RECIPES: dict[str, tuple[dict[str, int], int]] = {
    "adamw": ({}, 0),
    "adam": ({}, 0),
    "muon": ({}, 0),
    "soap": ({"freq": 1000}, 1),
    "shampoo": ({"freq": 1000}, 1),
    "soap_muon": ({"freq": 1000}, 1),
    "soap_muon_shared": ({"freq": 1000}, 1),
    "psoap": ({"freq": 1000}, 1),
    "ademamix": ({}, 0),
    "soap_ademamix": ({"freq": 1000}, 1),
    "soap_soap": ({"freq": 1000}, 2),
    "card": ({}, 1),
}


def _steps_without_sync(model: torch.nn.Module, opt: torch.optim.Optimizer, data, free: int) -> None:
    """Train on ``data``; every step after the first ``free`` runs with synchronisation an error."""
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        if k >= free:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_no_host_sync_after_the_first_decomposition(recipe: str) -> None:
    kw, free = RECIPES[recipe]
    model = make_net().to(CUDA)
    _steps_without_sync(model, soapdsl.build(recipe, model, **kw), _cuda_batches(7), max(free, 1))


@pytest.mark.parametrize("recipe", ["soap", "soap_muon", "psoap"])
def test_basis_refresh_by_power_step_and_qr_does_not_sync(recipe: str) -> None:
    """SOAP's periodic refresh is one matmul, a sort, a gather and a QR: no host round trip
    (only ``eigh``, for the first bases and in Shampoo's inverse roots, checks convergence)."""
    model = make_net().to(CUDA)
    _steps_without_sync(model, soapdsl.build(recipe, model, freq=2), _cuda_batches(7), 1)


# -- state dicts across devices --------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["adamw", "soap", "soap_muon"])
def test_state_dict_moves_between_devices(recipe: str) -> None:
    """Trained on the GPU, saved, loaded into an optimizer of the same model on the CPU: both
    go on alike. They differ by the devices' rounding, which SOAP's rank-deficient first factors
    of SmallNet's 32 x 144 matrix amplify to about 1e-12 in float64 (measured on an H100); a
    state that failed to carry over (a basis, a moment, a step count) moves them by about lr."""
    gpu_model = make_net(dtype=torch.float64).to(CUDA)
    kw = {} if recipe == "adamw" else {"freq": 3}
    gpu_opt = soapdsl.build(recipe, gpu_model, **kw)
    data = batches(14, dtype=torch.float64)
    for x, y in data[:8]:
        train_step(gpu_model, gpu_opt, (x.to(CUDA), y.to(CUDA)))
    cpu_model = make_net(dtype=torch.float64)
    cpu_model.load_state_dict({k: v.cpu() for k, v in gpu_model.state_dict().items()})
    cpu_opt = soapdsl.build(recipe, cpu_model, **kw)
    cpu_opt.load_state_dict(gpu_opt.state_dict())
    for p in cpu_model.parameters():
        for v in cpu_opt.state[p].values():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.device.type == "cpu"
    for x, y in data[8:]:
        train_step(gpu_model, gpu_opt, (x.to(CUDA), y.to(CUDA)))
        train_step(cpu_model, cpu_opt, (x, y))
    for p, q in zip(gpu_model.parameters(), cpu_model.parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("recipe", ["adamw", "soap", "muon"])
def test_model_moved_after_its_first_steps_trains_as_if_saved_and_loaded(recipe: str) -> None:
    """``model.to("cuda")`` after some steps on the CPU, and back: the state follows the
    parameters, where ``load_state_dict`` would put it, and training goes on as after a save
    and a load on the new device."""
    a, b = make_net(), make_net()
    opt_a, opt_b = soapdsl.build(recipe, a), soapdsl.build(recipe, b)
    data = batches(24)
    for batch in data[:8]:
        train_step(a, opt_a, batch)
        train_step(b, opt_b, batch)
    for device, chunk in ((CUDA, data[8:16]), ("cpu", data[16:])):
        a.to(device)
        b.to(device)
        saved = opt_b.state_dict()
        opt_b = soapdsl.build(recipe, b)
        opt_b.load_state_dict(saved)
        for x, y in chunk:
            train_step(a, opt_a, (x.to(device), y.to(device)))
            train_step(b, opt_b, (x.to(device), y.to(device)))
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
            for key, value in opt_a.state[p].items():
                if key != "step" and torch.is_tensor(value):
                    assert value.device == p.device, key


@pytest.mark.parametrize(
    ("recipe", "graphs"), [("soap", False), ("soap_muon", False), ("muon", False), ("soap_muon", True), ("muon", True)]
)
def test_distributed_split_on_one_nccl_rank_equals_the_plain_optimizer(recipe: str, graphs: bool, tmp_path) -> None:
    """``distributed=True`` over NCCL, whose collectives take CUDA tensors only (the split's
    buffers live on the GPU). One rank computes every matrix and gathers them from itself, so
    the result must equal the plain optimizer's bit for bit (two ranks: tests/test_distributed.py,
    on gloo); with ``cuda_graphs=True`` too, where the split's share of each batch is graphed."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from tests.test_distributed import _batches, _net  # three same-shape matrices: a batch to split

        kw = {} if recipe == "muon" else {"freq": 3}
        a, b = _net().to(CUDA), _net().to(CUDA)
        opt_a = soapdsl.build(recipe, a, distributed=True, cuda_graphs=graphs, **kw)
        opt_b = soapdsl.build(recipe, b, **kw)
        for x, y in _batches(8):
            train_step(a, opt_a, (x.to(CUDA), y.to(CUDA)))
            train_step(b, opt_b, (x.to(CUDA), y.to(CUDA)))
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
        assert opt_a._split is not None and opt_a._split.computed["all"] > 0
        assert not graphs or sum(c.replays for c in opt_a._graphs.values()) > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("recipe", "graphs"),
    [("adamw", False), ("soap", False), ("soap_muon", False), ("muon", False), ("soap_muon", True), ("muon", True)],
)
def test_fsdp_on_one_nccl_rank_equals_the_plain_optimizer(recipe: str, graphs: bool, tmp_path) -> None:
    """FSDP2 over NCCL (runtime/fsdp.py): the exchanges' buffers live on the GPU. One rank owns
    every matrix and holds every row, so the result must equal the plain optimizer's bit for
    bit (two ranks: tests/test_fsdp.py, on gloo); with ``cuda_graphs=True`` too, where the
    owner replays its Newton-Schulz iterations."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor

        from tests.test_fsdp import _grads, _model

        kw = {} if recipe in ("adamw", "muon") else {"freq": 3}
        mesh = init_device_mesh("cuda", (1,))
        sharded, plain = _model().to(CUDA), _model().to(CUDA)
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        opt_s = soapdsl.build(recipe, sharded, cuda_graphs=graphs, **kw)
        opt_p = soapdsl.build(recipe, plain, **kw)
        for step in range(6):
            for p, q, g in zip(sharded.parameters(), plain.parameters(), _grads(step, plain), strict=True):
                p.grad = distribute_tensor(g.to(CUDA), mesh, [Shard(0)])
                q.grad = g.to(CUDA)
            opt_s.step()
            opt_p.step()
        for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.full_tensor(), q)
        if graphs:
            assert opt_s._shards is not None
            assert sum(c.replays for c in opt_s._shards.inner._graphs.values()) > 0
    finally:
        dist.destroy_process_group()


# -- torch.compile on CUDA -------------------------------------------------------------------------

# torch 2.11's inductor asserts (FusedSchedulerNode.reorder_loops_by_dep_pair) on muon's and
# soap_muon's Newton-Schulz graph for the benchmark's 256-wide matrices (benchmarks/RESULTS_cuda.md);
# on these shapes all four compiled on an H100 with torch 2.11.


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        "adamw",
        "soap",
        "muon",
        "soap_muon",
    ],
)
def test_compiled_route_matches_eager_on_cuda(recipe: str) -> None:
    """Well-conditioned square matrices and vectors (see tests/test_compile_step.py): the
    compiled route computes what the eager one does, to fp32 rounding."""
    shapes = {"a": (16, 16), "b": (16, 16), "c": (32, 32), "v": (16,)}
    kw = {"freq": 3} if "soap" in recipe else {}
    eager_p, compiled_p = eager_and_compiled(recipe, shapes, 8, device=CUDA, **kw)
    for n in shapes:
        torch.testing.assert_close(compiled_p[n], eager_p[n], rtol=1e-5, atol=1e-6)


# -- CUDA graphs (runtime/graphs.py) ---------------------------------------------------------------

# wide, tall, square twice (one batch of two), a conv kernel, a vector, and a 32 x 96 matrix on
# which the Gram form runs
GRAPH_SHAPES = {
    "wide": (12, 40),
    "tall": (40, 12),
    "sq1": (24, 24),
    "sq2": (24, 24),
    "conv": (8, 3, 3, 3),
    "long": (32, 96),
    "vector": (24,),
}
UNBATCHED = """
recipe unbatched(lr=0.02):
  route ndim >= 2 [batch=false, cuda_graph=GRAPHS]: momentum(0.95, nesterov=true) |> newton_schulz(5) |> lr
  route default: sign |> lr
"""


def _eager_and_graphed(recipe: str, steps: int = 12, **kw):
    eager_p, graphed_p = twin_params(GRAPH_SHAPES, device=CUDA)
    if recipe == "unbatched":
        eager = soapdsl.build(UNBATCHED.replace("GRAPHS", "false"), list(eager_p.items()))
        graphed = soapdsl.build(UNBATCHED.replace("GRAPHS", "true"), list(graphed_p.items()))
    else:
        eager = soapdsl.build(recipe, list(eager_p.items()), **kw)
        graphed = soapdsl.build(recipe, list(graphed_p.items()), cuda_graphs=True, **kw)
    lockstep([eager, graphed], [eager_p, graphed_p], GRAPH_SHAPES, steps, device=CUDA)
    return eager_p, graphed_p, graphed


@pytest.mark.parametrize(
    ("recipe", "kw"),
    [
        ("muon", {}),
        ("muon", {"ns_dtype": "bf16"}),
        ("muon", {"ns_form": "gram"}),
        ("soap_muon", {"freq": 3}),
        ("soap_muon", {"freq": 3, "ns_form": "gram"}),
        ("unbatched", {}),
    ],
    ids=["muon", "muon-bf16", "muon-gram", "soap_muon", "soap_muon-gram", "unbatched"],
)
def test_cuda_graphs_replay_the_eager_numbers_bit_for_bit(recipe: str, kw: dict) -> None:
    """The same kernels on the same shapes: every parameter equals the eager optimizer's bit
    for bit, after steps that replayed graphs (and, in soap_muon, basis refreshes between them).
    The unbatched route runs one graph per matrix, same-shape ones included, each result still
    in use while the next graph replays."""
    eager_p, graphed_p, graphed = _eager_and_graphed(recipe, **kw)
    for n in GRAPH_SHAPES:
        assert torch.equal(graphed_p[n], eager_p[n]), n
    caches = list(graphed._graphs.values())
    assert caches and sum(c.replays for c in caches) > 0
    assert sum(c.captures for c in caches) == sum(len(c) for c in caches)  # captured once each


def test_graph_cache_captures_on_the_second_call_and_regrows_its_arena() -> None:
    from soapdsl.ops._linalg import newton_schulz
    from soapdsl.runtime.graphs import GraphCache

    coeffs = (3.4445, -4.7750, 2.0315)
    cache = GraphCache()
    small, large = torch.randn(2, 8, 16, device=CUDA), torch.randn(3, 16, 40, device=CUDA)

    def ns(x: torch.Tensor) -> torch.Tensor:
        def fn(inp: torch.Tensor) -> torch.Tensor:
            return newton_schulz(inp, 5, coeffs, scratch=inp)

        return cache.run(tuple(x.shape), fn, x, lambda: newton_schulz(x, 5, coeffs))

    want_small, want_large = newton_schulz(small, 5, coeffs), newton_schulz(large, 5, coeffs)
    assert torch.equal(ns(small), want_small) and cache.captures == 0  # eager: the first call
    assert torch.equal(ns(small), want_small) and cache.captures == 1
    assert torch.equal(ns(large), want_large) and cache.captures == 1
    assert torch.equal(ns(large), want_large) and cache.captures == 2  # a larger arena: small's graph dropped
    assert torch.equal(ns(small), want_small) and cache.captures == 3
    assert torch.equal(ns(large), want_large) and torch.equal(ns(small), want_small)
    assert cache.captures == 3 and cache.replays == 5
    assert torch.equal(small, small.clone()) and torch.equal(ns(small), want_small)  # the input is left alone


def test_graph_cache_runs_eagerly_inside_a_users_capture_and_after_a_failed_one() -> None:
    from soapdsl.ops._linalg import newton_schulz
    from soapdsl.runtime.graphs import GraphCache

    coeffs = (3.4445, -4.7750, 2.0315)
    cache = GraphCache()
    x = torch.randn(2, 8, 16, device=CUDA)
    want = newton_schulz(x, 5, coeffs)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return newton_schulz(inp, 5, coeffs, scratch=inp)

    # a user capturing a step that holds a graphed call: no nested capture, the call is captured
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cache.run("user", fn, x, lambda: newton_schulz(x, 5, coeffs))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.run("user", fn, x, lambda: newton_schulz(x, 5, coeffs))
    graph.replay()
    assert torch.equal(out, want) and cache.captures == 0

    # a function that synchronises cannot be captured: a warning, then the eager numbers
    def syncing(inp: torch.Tensor) -> torch.Tensor:
        return fn(inp) * float(inp.abs().max() > 0)

    cache.run("sync", syncing, x, lambda: newton_schulz(x, 5, coeffs))
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = cache.run("sync", syncing, x, lambda: newton_schulz(x, 5, coeffs))
    assert torch.equal(got, want)
    assert torch.equal(cache.run("sync", syncing, x, lambda: newton_schulz(x, 5, coeffs)), want)
    assert torch.equal(cache.run("after", fn, x, lambda: newton_schulz(x, 5, coeffs)), want)
    assert torch.equal(cache.run("after", fn, x, lambda: newton_schulz(x, 5, coeffs)), want)
    assert cache.captures == 1


def test_cuda_graphs_follow_autocast() -> None:
    """A training loop may call ``step()`` inside ``torch.autocast``. The step turns autocast off,
    eager or graphed, so the graphs captured outside replay inside (the cache's key would tell
    them apart if the kernels differed), and the graphed optimizer equals the eager one through
    steps outside, inside, and outside again."""
    eager_p, graphed_p = twin_params(GRAPH_SHAPES, device=CUDA)
    eager = soapdsl.build("muon", list(eager_p.items()))
    graphed = soapdsl.build("muon", list(graphed_p.items()), cuda_graphs=True)
    pair = ([eager, graphed], [eager_p, graphed_p], GRAPH_SHAPES)
    lockstep(*pair, 3, seed=1, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lockstep(*pair, 3, seed=2, device=CUDA)
    lockstep(*pair, 2, seed=3, device=CUDA)
    for n in GRAPH_SHAPES:
        assert torch.equal(graphed_p[n], eager_p[n]), n
    cache = graphed._graphs[graphed._routes[0].index]  # the route of the matrices
    batches = len({s for s in GRAPH_SHAPES.values() if len(s) >= 2})  # one per shape
    assert cache.replays == 7 * batches and cache.captures == batches  # steps 2-8 replay


def test_cuda_graphs_of_a_model_moved_off_the_gpu_are_freed_and_captured_again_on_return() -> None:
    """``model.cpu()`` after graphed steps: the route's graphs, input buffer and pool on the GPU
    are dropped when its layout is rebuilt; back on the GPU they are captured afresh, and the
    numbers equal an eager twin's throughout."""
    a, b = make_net(), make_net()
    a.to(CUDA)
    b.to(CUDA)
    graphed, eager = soapdsl.build("muon", a, cuda_graphs=True), soapdsl.build("muon", b)
    data = batches(12)
    for device, chunk in ((CUDA, data[:4]), ("cpu", data[4:8]), (CUDA, data[8:])):
        a.to(device)
        b.to(device)
        for x, y in chunk:
            train_step(a, graphed, (x.to(device), y.to(device)))
            train_step(b, eager, (x.to(device), y.to(device)))
        (cache,) = [graphed._graphs[rp.index] for rp in graphed._routes if rp.selector == "ndim >= 2"]
        on_gpu = device == CUDA
        assert bool(cache._arenas) == on_gpu and bool(cache._pools) == on_gpu and (len(cache) > 0) == on_gpu
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
    assert cache.captures == 2 * len(cache)  # once per stay on the GPU


def test_race_on_cuda_with_cuda_graphs(tmp_path) -> None:
    """``soapdsl race --device cuda --cuda-graphs``: the same initial weights and batches as on the
    CPU (drawn there), trained on the GPU; every run finishes with finite losses near the CPU's."""
    import json

    from soapdsl.race import run_race

    tiny = dict(steps=6, batch=4, context=32, d_model=32, n_layers=1, n_heads=2, eval_every=3, eval_batches=1)
    recipes = ["adamw", "muon", "soap_muon:freq=2"]
    gpu = run_race(recipes, **tiny, device=CUDA, cuda_graphs=True, out=tmp_path, progress=False, plot=False)
    cpu = run_race(recipes, **tiny, threads=1, out=None, progress=False)
    for g, c in zip(gpu.rows, cpu.rows, strict=True):
        assert not g.best.diverged and math.isfinite(g.best.final_val)
        assert g.best.val_loss[0] == pytest.approx(c.best.val_loss[0], rel=1e-5)  # the same initial weights
        assert g.best.final_val == pytest.approx(c.best.final_val, rel=0.05)
    data = json.loads((tmp_path / "race.json").read_text())
    assert data["config"]["device"] == CUDA and data["config"]["cuda_graphs"] is True
    assert data["task"]["device"].startswith("cuda (")
