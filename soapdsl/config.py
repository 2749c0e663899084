"""YAML / dict front end: an optimizer from a training config.

Schema (the top level may also be a whole training config with an ``optimizer:`` key)::

    recipe: soap_muon            # shipped name, path to a .soap file, or inline text
    args: {lr: 0.02, freq: 40}   # the recipe's header parameters
    routes:                      # optional overrides, tried before the recipe's own routes
      - match: "embed*"          # glob(s) on parameter names ...
        where: "matrix"          # ... and/or a selector expression (both must hold)
        recipe: adamw            # what those parameters get
        args: {lr: 0.001}
    distributed: false           # optional, as build()'s distributed=, torch_compile=, cuda_graphs=,
    torch_compile: false         # stochastic_round=
    cuda_graphs: false
    stochastic_round: false

Only ``yaml.safe_load`` semantics are used. Every error names the config file, line and
column of the offending key or value.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, field_validator

from soapdsl import ir, library
from soapdsl.check import check_selector, finite_problem, is_finite, reserved_param_problem
from soapdsl.compiler import bind_args, compile_plan, mark_routes
from soapdsl.errors import (
    SOURCES,
    Loc,
    SoapArgumentError,
    SoapConfigError,
    SoapError,
    SoapNameError,
    SoapSyntaxError,
    did_you_mean,
    line_col,
)
from soapdsl.ir import Ref
from soapdsl.runtime.optimizer import SoapOptimizer
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import decode_source, first_comment, int_digit_limit, parse, read_file, too_long
from soapdsl.syntax.printer import format_selector

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
        if isinstance(v, list) and "" in v:
            raise ValueError("match holds an empty pattern, which no parameter name matches")
        return v

    @field_validator("where")
    @classmethod
    def _a_selector(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError('where is empty; it holds a selector, such as "matrix and max_dim < 4096"')
        return v


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str
    args: dict[str, Scalar | list[Scalar]] = {}
    routes: list[RouteOverride] = []
    #: data-parallel training: split the matrix work across the ranks (build(distributed=True))
    distributed: StrictBool = False
    #: build(torch_compile=True): every route's pipeline through torch.compile
    torch_compile: StrictBool = False
    #: build(cuda_graphs=True): Newton-Schulz iterations replayed from CUDA graphs on CUDA
    cuda_graphs: StrictBool = False
    #: build(stochastic_round=True): bfloat16 and float16 parameters' writes rounded stochastically
    stochastic_round: StrictBool = False


#: a duplicate key: the path of the key, where its second occurrence is, the line of its first
Duplicate = tuple[tuple[Any, ...], yaml.Mark, int]

#: what each schema field must be, for type errors (pydantic's own wording names Python types)
_FIELD_TYPES = {
    "recipe": "must be a string: a shipped recipe name, a path to a .soap file, or recipe text",
    "args": "must be a mapping of recipe parameters to values, such as {lr: 0.01}",
    "routes": "must be a list of route overrides, each a mapping with 'recipe' and 'match' or 'where'",
    "route": "must be a mapping with 'recipe' and 'match' or 'where'",
    "match": 'must be a name pattern such as "embed*", or a list of them',
    "where": 'must be a string holding a selector, such as "matrix and max_dim < 4096"',
    "arg": "must be a number, a boolean, a name, or a list of them",
    "key": "must be a name (a string)",
    "distributed": "must be true or false: true splits the matrix work across the ranks of a data-parallel run",
    "torch_compile": "must be true or false: true runs every route's pipeline through torch.compile",
    "cuda_graphs": "must be true or false: true replays Newton-Schulz iterations from CUDA graphs on CUDA",
    "stochastic_round": "must be true or false: true rounds writes into bfloat16 and float16 parameters stochastically",
}


_STR_TAG = "tag:yaml.org,2002:str"


#: a node's properties, an anchor (`&r`) and a tag (`!!str`), each with the space after it
_PROPERTIES = re.compile(r"(?:[&!][^\s,\[\]{}]*\s*)+")


def _value_start(mark: yaml.Mark) -> yaml.Mark:
    """``mark``, a node's start, moved past the node's anchor and tag, which PyYAML counts as
    its start: where the value itself (a quote, a block's `|`) is written."""
    text, i = mark.buffer, mark.index
    m = _PROPERTIES.match(text, i) if isinstance(text, str) else None
    if m is None:
        return mark
    j = m.end()
    line = mark.line + text.count("\n", i, j)
    return yaml.Mark(mark.name, j, line, j - (text.rfind("\n", 0, j) + 1), text, j)


def _marks(
    node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], yaml.Mark], dups: list[Duplicate]
) -> None:
    out[path] = _value_start(node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        out[(*path, "__end__")] = node.end_mark
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, Any], int] = {}
        for k, v in node.value:
            key = k.value
            # PyYAML keeps the last of two equal keys; a config that sets lr twice is a mistake
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                if (k.tag, key) in first:
                    dups.append(((*path, key), k.start_mark, first[(k.tag, key)]))
                else:
                    first[(k.tag, key)] = k.start_mark.line + 1
            out[(*path, key, "__key__")] = k.start_mark
            if isinstance(k, yaml.ScalarNode) and k.tag != _STR_TAG:  # `3:`, `true:`: a key that is no string
                try:  # under the key as yaml.safe_load reads it, to find where it is written
                    out[(*path, yaml.constructor.SafeConstructor().construct_object(k), "__key__")] = k.start_mark
                except (yaml.YAMLError, ValueError, TypeError):  # yaml.safe_load has refused it already
                    pass
            _marks(v, (*path, key), out, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _marks(v, (*path, i), out, dups)


def _long_int(node: yaml.Node | None) -> yaml.ScalarNode | None:
    """The first integer of the document with more digits than Python reads."""
    limit = int_digit_limit()
    if isinstance(node, yaml.ScalarNode):
        digits = sum(c.isdigit() for c in node.value)
        return node if node.tag == "tag:yaml.org,2002:int" and 0 < limit < digits else None
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    return next(filter(None, map(_long_int, children)), None)


#: numbers that YAML 1.1 (PyYAML) reads otherwise than YAML 1.2 and the recipe language do: a
#: leading zero makes an octal integer (`010` is 8), a colon a base-60 number (`1:30` is 90)
_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_BASE60 = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _yaml11_numbers(
    node: yaml.Node, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], yaml.ScalarNode, str]]:
    """The plain numbers below ``node`` that YAML 1.1 reads as a number YAML 1.2 would not,
    each with its path and how the two read it."""
    if isinstance(node, yaml.ScalarNode):
        text = node.value
        if node.style is None and node.tag in _NUMBER_TAGS:
            number = yaml.safe_load(text)
            decimal = int(text.replace("_", "")) if _OCTAL.fullmatch(text) else None
            if decimal is not None and decimal != number:
                yield path, node, f"octal to PyYAML (YAML 1.1), which reads {number}; in decimal it is {decimal}"
            elif _BASE60.fullmatch(text):
                yield path, node, f"base 60 to PyYAML (YAML 1.1), which reads {number}; YAML 1.2 reads a string"
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _yaml11_numbers(v, (*path, k.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _yaml11_numbers(v, (*path, i))


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _read(path: Path) -> str:
    raw = read_file(path, "config file", SoapConfigError)
    # a byte-order mark, which some Windows editors write, is not part of the YAML
    return decode_source(raw, str(path), f"config file {str(path)!r}", SoapConfigError)


def _is_path(cfg: Any) -> bool:
    """Whether ``cfg`` names a file (or a directory) rather than holding YAML text."""
    if isinstance(cfg, Path):
        return True
    if not isinstance(cfg, str) or "\n" in cfg:
        return False
    return cfg.endswith((".yaml", ".yml")) or os.path.isfile(cfg) or os.path.isdir(cfg)


def _schema_error(e: ValidationError) -> tuple[str, tuple[Any, ...]]:
    """Plain words for the first schema error, and the path of what it is about."""
    errors = e.errors()
    # an unknown key first: `name: adamw` is better told as that than as a missing recipe
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    where = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _allowed(where)
        hint = _unknown_key_hint(str(where[-1]), allowed, isinstance(err.get("input"), Mapping))
        return f"unknown key (allowed: {', '.join(allowed)})" + hint, where
    if err["type"] == "missing":
        return "is required", where
    # the schema's fields: recipe, args, routes; a route's: match, where, recipe, args
    route = len(where) >= 2 and where[0] == "routes" and isinstance(where[1], int)
    base = where[:2] if route else ()
    if route and len(where) == 2:
        return _FIELD_TYPES["route"], where
    field = where[len(base)]
    if field == "args" and len(where) > len(base) + 1:
        where = where[: len(base) + 2]
        return _FIELD_TYPES["key" if err["loc"][-1] == "[key]" else "arg"], where
    where = where[: len(base) + 1]
    if err["type"] == "value_error":
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        return message.removeprefix(f"{field} "), where
    return _FIELD_TYPES.get(str(field), "has the wrong type"), where


#: keys other configs name the optimizer with (Hydra, Lightning CLI, ...)
_NAMING_KEYS = frozenset({"name", "type", "optimizer", "class", "class_path", "_target_", "algorithm", "opt"})


def _unknown_key_hint(key: str, allowed: list[str], mapping: bool) -> str:
    close = did_you_mean(key, allowed)
    if close:
        return close
    if mapping:  # `arguments: {lr: ...}`
        return "; recipe arguments go under 'args'"
    if key in _NAMING_KEYS:
        return "; the recipe is named by the 'recipe' key (recipe: adamw)"
    return f"; recipe arguments go under 'args' (args: {{{key}: ...}})"


def load(cfg: Any) -> tuple[OptimizerConfig, str, dict[tuple[Any, ...], yaml.Mark], tuple[Any, ...]]:
    """Parse a config (dict, YAML text or path) into the validated schema."""
    file = "<config>"
    marks: dict[tuple[Any, ...], yaml.Mark] = {}
    dups: list[Duplicate] = []
    source = None
    node = None
    if _is_path(cfg):
        path = Path(cfg)
        cfg = source = _read(path)
        file = str(path)
    if isinstance(cfg, str):
        source = cfg
        SOURCES[file] = cfg
        try:
            node = yaml.compose(cfg, Loader=yaml.SafeLoader)
            data = yaml.safe_load(cfg)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            loc = Loc(file, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2) if mark else None
            raise SoapConfigError(f"invalid YAML: {problem}", loc) from None
        except RecursionError:
            raise SoapConfigError("invalid YAML: nested too deeply to read", Loc(file, 1, 1, 1, 2)) from None
        except ValueError:  # an integer past sys.get_int_max_str_digits(), which int() refuses
            long = _long_int(node)
            if long is None:
                raise
            mark, end = long.start_mark, long.end_mark
            loc = Loc(file, mark.line + 1, mark.column + 1, end.line + 1, end.column + 1)
            raise SoapConfigError(f"invalid YAML: {too_long(long.value)}", loc) from None
        if node is not None:
            _marks(node, (), marks, dups)
    elif isinstance(cfg, Mapping):
        data = cfg
    else:
        swapped = isinstance(cfg, torch.nn.Module)  # from_config(cfg, model)
        raise SoapConfigError(
            f"a config is a dict, YAML text or a path to a YAML file, got {type(cfg).__name__}"
            + ("; the model comes first: soapdsl.from_config(model, cfg)" if swapped else "")
        )
    prefix: tuple[Any, ...] = ()
    if isinstance(data, Mapping) and "optimizer" in data and "recipe" not in data:
        data = data["optimizer"]
        prefix = ("optimizer",)
    for key_path, mark, first in dups:
        n = min(len(key_path), len(prefix))
        if key_path[:n] == prefix[:n]:  # in the optimizer's part of a training config, or above it
            loc = Loc(file, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2, source)
            raise SoapConfigError(f"{_dotted(key_path)}: given twice (first on line {first})", loc)
    if node is not None:
        for where, scalar, why in _yaml11_numbers(node):
            if where[: len(prefix)] == prefix:  # only the optimizer's part of a training config
                start, end = scalar.start_mark, scalar.end_mark
                raise SoapConfigError(
                    f"{_dotted(where)}: {scalar.value} is {why}; write the number you mean without a"
                    f" {'leading zero' if ':' not in scalar.value else 'colon'}",
                    Loc(file, start.line + 1, start.column + 1, end.line + 1, end.column + 1, source),
                )
    if data is None:
        if prefix:
            raise SoapConfigError(
                f"{_dotted(prefix)}: is empty; it needs at least a 'recipe' key", _loc(file, marks, prefix)
            )
        what = f"config file {file!r}" if file != "<config>" else "the config text"
        raise SoapConfigError(f"{what} is empty (or only comments); it needs at least a 'recipe' key")
    if not isinstance(data, Mapping):
        fix = ""
        if isinstance(data, str) and data.isidentifier():  # `optimizer: adamw`
            fix = f"; write {_dotted(prefix)}: {{recipe: {data}}}" if prefix else f"; write recipe: {data}"
        raise SoapConfigError(
            f"an optimizer config is a mapping with a 'recipe' key, got {type(data).__name__}{fix}",
            _loc(file, marks, prefix),
        )
    if not prefix and "recipe" not in data:
        nested = next(
            (k for k, v in data.items() if isinstance(v, Mapping) and ("optimizer" in v or "recipe" in v)), None
        )
        if nested is not None:  # `training: {optimizer: ...}`: only the top level is looked at
            inner = "optimizer" if "optimizer" in data[nested] else "recipe"
            raise SoapConfigError(
                f"the config has no 'recipe' or 'optimizer' key at its top level, where from_config looks;"
                f" '{nested}.{inner}' is one level down: pass that part of the config, or move"
                f" '{inner}' to the top level",
                _loc(file, marks, (nested, inner)),
            )
    _check_keys(data, file, marks, prefix, yaml_text=source is not None)
    try:
        parsed = OptimizerConfig.model_validate(dict(data))
    except ValidationError as e:
        msg, where = _schema_error(e)
        dotted = _dotted((*prefix, *where)) or "config"
        loc = _loc(file, marks, (*prefix, *where)) or _loc(file, marks, (*prefix, *where[:-1]))
        raise SoapConfigError(f"{dotted}: {msg}", loc) from None
    return parsed, file, marks, prefix


def _key_text(key: Any, yaml_text: bool) -> str:
    """A mapping key as the config spells it: YAML's spelling for a config given as text."""
    if yaml_text and (key is None or isinstance(key, bool)):
        return {None: "null", True: "true", False: "false"}[key]
    return str(key) if yaml_text else repr(key)


def _kind(key: Any) -> str:
    """`` (a number)`` for a key of that type, as its text may not say (YAML reads `yes` as true)."""
    if key is None:
        return ""
    if isinstance(key, bool):
        return " (a boolean)"
    return " (a number)" if isinstance(key, int | float) else f" (a {type(key).__name__})"


def _check_keys(
    data: Mapping[Any, Any],
    file: str,
    marks: Mapping[tuple[Any, ...], yaml.Mark],
    prefix: tuple[Any, ...],
    yaml_text: bool,
) -> None:
    """Refuse a key that is no string (`3: 4`, or YAML's unquoted `true:`) in the optimizer's
    mappings, of which the schema said only "3: has the wrong type" (at the top, or in a route)."""
    mappings: list[tuple[tuple[Any, ...], Mapping[Any, Any]]] = [((), data)]
    if isinstance(data.get("args"), Mapping):
        mappings.append((("args",), data["args"]))
    routes = data.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) else ()):
        if isinstance(route, Mapping):
            mappings.append((("routes", i), route))
            if isinstance(route.get("args"), Mapping):
                mappings.append((("routes", i, "args"), route["args"]))
    for path, mapping in mappings:
        bad = [k for k in mapping if not isinstance(k, str)]
        if not bad:
            continue
        key, shown = bad[0], _key_text(bad[0], yaml_text)
        if path[-1:] == ("args",):
            fix = ": args maps recipe parameter names to values, such as {lr: 0.01}"
        else:
            fix = f" (allowed: {', '.join(_allowed(path))})"
        raise SoapConfigError(
            f"{'.'.join([*map(str, (*prefix, *path)), shown])}: the key {shown}{_kind(key)} is not a string{fix}",
            _loc(file, marks, (*prefix, *path, key)),
        )


