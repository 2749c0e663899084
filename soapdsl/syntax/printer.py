"""Canonical printer: AST -> text.

The output is deterministic and parses back to an equal AST (``parse(format(m)) == m``), so
it doubles as the formatter of `soapdsl compile` and as the basis of recipe fingerprints.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass

from soapdsl.errors import Loc
from soapdsl.syntax import ast as A

_WIDTH = 88
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


def format_module(module: A.Module) -> str:
    """The canonical text of ``module``, with its comments (``module.comments``) kept.

    Each comment goes back next to the code it was next to: a comment on a line of its own
    stays on a line of its own before the line the following code prints on; a comment after
    code stays at the end of that code's printed line when the line ends there, and moves to
    a line of its own just before it otherwise. A comment inside a route (or a short recipe's
    or a macro's pipeline) prints that pipeline one stage per line, so that it can stay
    between the stages it was between. A comment inside a definition's header goes below the
    header rather than above it, where it would become part of the documentation comment.
    """
    return _Layout(module).text()


Pos = tuple[int, int]


@dataclass
class _Run:
    """Printed units that go on one line when they fit and hold no comment, else one a line.

    A unit is the header of a definition or route, or a stage of its pipeline; ``starts``
    holds the source position of each, so that comments can be matched to them.
    """

    indent: str  # of the head (or of the first stage, when there is no head)
    inner: str  # of the stages, when they go one a line
    head: str | None
    stages: tuple[A.Stage, ...]
    starts: list[Pos]
    fits: bool
    first: int = 0  # index of the run's first unit in the module
    split: bool = False

    @property
    def last(self) -> int:
        return self.first + len(self.starts) - 1

    def lines(self) -> list[tuple[str, str, int, int]]:
        """(indent, text, first unit, last unit) of each printed line."""
        parts = [] if self.head is None else [self.head]
        if not self.split:
            if self.stages:
                parts.append(format_pipeline(A.Pipeline(self.stages)))
            return [(self.indent, " ".join(parts), self.first, self.last)]
        out = [(self.indent, part, self.first, self.first) for part in parts]
        k = self.first + len(parts)
        for i, s in enumerate(self.stages):
            out.append((self.inner, ("|> " if i else "") + format_stage(s), k + i, k + i))
        return out


def _pos(loc: Loc) -> Pos:
    return (loc.line, loc.col)


class _Layout:
    """The printed lines of a module and the place of each of its comments."""

    def __init__(self, module: A.Module) -> None:
        #: top-level items (definitions, then the pipeline), each a list of runs
        self.items: list[tuple[A.Definition | None, list[_Run]]] = [
            (d, _definition_runs(d)) for d in module.definitions
        ]
        if module.pipeline is not None:
            p = module.pipeline
            self.items.append((None, [_Run("", "", None, p.stages, [_pos(s.loc) for s in p.stages], True)]))
        self.runs = [r for _, runs in self.items for r in runs]
        self.starts: list[Pos] = []
        self.headers: set[int] = set()  # units that are a definition's header
        for d, runs in self.items:
            if d is not None:
                self.headers.add(len(self.starts))
            for r in runs:
                r.first = len(self.starts)
                self.starts.extend(r.starts)
        self.before: dict[int, list[A.Comment]] = {}
        self.after: dict[int, list[A.Comment]] = {}
        self.end: list[A.Comment] = []
        for c in module.comments:
            self._place(c)
        for r in self.runs:
            inside = any(self.before.get(k) for k in range(r.first + 1, r.last + 1)) or any(
                self.after.get(k) for k in range(r.first, r.last)
            )
            r.split = inside or not r.fits

    def _unit(self, pos: Pos) -> int:
        return max(bisect_right(self.starts, pos) - 1, 0)

    def _place(self, c: A.Comment) -> None:
        if (c.next is None and (c.own_line or c.prev is None)) or not self.starts:
            self.end.append(c)
            return
        if c.own_line or c.prev is None:
            assert c.next is not None
            k = self._unit(c.next)
            if self.starts[k] == c.next:
                self.before.setdefault(k, []).append(c)
                return
        else:
            k = self._unit(c.prev)
            # (below a header, after comments from inside it, keeps the comments in order)
            if (c.next is None or self._unit(c.next) != k) and not (k in self.headers and k + 1 in self.before):
                self.after.setdefault(k, []).append(c)
                return
        # inside the code of unit k: on a line of its own before it, or below a header
        k = k + 1 if k in self.headers else k
        if k < len(self.starts):
            self.before.setdefault(k, []).append(c)
        else:  # a header with nothing below it (only in a tree built by hand)
            self.end.append(c)

    def text(self) -> str:
        out: list[str] = []
        for d, runs in self.items:
            if out:
                out.append("")  # definitions are paragraphs
            top = runs[0].first
            for c in self.before.get(top, []):
                # an empty line after a comment keeps it out of (or in) a documentation comment
                out.extend([c.text, ""] if c.blank_after else [c.text])
            if top not in self.before and d is not None and d.doc:
                out.extend(f"# {line}".rstrip() for line in d.doc.splitlines())
            for r in runs:
                for indent, line, first, last in r.lines():
                    units = range(first, last + 1)
                    out.extend(indent + c.text for k in units if k != top for c in self.before.get(k, []))
                    out.append(indent + line + "".join("  " + c.text for k in units for c in self.after.get(k, [])))
        for i, c in enumerate(self.end):
            if out and (c.blank_before if i == 0 else self.end[i - 1].blank_after):
                out.append("")
            out.append(c.text)
        return "\n".join(out) + "\n" if out else ""


def _definition_runs(d: A.Definition) -> list[_Run]:
    params = format_params(d.params)
    if isinstance(d, A.Macro) or _is_short(d):
        head = f"macro {d.name}{params} =" if isinstance(d, A.Macro) else f"recipe {d.name}{params} ="
        body = d.body if isinstance(d, A.Macro) else d.routes[0].pipeline
        fits = len(format_pipeline(body)) + 3 <= _WIDTH
        return [_Run("", "  ", head, body.stages, [_pos(d.loc)] + [_pos(s.loc) for s in body.stages], fits)]
    runs = [_Run("", "", f"recipe {d.name}{params}:", (), [_pos(d.loc)], True)]
    for r in d.routes:
        head = _route_head(r)
        fits = 2 + len(head) + 1 + len(format_pipeline(r.pipeline)) <= _WIDTH
        starts = [_pos(r.loc)] + [_pos(s.loc) for s in r.pipeline.stages]
        runs.append(_Run("  ", "    ", head, r.pipeline.stages, starts, fits))
    return runs


def format_definition(d: A.Definition) -> str:
    """One definition in canonical form, with its documentation comment."""
    return format_module(A.Module((d,))).rstrip("\n")


def _is_short(r: A.Recipe) -> bool:
    if len(r.routes) != 1:
        return False
    route = r.routes[0]
    return not route.settings and route.selector == A.SelName("default")


def _route_head(r: A.Route) -> str:
    settings = ""
    if r.settings:
        settings = " [" + ", ".join(f"{s.name}={format_expr(s.value)}" for s in r.settings) + "]"
    return f"route {format_selector(r.selector)}{settings}:"


def format_route(r: A.Route, indent: str = "") -> str:
    head = indent + _route_head(r)
    one = format_pipeline(r.pipeline)
    if len(head) + 1 + len(one) <= _WIDTH:
        return f"{head} {one}"
    inner = indent + "  "
    return head + "\n" + inner + ("\n" + inner + "|> ").join(format_stage(s) for s in r.pipeline.stages)


def format_params(params: tuple[A.Param, ...]) -> str:
    if not params:
        return ""
    items = [p.name if p.default is None else f"{p.name}={format_expr(p.default)}" for p in params]
    return "(" + ", ".join(items) + ")"


def format_pipeline(p: A.Pipeline) -> str:
    return " |> ".join(format_stage(s) for s in p.stages)


def format_stage(s: A.Stage) -> str:
    out = s.name
    if s.args:
        out += "(" + ", ".join(format_arg(a) for a in s.args) + ")"
    if s.block is not None:
        out += " { " + format_pipeline(s.block) + " }"
    if s.label is not None:
        out += f" as {s.label}"
    return out


def format_arg(a: A.Arg) -> str:
    value = format_expr(a.value)
    return value if a.name is None else f"{a.name}={value}"


def format_expr(e: A.Expr, prec: int = 0) -> str:
    if isinstance(e, A.Num):
        text = repr(e.value) if isinstance(e.value, float) else str(e.value)
        if text in ("inf", "-inf"):  # a literal too big for a float, such as 1e999
            text = text.replace("inf", "1e999")
        return f"({text})" if prec >= 3 and text.startswith("-") else text
    if isinstance(e, A.Str):
        return json.dumps(e.value, ensure_ascii=False)
    if isinstance(e, A.Bool):
        return "true" if e.value else "false"
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Tuple):
        if len(e.items) == 1:
            return "(" + format_expr(e.items[0]) + ",)"
        return "(" + ", ".join(format_expr(i) for i in e.items) + ")"
    if isinstance(e, A.Neg):
        return "-" + format_expr(e.operand, 3)
    if isinstance(e, A.BinOp):
        p = _PREC[e.op]
        text = f"{format_expr(e.left, p)} {e.op} {format_expr(e.right, p + 1)}"
        return f"({text})" if p < prec else text
    if isinstance(e, A.Block):
        return "{ " + format_pipeline(e.pipeline) + " }"
    raise TypeError(f"not an expression: {e!r}")  # pragma: no cover


def format_selector(s: A.Selector, prec: int = 0) -> str:
    if isinstance(s, A.SelPattern):
        return json.dumps(s.pattern, ensure_ascii=False)
    if isinstance(s, A.SelName):
        return s.name
    if isinstance(s, A.SelCompare):
        return f"{s.name} {s.op} {format_expr(s.value)}"
    if isinstance(s, A.SelNot):
        return "not " + format_selector(s.operand, 3)
    # a nested and/or of the same kind keeps its parentheses, so the tree round-trips
    if isinstance(s, A.SelAnd):
        text = " and ".join(format_selector(i, 2) for i in s.items)
        return f"({text})" if prec >= 2 else text
    if isinstance(s, A.SelOr):
        text = " or ".join(format_selector(i, 1) for i in s.items)
        return f"({text})" if prec >= 1 else text
    raise TypeError(f"not a selector: {s!r}")  # pragma: no cover
