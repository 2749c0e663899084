"""clip: rescale the update so its norm does not exceed a bound."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from soapdsl.registry import Hyper, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class ClipArgs(OpArgs):
    max_norm: Hyper = Field(1.0, gt=0.0)
    per: Literal["tensor", "route"] = "tensor"
    eps: float = Field(1e-6, ge=0.0)


@register
class Clip(Op):
    """Clip by norm, per parameter or over all parameters of the route.

    No host-device synchronisation: the factor stays a tensor.

    Math:
        c = min(1, max_norm / (||x|| + eps));   out = c * x
        per=tensor: ||x|| is each parameter's Frobenius norm;
        per=route: the norm of all the route's updates together (torch.nn.utils.clip_grad_norm_);
            a step without some parameter's gradient takes the norm of those present, as
            clip_grad_norm_ does; but then the parameters' step counts differ, and a later
            step with gradients of parameters whose counts differ is an error, not a norm
            split by step count: give every parameter of the route a gradient at every step.

    Args:
        max_norm: the bound, > 0.
        per: "tensor" or "route".
        eps: added to the norm (torch's clip_grad_norm_ uses 1e-6).

    Example:
        clip(1.0) |> momentum(0.9) |> lr

    References:
        Pascanu et al., "On the difficulty of training recurrent neural networks" (2013).
    """

    name = "clip"
    Args = ClipArgs

    def reduces_over_route(self) -> bool:
        return self.args.per == "route"  # type: ignore[attr-defined]

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: ClipArgs = self.args  # type: ignore[assignment]
        max_norm = self.hp("max_norm", ctx.group)
        norms = ctx.norms(x.ts)
        if a.per == "route":
            sq = [n.square().sum() for n in norms]
            total = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
            coef = (max_norm / (total + a.eps)).clamp(max=1.0)
            coefs = [coef.to(t.device) for t in x.ts]
        else:
            coefs = [(max_norm / (n + a.eps)).clamp(max=1.0) for n in norms]
        out = ctx.writable(x)
        torch._foreach_mul_(out, coefs)
        return Val(out, owned=True)