def _allowed(where: tuple[Any, ...]) -> list[str]:
    model = RouteOverride if "routes" in where else OptimizerConfig
    return list(model.model_fields)


def _loc(file: str, marks: Mapping[tuple[Any, ...], yaml.Mark], path: tuple[Any, ...]) -> Loc | None:
    mark = marks.get((*path, "__key__")) or marks.get(path)
    if mark is None:
        return None
    return Loc(file, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2, SOURCES.get(file))


def _value_loc(file: str, marks: Mapping[tuple[Any, ...], yaml.Mark], path: tuple[Any, ...]) -> Loc | None:
    """Under the whole value at path when it is a one-line scalar (a recipe name or file), else at its key."""
    start, end = marks.get(path), marks.get((*path, "__end__"))
    if start is None or end is None or end.line != start.line:
        return _loc(file, marks, path)
    return Loc(file, start.line + 1, start.column + 1, end.line + 1, end.column + 1, SOURCES.get(file))


def _args(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(map(_number, v)) if isinstance(v, list) else _number(v) for k, v in raw.items()}


#: a number with an exponent, as YAML 1.2 reads one; YAML 1.1 (PyYAML) needs a dot and a signed
#: exponent, and reads `1e-3` or `1.0e3` as a string
_EXPONENT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _number(v: Any) -> Any:
    """An argument PyYAML read as the string of a number with an exponent, as that number.

    A recipe parameter with a numeric default reads such text itself, but an inline pipeline's
    parameters (declared by the arguments), a required parameter and the items of a list have
    no default to say that a number is meant: `beta: 9e-1` reached the stage as text. Such a
    string can be no name, so it is always the number. ``1e3`` is an int, as a numeric
    parameter reads it; a value with a dot or a negative exponent is a float.
    """
    if not isinstance(v, str) or not _EXPONENT.fullmatch(v):
        return v
    number = float(v)
    if not math.isfinite(number):  # 1e999: refused as written, by _check_given
        return v
    return int(number) if "." not in v and number.is_integer() else number


