"""ademamix: a fast and a slow EMA of the update, mixed (AdEMAMix's numerator)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from soapdsl.registry import Hyper, Int, Op, OpArgs, StateSpec, register
from soapdsl.runtime.context import Ctx, Val


class AdemamixArgs(OpArgs):
    beta1: Hyper = Field(0.9, ge=0.0, lt=1.0)
    beta3: Hyper = Field(0.9999, ge=0.0, lt=1.0)
    alpha: Hyper = Field(5.0, ge=0.0)
    alpha_warmup: Int = Field(0, ge=0)
    beta3_warmup: Int = Field(0, ge=0)


def alpha_at(t: int, alpha: float, warmup: int) -> float:
    """Linear warmup of alpha from 0 (off when warmup is 0)."""
    return min(t * alpha / warmup, alpha) if warmup > 0 else alpha


def beta3_at(t: int, beta1: float, beta3: float, warmup: int) -> float:
    """AdEMAMix's b3 scheduler: the half-life grows linearly from beta1's to beta3's."""
    if warmup <= 0 or beta3 <= 0.0:  # off, or capped at b3 = 0 by the min
        return beta3
    frac = t / warmup
    lb3 = math.log(beta3)
    if beta1 <= 0.0:
        # The formula's limit as ln b1 -> -inf: the half-life grows linearly from 0, so
        # b3(t) = b3^(T/t) (apple/ml-ademamix's log(b + 1e-8) guard lands within 1e-4 of it).
        return min(math.exp(lb3 / frac), beta3) if t > 0 else 0.0
    lb1 = math.log(beta1)
    return min(math.exp(lb1 * lb3 / ((1 - frac) * lb3 + frac * lb1)), beta3)


@register
class Ademamix(Op):
    """AdEMAMix's numerator: a bias-corrected fast EMA plus alpha times a slow, uncorrected EMA.

    Follow it with `rms_normalize` for AdEMAMix. Inside `rotate` both EMAs live in the
    eigenbasis and are re-rotated exactly on a refresh (SOAP + AdEMAMix).

    Math:
        m1 <- b1 m1 + (1 - b1) x
        m2 <- b3(t) m2 + (1 - b3(t)) x          (not bias-corrected: it fills slowly)
        out = m1 / (1 - b1^t) + alpha(t) m2
        alpha(t) = min(t alpha / T_alpha, alpha)                                   (T_alpha = alpha_warmup)
        b3(t) = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)        (T = beta3_warmup)
        A warmup of 0 is off.

    Args:
        beta1: the fast EMA's decay.
        beta3: the slow EMA's decay (0.9999 wants long runs; the paper suggests 0.999 for short ones).
        alpha: weight of the slow EMA (the paper: 4 to 10, 5 or 8 for LMs; implementations
            default to 2, 5 or 6).
        alpha_warmup: steps of alpha's linear warmup (the paper: the whole run).
        beta3_warmup: steps of b3's half-life warmup (the paper: the whole run).

    State:
        m1, m2: like the parameter.

    Example:
        ademamix(0.9, 0.9999, 5.0) |> rms_normalize(0.999, 1e-8) |> lr

    References:
        Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older" (2024).
    """

    name = "ademamix"
    Args = AdemamixArgs

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        return {"m1": StateSpec(shape), "m2": StateSpec(shape)}

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: AdemamixArgs = self.args  # type: ignore[assignment]
        b1 = self.hp("beta1", ctx.group)
        b3 = beta3_at(ctx.t, b1, self.hp("beta3", ctx.group), a.beta3_warmup)
        alpha = alpha_at(ctx.t, self.hp("alpha", ctx.group), a.alpha_warmup)
        st = ctx.state(self)
        m1, m2 = st["m1"], st["m2"]
        torch._foreach_lerp_(m1, x.ts, 1.0 - b1)
        torch._foreach_lerp_(m2, x.ts, 1.0 - b3)
        out = torch._foreach_mul(m1, 1.0 / (1.0 - b1**ctx.t))
        torch._foreach_add_(out, m2, alpha=alpha)
        return Val(list(out), owned=True)
