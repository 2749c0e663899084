"""Checker: AST -> checked IR.

Resolves stage names against the operator registry and the macros in scope, binds arguments
to each operator's fields (positional order = field order), validates them through the
operator's pydantic model, expands macros, turns bare scopes into block scopes, and enforces
the structural rules (one `lr` per route, no unreachable routes, ...). Every error carries the
location of the text that caused it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from soapdsl import ir, registry
from soapdsl.errors import (
    SOURCES,
    Loc,
    SoapArgumentError,
    SoapError,
    SoapNameError,
    SoapRecipeError,
    SoapRouteError,
    SoapSyntaxError,
    SoapWarning,
    decimal_comma,
    decimal_comma_hint,
    did_you_mean,
    line_col,
    span_text,
    warn,
)
from soapdsl.syntax import ast as A
from soapdsl.syntax.printer import comma_joined, format_selector

#: selector names and the shape quantities a comparison may use
SELECTOR_NAMES = ("default", "scalar", "vector", "matrix", "tensor")
SELECTOR_QUANTITIES = ("ndim", "numel", "max_dim", "min_dim", "aspect")
#: reserved route settings that configure the runtime rather than a param_group key
ROUTE_OPTIONS = ("batch", "compile", "cuda_graph", "fused", "stochastic_round")


@dataclass
class MacroTable:
    """Macros visible to a checked source: the prelude, then the source's own (shadowing)."""

    macros: dict[str, A.Macro] = field(default_factory=dict)
    #: the source's recipes, by name: none can be a stage, but an error can say what it is
    recipes: dict[str, Loc] = field(default_factory=dict)

    def with_module(self, module: A.Module) -> MacroTable:
        out = dict(self.macros)
        seen: dict[str, A.Macro] = {}
        for m in module.macros:
            if m.name in seen:
                raise SoapNameError(f"macro '{m.name}' is defined twice (first at {seen[m.name].loc})", m.loc)
            if registry.get(m.name) is not None:
                raise SoapNameError(f"macro '{m.name}' has the name of a primitive operator", m.loc)
            seen[m.name] = m
            out[m.name] = m
        recipes = {**self.recipes, **{r.name: r.loc for r in reversed(module.recipes)}}
        return MacroTable(out, recipes)


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
    #: labels of earlier stages of the pipelines around this one, where each is written
    labels: Mapping[str, Loc] = field(default_factory=dict)


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


def constant(e: A.Expr, what: str = "a parameter default") -> Any:
    """Evaluate an expression that may use no parameter (header defaults, --set values)."""
    v = _value(e, _Scope({}, {}, MacroTable()))
    if isinstance(v, ir.PipeVal):
        raise SoapArgumentError(f"a pipeline cannot be {what}", e.loc)
    return v.evaluate({})


def literal(text: str, file: str, shown: str, col: int, what: str) -> Any:
    """One value written on a command line (``--set lr=3e-4``, ``soap:freq=20``): ``text``,
    which starts at 1-based column ``col`` of ``shown``. It is parsed as the argument of a
    stage, ``x(TEXT)``; an error points into ``shown`` as the user wrote it, not into that."""
    from soapdsl.syntax.parser import first_comment, parse, unmatched_paren

    wrapped = f"x({text})"
    try:
        # `lr=1e-3 # c`: the comment runs over the wrapper's ')', and the parser asked for one
        comment = first_comment(wrapped)
        if comment is not None:
            first = comment.start_pos or 0
            last = min(first + len(comment.value), len(wrapped) - 1)  # the comment, not the ')'
            at = (comment.line or 1, comment.column or 1)
            raise SoapSyntaxError(
                f"{what}: a value cannot hold a comment ('#' starts one): leave out {wrapped[first:last].strip()!r}",
                Loc(file, *at, at[0], at[1] + last - first, wrapped),
            )
        # `lr=1) |> sign |> x(2`: a ')' of the value's own would close the wrapper's '(', and
        # the rest would parse as more stages, whose first argument would be taken silently
        close = unmatched_paren(text)
        if close is not None:
            close += 2  # in x(TEXT)
            line, col_at = line_col(wrapped, close)
            raise SoapSyntaxError(
                "unexpected ')': it closes no '(' of the value", Loc(file, line, col_at, line, col_at + 1, wrapped)
            )
        module = parse(wrapped, file)
        assert module.pipeline is not None
        args = module.pipeline.stages[0].args
        if len(args) != 1 or args[0].name is not None:
            raise SoapArgumentError(f"{what}: expected one value, got {text.strip()!r}" + decimal_comma_hint(text))
        expr = args[0].value
        # `inf`, `-nan`: names to soapdsl, which fail to negate or are no number for any stage
        value = None if _spells_nonfinite(expr) else constant(expr, f"the value of {what}")
        if value is None or not is_finite(value):
            got = text.strip() if value is None else f"{text.strip()}, which is {ir.const_text(value)}"
            raise SoapArgumentError(finite_problem(what, got), expr.loc)
        return value
    except SoapError as e:
        loc = e.loc
        if loc is not None and loc.file == file and loc.line == 1:
            shift = col - 3  # TEXT starts at column 3 of x(TEXT)
            # past the value's end: the wrapper's own ')' (the value closed it), so point at
            # the value's last character
            start = min(max(loc.col + shift, col), max(len(shown), 1))
            end = loc.end_col + shift if loc.end_line == 1 else start + 1
            e.loc = Loc(file, 1, start, 1, max(start + 1, min(end, len(shown) + 1)), shown)
            e.args = (e.format(),)
        raise


