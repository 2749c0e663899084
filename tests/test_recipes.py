"""Every shipped recipe reproduces its algorithm (ALGORITHMS.md), against independent loop
references written in tests/references.py and against torch.optim where torch has it."""

from __future__ import annotations

import math

import pytest
import torch

import soapdsl
from benchmarks import peers
from tests import references as R
from tests import references_variants as V
from tests.conftest import (
    assert_descending_eigenbasis,
    lockstep,
    muon_vs_torch,
    needs_torch_muon,
    race,
    twin_params,
    worst_moved_err,
)

MATS = {"square": (6, 6), "tall": (10, 4), "wide": (4, 10)}
ALL = {**MATS, "vector": (7,), "over_max_dim": (12, 5), "conv": (3, 2, 3, 3)}


# -- SOAP -------------------------------------------------------------------------------------

SOAP_OPTIONS = [
    {},
    {"merge_dims": True},
    {"precondition_1d": True},
    {"normalize_grads": True, "correct_bias": False},
    {"shampoo_beta": 0.9, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6},
]


@pytest.mark.parametrize("ref_cls", [R.SoapV1Ref, R.SoapV2Ref], ids=["v1", "v2"])
@pytest.mark.parametrize("options", SOAP_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_soap_equals_both_historical_forms(ref_cls, options):
    """60 steps, refresh every 5 (12 refreshes), square/tall/wide/1-D/over-max_dim/conv."""
    ref_kw = {k: v for k, v in options.items() if k not in ("beta1", "beta2")}
    if "beta1" in options:
        ref_kw["betas"] = (options["beta1"], options["beta2"])
    err = race(
        "soap",
        {"freq": 5, "max_dim": 8, **options},
        ref_cls,
        {"precondition_frequency": 5, "max_precond_dim": 8, **ref_kw},
        ALL,
    )
    assert err < 1e-10


RECT = {"tall": (10, 4), "wide": (4, 10), "long": (12, 5), "conv": (3, 2, 3, 3), "square": (6, 6)}


def _hand_over_first_bases(opt, ref, ours, theirs) -> None:
    """After one step, check each factor equals the reference's and each basis diagonalises it in
    descending order, then give the reference our bases. A rectangular matrix's larger factor of
    one gradient is rank-deficient, so its null-space eigenvectors are arbitrary (in the original
    as anywhere) and every later step depends on them through the QR refresh."""
    for n, p in ours.items():
        st, rst = opt.state[p], ref.state[theirs[n]]
        for k, rgg in enumerate(rst["GG"]):
            gg, q = st[f"0.rotate.GG{k}"], st[f"0.rotate.Q{k}"]
            scale = float(gg.abs().max())
            torch.testing.assert_close(gg, rgg, rtol=0, atol=1e-14 * scale)
            assert_descending_eigenbasis(gg, q, 1e-13 * scale, (n, k))
            torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=q.dtype), rtol=0, atol=1e-13)
            rst["Q"][k] = q.clone()


@pytest.mark.parametrize("freq", [1, 5])
@pytest.mark.parametrize("ref_cls", [R.SoapV1Ref, R.SoapV2Ref], ids=["v1", "v2"])
def test_soap_two_sided_on_rectangular_matrices(ref_cls, freq):
    """At the default max_dim every side of a rectangular matrix (and each of a conv kernel's four)
    is rotated; the one arbitrary piece, the first basis of a rank-deficient factor, is checked and
    handed over after step 1 so that the 59 steps after compare everything else."""
    ours, theirs = twin_params(RECT, torch.float64)
    start = {n: t.detach().clone() for n, t in theirs.items()}
    opt = soapdsl.build("soap", list(ours.items()), freq=freq)
    ref = ref_cls(list(theirs.values()), precondition_frequency=freq)
    lockstep([opt, ref], [ours, theirs], RECT, 1, seed=1, dtype=torch.float64)
    _hand_over_first_bases(opt, ref, ours, theirs)
    lockstep([opt, ref], [ours, theirs], RECT, 59, seed=2, dtype=torch.float64)
    assert worst_moved_err(ours, theirs, start) < 1e-10


def test_soap_fp32_square_and_vector():
    """In fp32 the well-conditioned shapes agree to 5e-4 of the movement (7.6e-5 seen).

    (Tall and wide SOAP is rounding-sensitive in any fp32 implementation: the larger factor
    starts rank-deficient, so its null-space basis is arbitrary; the float64 tests above are the
    equality check for those shapes.)
    """
    err = race(
        "soap",
        {"freq": 5},
        R.SoapV1Ref,
        {"precondition_frequency": 5},
        {"square": (8, 8), "vector": (7,)},
        dtype=torch.float32,
    )
    assert err < 5e-4


