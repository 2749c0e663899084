"""Checked IR: macros expanded, names resolved, arguments bound to operator fields.

Frozen, tensor-free and hashable; locations are excluded from equality. Argument values are
:class:`Value` trees that may refer to recipe parameters, evaluated against a route's
hyperparameters at compile time (static arguments) or at every step (dynamic ones).
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from decimal import Decimal
from typing import Any, Union

from soapdsl.errors import Loc, SoapArgumentError
from soapdsl.registry import NONFINITE_NAMES
from soapdsl.syntax import ast as A
from soapdsl.syntax.printer import format_selector

_NOLOC = Loc("<none>", 0, 0, 0, 0)


def _loc() -> Loc:
    return field(default=_NOLOC, compare=False, repr=False)  # type: ignore[return-value]


# -- values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    value: Any  # int | float | bool | str | tuple
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return self.value

    def refs(self) -> frozenset[str]:
        return frozenset()

    def text(self) -> str:
        return _const_text(self.value)


@dataclass(frozen=True)
class Sym:
    """A bare name that is no parameter: an enum-like symbol such as ``left`` or ``norm``."""

    name: str
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return self.name

    def refs(self) -> frozenset[str]:
        return frozenset()

    def text(self) -> str:
        return self.name


@dataclass(frozen=True)
class Ref:
    """A reference to a recipe parameter (a key of the route's param_group)."""

    name: str
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return env[self.name]

    def refs(self) -> frozenset[str]:
        return frozenset((self.name,))

    def text(self) -> str:
        return self.name


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYWORDS = frozenset({"recipe", "macro", "route", "and", "or", "not", "as", "true", "false"})
_BINOPS = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


@dataclass(frozen=True)
class Neg:
    operand: Value
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        v = self.operand.evaluate(env)
        if isinstance(v, str) and v.lower() in NONFINITE_NAMES:  # `-inf`: Python's float would read it
            raise SoapArgumentError(
                f"cannot negate {v}: soapdsl has no inf or nan ('{v}' is a name here); write a finite number",
                self.loc,
            )
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise SoapArgumentError(f"cannot negate {_const_text(v)}", self.loc)
        return -v

    def refs(self) -> frozenset[str]:
        return self.operand.refs()

    def text(self) -> str:
        inner = self.operand.text()
        return f"-({inner})" if isinstance(self.operand, Bin) else f"-{inner}"


@dataclass(frozen=True)
class Bin:
    op: str
    left: Value
    right: Value
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        a, b = self.left.evaluate(env), self.right.evaluate(env)
        for v in (a, b):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise SoapArgumentError(f"arithmetic needs numbers, got {_const_text(v)} in '{self.text()}'", self.loc)
        if self.op in ("/", "//", "%") and b == 0:
            raise SoapArgumentError(f"division by zero in '{self.text()}'", self.loc)
        try:
            return _BINOPS[self.op](a, b)
        except OverflowError:
            # an int too large for a float met a float (a float result that overflows is inf
            # instead, which the argument's validation refuses, naming the argument)
            raise SoapArgumentError(f"'{self.text()}' is too large for a float", self.loc) from None

    def refs(self) -> frozenset[str]:
        return self.left.refs() | self.right.refs()

    def text(self) -> str:
        p = _PREC[self.op]

        def side(v: Value, need: int) -> str:
            t = v.text()
            return f"({t})" if isinstance(v, Bin) and _PREC[v.op] < need else t

        return f"{side(self.left, p)} {self.op} {side(self.right, p + 1)}"


@dataclass(frozen=True)
class TupleVal:
    items: tuple[Value, ...]
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return tuple(i.evaluate(env) for i in self.items)

    def refs(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for i in self.items:
            out |= i.refs()
        return out

    def text(self) -> str:
        if len(self.items) == 1:
            return f"({self.items[0].text()},)"
        return "(" + ", ".join(i.text() for i in self.items) + ")"


@dataclass(frozen=True)
class PipeVal:
    """A pipeline passed as an argument (a parallel branch)."""

    pipeline: Pipeline
    loc: Loc = _loc()

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return self.pipeline

    def refs(self) -> frozenset[str]:
        return self.pipeline.refs()

    def text(self) -> str:
        return "{ " + self.pipeline.text() + " }"


Value = Union[Const, Sym, Ref, Neg, Bin, TupleVal, PipeVal]


#: an int with more digits than this is shown in e-notation, as a float of its size is
_MAX_INT_DIGITS = 21
_LONG_INT = 10**_MAX_INT_DIGITS


def _const_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int) and abs(v) >= _LONG_INT:
        # 401 digits help no reader, and str() refuses an int past 4300 (sys.int_info):
        # 10**400 -> 1e+400, the digits a float would keep
        mantissa, _, exponent = f"{Decimal(v):.16e}".partition("e")
        return mantissa.rstrip("0").rstrip(".") + "e" + exponent
    if isinstance(v, str):
        return v if _IDENT.fullmatch(v) and v not in _KEYWORDS else _quote(v)
    if isinstance(v, tuple):
        return TupleVal(tuple(Const(i) for i in v)).text()
    if isinstance(v, Pipeline):  # a block given where a value belongs
        return "{ " + v.text() + " }"
    return str(v)


def _quote(v: str) -> str:
    """A string literal that shows non-ASCII text as it is (``"ééé"``, not ``"\\u00e9..."``);
    only characters that do not print (controls, separators, lone surrogates) are escaped."""
    text = json.dumps(v, ensure_ascii=False)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def const_text(v: Any) -> str:
    """Render a Python value as soapdsl source."""
    return _const_text(v)


# -- pipelines ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A bound primitive: ``args`` holds the arguments given, by field name, in field order."""

    op: str
    args: tuple[tuple[str, Value], ...]
    body: Pipeline | None = None
    label: str | None = None
    implicit: bool = False
    via: tuple[str, ...] = field(default=(), compare=False)  # macro expansion chain
    loc: Loc = _loc()

    def arg(self, name: str) -> Value | None:
        for k, v in self.args:
            if k == name:
                return v
        return None

    def refs(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for _, v in self.args:
            out |= v.refs()
        if self.body is not None:
            out |= self.body.refs()
        return out

    def text(self, filled: bool = False) -> str:
        """Source form; with ``filled``, every argument is shown, defaults included."""
        given = dict(self.args)
        if filled:
            parts = [
                f"{k}={given[k].text() if k in given else _const_text(d)}"
                for k, d in defaults_of(self.op).items()
                if k in given or d is not _REQUIRED
            ]
        else:
            parts = [f"{k}={v.text()}" for k, v in self.args]
        out = self.op + (f"({', '.join(parts)})" if parts else "")
        if self.body is not None:
            out += " { " + self.body.text(filled) + " }"
        if self.label:
            out += f" as {self.label}"
        return out


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    loc: Loc = _loc()

    def refs(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for s in self.stages:
            out |= s.refs()
        return out

    def text(self, filled: bool = False) -> str:
        return " |> ".join(s.text(filled) for s in self.stages)

    def walk(self, prefix: str = "") -> list[tuple[str, Stage]]:
        """Every stage with its path ("2", "1.0", ...), scope bodies included, in order."""
        out: list[tuple[str, Stage]] = []
        for i, s in enumerate(self.stages):
            path = f"{prefix}{i}"
            out.append((path, s))
            if s.body is not None:
                out.extend(s.body.walk(path + "."))
        return out


_REQUIRED = object()


def defaults_of(op: str) -> dict[str, Any]:
    """Field -> default of an op's argument model (``_REQUIRED`` where there is none)."""
    from soapdsl import registry

    cls = registry.get(op)
    if cls is None:
        return {}
    return {
        k: (_REQUIRED if f.is_required() else f.get_default(call_default_factory=True))
        for k, f in registry.public_fields(cls.Args).items()
    }


# -- recipes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    selector: A.Selector
    settings: tuple[tuple[str, Value], ...]
    pipeline: Pipeline
    loc: Loc = _loc()

    def selector_text(self) -> str:
        return format_selector(self.selector)


@dataclass(frozen=True)
class Recipe:
    name: str
    params: tuple[tuple[str, Any], ...]  # header parameter -> default (None: required)
    routes: tuple[Route, ...]
    doc: str = field(default="", compare=False)
    file: str = field(default="<inline>", compare=False)
    loc: Loc = _loc()
    #: where each header parameter is written (an inline pipeline's parameters have none)
    param_locs: tuple[tuple[str, Loc], ...] = field(default=(), compare=False, repr=False)

    def defaults(self) -> dict[str, Any]:
        return dict(self.params)

    def param_loc(self, name: str) -> Loc:
        """Where header parameter ``name`` is written, or the recipe's header."""
        return dict(self.param_locs).get(name, self.loc)

    def fingerprint(self) -> str:
        """Identity of the recipe's structure (routes and pipelines, not hyperparameter values)."""
        body = repr((self.name, tuple(n for n, _ in self.params), _spelling_free(self.routes)))
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def _spelling_free(x: Any) -> Any:
    """``x`` with every string constant written as a bare symbol, so that ``kind=sgd`` and
    ``kind="sgd"`` (the same value) give the same fingerprint."""
    if isinstance(x, Const) and isinstance(x.value, str):
        return Sym(x.value, x.loc)
    if isinstance(x, tuple):
        return tuple(_spelling_free(v) for v in x)
    if is_dataclass(x) and not isinstance(x, type):
        return replace(x, **{f.name: _spelling_free(getattr(x, f.name)) for f in fields(x) if f.init and f.repr})
    return x