_WHERE_PREFIX = "recipe _(lr=1):\n  route "


def _selector(
    override: RouteOverride,
    values: Mapping[str, Any],
    file: str,
    marks: Mapping[tuple[Any, ...], yaml.Mark],
    path: tuple[Any, ...],
) -> A.Selector:
    parts: list[A.Selector] = []
    if override.match is not None:
        globs = [override.match] if isinstance(override.match, str) else override.match
        parts.append(A.SelOr(tuple(A.SelPattern(g) for g in globs)) if len(globs) > 1 else A.SelPattern(globs[0]))
    if override.where is not None:
        name = _text_name(file, (*path, "where"))
        wrapped = _WHERE_PREFIX + override.where  # as parsed, before its ': lr'
        try:
            # `matrix # hidden`: the comment would run over the synthetic route's ':'
            comment = first_comment(override.where)
            if comment is not None:
                text = comment.value.rstrip()
                at = len(_WHERE_PREFIX) + (comment.start_pos or 0)
                line, col = line_col(wrapped, at)
                raise SoapConfigError(
                    f"{_dotted((*path, 'where'))}: a selector cannot hold a comment ('#' starts one):"
                    f" leave out {text!r}",
                    Loc(name, line, col, line, col + len(text), wrapped),
                )
            module = parse(f"{wrapped}: lr\n", name)
            routes = [r for recipe in module.recipes for r in recipe.routes]
            selector = routes[0].selector
            # a comparison may name a parameter of the route's recipe (`max_dim < max_dim`
            # reads that recipe's max_dim, with its args), as a route of a recipe file does
            check_selector(selector, values, {k: Ref(k) for k in values})
        except SoapError as e:
            end = line_col(wrapped, len(wrapped))
            cut = "unexpected ':'"
            if (
                isinstance(e, SoapSyntaxError)
                and e.message.startswith(cut)
                and e.loc
                and (e.loc.line, e.loc.col) == end
            ):
                # the selector ended early (`matrix and`): the ':' is the synthetic route's; the
                # text ends after its last character, not on the line a block's last '\n' starts
                e.message = "unexpected end of text" + e.message[len(cut) :]
                last = len(wrapped.rstrip())
                line, col = line_col(wrapped, last)
                e.loc = Loc(name, line, col, line, col + 1, wrapped)
            raise _in_yaml(e, file, marks, (*path, "where"), override.where, name, _WHERE_PREFIX) from None
        extra = routes[0].settings or len(routes) > 1 or len(module.recipes) > 1 or module.macros
        if extra or [s.name for s in routes[0].pipeline.stages] != ["lr"]:
            # `matrix [lr=0.5]` parses, and the setting would be dropped
            raise SoapConfigError(
                f'{_dotted((*path, "where"))}: holds a selector only, such as "matrix and max_dim < 4096";'
                " the route's recipe goes in 'recipe' and its settings (lr, ...) in 'args'",
                _loc(file, marks, (*path, "where")),
            )
        parts.append(selector)
    if not parts:
        raise SoapConfigError(
            f"{_dotted(path)}: needs 'match' or 'where' to say which parameters it takes", _loc(file, marks, path)
        )
    return parts[0] if len(parts) == 1 else A.SelAnd(tuple(parts))


