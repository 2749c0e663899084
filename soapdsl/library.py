"""Shipped recipes and the prelude of macros, and resolution of a recipe argument.

A recipe argument is a shipped name (``"soap"``), a path to a ``.soap`` file, or inline text
(a recipe definition, or a bare pipeline such as ``"sign |> lr"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from soapdsl import ir, registry
from soapdsl.check import MacroTable, check_macro, check_recipe
from soapdsl.errors import SoapError, SoapNameError, did_you_mean
from soapdsl.resources import recipe_files
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import parse, parse_file

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Library:
    recipes: Mapping[str, A.Recipe]
    macros: MacroTable


@cache
def library() -> Library:
    """Every shipped recipe and macro (parsed once per process)."""
    recipes: dict[str, A.Recipe] = {}
    macros = MacroTable()
    modules = [parse_file(p, f"recipes/{p.name}") for p in recipe_files()]
    for m in modules:
        for r in m.recipes:
            if r.name in recipes:
                raise SoapNameError(f"shipped recipe '{r.name}' is defined twice", r.loc)
            recipes[r.name] = r
        macros = macros.with_module(A.Module(m.macros, None, m.file))
    return Library(recipes, macros)


def shipped_names() -> list[str]:
    return sorted(library().recipes)


@cache
def shipped(name: str) -> ir.Recipe:
    lib = library()
    return check_recipe(lib.recipes[name], lib.macros)


def check_module(module: A.Module) -> tuple[list[ir.Recipe], MacroTable]:
    """Check every definition of a module against the prelude (what `soapdsl check` does)."""
    macros = library().macros.with_module(module)
    for m in module.macros:
        check_macro(m, macros)
    seen: dict[str, A.Recipe] = {}
    out = []
    for r in module.recipes:
        if r.name in seen:
            raise SoapNameError(f"recipe '{r.name}' is defined twice (first at line {seen[r.name].loc.line})", r.loc)
        seen[r.name] = r
        out.append(check_recipe(r, macros))
    return out, macros


def inline_recipe(pipeline: A.Pipeline, macros: MacroTable, params: Mapping[str, Any], file: str) -> ir.Recipe:
    """A bare pipeline as a recipe with one default route; its parameters are the args given."""
    header = {"lr": 1e-3, **params}
    route = A.Route(A.SelName("default", pipeline.loc), (), pipeline, pipeline.loc)
    recipe = A.Recipe("inline", (), (route,), "", True, pipeline.loc)
    return check_recipe(recipe, macros, extra_params=header)


def _pick(
    module: A.Module,
    recipes: list[ir.Recipe],
    macros: MacroTable,
    hint: str | None,
    params: Mapping[str, Any],
) -> ir.Recipe:
    if module.pipeline is not None and not recipes:
        return inline_recipe(module.pipeline, macros, params, module.file)
    if module.pipeline is not None:
        raise SoapError(
            "a source that defines recipes cannot also end in a bare pipeline",
            module.pipeline.loc,
        )
    if not recipes:
        raise SoapNameError(f"{module.file} defines no recipe and no pipeline")
    if len(recipes) == 1:
        return recipes[0]
    names = [r.name for r in recipes]
    if hint in names:
        return recipes[names.index(hint)]
    raise SoapNameError(
        f"{module.file} defines several recipes ({', '.join(names)}); name one as '{module.file}::NAME'"
    )


def resolve(spec: str | Path, params: Mapping[str, Any] | None = None) -> ir.Recipe:
    """Resolve a recipe argument (shipped name, ``.soap`` path, or inline text) to checked IR.

    ``params`` are the user's arguments; for an inline pipeline they declare its parameters.
    """
    params = dict(params or {})
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        raise SoapError(f"a recipe is a name, a path or recipe text, got {type(spec).__name__}")
    text = spec.strip()
    if _IDENT.match(text):
        if text in library().recipes:
            return shipped(text)
        if registry.get(text) is None and text not in library().macros.macros:
            raise SoapNameError(
                f"unknown recipe '{text}'"
                + did_you_mean(text, library().recipes)
                + f" (shipped: {', '.join(shipped_names())})"
            )
    path_part, _, hint = text.partition("::")
    if "\n" not in text and (path_part.endswith(".soap") or os.path.isfile(path_part)):
        module = parse_file(path_part)
        recipes, macros = check_module(module)
        return _pick(module, recipes, macros, hint or Path(path_part).stem, params)
    module = parse(spec, "<inline>")
    recipes, macros = check_module(module)
    return _pick(module, recipes, macros, None, params)
