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
from soapdsl.check import MacroTable, argument_value, check_macro, check_recipe
from soapdsl.errors import SoapError, SoapNameError, SoapSyntaxError, did_you_mean
from soapdsl.resources import recipe_files
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import BOM, MISSING_PIPE, parse, parse_file

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# text that reads as a file path (no spaces, brackets or operators)
_PATHLIKE = re.compile(r"^[\w.~/\\:-]+$")


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
    """Check every definition (macro and recipe) of a module against the prelude; a bare
    pipeline is left to the caller, who knows its arguments (``check_source`` checks it too)."""
    macros = library().macros.with_module(module)
    for m in module.macros:
        check_macro(m, macros)
    seen: dict[str, A.Recipe] = {}
    out = []
    for r in module.recipes:
        if r.name in seen:
            raise SoapNameError(f"recipe '{r.name}' is defined twice (first at {seen[r.name].loc})", r.loc)
        seen[r.name] = r
        out.append(check_recipe(r, macros))
    return out, macros


def check_source(module: A.Module) -> tuple[list[ir.Recipe], MacroTable]:
    """Check a whole source as ``soapdsl check`` and ``soapdsl fmt`` do: its macros and recipes,
    and a bare pipeline, as an inline recipe given no arguments; a source that defines recipes
    cannot also end in one. Returns the checked recipes and the macros the source sees."""
    recipes, macros = check_module(module)
    if module.pipeline is not None:
        if recipes:
            raise _pipeline_after_recipes(module.pipeline)
        inline_recipe(module.pipeline, macros, {})
    return recipes, macros


def _pipeline_after_recipes(pipeline: A.Pipeline) -> SoapSyntaxError:
    loc = pipeline.loc
    # a bare pipeline normally starts a line; one that starts mid-line is a missing '|>'
    # (`recipe r(lr=1) = sign sign` reads as the recipe `sign`, then the pipeline `sign`)
    notes = () if loc is None or loc.col == 1 else (MISSING_PIPE,)
    return SoapSyntaxError("a source that defines recipes cannot also end in a bare pipeline", loc, notes=notes)


def inline_recipe(pipeline: A.Pipeline, macros: MacroTable, params: Mapping[str, Any]) -> ir.Recipe:
    """A bare pipeline as a recipe with one default route; its parameters are the args given."""
    # as a named recipe's arguments are read (compiler.bind_args), before the check sees them
    header = {"lr": 1e-3, **{k: argument_value("inline", k, v) for k, v in params.items()}}
    route = A.Route(A.SelName("default", pipeline.loc), (), pipeline, pipeline.loc)
    recipe = A.Recipe("inline", (), (route,), "", True, pipeline.loc)
    out = check_recipe(recipe, macros, extra_params=header)
    read = out.routes[0].pipeline.refs()
    unread = [k for k in params if k != "lr" and k not in read]
    if unread:
        # a stage's argument does not default to a parameter of its name: `decay` with
        # weight_decay=0.5 given would decay by its own 0.01, and nothing would say so
        raise SoapNameError(
            f"no stage of the inline pipeline reads '{unread[0]}' ({unread[0]}="
            f"{ir.const_text(params[unread[0]])} is given): a stage's argument does not take a parameter"
            " of its name by itself; name the parameter where a stage should read it"
            + _reader_hint(unread[0], out.routes[0].pipeline),
            pipeline.loc,
            notes=[f"no stage reads '{k}' either" for k in unread[1:]],
        )
    return out


def _reader_hint(name: str, pipeline: ir.Pipeline) -> str:
    """``, as in decay(weight_decay=weight_decay)`` for a stage with an argument called ``name``."""
    for _, stage in pipeline.walk():
        op = registry.get(stage.op)
        if op is not None and name in op.Args.model_fields:
            return f", as in {stage.op}({name}={name})"
    return ""


def _pick(
    module: A.Module,
    recipes: list[ir.Recipe],
    macros: MacroTable,
    name: str | None,
    params: Mapping[str, Any],
    default: str | None = None,
    text: bool = False,
) -> ir.Recipe:
    """The recipe a source stands for (``text``: recipe text, not a file).

    ``name`` is the one the user asked for (``file.soap::NAME``): it must be defined, even
    when the file holds a single recipe. Without it a single recipe (or a bare pipeline) is
    taken, and of several the one called ``default`` (a file's stem), if any.
    """
    names = [r.name for r in recipes]
    if name:
        if name in names:
            return recipes[names.index(name)]
        if not names:
            what = "a bare pipeline" if module.pipeline is not None else "no recipe"
            raise SoapNameError(f"no recipe '{name}' in {module.file} (it holds {what}, not named recipes)")
        raise SoapNameError(
            f"no recipe '{name}' in {module.file}" + did_you_mean(name, names) + f" (recipes: {', '.join(names)})"
        )
    if module.pipeline is not None and not recipes:
        return inline_recipe(module.pipeline, macros, params)
    if module.pipeline is not None:
        raise _pipeline_after_recipes(module.pipeline)
    if not recipes:
        raise SoapNameError(f"{module.file} defines no recipe and no pipeline")
    if len(recipes) == 1:
        return recipes[0]
    if default in names:
        return recipes[names.index(default)]
    if text:  # no path to put '::NAME' after
        raise SoapNameError(
            f"{module.file} defines several recipes ({', '.join(names)}); recipe text stands for one:"
            " keep one, or save them in a .soap file and name one as 'FILE.soap::NAME'"
        )
    raise SoapNameError(
        f"{module.file} defines several recipes ({', '.join(names)}); name one as '{module.file}::NAME'"
    )