def test_soap_with_max_dim_zero_is_adam_with_soap_conventions():
    err = race(
        "soap",
        {"max_dim": 0, "lr": 1e-2},
        R.AdamSoapConventionsRef,
        {"lr": 1e-2, "betas": (0.95, 0.95), "eps": 1e-8, "weight_decay": 0.01},
        ALL,
    )
    assert err < 1e-12


def test_soap_first_step_changes_nothing():
    p = torch.nn.Parameter(torch.randn(4, 3))
    before = p.detach().clone()
    opt = soapdsl.build("soap", [("w", p)])
    p.grad = torch.randn(4, 3)
    opt.step()
    assert torch.equal(p, before)
    assert float(opt.state[p]["step"]) == 0.0
    assert opt.state[p]["0.rotate.ready"] is True
    assert torch.count_nonzero(opt.state[p]["0.0.momentum.buf"]) == 0


def test_soap_bases_stay_orthonormal():
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = soapdsl.build("soap", [("w", p)], freq=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(31):
        p.grad = torch.randn(16, 8, generator=g)
        opt.step()
    for k, d in ((0, 16), (1, 8)):
        q = opt.state[p][f"0.rotate.Q{k}"]
        torch.testing.assert_close(q.T @ q, torch.eye(d), atol=1e-5, rtol=0)


# -- the SOAP family: the factors' decay is resolved at a parameter's first step ----------------

SHARED = {"blocks.0.fc.weight": (6, 10), "blocks.1.fc.weight": (6, 10), "blocks.0.proj.weight": (10, 6)}
SQUARE = {"a": (6, 6), "b": (8, 8), "vector": (7,), "over_max_dim": (12, 5)}


def _shared_groups(ps):
    return {"groups": [[ps["blocks.0.fc.weight"], ps["blocks.1.fc.weight"]]], "precondition_frequency": 5}


@pytest.mark.parametrize(
    ("recipe", "kw", "ref_cls", "ref_kw", "shapes"),
    [
        ("soap", {"freq": 5, "max_dim": 8}, R.SoapV1Ref, {"precondition_frequency": 5, "max_precond_dim": 8}, ALL),
        (
            "psoap",
            {"freq": 5, "max_dim": 8, "p": 0.5},
            V.PSoapRef,
            {"precondition_frequency": 5, "max_precond_dim": 8, "power": 0.5},
            ALL,
        ),
        ("soap_muon", {"freq": 5}, R.SoapMuonRef, {"precondition_frequency": 5}, MATS),
        ("soap_muon_shared", {"freq": 5}, V.SharedSoapMuonRef, _shared_groups, SHARED),
        (
            "soap_soap",
            {"freq": 4, "max_dim": 8},
            V.SoapSoapRef,
            {"precondition_frequency": 4, "max_precond_dim": 8},
            SQUARE,
        ),
        (
            "soap_ademamix",
            {"freq": 5, "max_dim": 8},
            V.SoapAdEMAMixRef,
            {"precondition_frequency": 5, "max_precond_dim": 8},
            ALL,
        ),
    ],
    ids=["soap", "psoap", "soap_muon", "soap_muon_shared", "soap_soap", "soap_ademamix"],
)
def test_beta2_change_mid_run_keeps_the_factor_decay(recipe, kw, ref_cls, ref_kw, shapes):
    """beta2 goes from 0.95 to 0.99 at step 12 of 30 (a beta2 schedule). ALGORITHMS.md 2.2: the
    state caches "the resolved shampoo_beta" (beta2, as shampoo_beta is -1) at the parameter's
    first step, so the Kronecker factors keep decaying with 0.95 while Adam's second moment
    follows the new beta2. The references cache it so."""
    ours, theirs = twin_params(shapes, torch.float64)
    start = {n: t.detach().clone() for n, t in theirs.items()}
    opt = soapdsl.build(recipe, list(ours.items()), **kw)
    ref = ref_cls(list(theirs.values()), **(ref_kw(theirs) if callable(ref_kw) else ref_kw))
    lockstep([opt, ref], [ours, theirs], shapes, 12, seed=1, dtype=torch.float64)
    for group in opt.param_groups:
        group["beta2"] = 0.99
    for group in ref.param_groups:
        group["betas"] = (group["betas"][0], 0.99, *group["betas"][2:])
    lockstep([opt, ref], [ours, theirs], shapes, 18, seed=2, dtype=torch.float64)
    assert worst_moved_err(ours, theirs, start) < 1e-10


# -- SOAP-Muon --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": False, "weight_decay": 0.1}, {"beta1": 0.9, "beta2": 0.98, "ns_steps": 5, "cleanup": 0}],
    ids=["defaults", "no-nesterov+wd", "betas+ns5"],
)
def test_soap_muon_equals_reference(options):
    ref_kw = {"precondition_frequency": 5}
    for ours, theirs in (
        ("nesterov", "nestrov"),
        ("weight_decay", "weight_decay"),
        ("ns_steps", "newton_schulz_steps"),
        ("cleanup", "cleanup_steps"),
    ):
        if ours in options:
            ref_kw[theirs] = options[ours]
    if "beta1" in options:
        ref_kw["betas"] = (options["beta1"], options["beta2"])
    err = race("soap_muon", {"freq": 5, **options}, R.SoapMuonRef, ref_kw, MATS)
    assert err < 1e-10


