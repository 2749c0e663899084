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


def format_stage(s: A.Stage, *, spelled: bool = False) -> str:
    out = s.name
    if s.args:
        out += "(" + ", ".join(format_arg(a, spelled=spelled) for a in s.args) + ")"
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
        return "(" + ", ".join(format_expr(i, spelled=spelled) for i in e.items) + ")"
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
