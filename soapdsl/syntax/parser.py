"""Parser: recipe text -> AST, with syntax errors that point at file:line:col."""

from __future__ import annotations

import ast as pyast
import codecs
import difflib
import re
import sys
import unicodedata
from dataclasses import fields, is_dataclass, replace
from functools import cache
from pathlib import Path

import lark
from lark import Lark, Token, v_args
from lark.visitors import Transformer_NonRecursive

from soapdsl.errors import SOURCES, Loc, SoapError, SoapNameError, SoapSyntaxError, line_col
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


def _acceptable(e: lark.UnexpectedToken) -> set[str]:
    """The terminals the parser would really have taken in place of the unexpected token.

    ``e.expected`` is the LALR lookahead of the state, which can hold terminals that only
    fit in another context sharing that state (a ':' after an argument, from a selector's
    comparison); replaying each candidate through the parser keeps only the real ones.
    """
    if e.interactive_parser is None:
        return set(e.expected)
    try:
        return set(e.interactive_parser.accepts()) or set(e.expected)
    except Exception:  # replaying is a refinement: on any failure, the lookahead will do
        return set(e.expected)


_ENDS = {"$END", "RBRACE"}  # what may follow a complete pipeline, at the top level and in a block

#: a byte-order mark (U+FEFF), which some editors write at the start of a UTF-8 file
BOM = "\ufeff"

#: the note for a stage that follows another without '|>' (here, and in library._pick)
MISSING_PIPE = "two stages in a row need '|>' between them"


#: the keywords that start a line, which a misspelling turns into a stage name
_LINE_KEYWORDS = ("recipe", "macro", "route")
_WORD_BEFORE = re.compile(r"(?:^|\n)[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]+$")


_ROUTE_OUTSIDE = (
    "a route outside a recipe: routes follow a header written with ':', `recipe NAME(lr=...):`"
    " (the short form `recipe NAME(...) = ...` has none)"
)


def _keyword_typo(text: str, tok: Token) -> tuple[str, tuple[int, int], str] | None:
    """A misspelt keyword that starts the line before ``tok`` (``Recipe r(...)``, ``rout m:``).

    The parser reads such a word as a stage and stops at the name after it, where "two stages
    in a row" would be the wrong advice. Returns (the word, its (line, col), the keyword).
    """
    if tok.start_pos is None:
        return None
    m = _WORD_BEFORE.search(text, 0, tok.start_pos)
    if m is None:
        return None
    word = m.group(1)
    if word in ("recipe", "macro"):
        return None
    # `route` itself: a route where no recipe's routes are open (read as a stage, like a typo)
    close = [word] if word == "route" else difflib.get_close_matches(word.lower(), _LINE_KEYWORDS, n=1, cutoff=0.75)
    if not close:
        return None
    return word, line_col(text, m.start(1)), close[0]


def _dangling_pipe(text: str, tok: Token) -> tuple[Token, Token] | None:
    """The '|>' that ends a line before ``tok``'s line, where that line starts with a keyword
    (``route``, ``recipe``, ``macro``): the parser read the keyword as the stage after the
    '|>' and stopped later on that line. Returns (the '|>', the keyword), or None."""
    if tok.start_pos is None:
        return None
    found = None
    try:
        prev = None
        for cur in _parser().lex(text):
            if (cur.start_pos or 0) > tok.start_pos:
                break
            if prev is not None and prev == "|>" and cur in _LINE_KEYWORDS and (cur.line or 0) > (prev.line or 0):
                found = (prev, cur)
            prev = cur
    except lark.exceptions.LarkError:
        return None
    return found if found is not None and found[1].line == tok.line else None


def _expected(names: set[str]) -> str:
    described = (_describe(n) for n in names)
    # anonymous terminals with a fixed text ('//', '|>') describe as that text; others are internal
    shown = sorted({d for d in described if not d.startswith("__anon")})
    if not shown:
        return ""
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return "; expected " + ", ".join(shown)


#: quotes that editors and web pages substitute for the plain ones -> the plain one
_TYPOGRAPHIC_QUOTES = {
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u00ab\u00bb\uff02\u2033", '"'),
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2039\u203a\uff07\u2032", "'"),
}

#: decimal separators a keyboard layout or an input method may write for '.'
_DECIMAL_POINTS = {"\u066b": ".", "\uff0e": "."}  # ARABIC DECIMAL SEPARATOR, FULLWIDTH FULL STOP