def test_soap_muon_over_max_dim_branch():
    """soap_muon10's branch for a hidden matrix with a dim >= max_dim (RMS-1 update)."""
    err = race(
        "soap_muon",
        {"freq": 5, "max_dim": 8},
        R.SoapMuonRef,
        {"precondition_frequency": 5, "max_precond_dim": 8},
        {"big": (12, 5), "square": (6, 6)},
    )
    assert err < 1e-10


OVER = {"wide": (9, 10), "tall": (11, 9), "square": (9, 9), "one_over": (12, 5), "at": (8, 6), "small": (6, 6)}
OVER_SHARED = {"blocks.0.fc.weight": (9, 10), "blocks.1.fc.weight": (9, 10), "blocks.0.proj.weight": (11, 9)}


@pytest.mark.parametrize(
    ("recipe", "ref_cls", "ref_kw", "shapes"),
    [
        ("soap_muon", R.SoapMuonRef, {}, OVER),
        (
            "soap_muon_shared",
            V.SharedSoapMuonRef,
            lambda ps: {"groups": [[ps["blocks.0.fc.weight"], ps["blocks.1.fc.weight"]]]},
            OVER_SHARED,
        ),
    ],
    ids=["soap_muon", "soap_muon_shared"],
)
def test_soap_muon_rotates_the_smaller_side_whatever_its_size(recipe, ref_cls, ref_kw, shapes):
    """ALGORITHMS.md 3.3: the "std" projection factors the smaller side, with no size bound (the
    downgrade to one side or none is "full"'s only); soap_muon10's branch for a matrix with a dim
    >= max_dim then runs in that one-sided basis, also when both dims are >= max_dim (here 8), and
    when the larger dim equals max_dim (3.6's guard for the main branch is max(m, n) < 10000)."""

    def kw(ps):
        return {"precondition_frequency": 5, "max_precond_dim": 8, **(ref_kw(ps) if callable(ref_kw) else ref_kw)}

    assert race(recipe, {"freq": 5, "max_dim": 8}, ref_cls, kw, shapes) < 1e-10


def test_soap_muon_at_full_width_equals_reference():
    """Newton-Schulz by halves (from 256 rows on a CPU) inside SOAP-Muon, in float64."""
    mats = {"wide": (256, 320), "tall": (384, 256)}
    err = race("soap_muon", {"freq": 3}, R.SoapMuonRef, {"precondition_frequency": 3}, mats, steps=7)
    assert err < 1e-10


@pytest.mark.parametrize("evaluation", ["iterated", "spectral"])
def test_soap_muon_fp32(evaluation, request):
    """In fp32 against the fp32 loop. "spectral": Newton-Schulz evaluated from the eigenvalues of
    X X^T, which soap_muon runs on a CPU for fp32 matrices from 128 rows (forced here on the
    small ones): 8.0e-7 seen, against 1.0e-6 iterated."""
    calls = request.getfixturevalue("spectral_everywhere") if evaluation == "spectral" else None
    err = race("soap_muon", {"freq": 5}, R.SoapMuonRef, {"precondition_frequency": 5}, MATS, dtype=torch.float32)
    assert err < 1e-5  # 1.0e-6 seen
    assert calls is None or calls  # the spectral runs did take the spectral form


