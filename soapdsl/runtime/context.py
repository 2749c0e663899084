"""What an op sees while it runs: the value, the raw gradient, state, params, hyperparameters.

Execution is per *cohort*: the parameters of one route that share a step count. A cohort is a
list of *buckets*; in a batched route a bucket stacks parameters of equal shape along a new
leading dimension (one ``bmm``/``eigh``/Newton-Schulz for all of them), otherwise each
parameter is its own bucket and its tensors keep the parameter's shape. Elementwise ops treat
both alike and use ``torch._foreach_*`` over the bucket tensors.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from soapdsl.errors import Loc, SoapArgumentError
from soapdsl.ir import const_text

if TYPE_CHECKING:
    from soapdsl.registry import Op
    from soapdsl.runtime.dist import Item, Like, Splitter
    from soapdsl.runtime.graphs import GraphCache
    from soapdsl.runtime.rounding import Rounding

T = TypeVar("T")


#: the largest float16, the narrowest dtype of a parameter or a state tensor: a host-side factor
#: within it fits every tensor it may multiply, so checking one costs a comparison (written
#: -FITS <= x <= FITS, not abs(x) <= FITS: torch.compile turns the check into a guard on the
#: traced numbers, and sympy runs out of recursion expanding the abs of a bias correction)
FITS_EVERY_DTYPE = 65504.0


def _traced() -> bool:
    """Whether torch.compile is tracing the pipeline (a route with ``compile``). A host factor
    such as ``-lr * bias_correction`` then multiplies the tensors as a traced scalar, ``t * f``,
    instead of going in as a kernel's ``alpha=``/``value=`` argument or a ``_foreach`` scalar: those
    would make the compiled code hold that number as a constant, so a learning rate that an LR
    scheduler changes at every step would compile the route again at every step, eager again
    after torch's recompile limit."""
    return torch.compiler.is_compiling()


def eager(fn: Callable[..., T]) -> Callable[..., T]:
    """``torch.compiler.disable(fn)``, made at the first call: torch.compile, when it traces a
    call of the result, runs ``fn`` eagerly (a graph break). Decorating with
    ``torch.compiler.disable`` itself imports torch._dynamo, 1.5 s of a 3 s ``import soapdsl``
    on a CPU, for code that only runs when something is being compiled."""
    disabled: Callable[..., T] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


def lerp(
    starts: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float, out: bool = False
) -> list[torch.Tensor]:
    """``start + weight * (end - start)`` for each pair, as ``torch._foreach_lerp``; with ``out``
    into ``starts`` (in place). Traced (context ``_traced``), the weight multiplies the tensors,
    in torch's two forms of lerp, so that a weight that changes between steps (a momentum that
    OneCycleLR cycles) stays an input of the compiled code instead of a constant to compile for."""
    if not _traced():
        if out:
            torch._foreach_lerp_(list(starts), list(ends), weight)
            return list(starts)
        return list(torch._foreach_lerp(list(starts), list(ends), weight))
    res = []
    for a, b in zip(starts, ends, strict=True):
        v = a + weight * (b - a) if weight < 0.5 else b - (b - a) * (1.0 - weight)
        res.append(a.copy_(v) if out else v)
    return res


