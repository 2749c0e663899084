"""sqrt_whiten: elementwise signed square root, then restore a norm (SOAP-Muon's fix)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from soapdsl.registry import Float, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class SqrtWhitenArgs(OpArgs):
    target: Literal["input", "semi_orthogonal", "unit", "rms"] = "input"
    power: Float = Field(0.5, gt=0.0)


@register
class SqrtWhiten(Op):
    """Signed elementwise root, then rescale each parameter's update to a target norm.

    An instantaneous analogue of pAdam with p = 1/2: a more conservative whitening than
    signSGD. Elementwise, so it depends on the basis: inside `rotate` it acts in the eigenbasis,
    where SOAP-Muon applies it.

    Math:
        y = sign(x) * |x|^power
        out = y / ||y||_F * n, with n per parameter:
          input            ||x||_F (the norm the stage received)
          semi_orthogonal  sqrt(min(m, n)), the norm of an m x n matrix with unit singular values
                           (for more dims, n is the product of the trailing dims)
          unit             1
          rms              sqrt(numel), so the update has RMS 1

    Args:
        target: the norm restored.
        power: the elementwise power (0.5: square root; 1: only the renormalisation).

    Example:
        rotate(left, freq=40) |> sqrt_whiten |> newton_schulz(5) |> graft(norm)

    References:
        Vyas et al., "Improving SOAP using iterative whitening and Muon" (2025), section 2.1;
        Chen et al., "Closing the generalization gap of adaptive gradient methods" (2020), pAdam.
    """

    name = "sqrt_whiten"
    Args = SqrtWhitenArgs

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: SqrtWhitenArgs = self.args  # type: ignore[assignment]
        in_norms = ctx.norms(x.ts) if a.target == "input" else None
        ys = [t.sign() * t.abs().pow(a.power) if a.power != 1.0 else t.clone() for t in x.ts]
        norms = ctx.norms(ys)
        out = []
        for j, (b, y, n) in enumerate(zip(ctx.buckets, ys, norms, strict=True)):
            if a.target == "input":
                target: torch.Tensor | float = in_norms[j]  # type: ignore[index]
            elif a.target == "unit":
                target = 1.0
            elif a.target == "rms":
                target = math.sqrt(math.prod(b.shape))
            else:
                if len(b.shape) < 2:
                    target = 1.0
                else:
                    target = math.sqrt(min(b.shape[0], math.prod(b.shape[1:])))
            out.append(y.mul_(target / n.clamp(min=torch.finfo(n.dtype).tiny)))
        return Val(out, owned=True)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        if self.args.target == "semi_orthogonal" and len(shape) < 2:  # type: ignore[attr-defined]
            return f"'sqrt_whiten(target=semi_orthogonal)' needs a matrix (ndim >= 2), got shape {list(shape)}"
        return None