def test_soap_muon_routes_vectors_embeddings_and_head_to_adam():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.hidden = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 20, bias=False)

    net = Net()
    opt = soapdsl.build("soap_muon", net)
    routes = {e.name: opt.plan.routes[e.route].selector for e in opt.plan.params}
    assert routes["embed.weight"].startswith('"*embed*"')
    assert routes["lm_head.weight"].startswith('"*lm_head*"')
    assert routes["hidden.weight"] == "matrix and max_dim < max_dim"
    assert routes["hidden.bias"] == "default"
    lrs = {g["route"]: g["lr"] for g in opt.param_groups}
    assert lrs['"*embed*" or "*wte*" or "*wpe*"'] == 0.4
    # the 1-D route is torch's Adam with betas (0.9, 0.95)
    bias = net.hidden.bias
    twin = torch.nn.Parameter(bias.detach().clone())
    ref = torch.optim.Adam([twin], lr=4e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        twin.grad = bias.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(bias.detach(), twin.detach(), rtol=1e-5, atol=1e-7)


# -- Muon -------------------------------------------------------------------------------------


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_muon_equals_fp32_loop_reference(adjust):
    kw = {"weight_decay": 0.1, **({"adjust_lr": adjust} if adjust else {})}
    err = race("muon", kw, R.MuonRef, {"weight_decay": 0.1, "adjust_lr_fn": adjust}, MATS, dtype=torch.float32)
    assert err < 1e-5  # 1.4e-6 seen


def test_muon_at_full_width_equals_fp32_loop_reference():
    """From 256 rows a CPU computes Newton-Schulz's symmetric products by halves: still the fp32
    loop's iteration. Two same-shape wide matrices share a batch; the tall one is transposed."""
    mats = {"wide": (256, 320), "wide2": (256, 320), "tall": (384, 256)}
    kw = {"weight_decay": 0.1}
    assert race("muon", kw, R.MuonRef, kw, mats, steps=8, dtype=torch.float32) < 5e-5  # 6.1e-6 seen


def test_muon_float64_is_exact():
    err = race("muon", {}, R.MuonRef, {"ns_dtype": torch.float64}, MATS)
    assert err < 1e-12


def test_muon_gram_form_equals_the_loop_reference():
    """ns_form=gram rearranges the iteration (tall and wide MATS take it, the square one does not):
    exact in float64, and at the standard form's fp32 level against the fp32 loop."""
    assert race("muon", {"ns_form": "gram"}, R.MuonRef, {"ns_dtype": torch.float64}, MATS) < 1e-12
    kw = {"weight_decay": 0.1}
    assert race("muon", {"ns_form": "gram", **kw}, R.MuonRef, kw, MATS, dtype=torch.float32) < 1e-5  # 9.4e-7 seen


def test_soap_muon_gram_form_equals_reference():
    ref_kw = {"precondition_frequency": 5}
    assert race("soap_muon", {"freq": 5, "ns_form": "gram"}, R.SoapMuonRef, ref_kw, MATS) < 1e-10


@needs_torch_muon
def test_muon_bf16_within_the_noise_between_independent_implementations():
    """torch.optim.Muon iterates in bf16 with fused addmm; any independent bf16 implementation
    differs from it by rounding. The loop reference (one rounding per op) shows that noise; ours
    (batched, bf16) must stay within the same bound."""
    noise = muon_vs_torch(lambda ps: R.MuonRef([p for _, p in ps], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16))
    ours = muon_vs_torch(lambda ps: soapdsl.build("muon", ps, lr=0.02, weight_decay=0.1, ns_dtype="bf16"))
    assert noise < 2e-3  # observed ~1e-3: the size of bf16 rounding differences
    assert ours < 2e-3


def _torch_muon_ns_in_input_dtype(params, **kw):
    """torch.optim.Muon itself, its Newton-Schulz run in the update's dtype (torch's code, not a copy)."""
    return peers.Patched(torch.optim.Muon(params, **kw), *peers.torch_ns_patch())


TORCH_MUON_OPTIONS = [
    ({}, {}),
    ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    ({"nesterov": False, "momentum": 0.9}, {"nesterov": False, "momentum": 0.9}),
    ({"ns_steps": 3, "lr": 0.05}, {"ns_steps": 3, "lr": 0.05}),
    ({"adjust_lr": "match_rms_adamw", "weight_decay": 0.1}, {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.1}),
]


@needs_torch_muon
@pytest.mark.parametrize(("ours", "theirs"), TORCH_MUON_OPTIONS, ids=["defaults", "wd", "no_nesterov", "ns3", "rms"])
def test_muon_equals_torch_muon_in_float64(ours, theirs):
    """Against torch.optim.Muon itself (not a reference written here), with torch's Newton-Schulz
    run in float64: the momentum, the Nesterov look-ahead, the order of decay and update, the
    shape rule and ns_steps all have to be torch's for the two to agree to rounding."""
    theirs = {"lr": 0.02, "weight_decay": 0.0, **theirs}
    err = race("muon", ours, _torch_muon_ns_in_input_dtype, theirs, MATS, steps=30)
    assert err < 1e-10  # 3.6e-15 seen


@needs_torch_muon
def test_muon_equals_torch_muon_in_float32():
    """The same in fp32, at full width: our batched (and, from 256 rows, halved) iteration against
    torch's per-matrix addmm iteration in fp32."""
    mats = {"wide": (256, 320), "wide2": (256, 320), "tall": (384, 256), "small": (24, 10)}
    kw = {"lr": 0.02, "weight_decay": 0.1}
    assert race("muon", kw, _torch_muon_ns_in_input_dtype, kw, mats, steps=8, dtype=torch.float32) < 5e-5  # 6.3e-6 seen


@needs_torch_muon
def test_muon_torch_patch_changes_only_the_dtype():
    """The patch the comparisons above rely on: torch's function on the patched view equals the bf16
    original up to bf16 rounding, and runs in fp64 when handed fp64."""
    g = torch.randn(12, 7, dtype=torch.float64)
    coeffs = (3.4445, -4.7750, 2.0315)
    ours = peers.torch_ns_in_input_dtype(g, coeffs, 5, 1e-7)
    bf16 = torch.optim._muon._zeropower_via_newtonschulz(g, coeffs, 5, 1e-7)
    assert ours.dtype == torch.float64 and type(ours) is torch.Tensor and bf16.dtype == torch.bfloat16
    assert 0 < float((ours - bf16.double()).abs().max()) < 0.05


def test_muon_routes():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.conv = torch.nn.Conv2d(2, 4, 3)
            self.fc = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 10)

    opt = soapdsl.build("muon", Net())
    routes = {e.name: e.route for e in opt.plan.params}
    muon_route = next(r.index for r in opt.plan.routes if r.selector == "ndim >= 2")
    assert routes["conv.weight"] == muon_route and routes["fc.weight"] == muon_route
    assert routes["embed.weight"] != muon_route and routes["head.weight"] != muon_route
    assert routes["fc.bias"] != muon_route


