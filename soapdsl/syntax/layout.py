"""Line breaking for the canonical printer: which text goes on which line, within 88 columns.

Each function returns whole printed lines, indentation included. A line is broken only
between tokens, so the text parses the same whatever the breaks:

- a list in parentheses or brackets (a header's parameters, a stage's arguments, a route's
  settings) fills each line and breaks after a comma, the next line aligned after the ``(``;
- a selector breaks before an ``or`` or ``and``, the next line aligned after ``route``: at the
  top level first, inside a parenthesised (or negated) group only where that group fits on
  no line of its own;
- a stage with a ``{ ... }`` block that does not fit on its line ends its line with ``{``,
  prints the block's pipeline two columns right of the stage's name and closes it on a line
  of its own, under the stage's name; a ``{ ... }`` argument too long for a line of its own
  does the same (``from={`` ... ``})``);
- a pipeline that does not fit on its line prints one stage a line, ``|> `` before each
  stage but the first.

Only a single token (a long name, string or number), or a ``{ ... }`` block inside a tuple or
arithmetic, prints past the 88th column.
"""

from __future__ import annotations

from collections.abc import Sequence

from soapdsl.syntax import ast as A
from soapdsl.syntax.printer import (
    argument_words,
    format_expr,
    format_param,
    format_pipeline,
    format_selector,
    format_stage,
)

WIDTH = 88


Unit = tuple[str, "tuple[Unit, ...] | None"]
"""Text to print and, for a group that may break, its parts: their texts joined by spaces."""


def fill_units(lead: str, units: Sequence[Unit], col: int) -> list[str]:
    """``lead`` and then ``units`` joined by spaces, within 88 columns: a unit that does not
    fit on its line goes whole to the next (aligned at column ``col``, 0-based); one that fits
    on no line breaks into its parts there, which fill their lines in turn (a unit without
    parts stays whole, past the 88th column). So a group breaks inside only where breaking
    around it is not enough."""
    lines = [lead]
    first = True

    def put(u: Unit) -> None:
        nonlocal first
        if len(lines[-1]) + (0 if first else 1) + len(u[0]) <= WIDTH:
            lines[-1] += ("" if first else " ") + u[0]
            first = False
            return
        if not first:
            lines.append(" " * col)
            first = True
        if u[1] is None or len(lines[-1]) + len(u[0]) <= WIDTH:
            lines[-1] += u[0]
            first = False
            return
        for part in u[1]:
            put(part)

    for u in units:
        put(u)
    return lines


def fill(lead: str, words: Sequence[str], col: int) -> list[str]:
    """``lead`` and then ``words`` joined by spaces, a line broken before a word that would
    pass the 88th column; a continuation line starts at column ``col`` (0-based)."""
    return fill_units(lead, [(w, None) for w in words], col)


def listed(opener: str, items: Sequence[str], closer: str) -> list[str]:
    """The words of ``opener item, item, ... closer``: a break may follow each comma."""
    if not items:
        return [opener + closer]
    words = [item + "," for item in items[:-1]] + [items[-1] + closer]
    words[0] = opener + words[0]
    return words


def header_lines(keyword: str, d: A.Definition, end: str) -> list[str]:
    """``recipe NAME(params):`` (``end`` is ``:`` or `` =``), its parameters filled."""
    opener = f"{keyword} {d.name}"
    if not d.params:
        return [opener + end]
    return fill("", listed(opener + "(", [format_param(p, spelled=True) for p in d.params], ")" + end), len(opener) + 1)


def _prefixed(u: Unit, text: str) -> Unit:
    parts = u[1]
    return text + u[0], None if parts is None else (_prefixed(parts[0], text), *parts[1:])


def _suffixed(u: Unit, text: str) -> Unit:
    parts = u[1]
    return u[0] + text, None if parts is None else (*parts[:-1], _suffixed(parts[-1], text))


