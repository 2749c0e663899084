"""graft: give the update the norm of another point of the pipeline (or of a parallel branch)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from soapdsl.ir import Pipeline
from soapdsl.registry import Float, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class GraftArgs(OpArgs):
    mode: Literal["norm", "rms"] = "norm"
    source: str | Pipeline | None = Field(None, alias="from")
    eps: Float = Field(1e-16, ge=0.0)


@register
class Graft(Op):
    """Grafting: keep the update's direction, take its magnitude from a reference.

    The reference is, per parameter: the input of the stage before `graft` (default), the
    output of an earlier stage labelled with `as NAME` (`from=NAME`), or a parallel branch
    `from={ ... }` applied to the input of the stage before `graft` (Adam grafting for Shampoo:
    the branch keeps its own state). When the stage before `graft` reports that it is not ready
    yet (Shampoo before its first preconditioner), the branch's output is used as it is.

    Math:
        norm: out = x * ||r||_F / (||x||_F + eps)
        rms:  out = x * RMS(r) / (||x||_F + eps)      (unit direction scaled by r's RMS,
                                                       SOAP-Muon's graft2 variant)

    Args:
        mode: "norm" or "rms".
        from: a label of an earlier stage (of this pipeline or, inside a scope, of the
            pipelines around it, before the scope), or a pipeline block; default the input of
            the preceding stage.
        eps: guards the division (DistributedShampoo: 1e-16).

    Example:
        momentum(0.9) |> newton_schulz(5) |> graft(norm)

    References:
        Agarwal et al., "Disentangling Adaptive Gradient Methods from Learning Rates" (2020);
        Shi et al., "A Distributed Data-Parallel PyTorch Implementation of Shampoo" (2023).
    """

    name = "graft"
    Args = GraftArgs

    @property
    def scale_invariant(self) -> bool:  # type: ignore[override]
        """drops a positive one with eps=0 (exactly invariant only without eps)."""
        return self.args.eps == 0  # type: ignore[attr-defined]

    def source(self) -> tuple[str, str | None]:
        src = self.args.source  # type: ignore[attr-defined]
        if isinstance(src, str):
            return ("output", src)
        return ("input", None)

    def record(self, ctx: Ctx, x: Val) -> None:
        """Called by the executor at the reference point with the (materialized) value there."""
        branch = getattr(self, "branches", {}).get("from")
        ref = x
        if branch:
            saved, ctx.scale = ctx.scale, 1.0
            ref = ctx.materialize(ctx.run(branch, Val(x.ts, owned=False)))
            ctx.scale = saved
        ctx.probes[id(self)] = (ctx.norms(ref.ts), ref.ts if branch else None)

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: GraftArgs = self.args  # type: ignore[assignment]
        ref_norms, branch_out = ctx.probes.pop(id(self))
        if ctx.scratch.pop("unready", False) and branch_out is not None:
            return Val(list(branch_out), owned=False)
        norms = ctx.norms(x.ts)
        coefs: list[Any] = []
        for b, r, n in zip(ctx.buckets, ref_norms, norms, strict=True):
            r = r.reshape(n.shape)  # a label outside a scope was measured in the outer layout
            target = r / math.sqrt(max(1, math.prod(b.shape))) if a.mode == "rms" else r
            coefs.append(target / (n + a.eps).clamp(min=torch.finfo(n.dtype).tiny))
        out = ctx.writable(x)
        torch._foreach_mul_(out, coefs)
        return Val(out, owned=True)
