"""AST of the soapdsl language: plain frozen dataclasses, tensor-free and hashable.

Locations are carried on every node but excluded from equality and hashing, so a module
printed by :mod:`soapdsl.syntax.printer` and parsed again compares equal to the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from soapdsl.errors import Loc

_NOLOC = Loc("<none>", 0, 0, 0, 0)


def _loc() -> Loc:
    return field(default=_NOLOC, compare=False, repr=False)  # type: ignore[return-value]


# -- expressions (argument values) ---------------------------------------------------------


@dataclass(frozen=True)
class Num:
    """A number; ``text`` is its spelling in the source (``3e-4``, not ``0.0003``), which
    `soapdsl fmt` keeps, and empty in a tree built by hand."""

    value: int | float
    loc: Loc = _loc()
    text: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Str:
    value: str
    loc: Loc = _loc()


@dataclass(frozen=True)
class Bool:
    value: bool
    loc: Loc = _loc()


@dataclass(frozen=True)
class Name:
    """A bare name: a recipe or macro parameter, or a symbol such as ``left`` or ``norm``."""

    id: str
    loc: Loc = _loc()


@dataclass(frozen=True)
class Tuple:
    items: tuple[Expr, ...]
    loc: Loc = _loc()


@dataclass(frozen=True)
class Neg:
    operand: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / // %
    left: Expr
    right: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class Block:
    """A pipeline used as a value (``graft(norm, from={ ... })``) or as a scope body."""

    pipeline: Pipeline
    loc: Loc = _loc()


Expr = Union[Num, Str, Bool, Name, Tuple, Neg, BinOp, Block]


# -- pipelines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One call argument; ``name`` is None for a positional argument."""

    name: str | None
    value: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class Stage:
    """``name(args) { block } as label``; all parts but the name are optional."""

    name: str
    args: tuple[Arg, ...] = ()
    block: Pipeline | None = None
    label: str | None = None
    has_parens: bool = field(default=False, compare=False)
    loc: Loc = _loc()


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    loc: Loc = _loc()


# -- selectors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SelPattern:
    """A glob on the parameter's qualified name: ``"embed*"``."""

    pattern: str
    loc: Loc = _loc()


@dataclass(frozen=True)
class SelName:
    """A named predicate: ``default``, ``vector``, ``matrix``, ``scalar``, ``tensor``."""

    name: str
    loc: Loc = _loc()


@dataclass(frozen=True)
class SelCompare:
    """A shape comparison: ``ndim >= 3``, ``max_dim < 10000``, ``aspect > 8``."""

    name: str
    op: str
    value: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class SelNot:
    operand: Selector
    loc: Loc = _loc()


@dataclass(frozen=True)
class SelAnd:
    items: tuple[Selector, ...]
    loc: Loc = _loc()


@dataclass(frozen=True)
class SelOr:
    items: tuple[Selector, ...]
    loc: Loc = _loc()


Selector = Union[SelPattern, SelName, SelCompare, SelNot, SelAnd, SelOr]


# -- definitions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A header parameter of a recipe or macro; ``default`` None means required."""

    name: str
    default: Expr | None = None
    loc: Loc = _loc()


@dataclass(frozen=True)
class Setting:
    """A route setting ``[lr=adam_lr]``: the value of a param_group key for that route."""

    name: str
    value: Expr
    loc: Loc = _loc()


@dataclass(frozen=True)
class Route:
    selector: Selector
    settings: tuple[Setting, ...]
    pipeline: Pipeline
    loc: Loc = _loc()


@dataclass(frozen=True)
class Recipe:
    name: str
    params: tuple[Param, ...]
    routes: tuple[Route, ...]
    doc: str = field(default="", compare=False)
    short: bool = field(default=False, compare=False)
    loc: Loc = _loc()


@dataclass(frozen=True)
class Macro:
    name: str
    params: tuple[Param, ...]
    body: Pipeline
    doc: str = field(default="", compare=False)
    loc: Loc = _loc()


Definition = Union[Recipe, Macro]


# -- comments -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Comment:
    """A ``#`` comment, kept so that `soapdsl fmt` can print it back next to its code.

    Positions are 1-based ``(line, col)`` pairs. ``prev`` and ``next`` are the starts of the
    nearest tokens before and after the comment, a ``|>`` after it not counted (None at
    either end of the text): they tell the printer which printed line it belongs to. ``blank_before`` and
    ``blank_after`` say whether an empty line separates it from the token or comment before
    and after it, which decides what a documentation comment is.
    """

    text: str
    line: int
    col: int
    own_line: bool
    prev: tuple[int, int] | None
    next: tuple[int, int] | None
    blank_before: bool = False
    blank_after: bool = False


@dataclass(frozen=True)
class Module:
    """A parsed source: definitions, and optionally a trailing anonymous pipeline.

    ``comments`` holds every comment of the source, in order; like locations, they do not
    take part in equality.
    """

    definitions: tuple[Definition, ...]
    pipeline: Pipeline | None = None
    file: str = field(default="<inline>", compare=False)
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)

    @property
    def recipes(self) -> tuple[Recipe, ...]:
        return tuple(d for d in self.definitions if isinstance(d, Recipe))

    @property
    def macros(self) -> tuple[Macro, ...]:
        return tuple(d for d in self.definitions if isinstance(d, Macro))