def selector_unit(s: A.Selector, prec: int = 0) -> Unit:
    """:func:`format_selector`'s text as a unit: an ``and``/``or`` is a group of its items,
    each item after the first led by its operator."""
    if isinstance(s, A.SelNot):
        return _prefixed(selector_unit(s.operand, 3), "not ")
    if not isinstance(s, (A.SelAnd, A.SelOr)):
        return format_selector(s, prec, spelled=True), None
    op, own = ("or ", 1) if isinstance(s, A.SelOr) else ("and ", 2)
    parts = [selector_unit(item, own) for item in s.items]
    parts[1:] = [_prefixed(u, op) for u in parts[1:]]
    unit: Unit = " ".join(u[0] for u in parts), tuple(parts)
    return _prefixed(_suffixed(unit, ")"), "(") if prec >= own else unit


def route_head_lines(r: A.Route, indent: str) -> list[str]:
    """``route SELECTOR [settings]:`` at ``indent``: the selector breaks before an ``or`` or
    ``and``, inside parentheses only where breaking around them is not enough."""
    units: list[Unit] = [_prefixed(selector_unit(r.selector), "route ")]
    if r.settings:
        settings = [f"{x.name}={format_expr(x.value, spelled=True)}" for x in r.settings]
        units += [(w, None) for w in listed("[", settings, "]")]
    units[-1] = _suffixed(units[-1], ":")
    return fill_units(indent, units, len(indent) + len("route "))


def stage_lines(s: A.Stage, lead: str) -> list[str]:
    """The stage ``s`` after ``lead`` (its indentation, and a ``|> ``)."""
    flat = lead + format_stage(s, spelled=True)
    if len(flat) <= WIDTH:
        return [flat]
    col = len(lead)
    label = "" if s.label is None else f" as {s.label}"
    after = label if s.block is None else " {"
    if s.args:
        lines = _argument_lines(s, lead, after)
    else:
        lines = [lead + s.name + after]
    if s.block is not None:
        lines += pipeline_lines(s.block, " " * (col + 2))
        lines.append(" " * col + "}" + label)
    return lines


def _argument_lines(s: A.Stage, lead: str, after: str) -> list[str]:
    """``NAME(args)`` and ``after``, from ``lead`` on: the arguments fill their lines, aligned
    after the ``(``. A ``{ ... }`` argument too long for a line of its own opens on its line
    (``from={``), its pipeline goes two columns right of the stage's name, and it closes under
    the name (``})``), where the arguments after it go on."""
    col = len(lead)
    opener = s.name + "("
    indent = " " * (col + len(opener))  # of a continuation line
    args = argument_words(s.args, spelled=True)
    words = listed(opener, [text for _, text in args], ")" + after)
    lines: list[str] = []
    line = ""
    for i, ((a, _), word) in enumerate(zip(args, words, strict=True)):
        block = isinstance(a.value, A.Block) and len(indent if i else lead) + len(word) > WIDTH
        if block:  # the word is "[opener][name=]{ pipeline }" and then "," or ")" + after
            head = (opener if i == 0 else "") + ("" if a.name is None else f"{a.name}=") + "{"
            tail = "}" + word[len(head) - 1 + len(format_expr(a.value, spelled=True)) :]
            word = head
        if i == 0:
            line = lead + word
        elif len(line) + 1 + len(word) > WIDTH:
            lines.append(line)
            line = indent + word
        else:
            line += " " + word
        if block:
            assert isinstance(a.value, A.Block)
            lines += [line, *pipeline_lines(a.value.pipeline, " " * (col + 2))]
            line = " " * col + tail
    lines.append(line)
    return lines


def pipeline_lines(p: A.Pipeline, indent: str) -> list[str]:
    """The pipeline ``p`` at ``indent``: on one line, or one stage a line."""
    flat = indent + format_pipeline(p, spelled=True)
    if len(flat) <= WIDTH:
        return [flat]
    out: list[str] = []
    for i, s in enumerate(p.stages):
        out += stage_lines(s, indent + ("|> " if i else ""))
    return out
