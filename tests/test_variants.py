"""The variant recipes (issue: rapid prototyping) against independent loop references written
from ALGORITHMS.md in tests/references_variants.py."""

from __future__ import annotations

import re

import pytest
import torch

import soapdsl
from tests import references_variants as V
from tests.conftest import assert_descending_eigenbasis, lockstep, race, twin_params, worst_moved_err

MATS = {"square": (6, 6), "tall": (10, 4), "wide": (4, 10)}
ALL = {**MATS, "vector": (7,), "over_max_dim": (12, 5), "conv": (3, 2, 3, 3)}


@pytest.mark.parametrize("warmups", [{}, {"alpha_warmup": 30, "beta3_warmup": 40}], ids=["no-warmup", "warmups"])
def test_ademamix_equals_reference(warmups):
    kw = {"lr": 1e-2, "alpha": 5.0, "weight_decay": 0.1, "beta3": 0.999, **warmups}
    ref = {"lr": 1e-2, "alpha": 5.0, "weight_decay": 0.1, "betas": (0.9, 0.999, 0.999), **warmups}
    assert race("ademamix", kw, V.AdEMAMixRef, ref, ALL) < 1e-10


@pytest.mark.parametrize("warmups", [{}, {"alpha_warmup": 30, "beta3_warmup": 40}], ids=["no-warmup", "warmups"])
def test_soap_ademamix_equals_reference(warmups):
    kw = {"freq": 5, "max_dim": 8, **warmups}
    ref = {"precondition_frequency": 5, "max_precond_dim": 8, **warmups}
    assert race("soap_ademamix", kw, V.SoapAdEMAMixRef, ref, ALL) < 1e-10


@pytest.mark.parametrize("p", [0.5, 1.3])
def test_psoap_equals_reference(p):
    kw = {"freq": 5, "max_dim": 8, "p": p}
    ref = {"precondition_frequency": 5, "max_precond_dim": 8, "power": p}
    assert race("psoap", kw, V.PSoapRef, ref, ALL) < 1e-10


def test_psoap_power_needs_every_dim_below_max_dim():
    """ALGORITHMS.md 3.11 (soap_p.py): the power applies when max(shape) < 10000 (max_dim here),
    strictly: a matrix whose largest dim equals max_dim is rotated on both sides (the factors'
    bound is <=) but takes plain SOAP, like a 10000-token embedding at the defaults. (Shapes
    whose factors have full rank from the first step, so that both bases are unique.)"""
    shapes = {"at_max_dim": (8, 8), "tensor_at_max_dim": (8, 3, 3), "below": (7, 7), "over": (12, 5)}
    kw = {"freq": 5, "max_dim": 8, "p": 0.5}
    ref = {"precondition_frequency": 5, "max_precond_dim": 8, "power": 0.5}
    assert race("psoap", kw, V.PSoapRef, ref, shapes) < 1e-10
    params = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in shapes.items()]
    routes = {e.name: e.route for e in soapdsl.build("psoap", params, max_dim=8).plan.params}
    assert routes == {"at_max_dim": 1, "tensor_at_max_dim": 1, "below": 0, "over": 1}


def test_psoap_with_p_one_is_exactly_soap():
    def run(recipe):
        torch.manual_seed(0)
        ps = {n: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for n, s in ALL.items()}
        opt = soapdsl.build(recipe, list(ps.items()), freq=5, max_dim=8)
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            for n, s in ALL.items():
                ps[n].grad = torch.randn(s, generator=g, dtype=torch.float64)
            opt.step()
        return ps

    a, b = run("psoap"), run("soap")
    for n in ALL:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("p", [0.5, 1.3])
def test_psoap_survives_all_zero_gradients(p):
    """A layer whose gradients are all zero for a while (unused so far, zero_grad without
    set_to_none) gets a zero direction: psoap's graft back to SOAP's norm must not make it
    0 / 0. Only the weight decay moves it, as in soap; real gradients later train it."""
    w = {n: torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for n, s in ALL.items()}
    ref = {n: torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for n, s in ALL.items()}
    opt = soapdsl.build("psoap", list(w.items()), freq=2, max_dim=8, p=p)
    soap = soapdsl.build("soap", list(ref.items()), freq=2, max_dim=8)
    for _ in range(4):
        for ps in (w, ref):
            for n, s in ALL.items():
                ps[n].grad = torch.zeros(s, dtype=torch.float64)
        opt.step()
        soap.step()
    for n in ALL:
        assert torch.equal(w[n], ref[n]), n
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for n, s in ALL.items():
            w[n].grad = torch.randn(s, generator=g, dtype=torch.float64)
        opt.step()
    for n in ALL:
        assert torch.isfinite(w[n]).all() and not torch.equal(w[n], ref[n]), n


SOAPSOAP = {
    "square": (6, 6),
    "tall": (8, 6),
    "wide": (6, 8),
    "vector": (7,),
    "tall_over": (12, 5),
    "wide_over": (5, 12),
    "both_over": (12, 11),
}


