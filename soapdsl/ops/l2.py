"""l2: coupled L2 regularisation, added to the gradient."""

from __future__ import annotations

from pydantic import Field

from soapdsl.registry import Hyper, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class L2Args(OpArgs):
    weight_decay: Hyper = Field(0.0, ge=0.0)


@register
class L2(Op):
    """Coupled L2 regularisation (torch.optim.Adam's weight_decay).

    Adds the decay term to the update *and* to the raw gradient that later stages see (the
    second moment of `rms_normalize` includes it), exactly as if the loss carried
    0.5 * weight_decay * ||p||^2. Skipped when weight_decay is 0.

    Math:
        g <- g + weight_decay * p;   out = x + weight_decay * p

    Args:
        weight_decay: the L2 coefficient, >= 0.

    Example:
        l2(1e-4) |> momentum(0.9) |> rms_normalize(0.999) |> bias_correct(0.9) |> lr

    References:
        Krogh & Hertz (1992); torch.optim.Adam.
    """

    name = "l2"
    Args = L2Args

    def pointwise(self) -> bool:
        return True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        wd = self.hp("weight_decay", ctx.group)
        if wd == 0:
            return x
        p = ctx.param_slabs()
        out = [t.add(q.to(t.dtype), alpha=wd) for t, q in zip(x.ts, p, strict=True)]
        if x.ts is ctx.g or all(a is b for a, b in zip(x.ts, ctx.g, strict=True)):
            ctx.g = out
        else:
            ctx.g = [t.add(q.to(t.dtype), alpha=wd) for t, q in zip(ctx.g, p, strict=True)]
        return Val(out, owned=False)  # shared with ctx.g: later stages must not overwrite it
