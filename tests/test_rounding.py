"""Stochastic rounding of bfloat16 and float16 parameter writes (route option ``stochastic_round``).

The rounding itself is checked bit by bit (each written value is one of the two bfloat16 or
float16 values around the exact one, chosen with the right probability; special values
survive; float16's neighbours come from torch's own float16 rounding and ``nextafter``, not
from the code under test), the bits are checked to depend on the parameter and its
whole-parameter position only, and whole optimizers are checked against torch.optim.AdamW run
in float32: one step lands next to torch's value, unbiased, and many small steps add up where
rounding to nearest stalls.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapArgumentError, SoapConfigError
from soapdsl.runtime import rounding
from soapdsl.runtime.rounding import Noise, round_into, write_key

BF16 = torch.bfloat16
F16 = torch.float16
CPU = torch.device("cpu")


def _around(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bfloat16 values around the float32 ``v`` (towards zero, away from zero) and where
    ``v`` lies between them (the fraction of the gap, from the one towards zero)."""
    bits = v.view(torch.int32)
    low = bits & 0xFFFF
    toward = (bits & -(1 << 16)).view(torch.float32)
    away = torch.where(low > 0, (bits & -(1 << 16)) + (1 << 16), bits & -(1 << 16)).view(torch.float32)
    return toward, away, low.double() / (1 << 16)


def _rounded(v: torch.Tensor, key: int = 12345, dtype: torch.dtype = BF16) -> torch.Tensor:
    out = torch.empty(v.shape, dtype=dtype)
    round_into(out, v, Noise().draw(key, 0, v.numel(), v.numel(), CPU))
    return out


def test_each_value_goes_to_a_bfloat16_neighbour_with_the_probability_of_its_position():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200_000, generator=g) * torch.logspace(-30, 30, 200_000)
    v[:1000] = v[:1000].bfloat16().float()  # values bfloat16 holds: written exactly
    v[1000:1100] *= 1e-38  # subnormals
    out = _rounded(v).float()
    toward, away, frac = _around(v)
    assert bool(((out == toward) | (out == away)).all())
    assert torch.equal(out[:1000], v[:1000])
    # unbiased: the rounding error, in units of the gap, averages to zero
    gap = (away - toward).double()
    moved = gap > 0
    err = ((out.double() - v.double()) / gap)[moved]
    assert abs(err.mean().item()) < 5 / math.sqrt(12 * err.numel())
    # and a value a quarter of the way up rounds away from zero a quarter of the time
    quarter = torch.full((100_000,), 1.0).view(torch.int32).add(1 << 14).view(torch.float32).neg()
    up = (_rounded(quarter, key=7).float() != -1.0).double().mean().item()
    assert abs(up - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 100_000)
    assert frac.max() < 1


def test_special_values_survive():
    patterns = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x00000000, 0x80000000]
    v = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32).view(torch.float32)
    v = v.repeat(5000)  # many draws of the noise
    out = _rounded(v).float()
    assert bool(out[0::8].eq(math.inf).all()) and bool(out[1::8].eq(-math.inf).all())
    for k in (2, 3, 4, 5):  # NaN, whatever its pattern (CUDA's is 0x7fffffff), never a number
        assert bool(out[k::8].isnan().all()), hex(patterns[k])
    assert bool((out[6::8] == 0).all()) and bool(out[6::8].signbit().logical_not().all())
    assert bool((out[7::8] == 0).all()) and bool(out[7::8].signbit().all())
    top = torch.full((20_000,), torch.finfo(torch.float32).max)
    assert set(_rounded(top).float().unique().tolist()) == {torch.finfo(BF16).max, math.inf}


