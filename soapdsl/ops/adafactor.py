"""adafactor: normalization by a factored (row x column) second moment."""

from __future__ import annotations

from pydantic import Field

from soapdsl.registry import Float, Hyper, Op, OpArgs, StateSpec, register
from soapdsl.runtime.context import Ctx, Val


class AdafactorArgs(OpArgs):
    beta: Hyper = Field(0.999, ge=0.0, lt=1.0)
    eps: Float = Field(1e-30, ge=0.0)
    correct: bool = True


@register
class Adafactor(Op):
    """Adafactor's factored second moment: row and column EMAs of g^2 instead of a full v.

    Over the last two dims of a tensor (a batch of matrices for more dims); parameters with
    fewer than two dims keep a full second moment. In the eigenbasis of Shampoo's factors this
    is the idealized Adafactor that equals Shampoo with power 1/2 (SOAP paper, Claim 1).

    Math:
        r <- beta r + (1 - beta) sum_j (g^2 + eps)_ij,   c <- beta c + (1 - beta) sum_i (g^2 + eps)_ij
        V = r c^T / sum(r)  (divided by 1 - beta^t when correct)
        out = x / sqrt(V)

    Args:
        beta: decay of the row and column moments.
        eps: added to g^2 (Adafactor's eps1).
        correct: bias-correct V.

    State:
        row, col: the factored moments (a full v for parameters with fewer than two dims);
            inside `rotate` they are permuted with the basis on a refresh, like a full second
            moment.

    Example:
        momentum(0.9) |> adafactor(0.999) |> bias_correct(0.9) |> lr

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (2018).
    """

    name = "adafactor"
    Args = AdafactorArgs

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        if len(shape) < 2:
            return {"v": StateSpec(shape, basis="permute")}
        n = len(shape)
        return {
            "row": StateSpec((*shape[:-1],), basis="permute", axes=tuple(range(n - 1))),
            "col": StateSpec((*shape[:-2], shape[-1]), basis="permute", axes=(*range(n - 2), n - 1)),
        }

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: AdafactorArgs = self.args  # type: ignore[assignment]
        beta = self.hp("beta", ctx.group)
        c = 1.0 - beta**ctx.t if a.correct else 1.0
        st = ctx.state(self)
        out = []
        for j, (b, g, t) in enumerate(zip(ctx.buckets, ctx.g, x.ts, strict=True)):
            g2 = g.square().add_(a.eps)
            if len(b.shape) < 2:
                v = st["v"][j]
                v.lerp_(g2, 1.0 - beta)
                out.append(t / (v / c).sqrt())
                continue
            row, col = st["row"][j], st["col"][j]
            row.lerp_(g2.sum(-1), 1.0 - beta)
            col.lerp_(g2.sum(-2), 1.0 - beta)
            denom = row.sum(-1, keepdim=True).unsqueeze(-1)
            v = row.unsqueeze(-1) * col.unsqueeze(-2) / denom
            out.append(t / (v / c).sqrt())
        return Val(out, owned=True)
