"""Parser: recipe text -> AST, with syntax errors that point at file:line:col."""

from __future__ import annotations

import ast as pyast
from functools import cache
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from soapdsl.errors import SOURCES, Loc, SoapNameError, SoapSyntaxError
from soapdsl.resources import grammar_path
from soapdsl.syntax import ast as A

_TERMINAL_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "CMP": "a comparison (<, <=, ==, !=, >=, >)",
    "$END": "the end of the text",
}


@cache
def _parser() -> Lark:
    return Lark(
        grammar_path().read_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=False,
    )


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[terminal]
    try:
        pattern = _parser().get_terminal(terminal).pattern
    except KeyError:
        return terminal
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return terminal.lower()


def _expected(names: set[str]) -> str:
    shown = sorted({_describe(n) for n in names if not n.startswith("__ANON")})
    if not shown:
        return ""
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return "; expected " + ", ".join(shown)


def parse(text: str, file: str = "<inline>") -> A.Module:
    """Parse soapdsl source text into a :class:`~soapdsl.syntax.ast.Module`.

    Raises :class:`~soapdsl.errors.SoapSyntaxError` with the location of the first error.
    """
    if not isinstance(text, str):
        raise SoapSyntaxError(f"recipe text must be a str, got {type(text).__name__}")
    SOURCES[file] = text
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream is not None and e.pos_in_stream < len(text) else "?"
        loc = Loc(file, e.line, e.column, e.line, e.column + 1, text)
        raise SoapSyntaxError(f"unexpected character {ch!r}", loc) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            line, col = _end_position(text)
            loc = Loc(file, line, col, line, col + 1, text)
            raise SoapSyntaxError("unexpected end of text" + _expected(e.expected), loc) from None
        loc = Loc(
            file,
            tok.line or 1,
            tok.column or 1,
            tok.end_line or tok.line or 1,
            tok.end_column or (tok.column or 1) + 1,
            text,
        )
        raise SoapSyntaxError(f"unexpected {tok.value!r}" + _expected(e.expected), loc) from None
    except lark.UnexpectedEOF as e:
        line, col = _end_position(text)
        loc = Loc(file, line, col, line, col + 1, text)
        raise SoapSyntaxError("unexpected end of text" + _expected(set(e.expected)), loc) from None
    try:
        return _Builder(file, text, _comment_tokens(text)).transform(tree)
    except lark.exceptions.VisitError as e:  # raised from inside the builder
        if isinstance(e.orig_exc, SoapSyntaxError):
            raise e.orig_exc from None
        raise


def _comment_tokens(text: str) -> list[Token]:
    # Comments are ignored by the grammar; a block of comment lines right above a `recipe` or
    # `macro` becomes its doc. A '#' starts a comment outside string literals only.
    out: list[Token] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        quote = ""
        for i, ch in enumerate(line):
            if quote:
                if ch == quote:
                    quote = ""
                elif ch == "\\":
                    continue
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                tok = Token("COMMENT", line[i:])
                tok.line, tok.column = lineno, i + 1
                out.append(tok)
                break
    return out


def _end_position(text: str) -> tuple[int, int]:
    lines = text.splitlines() or [""]
    if text.endswith("\n"):
        return len(lines), len(lines[-1]) + 1
    return len(lines), len(lines[-1]) + 1


