"""momentum: exponential moving average (or SGD-style accumulation) of the update."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from soapdsl.registry import Hyper, Op, OpArgs, StateSpec, register
from soapdsl.runtime.context import Ctx, Val, lerp, scale_, scaled_add


class MomentumArgs(OpArgs):
    beta: Hyper = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    kind: Literal["ema", "sgd"] = "ema"


@register
class Momentum(Op):
    """Momentum: an EMA of the update, optionally with a Nesterov look-ahead.

    Math:
        ema:  m <- beta * m + (1 - beta) * x      (Adam's first moment; torch.optim.Muon's buffer)
        sgd:  m <- beta * m + x                   (torch.optim.SGD, Modded-NanoGPT's Muon)
        out = m, or with nesterov: ema: (1 - beta) * x + beta * m;  sgd: x + beta * m

    Args:
        beta: decay of the moving average, in [0, 1).
        nesterov: return the Nesterov look-ahead instead of the buffer.
        kind: "ema" (convex combination) or "sgd" (accumulating sum).

    State:
        buf: like the parameter (in the coordinates of the enclosing scope).

    Example:
        momentum(0.95, nesterov=true) |> newton_schulz(5) |> lr

    References:
        Polyak (1964); Nesterov (1983); Kingma & Ba, "Adam" (2015).
    """

    name = "momentum"
    Args = MomentumArgs

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        return {"buf": StateSpec(shape)}

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: MomentumArgs = self.args  # type: ignore[assignment]
        beta = self.hp("beta", ctx.group)
        buf = ctx.state(self)["buf"]
        if a.kind == "ema":
            lerp(buf, x.ts, 1.0 - beta, out=True)
        else:
            scale_(buf, beta)
            torch._foreach_add_(buf, x.ts)
        if not a.nesterov:
            return Val(buf, owned=False)
        if a.kind == "ema":
            return Val(lerp(x.ts, buf, beta), owned=True)
        return Val(scaled_add(x.ts, buf, beta), owned=True)
