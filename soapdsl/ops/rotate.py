"""rotate: run a block in the eigenbasis of Kronecker-factored gradient statistics (SOAP's basis)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from pydantic import Field, field_validator

from soapdsl.errors import SoapArgumentError
from soapdsl.ir import const_text
from soapdsl.ops import _linalg as la
from soapdsl.registry import FirstStepHyper, Float, Int, Op, OpArgs, StateSpec, register, walk_ops
from soapdsl.runtime.context import Ctx, Val

Schedule = tuple[Union[tuple[int, int], int], ...]


class RotateArgs(OpArgs):
    side: Literal["both", "left", "right", "smaller", "larger"] = "both"
    freq: Union[Int, Schedule] = 10
    beta: FirstStepHyper = Field(0.95, lt=1.0)
    beta_fallback: FirstStepHyper = Field(0.95, ge=0.0, lt=1.0)
    max_dim: Union[Int, Literal["none"]] = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    skip_first: bool = False
    jitter: Float = Field(1e-30, ge=0.0)
    source: Literal["grad", "input"] = "grad"
    offset: Int = Field(0, ge=0)
    data_format: Literal["channels_first", "channels_last"] = "channels_first"
    share: str = ""
    share_size: Int = Field(2, ge=0)
    permute: Literal["all", "nested", "none"] = "all"
    eigh_dtype: Literal["auto", "fp64"] = "auto"

    @field_validator("freq")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a number of steps or a schedule")
        if isinstance(v, int):
            if v < 1:
                raise ValueError("must be >= 1")
            return v
        if not v:
            raise ValueError("a schedule needs at least its final period, e.g. (10,)")
        *segments, final = v
        if not isinstance(final, int) or isinstance(final, bool) or final < 1:
            raise ValueError("a schedule ends with the period used after its last segment (an int >= 1)")
        last = 0
        for seg in segments:
            if not isinstance(seg, tuple) or len(seg) != 2:
                raise ValueError("a schedule is ((until_step, every), ..., every)")
            until, every = seg
            if until < last or every < 1:
                raise ValueError("schedule segments need increasing until_steps and periods >= 1")
            last = until
        return v

    @field_validator("max_dim")
    @classmethod
    def _bound(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0, or none (no bound)")
        return v

    @field_validator("share")
    @classmethod
    def _regex(cls, v: str) -> str:
        if v:
            try:
                pattern = re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
            if pattern.groups != 1:
                raise ValueError("needs exactly one capturing group (the layer or expert index)")
        return v


def period(freq: Any, t: int) -> int:
    """The refresh period in force at step ``t`` of a frequency or a schedule."""
    if isinstance(freq, int):
        return freq
    *segments, final = freq
    for until, every in segments:
        if t <= until:
            return every
    return final


@register
class Rotate(Op):
    """Rotate into the eigenbasis of the gradient's Kronecker factors, run a block there, rotate back.

    A scope: `rotate(...) { block }`, or bare, `rotate(...) |> rest`, which scopes the rest of
    the pipeline. Inside, the update and the raw gradient are in rotated coordinates, and the
    state of the stages inside lives there too: when the basis is refreshed, first moments are
    re-rotated exactly and second moments are permuted by the new eigenvalue order (SOAP's
    choice; the stale magnitudes wash out through the EMA).

    Math:
        for each factored dim k:  GG_k <- b GG_k + (1 - b) G_(k) G_(k)^T      (b = beta, or
                                  beta_fallback when beta < 0, resolved at the parameter's
                                  first step and kept; G_(k) G_(k)^T contracts G with
                                  itself over every other dim; for a matrix, G G^T and G^T G)
        first basis: Q_k = eigenvectors of GG_k + jitter I, descending (fp64 retry on failure;
                     always fp64 with eigh_dtype=fp64)
        inside:  X -> X x_k Q_k^T (Q_L^T X Q_R for a matrix);  after the block: X -> X x_k Q_k
        shared (share=...): GG_k sums the statistics of every member of the group; one Q_k
        every `freq` steps (t % freq == offset % freq), after the update: sort Q_k's columns by
        diag(Q_k^T GG_k Q_k) descending, permute the block's second moments the same way
        (those of rotates nested in it too: dim k of their state is in this basis),
        then Q_k <- qr(GG_k Q_k).Q  (one power iteration)
        The factors are updated after the update, so the current gradient never shapes the
        basis it is rotated with.

    Args:
        side: the dims that get a factor: both (every dim), left (the first), right (the last),
            smaller / larger (of the first and last; a square matrix counts as right for
            smaller and left for larger, as the SOAP-Muon reference does).
        freq: refresh period in steps, or a schedule ((until_step, every), ..., every): e.g.
            ((100, 1), 10) refreshes every step up to step 100, then every 10 (the frequency
            warmup of the SOAP-Muon report's section 4).
        beta: EMA decay of the factors; negative means beta_fallback (SOAP's shampoo_beta=-1
            meaning beta2). The decay is resolved from the param_group at a parameter's first
            step and kept for it, as SOAP caches its resolved shampoo_beta: a later change of
            beta2 reaches the stages that follow it (Adam's second moment), not the factors.
        beta_fallback: used when beta is negative (read at the first step, as beta is).
        max_dim: a dim larger than this gets no factor (identity on that dim): a number >= 0,
            or none for no bound, so that every dim `side` names gets one (SOAP-Muon's "std"
            projection factors the smaller side whatever its size).
        merge_dims: merge consecutive dims while their product is <= max_dim (SOAP's option;
            a 50 x 100 matrix becomes one dim of 5000).
        precondition_1d: give vectors a full d x d factor (otherwise they are not rotated).
        skip_first: the first step only initialises the factors and the basis, and no stage
            updates anything (the SOAP and SOAP-Muon references' first step). Rotates nested
            in the block start their factors and bases on that step too, from the raw
            gradient (SOAP-SOAP's second basis, in soapsoap.py).
        jitter: added to the diagonal before the first eigendecomposition (SOAP: 1e-30).
        source: statistics of the raw gradient ("grad", SOAP) or of the value entering the
            scope ("input": iterative whitening, a second basis fed by the first's output; the
            stages inside then see that value's rotation as their gradient).
        offset: refresh when t % freq == offset % freq, so an offset of freq or more wraps
            around (with a schedule, freq is the period in force); SOAP-SOAP refreshes its
            second basis at freq/2.
        data_format: with merge_dims, "channels_last" 4-D tensors are permuted to NCHW first.
        share: a regular expression with one group capturing a layer (or expert) index in the
            parameter name, e.g. "blocks\\.(\\d+)\\."; parameters whose names agree except for
            index // share_size share one factor and one basis per dim: their statistics are
            summed, and each keeps its own state inside the block (its own second moment).
            Members of a group are stacked into one batch: they need equal shapes, dtypes and
            devices, and a batched route (checked when the optimizer is built). A parameter
            that does not require a gradient when the optimizer is built is left out: it never
            steps, so it adds nothing and holds nothing. Empty: no sharing. A pattern that
            matches none of a route's parameter names, or captures something other than a
            number (with share_size > 0), shares nothing: a SoapWarning says so.
        share_size: how many consecutive indices form a group (2: adjacent blocks); 0 puts
            every index in one group (all the experts of a layer).
        permute: which second moments a refresh permutes: "all" (the block's own and those of
            rotates nested in it), "nested" (only the nested rotates'), "none" (they keep the
            old order). First moments are re-rotated exactly whatever this says. soapsoap.py
            permutes with its first basis only the second moment of the second (nested) one,
            and with the second basis nothing: "nested" and "none" reproduce it.
        eigh_dtype: the precision of the first eigendecomposition: auto (the factor's, at least
            fp32) or fp64 (decomposed in float64, the basis cast back to the factor's dtype, as
            soapsoap.py does). Where a factor is rank-deficient (the larger side's factor of one
            gradient), its null-space eigenvectors depend on it, and so does every later step.

    State:
        GG{k}, Q{k}: a d_k x d_k factor and basis per factored dim k (one per share group,
            held by its first parameter that requires a gradient).
        ready (host): the basis exists.
        beta (host): the factors' decay, resolved at the parameter's first step.

    Example:
        momentum(0.95) |> rotate(both, freq=10) { rms_normalize(0.95, 1e-8, eps_at=raw) } |> lr

    References:
        Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (2024), Algorithm 3;
        Gupta et al., "Shampoo" (2018).
    """

    name = "rotate"
    Args = RotateArgs
    kind = "scope"
    linear = True

    # -- layout ---------------------------------------------------------------------------

    def _args(self) -> RotateArgs:
        return self.args  # type: ignore[return-value]

    def _max_dim(self) -> int:
        """The largest dim that gets a factor (``max_dim``; none: no bound)."""
        bound = self._args().max_dim
        return sys.maxsize if bound == "none" else int(bound)

    def inner_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        a = self._args()
        if not a.merge_dims or len(shape) < 2:
            return shape
        if len(shape) == 4 and a.data_format == "channels_last":
            shape = (shape[0], shape[3], shape[1], shape[2])
        return la.merge_shape(shape, self._max_dim())

    def reshape_note(self, shape: tuple[int, ...]) -> str:
        a = self._args()
        permuted = (
            " (channels_last: permuted to NCHW first)" if len(shape) == 4 and a.data_format == "channels_last" else ""
        )
        return (
            f"inside 'rotate', merge_dims=true merges consecutive dims while their product is <= max_dim={a.max_dim}"
            f"{permuted}: shape {list(shape)} is seen as {list(self.inner_shape(shape))}"
        )

    def factored(self, shape: tuple[int, ...]) -> list[int]:
        """Dims (of the inner shape) that get a factor and a basis."""
        a = self._args()
        inner = self.inner_shape(shape)
        if len(shape) == 0 or not inner:
            return []
        if len(shape) == 1:
            return [0] if a.precondition_1d and inner[0] <= self._max_dim() else []
        last = len(inner) - 1
        if a.side == "both":
            dims = list(range(len(inner)))
        elif a.side == "left":
            dims = [0]
        elif a.side == "right":
            dims = [last]
        elif a.side == "smaller":
            dims = [0] if inner[0] < inner[last] else [last]
        else:
            dims = [0] if inner[0] >= inner[last] else [last]
        return [k for k in dims if inner[k] <= self._max_dim()]

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        inner = self.inner_shape(shape)
        out = {}
        shared = bool(self._args().share)
        for k in self.factored(shape):
            out[f"GG{k}"] = StateSpec((inner[k], inner[k]), basis="none", shared=shared)
            out[f"Q{k}"] = StateSpec((inner[k], inner[k]), basis="none", shared=shared)
        return out

    def share_key(self, name: str) -> str:
        a = self._args()
        if not a.share:
            return name
        m = re.search(a.share, name)
        if m is None:
            return name
        index = m.group(1)
        group = "*" if a.share_size == 0 else str(int(index) // a.share_size) if index.isdigit() else index
        return f"{name[: m.start(1)]}<{group}>{name[m.end(1) :]}"

    def share_problem(self, names: Sequence[str]) -> str | None:
        a = self._args()
        if not a.share or len(names) < 2:  # (one parameter shares with nobody whatever it says)
            return None
        matches = [(n, m) for n in names if (m := re.search(a.share, n)) is not None]
        said = f"share={a.share!r}"
        if not matches:
            return (
                f"{said} matches none of the route's {len(names)} parameter names (such as"
                f" '{names[0]}'): every parameter keeps a basis of its own"
            )
        for name, m in matches if a.share_size != 0 else ():
            if not m.group(1).isdigit():
                return (
                    f"{said} captures '{m.group(1)}' in '{name}', not a layer index: only numbers are"
                    f" grouped by index // share_size ({a.share_size}), so names that differ there"
                    " never share a basis"
                )
        return None

    def host_state(self, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"ready": False, "beta": None}

    def host_problem(self, name: str, value: Any, initial: Any) -> str | None:
        if name != "beta" or value is None:
            return super().host_problem(name, value, initial)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"is a {type(value).__name__}, expected the factors' decay (a number in [0, 1)) or None"
        if not 0.0 <= value < 1.0:
            return f"is {const_text(value)}, outside [0, 1): the factors' decay"
        return None

    # -- helpers --------------------------------------------------------------------------

    def _to_inner(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        a = self._args()
        if a.merge_dims and len(shape) == 4 and a.data_format == "channels_last":
            t = t.permute(0, 1, 4, 2, 3)
        return t.reshape(t.size(0), *self.inner_shape(shape))

    def _from_inner(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        a = self._args()
        if a.merge_dims and len(shape) == 4 and a.data_format == "channels_last":
            n, c, h, w = shape[0], shape[3], shape[1], shape[2]
            return t.reshape(t.size(0), n, c, h, w).permute(0, 1, 3, 4, 2)
        return t.reshape(t.size(0), *shape)

    def _members(self, ctx: Ctx, j: int, t: torch.Tensor) -> torch.Tensor:
        """Per-group tensor [G, ...] -> per-member [B, ...] (identity without sharing)."""
        gidx = ctx.buckets[j].groups.get(self.path)
        return t if gidx is None else t.index_select(0, gidx)

    def _qs(self, ctx: Ctx, j: int, shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
        st = ctx.state(self)
        return {k: self._members(ctx, j, st[f"Q{k}"][j]) for k in self.factored(shape)}

    def _decay(self, ctx: Ctx) -> float:
        """The factors' EMA decay: resolved at the parameter's first step, then kept.

        ALGORITHMS.md 2.2: SOAP's per-parameter state holds "the resolved shampoo_beta" (beta2
        when shampoo_beta < 0), fixed when the parameter first steps. A state saved before
        soapdsl kept it (no host value) resolves it at its next step.
        """
        beta = ctx.get_host(self, "beta", None)
        if beta is None:
            beta = self.hp("beta", ctx.group)
            if beta < 0:
                beta = self.hp("beta_fallback", ctx.group)
            beta = float(beta)
            ctx.set_host(self, "beta", beta)
        return float(beta)

    def _update_factors(self, ctx: Ctx, sources: list[torch.Tensor]) -> None:
        beta = self._decay(ctx)
        st = ctx.state(self)
        for j, (b, src) in enumerate(zip(ctx.buckets, sources, strict=True)):
            gidx = b.groups.get(self.path)
            for k in self.factored(b.shape):
                gg = st[f"GG{k}"][j]
                stats = la.factor_stats(src.to(gg.dtype), k)
                if gidx is not None:  # a share group sums its members' statistics
                    stats = torch.zeros_like(gg).index_add_(0, gidx, stats)
                gg.lerp_(stats, 1.0 - beta)

    def _init_bases(self, ctx: Ctx) -> None:
        st = ctx.state(self)
        jitter = self._args().jitter
        fp64 = self._args().eigh_dtype == "fp64"

        def basis(m: torch.Tensor) -> tuple[torch.Tensor]:
            return (la.eigh_desc(m.double() if fp64 else m, jitter)[1].to(m.dtype),)

        for j, b in enumerate(ctx.buckets):
            for k in self.factored(b.shape):
                gg = st[f"GG{k}"][j]
                d = gg.size(-1)
                try:
                    (vecs,) = ctx.per_matrix(basis, [gg], [((d, d), gg.dtype)], float(d) ** 3)
                except torch.linalg.LinAlgError:
                    raise self._eigh_error(ctx, j, gg) from None
                st[f"Q{k}"][j].copy_(vecs)
        ctx.set_host(self, "ready", True)

    def _eigh_error(self, ctx: Ctx, j: int, gg: torch.Tensor) -> SoapArgumentError:
        """The error for factors of bucket ``j`` that ``eigh`` failed on, naming their parameters.

        Only here, after a failure, are the factors read on the host: the normal path never
        synchronises (a NaN gradient fails ``eigh`` on a CPU; see docs/recipes.md for a GPU).
        """
        names = self._nonfinite_names(ctx, j, gg)
        finite = not names  # then the solver itself failed, on every member alike
        return la.decomposition_error(
            self.name, "the eigenbasis", names or list(ctx.buckets[j].names), finite, getattr(self, "loc", None)
        )

    def _refresh_error(self, ctx: Ctx, jks: list[tuple[int, int]]) -> SoapArgumentError:
        """The error for a refresh that failed, naming every parameter whose factors hold non-finite values."""
        st = ctx.state(self)
        names: list[str] = []
        for j, k in jks:
            names += [n for n in self._nonfinite_names(ctx, j, st[f"GG{k}"][j]) if n not in names]
        if not names:  # refresh_basis raises for non-finite factors only; kept honest all the same
            j, k = jks[0]
            return self._eigh_error(ctx, j, st[f"GG{k}"][j])
        return la.decomposition_error(self.name, "the eigenbasis", names, False, getattr(self, "loc", None))

    def _nonfinite_names(self, ctx: Ctx, j: int, gg: torch.Tensor) -> list[str]:
        """The parameters of bucket ``j`` whose factors (``gg``, per member or per share group) hold NaN or inf."""
        b = ctx.buckets[j]
        bad = la.nonfinite(gg)
        gidx = b.groups.get(self.path)
        slots = list(range(b.size)) if gidx is None else gidx.tolist()
        return [n for n, slot in zip(b.names, slots, strict=True) if slot in bad]

    def _grad_sources(self, ctx: Ctx) -> list[torch.Tensor]:
        return [self._to_inner(g, b.shape) for g, b in zip(ctx.g, ctx.buckets, strict=True)]

    # -- hooks ----------------------------------------------------------------------------

    def check_placement(self) -> str | None:
        a = self._args()
        if a.skip_first and (getattr(self, "depth", 0) > 0 or a.source != "grad"):
            return (
                "skip_first needs a top-level rotate over the raw gradient (source=grad): the step is"
                " skipped before the pipeline runs"
            )
        return None

    def before(self, ctx: Ctx) -> bool:
        self._decay(ctx)  # at the parameter's first step, also for a scope that first runs later
        a = self._args()
        if not a.skip_first or ctx.get_host(self, "ready"):
            return True
        # skip_first: the first step only starts the factors and the bases, this rotate's and
        # those nested in it, from the raw gradient
        nested = [op for op in walk_ops(self.body) if isinstance(op, Rotate)]  # type: ignore[attr-defined]
        for rot in (self, *nested):
            if not ctx.get_host(rot, "ready"):
                rot._update_factors(ctx, rot._grad_sources(ctx))
                rot._init_bases(ctx)
        return False

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a = self._args()
        if a.source == "input":
            x = ctx.materialize(x)
            sources = [self._to_inner(t, b.shape) for t, b in zip(x.ts, ctx.buckets, strict=True)]
        else:
            sources = self._grad_sources(ctx)
        if not ctx.get_host(self, "ready"):
            self._update_factors(ctx, sources)
            self._init_bases(ctx)
            ctx.scratch[(self.path, "factors_done")] = True
        ctx.scratch[(self.path, "sources")] = sources
        outer_g = ctx.g
        xr: list[torch.Tensor] = []
        gr: list[torch.Tensor] = []
        shared_with_g = False
        for j, (b, t) in enumerate(zip(ctx.buckets, x.ts, strict=True)):
            qs = self._qs(ctx, j, b.shape)
            if a.source == "grad":
                gr.append(la.rotate(sources[j], qs))
                if t is ctx.g[j] and qs:  # the value is the raw gradient: rotate it once
                    xr.append(gr[j])
                    shared_with_g = True
                    continue
            inner = self._to_inner(t, b.shape)
            # a rotation makes a fresh tensor; an identity rotation must not hand the block a
            # view of state it could overwrite (the momentum buffer, say)
            xr.append(la.rotate(inner, qs) if qs else (inner if x.owned else inner.clone()))
        ctx.g = xr if a.source == "input" else gr
        # with source=input the value doubles as the block's gradient: the block may not overwrite it
        owned = a.source != "input" and not shared_with_g
        y = ctx.run(self.body, Val(xr, owned=owned))  # type: ignore[attr-defined]
        ctx.g = outer_g
        out = [
            self._from_inner(la.unrotate(t, self._qs(ctx, j, b.shape)), b.shape)
            for j, (b, t) in enumerate(zip(ctx.buckets, y.ts, strict=True))
        ]
        return Val(out, owned=True)

    def after(self, ctx: Ctx) -> None:
        sources = ctx.scratch.pop((self.path, "sources"), None)
        if ctx.scratch.pop((self.path, "factors_done"), False) or sources is None:
            return
        self._update_factors(ctx, sources)
        a = self._args()
        every = period(a.freq, ctx.t)
        if ctx.t % every == a.offset % every:
            self._refresh(ctx)

    def _moved_state(self, shape: tuple[int, ...], k: int) -> list[tuple[Op, tuple[int, ...], bool]]:
        """The ops whose state a refresh of dim ``k`` moves, each with the shape it sees and
        whether it sits in a rotate nested in this one. The walk enters a nested rotate only
        where dim k of its state is in this basis: the nested rotate does not factor dim k
        itself and sees the same shape (merged dims would renumber them)."""
        out: list[tuple[Op, tuple[int, ...], bool]] = []

        def walk(ops: list[Op], inner: tuple[int, ...], nested: bool) -> None:
            for op in ops:
                out.append((op, inner, nested))
                for branch in getattr(op, "branches", {}).values():
                    walk(branch, inner, nested)
                body = getattr(op, "body", None)
                if body and isinstance(op, Rotate) and op.inner_shape(inner) == inner and k not in op.factored(inner):
                    walk(body, inner, True)

        walk(list(self.body), self.inner_shape(shape), False)  # type: ignore[attr-defined]
        return out

    def _refresh(self, ctx: Ctx) -> None:
        st = ctx.state(self)
        permute = self._args().permute
        # every factor's new basis first (split across ranks, one batch's results travelling
        # while the next is computed), then the state moved into them
        jks = [(j, k) for j, b in enumerate(ctx.buckets) for k in self.factored(b.shape)]
        items = []
        for j, k in jks:
            q, d = st[f"Q{k}"][j], st[f"Q{k}"][j].size(-1)
            like = [((d, d), q.dtype), ((d,), torch.int64)]
            items.append((la.refresh_basis, [st[f"GG{k}"][j], q], like, float(d) ** 3))
        try:
            bases = dict(zip(jks, ctx.per_matrix_many(items), strict=True))
        except torch.linalg.LinAlgError:  # a factor turned non-finite (CPU): name its parameters
            raise self._refresh_error(ctx, jks) from None
        for j, b in enumerate(ctx.buckets):
            for k in self.factored(b.shape):
                q_group = st[f"Q{k}"][j]
                q_new_group, idx_group = bases[(j, k)]
                q_old = self._members(ctx, j, q_group)
                q_new = self._members(ctx, j, q_new_group)
                idx = self._members(ctx, j, idx_group)
                for op, inner, nested in self._moved_state(b.shape, k):
                    specs = op.state(inner)
                    for name, tensors in ctx.state(op).items():
                        spec = specs.get(name)
                        if spec is None or spec.basis == "none" or tensors[j] is None:
                            continue
                        t = tensors[j]
                        axes = spec.axes if spec.axes is not None else tuple(range(len(spec.shape)))
                        if k not in axes:
                            continue
                        dim = axes.index(k)
                        if spec.basis == "permute":
                            if permute == "all" or (permute == "nested" and nested):
                                t.copy_(la.permute_dim(t, idx, dim))
                        else:
                            t.copy_(la.mode_mul(la.mode_mul(t, q_old, dim), q_new.mT, dim))
                q_group.copy_(q_new_group)
