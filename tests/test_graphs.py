"""The CUDA-graph option (``cuda_graphs=True``, route option ``[cuda_graph=true]``;
runtime/graphs.py), where it can be checked without a GPU: how it is asked for and refused, and
that off CUDA it changes nothing, not even the inputs it is handed. The replays themselves are
checked bit for bit against the eager path in tests/test_gpu.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapArgumentError, SoapRouteError
from soapdsl.runtime.graphs import GraphCache
from tests.conftest import lockstep, twin_params

SHAPES = {"wide": (6, 10), "tall": (10, 6), "sq1": (8, 8), "sq2": (8, 8), "vector": (8,)}
GRAPHED = """recipe graphed(lr=0.02):
  route ndim >= 2 [cuda_graph=true]: momentum(0.95) |> newton_schulz(5) |> lr
  route default: sign |> lr
"""


def test_route_option_and_build_argument_mark_routes() -> None:
    plan = soapdsl.compile(GRAPHED, list(twin_params(SHAPES)[0].items()))
    assert [rp.options for rp in plan.routes] == [{"cuda_graph": True}, {}]
    plan = soapdsl.compile("muon", list(twin_params(SHAPES)[0].items()), cuda_graphs=True)
    assert all(rp.options.get("cuda_graph") for rp in plan.routes)
    opt = soapdsl.build("soap_muon", list(twin_params(SHAPES)[0].items()), cuda_graphs=True)
    assert sorted(opt._graphs) == [rp.index for rp in opt._routes]


def test_compile_and_cuda_graph_on_one_route_are_refused_at_the_setting(tmp_path) -> None:
    path = tmp_path / "both.soap"
    path.write_text(GRAPHED.replace("[cuda_graph=true]", "[compile=true, cuda_graph=true]"))
    with pytest.raises(SoapRouteError) as e:
        soapdsl.compile(str(path), list(twin_params(SHAPES)[0].items()))
    text = str(e.value)
    assert f"{path}:2:" in text and "compile=true or cuda_graph=true, not both" in text
    assert "[compile=true, cuda_graph=true]" in text and "^" in text
    # false is no conflict
    plan = soapdsl.compile(
        GRAPHED.replace("[cuda_graph=true]", "[compile=true, cuda_graph=false]"), list(twin_params(SHAPES)[0].items())
    )
    assert plan.routes[0].options == {"compile": True, "cuda_graph": False}


def test_build_arguments_are_checked() -> None:
    params = list(twin_params(SHAPES)[0].items())
    with pytest.raises(SoapArgumentError, match="cuda_graphs must be True or False, got 'no'"):
        soapdsl.build("muon", params, cuda_graphs="no")
    with pytest.raises(SoapArgumentError, match="torch_compile=True and cuda_graphs=True: choose one"):
        soapdsl.build("muon", params, cuda_graphs=True, torch_compile=True)
    compiled_route = GRAPHED.replace("[cuda_graph=true]", "[compile=true]")
    with pytest.raises(SoapArgumentError, match=r"route 'ndim >= 2' would run under torch.compile"):
        soapdsl.build(compiled_route, params, cuda_graphs=True)


@pytest.mark.parametrize(("recipe", "kw"), [("muon", {}), ("soap_muon", {"freq": 3}), (GRAPHED, {})])
def test_off_cuda_the_option_changes_nothing(recipe: str, kw: dict) -> None:
    """On the CPU every call takes the eager path, which must not overwrite what it is handed
    (a momentum buffer, a gradient): parameters and state equal the plain optimizer's bit for bit."""
    plain_p, graphed_p = twin_params(SHAPES)
    plain_recipe = recipe.replace("[cuda_graph=true]", "") if recipe == GRAPHED else recipe
    plain = soapdsl.build(plain_recipe, list(plain_p.items()), **kw)
    graphed = soapdsl.build(recipe, list(graphed_p.items()), cuda_graphs=recipe != GRAPHED, **kw)
    lockstep([plain, graphed], [plain_p, graphed_p], SHAPES, 7)
    for n in SHAPES:
        assert torch.equal(graphed_p[n], plain_p[n]), n
        for key, value in plain.state[plain_p[n]].items():
            if torch.is_tensor(value):
                assert torch.equal(graphed.state[graphed_p[n]][key], value), (n, key)
    assert graphed._graphs and all(c.captures == c.replays == len(c) == 0 for c in graphed._graphs.values())


def test_graph_cache_off_cuda_calls_the_eager_function_only() -> None:
    cache = GraphCache()
    x = torch.ones(2, 3, 3)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        raise AssertionError("captured off CUDA")

    for _ in range(3):
        assert torch.equal(cache.run("k", fn, x, lambda: x * 2), x * 2)
    assert cache.captures == cache.replays == len(cache) == 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_capture_graphs_of_their_own(how: str) -> None:
    params = dict(twin_params(SHAPES)[0])
    opt = soapdsl.build("muon", list(params.items()), cuda_graphs=True)
    lockstep([opt], [params], SHAPES, 2)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2._graphs.keys() == opt._graphs.keys()
    assert all(opt2._graphs[k] is not opt._graphs[k] for k in opt._graphs)
    lockstep([opt, opt2], [params, params2], SHAPES, 3)
    for n in SHAPES:
        assert torch.equal(params[n], params2[n])


def test_graph_inputs_keep_a_dense_layout_and_pack_any_other() -> None:
    """A graph's input is a view of the route's arena: with the caller's strides where they are a
    dense layout (a transposed batch stays transposed, so the captured kernels are the eager
    ones), row-major where the caller's tensor overlaps itself or skips memory."""
    from soapdsl.runtime.graphs import _dense

    base = torch.zeros(2, 4, 6)
    assert _dense(base) and _dense(base.mT) and _dense(base.permute(2, 0, 1)) and _dense(torch.zeros(2, 1, 3))
    assert not _dense(torch.zeros(3).expand(2, 4, 3)) and not _dense(base[:, :, :3])
    cache = GraphCache()
    for x, stride in [
        (base.mT, base.mT.stride()),
        (torch.zeros(6).expand(2, 4, 6), (24, 6, 1)),
        (base[:, :, :3], (12, 3, 1)),
    ]:
        inp = cache._input(x)
        assert inp.shape == x.shape and inp.stride() == stride
        inp.copy_(x)  # writable: no two elements share memory
    assert cache._arenas[base.device].numel() == base.numel() * base.element_size()