class _RoutedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6, dtype=torch.float64)
        self.fc = torch.nn.Linear(6, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, 10, dtype=torch.float64)


# recipe, its build options, and the Adam each non-hidden parameter must follow: name -> (lr, betas, eps, wd)
_ADAM_ROUTES = [
    (
        "muon",
        {},
        dict.fromkeys(["embed.weight", "head.weight", "head.bias", "fc.bias"], (3e-4, (0.9, 0.95), 1e-10, 0.0)),
    ),
    (
        "muon",
        {"adam_lr": 1e-3, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_eps": 1e-8, "adam_weight_decay": 0.1},
        dict.fromkeys(["embed.weight", "head.weight", "head.bias", "fc.bias"], (1e-3, (0.8, 0.99), 1e-8, 0.1)),
    ),
    *[
        (
            recipe,
            {},
            {
                "embed.weight": (0.4, (0.9, 0.95), 1e-8, 0.0),
                "head.weight": (4e-3, (0.9, 0.95), 1e-8, 0.0),
                "head.bias": (4e-3, (0.9, 0.95), 1e-8, 0.0),
                "fc.bias": (4e-3, (0.9, 0.95), 1e-8, 0.0),
            },
        )
        for recipe in ("soap_muon", "soap_muon_shared")
    ],
    (
        "soap_muon",
        {"embed_lr": 0.1, "head_lr": 2e-3, "adam_lr": 1e-3, "adam_beta2": 0.99},
        {
            "embed.weight": (0.1, (0.9, 0.99), 1e-8, 0.0),
            "head.weight": (2e-3, (0.9, 0.99), 1e-8, 0.0),
            "head.bias": (2e-3, (0.9, 0.99), 1e-8, 0.0),
            "fc.bias": (1e-3, (0.9, 0.99), 1e-8, 0.0),
        },
    ),
]


@pytest.mark.parametrize(
    ("recipe", "kw", "adam"), _ADAM_ROUTES, ids=["muon", "muon_adam_opts", "soap_muon", "shared", "lrs"]
)
def test_embedding_head_and_vectors_follow_torch_adamw(recipe, kw, adam):
    """The routes around the hidden matrices: embeddings, the head and 1-D parameters step as
    torch.optim.AdamW with the recipe's adam_* settings and per-route learning rates, also under an
    lr scheduler (which scales each route's own lr), to rounding in float64 over 40 steps."""
    torch.manual_seed(0)
    ours_net = _RoutedNet()
    ref_net = _RoutedNet()
    ref_net.load_state_dict(ours_net.state_dict())
    named_ref = dict(ref_net.named_parameters())
    start = {n: p.detach().clone() for n, p in named_ref.items()}
    opt = soapdsl.build(recipe, ours_net, **kw)
    groups = [
        {"params": [named_ref[n]], "lr": lr, "betas": betas, "eps": eps, "weight_decay": wd}
        for n, (lr, betas, eps, wd) in adam.items()
    ]
    ref = torch.optim.AdamW(groups, foreach=False)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + 0.05 * t)) for o in (opt, ref)]
    g = torch.Generator().manual_seed(3)
    ours_params = dict(ours_net.named_parameters())
    for _ in range(40):
        for n, p in ours_params.items():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            named_ref[n].grad = p.grad.clone()
        opt.step()
        ref.step()
        for sched in schedules:
            sched.step()
    assert set(adam) == {n for n in ours_params if n != "fc.weight"}
    ours = {n: ours_params[n] for n in adam}
    theirs = {n: named_ref[n] for n in adam}
    assert worst_moved_err(ours, theirs, start) < 1e-12