def _python_value(v: Any) -> Any:
    """A NumPy scalar or a 0-d tensor as the Python number it holds (as torch.optim takes
    them), also inside a tuple; so param_groups and checkpoints hold plain Python values."""
    if isinstance(v, tuple):
        return tuple(_python_value(x) for x in v)
    if not isinstance(v, str) and type(v) not in (bool, int, float) and getattr(v, "ndim", None) == 0:
        item = getattr(v, "item", None)
        if callable(item):
            return item()
    return v


def argument_value(recipe: str, name: str, v: Any) -> Any:
    """The value of argument ``name`` of ``recipe`` given from Python (``build(..., name=v)``,
    a config): as :func:`_python_value` reads it, and a number, boolean, string or tuple."""
    v = _python_value(v)
    if not isinstance(v, bool | int | float | str | tuple):
        raise SoapArgumentError(
            f"argument {name} of recipe '{recipe}' must be a number, boolean, name or tuple, got {type(v).__name__}"
        )
    return v


def _spells_nonfinite(e: A.Expr) -> bool:
    """Whether ``e`` spells a non-finite number as Python would read it: a name such as
    ``inf`` or ``NaN``, negated or in a tuple."""
    if isinstance(e, A.Name):
        return e.id.lower() in registry.NONFINITE_NAMES
    if isinstance(e, A.Neg):
        return _spells_nonfinite(e.operand)
    return isinstance(e, A.Tuple) and any(map(_spells_nonfinite, e.items))


# -- stages ---------------------------------------------------------------------------------


def _bind(cls: type[registry.Op], stage: A.Stage, scope: _Scope) -> tuple[tuple[str, ir.Value], ...]:
    fields = list(registry.public_fields(cls.Args))
    bound: dict[str, ir.Value] = {}
    positional = [a for a in stage.args if a.name is None]
    seen_keyword = False
    for prev, a in zip((None, *stage.args), stage.args, strict=False):
        if a.name is None and seen_keyword:
            notes = []
            if prev is not None and comma_joined(prev.value, a.value):
                notes.append(decimal_comma(f"{prev.name}={_comma_text(prev.value, a.value)}"))
            raise SoapArgumentError("positional argument follows a keyword argument", a.loc, notes=notes)
        seen_keyword |= a.name is not None
    if len(positional) > len(fields):
        extra = positional[len(fields)]
        shown = ", ".join(fields) if fields else "none"
        raise SoapArgumentError(
            f"'{cls.name}' takes at most {len(fields)} positional argument"
            f"{'s' if len(fields) != 1 else ''} ({shown}), got {len(positional)}",
            extra.loc,
        )
    _warn_decimal_commas(cls, stage, fields)
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


def _comma_text(a: A.Expr, b: A.Expr) -> str:
    return f"{span_text(a.loc)}.{span_text(b.loc)}"


def _takes_float(annotation: Any) -> bool:
    """Whether a field holds a real number but no integer (``beta``, ``eps``; not ``freq``)."""
    return _number_types(annotation) == {float}


def _item_annotations(annotation: Any, n: int) -> list[Any]:
    """The annotation of each of ``n`` items of a tuple field (``tuple[float, float, float]``)."""
    if get_origin(annotation) is Annotated:
        return _item_annotations(get_args(annotation)[0], n)
    if get_origin(annotation) is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return [items[0]] * n
        return list(items[:n]) + [None] * (n - len(items))
    return [None] * n