def _f16_around(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float16 values around the float32 ``v`` (towards zero, away from zero; ``v`` within
    float16's range) and where ``v`` lies between them, in float64: from torch's float16
    rounding to nearest and ``nextafter``."""
    nearest = v.half()
    zero = torch.zeros_like(nearest)
    beyond = nearest.double().abs() > v.double().abs()
    toward = torch.where(beyond, torch.nextafter(nearest, zero), nearest).double()
    away = torch.nextafter(toward.half(), torch.full_like(nearest, math.inf).copysign(v.half())).double()
    away = torch.where(toward == v.double(), toward, away)
    frac = ((v.double() - toward) / (away - toward)).nan_to_num(0.0)
    return toward, away, frac


def _assert_unbiased(v: torch.Tensor, key: int) -> None:
    """Each value of ``v`` rounds to a float16 neighbour, and the errors, in units of the gap,
    average to zero within 5 sigma of their own spread (a value at f of its gap errs by -f or
    1 - f, variance f (1 - f))."""
    out = _rounded(v, key, F16).double()
    toward, away, frac = _f16_around(v)
    assert bool(((out == toward) | (out == away)).all())
    moved = away != toward
    err = ((out - v.double()) / (away - toward))[moved]
    sigma = math.sqrt(float((frac * (1 - frac))[moved].sum())) / err.numel()
    assert abs(err.mean().item()) < 5 * sigma, (err.mean().item(), sigma)


def test_each_value_goes_to_a_float16_neighbour_with_the_probability_of_its_position():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200_000, generator=g) * torch.logspace(-12, 4, 200_000)  # down to subnormals
    v[:1000] = v[:1000].half().float()  # values float16 holds: written exactly
    assert torch.equal(_rounded(v[:1000], dtype=F16).float(), v[:1000])
    _assert_unbiased(v, 1)
    # float16's subnormals, multiples of 2^-24, and values under the smallest of them
    _assert_unbiased((torch.rand(200_000, generator=g) * 2 - 1) * 2.0**-14, 2)
    _assert_unbiased((torch.rand(100_000, generator=g) * 2 - 1) * 2.0**-24, 3)
    # around powers of two, where the gap doubles: a gap's worth below to two above
    k = torch.randint(-14, 16, (200_000,), generator=g).float()
    _assert_unbiased(torch.exp2(k) * (1 + (torch.rand(200_000, generator=g) * 3 - 1) * 2.0**-11), 4)


@pytest.mark.parametrize(
    ("value", "toward", "away", "p"),
    [
        (1 - 2.0**-13, 1 - 2.0**-11, 1.0, 0.75),  # the gap below 1 is 2^-11, above it 2^-10
        (-(1 + 2.0**-12), -1.0, -(1 + 2.0**-10), 0.25),
        (2.0**-26, 0.0, 2.0**-24, 0.25),  # under the smallest subnormal
        (3 * 2.0**-26, 0.0, 2.0**-24, 0.75),
        (2.0**-14 - 2.0**-26, 2.0**-14 - 2.0**-24, 2.0**-14, 0.75),  # the last subnormal gap
        (1000.0 + 0.5 / 8, 1000.0, 1000.5, 0.125),
        (65504.0 + 8, 65504.0, math.inf, 0.25),  # past the largest: infinity, as at 65536
        (-(65504.0 + 24), -65504.0, -math.inf, 0.75),
    ],
)
def test_a_float16_value_goes_away_from_zero_with_the_probability_of_its_position(value, toward, away, p):
    n = 100_000
    out = _rounded(torch.full((n,), value), key=7, dtype=F16).double()
    assert set(out.unique().tolist()) <= {toward, away}
    up = (out == away).double().mean().item()
    assert abs(up - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_every_float16_is_written_exactly_and_special_values_survive():
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(F16)
    finite = every[every.isfinite()]  # 63488 values, both zeros among them
    assert torch.equal(_rounded(finite.float(), dtype=F16).view(torch.int16), finite.view(torch.int16))
    patterns = [0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x00000000, 0x80000000]
    v = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32).view(torch.float32)
    out = _rounded(v.repeat(5000), dtype=F16).float()
    assert bool(out[0::8].eq(math.inf).all()) and bool(out[1::8].eq(-math.inf).all())
    for k in (2, 3, 4, 5):
        assert bool(out[k::8].isnan().all()), hex(patterns[k])
    assert bool((out[6::8] == 0).all()) and bool(out[6::8].signbit().logical_not().all())
    assert bool((out[7::8] == 0).all()) and bool(out[7::8].signbit().all())
    # from 65536, where the gap after 65504 ends, on: infinite; a float32 subnormal: a zero of
    # its sign or the smallest float16 subnormal
    big = torch.tensor([65536.0, 1e6, torch.finfo(torch.float32).max]).repeat(1000)
    assert bool(_rounded(big, dtype=F16).eq(math.inf).all()) and bool(_rounded(-big, dtype=F16).eq(-math.inf).all())
    tiny = _rounded(torch.full((1000,), -1e-45), dtype=F16).float()
    assert bool(tiny.signbit().all()) and set(tiny.unique().tolist()) <= {0.0, -(2.0**-24)}


def test_the_noise_of_a_range_is_that_range_of_the_whole_parameter(monkeypatch):
    monkeypatch.setattr(rounding, "BLOCK", 1000)
    total, key = 4321, write_key(99, 3, "4")
    whole = Noise().draw(key, 0, total, total, CPU)
    assert whole.dtype == torch.int32 and int(whole.min()) >= 0 and int(whole.max()) < 1 << 16
    # an FSDP2 rank's rows start anywhere, within a block or on its edge, within a 64-bit word
    # (four elements' noise) or on its edge; none (a rank holding no rows of the parameter)
    for first, n in ((0, 10), (995, 10), (1000, 1), (1001, 6), (1500, 2500), (total - 7, 7), (0, total), (7, 0)):
        assert torch.equal(Noise().draw(key, first, n, total, CPU), whole[first : first + n]), (first, n)
    other = Noise().draw(write_key(99, 4, "4"), 0, total, total, CPU)
    assert (other == whole).double().mean() < 0.01  # the next step draws other bits
    assert (Noise().draw(write_key(98, 3, "4"), 0, total, total, CPU) == whole).double().mean() < 0.01


def test_the_noise_is_uniform_and_its_neighbours_independent():
    """Four elements share a 64-bit word of the generator: each of their 16 bits is set half the
    time, and an element's noise is uncorrelated with its neighbours' (within 5 sigma)."""
    n = 1 << 20
    u = Noise().draw(write_key(7, 1, "lr"), 0, n, n, CPU).double()
    for bit in range(16):
        assert abs(float(u.div(2**bit).floor().remainder(2).mean()) - 0.5) < 5 * 0.5 / math.sqrt(n), bit
    z = (u - u.mean()) / u.std()
    for lag in (1, 2, 3, 4):  # within a word and across words
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 5 / math.sqrt(n), lag


def _model(seed: int = 0, dtype: torch.dtype = BF16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 48)).to(dtype)


def _grads(model: torch.nn.Module, step: int, dtype: torch.dtype = BF16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(dtype) for p in model.parameters()]


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        for p, g in zip(model.parameters(), _grads(model, step, next(model.parameters()).dtype), strict=True):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("recipe", "kw"), [("adamw", {}), ("soap", {"freq": 2}), ("muon", {})])
def test_float32_and_float64_parameters_are_written_as_without_the_option(recipe, kw, dtype):
    a = _model().to(dtype)
    b = copy.deepcopy(a)
    _run(a, soapdsl.build(recipe, a, **kw), range(5))
    _run(b, soapdsl.build(recipe, b, stochastic_round=True, **kw), range(5))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# weights in [1, 2): a bfloat16 gap is 2^-7, a float16 one 2^-10; a step of lr, an eighth of it
@pytest.mark.parametrize(("dtype", "gap", "lr"), [(BF16, 2.0**-7, 1e-3), (F16, 2.0**-10, 1.25e-4)])
def test_one_adamw_step_lands_next_to_torch_adamw_in_float32_and_unbiased(dtype, gap, lr):
    torch.manual_seed(3)
    p0 = (1 + torch.rand(256, 256)).to(dtype)
    grad = torch.randn(256, 256).abs().to(dtype)  # every step downwards
    ours = torch.nn.Parameter(p0.clone())
    ours.grad = grad.clone()
    opt = soapdsl.build("adamw", [("w", ours)], lr=lr, weight_decay=0.0, stochastic_round=True)
    opt.step()
    ref = torch.nn.Parameter(p0.float())
    ref.grad = grad.float()
    torch.optim.AdamW([ref], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    ref32 = ref.detach()
    got = ours.detach().float()
    assert float((got - ref32).abs().max()) <= gap  # one of the two values around torch's
    # rounded to nearest, almost nothing would move (the step is lr, an eighth of the gap);
    # rounded stochastically the average step is torch's
    assert torch.equal(p0.float().add(ref32 - p0.float()).to(dtype), p0)
    assert abs(float((got - ref32).mean())) < 0.02 * float((p0.float() - ref32).mean())


# the weights stay in [1, 2), where a bfloat16 gap is 2^-7 and a float16 one 2^-10; lr: a step
# of 1/78 of the gap, 60 of them about 0.77 of it
@pytest.mark.parametrize(("dtype", "gap", "lr"), [(BF16, 2.0**-7, 1e-4), (F16, 2.0**-10, 1.25e-5)])
def test_small_steps_add_up_where_rounding_to_nearest_stalls(dtype, gap, lr):
    steps = 60

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.ones_like(p)  # the same direction every step
            opt.step()

    torch.manual_seed(0)
    start = torch.nn.Module()
    start.w = torch.nn.Parameter((1.5 + 0.1 * torch.rand(256, 256)).to(dtype))
    start.v = torch.nn.Parameter((1.5 + 0.1 * torch.rand(4096)).to(dtype))
    sr, nearest, ref = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start).float()
    train(sr, soapdsl.build("adamw", sr, lr=lr, stochastic_round=True))
    train(nearest, soapdsl.build("adamw", nearest, lr=lr))
    train(ref, torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01))
    with torch.no_grad():
        for p0, a, b, r in zip(
            start.parameters(), sr.parameters(), nearest.parameters(), ref.parameters(), strict=True
        ):
            want = float((r - p0.float()).mean())  # about -steps * lr
            assert want < -0.6 * gap
            # each write's error has mean 0 and variance at most |its step| * gap, so the
            # parameter's final error has variance at most |want| * gap
            assert abs(float((a.float() - p0.float()).mean()) - want) < 6 * math.sqrt(-want * gap / p0.numel())
            assert torch.equal(b, p0)  # every step under half a gap: nothing moved


# a decay under half the gap below 1: 2^-9 in bfloat16, 2^-12 in float16
@pytest.mark.parametrize(("dtype", "wd"), [(BF16, 1e-3), (F16, 1e-4)])
def test_decay_rounds_stochastically_too(dtype, wd):
    p = torch.nn.Parameter(torch.ones(100_000, dtype=dtype))
    opt = soapdsl.build(f"decay({wd}, lr_scaled=false) |> lr", [("w", p)], lr=0.0, stochastic_round=True)
    for _ in range(20):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert abs(float(p.detach().double().mean()) / (1 - wd) ** 20 - 1) < wd
    q = torch.nn.Parameter(torch.ones(10, dtype=dtype))
    opt = soapdsl.build(f"decay({wd}, lr_scaled=false) |> lr", [("w", q)], lr=0.0)
    q.grad = torch.zeros_like(q)
    opt.step()
    assert bool((q == 1).all())  # to nearest: stuck at 1


@pytest.mark.parametrize(
    ("recipe", "kw", "dtype"),
    [("adamw", {}, BF16), ("adamw", {}, F16), ("soap", {"freq": 3}, BF16), ("soap_muon", {"freq": 3}, BF16)],
)
def test_runs_repeat_and_a_checkpoint_resumes_bit_for_bit(recipe, kw, dtype):
    first, second = _model(dtype=dtype), _model(dtype=dtype)
    _run(first, soapdsl.build(recipe, first, stochastic_round=True, **kw), range(8))
    opt = soapdsl.build(recipe, second, stochastic_round=True, **kw)
    _run(second, opt, range(4))
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(second.state_dict())
    _run(second, opt, range(4, 8))
    resumed = _model(seed=5, dtype=dtype)
    resumed.load_state_dict(weights)
    again = soapdsl.build(recipe, resumed, stochastic_round=True, **kw)
    again.load_state_dict(saved)
    _run(resumed, again, range(4, 8))
    for p, q, r in zip(first.parameters(), second.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_parameters_of_one_batch_draw_bits_of_their_own():
    """Same-shape matrices stacked into one batch, equal and given equal gradients, still get
    their own bits (the parameter's name seeds them)."""
    torch.manual_seed(0)
    w = torch.randn(32, 32).to(BF16)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = soapdsl.build("soap", [("a", a), ("b", b)], freq=2, lr=1e-3, stochastic_round=True)
    assert opt.plan.routes[0].batched
    for step in range(4):
        g = torch.randn(32, 32, generator=torch.Generator().manual_seed(step)).to(BF16)
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
    assert not torch.equal(a, b)
    # apart by the rounding only: at most a gap per write (lr and decay in each of the 3 steps
    # after the first, which soap skips), at the largest magnitude
    gap = 2.0 ** (math.floor(math.log2(float(w.float().abs().max()))) - 7)
    assert float((a.detach().float() - b.detach().float()).abs().max()) <= 6 * gap


def test_a_channels_last_kernel_gets_the_bits_of_its_logical_order():
    torch.manual_seed(0)
    conv = torch.randn(8, 4, 3, 3).to(BF16)
    plain = torch.nn.Parameter(conv.clone())
    last = torch.nn.Parameter(conv.clone().to(memory_format=torch.channels_last))
    for p in (plain, last):
        opt = soapdsl.build("adamw", [("conv.weight", p)], lr=1e-3, stochastic_round=True)
        for step in range(3):
            g = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(step)).to(BF16)
            p.grad = g.to(memory_format=torch.channels_last) if p is last else g
            opt.step()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)


def test_the_route_option_rounds_its_own_route_only():
    recipe = (
        "recipe some(lr=1e-4):\n"
        "  route matrix [stochastic_round=true]: adamw(0.9, 0.95, 1e-8, 0)\n"
        "  route default: adamw(0.9, 0.95, 1e-8, 0)\n"
    )
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + p.float().abs())
    start = copy.deepcopy(model)
    opt = soapdsl.build(recipe, model)
    assert [rp.options.get("stochastic_round", False) for rp in opt.plan.routes] == [True, False]
    for _ in range(10):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    for (name, p), p0 in zip(model.named_parameters(), start.parameters(), strict=True):
        assert torch.equal(p, p0) == (p.ndim == 1), name


