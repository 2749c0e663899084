"""Recipe specs of the race: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``.

``NAME`` is what :func:`soapdsl.build` accepts (a shipped name, a ``.soap`` path, optionally
``path.soap::RECIPE``, or inline pipeline text); the overrides after the first single ``:``
set the recipe's header parameters. Values are soapdsl literals, parsed as ``soapdsl compile
--set`` parses them: numbers (``0.01``, ``3e-4``, ``-1``), ``true``/``false``, names
(``original``), quoted strings and tuples (``(0.9, 0.95)``; commas inside parentheses do not
split). Examples::

    soap:freq=20,lr=0.01
    muon:adjust_lr=match_rms_adamw,lr=0.01
    my_recipes.soap::fast:lr=3e-3
    momentum(0.9) |> sign |> lr:lr=3e-4       # inline text: overrides after the last ':'
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soapdsl import ir, library
from soapdsl.check import literal
from soapdsl.errors import SoapArgumentError, decimal_comma_hint

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SOAP_PATH = re.compile(r"^[^\s:]+\.soap(::[A-Za-z_][A-Za-z0-9_]*)?$")
_KEY_EQ = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
STDIN_FILE = "<stdin>"


@dataclass
class RecipeSpec:
    """One recipe of a race, as the user wrote it, with its overrides and a unique label."""

    text: str  # the spec as written
    recipe: str  # what library.resolve() takes
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    #: where recipe text came from: ``<stdin>`` (``soapdsl race -``) is always text, never a
    #: name or a path, and its errors point there
    file: str = "<inline>"

    @property
    def base(self) -> str:
        """A short name for the recipe: the shipped name, the file stem, or the recipe's name."""
        text = self.recipe.strip()
        if self.file == STDIN_FILE:  # a recipe's own name, else where the pipeline came from
            try:
                name = self.resolve().name
            except Exception:
                name = "inline"
            return "stdin" if name == "inline" else name
        if _IDENT.match(text):
            return text
        path, _, hint = text.partition("::")
        if "\n" not in text and (path.endswith(".soap") or library.names_a_file(path)):
            return hint or Path(path).stem
        try:
            name = library.resolve(text, self.overrides).name
        except Exception:
            name = "inline"
        return name

    def resolve(self) -> ir.Recipe:
        if self.file == STDIN_FILE:
            return library.from_text(self.recipe, self.overrides, self.file)
        return library.resolve(self.recipe, self.overrides)

    def with_text(self, text: str, file: str) -> RecipeSpec:
        """This spec with its recipe replaced by text read elsewhere (``-``: standard input)."""
        return RecipeSpec(self.text, text, dict(self.overrides), self.label, file)


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside parentheses, brackets and quotes."""
    out: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_value(key: str, text: str, where: str) -> Any:
    """One soapdsl literal, as ``soapdsl compile --set`` reads it."""
    at = where.rfind(f"{key}={text}")
    col = at + len(key) + 2 if at >= 0 else 1
    return literal(text, f"<{where}>", where, col, f"recipe spec '{where}': {key}")


def parse_overrides(text: str, where: str) -> dict[str, Any]:
    """``k=v,k2=v2`` -> {k: v, k2: v2}; errors name the spec ``where``."""
    out: dict[str, Any] = {}
    if not text.strip():
        raise SoapArgumentError(f"recipe spec '{where}': nothing after ':'; expected KEY=VALUE[,KEY=VALUE...]")
    previous = ("", "")  # the key and value before this item
    for item in _split_top(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not value.strip():
            # 'soap:beta=0,95' splits into beta=0 and '95'
            hint = decimal_comma_hint(f"{previous[1]},{item}", previous[0]) if not sep else ""
            raise SoapArgumentError(
                f"recipe spec '{where}': expected KEY=VALUE, got {item.strip()!r}"
                " (the syntax is NAME[:KEY=VALUE[,KEY=VALUE...]], e.g. soap:freq=20,lr=0.01)" + hint
            )
        parts = _split_top(value, ":")
        if len(parts) > 1 and all(_KEY_EQ.match(part) for part in parts[1:]):
            # 'soap_soap:permute1=all:permute2=all': the value would read as 'all:permute2=all'
            fixed = text.replace(":", ",") if len(_single_colons(text)) == len(parts) - 1 else None
            raise SoapArgumentError(
                f"recipe spec '{where}': overrides are separated by ',', not ':'"
                + (f" (write {where[: len(where) - len(text)]}{fixed})" if fixed else "")
            )
        previous = (key, value.strip())
        if key in out:
            raise SoapArgumentError(f"recipe spec '{where}': {key} is set twice")
        out[key] = parse_value(key, value, where)
    return out


def _single_colons(text: str) -> list[int]:
    """Indices of ':' that are not part of '::'."""
    out = []
    for i, ch in enumerate(text):
        if ch == ":" and text[i - 1 : i] != ":" and text[i + 1 : i + 2] != ":":
            out.append(i)
    return out


def _looks_like_name(head: str) -> bool:
    return bool(_IDENT.match(head) or _SOAP_PATH.match(head) or ("\n" not in head and library.names_a_file(head)))


def parse_spec(text: str) -> RecipeSpec:
    """Split ``NAME[:KEY=VALUE,...]`` into the recipe and its overrides.

    When what precedes the first single ':' is a name or a ``.soap`` path, the rest must be
    overrides (so ``soap:freq20`` is an error, not inline text). Inline text (which may itself
    contain ':') takes overrides after its last single ':' when that tail reads as KEY=VALUE.
    """
    if not isinstance(text, str) or not text.strip():
        raise SoapArgumentError(f"a race recipe is a name, a .soap path or pipeline text, got {text!r}")
    colons = [] if "\n" in text else _single_colons(text)
    if not colons:
        return RecipeSpec(text, text)
    first = colons[0]
    head = text[:first].strip()
    if _looks_like_name(head):
        return RecipeSpec(text, head, parse_overrides(text[first + 1 :], text))
    last = colons[-1]
    tail = text[last + 1 :]
    if _KEY_EQ.match(tail) and text[:last].strip():
        try:
            return RecipeSpec(text, text[:last].strip(), parse_overrides(tail, text))
        except SoapArgumentError:
            pass  # not overrides after all: the whole text is the recipe
    return RecipeSpec(text, text)


def _override_text(overrides: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={ir.const_text(v)}" for k, v in overrides.items())


def parse_specs(texts: Iterable[str | RecipeSpec]) -> list[RecipeSpec]:
    """Parse every spec and give each a unique label.

    A label is the recipe's name, followed by its overrides when it has any (``soap``,
    ``soap:freq=20``), so that the table, the plot's legend and race.json each say what ran;
    ``#2`` tells apart two that would still share one (``soap.soap`` and ``soap``). The same
    spec twice is an error.
    """
    specs = [t if isinstance(t, RecipeSpec) else parse_spec(t) for t in texts]
    if not specs:
        raise SoapArgumentError("the race needs at least one recipe")
    seen: dict[tuple[str, str, str], str] = {}
    for s in specs:
        key = (s.file, s.recipe.strip(), repr(sorted(s.overrides.items())))
        if key in seen:
            raise SoapArgumentError(f"recipe '{s.text}' is given twice (as '{seen[key]}')")
        seen[key] = s.text
    labels: list[str] = []
    for s in specs:
        if s.label:
            label = s.label
        elif s.overrides:
            label = f"{s.base}:{_override_text(s.overrides)}"
        else:
            label = s.base
        n, candidate = 2, label
        while candidate in labels:
            candidate = f"{label}#{n}"
            n += 1
        labels.append(candidate)
        s.label = candidate
    return specs


def lr_params(recipe: ir.Recipe, overrides: Mapping[str, Any]) -> dict[str, float]:
    """The recipe's learning-rate parameters (``lr`` and every ``*_lr``) with their values."""
    values = {**recipe.defaults(), **overrides}
    return {
        k: float(v)
        for k, v in values.items()
        if (k == "lr" or k.endswith("_lr")) and isinstance(v, int | float) and not isinstance(v, bool)
    }


