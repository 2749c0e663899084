"""Compiler: checked recipe + concrete parameters -> Plan.

Binds the recipe's header parameters (defaults, then the user's arguments), evaluates every
route's settings, validates every stage's arguments with the bound values, routes each
parameter to the first route whose selector matches it, checks that every stage can handle
the shapes routed to it, builds the runtime op tree, and lays out the state.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from soapdsl import ir, registry
from soapdsl.check import (
    ROUTE_OPTIONS,
    always_true,
    argument_value,
    check_selector,
    evaluate,
    lr_problem,
    recipe_reader_note,
    validate_args,
)
from soapdsl.errors import (
    SoapArgumentError,
    SoapError,
    SoapNameError,
    SoapRecipeError,
    SoapRouteError,
    SoapShapeError,
    SoapWarning,
    decimal_comma_hint,
    did_you_mean,
    warn,
)
from soapdsl.registry import walk_ops as walk_ops  # defined beside Op.children; callers import it from here
from soapdsl.runtime.fused import FusedAdam
from soapdsl.runtime.fused import match as fused_match
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import non_ascii_digit_note
from soapdsl.syntax.printer import format_selector

FORMAT_VERSION = 1


@dataclass
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    route: int
    state_bytes: int
    notes: list[str] = field(default_factory=list)  # Op.notes along the route, for `compile`

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclass
class RoutePlan:
    index: int
    route: ir.Route
    hyper: dict[str, Any]  # the route's param_group values
    options: dict[str, Any]
    ops: list[registry.Op]  # runtime op tree (scope ops hold .body)
    params: list[ParamEntry] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False)
    #: header parameters (param_group keys) this route reads once, when it is built: in its
    #: selector, its settings, or a stage argument that does not follow the param_group (or
    #: follows it only at each parameter's first step, with no other stage following it)
    fixed: frozenset[str] = frozenset()
    #: of those, the ones a checkpoint must have been saved with: all but those only a route
    #: setting reads (`[lr=adam_lr]`), whose target, the group's lr, the checkpoint restores
    compared: frozenset[str] = frozenset()
    #: (op path, share key) -> index in ``tensors`` of the parameter that holds the op's shared
    #: state for that share group (see :func:`share_leaders`)
    leaders: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)
    #: the recipe whose header parameters this route's param_group holds: the plan's own, or
    #: for a route a config's route override added, the overriding recipe
    recipe: str = ""

    @property
    def needs_batch_dim(self) -> bool:
        """Matrix and scope ops see every bucket with a leading batch dimension."""
        return any(op.kind in ("matrix", "batched", "scope") for op in walk_ops(self.ops))

    @property
    def batched(self) -> bool:
        """Parameters of equal shape are stacked into one batch (off with ``[batch=false]``)."""
        return self.needs_batch_dim and self.options.get("batch") is not False

    @property
    def fused(self) -> FusedAdam | None:
        """The fused Adam(W) form of the route, when its pipeline is exactly Adam's."""
        return fused_match(self.ops, self.options)

    @property
    def selector(self) -> str:
        return self.route.selector_text()


@dataclass
class Plan:
    """What a recipe becomes for a given set of parameters: printable and JSON-serializable."""

    recipe: ir.Recipe
    args: dict[str, Any]
    routes: list[RoutePlan]
    #: route overrides: (selector, recipe name, recipe fingerprint)
    overrides: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        if not self.overrides:
            return self.recipe.fingerprint()
        body = repr((self.recipe.fingerprint(), tuple(self.overrides)))
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def params(self) -> list[ParamEntry]:
        return [p for r in self.routes for p in r.params]

    def state_bytes(self) -> int:
        return sum(p.state_bytes for p in self.params)

    def param_bytes(self) -> int:
        return sum(p.bytes for p in self.params)

    def to_dict(self) -> dict[str, Any]:
        from soapdsl.report import plan_to_dict

        return plan_to_dict(self)

    def to_text(self) -> str:
        from soapdsl.report import plan_to_text

        return plan_to_text(self)


Scopes = tuple[tuple[registry.Op, tuple[int, ...]], ...]


