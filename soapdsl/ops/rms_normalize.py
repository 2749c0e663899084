"""rms_normalize: divide the update by the root of the raw gradient's second moment."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from soapdsl.registry import Float, Hyper, Op, OpArgs, StateSpec, register
from soapdsl.runtime.context import Ctx, Val


class RmsNormalizeArgs(OpArgs):
    beta: Hyper = Field(0.999, ge=0.0, lt=1.0)
    eps: Hyper = Field(1e-8, ge=0.0)
    eps_at: Literal["corrected", "raw"] = "corrected"
    correct: bool = True
    power: Float = Field(1.0, gt=0.0)
    keep_norm: bool = True
    whiten_grad: bool = False


@register
class RmsNormalize(Op):
    """Second-moment normalization: Adam's denominator, in the current basis.

    The second moment is kept of the *raw gradient* g in the coordinates of the enclosing scope
    (inside `rotate`, of the rotated gradient), whatever the stages before did to the update.

    Math:
        v <- beta * v + (1 - beta) * g^2,     c = 1 - beta^t (1 when correct=false)
        eps_at=corrected:  d = sqrt(v) / sqrt(c) + eps,  out = x / d    (torch.optim.Adam/AdamW)
        eps_at=raw:        d = sqrt(v) + eps,  out = sqrt(c) * x / d    (SOAP: eps on the raw root,
                                                                         correction folded into the step)
        power p != 1:      out = x / d^p, rescaled to ||x / d||_F when keep_norm (pSOAP)
        whiten_grad:       the stages after this one see g / d as their raw gradient

    Args:
        beta: decay of the second moment (Adam's beta2), in [0, 1).
        eps: added to the root, at the place eps_at names.
        eps_at: "corrected" adds eps to the bias-corrected root, "raw" to the raw root.
        correct: apply the bias correction sqrt(1 - beta^t).
        power: the power of the denominator d (pSOAP's p, in units of the root: d^p =
            (sqrt(v) + eps)^p, about v^(p/2); pAdam's q is p/2). 1 is Adam.
        keep_norm: with power != 1, rescale each parameter's output to the norm of x / d
            (pSOAP grafts SOAP's norm back). A zero x stays zero, where the reference
            divides 0 by 0.
        whiten_grad: pass the whitened gradient g / d on as the gradient of the later stages
            (iterative whitening: a second basis fed with the first's output, SOAP-SOAP).

    State:
        v: like the parameter (in the coordinates of the enclosing scope).

    Example:
        momentum(0.9) |> rms_normalize(0.999, 1e-8) |> bias_correct(0.9) |> lr

    References:
        Kingma & Ba, "Adam" (2015); Vyas et al., "SOAP" (2024), eps placement.
    """

    name = "rms_normalize"
    Args = RmsNormalizeArgs
    linear = True

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        return {"v": StateSpec(shape, basis="permute")}

    def pointwise(self) -> bool:
        # keep_norm rescales each parameter to a norm, when the power is not 1 (or may change)
        a: RmsNormalizeArgs = self.args  # type: ignore[assignment]
        return not a.keep_norm or (a.power == 1.0 and "power" not in self.dynamic)

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: RmsNormalizeArgs = self.args  # type: ignore[assignment]
        beta = self.hp("beta", ctx.group)
        eps = self.hp("eps", ctx.group)
        v = ctx.state(self)["v"]
        torch._foreach_mul_(v, beta)
        torch._foreach_addcmul_(v, ctx.g, ctx.g, value=1.0 - beta)
        root_c = math.sqrt(1.0 - beta**ctx.t) if a.correct else 1.0
        denom = list(torch._foreach_sqrt(v))
        if a.eps_at == "corrected":
            if root_c != 1.0:
                torch._foreach_div_(denom, root_c)
        elif root_c != 1.0:
            ctx.scale *= root_c
        torch._foreach_add_(denom, eps)
        if a.whiten_grad:
            ctx.g = list(torch._foreach_div(ctx.g, denom))
        if a.power != 1.0:
            return Val(self._powered(ctx, x.ts, denom, a.power, a.keep_norm), owned=True)
        # the division is left pending: `lr` fuses it into the parameter update (addcdiv), any
        # other stage carries it out first
        return Val(x.ts, owned=x.owned, denom=denom)

    @staticmethod
    def _powered(
        ctx: Ctx, xs: list[torch.Tensor], denom: list[torch.Tensor], p: float, keep: bool
    ) -> list[torch.Tensor]:
        out = list(torch._foreach_div(xs, torch._foreach_pow(denom, p)))
        if keep:
            target = ctx.norms(list(torch._foreach_div(xs, denom)))
            have = ctx.norms(out)
            # a zero x (a layer whose gradients are all zero so far) gives 0 / 0 in the
            # reference, which turns the parameter NaN for good; here it stays zero
            tiny = [h.clamp_min(torch.finfo(h.dtype).tiny) for h in have]
            torch._foreach_mul_(out, [t / h for t, h in zip(target, tiny, strict=True)])
        return out
