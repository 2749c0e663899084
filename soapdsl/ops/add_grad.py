"""add_grad: add a multiple of the raw gradient (in the current basis) to the update."""

from __future__ import annotations

import torch

from soapdsl.registry import Hyper, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class AddGradArgs(OpArgs):
    coef: Hyper = 1.0
    enabled: bool = True


@register
class AddGrad(Op):
    """Add the raw gradient, scaled, to the update: a Nesterov-style look-ahead.

    Inside `rotate` the gradient is the rotated one. SOAP-Muon's Nesterov variant is
    `add_grad(1 - beta1)` applied to the rotated momentum (note: m + (1 - b1) g, not
    b1 m + (1 - b1) g).

    Math:
        out = x + coef * g

    Args:
        coef: the multiplier of the gradient.
        enabled: false makes the stage the identity.

    Example:
        momentum(0.95) |> rotate(right, freq=40) { add_grad(0.05) |> rms_normalize(0.95, eps_at=raw) } |> lr

    References:
        Vyas et al., "Improving SOAP using iterative whitening and Muon" (2025), section 3.6.
    """

    name = "add_grad"
    Args = AddGradArgs

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        if not self.args.enabled:  # type: ignore[attr-defined]
            return x
        coef = self.hp("coef", ctx.group)
        if x.owned:
            torch._foreach_add_(x.ts, ctx.g, alpha=coef)
            return x
        return Val(list(torch._foreach_add(x.ts, ctx.g, alpha=coef)), owned=True)
