"""`adamw` and `adam` reproduce torch.optim.AdamW and torch.optim.Adam step for step."""

from __future__ import annotations

import pytest
import torch

import soapdsl
from tests.conftest import batches, make_net, max_rel_err, train_step

STEPS = 200
DATA = batches(STEPS)


@pytest.mark.parametrize(
    ("recipe", "torch_cls", "kw"),
    [
        ("adamw", torch.optim.AdamW, dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.1)),
        ("adamw", torch.optim.AdamW, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
        ("adam", torch.optim.Adam, dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)),
        ("adam", torch.optim.Adam, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    ],
)
def test_matches_torch_with_scheduler(recipe, torch_cls, kw):
    ours_model, ref_model = make_net(), make_net()
    b1, b2 = kw["betas"]
    ours = soapdsl.build(
        recipe, ours_model, lr=kw["lr"], beta1=b1, beta2=b2, eps=kw["eps"], weight_decay=kw["weight_decay"]
    )
    ref = torch_cls(ref_model.parameters(), foreach=False, **kw)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=50, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=50, gamma=0.5)
    for batch in DATA:
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
        sched_ours.step()
        sched_ref.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"])
    assert max_rel_err(ours_model, ref_model) < 1e-5


def test_adamw_defaults_equal_torch_defaults():
    ours_model, ref_model = make_net(), make_net()
    ours = soapdsl.build("adamw", ours_model)
    ref = torch.optim.AdamW(ref_model.parameters())
    for batch in DATA[:50]:
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
    assert max_rel_err(ours_model, ref_model) < 1e-5


def test_dynamic_hyperparameters_follow_param_group():
    """Changing beta1 / weight_decay in the param_group mid-run acts like torch's optimizer."""
    ours_model, ref_model = make_net(), make_net()
    ours = soapdsl.build("adamw", ours_model, lr=1e-3)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, foreach=False)
    for i, batch in enumerate(DATA[:40]):
        if i == 20:
            ours.param_groups[0]["weight_decay"] = 0.2
            ref.param_groups[0]["weight_decay"] = 0.2
            ours.param_groups[0]["beta2"] = 0.99
            ref.param_groups[0]["betas"] = (0.9, 0.99)
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
    assert max_rel_err(ours_model, ref_model) < 1e-5


def test_float64_is_tight():
    """In float64 the two implementations agree to rounding (a much tighter check)."""
    ours_model, ref_model = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    data = batches(60, dtype=torch.float64)
    ours = soapdsl.build("adamw", ours_model, lr=3e-3, beta1=0.8, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, betas=(0.8, 0.999), weight_decay=0.1)
    for batch in data:
        train_step(ours_model, ours, batch)
        train_step(ref_model, ref, batch)
    assert max_rel_err(ours_model, ref_model) < 1e-10
