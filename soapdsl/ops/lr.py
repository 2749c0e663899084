"""lr: apply the update to the parameter, scaled by the learning rate."""

from __future__ import annotations

from soapdsl.registry import Op, OpArgs, register
from soapdsl.runtime.context import FITS_EVERY_DTYPE, Ctx, Val


@register
class Lr(Op):
    """Learning-rate step: the stage that writes the parameter.

    Uses the route's param_group "lr" (so LR schedulers work) and folds in every pending
    host-side factor (bias corrections, `scale`), so it costs one fused pass. Every route has
    exactly one; a pipeline without one gets it appended. Stages after it act on the updated
    parameter (e.g. `decay` after the update, as SOAP does). In a route with the option
    `[stochastic_round=true]` a bfloat16 or float16 parameter's new value is rounded
    stochastically.

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
        # times -1.0, not -lr: in a compiled route torch.compile keeps lr an input of the code
        # it compiled through a product, not through a negation (context._traced)
        alpha = ctx.group["lr"] * ctx.scale * -1.0
        if not -FITS_EVERY_DTYPE <= alpha <= FITS_EVERY_DTYPE:
            self._check_step(ctx, alpha)
        if x.denom is not None:  # x / denom from rms_normalize: one fused addcdiv, as torch does
            ctx.addcdiv_to_params(x.ts, x.denom, alpha, self.path)
        else:
            ctx.add_to_params(x.ts, alpha, self.path)
        return x

    def _check_step(self, ctx: Ctx, alpha: float) -> None:
        """Refuse a step size that a parameter's dtype cannot hold: each of lr and the factors
        folded into the update is a float32, but their product need not be."""
        scale = ctx.scale
        factors = (
            ""
            if scale == 1.0
            else f", times {scale:.4g}, the factor that stages before 'lr' (such as scale and bias_correct)"
            " fold into the update on the host"
        )
        fix = "the learning rate" if scale == 1.0 else "the learning rate or those factors"
        ctx.check_factor(
            alpha,
            None,
            lambda name, dtype, top: (
                f"'lr' would step parameter '{name}' by {alpha:.4g} times its update, past the largest"
                f" {dtype} ({top:.4g}): {ctx.lr_given()}{factors}; lower {fix}"
            ),
            getattr(self, "loc", None),
        )
