"""Canonical printer: AST -> text.

The output is deterministic and parses back to an equal AST (``parse(format(m)) == m``), so
it doubles as the formatter of `soapdsl compile` and as the basis of recipe fingerprints.
"""

from __future__ import annotations

import json

from soapdsl.syntax import ast as A

_WIDTH = 88
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


def format_module(module: A.Module) -> str:
    parts = [format_definition(d) for d in module.definitions]
    if module.pipeline is not None:
        parts.append(format_pipeline(module.pipeline))
    return "\n\n".join(parts) + "\n" if parts else ""


def format_definition(d: A.Definition) -> str:
    doc = "".join(f"# {line}".rstrip() + "\n" for line in d.doc.splitlines()) if d.doc else ""
    params = format_params(d.params)
    if isinstance(d, A.Macro):
        return f"{doc}macro {d.name}{params} =" + _body(d.body, "  ")
    if _is_short(d):
        return f"{doc}recipe {d.name}{params} =" + _body(d.routes[0].pipeline, "  ")
    routes = "".join("\n" + format_route(r, "  ") for r in d.routes)
    return f"{doc}recipe {d.name}{params}:{routes}"


def _is_short(r: A.Recipe) -> bool:
    if len(r.routes) != 1:
        return False
    route = r.routes[0]
    return not route.settings and route.selector == A.SelName("default")


def _body(p: A.Pipeline, indent: str) -> str:
    one = format_pipeline(p)
    if len(indent) + len(one) + 1 <= _WIDTH and "\n" not in one:
        return " " + one
    return "\n" + indent + ("\n" + indent + "|> ").join(format_stage(s) for s in p.stages)


def format_route(r: A.Route, indent: str = "") -> str:
    settings = ""
    if r.settings:
        settings = " [" + ", ".join(f"{s.name}={format_expr(s.value)}" for s in r.settings) + "]"
    head = f"{indent}route {format_selector(r.selector)}{settings}:"
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
