"""The canonical form of a source (`soapdsl fmt`): layout within 88 columns, comments kept.

The output is deterministic and parses back to an equal AST (``parse(format(m)) == m``);
formatting it again changes nothing. The lines themselves come from
:mod:`soapdsl.syntax.layout`; this module decides which comments and empty lines go between
them.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import pairwise

from soapdsl.errors import Loc
from soapdsl.syntax import ast as A
from soapdsl.syntax.layout import WIDTH, header_lines, route_head_lines, stage_lines
from soapdsl.syntax.printer import format_pipeline


def format_module(module: A.Module) -> str:
    """The canonical text of ``module``, with its comments (``module.comments``) kept.

    Each comment goes back next to the code it was next to: a comment on a line of its own
    stays on a line of its own before the line the following code prints on; a comment after
    code stays at the end of that code's printed line when the line ends there, and moves to
    a line of its own just before it otherwise. A comment inside a route (or a short recipe's
    or a macro's pipeline) prints that pipeline one stage per line, so that it can stay
    between the stages it was between. A comment inside a definition's header goes below the
    header rather than above it, where it would become part of the documentation comment.
    An empty line between two routes of a recipe is kept (one, however many there were).
    """
    return _Layout(module).text()


def format_definition(d: A.Definition) -> str:
    """One definition in canonical form, with its documentation comment."""
    return format_module(A.Module((d,))).rstrip("\n")


Pos = tuple[int, int]
#: a printed line, the units whose comments go on lines of their own above it, and the units
#: whose trailing comments go at its end
Line = tuple[str, range, range]
_NONE = range(0)


def _pos(loc: Loc) -> Pos:
    return (loc.line, loc.col)


def _unit_lines(k: int, texts: list[str]) -> list[Line]:
    last = len(texts) - 1
    one = range(k, k + 1)
    return [(t, one if i == 0 else _NONE, one if i == last else _NONE) for i, t in enumerate(texts)]


@dataclass
class _Run:
    """Printed units: the head of a definition or route, and the stages of its pipeline.

    A run prints on one line when it fits; otherwise its head (wrapped if need be) and below
    it, at ``inner``, its pipeline on one line; otherwise one stage a line. ``starts`` holds
    the source position of each unit, so that comments can be matched to them.
    """

    indent: str  # of the head (or of the first stage, when there is no head)
    inner: str  # of the pipeline below a head
    head: list[str] | None  # printed lines
    stages: tuple[A.Stage, ...]
    starts: list[Pos]
    span: tuple[int, int] = (0, 0)  # first and last source line of a route
    first: int = 0  # index of the run's first unit in the module
    split: bool = False  # one stage a line, for a comment between two units
    gap: range = _NONE  # source lines between the route before and this route
    blank: bool = False  # the gap holds an empty line

    @property
    def last(self) -> int:
        return self.first + len(self.starts) - 1

    def lines(self) -> list[Line]:
        k = self.first if self.head is None else self.first + 1  # unit of the first stage
        units = range(self.first, self.last + 1)
        flat = format_pipeline(A.Pipeline(self.stages), spelled=True) if self.stages else ""
        if self.head is None:
            if not self.split and len(self.indent + flat) <= WIDTH:
                return [(self.indent + flat, units, units)]
            out: list[Line] = []
        else:
            if not self.stages:
                return _unit_lines(self.first, self.head)
            if not self.split and len(self.head) == 1 and len(self.head[0] + " " + flat) <= WIDTH:
                return [(self.head[0] + " " + flat, units, units)]
            out = _unit_lines(self.first, self.head)
            if not self.split and len(self.inner + flat) <= WIDTH:
                return [*out, (self.inner + flat, range(k, self.last + 1), range(k, self.last + 1))]
        indent = self.indent if self.head is None else self.inner
        for i, s in enumerate(self.stages):
            out += _unit_lines(k + i, stage_lines(s, indent + ("|> " if i else "")))
        return out


class _Layout:
    """The printed lines of a module and the place of each of its comments."""

    def __init__(self, module: A.Module) -> None:
        #: top-level items (definitions, then the pipeline), each a list of runs
        self.items: list[tuple[A.Definition | None, list[_Run]]] = [
            (d, _definition_runs(d)) for d in module.definitions
        ]
        if module.pipeline is not None:
            p = module.pipeline
            self.items.append((None, [_Run("", "", None, p.stages, [_pos(s.loc) for s in p.stages])]))
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
            r.split = inside
        own_lines = {c.line for c in module.comments if c.own_line}
        for _, runs in self.items:
            for prev, r in pairwise(runs[1:]):  # the routes of a recipe, after the first
                r.gap = range(prev.span[1] + 1, r.span[0]) if prev.span[1] else _NONE
                r.blank = any(line not in own_lines for line in r.gap)

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
                out.extend(self._run_text(r, top))
        for i, c in enumerate(self.end):
            if out and (c.blank_before if i == 0 else self.end[i - 1].blank_after):
                out.append("")
            out.append(c.text)
        return "\n".join(out) + "\n" if out else ""

    def _run_text(self, r: _Run, top: int) -> list[str]:
        out: list[str] = []
        # between two routes, an empty line where the source had one (or more), before, between
        # or after the comments there
        apart = [c for c in self.before.get(r.first, []) if c.own_line and c.line in r.gap]
        if apart[0].blank_before if apart else r.blank:
            out.append("")
        for text, above, trailing in r.lines():
            indent = text[: len(text) - len(text.lstrip())]
            for k in above:
                if k == top:
                    continue
                for c in self.before.get(k, []):
                    out.append(indent + c.text)
                    if c.blank_after and c in apart:
                        out.append("")
            out.append(text + "".join("  " + c.text for k in trailing for c in self.after.get(k, [])))
        return out


def _definition_runs(d: A.Definition) -> list[_Run]:
    if isinstance(d, A.Macro) or (d.short and _is_short(d)):
        head = header_lines("macro" if isinstance(d, A.Macro) else "recipe", d, " =")
        body = d.body if isinstance(d, A.Macro) else d.routes[0].pipeline
        return [_Run("", "  ", head, body.stages, [_pos(d.loc)] + [_pos(s.loc) for s in body.stages])]
    runs = [_Run("", "", header_lines("recipe", d, ":"), (), [_pos(d.loc)])]
    for r in d.routes:
        starts = [_pos(r.loc)] + [_pos(s.loc) for s in r.pipeline.stages]
        span = (r.loc.line, r.loc.end_line)
        runs.append(_Run("  ", "    ", route_head_lines(r, "  "), r.pipeline.stages, starts, span))
    return runs


def _is_short(r: A.Recipe) -> bool:
    if len(r.routes) != 1:
        return False
    route = r.routes[0]
    return not route.settings and route.selector == A.SelName("default")
