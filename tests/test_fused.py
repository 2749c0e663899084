"""Adam-shaped routes lower to torch's fused AdamW kernel (soapdsl/runtime/fused.py).

The fused path must give what the stage-by-stage path gives (up to the kernel's rounding), be
bit-identical to ``torch.optim.AdamW(fused=True)``, and step aside whenever a recipe or a
param_group leaves Adam's exact shape.
"""

from __future__ import annotations

import pytest
import torch

import soapdsl

SHAPES = [(6, 5), (5,), (3, 2, 2), ()]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(steps: int, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads, schedule=None) -> None:
    for k, gs in enumerate(grads):
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        if schedule is not None:
            schedule(opt, k)
        opt.step()


def _route(opt) -> soapdsl.compiler.RoutePlan:  # type: ignore[name-defined]
    (rp,) = opt._routes
    return rp


def test_adamw_lowers_to_the_fused_kernel() -> None:
    opt = soapdsl.build("adamw", _params())
    assert _route(opt).fused is not None
    text = soapdsl.compile("adamw", _params()).to_text()
    assert "torch's fused AdamW kernel" in text


def test_bit_identical_to_torch_fused_adamw() -> None:
    ours, theirs = _params(), _params()
    grads = _grads(25)
    kw = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}

    def lr_decay(opt, k):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.9**k

    opt = soapdsl.build("adamw", ours, lr=kw["lr"], beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    _run(opt, ours, grads, lr_decay)
    _run(torch.optim.AdamW(theirs, fused=True, **kw), theirs, grads, lr_decay)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)


def test_adam_with_l2_bit_identical_to_torch_fused_adam() -> None:
    ours, theirs = _params(), _params()
    grads = _grads(25)
    opt = soapdsl.build("adam", ours, lr=2e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    assert "fused Adam kernel" in soapdsl.compile("adam", _params()).to_text()
    _run(opt, ours, grads)
    _run(torch.optim.Adam(theirs, fused=True, lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), theirs, grads)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "pipeline", ["adamw", "adam |> lr", "decay(0.05) |> adam(0.85, 0.98, 1e-7) |> lr", "l2(0.05) |> adam |> lr"]
)
def test_fused_equals_stage_by_stage(pipeline: str, dtype: torch.dtype) -> None:
    fused, staged = _params(dtype), _params(dtype)
    grads = _grads(30, dtype)
    a = soapdsl.build(f"recipe r(lr=1e-2):\n  route default: {pipeline}", fused)
    b = soapdsl.build(f"recipe r(lr=1e-2):\n  route default [fused=false]: {pipeline}", staged)
    assert _route(a).fused is not None and _route(b).fused is None
    _run(a, fused, grads)
    _run(b, staged, grads)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
    for p, q in zip(fused, staged, strict=True):
        torch.testing.assert_close(p, q, **tol)
        assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == 30
        for key in a.state[p]:
            torch.testing.assert_close(a.state[p][key], b.state[q][key], **tol)


@pytest.mark.parametrize(
    "pipeline",
    [
        "momentum(0.9, nesterov=true) |> rms_normalize(0.999, 1e-8) |> bias_correct(0.9) |> lr",
        "momentum(0.9) |> rms_normalize(0.999, 1e-8, eps_at=raw) |> bias_correct(0.9) |> lr",
        "momentum(0.9) |> rms_normalize(0.999, 1e-8, correct=false) |> bias_correct(0.9) |> lr",
        "momentum(0.9) |> rms_normalize(0.999, 1e-8, power=0.5) |> bias_correct(0.9) |> lr",
        "momentum(0.9, kind=sgd) |> rms_normalize(0.999, 1e-8) |> bias_correct(0.9) |> lr",
        "momentum(0.9) |> rms_normalize(0.999, 1e-8) |> bias_correct(0.9, enabled=false) |> lr",
        "decay(0.1, lr_scaled=false) |> adam |> lr",
        "adam |> lr |> decay(0.1)",
        "decay(0.1) |> l2(0.1) |> adam |> lr",
        "adam |> sign |> lr",
    ],
)
def test_other_shapes_do_not_lower(pipeline: str) -> None:
    assert _route(soapdsl.build(pipeline, _params())).fused is None


def test_compiled_route_is_not_lowered() -> None:
    opt = soapdsl.build("recipe r(lr=1e-3):\n  route default [compile=true]: adamw", _params())
    assert _route(opt).fused is None


