"""Checker: AST -> checked IR.

Resolves stage names against the operator registry and the macros in scope, binds arguments
to each operator's fields (positional order = field order), validates them through the
operator's pydantic model, expands macros, turns bare scopes into block scopes, and enforces
the structural rules (one `lr` per route, no unreachable routes, ...). Every error carries the
location of the text that caused it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from soapdsl import ir, registry
from soapdsl.errors import (
    Loc,
    SoapArgumentError,
    SoapError,
    SoapNameError,
    SoapRecipeError,
    SoapRouteError,
    did_you_mean,
)
from soapdsl.syntax import ast as A

#: selector names and the shape quantities a comparison may use
SELECTOR_NAMES = ("default", "scalar", "vector", "matrix", "tensor")
SELECTOR_QUANTITIES = ("ndim", "numel", "max_dim", "min_dim", "aspect")
#: reserved route settings that configure the runtime rather than a param_group key
ROUTE_OPTIONS = ("batch", "compile", "fused")


@dataclass
class MacroTable:
    """Macros visible to a checked source: the prelude, then the source's own (shadowing)."""

    macros: dict[str, A.Macro] = field(default_factory=dict)

    def with_module(self, module: A.Module) -> MacroTable:
        out = dict(self.macros)
        seen: dict[str, A.Macro] = {}
        for m in module.macros:
            if m.name in seen:
                raise SoapNameError(f"macro '{m.name}' is defined twice (first at line {seen[m.name].loc.line})", m.loc)
            if registry.get(m.name) is not None:
                raise SoapNameError(f"macro '{m.name}' has the name of a primitive operator", m.loc)
            seen[m.name] = m
            out[m.name] = m
        return MacroTable(out)


@dataclass(frozen=True)
class _Scope:
    """Names visible while checking a pipeline: parameter name -> the value it stands for."""

    names: Mapping[str, ir.Value]
    env: Mapping[str, Any]  # concrete values, used to validate arguments
    macros: MacroTable
    stack: tuple[str, ...] = ()  # macro expansion chain (for recursion and provenance)
    #: inside a scope's body: "" outside any, "block" in a ``scope(...) { ... }``, "bare" in a
    #: scope that runs to the end of its pipeline
    in_scope_body: str = ""


# -- values ---------------------------------------------------------------------------------


def _value(e: A.Expr, scope: _Scope) -> ir.Value:
    if isinstance(e, A.Num | A.Str | A.Bool):
        return ir.Const(e.value, e.loc)
    if isinstance(e, A.Name):
        if e.id in scope.names:
            bound = scope.names[e.id]
            return bound if not isinstance(bound, ir.Ref) else ir.Ref(bound.name, e.loc)
        return ir.Sym(e.id, e.loc)
    if isinstance(e, A.Tuple):
        return ir.TupleVal(tuple(_value(i, scope) for i in e.items), e.loc)
    if isinstance(e, A.Neg):
        return ir.Neg(_value(e.operand, scope), e.loc)
    if isinstance(e, A.BinOp):
        return ir.Bin(e.op, _value(e.left, scope), _value(e.right, scope), e.loc)
    if isinstance(e, A.Block):
        return ir.PipeVal(
            _pipeline(e.pipeline, _Scope(scope.names, scope.env, scope.macros, scope.stack, "block")), e.loc
        )
    raise TypeError(e)  # pragma: no cover


def evaluate(e: A.Expr, env: Mapping[str, Any]) -> Any:
    """Evaluate an expression whose names are the keys of ``env``."""
    return _value(e, _Scope({k: ir.Ref(k) for k in env}, env, MacroTable())).evaluate(env)


def constant(e: A.Expr) -> Any:
    """Evaluate an expression that may use no parameter (header defaults)."""
    v = _value(e, _Scope({}, {}, MacroTable()))
    if isinstance(v, ir.PipeVal):
        raise SoapArgumentError("a pipeline cannot be a parameter default", e.loc)
    return v.evaluate({})


# -- stages ---------------------------------------------------------------------------------