@pytest.mark.parametrize("freq", [1, 4, 5])
def test_soap_soap_equals_reference(freq):
    """soapsoap.py's sides (the smaller first, the right one of a square), both bases started from
    the raw gradient, its permutations, and the double division where a side is over max_dim.

    The second basis of a rectangular matrix starts from the larger side's factor of one
    gradient, which is rank-deficient: its null-space eigenvectors are arbitrary, in the file as
    anywhere. After the first step the test checks that factor and basis, then hands our basis to
    the reference, so that the 59 steps after compare everything else."""
    ours, theirs = twin_params(SOAPSOAP, torch.float64)
    start = {n: t.detach().clone() for n, t in theirs.items()}
    opt = soapdsl.build("soap_soap", list(ours.items()), freq=freq, max_dim=10)
    ref = V.SoapSoapRef(list(theirs.values()), precondition_frequency=freq, max_precond_dim=10)
    lockstep([opt, ref], [ours, theirs], SOAPSOAP, 1, seed=1, dtype=torch.float64)
    for n, p in ours.items():
        st, rst = opt.state[p], ref.state[theirs[n]]
        first, second = V.SoapSoapRef.sides(tuple(p.shape), 10)
        dims = {"L": 0, "R": 1}
        assert [k for k in st if k.endswith(".Q0") or k.endswith(".Q1")] == [
            f"{scope}.Q{dims[side]}" for scope, side in (("1.rotate", first), ("1.1.rotate", second)) if side
        ], n
        if second is None:
            continue
        gg, q = st[f"1.1.rotate.GG{dims[second]}"], st[f"1.1.rotate.Q{dims[second]}"]
        scale = float(gg.abs().max())
        torch.testing.assert_close(gg, rst["GG2"], rtol=0, atol=1e-14 * scale)  # (1 - beta) of the raw G's factor
        assert_descending_eigenbasis(gg, q, 1e-14 * scale, n)
        rst["Q2"] = q.clone()
    lockstep([opt, ref], [ours, theirs], SOAPSOAP, 59, seed=2, dtype=torch.float64)
    assert worst_moved_err(ours, theirs, start) < 1e-10


@pytest.mark.parametrize("freq", [3, 4])
def test_soap_soap_can_permute_every_second_moment(freq):
    """permute1=all, permute2=all: a refresh permutes every second moment its basis reorders, as
    soap does, unlike soapsoap.py (the reference's permute_all). Square matrices and matrices with
    one side over max_dim, whose first bases are unique."""
    shapes = {"a": (6, 6), "b": (8, 8), "tall_over": (12, 5), "wide_over": (5, 12)}
    kw = {"freq": freq, "max_dim": 10, "permute1": "all", "permute2": "all"}
    ref = {"precondition_frequency": freq, "max_precond_dim": 10, "permute_all": True}
    assert race("soap_soap", kw, V.SoapSoapRef, ref, shapes) < 1e-10
    # and the file's permutations are another optimizer
    assert race("soap_soap", kw, V.SoapSoapRef, {**ref, "permute_all": False}, shapes) > 1e-3


def test_soap_soap_first_bases_come_from_float64_eigendecompositions():
    """soapsoap.py decomposes each factor in float64 and casts the basis back to the factor's dtype
    (V.SoapSoapRef._eigh); soap and soap_muon decompose in the factor's own dtype. For float32 parameters
    the two differ where it matters: the larger side's factor of one gradient is rank-deficient, and its
    null-space eigenvectors, which every later step uses, are whatever that precision makes of them."""
    shapes = {"tall": (8, 6), "wide": (6, 8), "square": (6, 6)}
    for recipe, scopes in (("soap_soap", ("1.rotate", "1.1.rotate")), ("soap", ("0.rotate",))):
        ours, _ = twin_params(shapes, torch.float32)
        opt = soapdsl.build(recipe, list(ours.items()))
        lockstep([opt], [ours], shapes, 1, seed=1, dtype=torch.float32)
        for n, p in ours.items():
            for scope in scopes:
                for k in (0, 1):
                    if f"{scope}.Q{k}" not in opt.state[p]:
                        continue
                    gg, q = opt.state[p][f"{scope}.GG{k}"], opt.state[p][f"{scope}.Q{k}"]
                    assert gg.dtype == q.dtype == torch.float32, (recipe, n)
                    work = gg.double() if recipe == "soap_soap" else gg + 1e-30 * torch.eye(gg.size(-1))
                    expected = torch.linalg.eigh(work)[1].flip(-1).to(torch.float32)
                    assert torch.equal(q, expected), (recipe, n, scope, k)


SHARED = {
    "blocks.0.fc.weight": (6, 10),
    "blocks.1.fc.weight": (6, 10),
    "blocks.2.fc.weight": (6, 10),
    "blocks.0.proj.weight": (10, 6),
    "blocks.1.proj.weight": (10, 6),
}


def _groups(ps):
    return {
        "groups": [
            [ps["blocks.0.fc.weight"], ps["blocks.1.fc.weight"]],
            [ps["blocks.0.proj.weight"], ps["blocks.1.proj.weight"]],
        ],
        "precondition_frequency": 5,
    }