@pytest.mark.parametrize(("b1", "b2"), [(0.5, 0.0), (0.9, 0.9)], ids=["beta1", "beta2"])
def test_values_that_leave_adam_fall_back_each_step(b1: float, b2: float) -> None:
    """bias_correct's beta1 differs from the momentum's, or it has a second-moment factor
    sqrt(1 - beta2^t) that Adam's kernel does not apply: the route matches structurally, but
    every step takes the stage-by-stage path, and its numbers (checked against a hand loop)."""
    pipeline = f"momentum(0.9) |> rms_normalize(0.99, 1e-8) |> bias_correct({b1}, {b2}) |> lr"
    params = _params(torch.float64)
    grads = _grads(5, torch.float64)
    opt = soapdsl.build(pipeline, params, lr=0.1)
    assert _route(opt).fused is not None
    start = [p.detach().clone() for p in params]
    _run(opt, params, grads)
    for i, p0 in enumerate(start):
        m = torch.zeros_like(p0)
        v = torch.zeros_like(p0)
        p = p0.clone()
        for t, gs in enumerate(grads, start=1):
            g = gs[i]
            m = 0.9 * m + 0.1 * g
            v = 0.99 * v + 0.01 * g * g
            denom = v.sqrt() / (1 - 0.99**t) ** 0.5 + 1e-8
            p = p - 0.1 * (1 - b2**t) ** 0.5 / (1 - b1**t) * m / denom
        torch.testing.assert_close(params[i].detach(), p, rtol=1e-12, atol=1e-14)


def test_mixed_precision_parameters_take_the_stage_path() -> None:
    """bf16 parameters keep fp32 state, which the fused kernel cannot take: same numbers as
    the explicit stage-by-stage route."""
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    grads = _grads(6, torch.bfloat16)
    fused = soapdsl.build("adamw", a)
    staged = soapdsl.build("recipe r(lr=1e-3):\n  route default [fused=false]: adamw", b)
    _run(fused, a, grads)
    _run(staged, b, grads)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_identically() -> None:
    a, b = _params(), _params()
    grads = _grads(20)
    opt_a = soapdsl.build("adamw", a)
    _run(opt_a, a, grads[:10])
    opt_b = soapdsl.build("adamw", b)
    with torch.no_grad():
        for p, q in zip(a, b, strict=True):
            q.copy_(p)
    opt_b.load_state_dict(opt_a.state_dict())
    _run(opt_a, a, grads[10:])
    _run(opt_b, b, grads[10:])
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_parameters_that_skip_steps_keep_their_own_count() -> None:
    """A parameter without a gradient at a step forms its own cohort: its bias correction
    follows its own step count on the fused path too."""
    params = _params(torch.float64)
    twins = _params(torch.float64)
    grads = _grads(8, torch.float64)
    a = soapdsl.build("adamw", params)
    b = soapdsl.build("recipe r(lr=1e-3):\n  route default [fused=false]: adamw", twins)
    for k, gs in enumerate(grads):
        for ps in (params, twins):
            for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
                p.grad = None if (i == 0 and k % 3 == 1) else g.clone()
        a.step()
        b.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
    assert float(a.state[params[0]]["step"]) == 5 and float(a.state[params[1]]["step"]) == 8


def test_channels_last_weights_match_the_stage_path() -> None:
    """A channels_last conv weight has other strides than its (contiguous) state tensors: the
    kernel must still pair the right elements."""

    def weight() -> torch.nn.Parameter:
        g = torch.Generator().manual_seed(0)
        return torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last))

    a, b = weight(), weight()
    fused = soapdsl.build("adamw", [a], lr=0.1)
    staged = soapdsl.build("recipe r(lr=0.1):\n  route default [fused=false]: adamw", [b])
    assert _route(fused).fused is not None
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
        a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        staged.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _torch_adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """The reference: torch's single-tensor AdamW, which indexes every tensor logically."""
    return torch.optim.AdamW(params, lr=lr, foreach=False)


@pytest.mark.parametrize(
    ("param_layout", "grad_layout"),
    [("channels_last", "contiguous"), ("contiguous", "channels_last"), ("transposed", "contiguous")],
)
def test_gradients_laid_out_unlike_their_parameter_give_adams_numbers(param_layout: str, grad_layout: str) -> None:
    """The kernel pairs parameter, gradient and moments by memory position: a gradient with
    other strides than its parameter (set by hand) must take the stage path, not be added to
    the wrong entries."""

    def lay(t: torch.Tensor, layout: str) -> torch.Tensor:
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":  # a [4, 18] view of an [18, 4] tensor, strides (1, 4)
            return t.reshape(4, 18).t().contiguous().t()
        return t.contiguous()

    shape = (4, 2, 3, 3) if "channels_last" in (param_layout, grad_layout) else (4, 18)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = torch.nn.Parameter(lay(w0.clone(), param_layout))
    ref = torch.nn.Parameter(w0.clone())
    opt, ref_opt = soapdsl.build("adamw", [("w", ours)], lr=0.1), _torch_adamw([ref], 0.1)
    for grad in grads:
        ours.grad, ref.grad = lay(grad.clone(), grad_layout), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(opt.state[ours]["1.momentum.buf"], ref_opt.state[ref]["exp_avg"])
    torch.testing.assert_close(opt.state[ours]["2.rms_normalize.v"], ref_opt.state[ref]["exp_avg_sq"])