def _walk_scopes(
    ops: Iterable[registry.Op], shape: tuple[int, ...], scopes: Scopes
) -> Iterable[tuple[registry.Op, tuple[int, ...], Scopes]]:
    for op in ops:
        yield op, shape, scopes
        body = getattr(op, "body", None)
        if body:
            yield from _walk_scopes(body, op.inner_shape(shape), (*scopes, (op, shape)))
        for branch in getattr(op, "branches", {}).values():
            yield from _walk_scopes(branch, shape, scopes)


def walk_shaped(ops: Iterable[registry.Op], shape: tuple[int, ...]) -> Iterable[tuple[registry.Op, tuple[int, ...]]]:
    """Like :func:`walk_ops`, with the parameter shape each op sees (scopes may reshape)."""
    for op, seen, _ in _walk_scopes(ops, shape, ()):
        yield op, seen


def shape_problem(ops: Iterable[registry.Op], shape: tuple[int, ...]) -> tuple[registry.Op, str, list[str]] | None:
    """The first op that cannot take a parameter of ``shape`` (as it sees it), why, and notes
    on each enclosing scope that reshaped it (so the error's two shapes are explained); or None."""
    for op, seen, scopes in _walk_scopes(ops, shape, ()):
        why = op.check_shape(seen)
        if why is not None:
            notes = [scope.reshape_note(outer) for scope, outer in scopes if scope.inner_shape(outer) != outer]
            return op, why, notes
    return None


# -- binding ----------------------------------------------------------------------------------


def bind_args(recipe: ir.Recipe, args: Mapping[str, Any], partial: bool = False) -> dict[str, Any]:
    """Header parameter values: the defaults, overridden by ``args``; ``partial`` checks the
    arguments given only, leaving a required parameter unset (None)."""
    values = recipe.defaults()
    for k, v in args.items():
        if k not in values:
            raise SoapNameError(
                f"recipe '{recipe.name}' has no parameter '{k}'"
                + did_you_mean(k, values)
                + (f" (parameters: {', '.join(values)})" if values else "")
            )
        v = argument_value(recipe.name, k, v)
        default = values[k]
        if isinstance(default, int | float) and not isinstance(default, bool) and isinstance(v, str):
            # YAML 1.1 reads 3e-4 as a string; a numeric parameter takes it as the number it spells,
            # in ASCII digits as recipe text writes one (float() reads full-width digits too)
            digit = next((i for i, c in enumerate(v) if c.isdecimal() and not c.isascii()), None)
            try:
                if digit is not None:
                    raise ValueError(v)
                number = float(v)
            except ValueError:
                note = non_ascii_digit_note(v[digit:]) if digit is not None else None
                raise SoapArgumentError(
                    f"argument {k} of recipe '{recipe.name}' must be a number, got {v!r}"
                    + (f": {note}" if note else decimal_comma_hint(v))
                ) from None
            v = int(number) if isinstance(default, int) and number.is_integer() and "." not in v else number
        values[k] = v
    missing = [k for k, v in values.items() if v is None]
    if missing and not partial:
        k = missing[0]
        reader = recipe_reader_note(recipe, k)
        raise SoapArgumentError(
            f"recipe '{recipe.name}' needs argument '{k}': its header gives it no default",
            recipe.param_loc(k),
            notes=[
                *([reader] if reader else []),
                f"pass {k}=...: build(..., {k}=...), --set {k}=... (compile), RECIPE:{k}=... (race),"
                f" or args: {{{k}: ...}} (config)",
            ],
        )
    return values