def non_ascii_digit_note(text: str) -> str | None:
    """If ``text`` starts with a digit other than 0-9 (full-width, Arabic-Indic, ...), which
    looks like a number and is none to soapdsl, what to write instead; else None."""
    if not text or text[0].isascii() or unicodedata.decimal(text[0], None) is None:
        return None
    run = []
    for c in text:
        value = unicodedata.decimal(c, None)
        if value is None and c != "." and c not in _DECIMAL_POINTS:
            break
        run.append(str(value) if value is not None else _DECIMAL_POINTS.get(c, c))
    ch, written = text[0], text[: len(run)]
    fix = "".join(run)
    note = f"{ch!r} ({unicodedata.name(ch, 'a digit')}) is not an ASCII digit; write {fix}"
    return note if written == ch else f"{note} for {written!r}"


def parse(text: str, file: str = "<inline>") -> A.Module:
    """Parse soapdsl source text into a :class:`~soapdsl.syntax.ast.Module`.

    Raises :class:`~soapdsl.errors.SoapSyntaxError` with the location of the first error.
    A UTF-8 byte-order mark at the start, which text read from a file written by some Windows
    editors begins with, is not part of the text (as in :func:`parse_file`).
    """
    if not isinstance(text, str):
        raise SoapSyntaxError(f"recipe text must be a str, got {type(text).__name__}")
    text = text.removeprefix(BOM)
    SOURCES[file] = text
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream is not None and e.pos_in_stream < len(text) else "?"
        loc = Loc(file, e.line, e.column, e.line, e.column + 1, text)
        # a digit that looks like 0-9 and is none: say which one to write
        digit = non_ascii_digit_note(text[e.pos_in_stream :] if e.pos_in_stream is not None else ch)
        notes: tuple[str, ...] = (digit,) if digit else ()
        if ch == BOM:  # invisible in an editor: say what it is
            notes = ("U+FEFF is a byte-order mark, which most editors do not show: delete it",)
        elif ch in _TYPOGRAPHIC_QUOTES:  # a word processor's or a web page's "smart" quote
            plain = _TYPOGRAPHIC_QUOTES[ch]
            notes = (
                f"{ch!r} ({unicodedata.name(ch)}) is a typographic quote;"
                f" a string is written between plain {plain} quotes",
            )
        raise SoapSyntaxError(f"unexpected character {ch!r}", loc, notes=notes) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            line, col = _end_position(text)
            loc = Loc(file, line, col, line, col + 1, text)
            raise SoapSyntaxError("unexpected end of text" + _expected(_acceptable(e)), loc) from None
        loc = Loc(
            file,
            tok.line or 1,
            tok.column or 1,
            tok.end_line or tok.line or 1,
            tok.end_column or (tok.column or 1) + 1,
            text,
        )
        dangling = _dangling_pipe(text, tok)
        if dangling is not None:  # `sign |>` ending a line, and a `route ...` line after it
            pipe, starts = dangling
            at = f"{file}:{starts.line}:{starts.column}"
            raise SoapSyntaxError(
                "'|>' with no stage after it: a pipeline cannot end in '|>'",
                Loc(file, pipe.line or 1, pipe.column or 1, pipe.line or 1, (pipe.column or 1) + 2, text),
                notes=(f"'{starts}' at {at} starts a {starts}, which '|>' would read as a stage",),
            ) from None
        acceptable = _acceptable(e)
        # at the top level only: in a block neither a definition nor a route can start
        typo = _keyword_typo(text, tok) if tok.type == "NAME" and "$END" in acceptable else None
        if typo is None and tok.value == "route" and "$END" in acceptable:
            typo = ("route", (loc.line, loc.col), "route")  # after a short-form recipe or a macro
        if typo is not None:
            word, (line, col), keyword = typo
            loc = Loc(file, line, col, line, col + len(word), text)
            if word == keyword:
                raise SoapSyntaxError(_ROUTE_OUTSIDE, loc) from None
            raise SoapSyntaxError(f"'{word}' is not a keyword; did you mean '{keyword}'?", loc) from None
        # a name where the pipeline could have ended ('sign sign', '{ a b }'): the LALR state has
        # already reduced the first stage, so '|>' is not among the expected tokens; say it
        notes = (MISSING_PIPE,) if tok.type == "NAME" and acceptable & _ENDS else ()
        raise SoapSyntaxError(f"unexpected {tok.value!r}" + _expected(acceptable), loc, notes=notes) from None
    except lark.UnexpectedEOF as e:
        line, col = _end_position(text)
        loc = Loc(file, line, col, line, col + 1, text)
        raise SoapSyntaxError("unexpected end of text" + _expected(set(e.expected)), loc) from None
    try:
        module: A.Module = _Builder(file, text, _comments(text)).transform(tree)
    except lark.exceptions.VisitError as e:  # raised from inside the builder
        if isinstance(e.orig_exc, SoapSyntaxError):
            raise e.orig_exc from None
        raise
    _check_depth(module)
    return module