def _text_name(file: str, path: tuple[Any, ...]) -> str:
    """The source name a text value of the config (a recipe, a `where:`) is parsed under."""
    return f"{file}[{_dotted(path)}]"


#: what YAML does to a value's text that keeps it from being mapped back line for line
_REWRITTEN = {
    ">": "a folded block (>), whose lines YAML joins",
    '"': "a quoted value that YAML rewrote (escapes, or lines joined)",
    "'": "a quoted value that YAML rewrote (doubled quotes, or lines joined)",
    "": "a plain value over several lines, which YAML joins",
    "|": "a literal block whose line is not in the file as YAML read it",
}


def _in_yaml(
    e: SoapError,
    file: str,
    marks: Mapping[tuple[Any, ...], yaml.Mark],
    path: tuple[Any, ...],
    text: str,
    name: str,
    before: str = "",
) -> SoapError:
    """Move the positions of an error in ``text``, the config's value at ``path`` parsed as
    source ``name`` after the synthetic ``before``, to their places in the YAML file.

    A literal block (``|``) keeps its lines as written, after the block's indentation, and a
    value on the line of its key is written as parsed up to the error (plain, or quoted before
    any escape): those map line for line and column for column. Any other value (folded, or
    rewritten by YAML) cannot be mapped: the error points at the start of the value, and a note
    gives its place in the text as YAML read it. Positions quoted in the message and notes
    (``first at ...``) are moved alike.
    """
    mark = marks.get(path)
    lines = text.split("\n")
    shift_lines, shift_col = before.count("\n"), len(before.split("\n")[-1])

    def in_text(line: int, col: int) -> tuple[int, int] | None:
        k = line - 1 - shift_lines
        offset = col - 1 - (shift_col if k == 0 else 0)
        ok = 0 <= k < len(lines) and 0 <= offset <= len(lines[k])
        return (k, offset) if ok else None

    if mark is None:  # a dict: no file to point into, but the text itself, without ``before``
        return _in_text(e, name, text, in_text) if before else e
    source = SOURCES.get(file) or ""

    def in_file(k: int, offset: int, width: int) -> tuple[int, int] | None:
        head = source[mark.index : mark.index + 1]
        if head == "|":
            src = source.split("\n")
            at = mark.line + 1 + k
            written = src[at].removesuffix("\r") if at < len(src) else ""
            if lines[k] and written.endswith(lines[k]):
                return at + 1, len(written) - len(lines[k]) + offset + 1
            return None
        if k != 0 or head == ">":
            return None
        start = mark.index + (1 if head in ("'", '"') else 0)
        shown = lines[0][: offset + width]
        if source[start : start + len(shown)] == shown:
            return mark.line + 1, mark.column + 1 + (start - mark.index) + offset
        return None

    def moved(m: re.Match[str]) -> str:
        pos = in_text(int(m.group(1)), int(m.group(2)))
        if pos is None:
            return m.group(0)
        at = in_file(*pos, 1)
        return f"{file}:{at[0]}:{at[1]}" if at else f"{name}:{pos[0] + 1}:{pos[1] + 1}"

    quoted = re.compile(re.escape(name) + r":(\d+):(\d+)")
    e.message = quoted.sub(moved, e.message)
    e.notes = tuple(quoted.sub(moved, n) for n in e.notes)
    if e.loc is not None and e.loc.file == name:
        pos = in_text(e.loc.line, e.loc.col)
        width = e.loc.end_col - e.loc.col if e.loc.end_line == e.loc.line else 1
        if pos is not None:
            width = max(1, min(width, len(lines[pos[0]]) - pos[1]))
        at = in_file(*pos, width) if pos is not None else None
        if at is None:  # the start of the value, and where in the text YAML read
            at, width = (mark.line + 1, mark.column + 1), 1
            if pos is not None:
                head = source[mark.index : mark.index + 1]
                advice = (
                    "" if head == "|" else "; a literal block (|) keeps the lines as written, so errors point into them"
                )
                e.notes = (
                    f"{_dotted(path)} is {_REWRITTEN.get(head, _REWRITTEN[''])}: the error is at line {pos[0] + 1},"
                    f" column {pos[1] + 1} of the text YAML read, {lines[pos[0]].strip()!r}{advice}",
                    *e.notes,
                )
        e.loc = Loc(file, at[0], at[1], at[0], at[1] + width, SOURCES.get(file))
        e.source = None
    e.args = (e.format(),)
    return e