# -- Shampoo ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "ref_options"),
    [
        ({}, {}),
        (
            {"exponent": "power_half", "freq": 3, "start": 4, "weight_decay": 0.1, "eps": 1e-6},
            {
                "exponent": "power_half",
                "precondition_frequency": 3,
                "start_preconditioning_step": 4,
                "weight_decay": 0.1,
                "epsilon": 1e-6,
            },
        ),
        (
            {"exponent": 0.3, "beta2": 1.0, "max_dim": 8},
            {"exponent": 0.3, "betas": (0.95, 1.0), "max_preconditioner_dim": 8},
        ),
        (
            {"freq": 4, "start": 2, "eps": 1e-6},
            {"precondition_frequency": 4, "start_preconditioning_step": 2, "epsilon": 1e-6},
        ),
        ({"freq": 5, "start": 12}, {"precondition_frequency": 5, "start_preconditioning_step": 12}),
        (
            # the first root once the merged 30-vector's factor has full rank (as start=12 above)
            {"merge_dims": True, "max_dim": 30, "freq": 5, "start": 35, "eps": 1e-6},
            {
                "use_merge_dims": True,
                "max_preconditioner_dim": 30,
                "precondition_frequency": 5,
                "start_preconditioning_step": 35,
                "epsilon": 1e-6,
            },
        ),
    ],
    ids=[
        "defaults",
        "power_half+start",
        "adagrad+numeric-exponent+max_dim",
        "start<freq",
        "start=12,freq=5",
        "merge_dims",
    ],
)
def test_shampoo_equals_reference(options, ref_options):
    """The preconditioner starts at step `start` even when it is not a multiple of freq (then
    at the multiples of freq), as DistributedShampoo does. An early start gets eps 1e-6: at
    step 2 or 4 the factors are rank-deficient, and eps 1e-12 would amplify rounding ~1e6."""
    err = race(
        "shampoo",
        options,
        R.ShampooRef,
        ref_options,
        {**MATS, "vector": (7,), "conv": (3, 2, 3, 3), "over_max_dim": (12, 5), "small": (5, 6), "column": (3, 1)},
    )
    assert err < 1e-10


SMALL_EPS = {"eps": 1e-2, "freq": 3}  # eps near the factors' eigenvalues, where the bias correction shows
SMALL_EPS_REF = {"epsilon": 1e-2, "precondition_frequency": 3}


def test_shampoo_bias_corrects_its_factors_before_eps():
    """DistributedShampoo (use_bias_correction=True, its default) takes the root of F / (1 - b2^t)
    plus eps; soapdsl added eps to F itself, which only eps ever showed (graft rescales the rest)."""
    shapes = {**MATS, "vector": (7,)}
    assert race("shampoo", SMALL_EPS, R.ShampooRef, SMALL_EPS_REF, shapes) < 1e-10
    # the check can fail: without the correction the reference moves the parameters elsewhere
    uncorrected = {**SMALL_EPS_REF, "use_bias_correction": False}
    assert race("shampoo", SMALL_EPS, R.ShampooRef, uncorrected, shapes) > 1e-3


def test_shampoo_merge_dims_is_distributed_shampoos_rule():
    """use_merge_dims: the next dim joins when either is 1 or the product is <= max_dim, and the
    exponent is the merged tensor's (a merged matrix is a vector: 1/2 for classic)."""
    opt = soapdsl.build("shampoo", [("w", torch.nn.Parameter(torch.zeros(2)))], merge_dims=True, max_dim=30)
    op = opt.plan.routes[0].ops[3]
    assert op.name == "shampoo"
    cases = {(5, 6): (30,), (5, 7): (5, 7), (700, 1, 30): (700, 30), (1, 40): (40,), (3, 2, 3, 3): (18, 3), (9,): (9,)}
    assert {shape: op.merged(shape) for shape in cases} == cases
    assert (op.exponent((5, 6)), op.exponent((5, 7))) == (0.5, 0.25)