def _build_ops(
    pipeline: ir.Pipeline,
    env: Mapping[str, Any],
    prefix: str = "",
    depth: int = 0,
    outer: Mapping[str, registry.Op] | None = None,
) -> list[registry.Op]:
    """Runtime ops of a pipeline; ``outer``: labelled stages of the enclosing pipelines that
    run before this one (a stage inside a scope may read them)."""
    ops: list[registry.Op] = []
    outer = outer or {}
    for i, stage in enumerate(pipeline.stages):
        cls = registry.get(stage.op)
        assert cls is not None, stage.op
        model = validate_args(cls, stage.args, env, stage.loc)
        assert model is not None
        dyn = cls.dynamic_fields()
        dynamic = {k: v for k, v in stage.args if k in dyn and v.refs()}
        op = cls(model, dynamic, f"{prefix}{i}")
        # parameters read into the arguments here, once (a branch's stages are ops of their own)
        op.fixed_refs = frozenset(  # type: ignore[attr-defined]
            r for k, v in stage.args if k not in dynamic and not isinstance(v, ir.PipeVal) for r in v.refs()
        )
        # ...and those read once per parameter, at its first step (FirstStepHyper fields)
        first = cls.first_step_fields()
        op.first_step_refs = frozenset(r for k, v in dynamic.items() if k in first for r in v.refs())  # type: ignore[attr-defined]
        op.loc = stage.loc  # type: ignore[attr-defined]
        op.label = stage.label  # type: ignore[attr-defined]
        op.depth = depth  # type: ignore[attr-defined]
        op.probes_before = []  # type: ignore[attr-defined]  # readers of this stage's input
        op.probes_after = []  # type: ignore[attr-defined]  # readers of its output (filled by _link_probes)
        if stage.body is not None:
            visible = {**outer, **{o.label: o for o in ops if getattr(o, "label", None)}}  # type: ignore[attr-defined]
            op.body = _build_ops(stage.body, env, f"{prefix}{i}.", depth + 1, visible)  # type: ignore[attr-defined]
        why = op.check_placement()
        if why is not None:
            raise SoapRecipeError(f"'{op.name}': {why}", stage.loc)
        op.branches = {  # type: ignore[attr-defined]
            k: _build_ops(v.pipeline, env, f"{prefix}{i}.{k}.", depth + 1)
            for k, v in stage.args
            if isinstance(v, ir.PipeVal)
        }
        ops.append(op)
    _link_probes(ops, outer)
    return ops


def _link_probes(ops: list[registry.Op], outer: Mapping[str, registry.Op] | None = None) -> None:
    """Tell ops that read an earlier point of their pipeline (graft) where to look.

    An op with a ``source()`` of ("input", None) reads the input of the stage before it;
    ("output", label) the output of the stage labelled ``label``: an earlier stage of the same
    pipeline, or else (``outer``) of an enclosing pipeline, before the scope this one is the
    body of. The executor records that value's norms (and a branch's output) at that point.
    """
    outer = outer or {}
    labels = {getattr(op, "label", None): j for j, op in enumerate(ops) if getattr(op, "label", None)}
    for i, op in enumerate(ops):
        source = op.source() if hasattr(op, "source") else None
        if source is None:
            continue
        kind, label = source
        if kind == "input":
            if i == 0:
                raise SoapRecipeError(
                    f"'{op.name}' reads the input of the stage before it, and there is none here",
                    getattr(op, "loc", None),
                )
            ops[i - 1].probes_before.append(op)  # type: ignore[attr-defined]
        else:
            j = labels.get(label)
            if j is not None and j < i:
                ops[j].probes_after.append(op)  # type: ignore[attr-defined]
            elif label in outer and j is None:
                outer[str(label)].probes_after.append(op)  # type: ignore[attr-defined]
            else:
                known = [str(k) for k, v in labels.items() if v < i] + [k for k in outer if k not in labels]
                raise SoapRecipeError(
                    f"'{op.name}' reads the stage labelled '{label}', which is not an earlier stage of"
                    " this pipeline or of one around it" + did_you_mean(str(label), known),
                    getattr(op, "loc", None),
                )


# -- selectors --------------------------------------------------------------------------------


def shape_quantity(name: str, shape: tuple[int, ...]) -> float:
    if name == "ndim":
        return len(shape)
    if name == "numel":
        return math.prod(shape)
    if name == "max_dim":
        return max(shape, default=0)
    if name == "min_dim":
        return min(shape, default=0)
    if name == "aspect":
        return max(shape) / max(min(shape), 1) if shape else 1.0
    raise KeyError(name)  # pragma: no cover - the checker rejects other names