def test_the_option_in_a_config_and_its_errors(tmp_path):
    model = _model()
    cfg = tmp_path / "train.yaml"
    cfg.write_text("optimizer:\n  recipe: adamw\n  stochastic_round: true\n")
    opt = soapdsl.from_config(model, cfg)
    assert all(rp.options.get("stochastic_round") for rp in opt.plan.routes)
    cfg.write_text("optimizer:\n  recipe: adamw\n  stochastic_round: yes please\n")
    with pytest.raises(SoapConfigError) as e:
        soapdsl.from_config(model, cfg)
    assert f"{cfg}:3:" in str(e.value) and "stochastic_round" in str(e.value)
    with pytest.raises(SoapArgumentError, match="stochastic_round must be True or False"):
        soapdsl.build("adamw", model, stochastic_round="no")
    with pytest.raises(soapdsl.SoapError, match="route option 'stochastic_round' takes true or false"):
        soapdsl.build("recipe r(lr=0.1):\n  route default [stochastic_round=1]: sign |> lr\n", model)


@pytest.mark.slow
def test_a_compiled_route_rounds_as_the_eager_one():
    eager, compiled = _model(), _model()
    _run(eager, soapdsl.build("adamw", eager, lr=1e-3, stochastic_round=True), range(4))
    _run(compiled, soapdsl.build("adamw", compiled, lr=1e-3, stochastic_round=True, torch_compile=True), range(4))
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert torch.equal(p, q)