def _unknown_recipe(name: str) -> SoapNameError:
    return SoapNameError(
        f"unknown recipe '{name}'"
        + (
            f"; recipe names are lower case: '{name.lower()}'"
            if name.lower() in library().recipes
            else did_you_mean(name.lower(), library().recipes)
        )
        + f" (shipped: {', '.join(shipped_names())})"
    )


def resolve(spec: str | Path, params: Mapping[str, Any] | None = None, file: str = "<inline>") -> ir.Recipe:
    """Resolve a recipe argument (shipped name, ``.soap`` path, or inline text) to checked IR.

    ``params`` are the user's arguments; for an inline pipeline they declare its parameters.
    ``file`` is the name errors in inline text point into.
    """
    params = dict(params or {})
    if isinstance(spec, Path):
        return _from_file(str(spec), params)
    if not isinstance(spec, str):
        import torch

        swapped = isinstance(spec, torch.nn.Module | torch.Tensor)  # build(model, "adamw")
        raise SoapError(
            f"a recipe is a name, a path or recipe text, got {type(spec).__name__}"
            + ("; the recipe comes first: soapdsl.build(recipe, model, ...)" if swapped else "")
        )
    spec = spec.removeprefix(BOM)  # text read from a file that an editor began with one
    text = spec.strip()
    if _IDENT.match(text):
        if text in library().recipes:
            return shipped(text)
        if registry.get(text) is None and text not in library().macros.macros:
            raise _unknown_recipe(text)
    if "\n" in text:
        return from_text(spec, params, file)
    path_part, sep, name = text.partition("::")
    if path_part.endswith(".soap") or names_a_file(path_part):
        return _from_file(text, params)
    if os.path.isdir(path_part) and not _IDENT.match(path_part):
        raise SoapNameError(f"{path_part!r} is a directory, not a recipe file")
    if sep and _IDENT.match(path_part):
        # 'adamw::adamw': a shipped recipe comes from a file of its own, holding just it
        if path_part not in library().recipes:
            raise _unknown_recipe(path_part)
        if not name.strip():
            raise _no_name_after(text, [], f"shipped '{path_part}'", f"only '{path_part}'")
        if name.strip() != path_part:
            raise SoapNameError(
                f"no recipe '{name.strip()}' in shipped '{path_part}' (its file holds only '{path_part}')"
            )
        return shipped(path_part)
    try:
        return from_text(spec, params, file)
    except SoapSyntaxError as e:
        if _PATHLIKE.match(text) and ("/" in text or "." in text):
            # `my_recipe.sop`, `recipes/muon`: a mistyped path was read as recipe text
            e.notes = (*e.notes, f"no file {path_part!r} exists, so it was read as recipe text")
            e.args = (e.format(),)
        raise


def names_a_file(path: str) -> bool:
    """Whether ``path`` names something to read a recipe from: a file, or a pipe, which is no
    regular file (``soapdsl compile <(gen)``, /dev/stdin)."""
    return os.path.exists(path) and not os.path.isdir(path)


def _from_file(text: str, params: Mapping[str, Any]) -> ir.Recipe:
    """``path.soap`` or ``path.soap::NAME``."""
    path_part, sep, name = text.partition("::")
    module = parse_file(path_part)
    recipes, macros = check_module(module)
    if sep and (not name.strip() or name.startswith(":")):  # 'f.soap:::lr=1' in a race: '::' then ':lr=1'
        what = "a bare pipeline, not named recipes" if module.pipeline is not None and not recipes else ""
        raise _no_name_after(text, [r.name for r in recipes], path_part, what)
    return _pick(module, recipes, macros, name.strip() or None, params, default=Path(path_part).stem)


def _no_name_after(text: str, names: list[str], where: str, holds: str = "") -> SoapNameError:
    """``file.soap::`` names no recipe: refused, not read as the file's default recipe."""
    path = text.partition("::")[0].strip()
    if holds or not names:
        fix = f"{where} holds {holds or 'no recipe'}: write '{path}'"
    elif len(names) == 1:
        fix = f"{where} defines only {names[0]}: write '{path}::{names[0]}' or '{path}'"
    else:
        fix = f"{where} defines {', '.join(names)}: write '{path}::{names[0]}'"
    return SoapNameError(f"'{text.strip()}' names no recipe after '::' ({fix})")


def from_text(spec: str, params: Mapping[str, Any] | None = None, file: str = "<inline>") -> ir.Recipe:
    """Recipe text (one recipe, or a bare pipeline), never a name or a path, to checked IR:
    ``soapdsl compile -``. ``params`` and ``file`` are as for ``resolve``."""
    module = parse(spec, file)
    recipes, macros = check_module(module)
    return _pick(module, recipes, macros, None, dict(params or {}), text=True)