def _in_text(e: SoapError, name: str, text: str, in_text: Callable[[int, int], tuple[int, int] | None]) -> SoapError:
    """Move the positions of an error in ``text`` parsed after a synthetic prefix (source
    ``name``), which ``in_text`` maps to (line, offset) in ``text``, to ``text`` itself."""

    def moved(m: re.Match[str]) -> str:
        pos = in_text(int(m.group(1)), int(m.group(2)))
        return m.group(0) if pos is None else f"{name}:{pos[0] + 1}:{pos[1] + 1}"

    quoted = re.compile(re.escape(name) + r":(\d+):(\d+)")
    e.message = quoted.sub(moved, e.message)
    e.notes = tuple(quoted.sub(moved, n) for n in e.notes)
    if e.loc is not None and e.loc.file == name:
        pos = in_text(e.loc.line, e.loc.col)
        if pos is not None:
            lines = text.split("\n")
            width = e.loc.end_col - e.loc.col if e.loc.end_line == e.loc.line else 1
            width = max(1, min(width, len(lines[pos[0]]) - pos[1]))
            line, col = pos[0] + 1, pos[1] + 1
            e.loc = Loc(name, line, col, line, col + width, text)
            e.source = None
    e.args = (e.format(),)
    return e


def _check_given(args: Mapping[str, Any], file: str, marks: Any, path: tuple[Any, ...]) -> None:
    """Refuse an argument with a reserved name, or that is inf or nan, where it is written
    (before an inline pipeline declares it as a parameter; the stage that would refuse inf
    reads it in the recipe, away from the config)."""
    for k, v in args.items():
        problem = reserved_param_problem(k)
        if problem:
            raise SoapNameError(problem, _loc(file, marks, (*path, k)))
        if not all(map(_finite_text, v if isinstance(v, tuple) else (v,))):
            shown = v if isinstance(v, str) else ir.const_text(v)
            raise SoapArgumentError(finite_problem(f"argument {k}", shown), _loc(file, marks, (*path, k)))


