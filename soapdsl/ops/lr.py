"""lr: apply the update to the parameter, scaled by the learning rate."""

from __future__ import annotations

from soapdsl.registry import Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


@register
class Lr(Op):
    """Learning-rate step: the stage that writes the parameter.

    Uses the route's param_group "lr" (so LR schedulers work) and folds in every pending
    host-side factor (bias corrections, `scale`), so it costs one fused pass. Every route has
    exactly one; a pipeline without one gets it appended. Stages after it act on the updated
    parameter (e.g. `decay` after the update, as SOAP does).

    Math:
        p <- p - lr * x

    Example:
        momentum(0.9) |> lr

    References:
        Robbins & Monro (1951).
    """

    name = "lr"
    Args = OpArgs
    kind = "apply"
    linear = True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        ctx.add_to_params(x.ts, -ctx.group["lr"] * ctx.scale)
        return x
