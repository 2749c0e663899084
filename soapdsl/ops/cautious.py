"""cautious: keep only the update components whose sign agrees with the gradient."""

from __future__ import annotations

from pydantic import Field

from soapdsl.registry import Float, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class CautiousArgs(OpArgs):
    rescale: bool = True
    min_fraction: Float = Field(1e-3, gt=0.0, le=1.0)


@register
class Cautious(Op):
    """Cautious masking: zero the components of the update that disagree in sign with the gradient.

    The gradient is the raw one in the current basis (inside `rotate`, the rotated gradient).
    The mask's mean is a tensor: no host synchronisation.

    Math:
        mask = 1[x * g > 0]
        rescale: mask <- mask / max(mean(mask), min_fraction)      (per parameter)
        out = x * mask

    Args:
        rescale: divide by the kept fraction, so the update keeps its scale.
        min_fraction: floor of the kept fraction in the rescale (the reference uses 1e-3).

    Example:
        momentum(0.9) |> rms_normalize(0.999) |> bias_correct(0.9) |> cautious |> lr

    References:
        Liang, Chen, Liu & Liu, "Cautious Optimizers: Improving Training with One Line of Code" (2025).
    """

    name = "cautious"
    Args = CautiousArgs
    homogeneous = True  # the mask depends on signs: cautious(c x) = c cautious(x) for c > 0 only

    def pointwise(self) -> bool:
        return not self.args.rescale  # type: ignore[attr-defined]  # rescale takes a mean per parameter

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: CautiousArgs = self.args  # type: ignore[assignment]
        out = []
        for b, t, g in zip(ctx.buckets, x.ts, ctx.g, strict=True):
            mask = (t * g > 0).to(t.dtype)
            if a.rescale:
                if b.stacked:
                    frac = mask.reshape(mask.size(0), -1).mean(1).view(-1, *([1] * (mask.dim() - 1)))
                else:
                    frac = mask.mean() if mask.numel() else mask.sum()
                mask = mask / frac.clamp(min=a.min_fraction)
            out.append(t * mask)
        return Val(out, owned=True)