_CMP = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def matches(sel: A.Selector, name: str, shape: tuple[int, ...], env: Mapping[str, Any]) -> bool:
    if isinstance(sel, A.SelPattern):
        return fnmatch.fnmatchcase(name, sel.pattern)
    if isinstance(sel, A.SelName):
        n = len(shape)
        return {
            "default": True,
            "scalar": n == 0,
            "vector": n == 1,
            "matrix": n == 2,
            "tensor": n >= 3,
        }[sel.name]
    if isinstance(sel, A.SelCompare):
        return _CMP[sel.op](shape_quantity(sel.name, shape), evaluate(sel.value, env))
    if isinstance(sel, A.SelNot):
        return not matches(sel.operand, name, shape, env)
    if isinstance(sel, A.SelAnd):
        return all(matches(i, name, shape, env) for i in sel.items)
    return any(matches(i, name, shape, env) for i in sel.items)


# -- state layout -----------------------------------------------------------------------------


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """State is kept in at least fp32 (fp64 parameters keep fp64 state)."""
    if not param_dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(param_dtype, torch.float32)


def is_empty(shape: tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` has no elements (a zero-size dimension): it has nothing
    to update, so the runtime never steps it and it keeps no state (torch's optimizers step
    one as a no-op); a 0-d parameter is not empty."""
    return 0 in shape


def op_state_bytes(ops: Iterable[registry.Op], shape: tuple[int, ...], dtype: torch.dtype, leads: Any = None) -> int:
    """State bytes of one parameter; ``leads(op)`` says whether it holds the op's shared state."""
    if is_empty(shape):
        return 0
    total = 0
    for op, seen in walk_shaped(ops, shape):
        for spec in op.state(seen).values():
            if spec.shared and leads is not None and not leads(op):
                continue
            total += math.prod(spec.shape) * _itemsize(state_dtype(dtype))
    return total


# -- the compiler -----------------------------------------------------------------------------


# attributes under which torch's wrappers hold the model they wrap: torch.compile's
# OptimizedModule, FSDP (version 1) and activation checkpointing. DDP and DataParallel hold it
# as `module`, a name models use too, so that one is dropped only under those wrappers.
_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _names(model: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """Every name ``model`` holds each parameter under (``named_parameters(remove_duplicate=False)``):
    (the name routes see, torch's name, the tensor). The names routes see leave the wrappers'
    segments out, so that routes select the same parameters (and a checkpoint fits) whether or
    not the model is compiled or wrapped for data parallelism: `torch.compile(model)` names its
    parameters `_orig_mod.<name>`, DDP `module.<name>`."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    out: list[tuple[str, str, torch.Tensor]] = []
    for name, t in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        kept, module = [], model
        for part in parts[:-1]:
            if not (part in _WRAPPERS or (part == "module" and isinstance(module, parallel))):
                kept.append(part)
            module = module._modules[part]  # type: ignore[assignment]
        out.append((".".join([*kept, parts[-1]]), name, t))
    first = _first_names(out)
    if len({n for n, _, _ in first}) < len(first):  # a model that also holds what it wraps: keep torch's names
        return [(raw, raw, t) for _, raw, t in out]
    return out


def _first_names(names: list[tuple[str, str, torch.Tensor]]) -> list[tuple[str, str, torch.Tensor]]:
    """Each tensor once, under its first name, as ``nn.Module.named_parameters()`` lists it."""
    first: dict[int, tuple[str, str, torch.Tensor]] = {}
    for x in names:
        first.setdefault(id(x[2]), x)
    return list(first.values())


def _unwrapped(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` with the wrappers' segments left out of the names (`_names`)."""
    return [(name, t) for name, _, t in _first_names(_names(model))]


def tied_names(model: torch.nn.Module) -> list[list[tuple[str, str]]]:
    """The names of each tensor ``model`` holds under more than one, as (name routes see, torch's
    name) pairs, the first the one it is routed by: ``transformer.wte.weight`` and
    ``lm_head.weight`` in a GPT-2 whose head is tied to its embedding."""
    names: dict[int, list[tuple[str, str]]] = {}
    for name, raw, t in _names(model):
        held = names.setdefault(id(t), [])
        if all(name != n for n, _ in held):
            held.append((name, raw))
    return [held for held in names.values() if len(held) > 1]


# what parameters may be: integer and bool tensors cannot take a fractional update, float8
# ones cannot enter type promotion, complex ones would lose their imaginary part
_PARAM_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (its shape is the global one, its data a shard)."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has none
        return False
    return isinstance(t, DTensor)


def _placement_problem(t: Any) -> str | None:
    """Why soapdsl cannot step the DTensor ``t``, or None: it steps FSDP2's layout only
    (runtime/fsdp.py)."""
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        return (
            f"is a DTensor placed {tuple(t.placements)} on a {mesh.ndim}-D device mesh; soapdsl steps"
            " FSDP2's layout, Shard(0) on a 1-D mesh (torch.distributed.fsdp.fully_shard): tensor"
            " parallelism and HSDP are not supported"
        )
    return None


def named_parameters(params: Any) -> list[tuple[str, torch.Tensor]]:
    """Accept an nn.Module, an iterable of (name, tensor), or an iterable of tensors. The names
    of a wrapped module leave its wrappers out (`_unwrapped`); so do given names, where a
    segment is one of torch's `_WRAPPERS`."""
    if isinstance(params, torch.nn.Module):
        return _unwrapped(params)
    if isinstance(params, torch.Tensor):
        raise SoapArgumentError("params must be an iterable of tensors or an nn.Module, got a single tensor")
    if isinstance(params, str | bytes):  # iterating it would give its characters
        raise SoapArgumentError(
            f"params must be an nn.Module or an iterable of parameters, got {type(params).__name__}"
        )
    if isinstance(params, Mapping):  # iterating it would give its keys
        raise SoapArgumentError(
            "params is a dict: pass its .items() (name -> tensor), model.named_parameters() or the module"
        )
    if isinstance(params, set | frozenset):  # torch.optim refuses one too
        raise SoapArgumentError(
            f"params is a {type(params).__name__}, whose order changes from run to run (a state dict"
            " keys each parameter's state by its position, so a checkpoint would load into the wrong"
            " parameters): pass a list, model.named_parameters() or the module"
        )
    try:
        items = list(params)
    except TypeError:
        raise SoapArgumentError(
            f"params must be an nn.Module or an iterable of parameters, got {type(params).__name__}"
        ) from None
    out: list[tuple[str, torch.Tensor]] = []
    seen: dict[int, str] = {}  # id of each tensor -> its name
    names: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, t = item
            name = ".".join(part for part in name.split(".") if part not in _WRAPPERS) or name
        elif isinstance(item, dict):
            raise SoapArgumentError(
                "param-group dicts are not accepted: routes make the groups; use a recipe route instead"
            )
        else:
            name, t = f"param.{i}", item
        if not isinstance(t, torch.Tensor):
            raise SoapArgumentError(f"parameter '{name}' is a {type(t).__name__}, not a tensor")
        # one tensor under two names would take the first name's route and be stepped once
        # (nn.Module.named_parameters() already lists tied weights once)
        if id(t) in seen:
            raise SoapArgumentError(
                f"parameter '{name}' is the same tensor as '{seen[id(t)]}' (tied weights): pass it once"
            )
        if name in names:
            raise SoapArgumentError(
                f"two different parameters are named '{name}': names must be unique (routes select"
                " parameters by name, and errors and `soapdsl compile` name them)"
            )
        seen[id(t)] = name
        names.add(name)
        out.append((name, t))
    return out


def _route_plan(
    index: int, route: ir.Route, values: Mapping[str, Any], args: Mapping[str, Any], recipe: str
) -> RoutePlan:
    env = dict(values)
    options: dict[str, Any] = {}
    for name, v in route.settings:
        value = v.evaluate(values)
        if name in ROUTE_OPTIONS:
            options[name] = value
        else:
            env[name] = value
    try:
        # the selector's comparisons may read a required parameter, which check_recipe could not
        check_selector(route.selector, env, {k: ir.Ref(k) for k in env})
        ops = _build_ops(route.pipeline, env)
        lr = env.get("lr")
        problem = lr_problem(lr) if lr is not None else "the learning rate must be a finite number >= 0"
        if problem is not None:
            raise SoapArgumentError(f"route '{route.selector_text()}' has lr={ir.const_text(lr)}; {problem}", route.loc)
    except SoapError as e:
        # the values may have come from the user's arguments, not from the recipe the location is in
        note = ", ".join(f"{k}={ir.const_text(v)}" for k, v in args.items())
        if note:
            e.notes = (*e.notes, f"recipe arguments given: {note}")
            e.args = (e.format(),)
        raise
    every = list(walk_ops(ops))
    # a parameter that only first-step arguments read is fixed too: a change could reach only the
    # parameters that have not stepped yet. One that a stage follows every step stays free to change.
    followed = {"lr"} | {
        r for op in every for k, v in op.dynamic.items() if k not in op.first_step_fields() for r in v.refs()
    }
    once = {r for op in every for r in op.first_step_refs} - followed  # type: ignore[attr-defined]
    read = selector_names(route.selector) | {r for op in every for r in op.fixed_refs} | once  # type: ignore[attr-defined]
    fixed = read | {r for _, v in route.settings for r in v.refs()}
    return RoutePlan(
        index,
        route,
        env,
        options,
        ops,
        fixed=frozenset(k for k in fixed if k in env),
        compared=frozenset(k for k in read if k in env),
        recipe=recipe,
    )


def selector_names(sel: A.Selector) -> set[str]:
    """Names a selector's comparisons read (``max_dim <= max_dim`` reads the parameter max_dim)."""
    if isinstance(sel, A.SelCompare):
        return _expr_names(sel.value)
    if isinstance(sel, A.SelNot):
        return selector_names(sel.operand)
    if isinstance(sel, A.SelAnd | A.SelOr):
        return {n for i in sel.items for n in selector_names(i)}
    return set()


def _expr_names(e: A.Expr) -> set[str]:
    if isinstance(e, A.Name):
        return {e.id}
    if isinstance(e, A.Tuple):
        return {n for i in e.items for n in _expr_names(i)}
    if isinstance(e, A.Neg):
        return _expr_names(e.operand)
    if isinstance(e, A.BinOp):
        return _expr_names(e.left) | _expr_names(e.right)
    return set()


Override = tuple[A.Selector, ir.Recipe, Mapping[str, Any]]


def mark_routes(
    plan: Plan, *, torch_compile: bool = False, cuda_graphs: bool = False, stochastic_round: bool = False
) -> None:
    """Set the route options ``compile`` / ``cuda_graph`` / ``stochastic_round`` on every route
    of ``plan``, as ``build(torch_compile=True, cuda_graphs=True, stochastic_round=True)`` and
    the config keys of those names ask; a route that would end up with both of the first two is
    refused."""
    if torch_compile and cuda_graphs:
        raise SoapArgumentError(
            "torch_compile=True and cuda_graphs=True: choose one (torch.compile captures CUDA graphs"
            " of its own, with mode='reduce-overhead')"
        )
    for rp in plan.routes:
        if torch_compile:
            rp.options["compile"] = True
        if cuda_graphs:
            rp.options["cuda_graph"] = True
        if stochastic_round:
            rp.options["stochastic_round"] = True
        if rp.options.get("compile") and rp.options.get("cuda_graph"):
            raise SoapArgumentError(
                f"route '{rp.selector}' would run under torch.compile ([compile=true]) and with CUDA"
                " graphs ([cuda_graph=true] or cuda_graphs=True): choose one"
            )


def compile_plan(
    recipe: ir.Recipe,
    params: Any,
    args: Mapping[str, Any] | None = None,
    overrides: Iterable[Override] = (),
) -> Plan:
    """Compile ``recipe`` for ``params``.

    ``overrides`` are (selector, recipe, args) triples tried before the recipe's own routes:
    the parameters a selector takes are routed through that recipe's routes, with its own
    hyperparameters (e.g. send ``"embed*"`` to ``adamw`` with its own lr).
    """
    args = dict(args or {})
    routes: list[RoutePlan] = []
    borrowed: list[tuple[str, str, str]] = []
    for selector, sub, sub_args in overrides:
        sub_values = bind_args(sub, dict(sub_args))
        borrowed.append((format_selector(selector), sub.name, sub.fingerprint()))
        for r in sub.routes:
            combined = selector if always_true(r.selector) else A.SelAnd((selector, r.selector))
            routes.append(
                _route_plan(
                    len(routes), ir.Route(combined, r.settings, r.pipeline, r.loc), sub_values, sub_args, sub.name
                )
            )
    values = bind_args(recipe, args)
    for route in recipe.routes:
        routes.append(_route_plan(len(routes), route, values, args, recipe.name))
    for name, t in named_parameters(params):
        if is_lazy(t):  # reading its shape raises inside torch
            raise SoapArgumentError(
                f"parameter '{name}' is not initialized yet (a lazy module's, such as nn.LazyLinear's), so"
                " it has no shape to route it by: run a forward pass through the model before building"
                " the optimizer"
            )
        if t.dtype not in _PARAM_DTYPES:  # complex: the stages would drop the imaginary part
            raise SoapArgumentError(
                f"parameter '{name}' is {str(t.dtype).removeprefix('torch.')}; soapdsl optimizes real"
                " floating-point parameters only (float16, bfloat16, float32, float64)"
            )
        if is_dtensor(t):
            problem = _placement_problem(t)
            if problem is not None:
                raise SoapArgumentError(f"parameter '{name}' {problem}")
        shape = tuple(t.shape)
        rp = _route_for(routes, name, shape)
        if rp is None:
            raise SoapRouteError(
                f"parameter '{name}' (shape {list(shape)}) matches no route of recipe"
                f" '{recipe.name}'; add a final `route default: ...`",
                recipe.loc,
            )
        unfit = shape_problem(rp.ops, shape)
        if unfit is not None:
            op, why, reshaped = unfit
            raise SoapShapeError(
                f"parameter '{name}' of shape {list(shape)} cannot go through this stage: {why}",
                getattr(op, "loc", None),
                notes=[*reshaped, f"it was routed by 'route {rp.selector}' (route {rp.index})"],
            )
        notes = [n for op, seen in walk_shaped(rp.ops, shape) for n in op.notes(seen)]
        if is_empty(shape):
            notes = ["empty: never stepped, no state"]
        rp.params.append(ParamEntry(name, shape, t.dtype, rp.index, 0, notes))
        rp.tensors.append(t)
    if isinstance(params, torch.nn.Module):
        _warn_tied(routes, tied_names(params))
    for rp in routes:
        names = [e.name for e in rp.params]
        for op in walk_ops(rp.ops):
            problem = op.share_problem(names)
            if problem is not None:
                warn(SoapWarning(problem, getattr(op, "loc", None)))
        rp.leaders = share_leaders(rp)
        for i, e in enumerate(rp.params):
            e.state_bytes = op_state_bytes(
                rp.ops,
                e.shape,
                e.dtype,
                lambda op, i=i, n=e.name, lead=rp.leaders: lead[(op.path, op.share_key(n))] == i,
            )
    return Plan(recipe, values, routes, borrowed)


def _route_for(routes: list[RoutePlan], name: str, shape: tuple[int, ...]) -> RoutePlan | None:
    """The route a parameter of this name and shape takes: the first whose selector it satisfies."""
    return next((rp for rp in routes if matches(rp.route.selector, name, shape, rp.hyper)), None)


def _warn_tied(routes: list[RoutePlan], tied: list[list[tuple[str, str]]]) -> None:
    """Warn of each tensor held under several names that select different routes: it is stepped
    once, by its first name's route, and the other route never sees it (a GPT-2's head, tied to
    its embedding, took soap_muon's embedding lr of 0.4, not the head's 4e-3)."""
    taken = {e.name: (rp, e.shape) for rp in routes for e in rp.params}
    for names in tied:
        first = names[0][0]
        rp, shape = taken[first]
        chosen = [(name, raw, _route_for(routes, name, shape)) for name, raw in names]
        if all(other is None or other.index == rp.index for _, _, other in chosen):
            continue
        others = " and ".join(f"'{name}'" for name, _, _ in chosen[1:])
        selects = ", ".join(
            f"'{name}' selects route '{other.selector}' (route {other.index})"
            for name, _, other in chosen
            if other is not None
        )
        notes, noted = [], {rp.index}  # one way to each other route
        for name, raw, other in chosen:
            if other is None or other.index in noted:
                continue
            noted.add(other.index)
            left = [r for _, r, _ in chosen if r != raw]
            drop = f"n != '{left[0]}'" if len(left) == 1 else f"n not in {tuple(left)}"
            notes.append(
                f"to route it by '{name}' (route {other.index}), pass the parameters with that name only:"
                f" [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if {drop}]"
            )
        notes.append(f"to keep it on route {rp.index} without this warning, pass model.named_parameters()")
        warn(
            SoapWarning(
                f"parameter '{first}' is also named {others} (tied weights), and the names select"
                f" different routes: {selects}; it is stepped once, by route {rp.index}, its first name's"
                " (nn.Module.named_parameters() lists a tied tensor once, under its first name)",
                notes=notes,
            )
        )


def share_leaders(rp: RoutePlan) -> dict[tuple[str, str], int]:
    """(op path, share key) -> the parameter that holds the op's shared state for the group.

    A share group is the route's parameters with equal ``op.share_key(name)``. Its state is held
    by its first parameter that requires a gradient (its first parameter if none does): a frozen
    parameter never steps, so it adds nothing to the group's statistics and cannot hold them.
    The members of a group that has shared state are stacked into one batch at run time, so
    they need a batched route and equal shapes, dtypes and devices.
    """
    members: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(rp.params):
        for op in walk_ops(rp.ops):
            members.setdefault((op.path, op.share_key(e.name)), []).append(i)
    leaders: dict[tuple[str, str], int] = {}
    for (path, key), idx in members.items():
        leaders[(path, key)] = next((i for i in idx if rp.tensors[i].requires_grad), idx[0])
        if len(idx) > 1:
            _check_share_group(rp, path, key, idx)
    return leaders


def _check_share_group(rp: RoutePlan, path: str, key: str, idx: list[int]) -> None:
    """Raise if the members ``idx`` of a share group of the op at ``path`` cannot be stacked."""
    op = next(op for op in walk_ops(rp.ops) if op.path == path)
    if not any(spec.shared for i in idx for spec in op.state(rp.params[i].shape).values()):
        return
    names = " and ".join(f"'{rp.params[i].name}'" for i in idx[:2]) + (" (and others)" if len(idx) > 2 else "")
    head = f"'{op.name}' shares its state between parameters {names} (share group '{key}')"
    notes = [f"they were routed by 'route {rp.selector}' (route {rp.index})"]
    if not rp.batched:
        raise SoapArgumentError(
            f"{head}, but the route has [batch=false]: the members of a share group are stacked"
            " into one batch; drop the setting, or the share argument",
            getattr(op, "loc", None),
            notes=notes,
        )

    def describe(i: int) -> tuple[tuple[str, str], ...]:
        t = rp.tensors[i]
        shape = str(list(t.shape))
        return (("shape", shape), ("dtype", str(t.dtype).removeprefix("torch.")), ("device", str(t.device)))

    first = describe(idx[0])
    for i in idx[1:]:
        for (what, a), (_, b) in zip(first, describe(i), strict=True):
            if a != b:
                raise SoapArgumentError(
                    f"{head}, but they differ in {what}: '{rp.params[idx[0]].name}' has {what} {a},"
                    f" '{rp.params[i].name}' has {b}; the members of a share group need equal shapes,"
                    " dtypes and devices",
                    getattr(op, "loc", None),
                    notes=notes,
                )