def int_digit_limit() -> int:
    """The most digits Python's int() reads, ``sys.get_int_max_str_digits()`` (4300 by default;
    0: no limit, also on Pythons without one)."""
    return int(getattr(sys, "get_int_max_str_digits", lambda: 0)())


def too_long(digits: str) -> str:
    """Why an integer of these digits is refused: Python reads at most :func:`int_digit_limit`
    of them, a guard against slow parsing."""
    limit = int_digit_limit()
    count = sum(c.isdigit() for c in digits)
    return f"a number of {count} digits is too long: soapdsl reads integers of at most {limit} digits"


#: How deeply expressions, blocks and selectors may nest. The checker, the compiler, the
#: runtime, the printer and AST comparison all recurse over the tree, up to about 14 Python
#: frames a level (a block passed as an argument); 50 levels keep them well inside Python's
#: default recursion limit of 1000 frames, and far above any real recipe, which nests a
#: handful of levels. A long chain such as ``1 + 1 + ... + 1`` nests a level per operator.
MAX_DEPTH = 50

#: the nodes that make one level of nesting (a stage counts when it has a block)
_NESTING = (A.BinOp, A.Neg, A.Tuple, A.Block, A.SelNot, A.SelAnd, A.SelOr)


def _check_depth(module: A.Module) -> None:
    """Refuse a tree nested more than :data:`MAX_DEPTH` levels, at the outermost level too many.

    Walks the tree with an explicit stack: recursing here would fail on the very input that
    this guards against.
    """
    stack: list[tuple[object, int]] = [(module, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, tuple):
            stack.extend((item, depth) for item in reversed(node))
            continue
        if not is_dataclass(node) or isinstance(node, A.Comment):
            continue
        if isinstance(node, _NESTING) or (isinstance(node, A.Stage) and node.block is not None):
            depth += 1
            if depth > MAX_DEPTH:
                loc = node.loc
                start = Loc(loc.file, loc.line, loc.col, loc.line, loc.col + 1, loc.text)
                # a long flat chain (1 + 1 + ... + 1) is a tree one level deeper per operator
                chain = (
                    ["each operator of a chain such as a + b + c counts one level"] if isinstance(node, A.BinOp) else []
                )
                raise SoapSyntaxError(
                    f"expression nested too deeply (more than {MAX_DEPTH} levels)", start, notes=chain
                )
        stack.extend((getattr(node, f.name), depth) for f in reversed(fields(node)) if f.name != "loc")


def _comments(text: str) -> tuple[A.Comment, ...]:
    """Every comment of ``text`` (which parsed), with the neighbours the printer needs.

    The grammar ignores comments; lexing again with them kept is the simplest way to find
    them outside string literals, with the tokens around each.
    """
    if "#" not in text:
        return ()
    items = [t for t in _parser().lex(text, dont_ignore=True) if t.type != "WS"]
    out: list[A.Comment] = []
    prev: tuple[int, int] | None = None
    pipe = False  # the last token was a `|>`, which belongs with the stage after it
    pending: list[tuple[int, bool]] = []  # comments still waiting for their next token: index, after a `|>`
    for i, tok in enumerate(items):
        pos = (tok.line or 1, tok.column or 1)
        if tok.type != "COMMENT":
            if tok == "|>":
                pipe = True
                continue
            for j, after_pipe in pending:
                out[j] = replace(out[j], prev=pos if after_pipe else out[j].prev, next=pos)
            pending.clear()
            prev, pipe = pos, False
            continue
        before = items[i - 1] if i else None
        after = items[i + 1] if i + 1 < len(items) else None
        out.append(
            A.Comment(
                str(tok).rstrip(),
                pos[0],
                pos[1],
                own_line=before is None or (before.end_line or 1) < pos[0],
                prev=prev,
                next=None,
                blank_before=before is not None and pos[0] - (before.end_line or 1) > 1,
                blank_after=after is not None and (after.line or 1) - pos[0] > 1,
            )
        )
        pending.append((len(out) - 1, pipe))
    return tuple(out)


def first_comment(text: str) -> Token | None:
    """The first ``#`` comment of ``text`` outside a string literal, as a token (None if there
    is none, or if ``text`` does not lex: its parse error is the one to show)."""
    if "#" not in text:
        return None
    try:
        return next((t for t in _parser().lex(text, dont_ignore=True) if t.type == "COMMENT"), None)
    except lark.exceptions.LarkError:
        return None


def unmatched_paren(text: str) -> int | None:
    """The 0-based index in ``text`` of its first ')' (outside a string or a comment) that
    closes no '(' before it, or None; also None where ``text`` does not lex, since its parse
    error is the one to show."""
    depth = 0
    try:
        for tok in _parser().lex(text):
            depth += (tok == "(") - (tok == ")")
            if depth < 0:
                return tok.start_pos or 0
    except lark.exceptions.LarkError:
        return None
    return None


def _end_position(text: str) -> tuple[int, int]:
    lines = text.splitlines() or [""]
    if text.endswith("\n"):
        return len(lines), len(lines[-1]) + 1
    return len(lines), len(lines[-1]) + 1


def decode_source(raw: bytes, file: str, what: str, error: type[SoapError] = SoapSyntaxError) -> str:
    """The text of a file's bytes ``raw`` as Python reads a text file: UTF-8, a byte-order mark
    skipped, every line end (\\r\\n, \\r) a \\n. A byte that is not UTF-8 (Latin-1 text, say)
    raises ``error`` saying "``what`` is not UTF-8 text", at its line and column in ``file``."""
    text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    bad = _UNDECODED.search(text)
    if bad is None:
        return text
    i = bad.start()
    line, col = line_col(text, i)
    shown = _UNDECODED.sub("\ufffd", text)  # what an editor shows for a byte it cannot read
    raise error(
        f"{what} is not UTF-8 text",
        Loc(file, line, col, line, col + 1, shown),
        notes=(f"byte 0x{ord(bad.group()) - 0xDC00:02x} here is not UTF-8: save the file as UTF-8",),
    )


#: what bytes that are not UTF-8 decode to with errors="surrogateescape"
_UNDECODED = re.compile("[\udc80-\udcff]")


def read_file(path: Path, what: str, error: type[SoapError]) -> bytes:
    """The bytes of the file at ``path``, ``what`` (``"recipe file"``) in the ``error`` raised for a
    directory or a file that cannot be read, including a name the OS refuses outright (a NUL
    character, one too long), which pathlib raises as ValueError or from its is_dir() check."""
    try:
        if path.is_dir():
            raise error(f"{str(path)!r} is a directory, not a {what}")
        return path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
    except ValueError:  # "embedded null byte"
        raise error(f"cannot read {what} {str(path)!r}: a file name cannot hold a NUL character") from None


def parse_file(path: str | Path, display: str | None = None) -> A.Module:
    """Parse a ``.soap`` file; errors point at ``display`` (default: the path as given).

    A directory is refused by name (not as an unreadable file), and a UTF-8 byte-order mark,
    which some Windows editors write, is skipped rather than reported as a character.
    """
    return load_file(path, display)[1]


def load_file(path: str | Path, display: str | None = None) -> tuple[str, A.Module]:
    """The text of a ``.soap`` file (as :func:`decode_source` reads it) and its module, as
    :func:`parse_file` parses it: for `soapdsl fmt`, which compares the two."""
    p = Path(path)
    raw = read_file(p, "recipe file", SoapNameError)
    try:
        text = decode_source(raw, display or str(p), f"recipe file {str(p)!r}")
        return text, parse(text, display or str(p))
    except SoapSyntaxError as e:
        if p.suffix.lower() in (".yaml", ".yml"):
            # `soapdsl check train.yaml`, build("train.yaml", ...): a config where a recipe belongs
            e.notes = (
                *e.notes,
                f"{str(p)!r} looks like a YAML config, not a recipe file: soapdsl.from_config(model,"
                f" {str(p)!r}) reads a config; its 'recipe' key names the recipe",
            )
            e.args = (e.format(),)
        raise


@v_args(meta=True)
class _Builder(Transformer_NonRecursive):
    """Parse tree -> AST."""

    def __init__(self, file: str, text: str, comments: tuple[A.Comment, ...]) -> None:
        super().__init__()
        self.file = file
        self.text = text
        self.comments = comments
        self.comment_lines = {c.line: c.text for c in comments if c.own_line}

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
        while line >= 1 and line in self.comment_lines:
            doc.append(self.comment_lines[line].lstrip("#").strip())
            line -= 1
        return "\n".join(reversed(doc)).strip()

    # -- definitions --------------------------------------------------------------------

    def start(self, meta, items):
        defs = tuple(i for i in items if isinstance(i, A.Recipe | A.Macro))
        pipes = [i for i in items if isinstance(i, A.Pipeline)]
        return A.Module(defs, pipes[0] if pipes else None, self.file, self.comments)

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
            try:
                value = int(text)
            except ValueError:  # past sys.get_int_max_str_digits(), which int() refuses
                raise SoapSyntaxError(too_long(text), self._tok_loc(tok)) from None
        return A.Num(value, self._tok_loc(tok), text.lower())

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
            text = operand.text[1:] if operand.text.startswith("-") else "-" + operand.text
            return A.Num(-operand.value, self._loc(meta), text if operand.text else "")
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