def _bind(cls: type[registry.Op], stage: A.Stage, scope: _Scope) -> tuple[tuple[str, ir.Value], ...]:
    fields = list(registry.public_fields(cls.Args))
    bound: dict[str, ir.Value] = {}
    positional = [a for a in stage.args if a.name is None]
    seen_keyword = False
    for a in stage.args:
        if a.name is None and seen_keyword:
            raise SoapArgumentError("positional argument follows a keyword argument", a.loc)
        seen_keyword |= a.name is not None
    if len(positional) > len(fields):
        extra = positional[len(fields)]
        shown = ", ".join(fields) if fields else "none"
        raise SoapArgumentError(
            f"'{cls.name}' takes at most {len(fields)} positional argument"
            f"{'s' if len(fields) != 1 else ''} ({shown}), got {len(positional)}",
            extra.loc,
        )
    for name, a in zip(fields, positional, strict=False):
        bound[name] = _value(a.value, scope)
    for a in stage.args:
        if a.name is None:
            continue
        if a.name not in fields:
            raise SoapArgumentError(f"'{cls.name}' has no parameter '{a.name}'" + did_you_mean(a.name, fields), a.loc)
        if a.name in bound:
            raise SoapArgumentError(f"argument '{a.name}' of '{cls.name}' given twice", a.loc)
        bound[a.name] = _value(a.value, scope)
    return tuple((f, bound[f]) for f in fields if f in bound)


def validate_args(
    cls: type[registry.Op],
    args: tuple[tuple[str, ir.Value], ...],
    env: Mapping[str, Any],
    loc: Loc,
    names: Mapping[str, Any] | None = None,
) -> registry.OpArgs | None:
    """Evaluate bound arguments against ``env`` and validate them with the op's model.

    Returns None (nothing to validate yet) while a referenced parameter has no value: a
    required recipe parameter is only known when the recipe is bound.
    """
    if any(env.get(r, 0) is None for _, v in args for r in v.refs()):
        return None
    concrete: dict[str, Any] = {}
    locs: dict[str, Loc] = {}
    for name, value in args:
        locs[name] = value.loc
        if isinstance(value, ir.PipeVal):
            concrete[name] = value.pipeline
            continue
        concrete[name] = value.evaluate(env)
    try:
        return cls.Args(**concrete)
    except ValidationError as e:
        err = e.errors()[0]
        fname = str(err["loc"][0]) if err["loc"] else ""
        where = locs.get(fname, loc)
        raw = dict(args).get(fname)
        if err["type"] == "missing" and len(err["loc"]) > 1:
            raise SoapArgumentError(
                f"invalid {fname}={ir.const_text(concrete.get(fname))} for '{cls.name}':"
                f" item {err['loc'][1]} is missing",
                where,
            ) from None
        if err["type"] == "missing":
            raise SoapArgumentError(f"'{cls.name}' needs argument '{fname}'", loc) from None
        choices = _literal_choices(cls, fname)
        # a validator's own error (value_error) names a valid word in a bad combination
        if (
            err["type"] != "value_error"
            and isinstance(raw, ir.Sym | ir.Const)
            and isinstance(concrete.get(fname), str)
            and choices
        ):
            raise SoapArgumentError(
                f"invalid {fname}={concrete[fname]} for '{cls.name}': expected one of "
                + ", ".join(map(str, choices))
                + did_you_mean(concrete[fname], [str(c) for c in choices]),
                where,
            ) from None
        if isinstance(raw, ir.Sym) and err["type"] != "value_error":
            candidates = list(names or env)
            raise SoapNameError(
                f"unknown name '{raw.name}' for argument '{fname}' of '{cls.name}'"
                + did_you_mean(raw.name, candidates),
                where,
            ) from None
        given = concrete.get(fname)
        msg = _pydantic_message(err)
        note = []
        if raw is not None and raw.refs():
            note.append(", ".join(f"{r} = {ir.const_text(env[r])}" for r in sorted(raw.refs()) if r in env))
        raise SoapArgumentError(
            f"invalid {fname}={ir.const_text(given)} for '{cls.name}': {msg}", where, notes=note
        ) from None


