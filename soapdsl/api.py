"""The Python API: parse, compile, build, from_config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soapdsl import library
from soapdsl.compiler import Plan, compile_plan
from soapdsl.runtime.optimizer import SoapOptimizer
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import parse as _parse


def parse(text: str, file: str = "<inline>") -> A.Module:
    """Parse recipe text into its AST (no name resolution)."""
    return _parse(text, file)


def compile(recipe: str | Path, params: Any, **args: Any) -> Plan:
    """Compile a recipe for ``params`` into a :class:`~soapdsl.compiler.Plan`.

    ``recipe`` is a shipped name (``"soap"``), a path to a ``.soap`` file, or inline text
    (``"momentum(0.9) |> sign |> lr"``). ``params`` is an ``nn.Module``, an iterable of
    ``(name, parameter)``, or an iterable of parameters. ``args`` set the recipe's header
    parameters; for an inline pipeline they declare them.
    """
    ir_recipe = library.resolve(recipe, args)
    return compile_plan(ir_recipe, params, args)


def build(recipe: str | Path, params: Any, **args: Any) -> SoapOptimizer:
    """Build the optimizer: ``soapdsl.build("adamw", model, lr=3e-4)``."""
    return SoapOptimizer(compile(recipe, params, **args))


def from_config(model: Any, cfg: Any) -> SoapOptimizer:
    """Build an optimizer from a config: a dict, YAML text, or a path to a YAML file.

    See :mod:`soapdsl.config` for the schema.
    """
    from soapdsl.config import build_from_config

    return build_from_config(model, cfg)