def _conv_net(layout: torch.memory_format) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).double()
    return net.to(memory_format=layout)


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, xs: list[torch.Tensor]) -> None:
    for x in xs:
        opt.zero_grad()
        net(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
        opt.step()


def test_channels_last_model_keeps_the_fused_path_and_logical_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels_last conv model (autograd lays each gradient out like its weight) runs fused,
    with moments allocated in the weight's layout, so opt.state holds what torch's AdamW holds
    and a checkpoint resumes in a contiguous model as if training never stopped."""
    calls = []
    kernel = soapdsl.runtime.fused.step
    monkeypatch.setattr(soapdsl.runtime.fused, "step", lambda *a, **k: (calls.append(1), kernel(*a, **k)))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64) for _ in range(6)]
    net = _conv_net(torch.channels_last)
    ref = _conv_net(torch.contiguous_format)
    opt = soapdsl.build("adamw", net, lr=1e-2)
    ref_opt = _torch_adamw(list(ref.parameters()), 1e-2)
    _train(net, opt, xs[:3])
    _train(ref, ref_opt, xs[:3])
    assert calls == [1, 1, 1]
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["1.momentum.buf"], ref_opt.state[q]["exp_avg"])
        torch.testing.assert_close(opt.state[p]["2.rms_normalize.v"], ref_opt.state[q]["exp_avg_sq"])

    resumed = _conv_net(torch.contiguous_format)
    resumed.load_state_dict(net.state_dict())
    resumed_opt = soapdsl.build("adamw", resumed, lr=1e-2)
    resumed_opt.load_state_dict(opt.state_dict())
    weight = resumed[0].weight
    assert opt.state[net[0].weight]["1.momentum.buf"].stride() == net[0].weight.stride()
    assert resumed_opt.state[weight]["1.momentum.buf"].stride() == weight.stride()
    _train(resumed, resumed_opt, xs[3:])
    _train(ref, ref_opt, xs[3:])
    assert calls == [1] * 6
    for p, q in zip(resumed.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_transposed_parameter_round_trips_into_a_contiguous_one() -> None:
    """A parameter that is a transposed view (strides (1, n)) gets gradients of its own layout
    from autograd; its state and a checkpoint of it are logically indexed."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    xs = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(6)]
    ours = torch.nn.Parameter(base.clone().t())  # [5, 6], strides (1, 5)
    ref = torch.nn.Parameter(base.t().contiguous())
    assert ours.stride() == (1, 5)
    opt, ref_opt = soapdsl.build("adamw", [("w", ours)], lr=0.05), _torch_adamw([ref], 0.05)

    def train(w: torch.nn.Parameter, o: torch.optim.Optimizer, batch: list[torch.Tensor]) -> None:
        for x in batch:
            o.zero_grad()
            (x @ w.t()).sin().sum().backward()
            o.step()

    train(ours, opt, xs[:3])
    train(ref, ref_opt, xs[:3])
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(opt.state[ours]["1.momentum.buf"], ref_opt.state[ref]["exp_avg"])
    contiguous = torch.nn.Parameter(ours.detach().contiguous())
    resumed = soapdsl.build("adamw", [("w", contiguous)], lr=0.05)
    resumed.load_state_dict(opt.state_dict())
    train(contiguous, resumed, xs[3:])
    train(ref, ref_opt, xs[3:])
    torch.testing.assert_close(contiguous, ref, rtol=1e-13, atol=1e-15)


def test_parameter_laid_out_anew_after_its_first_step_gives_adams_numbers() -> None:
    """``p.data = ...`` with the same shape, dtype and device but other strides leaves the
    layout as it was (nothing it reads changed), while the moments keep the parameter's old
    strides: the check at each fused step must see it, or the kernel would pair the parameter's
    elements with another element's moments."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 18, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 18, generator=g, dtype=torch.float64) for _ in range(4)]
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref_opt = soapdsl.build("adamw", [("w", ours)], lr=0.1), _torch_adamw([ref], 0.1)
    for k, grad in enumerate(grads):
        if k == 2:  # the same values, transposed in memory: strides (1, 4)
            ours.data = ours.detach().t().contiguous().t()
            assert ours.stride() == (1, 4)
        ours.grad, ref.grad = grad.clone(), grad.clone()  # contiguous: laid out as the moments are
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(opt.state[ours]["1.momentum.buf"], ref_opt.state[ref]["exp_avg"])