def _literal_choices(cls: type[registry.Op], field_name: str) -> tuple[Any, ...]:
    f = registry.public_fields(cls.Args).get(field_name)
    if f is None or get_origin(f.annotation) is not Literal:
        return ()
    return get_args(f.annotation)


def _pydantic_message(err: Mapping[str, Any]) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    if t == "literal_error":
        return "expected one of " + str(ctx.get("expected", "")).replace(" or ", ", ")
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[t]
        bound = next(iter(ctx.values()))
        return f"must be {sym} {bound}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else t


def _pipeline(p: A.Pipeline, scope: _Scope) -> ir.Pipeline:
    out: list[ir.Stage] = []
    stages = list(p.stages)
    i = 0
    while i < len(stages):
        s = stages[i]
        cls = registry.get(s.name)
        if cls is not None:
            args = _bind(cls, s, scope)
            validate_args(cls, args, scope.env, s.loc, scope.names)
            body = None
            if cls.kind == "scope":
                if s.block is not None:
                    body = _pipeline(s.block, _Scope(scope.names, scope.env, scope.macros, scope.stack, "block"))
                else:  # bare form: the scope runs to the end of the pipeline
                    rest = stages[i + 1 :]
                    if not rest:
                        raise SoapRecipeError(f"scope '{s.name}' has nothing inside it", s.loc)
                    body = _pipeline(
                        A.Pipeline(tuple(rest), rest[0].loc),
                        _Scope(scope.names, scope.env, scope.macros, scope.stack, "bare"),
                    )
                    i = len(stages)
            elif s.block is not None:
                raise SoapRecipeError(f"'{s.name}' is not a scope and takes no block", s.loc)
            if cls.kind == "apply" and scope.in_scope_body:
                if scope.in_scope_body == "bare":
                    hint = (
                        "a bare scope runs to the end of its pipeline: close it with a block,"
                        f" `scope(...) {{ ... }} |> {s.name}`, or leave '{s.name}' out and it is appended"
                    )
                else:
                    hint = (
                        f"write it after the block, `scope(...) {{ ... }} |> {s.name}`,"
                        " or leave it out and it is appended"
                    )
                raise SoapRecipeError(
                    f"'{s.name}' applies the update and must stand in the route's top-level pipeline ({hint})",
                    s.loc,
                )
            out.append(ir.Stage(cls.__dict__.get("name", s.name), args, body, s.label, False, scope.stack, s.loc))
        elif s.name in scope.macros.macros:
            out.extend(_expand(scope.macros.macros[s.name], s, scope))
        else:
            candidates = list(registry.all_ops()) + list(scope.macros.macros)
            raise SoapNameError(f"unknown operator '{s.name}'" + did_you_mean(s.name, candidates), s.loc)
        i += 1
    return ir.Pipeline(tuple(out), p.loc)


