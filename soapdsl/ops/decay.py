"""decay: decoupled weight decay of the parameter."""

from __future__ import annotations

from pydantic import Field

from soapdsl.registry import Hyper, Op, OpArgs, register
from soapdsl.runtime.context import FITS_EVERY_DTYPE, Ctx, Val


class DecayArgs(OpArgs):
    weight_decay: Hyper = Field(0.01, ge=0.0)
    lr_scaled: bool = True


@register
class Decay(Op):
    """Decoupled weight decay: shrink the parameter, leave the update as it is.

    Where it stands in the pipeline is when it happens: before `lr` it decays the parameter
    before the update is applied (torch.optim.AdamW, Muon); after `lr` it decays the updated
    parameter (SOAP, SOAP-Muon). Skipped when weight_decay is 0. In a route with the option
    `[stochastic_round=true]` a bfloat16 or float16 parameter's new value is rounded
    stochastically.

    Math:
        p <- p * (1 - lr * weight_decay)        (lr_scaled=true; lr is the param_group's)
        p <- p * (1 - weight_decay)             (lr_scaled=false)
        out = x

    Args:
        weight_decay: the decay rate, >= 0.
        lr_scaled: multiply the rate by the group's current lr (torch's convention).

    Example:
        decay(0.01) |> momentum(0.9) |> rms_normalize(0.999) |> bias_correct(0.9) |> lr

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
    """

    name = "decay"
    Args = DecayArgs
    kind = "param"
    linear = True
    passes_quotient = True

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        wd = self.hp("weight_decay", ctx.group)
        if wd == 0:
            return x
        rate = wd * ctx.group["lr"] if self.args.lr_scaled else wd  # type: ignore[attr-defined]
        if not -FITS_EVERY_DTYPE <= 1.0 - rate <= FITS_EVERY_DTYPE:
            self._check_factor(ctx, wd, 1.0 - rate)
        ctx.scale_params(1.0 - rate, self.path)
        return x

    def _check_factor(self, ctx: Ctx, wd: float, factor: float) -> None:
        """Refuse a decay factor that a parameter's dtype cannot hold (it would multiply the
        parameter by an infinity): weight_decay and lr are each a float32, their product need not be."""
        if self.args.lr_scaled:  # type: ignore[attr-defined]
            what, given = "1 - weight_decay * lr", f"weight_decay is {wd:.4g} and {ctx.lr_given()}"
            fix = "the weight decay or the learning rate"
        else:
            what, given, fix = "1 - weight_decay", f"weight_decay is {wd:.4g}", "the weight decay"
        ctx.check_factor(
            factor,
            None,
            lambda name, dtype, top: (
                f"'decay' would multiply parameter '{name}' by {what} = {factor:.4g}, past the largest"
                f" {dtype} ({top:.4g}): {given}; lower {fix}"
            ),
            getattr(self, "loc", None),
        )