def test_soap_muon_shared_equals_reference():
    assert race("soap_muon_shared", {"freq": 5}, V.SharedSoapMuonRef, _groups, SHARED) < 1e-10


def test_shared_basis_is_the_eigenbasis_of_the_summed_statistics():
    torch.manual_seed(0)
    ps = {n: torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for n, s in SHARED.items()}
    opt = soapdsl.build("soap_muon_shared", list(ps.items()))
    grads = {n: torch.randn(s, dtype=torch.float64) for n, s in SHARED.items()}
    for n, p in ps.items():
        p.grad = grads[n].clone()
    opt.step()  # the first step builds the bases
    summed = 0.05 * (
        grads["blocks.0.fc.weight"] @ grads["blocks.0.fc.weight"].T
        + grads["blocks.1.fc.weight"] @ grads["blocks.1.fc.weight"].T
    )
    expected = torch.linalg.eigh(summed).eigenvectors.flip(-1)
    q = opt.state[ps["blocks.0.fc.weight"]]["0.rotate.Q0"]
    torch.testing.assert_close((q * expected).sum(0).abs(), torch.ones(6, dtype=torch.float64))
    assert "0.rotate.Q0" not in opt.state[ps["blocks.1.fc.weight"]]
    assert "0.rotate.Q0" in opt.state[ps["blocks.2.fc.weight"]]


def test_soap_muon_shared_allocates_one_factor_and_basis_per_group():
    shapes = [(f"blocks.{i}.{w}.weight", s) for i in range(4) for w, s in (("fc", (64, 16)), ("proj", (16, 64)))]
    params = [(n, torch.empty(s, device="meta")) for n, s in shapes]
    alone = soapdsl.compile("soap_muon", params)
    shared = soapdsl.compile("soap_muon_shared", params)
    factor_and_basis = 2 * 16 * 16 * 4
    # 8 matrices, 4 groups: 4 factor+basis pairs fewer
    assert alone.state_bytes() - shared.state_bytes() == 4 * factor_and_basis
    text = shared.to_text()
    assert "blocks.0.fc.weight, blocks.1.fc.weight" in text
    assert "sharing saves 8.00 KiB of state" in text


@pytest.mark.parametrize(
    ("share", "message"),
    [
        # a model whose blocks are 'layer.N' (BERT's 'encoder.layer.3.'): nothing matched, so
        # soap_muon_shared was soap_muon without a word
        (r"layers\.(\d+)\.", re.escape(r"share='layers\\.(\\d+)\\.' matches none of the route's 8 parameter names")),
        ("(blo)cks", re.escape("captures 'blo' in 'blocks.0.fc.weight', not a layer index")),
    ],
)
def test_a_share_pattern_that_groups_nothing_is_a_warning(share, message):
    params = [(f"blocks.{i}.{w}.weight", torch.empty(6, 6, device="meta")) for i in range(4) for w in ("fc", "proj")]
    with pytest.warns(soapdsl.SoapWarning, match=message) as caught:
        plan = soapdsl.compile("soap_muon_shared", params, share=share)
    assert len(caught) == 1
    assert "sharing saves" not in plan.to_text()


def test_a_share_pattern_that_groups_is_not_a_warning_nor_one_parameter():
    params = [(f"blocks.{i}.fc.weight", torch.empty(6, 6, device="meta")) for i in range(2)]
    soapdsl.compile("soap_muon_shared", params)  # SoapWarning is an error in the tests
    soapdsl.compile("soap_muon_shared", [("w", torch.empty(6, 6, device="meta"))])
    soapdsl.compile("soap_muon_shared", params, share=r"blocks\.(\d+)\.", share_size=0)  # all in one group


def test_sharing_needs_every_member_to_step():
    ps = {n: torch.nn.Parameter(torch.randn(s)) for n, s in SHARED.items()}
    opt = soapdsl.build("soap_muon_shared", list(ps.items()))
    for n, p in ps.items():
        p.grad = None if n == "blocks.0.fc.weight" else torch.randn(p.shape)
    with pytest.raises(soapdsl.SoapArgumentError, match="every parameter of a share group"):
        opt.step()


@pytest.mark.parametrize("schedule", [((10, 1), 5), ((6, 1), (20, 4), 10)])
def test_refresh_schedule_equals_reference(schedule):
    kw = {"freq": schedule, "max_dim": 8}
    ref = {"freq_schedule": [*schedule], "max_precond_dim": 8}
    assert race("soap", kw, V.SoapScheduleRef, ref, ALL) < 1e-10


def test_cautious_adamw_equals_reference():
    text = "recipe c(lr=1e-2, wd=0.05) = decay(wd) |> adam(0.9, 0.999, 1e-8) |> cautious |> lr"
    ref = {"lr": 1e-2, "weight_decay": 0.05}
    assert race(text, {}, V.CautiousAdamRef, ref, ALL) < 1e-10


@pytest.mark.parametrize("recipe", ["ademamix", "soap_ademamix", "psoap", "soap_soap", "soap_muon_shared"])
def test_variants_are_listed_with_their_parameters(capsys, recipe):
    from soapdsl.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"  {recipe}(lr=" in out