def _expand(macro: A.Macro, call: A.Stage, scope: _Scope) -> list[ir.Stage]:
    if macro.name in scope.stack:
        chain = " -> ".join((*scope.stack[scope.stack.index(macro.name) :], macro.name))
        raise SoapRecipeError(f"macro '{macro.name}' expands into itself ({chain})", call.loc)
    if call.block is not None:
        raise SoapRecipeError(f"macro '{macro.name}' takes no block", call.loc)
    names = [p.name for p in macro.params]
    bound: dict[str, ir.Value] = {}
    positional = [a for a in call.args if a.name is None]
    if len(positional) > len(names):
        raise SoapArgumentError(
            f"macro '{macro.name}' takes at most {len(names)} positional arguments, got {len(positional)}",
            positional[len(names)].loc,
        )
    for name, a in zip(names, positional, strict=False):
        bound[name] = _value(a.value, scope)
    for a in call.args:
        if a.name is None:
            continue
        if a.name not in names:
            raise SoapArgumentError(
                f"macro '{macro.name}' has no parameter '{a.name}'" + did_you_mean(a.name, names), a.loc
            )
        if a.name in bound:
            raise SoapArgumentError(f"argument '{a.name}' of '{macro.name}' given twice", a.loc)
        bound[a.name] = _value(a.value, scope)
    for p in macro.params:
        if p.name not in bound:
            if p.default is None:
                raise SoapArgumentError(f"macro '{macro.name}' needs argument '{p.name}'", call.loc)
            bound[p.name] = ir.Const(constant(p.default), p.loc)
    # substituted values refer to the recipe's parameters, so validation keeps the recipe's env
    inner = _Scope(bound, scope.env, scope.macros, (*scope.stack, macro.name), scope.in_scope_body)
    try:
        body = _pipeline(macro.body, inner)
    except SoapError as e:
        e.notes = (*e.notes, f"in macro '{macro.name}' used at {call.loc}")
        e.args = (e.format(),)
        raise
    stages = list(body.stages)
    if call.label is not None and stages:
        last = stages[-1]
        stages[-1] = ir.Stage(last.op, last.args, last.body, call.label, last.implicit, last.via, last.loc)
    return stages


# -- recipes --------------------------------------------------------------------------------


