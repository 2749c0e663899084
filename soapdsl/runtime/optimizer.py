"""SoapOptimizer: a torch.optim.Optimizer that executes a Plan.

* one param_group per route, holding "lr" and the recipe's hyperparameters (LR schedulers
  and users may change them; stages that follow a recipe parameter read them every step);
* lazy state in ``self.state[param]`` (torch's conventions; keys namespaced by the stage's
  position, e.g. ``"1.momentum.buf"``), with a ``"step"`` count per parameter;
* parameters of equal shape in a batched route are stacked and run as one batch; their state
  lives in one slab per state key and ``self.state[param]`` holds views into it;
* no host-device synchronisation inside ``step()``: every decision is taken from host-side
  step counts.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import operator
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from pydantic import ValidationError

from soapdsl.check import _pydantic_message as pydantic_message
from soapdsl.check import lr_problem
from soapdsl.compiler import (
    FORMAT_VERSION,
    Plan,
    RoutePlan,
    is_dtensor,
    is_empty,
    selector_names,
    shape_problem,
    state_dtype,
    walk_ops,
    walk_shaped,
)
from soapdsl.errors import Loc, SoapArgumentError, SoapError, SoapShapeError, SoapStateError, did_you_mean
from soapdsl.ir import const_text
from soapdsl.registry import Op
from soapdsl.runtime import fused
from soapdsl.runtime.context import DEVICE_OF, DTYPE_OF, GRAD_OF, Bucket, Ctx, Members, Val, eager
from soapdsl.runtime.dist import Splitter
from soapdsl.runtime.fsdp import OWNER_KEY, Sharded
from soapdsl.runtime.graphs import GraphCache
from soapdsl.runtime.rounding import Rounding
from soapdsl.runtime.state import OptimizerState

__all__ = ["SoapOptimizer"]


def run_ops(ctx: Ctx, ops: Sequence[Op], x: Val) -> Val:
    """Run ``ops`` in order, applying or dropping the pending scale where an op needs it,
    and recording the values that later stages read (probes)."""
    for op in ops:
        if op.probes_before:  # type: ignore[attr-defined]
            x = ctx.materialize(x, op)
            for reader in op.probes_before:  # type: ignore[attr-defined]
                reader.record(ctx, x)
        if x.denom is not None and not op.passes_quotient:
            x = ctx.resolve(x)
        if ctx.scale != 1.0 and not op.linear:
            if op.homogeneous and ctx.scale > 0:
                pass
            elif op.scale_invariant and ctx.scale > 0:
                ctx.scale = 1.0
            else:
                x = ctx.materialize(x, op)
        x = op.apply(ctx, x)
        if op.probes_after:  # type: ignore[attr-defined]
            x = ctx.materialize(x)
            for reader in op.probes_after:  # type: ignore[attr-defined]
                reader.record(ctx, x)
    return x


class _CompiledRoute:
    """run_ops through torch.compile, for route ``index`` with the ``compile`` option.

    Each route gets its own copy of run_ops's code: torch keeps its compiled graphs, and counts
    them against its recompile limit (8), per code object, so routes sharing one would share
    that budget (soap_muon's five routes, each with a step that refreshes its basis and one that
    does not, would exhaust it and run eagerly) and one route's specializations would be forced
    on the others. Sizes and step counts are traced as symbols (``dynamic=True``), and so are the
    host's float numbers (torch's default ``specialize_float=False``): the learning rate that an
    LR scheduler sets at every step, and the bias corrections that follow the step count, go into
    the compiled code as its inputs rather than as constants that a new value would compile again
    (context.py's ``_traced``)."""

    def __init__(self, index: int) -> None:
        name = f"run_ops_route_{index}"
        code = run_ops.__code__.replace(co_name=name)
        if sys.version_info >= (3, 11):  # a code object carries a qualified name from 3.11 on
            code = code.replace(co_qualname=name)
        self.fn = torch.compile(types.FunctionType(code, run_ops.__globals__, code.co_name), dynamic=True)
        # torch remembers, by symbol name ("zf23"), the floats that its last compilation had to
        # make constants, and does not forget them when that compilation succeeds: the next
        # route's compilation would make constants of its own floats of the same names (a
        # learning rate among them), and compile again for each new value. Cleared before each
        # call (a torch internal: looked up once, and left alone if a torch lacks it)
        self._tensorify = getattr(torch._dynamo.symbolic_convert, "TensorifyState", None)

    def __call__(self, ctx: Ctx, ops: Sequence[Op], x: Val) -> Val:
        if self._tensorify is not None:
            self._tensorify.clear()
        return self.fn(ctx, ops, x)


def _outside_inference() -> contextlib.AbstractContextManager[Any]:
    """Out of torch.inference_mode, where it is on, and with grad mode off (leaving inference
    mode turns it on): tensors made there are ordinary ones, which later steps may update in
    place. Nothing to do elsewhere."""
    if not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


_MISSING = object()
_SHAPE = operator.attrgetter("shape")
_LAYOUT = operator.attrgetter("layout")


def _key(item: tuple[tuple[int, tuple[Any, ...]], Any]) -> tuple[int, str]:
    (t, host), _ = item
    return (t, repr(host))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and a == b and type(a) is type(b)


def _equal(a: Any, b: Any) -> bool:
    """``a == b`` for values of any type a user may write into a param_group (a tensor too)."""
    try:
        return bool(a == b)
    except Exception:  # a tensor of several elements, an object without ==
        return False


def _text(value: Any) -> str:
    """A param_group value as recipe text where it is one (``true``, ``1e-3``), else its repr."""
    if isinstance(value, bool | int | float | str | tuple):
        return const_text(value)
    return repr(value)


def _number(rp: RoutePlan, key: str, value: Any) -> Any:
    """``value`` as the stages read it: a Python int or float as it is, any other real number (a
    NumPy scalar, as LambdaLR returns under NumPy 2) or 0-d CPU tensor as a float."""
    where = f"param_group['{key}'] of route '{rp.selector}'"
    if value is _MISSING:
        raise SoapArgumentError(f"param_group of route '{rp.selector}' lost its key '{key}'")
    if type(value) is float or type(value) is int:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.is_complex() or value.dtype == torch.bool:
            raise SoapArgumentError(
                f"{where} must be a number or a 0-d real tensor, got a {value.dtype} tensor"
                f" of shape {list(value.shape)}"
            )
        if value.device.type != "cpu":
            raise SoapArgumentError(
                f"{where} is a tensor on {value.device}; soapdsl reads hyperparameters on the host"
                " (reading it would wait for the device at every step): use a Python number or a 0-d CPU tensor"
            )
        return float(value.detach())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise SoapArgumentError(f"{where} must be a number, got {type(value).__name__}")


def _load_step(name: str, value: Any) -> torch.Tensor:
    """A parameter's saved "step": a whole number >= 0, as a number or a one-element tensor of
    any dtype and device, as the 0-d float32 CPU tensor every counter is (a step counts a
    cohort's counters in one float32 slab: an int64 counter could not take the add, and a
    float16 one stops counting at 2048)."""
    return torch.tensor(_step_value(name, value), dtype=torch.float32)


def _step_value(name: str, value: Any) -> float:
    """The whole number >= 0 that a "step" entry holds; anything else is refused by name."""
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_complex():
        count = float(value.detach().reshape(()))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        count = float(value)
    else:
        got = f"a tensor of shape {list(value.shape)}" if torch.is_tensor(value) else f"a {type(value).__name__}"
        raise SoapStateError(f"state 'step' of parameter '{name}' is {got}, expected a step count")
    if not (count >= 0 and count.is_integer()):
        raise SoapStateError(f"state 'step' of parameter '{name}' is {count}, expected a whole number >= 0")
    return count


#: the hyperparameters of torch.optim's optimizers (their constructors' keywords but params and
#: lr, which every group holds): a key a torch user writes into a param_group expecting a step to
#: follow it. A group that holds one its recipe has no parameter for is refused (a step would
#: ignore it: silently other numbers than the user meant); every other key (a scheduler's
#: initial_lr, max_lr or base_momentum, SWALR's swa_lr, a user's own) is the user's to keep.
TORCH_HYPERPARAMETERS = frozenset(
    {
        "adjust_lr_fn",
        "alpha",
        "amsgrad",
        "beta2_decay",
        "betas",
        "capturable",
        "centered",
        "d",
        "dampening",
        "decoupled_weight_decay",
        "differentiable",
        "eps",
        "etas",
        "foreach",
        "fused",
        "history_size",
        "initial_accumulator_value",
        "lambd",
        "line_search_fn",
        "lr_decay",
        "max_eval",
        "max_iter",
        "maximize",
        "momentum",
        "momentum_decay",
        "nesterov",
        "ns_coefficients",
        "ns_steps",
        "rho",
        "step_sizes",
        "t0",
        "tolerance_change",
        "tolerance_grad",
        "weight_decay",
    }
)


_GROUPS_ARE_ROUTES = (
    "a soapdsl optimizer's param_groups are its routes; build a new optimizer (or add a route to the"
    " recipe) to optimize more parameters"
)


def _identify(opt: Any, sd: dict[str, Any]) -> None:
    """State-dict post hook, run before any the user registers: what ``load_state_dict``
    checks a checkpoint against; and each parameter's state as a plain dict (as torch's), so
    that ``torch.load(weights_only=True)`` reads the checkpoint."""
    sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
    sd["soapdsl"] = {
        "format": FORMAT_VERSION,
        "recipe": opt.plan.recipe.name,
        "fingerprint": opt.plan.fingerprint,
        "routes": [rp.selector for rp in opt._routes],
    }
    if opt._shards is not None:
        sd["soapdsl"]["shards"] = opt._shards.shards()
        opt._shards.for_checkpointers(sd)


def _lacks(rp: RoutePlan, key: str) -> str:
    """``recipe 'r' has no parameter 'key'``, with a hint and the parameters the group holds."""
    params = list(rp.hyper)
    return (
        f"recipe '{rp.recipe}' has no parameter '{key}'"
        + did_you_mean(key, params)
        + f" (parameters: {', '.join(params)})"
    )


def _also(unknown: list[str]) -> list[str]:
    """The note naming the torch hyperparameters past the first that a group has no parameter for."""
    rest = ", ".join(f"'{k}'" for k in unknown[1:])
    return [f"the group also holds {rest}, which the recipe has no parameter for either"] if rest else []


def _fixed_state_error(key: str, saved: Any, built: Any, why: str) -> SoapStateError:
    return SoapStateError(
        f"the checkpoint was saved with {key}={_text(saved)}, this optimizer was built with"
        f" {key}={_text(built)}{why}; build it with {key}={_text(saved)}"
    )


def _revalidate(op: Op, values: Mapping[str, Any], group: Mapping[str, Any]) -> None:
    """Check the arguments of ``op`` that follow the param_group against this step's values,
    with the words a bad value gets when the optimizer is built."""
    updates = {name: expr.evaluate(values) for name, expr in op.dynamic.items()}
    try:
        type(op.args).model_validate({**op.args.model_dump(by_alias=True), **updates})
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        refs = (
            ", ".join(f"param_group['{r}'] = {_text(group.get(r))}" for r in sorted(op.dynamic[field].refs()))
            if field in op.dynamic
            else ""
        )
        raise SoapArgumentError(
            f"'{op.name}' argument {field} became invalid during training ({refs}): {pydantic_message(err)}",
            getattr(op, "loc", None),
        ) from None


@dataclass
class _Cohort:
    t: int  # steps taken so far
    host: dict[str, Any]  # host-side state values shared by the cohort
    buckets: list[Bucket]
    states: dict[str, dict[str, list[torch.Tensor]]]
    steps: torch.Tensor  # 1-D, on the CPU: the "step" state of every parameter is a 0-d view of it
    # fused Adam's parameters with their m, v and step tensors, aligned (built on first use)
    fused: fused.Tensors | None = None
    #: what the steps read of the buckets' parameters, read once (context.Members): their
    #: layout is built again when one changes shape, dtype or device
    members: Members = field(init=False)
    ids: list[int] = field(init=False)  # each step records the parameters' count under their ids
    state_dtypes: list[torch.dtype] = field(init=False)  # per bucket: the dtype its gradient is read in

    def __post_init__(self) -> None:
        self.members = Members.of(self.buckets)
        self.ids = list(map(id, self.members.params))
        self.state_dtypes = [state_dtype(b.params[0].dtype) for b in self.buckets]

    @property
    def params(self) -> list[torch.Tensor]:
        return self.members.params


@dataclass
class _Layout:
    #: what the layout was built for: the ids of the parameters with a gradient, their shapes,
    #: dtypes and devices, and their gradients' layouts (a parameter resized in place needs
    #: another layout, whose check names it; one converted or moved needs its state converted or
    #: moved along; a gradient turned sparse is refused there by name)
    signature: tuple[
        tuple[int, ...], tuple[torch.Size, ...], tuple[torch.dtype, ...], tuple[torch.device, ...], tuple[Any, ...]
    ]
    cohorts: list[_Cohort]


class SoapOptimizer(torch.optim.Optimizer):
    """A torch optimizer compiled from a soapdsl recipe. Build it with :func:`soapdsl.build`."""

    _split: Splitter | None  # data parallel: splits the matrix work across ranks (runtime/dist.py)
    _shards: Sharded | None  # FSDP2: steps sharded parameters (runtime/fsdp.py)

    def __init__(self, plan: Plan, *, distributed: Any = False) -> None:
        """``distributed``: True (the default process group) or a process group splits the
        matrix work of a data-parallel run across its ranks (runtime/dist.py)."""
        if not isinstance(plan, Plan):
            raise SoapArgumentError(
                f"SoapOptimizer takes a compiled Plan, not a {type(plan).__name__}: build the optimizer with"
                " soapdsl.build(recipe, model) (soapdsl.compile(recipe, model) returns a Plan)"
            )
        routes = [rp for rp in plan.routes if rp.tensors]
        for rp in routes:
            for e, t in zip(rp.params, rp.tensors, strict=True):
                if t.device.type == "meta":
                    raise SoapArgumentError(
                        f"parameter '{e.name}' is on the meta device, which holds no values to optimize: build"
                        " the optimizer for the model once it is materialized (model.to_empty(device=...) gives"
                        " it new parameters, which an optimizer built before would never step);"
                        " soapdsl.compile takes meta tensors, to inspect a plan"
                    )
                if not t.is_leaf:
                    raise SoapArgumentError(
                        f"parameter '{e.name}' is not a leaf tensor (it was computed from other tensors,"
                        " so backward() never fills its .grad): optimize the tensors it is computed from,"
                        " or pass t.detach().requires_grad_()"
                    )
        recipe = f"{plan.recipe.name} {plan.fingerprint}"
        groups = [{"params": list(rp.tensors), **rp.hyper, "route": rp.selector, "recipe": recipe} for rp in routes]
        if not groups:
            raise SoapArgumentError("the optimizer got an empty parameter list")
        self._sealed = False
        try:
            super().__init__(groups, {})
        except (ValueError, TypeError) as e:
            raise SoapArgumentError(str(e)) from None
        # torch's defaults: each hyperparameter's value as built, which training code reads
        # (transformers' cosine_with_min_lr divides by defaults["lr"]; OneCycleLR and CyclicLR
        # cycle a "momentum" found there). Set after the groups, which hold every value already
        self.defaults = dict(plan.args)
        self._setup(plan)
        if any(is_dtensor(t) for rp in self._routes for t in rp.tensors):
            if distributed is not False and distributed is not None and distributed is not True:
                raise SoapArgumentError(
                    "the parameters are FSDP2 DTensors, which carry their process group (their device"
                    " mesh's): build without distributed=, or with distributed=True"
                )
            self._shards = Sharded(self, plan)
        elif distributed is not False and distributed is not None:
            self._split = Splitter(distributed)
            self._agree(self._split)

    def _agree(self, split: Splitter) -> None:
        """Check that every rank built the optimizer alike, before pairing up their work."""
        split.agree(
            "the parameters the optimizer was built for (their routes, names, shapes and dtypes)",
            [
                (rp.index, e.name, tuple(t.shape), str(t.dtype))
                for rp in self._routes
                for e, t in zip(rp.params, rp.tensors, strict=True)
            ],
        )
        # the values fixed at build decide which matrices are computed at which step (freq,
        # max_dim, ns_steps...): ranks built with others would split mismatched work
        split.agree(
            "the recipe, the values it fixed at build (freq, max_dim, ...) or its route overrides",
            (self.plan.fingerprint, self._fixed),
        )

    def _setup(self, plan: Plan, fixed: list[tuple[tuple[str, Any], ...]] | None = None) -> None:
        """Everything derived from the plan (on construction, and again after a copy or unpickling,
        which carry the plan, the state and the param_groups only)."""
        self.plan = plan
        self._routes: list[RoutePlan] = [rp for rp in plan.routes if rp.tensors]
        self._members: dict[int, frozenset[int]] = {rp.index: frozenset(map(id, rp.tensors)) for rp in self._routes}
        self._device_types = sorted({"cpu"} | {t.device.type for rp in self._routes for t in rp.tensors})
        self._names: dict[int, str] = {
            id(t): e.name for rp in self._routes for t, e in zip(rp.tensors, rp.params, strict=True)
        }
        # parameters that have nothing to update (a zero-size dimension): a step leaves them out
        # and they keep no state. Read from the plan, whose shapes are whole where a tensor
        # stepped here may be an FSDP2 rank's rows, of which a rank may hold none
        self._empty = frozenset(
            id(t) for rp in self._routes for t, e in zip(rp.tensors, rp.params, strict=True) if is_empty(e.shape)
        )
        # each tensor's shape when built: one resized to or from zero elements since then left
        # (or joined) the steps without its route, shape checks or state laid out again
        self._built_shapes: dict[int, tuple[int, ...]] = {
            id(t): tuple(t.shape) for rp in self._routes for t in rp.tensors
        }
        self._sealed = True
        # a copy or an unpickled optimizer steps alone: its state is whole on every rank
        self._split = None
        self._shards = None
        self._layouts: dict[int, _Layout] = {}
        self._steps: dict[int, int] = {}  # host mirror of each parameter's step count
        # the state mapping the layouts were built from (runtime/state.py): a step that finds
        # another one, or this one changed from outside, builds them again
        self.state = OptimizerState(self.state.items())
        self._seen: OptimizerState | None = None
        self.register_state_dict_post_hook(_identify, prepend=True)
        # routes with the `compile` option run their pipeline through torch.compile
        self._runners: dict[int, Callable[..., Val]] = {
            rp.index: _CompiledRoute(rp.index) if rp.options.get("compile") else run_ops for rp in self._routes
        }
        # routes with the `cuda_graph` option replay their Newton-Schulz iterations from CUDA
        # graphs (runtime/graphs.py); a copy captures its own
        self._graphs: dict[int, GraphCache] = {
            rp.index: GraphCache() for rp in self._routes if rp.options.get("cuda_graph")
        }
        # routes with the `stochastic_round` option round their bfloat16 and float16 parameters'
        # writes stochastically (runtime/rounding.py); an FSDP2 rank's rows start where
        # _first_elements says
        self._first_elements: dict[int, tuple[int, int]] = {}
        self._rounding: dict[int, Rounding] = {
            rp.index: Rounding({id(t): self._names[id(t)] for t in rp.tensors}, self._first_elements)
            for rp in self._routes
            if rp.options.get("stochastic_round")
        }
        # Adam-shaped routes run through torch's fused kernel where it applies (runtime/fused.py)
        self._fused: dict[int, fused.FusedAdam | None] = {rp.index: rp.fused for rp in self._routes}
        # the keys of the stages' host-side state values (rotate's "ready", ...), which decide
        # with the step count which parameters step together
        self._host_keys: dict[int, frozenset[str]] = {
            rp.index: frozenset(
                op.state_key(k)
                for shape in {tuple(t.shape) for t in rp.tensors}
                for op, inner in walk_shaped(rp.ops, shape)
                for k in op.host_state(inner)
            )
            for rp in self._routes
        }
        # hyperparameters that stages follow: re-validated whenever their values change
        self._watched: list[tuple[str, ...]] = [
            tuple(sorted({r for op in walk_ops(rp.ops) for v in op.dynamic.values() for r in v.refs()} | {"lr"}))
            for rp in self._routes
        ]
        self._validated: list[tuple[Any, ...] | None] = [None] * len(self._routes)
        # the keys each group held when last checked for torch hyperparameters it has no
        # parameter for (None: check at the next step), and those of them it may hold: its
        # recipe's parameters, and the optimizer's (defaults: what OneCycleLR writes into every
        # group, a config override's route included)
        self._keys: list[frozenset[Any] | None] = [None] * len(self._routes)
        self._own: list[frozenset[str]] = [frozenset(rp.hyper) | frozenset(plan.args) for rp in self._routes]
        # hyperparameters a route reads once, when it is built, with the values it read
        self._fixed: list[tuple[tuple[str, Any], ...]] = fixed or [
            tuple((k, rp.hyper[k]) for k in sorted(rp.fixed)) for rp in self._routes
        ]
        # ...of which a checkpoint must have been saved with the same values (RoutePlan.compared)
        self._compared: list[frozenset[str]] = [rp.compared for rp in self._routes]

    # -- copies and pickling ------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; the plan comes along, so that a deep
        # copy (of the optimizer alone, or with its model) or an unpickled optimizer is built
        # again around the copied parameters, as torch's optimizers are
        return {**super().__getstate__(), "plan": self.plan, "fixed": self._fixed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        plan, fixed = state.pop("plan", None), state.pop("fixed", None)
        if not isinstance(plan, Plan):
            raise SoapStateError(
                "this pickled soapdsl optimizer holds no plan (it was pickled by an older soapdsl):"
                " save and load opt.state_dict() instead"
            )
        if any(is_dtensor(t) for rp in plan.routes for t in rp.tensors):
            # each rank holds a share of the state, tied to the process group: a copy could not step
            raise SoapStateError(
                "a soapdsl optimizer of FSDP2-sharded parameters cannot be copied or unpickled: save"
                " opt.state_dict() on each rank and load it into a new optimizer on the same rank"
            )
        had_flag = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_flag:
            self.defaults.pop("differentiable", None)  # torch adds it; soapdsl's defaults hold the recipe's
        if not self.defaults:  # pickled by a soapdsl whose defaults were empty
            self.defaults = dict(plan.args)
        self._setup(plan, fixed)

    # -- torch API ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_sealed", False):
            raise SoapArgumentError(_GROUPS_ARE_ROUTES)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if torch.compiler.is_compiling():
            # torch.compile(opt.step): the step runs as it does eagerly, a graph break. Its
            # host-side bookkeeping (layouts keyed by tensor identity, host step counts) is not
            # something to trace; a route compiles its pipeline with [compile] instead.
            return _eager_step(self, closure)
        return self._step_with(closure)

    def _step_with(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # under inference_mode the state a step creates (moments, slabs, bases) would be
        # inference tensors, which no later step outside it may update in place
        with _outside_inference():
            if any(torch.is_autocast_enabled(d) for d in self._device_types):
                # a training loop may run its whole iteration under autocast: the step's matrix
                # work stays in the state's dtype (factors would otherwise come out in bf16/fp16)
                with contextlib.ExitStack() as stack:
                    for d in self._device_types:
                        stack.enter_context(torch.autocast(d, enabled=False))
                    self._step()
            else:
                self._step()
        return loss

    def _step(self) -> None:
        if len(self.param_groups) != len(self._routes):
            raise SoapArgumentError(
                f"this optimizer has {len(self._routes)} routes but now {len(self.param_groups)} param_groups:"
                f" {_GROUPS_ARE_ROUTES}"
            )
        if self._shards is not None:
            # the inner optimizer steps the parameters each group was built with: a change
            # to a group's list would go unnoticed there
            for rp, group in zip(self._routes, self.param_groups, strict=True):
                members = self._members[rp.index]
                if len(group["params"]) != len(members) or {id(p) for p in group["params"]} != members:
                    raise SoapArgumentError(
                        f"param_group['params'] of route '{rp.selector}' no longer holds the parameters the"
                        f" optimizer was built with: {_GROUPS_ARE_ROUTES}"
                    )
            self._shards.step()
            return
        state = self.state
        if state is not self._seen or state.dirty:
            self._adopt_state()
        if self._split is not None:
            self._split.begin_step(self._split_key(), self.param_groups)
        # every route's values and layout first: a step that a check refuses (a NaN lr, a sparse
        # gradient, a resized parameter) writes no parameter, so fixing the cause and stepping
        # again does not step the routes before it twice
        checked = [
            (rp, self._hyperparameters(i, rp, group), self._layout(rp, group))
            for i, (rp, group) in enumerate(zip(self._routes, self.param_groups, strict=True))
        ]
        for rp, values, layout in checked:
            for cohort in layout.cohorts:
                self._run(rp, values, cohort)
        self._seen.dirty = False  # type: ignore[union-attr]  # the step's own changes are in the layouts

    def _split_key(self) -> int:
        """What the ranks must agree on before a step splits work: each route's parameters
        with a gradient, their shapes and step counts (ints only: their hash is the same in
        every process, where that of None or a string is not)."""
        return hash(
            tuple(
                (tuple(p.shape) if p.grad is not None else -1, self._step_count(p))
                for group in self.param_groups
                for p in group["params"]
            )
        )

    def _step_count(self, p: torch.Tensor) -> int:
        """``p``'s step count, -1 before its first step: the host mirror, or after a load or a
        change from outside (which empty the mirror) its CPU counter, read once as a layout does."""
        steps = self._steps.get(id(p))
        if steps is None:
            st = self.state.get(p)
            if not st or "step" not in st:
                return -1
            # read as a checkpoint's is: a counter of the right type set from outside may still
            # hold no count (torch.tensor(-1.0), nan)
            steps = self._steps[id(p)] = int(_step_value(self._names.get(id(p), "?"), st["step"]))
        return steps

    def _adopt_state(self) -> None:
        """Forget the layouts: ``self.state`` was replaced or changed from outside, and the
        next layouts are built from what it holds now (a mapping of another type is wrapped)."""
        if not isinstance(self.state, OptimizerState):
            self.state = OptimizerState(self.state.items())
        self._seen = self.state
        self._layouts.clear()
        self._steps.clear()

    def _hyperparameters(self, i: int, rp: RoutePlan, group: dict[str, Any]) -> dict[str, Any]:
        """The param_group values this step's stages read: ``group`` itself, or a copy of it
        where numbers of other types (a NumPy scalar, a 0-d CPU tensor) are Python floats.

        Values the stages follow are validated again whenever they changed since the last
        step; values fixed when the optimizer was built must not have changed (a few dict
        lookups: they are normally the very objects the optimizer was built with). The group's
        keys are looked at again only when they changed since the last step."""
        if group.keys() != self._keys[i]:
            self._check_keys(i, rp, group)
        for key, built in self._fixed[i]:
            value = group.get(key, built)
            if value is not built and not _equal(value, built):
                raise self._fixed_error(i, rp, key, value, built)
        keys = self._watched[i]
        values = tuple(group.get(k, _MISSING) for k in keys)
        previous = self._validated[i]
        if previous is not None and all(_same(a, b) for a, b in zip(values, previous, strict=True)):
            return group
        plain = tuple(_number(rp, k, v) for k, v in zip(keys, values, strict=True))
        changed = {k: n for k, n, v in zip(keys, plain, values, strict=True) if n is not v}
        view = {**group, **changed} if changed else group
        problem = lr_problem(view["lr"])
        if problem is not None:
            raise SoapArgumentError(
                f"param_group['lr'] of route '{rp.selector}' is {_text(values[keys.index('lr')])}; {problem}"
            )
        for op in walk_ops(rp.ops):
            if op.dynamic:
                _revalidate(op, view, group)
        # a value converted from another type (a tensor may change in place) is checked every step
        self._validated[i] = None if changed else values
        return view

    def _check_keys(self, i: int, rp: RoutePlan, group: dict[str, Any]) -> None:
        """Refuse a torch hyperparameter in ``group`` that its recipe has no parameter for."""
        unknown = self._unknown_keys(i, group)
        if unknown:
            raise SoapArgumentError(
                f"param_group['{unknown[0]}'] of route '{rp.selector}' would be ignored: " + _lacks(rp, unknown[0]),
                notes=_also(unknown),
            )
        self._keys[i] = frozenset(group)

    def _unknown_keys(self, i: int, group: Mapping[Any, Any]) -> list[str]:
        """The keys of ``group`` (route ``i``'s, or a checkpoint's for it) that torch's optimizers
        take and its recipe has no parameter for, in the group's order."""
        own = self._own[i]
        return [k for k in group if k in TORCH_HYPERPARAMETERS and k not in own]

    def _fixed_error(self, i: int, rp: RoutePlan, key: str, value: Any, built: Any) -> SoapArgumentError:
        """The error for a param_group value that the route read once, when it was built."""
        where: str | None = None
        loc: Loc | None = rp.route.loc
        setting = next(((n, v) for n, v in rp.route.settings if key in v.refs()), None)
        for op in walk_ops(rp.ops):
            if key in getattr(op, "fixed_refs", ()):
                where, loc = f"'{op.name}' reads it once", getattr(op, "loc", None)
                break
            if key in getattr(op, "first_step_refs", ()):
                where, loc = f"'{op.name}' reads it once, at each parameter's first step", getattr(op, "loc", None)
                break
        if where is None:
            where = (
                f"the route setting [{setting[0]}={setting[1].text()}] reads it once"
                if setting
                else "the route's selector reads it"
            )
        hint = ""
        if setting is not None and setting[0] in self._watched[i]:
            hint = f"; to change this route's {setting[0]} during training, set param_group['{setting[0]}']"
        return SoapArgumentError(
            f"param_group['{key}'] of route '{rp.selector}' is {_text(value)}, but this optimizer was built"
            f" with {key}={_text(built)}: {key} is fixed when the optimizer is built ({where});"
            f" build a new optimizer with {key}={_text(value)}{hint}",
            loc,
        )

    def full_state_dict(self) -> dict[str, Any]:
        """The whole state dict, as one process stepping every parameter whole saves it.

        ``state_dict()`` itself, except under FSDP2, where ``state_dict()`` holds this rank's
        share and this gathers every rank's (a collective: every rank calls it; the tensors come
        on the CPU). It loads into an optimizer built with or without FSDP2, on any number of
        ranks."""
        if self._shards is not None:
            return self._shards.full_state_dict()
        return self.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise SoapStateError(
                f"load_state_dict takes the dict that state_dict() returned, not a {type(state_dict).__name__}"
                + (" (load the file with torch.load first)" if isinstance(state_dict, str | os.PathLike) else "")
            )
        state_dict = state_dict.copy()  # as torch's: the hooks may change its keys, not the caller's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        # the saved state's keys as the saved groups name the parameters: positions (torch's
        # state_dict), or names (torch.distributed.checkpoint's set_optimizer_state_dict)
        id_map: dict[Any, torch.Tensor] = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            id_map.update(zip(saved["params"], group["params"], strict=True))
        for key in state_dict["state"]:
            if key not in id_map:
                what = "parameter index" if isinstance(key, int) else "parameter"
                raise SoapStateError(f"state dict holds state for {what} {key!r}, which this optimizer lacks")
        new_state = None
        # the loaded state and the groups' values are copied into new tensors: under
        # inference_mode they would be inference tensors, which no step (or a scheduler's
        # in-place write of a tensor lr) outside it may update in place
        with _outside_inference():
            if self._shards is not None:
                self._shards.load(state_dict, id_map)  # into the inner optimizer; self.state shows it
            else:
                new_state = OptimizerState()
                for key, value in state_dict["state"].items():
                    p = id_map[key]
                    loaded = self._load_param_state(p, value)
                    if id(p) not in self._empty:  # an empty parameter keeps no state
                        new_state[p] = loaded  # type: ignore[index]
            for saved, group, compared in zip(saved_groups, self.param_groups, self._compared, strict=True):
                skip = {"params", *compared}  # equal to the checkpoint's (checked): the build's objects stay
                for k, v in saved.items():
                    if k not in skip:
                        # a copy, as torch's load takes: a scheduler changes a tensor lr in place,
                        # which the optimizer that saved it (or another loaded from it) still holds
                        group[k] = copy.deepcopy(v)
        # a value only a setting read (`[lr=adam_lr]`) comes with the checkpoint, as its lr does
        self._fixed = [
            tuple((k, group.get(k, built)) for k, built in fixed)
            for fixed, group in zip(self._fixed, self.param_groups, strict=True)
        ]
        if new_state is not None:
            self.state = new_state  # the next step builds its layouts from it
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        lines = [f"SoapOptimizer(recipe={self.plan.recipe.name!r}"]
        for rp, g in zip(self._routes, self.param_groups, strict=True):
            n = len(g["params"])
            lines.append(f"  route {rp.selector}: {n} param{'' if n == 1 else 's'}, lr={g['lr']}")
        return "\n".join(lines) + "\n)"

    # -- state dict checks --------------------------------------------------------------------

    def _check_state_dict(self, sd: Any) -> None:
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise SoapStateError("not an optimizer state dict (needs 'state' and 'param_groups')")
        if not isinstance(sd["state"], dict):
            raise SoapStateError(f"the state dict's 'state' is a {type(sd['state']).__name__}, not a dict")
        meta = sd.get("soapdsl")
        if meta is None:
            meta = self._identity_from_groups(sd["param_groups"])
        if not isinstance(meta, dict):
            raise SoapStateError(
                "this state dict was not saved by a soapdsl optimizer (it has no 'soapdsl' entry);"
                f" this optimizer runs recipe '{self.plan.recipe.name}'"
            )
        # _equal: a value of another type (a tensor, an array) may have no truth value to compare by
        if not _equal(meta.get("format"), FORMAT_VERSION):
            raise SoapStateError(
                f"state dict format {meta.get('format')!r} cannot be read; this soapdsl reads format {FORMAT_VERSION}"
            )
        same_name = _equal(meta.get("recipe"), self.plan.recipe.name)
        if not (same_name and _equal(meta.get("fingerprint"), self.plan.fingerprint)):
            why = ""
            if same_name:  # the same name says nothing of what differs
                saved_routes, own = meta.get("routes"), [rp.selector for rp in self._routes]
                if isinstance(saved_routes, list) and saved_routes != own:
                    why = (
                        f": its routes were {', '.join(map(str, saved_routes)) or 'none'}, this optimizer's are"
                        f" {', '.join(own)} (a config's route overrides are part of the recipe)"
                    )
                else:
                    why = (
                        ": a recipe of the same name with other stages, arguments or routes (an edited"
                        " recipe file, or another recipe by that name)"
                    )
            raise SoapStateError(
                f"state dict was saved by recipe '{meta.get('recipe')}' (fingerprint"
                f" {meta.get('fingerprint')}), but this optimizer runs recipe"
                f" '{self.plan.recipe.name}' (fingerprint {self.plan.fingerprint}){why}"
            )
        groups = sd["param_groups"]
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise SoapStateError("the state dict's 'param_groups' is not a list of dicts")
        for i, g in enumerate(groups):
            if "params" in g and not isinstance(g["params"], list | tuple):
                raise SoapStateError(
                    f"the state dict's param_groups[{i}]['params'] is a {type(g['params']).__name__}, expected the"
                    " list of its parameters' indices that state_dict() writes"
                )
            for key in g.get("params", ()):
                try:
                    hash(key)
                except TypeError:  # a list: no key of 'state' can name it
                    raise SoapStateError(
                        f"the state dict's param_groups[{i}]['params'] holds {key!r}, expected the list of its"
                        " parameters' indices that state_dict() writes"
                    ) from None
        routes = meta.get("routes")
        if isinstance(routes, list) and len(routes) == len(groups) and all(isinstance(r, str) for r in routes):
            # values fixed when the optimizer is built: each route's against the checkpoint's
            # group of the same route, before anything else can blame the model or the state
            saved_groups = dict(zip(routes, groups, strict=True))
            for rp, fixed, compared in zip(self._routes, self._fixed, self._compared, strict=True):
                saved = saved_groups.get(rp.selector)
                if saved is None:
                    continue
                for key, built in fixed:
                    if key in compared and key in saved and not _equal(saved[key], built):
                        raise _fixed_state_error(
                            key, saved[key], built, f" (route '{rp.selector}' fixes it when the optimizer is built)"
                        )
        mine_routes = [rp.selector for rp in self._routes]
        if routes is not None and not _equal(routes, mine_routes):
            self._check_selector_values(groups)
            raise SoapStateError(
                f"state dict holds routes {routes}, but this optimizer's parameters take routes"
                f" {mine_routes}: it was saved for a different model"
            )
        mine = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g.get("params", ())) for g in groups]
        if mine != theirs:
            raise SoapStateError(
                f"state dict has routes with {theirs} parameters, this optimizer has {mine}:"
                " it was saved for a different model"
            )
        for i, (rp, saved) in enumerate(zip(self._routes, groups, strict=True)):
            # load would copy it into the group, and the next step refuse it, far from its cause
            unknown = self._unknown_keys(i, saved)
            if unknown:
                key = unknown[0]
                raise SoapStateError(
                    f"the state dict's param_groups[{i}] (route '{rp.selector}') holds '{key}', but "
                    + _lacks(rp, key)
                    + ": the optimizer that saved it ignored it, and so would this one;"
                    f" delete sd['param_groups'][{i}]['{key}'] to load the checkpoint",
                    notes=_also(unknown),
                )
        shards = meta.get("shards")
        if self._shards is None and isinstance(shards, dict) and not _equal(shards.get("world"), 1):
            # one rank's share (of one rank, the whole): loaded as a whole, the parameters that
            # other ranks own would start afresh
            raise SoapStateError(
                f"this state dict holds the share of the state of rank {shards.get('rank')} of"
                f" {shards.get('world')} under FSDP2 (a sharded optimizer's opt.state_dict()); an optimizer"
                " of parameters that are not sharded loads a whole one: save opt.full_state_dict(),"
                " called on every rank"
            )

    def _identity_from_groups(self, groups: Any) -> dict[str, Any] | None:
        """The top-level entry as the param_groups record it: each group holds its route and
        the recipe's name and fingerprint. Checkpointers that rebuild the state dict from
        'state' and 'param_groups' alone (torch.distributed.checkpoint's
        get_optimizer_state_dict) keep those."""
        if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
            return None
        if not all(isinstance(g.get("recipe"), str) and isinstance(g.get("route"), str) for g in groups):
            return None
        recipes = {g["recipe"] for g in groups}
        if len(recipes) != 1:
            return None
        recipe = recipes.pop()
        if " " not in recipe:
            return None
        name, fingerprint = recipe.rsplit(" ", 1)
        routes = [g["route"] for g in groups]
        return {"format": FORMAT_VERSION, "recipe": name, "fingerprint": fingerprint, "routes": routes}

    def _check_selector_values(self, groups: list[dict[str, Any]]) -> None:
        """When the routes differ: name a parameter that the selectors read and that the
        checkpoint was saved with another value of (``max_dim`` moves matrices between routes)."""
        names = sorted({n for rp in self.plan.routes for n in selector_names(rp.route.selector)})
        for key in names:
            theirs = next((g[key] for g in groups if key in g), _MISSING)
            mine = next((g[key] for g in self.param_groups if key in g), _MISSING)
            if theirs is not _MISSING and mine is not _MISSING and not _equal(theirs, mine):
                raise _fixed_state_error(
                    key, theirs, mine, " (the route selectors read it when the optimizer is built)"
                )

    def _load_param_state(self, p: torch.Tensor, saved: Any, *, check: bool = False) -> dict[str, Any]:
        """``p``'s state as loaded from ``saved``, or with ``check`` only the errors loading it
        would raise (its tensors are then the saved ones, not copies)."""
        rp = self._route_of(p)
        expected = self._state_specs(rp, p)
        hosts = {
            op.state_key(k): (op, k, initial)
            for op, shape in walk_shaped(rp.ops, tuple(p.shape))
            for k, initial in op.host_state(shape).items()
        }
        out: dict[str, Any] = {}
        name = self._names.get(id(p), "?")
        if not isinstance(saved, dict):
            raise SoapStateError(f"the state of parameter '{name}' is a {type(saved).__name__}, not a dict")
        if OWNER_KEY in saved:
            raise SoapStateError(
                f"the state of parameter '{name}' is held by rank {saved[OWNER_KEY]!r} under FSDP2: this"
                " state dict is one rank's share. Load it into the sharded optimizer, go through"
                " torch.distributed.checkpoint's dcp.save and dcp.load, or save opt.full_state_dict()"
            )
        if id(p) in self._empty:
            return out  # never stepped, it keeps no state: what a checkpoint holds for it is dropped
        for key, value in saved.items():
            if torch.is_tensor(value) and value.device.type == "meta":
                raise SoapStateError(
                    f"state '{key}' of parameter '{name}' is on the meta device, which holds no values:"
                    " this state dict was saved from parameters on the meta device"
                )
            if key == "step":
                out[key] = _load_step(name, value)
                continue
            if is_dtensor(value) and not is_dtensor(p):
                # an FSDP2 rank's rows: whole only where the mesh is one rank
                if value.device_mesh.size() != 1:
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' is a DTensor sharded over"
                        f" {value.device_mesh.size()} ranks (an FSDP2 rank's share): load it into the"
                        " sharded optimizer, or save opt.full_state_dict() on every rank instead"
                    )
                value = value.to_local()
            if key in expected and not torch.is_tensor(value):
                raise SoapStateError(
                    f"state '{key}' of parameter '{name}' is a {type(value).__name__}, expected a tensor"
                )
            if key in expected:
                shape, dtype = expected[key]
                if not value.is_floating_point():
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' is a {value.dtype} tensor, expected a floating-point one"
                    )
                if tuple(value.shape) != shape:
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' has shape {list(value.shape)}, expected {list(shape)}"
                    )
                # laid out as a fresh state would be, whatever the saving model's layout was
                out[key] = value if check else self._new_state(rp, p, shape, dtype).copy_(value.detach())
            elif key in hosts:
                op, host, initial = hosts[key]
                if torch.is_tensor(value):
                    problem: str | None = (
                        f"is a tensor, expected a {type(initial).__name__ if initial is not None else 'number'}"
                    )
                else:
                    problem = op.host_problem(host, value, initial)
                if problem:
                    raise SoapStateError(f"state '{key}' of parameter '{name}' {problem}")
                out[key] = value
            elif torch.is_tensor(value):
                raise SoapStateError(f"state dict holds unknown state '{key}' for parameter '{name}'")
            else:
                out[key] = value
        # a host value that starts as None may be missing: from a state dict saved before the stage
        # kept it (rotate's "beta"); a state without its step or another host value cannot step
        needed = {"step", *expected, *(k for k, (_, _, initial) in hosts.items() if initial is not None)}
        missing = needed - set(out)
        if out and missing:
            raise SoapStateError(f"state dict lacks state {sorted(missing)} for parameter '{name}'")
        return out

    def _route_of(self, p: torch.Tensor) -> RoutePlan:
        for rp, g in zip(self._routes, self.param_groups, strict=True):
            if any(q is p for q in g["params"]):
                return rp
        raise SoapError("parameter is not managed by this optimizer")  # pragma: no cover

    # -- layout -------------------------------------------------------------------------------

    def _state_specs(self, rp: RoutePlan, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        for op, shape in walk_shaped(rp.ops, tuple(p.shape)):
            for name, spec in op.state(shape).items():
                if not spec.shared or self._leads(op, p):
                    out[op.state_key(name)] = (spec.shape, state_dtype(p.dtype))
        return out

    def _init_state(self, rp: RoutePlan, p: torch.Tensor) -> None:
        st = self.state[p]
        st["step"] = torch.zeros((), dtype=torch.float32)
        for op, shape in walk_shaped(rp.ops, tuple(p.shape)):
            for name, value in op.host_state(shape).items():
                st[op.state_key(name)] = value
            for name, spec in op.state(shape).items():
                if spec.shared and not self._leads(op, p):
                    continue  # the group's leader holds the shared tensor
                t = self._new_state(rp, p, spec.shape, state_dtype(p.dtype))
                if spec.init == "eye":
                    t.copy_(torch.eye(spec.shape[-2], spec.shape[-1], dtype=t.dtype, device=t.device).expand_as(t))
                st[op.state_key(name)] = t

    def _new_state(self, rp: RoutePlan, p: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero state tensor. On a fused Adam route a tensor of the parameter's shape takes
        the parameter's memory layout (as torch.optim's state does): the kernel pairs parameter,
        gradient and moments element by element in memory order (runtime/fused.py), so a
        channels_last weight keeps the fused path and its moments hold logically right values."""
        if self._fused[rp.index] is not None and shape == tuple(p.shape):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _leads(self, op: Op, p: torch.Tensor) -> bool:
        """Whether ``p`` holds ``op``'s shared state for its share group (compiler.share_leaders)."""
        rp = self._route_of(p)
        lead = rp.leaders.get((op.path, op.share_key(self._names.get(id(p), ""))))
        return lead is None or rp.tensors[lead] is p

    def _layout(self, rp: RoutePlan, group: dict[str, Any]) -> _Layout:
        # read at every step of every route, so each attribute is read by a C-level map over
        # the parameters, not a Python loop (a model of many small tensors is host-bound)
        active = group["params"]
        if not isinstance(active, list):  # read twice below
            active = list(active)
        grads = list(map(GRAD_OF, active))
        if not all(map(operator.is_not, grads, repeat(None))):
            active = [p for p, g in zip(active, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        ids = tuple(map(id, active))
        signature = (
            ids,
            tuple(map(_SHAPE, active)),
            tuple(map(DTYPE_OF, active)),
            tuple(map(DEVICE_OF, active)),
            tuple(map(_LAYOUT, grads)),
        )
        cached = self._layouts.get(rp.index)
        if cached is not None and cached.signature == signature:
            return cached
        members = self._members[rp.index]
        if len(set(ids)) < len(ids) or not members.issuperset(ids):
            # a tensor put into group["params"] by hand: it was never routed, shape-checked or
            # given a name, and one listed twice would be stepped twice
            raise SoapArgumentError(
                f"param_group['params'] of route '{rp.selector}' holds a tensor twice or one the"
                f" optimizer was not built with: {_GROUPS_ARE_ROUTES}"
            )
        stepped = []
        for p in active:
            if p.grad.is_sparse:
                raise SoapArgumentError(
                    f"parameter '{self._names.get(id(p))}' has a sparse gradient, which soapdsl does not support"
                )
            self._check_resized(rp, p)
            if id(p) in self._empty:
                continue  # nothing to update: it takes no part in the step and keeps no state
            if not self.state[p]:
                self._init_state(rp, p)
            else:
                self._check_state_fits(rp, p)
            stepped.append(p)
        active = stepped
        by_step: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        host_keys = self._host_keys[rp.index]
        for p in active:
            st = self.state[p]
            # the stages' own host values only: an entry a tool or the user put there is kept
            # and left alone, as torch's optimizers leave it, whatever its value
            host = tuple(sorted((k, v) for k, v in st.items() if k in host_keys))
            by_step.setdefault((self._step_count(p), host), []).append(p)
        if len(by_step) > 1:
            for op in walk_ops(rp.ops):
                if op.reduces_over_route():
                    counts = sorted({t for t, _ in by_step})
                    lagging = self._names.get(id(by_step[min(by_step)][0]), "?")
                    raise SoapArgumentError(
                        f"'{op.name}' reduces over all parameters of route '{rp.selector}', but they have"
                        f" taken different numbers of steps ({', '.join(map(str, counts))}; e.g."
                        f" '{lagging}' had no gradient at some step): give every parameter a gradient at"
                        " every step, or use a per-tensor variant",
                        getattr(op, "loc", None),
                    )
        cohorts = [self._cohort(rp, t, dict(host), ps) for (t, host), ps in sorted(by_step.items(), key=_key)]
        layout = _Layout(signature, cohorts)
        self._layouts[rp.index] = layout
        graphs = self._graphs.get(rp.index)
        if graphs is not None:
            graphs.keep_only(set(signature[3]))  # a model moved off a GPU frees its graphs there
        return layout

    def _cohort(self, rp: RoutePlan, t: int, host: dict[str, Any], params: list[torch.Tensor]) -> _Cohort:
        if rp.batched:
            groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
            for p in params:
                groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            buckets = [Bucket(ps, key[0], True) for key, ps in groups.items()]
        else:  # one bucket per parameter; a leading dim of 1 (a view) where matrix ops need one
            buckets = [Bucket([p], tuple(p.shape), rp.needs_batch_dim) for p in params]
        for b in buckets:
            b.names = [self._names.get(id(p), "?") for p in b.params]
        states: dict[str, dict[str, list[torch.Tensor]]] = {}
        for j, b in enumerate(buckets):
            for op, shape in walk_shaped(rp.ops, b.shape):
                per_op = states.setdefault(op.path, {})
                for name, spec in op.state(shape).items():  # names may depend on the shape
                    key = op.state_key(name)
                    slab = self._shared_slab(rp, op, b, key) if spec.shared else self._slab(b, key)
                    # a bucket whose shape lacks this state keeps None; its op never reads it
                    per_op.setdefault(name, [None] * len(buckets))[j] = slab  # type: ignore[list-item]
        for op in walk_ops(rp.ops):
            states.setdefault(op.path, {})
        # the step counters as one slab too: a step counts them all with one add_ instead of one
        # per parameter (the host's share of a small model's step time on a GPU)
        steps = self._slab(Bucket(params, (), True), "step")
        return _Cohort(t, host, buckets, states, steps)

    def _shared_slab(self, rp: RoutePlan, op: Op, bucket: Bucket, key: str) -> torch.Tensor:
        """A slab with one entry per share group of the bucket; records member -> slot."""
        keys = [op.share_key(n) for n in bucket.names]
        slots = list(dict.fromkeys(keys))
        leaders = []
        for k in slots:
            leader = next(
                (p for p in bucket.params if key in self.state[p] and op.share_key(self._names.get(id(p), "")) == k),
                None,
            )
            if leader is None:
                members = ", ".join(f"'{n}'" for n in bucket.names if op.share_key(n) == k)
                holder = self._names.get(id(rp.tensors[rp.leaders[(op.path, k)]]), "?")
                raise SoapArgumentError(
                    f"'{op.name}' shares state within group '{k}', held by '{holder}', but {members}"
                    f" stepped without '{holder}' (it had no gradient at this step or an earlier"
                    " one): every parameter of a share group must have a gradient at every step,"
                    " except a parameter frozen when the optimizer was built, which is left out (and"
                    " must stay frozen)",
                    getattr(op, "loc", None),
                )
            leaders.append(leader)
        bucket.groups[op.path] = (
            None if len(slots) == len(keys) else torch.tensor([slots.index(k) for k in keys], device=leaders[0].device)
        )
        return self._slab(Bucket(leaders, bucket.shape, bucket.stacked), key)

    def _slab(self, bucket: Bucket, key: str) -> torch.Tensor:
        tensors = [self.state[p][key] for p in bucket.params]
        if not bucket.stacked:
            return tensors[0]
        if len(tensors) == 1:
            return tensors[0].unsqueeze(0)  # a view: in-place updates reach the state
        base = tensors[0]._base
        if (
            base is not None
            and base.shape[0] == len(tensors)
            and all(t._base is base and t.data_ptr() == base[i].data_ptr() for i, t in enumerate(tensors))
        ):
            return base
        slab = torch.stack(tensors)
        for i, p in enumerate(bucket.params):
            self.state[p][key] = slab[i]
        return slab

    # -- execution ----------------------------------------------------------------------------

    def _grads(self, cohort: _Cohort) -> list[torch.Tensor]:
        """The cohort's gradients, one tensor per bucket in the bucket's state dtype."""
        if not cohort.members.stacked:  # a bucket per parameter: its gradient as it is, where its dtype is the state's
            grads: list[torch.Tensor] = list(map(GRAD_OF, cohort.members.params))
            if list(map(DTYPE_OF, grads)) == cohort.state_dtypes:
                return grads
        grads = []
        for b, dtype in zip(cohort.buckets, cohort.state_dtypes, strict=True):
            if b.stacked and b.size > 1:
                grads.append(torch.stack([p.grad for p in b.params]).to(dtype))  # type: ignore[misc]
            elif b.stacked:
                g = b.params[0].grad
                assert g is not None
                grads.append((g if g.dtype == dtype else g.to(dtype)).unsqueeze(0))
            else:
                g = b.params[0].grad
                assert g is not None
                grads.append(g if g.dtype == dtype else g.to(dtype))
        return grads

    def _run(self, rp: RoutePlan, group: dict[str, Any], cohort: _Cohort) -> None:
        lowered = self._fused[rp.index]
        if lowered is not None and self._run_fused(lowered, group, cohort):
            return
        grads = self._grads(cohort)
        t = cohort.t + 1
        split = None if rp.options.get("compile") else self._split
        ctx = Ctx(
            group,
            t,
            cohort.buckets,
            grads,
            cohort.states,
            run_ops,
            host=cohort.host,
            split=split,
            graphs=self._graphs.get(rp.index),
            rounding=self._rounding.get(rp.index),
            members=cohort.members,
        )
        ops = list(walk_ops(rp.ops))
        proceed = [op.before(ctx) for op in ops]  # every op sees the step, even when one skips it
        if all(proceed):
            self._runners[rp.index](ctx, rp.ops, Val(grads, owned=False))
            for op in ops:
                op.after(ctx)
            cohort.steps.add_(1.0)
            self._stepped(cohort, t)
        if ctx.host_changed:
            params = cohort.params
            for key, value in ctx._host_writes.items():
                for p in params:
                    self.state[p][key] = value
            self._layouts.pop(rp.index, None)

    def _check_resized(self, rp: RoutePlan, p: torch.Tensor) -> None:
        """On a new layout: ``p``, if resized since the optimizer was built, has elements if and
        only if it had some then, and its route's stages still take its shape. One emptied since
        (``p.data = torch.empty(0)``) was given state at its empty shape or broke inside a matrix
        stage; one filled since was never stepped, without a word; a matrix turned into a vector
        broke inside the first stage that needs a matrix."""
        built, shape = self._built_shapes.get(id(p)), tuple(p.shape)
        if built is None or built == shape:
            return
        name, resized = self._names.get(id(p), "?"), f"was resized from {list(built)} to {list(shape)}"
        if is_empty(built) != is_empty(shape):
            why = (
                f"its route, shape checks and state were laid out for {list(built)}"
                if is_empty(shape)
                else "the optimizer leaves out a parameter with no elements, so it would never be stepped"
            )
            raise SoapArgumentError(
                f"parameter '{name}' {resized} after the optimizer was built: {why};"
                " build a new optimizer for the resized parameters"
            )
        problem = shape_problem(rp.ops, shape)
        if problem is not None:
            op, why, reshaped = problem
            raise SoapShapeError(
                f"parameter '{name}' {resized} after the optimizer was built and cannot go through this"
                f" stage: {why}; build a new optimizer for the resized parameters",
                getattr(op, "loc", None),
                notes=reshaped,
            )

    def _check_state_fits(self, rp: RoutePlan, p: torch.Tensor) -> None:
        """On a new layout: ``p``'s state tensors have the shapes its current shape asks for,
        and follow it to its current dtype and device (as ``load_state_dict`` puts them): a
        model converted or moved after its first step (``model.double()``, ``model.to(dev)``)
        keeps training with its state, as it would after saving and loading."""
        st = self.state[p]
        step = st.get("step")
        if step is not None and not (
            torch.is_tensor(step) and step.dtype == torch.float32 and step.ndim == 0 and step.is_cpu
        ):
            # a count set from outside (`st["step"] = torch.tensor(100)`, an int64 that torch's
            # optimizers count on) is read as a checkpoint's is
            st["step"] = _load_step(self._names.get(id(p), "?"), step)
        for key, (shape, dtype) in self._state_specs(rp, p).items():
            t = st.get(key)
            if not torch.is_tensor(t):
                continue
            if tuple(t.shape) != shape:
                raise SoapShapeError(
                    f"parameter '{self._names.get(id(p), '?')}' has shape {list(p.shape)}, but its state"
                    f" '{key}' has shape {list(t.shape)}, not {list(shape)}: it was resized in place after"
                    " its first step. Reset its state (`del opt.state[p]`) to start it afresh at the new"
                    " shape, or build a new optimizer"
                )
            if t.dtype != dtype or t.device != p.device:
                st[key] = t.to(device=p.device, dtype=dtype)

    def _run_fused(self, f: fused.FusedAdam, group: dict[str, Any], cohort: _Cohort) -> bool:
        """One step of an Adam-shaped route through torch's fused kernel; False: not possible."""
        hyper = f.hyper(group)
        if hyper is None:
            return False
        if cohort.fused is None:
            params = cohort.params
            cohort.fused = fused.Tensors.of(params, [self.state[p] for p in params], cohort.steps, f)
        ts = cohort.fused
        grads = ts.grads()
        if grads is None:
            return False
        ts.advance(cohort.t + 1)
        fused.step(f, ts, grads, hyper)
        self._stepped(cohort, cohort.t + 1)
        return True

    def _stepped(self, cohort: _Cohort, t: int) -> None:
        """Record that every parameter of ``cohort`` has taken step ``t`` (its counters already count it)."""
        cohort.t = t
        self._steps.update(dict.fromkeys(cohort.ids, t))  # one C-level pass: a step of many small tensors is host-bound


@eager
def _eager_step(opt: SoapOptimizer, closure: Callable[[], Any] | None) -> Any:
    with torch.no_grad():
        return opt._step_with(closure)