def scaled_lrs(recipe: ir.Recipe, overrides: Mapping[str, Any], multiplier: float, label: str = "") -> dict[str, Any]:
    """Overrides with every learning-rate parameter multiplied by ``multiplier``; ``label``
    names the recipe in the error for a product past the largest float."""
    out = dict(overrides)
    if multiplier != 1:
        for k, v in lr_params(recipe, overrides).items():
            out[k] = v * multiplier
            if math.isinf(out[k]):  # the compiler's error would name lr=inf, which nobody gave
                raise SoapArgumentError(
                    f"--lr-grid multiplier x{multiplier:g} takes {label or recipe.name}'s {k}={v:g} past the"
                    " largest float"
                )
    return out


def parse_grid(text: str | Sequence[float] | None) -> list[float] | None:
    """``"0.5,1,2"`` -> [0.5, 1.0, 2.0] (learning-rate multipliers)."""
    if text is None:
        return None
    items: Sequence[Any] = text
    if isinstance(text, str):
        items = text.split(",") if text.strip() else []
    out: list[float] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            where = "a comma at an end" if i in (0, len(items) - 1) else "two commas in a row"
            raise SoapArgumentError(
                f"--lr-grid {text!r} has an empty multiplier ({where}): write multipliers like 0.5,1,2"
            )
        try:
            m = float(item)
        except (TypeError, ValueError):
            raise SoapArgumentError(f"--lr-grid expects multipliers like 0.5,1,2, got {item!r}") from None
        if not m > 0 or m == float("inf"):
            raise SoapArgumentError(f"--lr-grid multipliers must be positive finite numbers, got {item!r}")
        if m in out:
            raise SoapArgumentError(f"--lr-grid lists {item!r} twice")
        out.append(m)
    if not out:
        raise SoapArgumentError("--lr-grid names no multiplier")
    return out
