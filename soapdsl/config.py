"""YAML / dict front end: an optimizer from a training config.

Schema (the top level may also be a whole training config with an ``optimizer:`` key)::

    recipe: soap_muon            # shipped name, path to a .soap file, or inline text
    args: {lr: 0.02, freq: 40}   # the recipe's header parameters
    routes:                      # optional overrides, tried before the recipe's own routes
      - match: "embed*"          # glob(s) on parameter names ...
        where: "matrix"          # ... and/or a selector expression (both must hold)
        recipe: adamw            # what those parameters get
        args: {lr: 0.001}

Only ``yaml.safe_load`` semantics are used. Every error names the config file, line and
column of the offending key or value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from soapdsl import library
from soapdsl.check import check_selector
from soapdsl.compiler import bind_args, compile_plan
from soapdsl.errors import SOURCES, Loc, SoapConfigError, SoapError, SoapNameError, did_you_mean
from soapdsl.ir import Ref
from soapdsl.runtime.optimizer import SoapOptimizer
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import parse

Scalar = bool | int | float | str


class RouteOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str | list[str] | None = None
    where: str | None = None
    recipe: str
    args: dict[str, Scalar | list[Scalar]] = {}

    @field_validator("match")
    @classmethod
    def _nonempty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and (v == "" or v == []):
            raise ValueError("match needs at least one pattern")
        return v


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str
    args: dict[str, Scalar | list[Scalar]] = {}
    routes: list[RouteOverride] = []


def _marks(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], yaml.Mark]) -> None:
    out[path] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[(*path, key, "__key__")] = k.start_mark
            _marks(v, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _marks(v, (*path, i), out)


def load(cfg: Any) -> tuple[OptimizerConfig, str, dict[tuple[Any, ...], yaml.Mark], tuple[Any, ...]]:
    """Parse a config (dict, YAML text or path) into the validated schema."""
    file = "<config>"
    marks: dict[tuple[Any, ...], yaml.Mark] = {}
    if isinstance(cfg, Path) or (isinstance(cfg, str) and "\n" not in cfg and cfg.endswith((".yaml", ".yml"))):
        path = Path(cfg)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SoapConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        file = str(path)
        cfg = text
    if isinstance(cfg, str):
        SOURCES[file] = cfg
        try:
            node = yaml.compose(cfg, Loader=yaml.SafeLoader)
            data = yaml.safe_load(cfg)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            loc = Loc(file, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2) if mark else None
            raise SoapConfigError(f"invalid YAML: {problem}", loc) from None
        if node is not None:
            _marks(node, (), marks)
    else:
        data = cfg
    prefix: tuple[Any, ...] = ()
    if isinstance(data, Mapping) and "optimizer" in data and "recipe" not in data:
        data = data["optimizer"]
        prefix = ("optimizer",)
    if not isinstance(data, Mapping):
        raise SoapConfigError(
            f"an optimizer config is a mapping with a 'recipe' key, got {type(data).__name__}",
            _loc(file, marks, prefix),
        )
    try:
        parsed = OptimizerConfig.model_validate(dict(data))
    except ValidationError as e:
        err = e.errors()[0]
        where = tuple(err["loc"])
        dotted = ".".join(str(p) for p in (*prefix, *where)) or "config"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {', '.join(_allowed(where))})"
        elif err["type"] == "missing":
            msg = "is required"
        elif "args" in where:
            dotted = ".".join(str(p) for p in (*prefix, *where[: where.index("args") + 2]))
            msg = "must be a number, a boolean, a name, or a list of them"
            where = where[: where.index("args") + 2]
        loc = _loc(file, marks, (*prefix, *where)) or _loc(file, marks, (*prefix, *where[:-1]))
        raise SoapConfigError(f"{dotted}: {msg}", loc) from None
    return parsed, file, marks, prefix


def _allowed(where: tuple[Any, ...]) -> list[str]:
    model = RouteOverride if "routes" in where else OptimizerConfig
    return list(model.model_fields)


def _loc(file: str, marks: Mapping[tuple[Any, ...], yaml.Mark], path: tuple[Any, ...]) -> Loc | None:
    mark = marks.get((*path, "__key__")) or marks.get(path)
    if mark is None:
        return None
    return Loc(file, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2, SOURCES.get(file))


def _args(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


_WHERE_PREFIX = "recipe _(lr=1):\n  route "


def _selector(
    override: RouteOverride, index: int, file: str, marks: Mapping[tuple[Any, ...], yaml.Mark], path: tuple[Any, ...]
) -> A.Selector:
    parts: list[A.Selector] = []
    if override.match is not None:
        globs = [override.match] if isinstance(override.match, str) else override.match
        parts.append(A.SelOr(tuple(A.SelPattern(g) for g in globs)) if len(globs) > 1 else A.SelPattern(globs[0]))
    if override.where is not None:
        name = f"{file}:routes[{index}].where"
        try:
            module = parse(f"{_WHERE_PREFIX}{override.where}: lr\n", name)
            selector = module.recipes[0].routes[0].selector
            check_selector(selector, {"lr": 1}, {"lr": Ref("lr")})
        except SoapError as e:
            raise _in_yaml(e, file, marks, (*path, "where"), override.where) from None
        parts.append(selector)
    if not parts:
        raise SoapConfigError(
            f"routes[{index}] needs 'match' or 'where' to say which parameters it takes", _loc(file, marks, path)
        )
    return parts[0] if len(parts) == 1 else A.SelAnd(tuple(parts))


def _in_yaml(
    e: SoapError, file: str, marks: Mapping[tuple[Any, ...], yaml.Mark], path: tuple[Any, ...], text: str
) -> SoapError:
    """Move an error inside a `where:` selector to its place in the YAML file."""
    mark = marks.get(path)
    if e.loc is None or mark is None or "\n" in text:
        return e
    offset = e.loc.col - (len("  route ") + 1)
    if e.loc.line != 2 or not 0 <= offset <= len(text):
        offset = 0
    source = SOURCES.get(file) or ""
    quoted = 0 <= mark.index < len(source) and source[mark.index] in "'\""
    col = mark.column + 1 + offset + (1 if quoted else 0)
    width = max(1, e.loc.end_col - e.loc.col) if e.loc.end_line == e.loc.line else 1
    e.loc = Loc(file, mark.line + 1, col, mark.line + 1, col + width, SOURCES.get(file))
    e.args = (e.format(),)
    return e


def _check_args(recipe: Any, args: Mapping[str, Any], file: str, marks: Any, path: tuple[Any, ...]) -> None:
    known = recipe.defaults()
    for k, v in args.items():
        if k not in known:
            raise SoapNameError(
                f"recipe '{recipe.name}' has no parameter '{k}'"
                + did_you_mean(k, known)
                + f" (parameters: {', '.join(known)})",
                _loc(file, marks, (*path, k)),
            )
        try:
            bind_args(recipe, {k: v})
        except SoapError as e:
            raise e.at(_loc(file, marks, (*path, k))) from None


def build_from_config(model: Any, cfg: Any) -> SoapOptimizer:
    parsed, file, marks, prefix = load(cfg)
    try:
        args = _args(parsed.args)
        main = library.resolve(parsed.recipe, args)
        _check_args(main, args, file, marks, (*prefix, "args"))
        overrides = []
        for i, o in enumerate(parsed.routes):
            sub_args = _args(o.args)
            sub = library.resolve(o.recipe, sub_args)
            _check_args(sub, sub_args, file, marks, (*prefix, "routes", i, "args"))
            selector = _selector(o, i, file, marks, (*prefix, "routes", i))
            values = {**sub.defaults(), **sub_args}
            check_selector(selector, values, {k: Ref(k) for k in values})
            overrides.append((selector, sub, sub_args))
        plan = compile_plan(main, model, args, overrides)
    except SoapError as e:
        if e.loc is None:
            e.at(_loc(file, marks, (*prefix, "recipe")))
        elif e.loc.file != file:
            e.notes = (*e.notes, f"from the optimizer config {file}")
            e.args = (e.format(),)
        raise
    return SoapOptimizer(plan)
