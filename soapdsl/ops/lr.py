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

    passes_quotient = True

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        alpha = -ctx.group["lr"] * ctx.scale
        if x.denom is not None:  # x / denom from rms_normalize: one fused addcdiv, as torch does
            ctx.addcdiv_to_params(x.ts, x.denom, alpha)
        else:
            ctx.add_to_params(x.ts, alpha)
        return x
