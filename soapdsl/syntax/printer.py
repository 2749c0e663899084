"""Canonical one-line text of syntax nodes.

What `soapdsl compile`, error messages and recipe fingerprints print of a selector, and what
`soapdsl fmt` (:mod:`soapdsl.syntax.formatter`) lays out over lines. A number prints as
Python's ``repr`` of its value, or, with ``spelled=True`` (fmt only), as the source spelled it,
so that reformatting keeps ``3e-4`` while a fingerprint never depends on a spelling.
"""

from __future__ import annotations

import json

from soapdsl.syntax import ast as A

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


def format_param(p: A.Param, *, spelled: bool = False) -> str:
    return p.name if p.default is None else f"{p.name}={format_expr(p.default, spelled=spelled)}"


def format_params(params: tuple[A.Param, ...], *, spelled: bool = False) -> str:
    if not params:
        return ""
    return "(" + ", ".join(format_param(p, spelled=spelled) for p in params) + ")"


def format_pipeline(p: A.Pipeline, *, spelled: bool = False) -> str:
    return " |> ".join(format_stage(s, spelled=spelled) for s in p.stages)


def comma_joined(a: A.Expr, b: A.Expr) -> bool:
    """Whether ``a,b`` are two plain integer literals written with nothing but a comma between
    them (``0,999``), which the checker warns of as a likely decimal comma: ``soapdsl fmt``
    keeps them so, and so the warning (``0, 999`` says that two numbers are meant)."""
    return (
        isinstance(a, A.Num)
        and isinstance(b, A.Num)
        and a.text.isdigit()
        and b.text.isdigit()
        and a.loc.file == b.loc.file
        and a.loc.end_line == b.loc.line
        and b.loc.col == a.loc.end_col + 1
    )


def argument_words(args: tuple[A.Arg, ...], *, spelled: bool = False) -> list[tuple[A.Arg, str]]:
    """Each argument with its text, but with spelled=True two arguments :func:`comma_joined`
    as one (``0,999``, held by the first)."""
    out: list[tuple[A.Arg, str]] = []
    for i, a in enumerate(args):
        text = format_arg(a, spelled=spelled)
        prev = args[i - 1] if i else None
        if spelled and prev is not None and prev.name is None and a.name is None and comma_joined(prev.value, a.value):
            out[-1] = (out[-1][0], out[-1][1] + "," + text)
        else:
            out.append((a, text))
    return out


def _items_text(items: tuple[A.Expr, ...], spelled: bool) -> str:
    out = ""
    for i, e in enumerate(items):
        if i:
            out += "," if spelled and comma_joined(items[i - 1], e) else ", "
        out += format_expr(e, spelled=spelled)
    return out


def format_stage(s: A.Stage, *, spelled: bool = False) -> str:
    out = s.name
    if s.args:
        out += "(" + ", ".join(text for _, text in argument_words(s.args, spelled=spelled)) + ")"
    if s.block is not None:
        out += " { " + format_pipeline(s.block, spelled=spelled) + " }"
    if s.label is not None:
        out += f" as {s.label}"
    return out


def format_arg(a: A.Arg, *, spelled: bool = False) -> str:
    value = format_expr(a.value, spelled=spelled)
    return value if a.name is None else f"{a.name}={value}"


def format_expr(e: A.Expr, prec: int = 0, *, spelled: bool = False) -> str:
    """``e`` on one line; with ``spelled``, a number as the source spelled it (`soapdsl fmt`)."""
    if isinstance(e, A.Num):
        if spelled and e.text:
            text = e.text
        else:
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
            return "(" + format_expr(e.items[0], spelled=spelled) + ",)"
        return "(" + _items_text(e.items, spelled) + ")"
    if isinstance(e, A.Neg):
        return "-" + format_expr(e.operand, 3, spelled=spelled)
    if isinstance(e, A.BinOp):
        p = _PREC[e.op]
        text = f"{format_expr(e.left, p, spelled=spelled)} {e.op} {format_expr(e.right, p + 1, spelled=spelled)}"
        return f"({text})" if p < prec else text
    if isinstance(e, A.Block):
        return "{ " + format_pipeline(e.pipeline, spelled=spelled) + " }"
    raise TypeError(f"not an expression: {e!r}")  # pragma: no cover


def format_selector(s: A.Selector, prec: int = 0, *, spelled: bool = False) -> str:
    if isinstance(s, A.SelPattern):
        return json.dumps(s.pattern, ensure_ascii=False)
    if isinstance(s, A.SelName):
        return s.name
    if isinstance(s, A.SelCompare):
        return f"{s.name} {s.op} {format_expr(s.value, spelled=spelled)}"
    if isinstance(s, A.SelNot):
        return "not " + format_selector(s.operand, 3, spelled=spelled)
    # a nested and/or of the same kind keeps its parentheses, so the tree round-trips
    if isinstance(s, A.SelAnd):
        text = " and ".join(format_selector(i, 2, spelled=spelled) for i in s.items)
        return f"({text})" if prec >= 2 else text
    if isinstance(s, A.SelOr):
        text = " or ".join(format_selector(i, 1, spelled=spelled) for i in s.items)
        return f"({text})" if prec >= 1 else text
    raise TypeError(f"not a selector: {s!r}")  # pragma: no cover
