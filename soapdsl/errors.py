"""soapdsl's error types.

Every failure a user can cause (bad recipe text, bad arguments, a shape the recipe cannot
handle, bad YAML, a state dict from another recipe) raises a subclass of :class:`SoapError`.
Errors that come from source text carry a :class:`~soapdsl.syntax.ast.Loc` and print as::

    recipe.soap:3:14: error: unknown operator 'newton_shulz'; did you mean 'newton_schulz'?
        3 |   rotate(left) |> newton_shulz(5)
          |                   ^^^^^^^^^^^^
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "Loc",
    "SoapError",
    "SoapSyntaxError",
    "SoapNameError",
    "SoapArgumentError",
    "SoapRouteError",
    "SoapShapeError",
    "SoapConfigError",
    "SoapStateError",
    "SoapRecipeError",
    "SoapWarning",
    "did_you_mean",
]


@dataclass(frozen=True, slots=True)
class Loc:
    """A span of source text: 1-based line and column, end exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int
    #: the text the span points into (not compared): carets never show another source's line
    text: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def line_col(text: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of the 0-based ``offset`` into ``text``."""
    return text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)


#: Text of every source parsed in this process, by file name, so that any error with a
#: location can print the offending line. Inline texts are registered under "<inline>".
SOURCES: dict[str, str] = {}


class SoapError(Exception):
    """Base class of every error soapdsl raises on bad input.

    ``message`` is the one-line description; ``loc`` the source span, if any; ``source`` the
    text the span points into, used to print the offending line with a caret.
    """

    kind = "error"

    def __init__(
        self,
        message: str,
        loc: Loc | None = None,
        source: str | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        self.message = message
        self.loc = loc
        self.source = source
        self.notes = tuple(notes)
        super().__init__(self.format())

    def at(self, loc: Loc | None) -> SoapError:
        """Give this error a location, if it has none yet."""
        if self.loc is None and loc is not None:
            self.loc = loc
            self.args = (self.format(),)
        return self

    def format(self) -> str:
        return _format(self.kind, self.message, self.loc, self.source, self.notes)

    def __str__(self) -> str:
        return self.format()


class SoapWarning(UserWarning):
    """Input soapdsl accepts but that most likely does not say what was meant, such as a
    decimal comma (``rms_normalize(0,999)`` is beta=0 and eps=999). It prints as an error does,
    with its location and a caret; ``warnings.simplefilter("error", soapdsl.SoapWarning)``
    makes it one (``python -W error::UserWarning`` too, with every other user warning)."""

    kind = "warning"

    def __init__(self, message: str, loc: Loc | None = None, notes: Iterable[str] = ()) -> None:
        self.message = message
        self.loc = loc
        self.notes = tuple(notes)
        super().__init__(self.format())

    def format(self) -> str:
        return _format(self.kind, self.message, self.loc, None, self.notes)

    def __str__(self) -> str:
        return self.format()


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn(warning: SoapWarning) -> None:
    """Issue ``warning`` as coming from the first caller outside soapdsl (the user's line)."""
    level = 2  # warn's caller
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(warning, stacklevel=level)


def _format(kind: str, message: str, loc: Loc | None, source: str | None, notes: Iterable[str]) -> str:
    head = f"{kind}: {message}"
    if loc is not None:
        head = f"{loc}: {head}"
    lines = [head]
    if loc is not None:
        source = source or loc.text or SOURCES.get(loc.file)
        if source is not None:
            lines.extend(_caret(loc, source))
    lines.extend(f"  note: {n}" for n in notes)
    return "\n".join(lines)


def span_text(loc: Loc) -> str | None:
    """The source text a one-line span covers, or None where the source is not known."""
    source = loc.text or SOURCES.get(loc.file)
    if source is None or loc.end_line != loc.line:
        return None
    lines = source.split("\n")
    if not 1 <= loc.line <= len(lines):
        return None
    return lines[loc.line - 1][loc.col - 1 : loc.end_col - 1]


#: how a source line's characters that are not printable are shown: a form feed or vertical tab
#: as the space it is to the lexer, any other control character as its picture (ESC as U+241B),
#: never as itself: an escape sequence would drive the terminal that shows the error, and a
#: character that takes no column would put the caret right of its text
_SHOWN = str.maketrans(
    {
        **{chr(c): chr(0x2400 + c) for c in range(0x20) if chr(c) not in "\t\n"},
        "\x7f": "\u2421",
        **{chr(c): "\ufffd" for c in range(0x80, 0xA0)},
        "\f": " ",
        "\v": " ",
    }
)


#: a source line longer than this is shown in part: the span and _CONTEXT characters before it
_LONG_LINE = 160
_CONTEXT = 40


def _caret(loc: Loc, source: str) -> list[str]:
    # lines as the lexer counts them: at "\n" only (str.splitlines also breaks at a form feed,
    # \x1c-\x1e, \x85, \u2028...), each character shown as _SHOWN says
    text_lines = source.split("\n")
    if text_lines[-1] == "":  # nothing after the last newline: no line to show (end of input)
        text_lines.pop()
    if not 1 <= loc.line <= len(text_lines):
        return []
    line = text_lines[loc.line - 1].removesuffix("\r").translate(_SHOWN).expandtabs(1)
    width = 1
    if loc.end_line == loc.line and loc.end_col > loc.col:
        width = loc.end_col - loc.col
    width = max(1, min(width, len(line) - loc.col + 1))
    start = loc.col - 1  # where the span starts in line
    if len(line) > _LONG_LINE:  # a line of 5000 digits: its part around the span, marked cut
        lo = max(0, start - _CONTEXT)
        hi = min(len(line), max(start + min(width, _LONG_LINE - _CONTEXT), lo + _LONG_LINE))
        width = min(width, hi - start)
        line = ("..." if lo else "") + line[lo:hi] + ("..." if hi < len(line) else "")
        start += (3 if lo else 0) - lo
    # pad and underline by display width, so that the caret stays under its text after CJK
    # characters (two columns each) or combining accents (none)
    before = _display_width(line[:start])
    under = max(1, _display_width(line[start : start + width]))
    gutter = f"{loc.line:>5} | "
    return [gutter + line, " " * (len(gutter) - 2) + "| " + " " * before + "^" * under]


def _display_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide East Asian characters 2; marks, whatever their
    combining class (Thai vowel signs are of class 0), and format characters such as a zero-width
    space or joiner 0; a soft hyphen, which terminals show, 1."""
    if text.isascii():
        return len(text)
    return sum(_char_width(ch) for ch in text)


def _char_width(ch: str) -> int:
    if ch != "\u00ad" and (unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf")):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class SoapSyntaxError(SoapError):
    """The text is not valid soapdsl."""

    kind = "syntax error"


class SoapNameError(SoapError):
    """A name (operator, macro, recipe, parameter) does not resolve."""


class SoapArgumentError(SoapError):
    """An argument has the wrong type, is out of range, missing, or repeated."""


class SoapRouteError(SoapError):
    """A route selector is malformed, duplicated, unreachable, or leaves a parameter unrouted."""


class SoapShapeError(SoapError):
    """A stage cannot handle the shape of a parameter routed to it."""


class SoapConfigError(SoapError):
    """A YAML or dict configuration is malformed."""


class SoapStateError(SoapError):
    """A state dict does not belong to this optimizer."""


class SoapRecipeError(SoapError):
    """A recipe is structurally wrong (no update applied, `lr` twice, a scope misused)."""


def decimal_comma(reading: str) -> str:
    """What every message about a likely decimal comma says: ``reading`` is the value meant."""
    return f"a decimal comma? the decimal point is '.': {reading}"


def decimal_comma_hint(text: str, name: str = "") -> str:
    """``"; a decimal comma? ..."`` for a value written like ``0,9`` (of ``name``), or ""."""
    m = re.fullmatch(r"\s*([+-]?[0-9]+),([0-9]+)\s*", text)
    return f"; {decimal_comma(f'{name}=' * bool(name) + f'{m[1]}.{m[2]}')}" if m else ""


#: the reference implementations' keyword names (SOAP, SOAP-Muon, torch's optimizers) whose
#: soapdsl name is not the closest spelling (difflib answers precondition_frequency with
#: precondition_1d)
REFERENCE_NAMES = {
    "precondition_frequency": "freq",
    "max_precond_dim": "max_dim",
    "newton_schulz_steps": "ns_steps",
    "adjust_lr_fn": "adjust_lr",
}

#: torch's implementation switches, which soapdsl decides per route
KERNEL_SWITCHES = frozenset({"foreach", "fused"})


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest candidate, or ""."""
    names = set(candidates)
    known = REFERENCE_NAMES.get(name)
    if known in names:
        return f"; did you mean '{known}'? (the reference's {name})"
    if name in KERNEL_SWITCHES and "lr" in names:  # a recipe's parameters
        return (
            "; soapdsl picks the kernel per route itself: torch's fused AdamW where a route is plain"
            " AdamW, batched by shape elsewhere (soapdsl compile shows which)"
        )
    if name == "betas":
        # torch's spelling, which difflib would answer with beta2 alone; muon's Adam routes
        # spell theirs adam_beta1 and adam_beta2
        sets = []
        for prefix in sorted({n[: -len("beta1")] for n in names if n.endswith("beta1")}, key=len):
            betas = [f"{prefix}beta{i}" for i in range(1, 10) if f"{prefix}beta{i}" in names]
            if len(betas) > 1:
                sets.append(betas)
        if sets:
            first = sets[0]
            written = ", or ".join(", ".join(b[:-1]) + " and " + b[-1] for b in sets)
            return f"; write {written} (torch's betas=({', '.join(first)}) is {len(first)} parameters here)"
    match = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.65)
    return f"; did you mean '{match[0]}'?" if match else ""


# Tracebacks print ``soapdsl.SoapNameError``, the name users import and catch, not the module
# that happens to define it (pickling still finds the class there).
for _cls in (
    SoapError,
    SoapSyntaxError,
    SoapNameError,
    SoapArgumentError,
    SoapRouteError,
    SoapShapeError,
    SoapConfigError,
    SoapStateError,
    SoapRecipeError,
    SoapWarning,
):
    _cls.__module__ = "soapdsl"
del _cls