# -- the card ---------------------------------------------------------------------------------


def test_card_means_what_it_says():
    """rotate(left) |> sqrt_whiten |> newton_schulz(5) |> graft(norm), by hand."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    start = p.detach().clone()
    opt = soapdsl.build("card", [("w", p)], lr=0.1)
    g = torch.randn(6, 10, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    gg = 0.05 * g @ g.T  # EMA with beta2=0.95 from zero
    _, vecs = torch.linalg.eigh(gg + 1e-30 * torch.eye(6, dtype=torch.float64))
    q = vecs.flip(-1)
    x = q.T @ g
    y = x.sign() * x.abs().sqrt()
    y = y * x.norm() / y.norm()
    z = y / (y.norm() + 1e-7)
    for _ in range(5):
        a = z @ z.T
        z = 3.4445 * z + (-4.7750 * a + 2.0315 * a @ a) @ z
    z = z * y.norm() / (z.norm() + 1e-16)
    expected = start - 0.1 * (q @ z)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def _card_reference(params, grads_by_step, lr, gg, q, t0=1, freq=40, beta=0.95):
    """The card as a per-parameter float64 loop from step ``t0``: left factor EMA ``gg`` (by
    name), first basis by eigh (a name missing from ``q``), SOAP's QR refresh every ``freq``
    steps after the update, and inside the basis the signed square root (norm restored), 5
    quintic Newton-Schulz steps and the norm grafted back."""
    for t, grads in enumerate(grads_by_step, start=t0):
        for n, p in params.items():
            g = grads[n].reshape(grads[n].shape[0], -1)
            first = n not in q
            if first:
                gg[n] = (1 - beta) * g @ g.T
                q[n] = torch.linalg.eigh(gg[n] + 1e-30 * torch.eye(len(g), dtype=g.dtype))[1].flip(-1)
            x = q[n].T @ g
            y = x.sign() * x.abs().sqrt()
            y = y * x.norm() / y.norm()
            tall = y.shape[0] > y.shape[1]
            z = y.T if tall else y
            z = z / (z.norm() + 1e-7)
            for _ in range(5):
                a = z @ z.T
                z = 3.4445 * z + (-4.7750 * a + 2.0315 * a @ a) @ z
            z = z.T if tall else z
            z = z * y.norm() / (z.norm() + 1e-16)
            p.sub_(lr * (q[n] @ z).reshape(p.shape))
            if not first:
                gg[n] = beta * gg[n] + (1 - beta) * g @ g.T
            if t % freq == 0:
                est = torch.diagonal(q[n].T @ gg[n] @ q[n])
                order = torch.argsort(est, descending=True, stable=True)
                q[n] = torch.linalg.qr(gg[n] @ q[n][:, order]).Q


CARD_GRADS = [
    {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    for g, shapes in [(torch.Generator().manual_seed(1), {"wide": (6, 10), "square": (5, 5), "conv": (4, 3, 2, 2)})]
    for _ in range(100)
]


def test_card_over_many_steps_equals_a_loop():
    """100 steps (refreshes at t = 40 and 80) on shapes whose left factor is full rank from the
    first gradient (wide, square, a conv kernel as [4, 12]), float64."""
    shapes = {n: tuple(t.shape) for n, t in CARD_GRADS[0].items()}
    ours, theirs = twin_params(shapes, torch.float64)
    start = {n: t.detach().clone() for n, t in theirs.items()}
    opt = soapdsl.build("card", list(ours.items()), lr=0.05)
    for grads in CARD_GRADS:
        for n, p in ours.items():
            p.grad = grads[n].clone()
        opt.step()
    with torch.no_grad():
        _card_reference(theirs, CARD_GRADS, lr=0.05, gg={}, q={})
    assert worst_moved_err(ours, theirs, start) < 1e-10


def test_card_on_a_tall_matrix_after_its_first_step_equals_a_loop():
    """A tall matrix's left factor of one gradient is rank-deficient: the null-space columns of
    its first basis are arbitrary, and the square root lifts the rounding noise the gradient
    leaves in them (~1e-17) to ~1e-8 in the first update. So after step 1 the test checks the
    factor and the basis, hands the reference our parameter and basis, and compares 99 steps."""
    g = torch.Generator().manual_seed(2)
    steps = [{"tall": torch.randn(10, 4, generator=g, dtype=torch.float64)} for _ in range(100)]
    p = torch.nn.Parameter(torch.randn(10, 4, generator=g, dtype=torch.float64))
    opt = soapdsl.build("card", [("tall", p)], lr=0.05)
    p.grad = steps[0]["tall"].clone()
    opt.step()
    gg, q = opt.state[p]["0.rotate.GG0"].clone(), opt.state[p]["0.rotate.Q0"].clone()
    g0 = steps[0]["tall"]
    torch.testing.assert_close(gg, 0.05 * g0 @ g0.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(q.T @ q, torch.eye(10, dtype=q.dtype), rtol=0, atol=1e-13)
    assert_descending_eigenbasis(gg, q, 1e-13)
    theirs = {"tall": p.detach().clone()}
    start = theirs["tall"].clone()
    for grads in steps[1:]:
        p.grad = grads["tall"].clone()
        opt.step()
    _card_reference(theirs, steps[1:], lr=0.05, gg={"tall": gg}, q={"tall": q}, t0=2)
    assert worst_moved_err({"tall": p}, theirs, {"tall": start}) < 1e-10


def test_card_pipeline_compiles_verbatim():
    plan = soapdsl.compile(
        "rotate(left, freq=40) |> sqrt_whiten |> newton_schulz(5) |> graft(norm)", [("w", torch.empty(8, 4))]
    )
    (route,) = plan.routes
    rotate = route.route.pipeline.stages[0]
    assert rotate.op == "rotate" and [s.op for s in rotate.body.stages] == ["sqrt_whiten", "newton_schulz", "graft"]


# -- memory: state per parameter matches the formulas of ALGORITHMS.md ---------------------------


@pytest.mark.parametrize(
    ("recipe", "formula"),
    [
        ("adamw", lambda m, n: 2 * m * n),
        ("soap", lambda m, n: 2 * m * n + 2 * (m * m + n * n)),  # 2.6
        ("soap_muon", lambda m, n: 2 * m * n + 2 * min(m, n) ** 2),  # one-sided factor + basis
        ("muon", lambda m, n: m * n),
        ("shampoo", lambda m, n: 2 * m * n + 2 * (m * m + n * n)),  # momentum, graft v, factors, roots
        ("ademamix", lambda m, n: 3 * m * n),
        ("soap_ademamix", lambda m, n: 3 * m * n + 2 * (m * m + n * n)),
        ("psoap", lambda m, n: 2 * m * n + 2 * (m * m + n * n)),
        ("soap_soap", lambda m, n: 3 * m * n + 2 * (m * m + n * n)),
        ("card", lambda m, n: 2 * m * m),
    ],
)
def test_state_bytes_match_memory_formulas(recipe, formula):
    shapes = [("blocks.0.fc.weight", (48, 16)), ("blocks.0.proj.weight", (16, 48)), ("blocks.0.sq.weight", (24, 24))]
    plan = soapdsl.compile(recipe, [(n, torch.empty(s, device="meta")) for n, s in shapes])
    for entry, (_, (m, n)) in zip(plan.params, shapes, strict=True):
        assert entry.state_bytes == 4 * formula(m, n), entry


# -- soapdsl.apply and the SOAP-Muon report's section 1.2 ----------------------------------------


def _power_law_rows(m: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (m, n), generator=g).float() * 2 - 1
    alpha = math.log(100) / math.log(m)
    return sign * (torch.arange(1, m + 1).float() ** -alpha)[:, None]  # max/min row norm = 100


def _row_ratio(u: torch.Tensor) -> float:
    r = u.norm(dim=1)
    return float(r.max() / r.min())


def test_row_norm_figures_of_the_report_square():
    g = _power_law_rows(1000, 1000)
    assert _row_ratio(g) == pytest.approx(100, rel=1e-4)
    assert _row_ratio(soapdsl.apply("newton_schulz(10, cleanup=5)", g)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_row_norm_figures_of_the_report_4_to_1():
    """Report section 1.2: at 4:1 Muon cuts a max/min norm ratio of 100 to about 3.4."""
    ratio = _row_ratio(soapdsl.apply("newton_schulz(10, cleanup=5)", _power_law_rows(4000, 1000)))
    assert 3.2 < ratio < 3.8


def test_apply_refuses_state_and_params():
    with pytest.raises(soapdsl.SoapArgumentError, match="stateless"):
        soapdsl.apply("momentum(0.9) |> sign", torch.ones(3))
    out = soapdsl.apply("sign |> scale(2)", torch.tensor([-3.0, 0.0, 5.0]))
    torch.testing.assert_close(out, torch.tensor([-2.0, 0.0, 2.0]))
    # a written `lr` was dropped without a word, so the result was not what the pipeline says
    with pytest.raises(soapdsl.SoapArgumentError, match="'lr' keeps state or writes the parameter") as e:
        soapdsl.apply("sign |> lr", torch.ones(3))
    assert (e.value.loc.line, e.value.loc.col) == (1, 9)
