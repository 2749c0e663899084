"""shape_scale: scale each matrix's update by a factor of its shape (Muon's lr adjustments)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from soapdsl.registry import Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class ShapeScaleArgs(OpArgs):
    mode: Literal["original", "match_rms_adamw", "spectral", "none"] = "original"
    dims: Literal["first", "last"] = "first"


def factor(mode: str, a: int, b: int) -> float:
    if a == 0 or b == 0:  # an empty matrix: nothing to scale
        return 1.0
    if mode == "original":
        return math.sqrt(max(1.0, a / b))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    if mode == "spectral":
        return math.sqrt(a / b)
    return 1.0


@register
class ShapeScale(Op):
    """Multiply each parameter's update by a function of its shape (A x B = its two named dims).

    Costs no memory pass when all parameters of the cohort share the factor.

    Math:
        original:         sqrt(max(1, A / B))          (Keller Jordan's Muon; torch.optim.Muon's default)
        match_rms_adamw:  0.2 * sqrt(max(A, B))        (Moonshot: reuse AdamW's lr and weight decay)
        spectral:         sqrt(A / B)                  (dion's spectral_norm: fan_out / fan_in)
        none:             1

    Args:
        mode: the rule above.
        dims: which dims are A and B: "first" (shape[:2], torch.optim.Muon) or "last"
            (shape[-2:], Keller Jordan's muon_update, which for a conv kernel reads kh, kw).

    Example:
        momentum(0.95, nesterov=true) |> newton_schulz(5) |> shape_scale(original) |> lr

    References:
        Jordan et al., "Muon" (2024); Liu et al., "Muon is Scalable for LLM Training" (2025).
    """

    name = "shape_scale"
    Args = ShapeScaleArgs
    kind = "matrix"
    linear = True

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: ShapeScaleArgs = self.args  # type: ignore[assignment]
        factors = []
        for b in ctx.buckets:
            d0, d1 = (b.shape[0], b.shape[1]) if a.dims == "first" else (b.shape[-2], b.shape[-1])
            factors.append(factor(a.mode, d0, d1))
        if len(set(factors)) == 1:
            ctx.scale *= factors[0]
            return x
        x = ctx.materialize(x)
        out = ctx.writable(x)
        torch._foreach_mul_(out, factors)
        return Val(out, owned=True)