def _warn_decimal_commas(cls: type[registry.Op], stage: A.Stage, fields: list[str]) -> None:
    """Warn of ``0,999`` where a real number is taken: valid (two arguments, or two tuple
    items), but most likely a decimal comma. Two arguments written with a space (``0, 999``)
    or any other spelling do not warn."""
    positional = [a for a in stage.args if a.name is None]
    slots = [(f, a.value) for f, a in zip(fields, positional, strict=False)]
    pairs = []
    for (name, a), (next_name, b) in itertools.pairwise(slots):
        if _takes_float(_annotation(cls, name)) and comma_joined(a, b):
            pairs.append((a, b, f"{name}={span_text(a.loc)} and {next_name}={span_text(b.loc)}"))
    for name, value in slots + [(a.name, a.value) for a in stage.args if a.name is not None]:
        if isinstance(value, A.Tuple):
            items = value.items
            kinds = _item_annotations(_annotation(cls, name), len(items))
            for i, (a, b) in enumerate(itertools.pairwise(items)):
                if _takes_float(kinds[i]) and comma_joined(a, b):
                    pairs.append((a, b, f"items {i} and {i + 1} of {name}"))
    for a, b, reading in pairs:
        loc = Loc(a.loc.file, a.loc.line, a.loc.col, b.loc.end_line, b.loc.end_col, a.loc.text)
        warn(
            SoapWarning(
                f"'{span_text(a.loc)},{span_text(b.loc)}' in '{cls.name}' reads as two numbers, {reading};"
                f" {decimal_comma(_comma_text(a, b))}",
                loc,
                notes=[f"to mean two numbers, write them with a space: '{span_text(a.loc)}, {span_text(b.loc)}'"],
            )
        )


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
        try:
            return cls.Args(**concrete)
        except ValidationError:
            # pydantic reads an integral float (5.0) for an int field only below 2**63; past
            # that, as the integer it spells (1e20, as 100000000000000000000 is read)
            return cls.Args(**{k: _integral_floats_as_ints(v) for k, v in concrete.items()})
    except ValidationError as e:
        err = _relevant_error(e.errors(), concrete)
        fname = str(err["loc"][0]) if err["loc"] else ""
        where = locs.get(fname, loc)
        raw = dict(args).get(fname)
        given = concrete.get(fname)
        notes = []
        if raw is not None and raw.refs():
            notes.append(", ".join(f"{r} = {ir.const_text(env[r])}" for r in sorted(raw.refs()) if r in env))
        # an error inside a tuple points at its item
        item = err["loc"][1] if len(err["loc"]) > 1 else (err.get("ctx") or {}).get("item")
        at_item = ""
        if isinstance(item, int) and not isinstance(item, bool):
            at_item = f"item {item}"
            if isinstance(raw, ir.TupleVal) and 0 <= item < len(raw.items):
                where = raw.items[item].loc
        if err["type"] == "missing" and at_item:
            raise SoapArgumentError(
                f"invalid {fname}={ir.const_text(given)} for '{cls.name}': {at_item} is missing", where
            ) from None
        if err["type"] == "missing":
            raise SoapArgumentError(
                f"'{cls.name}' needs argument '{fname}': write {cls.name}({fname}=...)",
                loc,
                notes=[f"{fname} takes {takes_text(cls, fname)}"],
            ) from None
        annotation = _annotation(cls, fname)
        choices = _literal_choices(annotation)
        nonfinite_name = isinstance(given, str) and given.lower() in registry.NONFINITE_NAMES
        # a validator's own error (value_error) names a valid word in a bad combination
        if (
            err["type"] != "value_error"
            and isinstance(given, str)
            and choices
            and not (nonfinite_name and _admits_number(annotation))
        ):
            raise SoapArgumentError(
                f"invalid {fname}={ir.const_text(given)} for '{cls.name}': expected one of "
                + ", ".join(map(str, choices))
                + (", or a number" if _admits_number(annotation) else "")
                + did_you_mean(given, [str(c) for c in choices]),
                where,
                notes=notes,
            ) from None
        # a symbol where a number is expected is most often a misspelt parameter; `nan` and
        # `inf` are not (Python would read them as numbers, soapdsl has no such number)
        if isinstance(raw, ir.Sym) and err["type"] != "value_error" and not nonfinite_name:
            candidates = list(names or env)
            raise SoapNameError(
                f"unknown name '{raw.name}' for argument '{fname}' of '{cls.name}'"
                + did_you_mean(raw.name, candidates),
                where,
            ) from None
        msg = _pydantic_message(err)
        if err["type"] == "finite_number" and isinstance(raw, ir.Bin | ir.Neg) and not raw.refs():
            msg += f" ('{raw.text()}' overflows)"
        if at_item:
            msg = f"{at_item}: {msg}"
        raise SoapArgumentError(
            f"invalid {fname}={ir.const_text(given)} for '{cls.name}': {msg}", where, notes=notes
        ) from None


def _relevant_error(errors: list[Any], concrete: Mapping[str, Any]) -> Any:
    """The error to report: the first field's, and of a union's several errors for it the
    one that fits the value (a word: not one of the choices; a number, or `nan` or `inf`
    that were meant as one: why it is no valid number)."""
    first = errors[0]
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1]]
    if len(same) > 1 and first["loc"]:
        value = concrete.get(str(first["loc"][0]))
        word = isinstance(value, str) and value.lower() not in registry.NONFINITE_NAMES
        for e in same:
            if (e["type"] == "literal_error") == word:
                return e
    return first


def _annotation(cls: type[registry.Op], field_name: str) -> Any:
    f = registry.public_fields(cls.Args).get(field_name)
    return None if f is None else f.annotation


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The words a field takes: its Literal's, also as a member of a union."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, UnionType):
        return tuple(c for a in get_args(annotation) for c in _literal_choices(a))
    return ()


def _admits_number(annotation: Any) -> bool:
    return bool(_number_types(annotation))