def parse_file(path: str | Path, display: str | None = None) -> A.Module:
    """Parse a ``.soap`` file; errors point at ``display`` (default: the path as given)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SoapNameError(f"cannot read recipe file {str(p)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SoapSyntaxError(f"recipe file {str(p)!r} is not UTF-8 text") from None
    return parse(text, display or str(p))


@v_args(meta=True)
class _Builder(Transformer):
    """Parse tree -> AST."""

    def __init__(self, file: str, text: str, comments: list[Token]) -> None:
        super().__init__()
        self.file = file
        self.text = text
        self.lines = text.splitlines()
        self.comment_lines = {t.line: t.value for t in comments if t.column is not None}

    # -- helpers ------------------------------------------------------------------------

    def _loc(self, meta: lark.tree.Meta) -> Loc:
        if getattr(meta, "empty", True):
            return Loc(self.file, 1, 1, 1, 1, self.text)
        return Loc(self.file, meta.line, meta.column, meta.end_line, meta.end_column, self.text)

    def _tok_loc(self, tok: Token) -> Loc:
        return Loc(self.file, tok.line or 1, tok.column or 1, tok.end_line or 1, tok.end_column or 1, self.text)

    def _doc(self, meta: lark.tree.Meta) -> str:
        # contiguous comment-only lines immediately above the definition
        doc: list[str] = []
        line = meta.line - 1
        while line >= 1 and line in self.comment_lines and self.lines[line - 1].lstrip().startswith("#"):
            doc.append(self.comment_lines[line].lstrip("#").strip())
            line -= 1
        return "\n".join(reversed(doc)).strip()

    # -- definitions --------------------------------------------------------------------

    def start(self, meta, items):
        defs = tuple(i for i in items if isinstance(i, A.Recipe | A.Macro))
        pipes = [i for i in items if isinstance(i, A.Pipeline)]
        return A.Module(defs, pipes[0] if pipes else None, self.file)

    def recipe(self, meta, items):
        name, params, *routes = items
        return A.Recipe(str(name), params or (), tuple(routes), self._doc(meta), False, self._loc(meta))

    def recipe_short(self, meta, items):
        name, params, pipeline = items
        route = A.Route(A.SelName("default", pipeline.loc), (), pipeline, pipeline.loc)
        return A.Recipe(str(name), params or (), (route,), self._doc(meta), True, self._loc(meta))

    def macro(self, meta, items):
        name, params, body = items
        return A.Macro(str(name), params or (), body, self._doc(meta), self._loc(meta))

    def params(self, meta, items):
        return tuple(i for i in items if i is not None)

    def param(self, meta, items):
        name, default = items
        return A.Param(str(name), default, self._loc(meta))

    def route(self, meta, items):
        selector, settings, pipeline = items
        return A.Route(selector, settings or (), pipeline, self._loc(meta))

    def settings(self, meta, items):
        return tuple(i for i in items if i is not None)

    def setting(self, meta, items):
        name, value = items
        return A.Setting(str(name), value, self._loc(meta))

    # -- selectors ----------------------------------------------------------------------

    def sel_or(self, meta, items):
        return A.SelOr(tuple(items), self._loc(meta))

    def sel_and(self, meta, items):
        return A.SelAnd(tuple(items), self._loc(meta))

    def sel_neg(self, meta, items):
        return A.SelNot(items[0], self._loc(meta))

    def sel_pattern(self, meta, items):
        return A.SelPattern(_unquote(items[0], self._tok_loc(items[0])), self._loc(meta))

    def sel_name(self, meta, items):
        return A.SelName(str(items[0]), self._loc(meta))

    def sel_compare(self, meta, items):
        name, op, value = items
        return A.SelCompare(str(name), str(op), value, self._loc(meta))

    # -- pipelines ----------------------------------------------------------------------

    def pipeline(self, meta, items):
        return A.Pipeline(tuple(items), self._loc(meta))

    def stage(self, meta, items):
        name, args, block, label = items
        return A.Stage(
            str(name),
            args if args is not None else (),
            block.pipeline if block is not None else None,
            label,
            args is not None,
            Loc(self.file, name.line, name.column, name.end_line, name.end_column, self.text),
        )

    def arguments(self, meta, items):
        return tuple(i for i in items if i is not None)

    def block(self, meta, items):
        return A.Block(items[0], self._loc(meta))

    def label(self, meta, items):
        return str(items[0])

    def positional(self, meta, items):
        return A.Arg(None, items[0], self._loc(meta))

    def keyword(self, meta, items):
        name, value = items
        return A.Arg(str(name), value, self._loc(meta))

    # -- expressions --------------------------------------------------------------------

    def number(self, meta, items):
        tok = items[0]
        text = str(tok)
        value: int | float
        if any(c in text for c in ".eE"):
            value = float(text)
        else:
            value = int(text)
        return A.Num(value, self._tok_loc(tok))

    def string(self, meta, items):
        return A.Str(_unquote(items[0], self._tok_loc(items[0])), self._loc(meta))

    def true(self, meta, items):
        return A.Bool(True, self._loc(meta))

    def false(self, meta, items):
        return A.Bool(False, self._loc(meta))

    def name(self, meta, items):
        return A.Name(str(items[0]), self._tok_loc(items[0]))

    def empty_tuple(self, meta, items):
        return A.Tuple((), self._loc(meta))

    def tuple(self, meta, items):
        return A.Tuple(tuple(i for i in items if i is not None), self._loc(meta))

    def neg(self, meta, items):
        operand = items[0]
        if isinstance(operand, A.Num):  # fold "-3" into a literal
            return A.Num(-operand.value, self._loc(meta))
        return A.Neg(operand, self._loc(meta))

    def _bin(self, op, meta, items):
        return A.BinOp(op, items[0], items[1], self._loc(meta))

    def add(self, meta, items):
        return self._bin("+", meta, items)

    def sub(self, meta, items):
        return self._bin("-", meta, items)

    def mul(self, meta, items):
        return self._bin("*", meta, items)

    def div(self, meta, items):
        return self._bin("/", meta, items)

    def floordiv(self, meta, items):
        return self._bin("//", meta, items)

    def mod(self, meta, items):
        return self._bin("%", meta, items)

    def __default__(self, data, children, meta):  # pragma: no cover - grammar/builder mismatch
        raise AssertionError(f"unhandled grammar rule {data!r}")


def _unquote(tok: Token, loc: Loc) -> str:
    try:
        value = pyast.literal_eval(str(tok))
    except (ValueError, SyntaxError):
        raise SoapSyntaxError(f"malformed string literal {tok!s}", loc) from None
    if not isinstance(value, str):  # pragma: no cover
        raise SoapSyntaxError(f"malformed string literal {tok!s}", loc)
    return value
