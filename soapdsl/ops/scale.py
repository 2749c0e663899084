"""scale: multiply the update by a constant."""

from __future__ import annotations

from soapdsl.registry import Hyper, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class ScaleArgs(OpArgs):
    factor: Hyper = 1.0


@register
class Scale(Op):
    """Multiply the update by a scalar (host-side; costs no memory pass).

    Math:
        out = factor * x

    Args:
        factor: the multiplier; may follow a recipe parameter and change during training.

    Example:
        sign |> scale(0.1) |> lr

    References:
        optax.scale.
    """

    name = "scale"
    Args = ScaleArgs
    linear = True
    passes_quotient = True

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        ctx.scale *= self.hp("factor", ctx.group)
        return x