def scaled_add(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """``x + alpha * y`` for each pair, as ``torch._foreach_add(xs, ys, alpha=alpha)``; traced,
    ``alpha`` multiplies ``y`` (see :func:`lerp`)."""
    if not _traced():
        return list(torch._foreach_add(list(xs), list(ys), alpha=alpha))
    return [x + y * alpha for x, y in zip(xs, ys, strict=True)]


def scale_(ts: Sequence[torch.Tensor], factor: float) -> None:
    """``t *= factor`` for each tensor, as ``torch._foreach_mul_``; traced, one ``mul_`` each
    (see :func:`lerp`)."""
    if not _traced():
        torch._foreach_mul_(list(ts), factor)
        return
    for t in ts:
        t.mul_(factor)


@dataclass
class Val:
    """The value flowing through a pipeline: one tensor per bucket.

    ``owned`` says whether the tensors are temporaries that the next op may overwrite in
    place; state buffers and gradients are handed on with ``owned=False``.
    """

    ts: list[torch.Tensor]
    owned: bool = False
    #: a pending division: the value is ts / denom (rms_normalize hands it on so that `lr` can
    #: apply it with one fused addcdiv, as torch.optim.Adam does)
    denom: list[torch.Tensor] | None = None


@dataclass
class Bucket:
    params: list[torch.Tensor]
    shape: tuple[int, ...]
    stacked: bool  # True: tensors carry a leading batch dim of len(params)
    names: list[str] = field(default_factory=list)
    #: per op path: member -> slot of its share group in the op's shared state ([B] long), or
    #: None when every member is its own group
    groups: dict[str, torch.Tensor | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.params)


#: a tensor's gradient, dtype and device, for C-level ``map`` over a cohort's parameters (a step of
#: a model of many small tensors is host-bound); the runtime's modules share them
GRAD_OF = operator.attrgetter("grad")
DTYPE_OF = operator.attrgetter("dtype")
DEVICE_OF = operator.attrgetter("device")


@dataclass(frozen=True)
class Members:
    """A cohort's parameters as its steps read them, read once per layout: the layout is built
    again when a parameter's dtype or device changes (runtime/optimizer.py), and a step of a
    model of many small tensors is host-bound, so its writes compare a list here with one map
    over their updates instead of looping over the parameters."""

    params: list[torch.Tensor]  # bucket by bucket
    dtypes: list[torch.dtype]
    devices: list[torch.device]
    stacked: bool  # some bucket carries a leading batch dim

    @classmethod
    def of(cls, buckets: Sequence[Bucket]) -> Members:
        params = [p for b in buckets for p in b.params]
        return cls(params, list(map(DTYPE_OF, params)), list(map(DEVICE_OF, params)), any(b.stacked for b in buckets))


@dataclass
class Ctx:
    """Execution context of one cohort for one step."""

    group: Mapping[str, Any]  # the route's param_group (hyperparameters)
    t: int  # this step's count, 1-based
    buckets: list[Bucket]
    g: list[torch.Tensor]  # the raw gradient, in the current basis
    states: Mapping[str, dict[str, list[torch.Tensor]]]  # op path -> state name -> per bucket
    runner: Any  # executes op lists (scopes call back into it)
    scale: float = 1.0  # pending host-side factor of the value (see Op.linear)
    host: dict[str, Any] = field(default_factory=dict)  # the cohort's host-side state values
    host_changed: bool = False  # a stage changed host state: the layout is rebuilt next step
    scratch: dict[Any, Any] = field(default_factory=dict)  # per-step notes between hooks
    probes: dict[int, Any] = field(default_factory=dict)  # recorded reference values (graft)
    split: Splitter | None = None  # data parallel: splits matrix work across ranks (runtime/dist.py)
    graphs: GraphCache | None = None  # the route's CUDA graphs (route option cuda_graph; runtime/graphs.py)
    #: stochastic rounding of bfloat16 and float16 parameter writes (route option stochastic_round;
    #: runtime/rounding.py)
    rounding: Rounding | None = None
    #: the buckets' parameters, their dtypes and devices (the optimizer keeps them per cohort;
    #: read from the buckets when not given)
    members: Members | None = None
    _param_slabs: list[torch.Tensor] | None = field(default=None, repr=False)
    _host_writes: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- state ------------------------------------------------------------------------------

    def state(self, op: Op) -> dict[str, list[torch.Tensor]]:
        return self.states[op.path]

    def get_host(self, op: Op, name: str, *default: Any) -> Any:
        """Host-side state value (shared by the whole cohort); ``default``, if given, when the
        state lacks it (a state dict saved before the op declared it)."""
        key = op.state_key(name)
        if key in self._host_writes:
            return self._host_writes[key]
        return self.host.get(key, *default) if default else self.host[key]

    def set_host(self, op: Op, name: str, value: Any) -> None:
        """Set a host-side state value for every parameter of the cohort."""
        key = op.state_key(name)
        if key not in self.host or self.get_host(op, name) != value:
            self._host_writes[key] = value
            self.host_changed = True

    def per_matrix(
        self,
        fn: Callable[..., Sequence[torch.Tensor]],
        xs: Sequence[torch.Tensor],
        like: Sequence[Like],
        cost: float,
    ) -> list[torch.Tensor]:
        """``fn`` over batches [B, ...] whose matrices are independent (a decomposition, a
        Newton-Schulz iteration): here, or split across the ranks of a data-parallel run with
        every result on every rank. ``like``: each output's per-matrix (shape, dtype);
        ``cost``: one matrix's flops."""
        return self.per_matrix_many([(fn, xs, like, cost)])[0]

    def per_matrix_many(self, items: Sequence[Item]) -> list[list[torch.Tensor]]:
        """:meth:`per_matrix` of several batches (``(fn, xs, like, cost)`` each): split, one
        batch's results travel while the next is computed.

        The results are contiguous either way: a split result is rebuilt from bytes, where one
        computed here may have LAPACK's layout (a QR's Q is column-major), and a product with a
        float64 operand of another layout can round differently in its last bits.

        So are the inputs: a split hands each rank contiguous copies of its matrices, and a
        matrix product's last bits depend on its operands' layout too (a conv kernel rotated
        into its basis reaches Newton-Schulz strided), so here the batches are made contiguous
        as well, and one process computes what the ranks compute."""
        items = [(fn, [x.contiguous() for x in xs], like, cost) for fn, xs, like, cost in items]
        if self.split is None:
            outs = [list(fn(*xs)) for fn, xs, _, _ in items]
        else:
            outs = self.split.map_many(items)
        return [[o.contiguous() for o in item] for item in outs]

    # -- parameters -------------------------------------------------------------------------

    def _members(self) -> Members:
        if self.members is None:
            self.members = Members.of(self.buckets)
        return self.members

    @property
    def params(self) -> list[torch.Tensor]:
        """Flat list of the cohort's parameters, bucket by bucket (not to be changed)."""
        return self._members().params

    def param_slabs(self) -> list[torch.Tensor]:
        """Parameters laid out like the value (stacked copies in batched buckets; read-only).

        The copy is refreshed after any stage writes the parameters.
        """
        if self._param_slabs is None:
            self._param_slabs = [
                (torch.stack(b.params) if b.size > 1 else b.params[0].unsqueeze(0)) if b.stacked else b.params[0]
                for b in self.buckets
            ]
        return self._param_slabs

    def unbind(self, ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-parameter views of bucket tensors, aligned with :attr:`params`."""
        if not self._members().stacked and len(ts) == len(self.buckets):
            return list(ts)  # one tensor per parameter already
        out: list[torch.Tensor] = []
        for b, t in zip(self.buckets, ts, strict=True):
            out.extend(t.unbind(0) if b.stacked else (t,))
        return out

    def scale_params(self, factor: float, stage: str = "") -> None:
        """``p *= factor`` for every parameter of the cohort (``stage``: the writing op's path)."""
        self._param_slabs = None
        params = self.params
        rounding = self._rounding(params)
        if rounding is None:
            scale_(params, factor)
            return
        for p in params:
            if rounding.rounds(p):
                rounding.write(p, p.float().mul_(factor), self.t, stage)
            else:
                p.mul_(factor)

    def add_to_params(self, ts: Sequence[torch.Tensor], alpha: float, stage: str = "") -> None:
        """``p += alpha * x`` for every parameter, casting to the parameter dtype if needed."""
        self._param_slabs = None
        params = self.params
        updates = self.unbind(ts)
        rounding = self._rounding(params)
        if _traced():
            for p, u in zip(params, updates, strict=True):
                if rounding is not None and rounding.rounds(p):
                    rounding.write(p, p + u * alpha, self.t, stage)  # float32: u's dtype
                else:
                    p.add_(u.to(p.dtype) * alpha)
        elif rounding is not None:
            for p, u in zip(params, updates, strict=True):
                if rounding.rounds(p):
                    rounding.write(p, torch.add(p, u, alpha=alpha), self.t, stage)  # float32: u's dtype
                else:
                    p.add_(u.to(p.dtype), alpha=alpha)
        elif self._like_params(updates):
            torch._foreach_add_(params, updates, alpha=alpha)
        else:
            for p, u in zip(params, updates, strict=True):
                p.add_(u.to(p.dtype), alpha=alpha)

    def _like_params(self, ts: list[torch.Tensor]) -> bool:
        """Whether ``ts`` (one per parameter) have the parameters' dtypes and devices, so that
        one foreach call writes them."""
        m = self._members()
        return (
            len(ts) == len(m.params) and list(map(DTYPE_OF, ts)) == m.dtypes and list(map(DEVICE_OF, ts)) == m.devices
        )

    def _rounding(self, params: list[torch.Tensor]) -> Rounding | None:
        """The route's stochastic rounding where a write to ``params`` needs it (for the bfloat16
        and float16 ones among them), else None."""
        if self.rounding is not None and any(self.rounding.rounds(p) for p in params):
            return self.rounding
        return None

    # -- value helpers ----------------------------------------------------------------------

    def writable(self, x: Val) -> list[torch.Tensor]:
        """Tensors of ``x`` that may be overwritten: ``x``'s own if owned, else copies."""
        return x.ts if x.owned else [t.clone() for t in x.ts]

    def resolve(self, x: Val) -> Val:
        """Carry out a pending division (see Val.denom)."""
        if x.denom is None:
            return x
        if x.owned:
            torch._foreach_div_(x.ts, x.denom)
            return Val(x.ts, True)
        return Val(list(torch._foreach_div(x.ts, x.denom)), True)

    def addcdiv_to_params(
        self, num: Sequence[torch.Tensor], denom: Sequence[torch.Tensor], alpha: float, stage: str = ""
    ) -> None:
        """``p += alpha * num / denom`` for every parameter (one fused pass)."""
        self._param_slabs = None
        params = self.params
        nums, dens = self.unbind(num), self.unbind(denom)
        rounding = self._rounding(params)
        if _traced():
            for p, n, d in zip(params, nums, dens, strict=True):
                if rounding is not None and rounding.rounds(p):
                    rounding.write(p, p + n / d * alpha, self.t, stage)
                else:
                    p.add_((n / d).to(p.dtype) * alpha)
        elif rounding is not None:
            for p, n, d in zip(params, nums, dens, strict=True):
                if rounding.rounds(p):
                    rounding.write(p, torch.addcdiv(p, n, d, value=alpha), self.t, stage)
                else:
                    p.add_((n / d).to(p.dtype), alpha=alpha)
        elif self._like_params(nums):
            torch._foreach_addcdiv_(params, nums, dens, value=alpha)
        else:
            for p, n, d in zip(params, nums, dens, strict=True):
                p.add_((n / d).to(p.dtype), alpha=alpha)

    def materialize(self, x: Val, at: Op | None = None) -> Val:
        """Apply the pending division and scale to the value (``at``: the op about to read it)."""
        x = self.resolve(x)
        if self.scale == 1.0:
            return x
        s, self.scale = self.scale, 1.0
        if not -FITS_EVERY_DTYPE <= s <= FITS_EVERY_DTYPE:
            before = f" before '{at.name}'" if at is not None else ""
            self.check_factor(
                s,
                x.ts,
                lambda name, dtype, top: (
                    f"the update of parameter '{name}' carries{before} a factor of {s:.4g}, past the"
                    f" largest {dtype} ({top:.4g}): the product of the factors that stages such as"
                    f" scale and bias_correct fold into it on the host{self._where()}; lower those factors"
                ),
                getattr(at, "loc", None),
            )
        if _traced():
            return Val([t * s for t in x.ts], True)
        if x.owned:
            torch._foreach_mul_(x.ts, s)
            return x
        return Val(list(torch._foreach_mul(x.ts, s)), True)

    def check_factor(
        self,
        factor: float,
        ts: Sequence[torch.Tensor] | None,
        message: Callable[[str, str, float], str],
        loc: Loc | None,
    ) -> None:
        """Raise if a tensor cannot hold the host-side ``factor`` that is about to multiply it
        (torch refuses such a scalar as an ``alpha``, and multiplies by it as by an infinity).
        The tensors are ``ts``, one per bucket (the value's), or else the parameters themselves;
        ``message(parameter name, dtype, the dtype's largest value)`` says what went wrong."""
        if ts is None:
            items = [(n, p.dtype) for b in self.buckets for n, p in zip(b.names or ["?"] * b.size, b.params)]
        else:
            items = [((b.names or ["?"])[0], t.dtype) for b, t in zip(self.buckets, ts, strict=True)]
        for name, dtype in items:
            top = torch.finfo(dtype).max
            if not abs(factor) <= top:
                raise SoapArgumentError(message(name, str(dtype).removeprefix("torch."), top), loc)

    def lr_given(self) -> str:
        """This route's learning rate as a message names it, with its value."""
        route = self.group.get("route")
        source = f"param_group['lr'] of route '{route}'" if route is not None else "lr"
        return f"{source} is {const_text(self.group['lr'])}"

    def _where(self) -> str:
        route = self.group.get("route")
        return f" (route '{route}')" if route is not None else ""

    def run(self, ops: Sequence[Op], x: Val) -> Val:
        """Run nested ops (a scope's body, a branch); the result has no pending division."""
        return self.resolve(self.runner(self, ops, x))

    # -- reductions -------------------------------------------------------------------------

    def norms(self, ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Frobenius norm per parameter, shaped to broadcast against each bucket tensor."""
        out = []
        for b, t in zip(self.buckets, ts, strict=True):
            if b.stacked:
                n = torch.linalg.vector_norm(t.reshape(t.size(0), -1), dim=1)
                out.append(n.view(-1, *([1] * (t.dim() - 1))))
            else:
                out.append(torch.linalg.vector_norm(t))
        return out
