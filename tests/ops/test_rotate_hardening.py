"""rotate and shampoo on bad input: non-finite gradients, a failing eigensolver.

A factor that holds a NaN makes ``eigh`` fail; ``step()`` must then raise one SoapArgumentError
naming the parameters, not torch's LinAlgError, and the normal path must never read a tensor
on the host to find out (no device synchronisation per step).
"""

from __future__ import annotations

import pytest
import torch

import soapdsl
from soapdsl.ops import _linalg as la

NAN, INF = float("nan"), float("inf")


def _params(n: int = 2, shape: tuple[int, ...] = (4, 3)) -> list[tuple[str, torch.nn.Parameter]]:
    torch.manual_seed(0)
    return [(f"blocks.{i}.w", torch.nn.Parameter(torch.randn(*shape))) for i in range(n)]


def _step(opt: torch.optim.Optimizer, params: list[tuple[str, torch.nn.Parameter]], bad: dict[str, float]) -> None:
    """One step with random gradients; ``bad`` puts a value into entry [0, 0] of named ones."""
    for name, p in params:
        p.grad = torch.randn_like(p)
        if name in bad:
            p.grad[0, 0] = bad[name]
    opt.step()


@pytest.mark.parametrize("recipe", ["soap", "psoap", "soap_soap", "soap_muon"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_gradient_names_the_parameter(recipe: str, value: float) -> None:
    params = _params()
    opt = soapdsl.build(recipe, params)
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        _step(opt, params, {"blocks.1.w": value})
    msg = str(info.value)
    assert "'rotate' cannot compute the eigenbasis of parameter 'blocks.1.w':" in msg
    assert "'blocks.0.w'" not in msg  # its factor is finite
    assert "non-finite values (NaN or inf) because the gradients were not finite" in msg
    assert "GradScaler" in msg and "clip" in msg
    assert f"recipes/{recipe}.soap:" in msg  # points at the rotate stage
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_first_basis_without_skip_first() -> None:
    """The first basis is computed inside the pipeline when skip_first is off."""
    params = _params(3)
    opt = soapdsl.build("rotate(both, freq=1) { rms_normalize(0.95, 1e-8) } |> lr", params, lr=1e-2)
    with pytest.raises(soapdsl.SoapArgumentError, match=r"parameters 'blocks\.0\.w', 'blocks\.2\.w': their"):
        _step(opt, params, {"blocks.0.w": NAN, "blocks.2.w": NAN})


def test_a_share_group_names_its_members() -> None:
    """Members of a share group have one factor: a NaN in one member's gradient spoils it for all."""
    params = _params(4)
    opt = soapdsl.build("soap_muon_shared", params)
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        _step(opt, params, {"blocks.3.w": NAN})
    msg = str(info.value)
    assert "parameters 'blocks.2.w', 'blocks.3.w': their preconditioner factors hold non-finite" in msg
    assert "'blocks.0.w'" not in msg and "'blocks.1.w'" not in msg


def test_shampoo_inverse_root() -> None:
    """shampoo's factors take the NaN at once; the error comes at the first root computation."""
    params = _params()
    opt = soapdsl.build("shampoo(0.9, freq=2) |> lr", params, lr=1e-2)
    _step(opt, params, {"blocks.0.w": NAN})
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        _step(opt, params, {})
    msg = str(info.value)
    assert "'shampoo' cannot compute the inverse root of parameter 'blocks.0.w': its preconditioner factor" in msg
    assert "'blocks.1.w'" not in msg


@pytest.mark.parametrize("recipe", ["rotate(both, freq=1) { sign } |> lr", "shampoo(0.9, freq=1) |> lr"])
def test_eigensolver_failure_on_a_finite_factor(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """If eigh fails (in float64 too) on a finite factor, the error says so and names the batch."""

    def failing(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    params = _params()
    opt = soapdsl.build(recipe, params, lr=1e-2)
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        _step(opt, params, {})
    msg = str(info.value)
    assert "parameters 'blocks.0.w', 'blocks.1.w'" in msg
    assert "torch.linalg.eigh did not converge on their preconditioner factors, even in float64" in msg
    assert "non-finite" not in msg


@pytest.mark.parametrize(
    "recipe", ["soap", "soap_muon_shared", "rotate(both, freq=2) { sign } |> lr", "shampoo(0.9, freq=2) |> lr"]
)
def test_normal_steps_never_inspect_the_factors(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite gradients: the factors are never read on the host (first basis and refreshes included)."""

    def forbidden(m: torch.Tensor) -> list[int]:
        raise AssertionError("the factors were read on the host on the normal path")

    monkeypatch.setattr(la, "nonfinite", forbidden)
    params = _params()
    opt = soapdsl.build(recipe, params, **({"freq": 2} if "(" not in recipe else {}))
    for _ in range(5):
        _step(opt, params, {})
    assert all(torch.isfinite(p).all() for _, p in params)


def test_nonfinite_indices() -> None:
    m = torch.zeros(4, 2, 2)
    m[1, 0, 1] = NAN
    m[3, 1, 1] = -INF
    assert la.nonfinite(m) == [1, 3]
    assert la.nonfinite(torch.zeros(2, 3, 3)) == []


# -- share groups: the members are stacked, so they must match; frozen members are left out ----


def _shared(*tensors: torch.Tensor) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"blocks.{i}.fc.weight", torch.nn.Parameter(t)) for i, t in enumerate(tensors)]


@pytest.mark.parametrize(
    ("second", "what"),
    [
        (
            torch.zeros(6, 6, dtype=torch.bfloat16),
            "dtype: 'blocks.0.fc.weight' has dtype float32, 'blocks.1.fc.weight' has bfloat16",
        ),
        (torch.zeros(8, 6), "shape: 'blocks.0.fc.weight' has shape [6, 6], 'blocks.1.fc.weight' has [8, 6]"),
        (
            torch.zeros(6, 6, device="meta"),
            "device: 'blocks.0.fc.weight' has device cpu, 'blocks.1.fc.weight' has meta",
        ),
    ],
)
def test_share_group_members_must_match_at_build(second: torch.Tensor, what: str) -> None:
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        soapdsl.build("soap_muon_shared", _shared(torch.zeros(6, 6), second))
    msg = str(info.value)
    assert (
        "'rotate' shares its state between parameters 'blocks.0.fc.weight' and 'blocks.1.fc.weight'"
        f" (share group 'blocks.<0>.fc.weight'), but they differ in {what}; the members of a share"
        " group need equal shapes, dtypes and devices"
    ) in msg
    assert "recipes/soap_muon_shared.soap:" in msg


def test_share_group_needs_a_batched_route() -> None:
    share = r'share="blocks\\.(\\d+)\\."'
    recipe = f"recipe t(lr=0.1):\n  route default [batch=false]: rotate(both, {share}) {{ sign }} |> lr\n"
    with pytest.raises(soapdsl.SoapArgumentError, match=r"but the route has \[batch=false\]"):
        soapdsl.build(recipe, _shared(torch.zeros(4, 3), torch.zeros(4, 3)))


@pytest.mark.parametrize("frozen", [0, 1])
def test_a_frozen_member_is_left_out(frozen: int) -> None:
    """A member frozen at build never steps and holds nothing: the other trains as if alone."""
    torch.manual_seed(0)
    w = [torch.randn(6, 5), torch.randn(6, 5)]
    params = _shared(*w)
    params[frozen][1].requires_grad_(False)
    train = params[1 - frozen]
    alone = [(train[0], torch.nn.Parameter(w[1 - frozen].clone()))]
    opts = [soapdsl.build("soap_muon_shared", params, freq=2), soapdsl.build("soap_muon_shared", alone, freq=2)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(6, 5, generator=g)
        train[1].grad, alone[0][1].grad = grad.clone(), grad.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(train[1], alone[0][1], rtol=0, atol=0)
    assert not opts[0].state[params[frozen][1]]
    assert "0.rotate.GG1" in opts[0].state[train[1]]
    restored = soapdsl.build("soap_muon_shared", params, freq=2)
    restored.load_state_dict(opts[0].state_dict())  # the same member holds the state after a reload


def test_a_member_unfrozen_later_must_step_with_its_group() -> None:
    params = _shared(torch.randn(6, 6), torch.randn(6, 6))
    params[0][1].requires_grad_(False)
    opt = soapdsl.build("soap_muon_shared", params)
    params[1][1].grad = torch.randn(6, 6)
    opt.step()
    params[0][1].requires_grad_(True)
    for _, p in params:
        p.grad = torch.randn(6, 6)
    with pytest.raises(soapdsl.SoapArgumentError) as info:
        opt.step()
    msg = str(info.value)
    assert "held by 'blocks.1.fc.weight', but 'blocks.0.fc.weight' stepped without 'blocks.1.fc.weight'" in msg
    assert "frozen when the optimizer was built, which is left out (and must stay frozen)" in msg
