"""sign: elementwise sign of the update."""

from __future__ import annotations

import torch

from soapdsl.registry import Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


@register
class Sign(Op):
    """Elementwise sign (signSGD; Lion's final step).

    Math:
        out = sign(x)          (0 where x == 0)

    Example:
        momentum(0.9) |> sign |> lr

    References:
        Bernstein et al., "signSGD" (2018).
    """

    name = "sign"
    Args = OpArgs
    scale_invariant = True

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        if x.owned:
            torch._foreach_sign_(x.ts)
            return x
        return Val(list(torch._foreach_sign(x.ts)), owned=True)
