"""renorm: rescale each parameter's update to unit RMS or unit norm."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from soapdsl.registry import Float, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class RenormArgs(OpArgs):
    target: Literal["rms", "fro"] = "rms"
    eps: Float = Field(1e-30, ge=0.0)
    enabled: bool = True


@register
class Renorm(Op):
    """Per-parameter normalisation of the update (SOAP's normalize_grads; the OLMo SOAP-Muon's RMS 1).

    Math:
        rms: out = x / (eps + RMS(x))          RMS(x) = ||x||_F / sqrt(numel)
        fro: out = x / (eps + ||x||_F)

    Args:
        target: "rms" (unit RMS) or "fro" (unit Frobenius norm).
        eps: guards the division (SOAP: 1e-30); an all-zero update stays zero.
        enabled: false makes the stage the identity (a recipe switch).

    Example:
        momentum(0.9) |> sign |> renorm(rms) |> lr

    References:
        Vyas et al., "SOAP" (2024), normalize_grads.
    """

    name = "renorm"
    Args = RenormArgs

    @property
    def linear(self) -> bool:  # type: ignore[override]
        """passes it on with enabled=false (the stage is then the identity)."""
        return not self.args.enabled  # type: ignore[attr-defined]

    @property
    def scale_invariant(self) -> bool:  # type: ignore[override]
        """drops a positive one with eps=0 (exactly invariant only without eps)."""
        return self.args.enabled and self.args.eps == 0  # type: ignore[attr-defined]

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: RenormArgs = self.args  # type: ignore[assignment]
        if not a.enabled:
            return x
        norms = ctx.norms(x.ts)
        coefs = []
        for b, n in zip(ctx.buckets, norms, strict=True):
            if a.target == "rms":
                n = n / math.sqrt(max(1, math.prod(b.shape)))
            coefs.append(1.0 / (a.eps + n).clamp(min=torch.finfo(n.dtype).tiny))
        out = ctx.writable(x)
        torch._foreach_mul_(out, coefs)
        return Val(out, owned=True)
