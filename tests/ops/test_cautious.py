"""cautious: sign-agreement masking with the kept-fraction rescale, against a hand computation."""

from __future__ import annotations

import torch

import soapdsl

TOL = {"rtol": 1e-12, "atol": 1e-14}


def _update(text, x_grad, shapes=None, recipe=None):
    p = torch.nn.Parameter(torch.zeros(x_grad.shape, dtype=torch.float64))
    opt = soapdsl.build(text, [("w", p)], lr=1.0)
    p.grad = x_grad.clone()
    opt.step()
    return -p.detach()


def _second_cautious_step(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The update of ``momentum(0.5) |> cautious`` at its second step, on gradients g1 then g2
    (the momentum of both, so its signs can disagree with g2's)."""
    p = torch.nn.Parameter(torch.zeros_like(g1))
    opt = soapdsl.build("momentum(0.5) |> cautious |> lr", [("w", p)], lr=1.0)
    p.grad = g1
    opt.step()
    before = p.detach().clone()
    p.grad = g2
    opt.step()
    return before - p.detach()


def test_mask_and_rescale_against_the_gradient():
    # the update is the momentum of two steps, so its signs can disagree with the new gradient
    g1 = torch.tensor([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]], dtype=torch.float64)
    g2 = torch.tensor([[-4.0, -1.0, 1.0], [-10.0, 2.0, 1.0]], dtype=torch.float64)
    m = 0.5 * (0.5 * g1) + 0.5 * g2
    mask = (m * g2 > 0).double()
    expected = m * mask / mask.mean()
    torch.testing.assert_close(_second_cautious_step(g1, g2), expected, **TOL)


def test_a_zero_gradient_masks_its_component():
    """The mask is strict, 1[x * g > 0] (Liang et al.): where this step's gradient is exactly zero
    (an embedding row not in the batch, a dead unit) the momentum's component is dropped, and the
    rescale counts it as dropped."""
    g1 = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    g2 = torch.tensor([0.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    m = 0.5 * (0.5 * g1) + 0.5 * g2
    expected = m * torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64) / 0.5
    torch.testing.assert_close(_second_cautious_step(g1, g2), expected, **TOL)


def test_without_rescale_and_all_masked():
    g = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(_update("cautious(rescale=false) |> lr", g), g * torch.tensor([1.0, 1.0, 0.0]), **TOL)
    # all components disagree: everything is zeroed (the floor keeps the rescale finite)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = soapdsl.build("scale(-1) |> cautious |> lr", [("w", p)], lr=1.0)
    p.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt.step()
    assert torch.count_nonzero(p) == 0


def test_per_parameter_fraction_in_stacked_batches():
    ps = [torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)) for _ in range(2)]
    opt = soapdsl.build(
        "scale(-1) |> cautious |> scale(-1) |> newton_schulz(0) |> lr", [(f"w{i}", p) for i, p in enumerate(ps)], lr=1.0
    )
    ps[0].grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ps[1].grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    opt.step()  # every component disagrees in both: both updates are zero
    assert all(torch.count_nonzero(p) == 0 for p in ps)


def test_kept_fraction_is_each_parameters_own_in_a_stacked_batch():
    """Two same-shape parameters stacked in one batch (shape_scale makes the route batched) keep
    3 and 2 of their 4 components: each is rescaled by its own kept fraction, not the batch's."""
    ps = [torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)) for _ in range(2)]
    opt = soapdsl.build(
        "momentum(0.5) |> cautious |> shape_scale(none) |> lr", [(f"w{i}", p) for i, p in enumerate(ps)], lr=1.0
    )
    assert opt._routes[0].batched
    g1 = torch.ones(2, 2, dtype=torch.float64)
    g2s = [
        torch.tensor([[-0.1, 1.0], [1.0, 1.0]], dtype=torch.float64),
        torch.tensor([[-0.1, -0.1], [1.0, 1.0]], dtype=torch.float64),
    ]
    for p in ps:
        p.grad = g1.clone()
    opt.step()
    before = [p.detach().clone() for p in ps]
    for p, g2 in zip(ps, g2s):
        p.grad = g2
    opt.step()
    for p, b, g2, kept in zip(ps, before, g2s, (0.75, 0.5)):
        m = 0.5 * (0.5 * g1) + 0.5 * g2
        mask = (m * g2 > 0).double()
        assert float(mask.mean()) == kept
        torch.testing.assert_close(b - p.detach(), m * mask / kept, **TOL)


def test_linear_in_a_pending_positive_scale():
    g = torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64)
    a = _update("scale(3) |> cautious |> lr", g)
    b = _update("cautious |> scale(3) |> lr", g)
    torch.testing.assert_close(a, b, **TOL)