def _finite_text(v: Any) -> bool:
    """False for inf or nan, also as text that a numeric parameter would read as one (YAML
    1.1 reads `nan`, `inf` and `1e999` as strings)."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return True
    return is_finite(v)


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
            bind_args(recipe, {k: v}, partial=True)  # a required parameter may come in a later key
        except SoapError as e:
            raise e.at(_loc(file, marks, (*path, k))) from None


def _warn_unused_overrides(plan: Any, overrides: list[Any], file: str, marks: Any, path: tuple[Any, ...]) -> None:
    """Warn of a route override that takes no parameter: a misspelt `match` (`"*bais"`) would
    otherwise leave its parameters with the main recipe without a word. A recipe's own routes
    may match nothing (a recipe serves many models); an override is written for this one."""
    start = 0
    for i, (selector, sub, _) in enumerate(overrides):
        n = len(sub.routes)  # the override's routes come first in the plan, in order
        if not any(rp.params for rp in plan.routes[start : start + n]):
            loc = _loc(file, marks, (*path, i))
            where = f"{loc.file}:{loc.line}:{loc.col}: " if loc is not None else ""
            warnings.warn(
                f"{where}{_dotted((*path, i))} ({format_selector(selector)}) takes no parameter of the"
                f" model, so its recipe '{sub.name}' steps nothing: check its match and where",
                UserWarning,
                stacklevel=4,  # the call of soapdsl.from_config
            )
        start += n


def build_from_config(model: Any, cfg: Any) -> SoapOptimizer:
    parsed, file, marks, prefix = load(cfg)
    # recipe text held in the config: errors inside it are moved to their place in the file
    texts: dict[str, tuple[tuple[Any, ...], str]] = {}

    def recipe(spec: str, args: Mapping[str, Any], path: tuple[Any, ...]) -> Any:
        name = _text_name(file, path)
        texts[name] = (path, spec)
        try:
            return library.resolve(spec, args, name)
        except SoapNameError as e:
            # `recipe: my.soap` next to the config, read from another directory
            beside = Path(file).parent / spec.strip().partition("::")[0]
            # os.path.isfile, not Path.is_file, which raises on a name too long for the file system
            if file != "<config>" and not Path(spec.strip()).is_absolute() and os.path.isfile(beside):
                e.notes = (
                    *e.notes,
                    f"a path in a config is relative to the working directory, not to the config;"
                    f" the file beside the config is '{beside}'",
                )
                e.args = (e.format(),)
            raise

    try:
        args = _args(parsed.args)
        _check_given(args, file, marks, (*prefix, "args"))
        main = recipe(parsed.recipe, args, (*prefix, "recipe"))
        _check_args(main, args, file, marks, (*prefix, "args"))
        overrides = []
        for i, o in enumerate(parsed.routes):
            sub_args = _args(o.args)
            _check_given(sub_args, file, marks, (*prefix, "routes", i, "args"))
            try:
                sub = recipe(o.recipe, sub_args, (*prefix, "routes", i, "recipe"))
            except SoapError as e:
                raise e.at(_value_loc(file, marks, (*prefix, "routes", i, "recipe"))) from None
            _check_args(sub, sub_args, file, marks, (*prefix, "routes", i, "args"))
            values = {**sub.defaults(), **sub_args}
            selector = _selector(o, values, file, marks, (*prefix, "routes", i))
            overrides.append((selector, sub, sub_args))
        plan = compile_plan(main, model, args, overrides)
        _warn_unused_overrides(plan, overrides, file, marks, (*prefix, "routes"))
        try:
            mark_routes(
                plan,
                torch_compile=parsed.torch_compile,
                cuda_graphs=parsed.cuda_graphs,
                stochastic_round=parsed.stochastic_round,
            )
        except SoapError as e:
            key = "cuda_graphs" if parsed.cuda_graphs else "torch_compile"
            raise SoapConfigError(e.message, _loc(file, marks, (*prefix, key))) from None
    except SoapError as e:
        for name, (path, text) in texts.items():
            _in_yaml(e, file, marks, path, text, name)
        if e.loc is None:
            e.at(_value_loc(file, marks, (*prefix, "recipe")))
        elif e.loc.file != file and not e.loc.file.startswith(f"{file}["):
            e.notes = (*e.notes, f"from the optimizer config {file}")
            e.args = (e.format(),)
        raise
    return SoapOptimizer(plan, distributed=parsed.distributed)