def check_params(params: tuple[A.Param, ...], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in params:
        if p.name in out:
            raise SoapNameError(f"parameter '{p.name}' of {what} is declared twice", p.loc)
        out[p.name] = None if p.default is None else constant(p.default)
    return out


def check_selector(sel: A.Selector, env: Mapping[str, Any], names: Mapping[str, ir.Value]) -> None:
    if isinstance(sel, A.SelName):
        if sel.name not in SELECTOR_NAMES:
            raise SoapRouteError(
                f"unknown selector '{sel.name}'"
                + did_you_mean(sel.name, SELECTOR_NAMES + SELECTOR_QUANTITIES)
                + f' (selectors: {", ".join(SELECTOR_NAMES)}, a "name*" pattern, or a comparison of'
                f" {', '.join(SELECTOR_QUANTITIES)})",
                sel.loc,
            )
    elif isinstance(sel, A.SelCompare):
        if sel.name not in SELECTOR_QUANTITIES:
            raise SoapRouteError(
                f"unknown shape quantity '{sel.name}'"
                + did_you_mean(sel.name, SELECTOR_QUANTITIES)
                + f" (one of {', '.join(SELECTOR_QUANTITIES)})",
                sel.loc,
            )
        value = _value(sel.value, _Scope(names, env, MacroTable())).evaluate(env)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SoapRouteError(f"'{sel.name} {sel.op}' needs a number, got {ir.const_text(value)}", sel.value.loc)
    elif isinstance(sel, A.SelPattern):
        if not sel.pattern:
            raise SoapRouteError("empty name pattern", sel.loc)
    elif isinstance(sel, A.SelNot):
        check_selector(sel.operand, env, names)
    else:
        for item in sel.items:
            check_selector(item, env, names)


def always_true(sel: A.Selector) -> bool:
    if isinstance(sel, A.SelName):
        return sel.name == "default"
    if isinstance(sel, A.SelOr):
        return any(always_true(i) for i in sel.items)
    if isinstance(sel, A.SelAnd):
        return all(always_true(i) for i in sel.items)
    return False


def check_pipeline_route(pipeline: ir.Pipeline, loc: Loc) -> ir.Pipeline:
    """Enforce: at most one `lr` in a route; append an implicit `lr` when there is none."""
    kinds = [registry.get(s.op).kind for s in pipeline.stages]  # type: ignore[union-attr]
    applies = [s for s, k in zip(pipeline.stages, kinds, strict=True) if k == "apply"]
    if len(applies) > 1:
        raise SoapRecipeError(
            f"the update is applied twice ('{applies[1].op}' again; first at {applies[0].loc})",
            applies[1].loc,
        )
    if applies:
        after = kinds.index("apply") + 1
        for stage, kind in zip(pipeline.stages[after:], kinds[after:], strict=True):
            if kind != "param":
                raise SoapRecipeError(
                    f"'{stage.op}' after '{applies[0].op}' has no effect: the update is already applied;"
                    " only stages that act on the parameter (decay) may follow it",
                    stage.loc,
                )
        return pipeline
    implicit = ir.Stage("lr", (), None, None, True, (), loc)
    return ir.Pipeline((*pipeline.stages, implicit), pipeline.loc)


def check_recipe(recipe: A.Recipe, macros: MacroTable, extra_params: Mapping[str, Any] | None = None) -> ir.Recipe:
    """Check one recipe; ``extra_params`` declares header parameters of an inline pipeline."""
    params = check_params(recipe.params, f"recipe '{recipe.name}'")
    for k, v in (extra_params or {}).items():
        params.setdefault(k, v)
    if "lr" not in params:
        raise SoapRecipeError(
            f"recipe '{recipe.name}' declares no 'lr' parameter (every route's param_group carries"
            " an lr, for LR schedulers)",
            recipe.loc,
        )
    names = {n: ir.Ref(n) for n in params}
    defaults = {n: v for n, v in params.items()}
    routes: list[ir.Route] = []
    for r in recipe.routes:
        env = dict(defaults)
        settings: list[tuple[str, ir.Value]] = []
        seen: set[str] = set()
        for s in r.settings:
            if s.name in seen:
                raise SoapRouteError(f"route setting '{s.name}' given twice", s.loc)
            seen.add(s.name)
            if s.name not in params and s.name not in ROUTE_OPTIONS:
                raise SoapNameError(
                    f"route setting '{s.name}' is no parameter of recipe '{recipe.name}'"
                    + did_you_mean(s.name, list(params) + list(ROUTE_OPTIONS)),
                    s.loc,
                )
            value = _value(s.value, _Scope(names, env, macros))
            if isinstance(value, ir.PipeVal):
                raise SoapRouteError("a route setting cannot be a pipeline", s.loc)
            if isinstance(value, ir.Sym) and not isinstance(params.get(s.name), str):
                raise SoapNameError(
                    f"unknown name '{value.name}' in route setting '{s.name}'" + did_you_mean(value.name, params),
                    value.loc,
                )
            if s.name in ROUTE_OPTIONS and not isinstance(value.evaluate(defaults), bool):
                raise SoapRouteError(f"route option '{s.name}' takes true or false", s.value.loc)
            settings.append((s.name, value))
        for name, value in settings:
            if name not in ROUTE_OPTIONS:
                unbound = any(defaults.get(r) is None for r in value.refs())
                env[name] = None if unbound else value.evaluate(defaults)
        check_selector(r.selector, env, names)
        for prev in routes:
            if prev.selector == r.selector:
                raise SoapRouteError(
                    f"route '{ir.Route(r.selector, (), ir.Pipeline(())).selector_text()}' duplicates the"
                    f" route at line {prev.loc.line}; it can never match",
                    r.loc,
                )
            if always_true(prev.selector):
                raise SoapRouteError(
                    f"route is unreachable: the route at line {prev.loc.line} matches every parameter",
                    r.loc,
                )
        pipeline = _pipeline(r.pipeline, _Scope(names, env, macros))
        pipeline = check_pipeline_route(pipeline, r.loc)
        routes.append(ir.Route(r.selector, tuple(settings), pipeline, r.loc))
    return ir.Recipe(recipe.name, tuple(params.items()), tuple(routes), recipe.doc, recipe.loc.file, recipe.loc)


def check_macro(macro: A.Macro, macros: MacroTable) -> None:
    """Check a macro's body on its own (with its defaults), so errors surface at definition."""
    params = check_params(macro.params, f"macro '{macro.name}'")
    call = A.Stage(macro.name, (), None, None, False, macro.loc)
    if any(v is None for v in params.values()):
        return  # a macro with required parameters is checked where it is used
    _expand(macro, call, _Scope({}, {}, macros))
