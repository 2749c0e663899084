"""bias_correct: undo the zero-initialisation bias of moving averages."""

from __future__ import annotations

import math

from pydantic import Field

from soapdsl.registry import Hyper, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class BiasCorrectArgs(OpArgs):
    beta1: Hyper = Field(0.0, ge=0.0, lt=1.0)
    beta2: Hyper = Field(0.0, ge=0.0, lt=1.0)
    enabled: bool = True


@register
class BiasCorrect(Op):
    """Bias correction of a momentum (and optionally a second moment), folded into the step.

    Costs no memory pass: the factor is a host-side scalar carried to the next stage that
    needs it (usually `lr`, which folds it into the step size).

    Math:
        out = x * sqrt(1 - beta2^t) / (1 - beta1^t)       (t: the route's step count, from 1)

    Args:
        beta1: decay of the first moment whose bias is removed (0: none).
        beta2: decay of a second moment whose root divided the update (0: none); SOAP and
            SOAP-Muon fold sqrt(1 - beta2^t) into the step size this way.
        enabled: false turns the stage into the identity (SOAP's correct_bias=false).

    Example:
        momentum(0.9) |> rms_normalize(0.999) |> bias_correct(0.9) |> lr

    References:
        Kingma & Ba, "Adam" (2015), Algorithm 1.
    """

    name = "bias_correct"
    Args = BiasCorrectArgs
    linear = True
    passes_quotient = True

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        if not self.args.enabled:  # type: ignore[attr-defined]
            return x
        b1 = self.hp("beta1", ctx.group)
        b2 = self.hp("beta2", ctx.group)
        # beta2 = 0 (Adam's form) leaves no second-moment factor: written as 1, not sqrt(1 - 0^t),
        # which torch.compile's GPU code generation (torch 2.11) folds into an integer it cannot cast
        root = math.sqrt(1.0 - b2**ctx.t) if b2 != 0 else 1.0
        ctx.scale *= root / (1.0 - b1**ctx.t)
        return x