def _number_types(annotation: Any) -> set[type]:
    """The number types (int, float) a field's annotation admits, also through Annotated and unions."""
    if annotation in (int, float):
        return {annotation}
    if get_origin(annotation) is Annotated:
        return _number_types(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return {t for a in get_args(annotation) for t in _number_types(a)}
    return set()


def type_text(t: Any) -> str:
    """An argument type as docs/operators.md shows it: ``number``, ``left | right``, ``(int, ...)``."""
    origin = get_origin(t)
    if origin is Literal:
        return " | ".join(ir.const_text(a) for a in get_args(t))
    if origin is tuple:
        args = get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"({type_text(args[0])}, ...)"
        return "(" + ", ".join(type_text(a) for a in args) + ")"
    args = get_args(t)
    if args and hasattr(t, "__metadata__"):  # Annotated[X, ...]
        return type_text(args[0])
    if origin in (Union, UnionType):
        return " | ".join(type_text(a) for a in args)
    if t is type(None):
        return "none"
    if isinstance(t, type):
        return _TYPE_NAMES.get(t.__name__, t.__name__)
    return str(t).replace("typing.", "")


_TYPE_NAMES = {"float": "number", "int": "int", "bool": "bool", "str": "string", "Pipeline": "pipeline"}


def constraint_text(f: FieldInfo) -> str:
    """A field's range: ``>= 0.0, < 1.0`` (empty when it has none)."""
    parts = []
    for m in f.metadata:
        if isinstance(m, at.Gt):
            parts.append(f"> {m.gt}")
        elif isinstance(m, at.Ge):
            parts.append(f">= {m.ge}")
        elif isinstance(m, at.Lt):
            parts.append(f"< {m.lt}")
        elif isinstance(m, at.Le):
            parts.append(f"<= {m.le}")
    return ", ".join(parts)


_ARTICLE = {"number": "a number", "int": "an int", "string": "a string", "pipeline": "a pipeline"}


def takes_text(cls: type[registry.Op], field_name: str) -> str:
    """What an argument of an op takes, in words: ``a number >= 0.0, < 1.0``, ``one of left,
    right``, ``true or false``; for the notes of an error that asks for the argument."""
    f = registry.public_fields(cls.Args).get(field_name) or cls.Args.model_fields.get(field_name)
    if f is None:
        return "a value"
    if f.annotation is bool:
        return "true or false"
    union = get_origin(f.annotation) in (Union, UnionType)
    members = get_args(f.annotation) if union else (f.annotation,)
    words = [ir.const_text(c) for m in members for c in _literal_choices(m)]
    others = [type_text(m) for m in members if not _literal_choices(m)]
    others = [_ARTICLE.get(t, t) for t in others]
    if len(words) == 1 and others:
        text = " or ".join([*others, *words])
    elif words:
        text = "one of " + ", ".join(words) + "".join(f", or {t}" for t in others)
    else:
        text = " or ".join(others)
    constraint = constraint_text(f)
    return f"{text} {constraint}" if constraint else text


def _integral_floats_as_ints(v: Any) -> Any:
    """``v`` with each float that is a whole number past int64 (in tuples too) as that integer."""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 2**63:
        return int(v)
    if isinstance(v, tuple):
        return tuple(map(_integral_floats_as_ints, v))
    return v


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
    # label -> where it is written, and the macro use that gave it, for this pipeline's stages
    labels: dict[str, tuple[Loc, str]] = {}
    stages = list(p.stages)
    i = 0
    while i < len(stages):
        s = stages[i]
        before = len(out)
        problem = None if s.label is None else boolean_name_problem(s.label, "a label")
        if problem:  # `from=true` reads the boolean, not the stage
            raise SoapNameError(problem, _label_loc(s))
        cls = registry.get(s.name)
        visible = {**scope.labels, **{k: where for k, (where, _) in labels.items()}}
        if cls is not None:
            args = _bind(cls, s, scope)
            _check_label_names(cls, s, scope, visible)
            validate_args(cls, args, scope.env, s.loc, scope.names)
            body = None
            if cls.kind == "scope":
                if s.block is not None:
                    inside = _Scope(scope.names, scope.env, scope.macros, scope.stack, "block", visible)
                    body = _pipeline(s.block, inside)
                else:  # bare form: the scope runs to the end of the pipeline
                    rest = stages[i + 1 :]
                    if not rest:
                        raise SoapRecipeError(f"scope '{s.name}' has nothing inside it", s.loc)
                    body = _pipeline(
                        A.Pipeline(tuple(rest), rest[0].loc),
                        _Scope(scope.names, scope.env, scope.macros, scope.stack, "bare", visible),
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
            out.extend(_expand(scope.macros.macros[s.name], s, scope, labels=visible))
        else:
            candidates = list(registry.all_ops()) + list(scope.macros.macros)
            raise SoapNameError(
                f"unknown operator '{s.name}'" + did_you_mean(s.name, candidates),
                s.loc,
                notes=_recipe_hint(s.name, scope.macros.recipes),
            )
        for j, stage in enumerate(out[before:], before):
            if stage.label is None:
                continue
            # the stage's own `as NAME`, or one inside the macro it expands to
            own = j == len(out) - 1 and stage.label == s.label
            where = _label_loc(s) if own else stage.loc
            use = "" if own else f"in macro '{s.name}' used at {s.loc}"
            if stage.label in labels:
                first, first_use = labels[stage.label]
                notes = [use] if use else []
                if use and first_use and first == where:  # the same macro's label, from two uses
                    notes.append(_relabel_hint(s.name, stage.label, last=j == len(out) - 1))
                raise SoapRecipeError(
                    f"label '{stage.label}' is given twice in this pipeline"
                    f" (first at {first}{', ' + first_use if first_use else ''})",
                    where,
                    notes=notes,
                )
            labels[stage.label] = (where, use)
        i += 1
    return ir.Pipeline(tuple(out), p.loc)


def _relabel_hint(macro: str, label: str, last: bool) -> str:
    """How to use twice, in one pipeline, a macro that labels one of its stages."""
    fix = (
        f"give one use a label of its own (`{macro} as {label}2`), which replaces it"
        if last
        else "use it once per pipeline (a scope's block is a pipeline of its own)"
    )
    return f"each use of macro '{macro}' labels a stage '{label}', and a label names one stage: {fix}"


def _check_label_names(cls: type[registry.Op], s: A.Stage, scope: _Scope, labels: Mapping[str, Loc]) -> None:
    """Refuse an argument that names a stage's label (graft's ``from=m``) with a name that is
    also a parameter in scope: the name is read as the parameter, so the label cannot be
    reached, and the parameter's value (a number, mostly) was refused as no label."""
    fields = list(registry.public_fields(cls.Args))
    positional = iter(fields)
    for a in s.args:
        fname = a.name if a.name is not None else next(positional, None)
        e = a.value
        if fname is None or not isinstance(e, A.Name) or e.id not in scope.names or e.id not in labels:
            continue
        if not _takes_text(_annotation(cls, fname)):
            continue
        bound = scope.names[e.id]
        known = not isinstance(bound, ir.PipeVal) and all(scope.env.get(r) is not None for r in bound.refs())
        value = f" (= {ir.const_text(bound.evaluate(scope.env))})" if known else ""
        raise SoapNameError(
            f"{fname}={e.id} reads the parameter '{e.id}'{value}, not the stage labelled '{e.id}'"
            f" at {labels[e.id]}: a name in an argument is a parameter first; rename the label"
            " (or the parameter)",
            e.loc,
        )


def _takes_text(annotation: Any) -> bool:
    """Whether a field takes free text (a label), not only a choice among words."""
    if annotation is str:
        return True
    if get_origin(annotation) in (Union, UnionType, Annotated):
        return any(_takes_text(a) for a in get_args(annotation))
    return False


def _label_loc(s: A.Stage) -> Loc:
    """Where the ``as NAME`` of stage ``s`` is written (the AST keeps no span for it): after
    its arguments and block, before the next ``|>``; the stage's name if it cannot be found."""
    text = s.loc.text or SOURCES.get(s.loc.file)
    if text is None or s.label is None:
        return s.loc
    end = max(
        [s.loc, *(a.loc for a in s.args), *([s.block.loc] if s.block else [])], key=lambda x: (x.end_line, x.end_col)
    )
    starts = [0, *(m.end() for m in re.finditer("\n", text))]
    if not 1 <= end.end_line <= len(starts):
        return s.loc
    offset = starts[end.end_line - 1] + end.end_col - 1
    m = re.compile(r"\bas\s+(" + re.escape(s.label) + r")\b").search(text, offset)
    if m is None or "|>" in text[offset : m.start()]:
        return s.loc
    line = bisect.bisect_right(starts, m.start(1))
    col = m.start(1) - starts[line - 1] + 1
    return Loc(s.loc.file, line, col, line, col + len(s.label), s.loc.text)


#: How deeply macros may call macros. Each level costs about 6 Python frames in the checker,
#: which also recurses over expressions (parser.MAX_DEPTH): 100 stays far inside Python's
#: default recursion limit and far above any real recipe library.
MAX_MACRO_DEPTH = 100
#: How many stages one macro use may expand into, scope bodies included. Macros that each use
#: the one before twice double at every level: without a bound 40 short lines took minutes to
#: check. Real pipelines have tens of stages.
MAX_MACRO_STAGES = 1000
#: the macro uses an error lists, innermost first
_MAX_MACRO_NOTES = 8


def _recipe_hint(name: str, own: Mapping[str, Loc]) -> list[str]:
    """A note for a stage named after a recipe of its source ``own`` (`recipe a(lr=1) = a`) or a
    shipped recipe (`route matrix: muon`)."""
    from soapdsl import library  # library imports this module

    if name in own:
        return [
            f"'{name}' is a recipe of this source ({own[name]}); a stage is an operator or a macro, and no"
            " recipe can be called, by another or by itself: to share a pipeline, write it as a macro"
            " (macro NAME(...) = ...)"
        ]

    try:
        shipped = name in library.library().recipes
    except SoapError:  # the library itself failed to load: no hint
        return []
    if not shipped:
        return []
    return [
        f"'{name}' is a shipped recipe; a stage is an operator or a macro (such as the prelude's"
        " adam and adamw). To give some parameters another recipe, override a route in a config"
        " (docs/api.md#config-files-yaml), or copy the recipe's pipeline into this route"
    ]


def _expand(
    macro: A.Macro, call: A.Stage, scope: _Scope, used: bool = True, labels: Mapping[str, Loc] | None = None
) -> list[ir.Stage]:
    """The stages a macro call stands for; ``used`` is False when a macro is checked on its
    own, where it is defined (errors then get no "used at" note: there is no use). ``labels``
    are those its stages see, before the call."""
    if macro.name in scope.stack:
        chain = " -> ".join((*scope.stack[scope.stack.index(macro.name) :], macro.name))
        raise SoapRecipeError(f"macro '{macro.name}' expands into itself ({chain})", call.loc)
    if len(scope.stack) >= MAX_MACRO_DEPTH:  # each level recurses here: stay inside Python's limit
        raise SoapRecipeError(
            f"macro '{macro.name}' is used {len(scope.stack)} macros deep (via '{scope.stack[0]}');"
            f" macros may nest at most {MAX_MACRO_DEPTH} deep",
            call.loc,
        )
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
                use = _reader(macro.body, p.name)
                raise SoapArgumentError(
                    f"macro '{macro.name}' needs argument '{p.name}': write {macro.name}({p.name}=...)",
                    call.loc,
                    notes=[] if use is None else [reads_note(p.name, *use)],
                )
            bound[p.name] = ir.Const(constant(p.default), p.loc)
    # substituted values refer to the recipe's parameters, so validation keeps the recipe's env
    inner = _Scope(bound, scope.env, scope.macros, (*scope.stack, macro.name), scope.in_scope_body, labels or {})
    try:
        body = _pipeline(macro.body, inner)
    except SoapError as e:
        note = None
        if used:
            note = f"in macro '{macro.name}' used at {call.loc}"
        elif e.loc is not None and not _within(e.loc, macro.loc):
            # an error in another macro it calls: say which definition's check found it
            note = f"in macro '{macro.name}' defined at {macro.loc}"
        if note is not None and len(e.notes) < _MAX_MACRO_NOTES:
            e.notes = (*e.notes, note)
        elif note is not None and len(e.notes) == _MAX_MACRO_NOTES:
            e.notes = (*e.notes, "... (the macros that use these are not listed)")
        e.args = (e.format(),)
        raise
    stages = list(body.stages)
    size = len(ir.Pipeline(tuple(stages)).walk())
    if size > MAX_MACRO_STAGES:
        raise SoapRecipeError(
            f"macro '{macro.name}' expands into {size} stages; a macro use may expand into at most"
            f" {MAX_MACRO_STAGES} (do its macros each use the one before more than once?)",
            call.loc,
        )
    if call.label is not None and stages:
        last = stages[-1]
        stages[-1] = ir.Stage(last.op, last.args, last.body, call.label, last.implicit, last.via, last.loc)
    return stages


# -- recipes --------------------------------------------------------------------------------


#: param_group keys a recipe parameter may not take: the optimizer's own ("params", and the
#: route and recipe it records per group) and the one torch's LR schedulers write ("initial_lr")
RESERVED_PARAMS = ("params", "route", "recipe", "initial_lr")


#: the words that are the booleans wherever a value is written (`scale(true)`), so a parameter
#: or a label of that name could never be read: docs/language.md, section 15
BOOLEANS = ("true", "false")


def boolean_name_problem(name: str, what: str = "a parameter") -> str | None:
    """Why ``name`` may not name a parameter (of a recipe or a macro) or a label, or None."""
    if name in BOOLEANS:
        return (
            f"'{name}' cannot be the name of {what}: `{name}` is always the boolean where a value is"
            " written, so no argument could read it; choose another name"
        )
    return None


def reserved_param_problem(name: str) -> str | None:
    """Why a recipe parameter may not be called ``name``, or None."""
    problem = boolean_name_problem(name)
    if problem is not None:
        return problem
    if name in RESERVED_PARAMS:
        return (
            f"parameter name '{name}' is reserved: param_groups hold the optimizer's own '{name}' under it"
            f" (reserved: {', '.join(RESERVED_PARAMS)})"
        )
    return None


def _names_in(e: A.Expr) -> list[A.Name]:
    """The bare names of a constant expression, in order."""
    if isinstance(e, A.Name):
        return [e]
    if isinstance(e, A.Neg):
        return _names_in(e.operand)
    if isinstance(e, A.BinOp):
        return _names_in(e.left) + _names_in(e.right)
    if isinstance(e, A.Tuple):
        return [n for item in e.items for n in _names_in(item)]
    return []


def check_params(params: tuple[A.Param, ...], what: str, recipe: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    declared = {p.name for p in params}
    for p in params:
        # `adam_lr=lr * 10` read `lr` as a symbol, and failed as "arithmetic needs numbers" (or,
        # alone, as the value `lr` wherever the parameter was used)
        for n in _names_in(p.default) if p.default is not None else ():
            if n.id in declared:
                raise SoapNameError(
                    f"the default of '{p.name}' refers to parameter '{n.id}': a default is a constant,"
                    " computed before any parameter has a value; write the number (or compute the"
                    " value where it is used, as an argument or a route setting)",
                    n.loc,
                )
        problem = reserved_param_problem(p.name) if recipe else boolean_name_problem(p.name)
        if problem:
            raise SoapNameError(problem, p.loc)
        if p.name in out:
            raise SoapNameError(f"parameter '{p.name}' of {what} is declared twice", p.loc)
        value = None if p.default is None else constant(p.default)
        if p.default is not None and not is_finite(value):
            raise SoapArgumentError(
                f"invalid {p.name}={ir.const_text(value)} for {what}: must be finite", p.default.loc
            )
        out[p.name] = value
    return out


def is_finite(value: Any) -> bool:
    """False for a float that is inf or nan (a literal too large, an overflow), also in a tuple."""
    if isinstance(value, tuple):
        return all(is_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def finite_problem(what: str, value: str) -> str:
    """The message for a value given from outside the recipe (``--set``, a config) that is inf
    or nan: every stage refuses it, but where it reads it, far from where it was given."""
    return (
        f"{what} must be a finite number, got {value}: soapdsl has no inf or nan;"
        " give a finite value, or leave it out for the recipe's default"
    )


def lr_problem(lr: Any) -> str | None:
    """Why ``lr`` cannot be a route's learning rate, or None (also for an unknown lr: None)."""
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        return "the learning rate must be a finite number >= 0"
    try:
        value = float(lr)
    except OverflowError:  # an int past float's range
        value = math.inf
    if not math.isfinite(value) or value < 0:
        return "the learning rate must be a finite number >= 0"
    if value > _FLOAT32_MAX:  # it multiplies float32 tensors, where it would overflow
        return f"the learning rate must be at most {_FLOAT32_MAX:.4g}, the largest float32"
    return None


_FLOAT32_MAX = registry.FLOAT32_MAX


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
        # a bare name anywhere in the bound (`numel > big * 2` too) that is no recipe parameter
        for unknown in (n for n in _names_in(sel.value) if n.id not in names):
            raise SoapNameError(
                f"unknown name '{unknown.id}' in '{sel.name} {sel.op}': a comparison takes a number or a"
                " recipe parameter" + did_you_mean(unknown.id, list(names)),
                unknown.loc,
            )
        bound = _value(sel.value, _Scope(names, env, MacroTable()))
        if any(env.get(r, 0) is None for r in bound.refs()):
            return  # reads a required recipe parameter: checked when the recipe is bound
        value = bound.evaluate(env)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SoapRouteError(f"'{sel.name} {sel.op}' needs a number, got {ir.const_text(value)}", sel.value.loc)
        if not is_finite(value):
            raise SoapRouteError(
                f"'{sel.name} {sel.op}' needs a finite number, got {ir.const_text(value)}", sel.value.loc
            )
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
    params = check_params(recipe.params, f"recipe '{recipe.name}'", recipe=True)
    for k, v in (extra_params or {}).items():
        problem = reserved_param_problem(k)
        if problem:
            raise SoapNameError(problem, recipe.loc)
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
        on = {name: value for name, value in settings if name in ROUTE_OPTIONS and value.evaluate(defaults) is True}
        if "compile" in on and "cuda_graph" in on:
            raise SoapRouteError(
                "a route takes compile=true or cuda_graph=true, not both: a compiled pipeline runs"
                " under torch.compile, which captures CUDA graphs of its own (mode='reduce-overhead')",
                on["cuda_graph"].loc,
            )
        route_text = format_selector(r.selector)
        for name, value in settings:
            if name not in ROUTE_OPTIONS:
                unbound = any(defaults.get(r) is None for r in value.refs())
                env[name] = None if unbound else value.evaluate(defaults)
                if not is_finite(env[name]):
                    raise SoapArgumentError(
                        f"invalid {name}={ir.const_text(env[name])} in route '{route_text}': must be finite",
                        value.loc,
                    )
        _check_lr(recipe, route_text, env, dict(settings).get("lr"), defaults)
        check_selector(r.selector, env, names)
        for prev in routes:
            if prev.selector == r.selector:
                raise SoapRouteError(
                    f"route '{ir.Route(r.selector, (), ir.Pipeline(())).selector_text()}' duplicates the"
                    f" route at {prev.loc}; it can never match",
                    r.loc,
                )
            if always_true(prev.selector):
                raise SoapRouteError(
                    f"route is unreachable: the route at {prev.loc} matches every parameter",
                    r.loc,
                )
        pipeline = _pipeline(r.pipeline, _Scope(names, env, macros))
        check_labels(pipeline, env)
        pipeline = check_pipeline_route(pipeline, r.loc)
        routes.append(ir.Route(r.selector, tuple(settings), pipeline, r.loc))
    locs = tuple((p.name, p.loc) for p in recipe.params)
    return ir.Recipe(recipe.name, tuple(params.items()), tuple(routes), recipe.doc, recipe.loc.file, recipe.loc, locs)


def _check_lr(
    recipe: A.Recipe, route: str, env: Mapping[str, Any], setting: ir.Value | None, defaults: Mapping[str, Any]
) -> None:
    """Refuse a route's learning rate from the source (its ``[lr=...]`` setting, else the
    header's default) that every build would refuse; an lr the user gives is checked then."""
    problem = lr_problem(env.get("lr"))
    if problem is None:
        return
    text = ir.const_text(env["lr"])
    if setting is not None:
        notes = [", ".join(f"{r} = {ir.const_text(defaults[r])}" for r in sorted(setting.refs()))]
        raise SoapArgumentError(
            f"invalid lr={text} in route '{route}': {problem}", setting.loc, notes=notes if setting.refs() else ()
        )
    header = next((p for p in recipe.params if p.name == "lr" and p.default is not None), None)
    if header is not None:  # not an inline pipeline's lr, which is the user's argument
        assert header.default is not None
        raise SoapArgumentError(f"invalid lr={text} for recipe '{recipe.name}': {problem}", header.default.loc)


def check_labels(pipeline: ir.Pipeline, env: Mapping[str, Any], outer: frozenset[str] = frozenset()) -> None:
    """Every stage that reads an earlier point of its pipeline (graft) finds it: the stage
    before it, or an earlier stage with the label it names, of its own pipeline or of the
    pipelines around a scope's body (``outer``: the labels before the scope). The compiler
    links them the same way; checking here makes `soapdsl check` refuse what it would."""
    labels = {s.label: i for i, s in enumerate(pipeline.stages) if s.label is not None}
    for i, stage in enumerate(pipeline.stages):
        cls = registry.get(stage.op)
        if cls is not None and hasattr(cls, "source"):
            model = validate_args(cls, stage.args, env, stage.loc)
            source = None if model is None else cls(model).source()  # type: ignore[attr-defined]
            if source is not None and source[0] == "input" and i == 0:
                raise SoapRecipeError(
                    f"'{stage.op}' reads the input of the stage before it, and there is none here", stage.loc
                )
            if source is not None and source[0] == "output":
                label = str(source[1])
                j = labels.get(label)
                if not (j is not None and j < i) and not (j is None and label in outer):
                    where = next(
                        (
                            v.loc
                            for _, v in stage.args
                            if not isinstance(v, ir.PipeVal) and not v.refs() and v.evaluate(env) == label
                        ),
                        stage.loc,
                    )
                    msg = (
                        f"'{stage.op}' reads the stage labelled '{label}', which is not an earlier stage of"
                        " this pipeline or of one around it"
                    )
                    if j is not None:
                        later = pipeline.stages[j]
                        msg += f": '{label}' labels a stage after it ('{later.op}' at {later.loc})"
                    else:
                        known = [k for k, v in labels.items() if v < i] + [k for k in outer if k not in labels]
                        msg += did_you_mean(label, known)
                    raise SoapRecipeError(msg, where)
        if stage.body is not None:
            check_labels(stage.body, env, outer | {k for k, v in labels.items() if v < i})
        for _, v in stage.args:
            if isinstance(v, ir.PipeVal):  # a branch reads its own stages only
                check_labels(v.pipeline, env)


def check_macro(macro: A.Macro, macros: MacroTable) -> None:
    """Check a macro's body on its own (with its defaults), so errors surface at definition.

    A required parameter has no value here: it stands for itself, a parameter whose value is
    unknown (as a required recipe parameter does), so the names, arities, blocks, recursion and
    `lr` placement of the body are checked, and the arguments that read it are left to its uses.
    """
    params = check_params(macro.params, f"macro '{macro.name}'")
    required = [name for name, v in params.items() if v is None]
    args = tuple(A.Arg(name, A.Name(name, macro.loc), macro.loc) for name in required)
    call = A.Stage(macro.name, args, None, None, False, macro.loc)
    scope = _Scope({name: ir.Ref(name) for name in required}, dict.fromkeys(required), macros)
    _expand(macro, call, scope, used=False)


def _reader(body: A.Pipeline, name: str) -> tuple[type[registry.Op], str] | None:
    """The first primitive in a macro's body (blocks included) whose argument is the
    parameter ``name`` as it stands, with the field it binds to."""
    for stage in body.stages:
        cls = registry.get(stage.name)
        if cls is not None:
            fields = list(registry.public_fields(cls.Args))
            for i, a in enumerate(stage.args):
                field_name = a.name if a.name is not None else fields[i] if i < len(fields) else None
                if isinstance(a.value, A.Name) and a.value.id == name and field_name in fields:
                    return cls, field_name
        inner = [stage.block] + [a.value.pipeline for a in stage.args if isinstance(a.value, A.Block)]
        for p in inner:
            found = None if p is None else _reader(p, name)
            if found is not None:
                return found
    return None


def reads_note(name: str, cls: type[registry.Op], field_name: str) -> str:
    """``beta is argument 'beta' of 'momentum', which takes a number >= 0.0, < 1.0``."""
    return f"{name} is argument '{field_name}' of '{cls.name}', which takes {takes_text(cls, field_name)}"


def recipe_reader_note(recipe: ir.Recipe, name: str) -> str | None:
    """What reads the header parameter ``name`` of a checked recipe, for the note of an
    error that asks for it: the first stage argument that is the parameter as it stands, or
    the learning rate."""

    def stages(p: ir.Pipeline) -> list[ir.Stage]:
        out = []
        for _, s in p.walk():
            out.append(s)
            out += [t for _, v in s.args if isinstance(v, ir.PipeVal) for t in stages(v.pipeline)]
        return out

    for route in recipe.routes:
        for stage in stages(route.pipeline):
            cls = registry.get(stage.op)
            for field_name, v in stage.args:
                if cls is not None and isinstance(v, ir.Ref) and v.name == name:
                    return reads_note(name, cls, field_name)
    for route in recipe.routes:
        if any(k == "lr" and isinstance(v, ir.Ref) and v.name == name for k, v in route.settings):
            return f"{name} is the learning rate of route '{route.selector_text()}', a number >= 0"
    return "lr is the learning rate, a number >= 0" if name == "lr" else None


def _within(loc: Loc, span: Loc) -> bool:
    return loc.file == span.file and (span.line, span.col) <= (loc.line, loc.col) <= (span.end_line, span.end_col)
