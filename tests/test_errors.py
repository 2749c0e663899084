"""Table-driven bad inputs: each raises one soapdsl error with a message and a location."""

from __future__ import annotations

import re
import warnings
from typing import Literal

import numpy as np
import pydantic
import pytest
import torch

import soapdsl
from soapdsl import library, registry
from soapdsl.errors import (
    SoapArgumentError,
    SoapConfigError,
    SoapError,
    SoapNameError,
    SoapRecipeError,
    SoapRouteError,
    SoapShapeError,
    SoapStateError,
    SoapSyntaxError,
)

R = "recipe r(lr=0.1, beta=0.9):\n"

# (id, source, error class, message regex, "line:col" or None)
SOURCES = [
    # a block where a value belongs is shown as written, not as the IR's repr
    (
        "block-as-number",
        "recipe r(lr=1):\n  route ndim < { sign }: lr\n",
        SoapRouteError,
        r"needs a number, got \{ sign \}$",
        "2:16",
    ),
    (
        "block-as-bool",
        "momentum(0.9, {sign}) |> lr",
        SoapArgumentError,
        r"invalid nesterov=\{ sign \} for 'momentum'",
        "1:15",
    ),
    # a bare name in a comparison that is no parameter was "'numel >' needs a number, got nope":
    # it did not say the name is unknown, nor which parameter was meant
    (
        "selector-unknown-name",
        "recipe r(lr=1, big_n=100):\n  route numel > big: sign\n  route default: lr\n",
        SoapNameError,
        r"^unknown name 'big' in 'numel >': a comparison takes a number or a recipe parameter;"
        r" did you mean 'big_n'\?$",
        "2:17",
    ),
    # ... and inside arithmetic it was "arithmetic needs numbers, got big in 'big * 2'"
    (
        "selector-unknown-name-in-arithmetic",
        "recipe r(lr=1, big_n=100):\n  route numel > 2 * big: sign\n  route default: lr\n",
        SoapNameError,
        r"^unknown name 'big' in 'numel >': a comparison takes a number or a recipe parameter;"
        r" did you mean 'big_n'\?$",
        "2:21",
    ),
    # a name in a default was a symbol: "arithmetic needs numbers, got lr in 'lr * 10'"
    (
        "default-refers-to-a-parameter",
        "recipe r(lr=1e-3, adam_lr=lr * 10):\n  route matrix [lr=adam_lr]: sign\n  route default: sign\n",
        SoapNameError,
        r"^the default of 'adam_lr' refers to parameter 'lr': a default is a constant",
        "1:27",
    ),
    (
        "macro-default-refers-to-a-parameter",
        "macro m(a=0.9, b=a) = momentum(b)\nm |> lr",
        SoapNameError,
        r"'b' refers to parameter 'a'",
        "1:18",
    ),
    ("unclosed-paren", "momentum(0.9", SoapSyntaxError, r"unexpected end of text; expected", "1:13"),
    ("double-pipe", "momentum |> |> lr", SoapSyntaxError, r"unexpected '\|>'", "1:13"),
    ("trailing-pipe", "momentum |>", SoapSyntaxError, r"unexpected end of text; expected a name", "1:12"),
    ("bad-char", "momentum $ lr", SoapSyntaxError, r"unexpected character '\$'", "1:10"),
    ("empty-arg", "momentum(0.9,,)", SoapSyntaxError, r"unexpected ','", "1:14"),
    ("recipe-no-routes", "recipe r(lr=1):\n", SoapSyntaxError, r"expected 'route'", "1:16"),
    (
        "syntax-line-3",
        "recipe r(lr=1):\n  route default:\n    momentum(0.9) |> = lr\n",
        SoapSyntaxError,
        r"unexpected '='",
        "3:22",
    ),
    (
        "unterminated-string",
        'recipe r(lr=1):\n  route "embed*: lr\n',
        SoapSyntaxError,
        r"unexpected character",
        "2:9",
    ),
    ("keyword-as-name", "recipe(0.9)", SoapSyntaxError, r"unexpected '\('; expected a name", "1:7"),
    (
        "unknown-op",
        "momentum(0.9) |> newton_shulz(5)",
        SoapNameError,
        r"unknown operator 'newton_shulz'; did you mean 'newton_schulz'\?",
        "1:18",
    ),
    (
        "bool-given-int",
        "momentum(0.9, nesterov=1)",
        SoapArgumentError,
        r"invalid nesterov=1 for 'momentum': expected true or false",
        "1:24",
    ),
    (
        "bool-given-int-via-parameter",
        "recipe r(lr=0.1, n=0):\n  route default: momentum(0.9, nesterov=n)\n",
        SoapArgumentError,
        r"invalid nesterov=0 for 'momentum': expected true or false",
        "2:41",
    ),
    ("unknown-op-far", "sign |> frobnicate", SoapNameError, r"unknown operator 'frobnicate'$", "1:9"),
    ("unknown-recipe-name", "frobnicate", SoapNameError, r"unknown recipe 'frobnicate' \(shipped: ", None),
    (
        "unknown-name-arg",
        R + "  route default: momentum(bta)\n",
        SoapNameError,
        r"unknown name 'bta' for argument 'beta' of 'momentum'; did you mean 'beta'\?",
        "2:27",
    ),
    (
        "unknown-keyword",
        "momentum(bta=0.9)",
        SoapArgumentError,
        r"'momentum' has no parameter 'bta'; did you mean 'beta'\?",
        "1:10",
    ),
    (
        "too-many-positional",
        "sign(1)",
        SoapArgumentError,
        r"'sign' takes at most 0 positional arguments",
        "1:6",
    ),
    (
        "duplicate-arg",
        "momentum(0.9, beta=0.8)",
        SoapArgumentError,
        r"argument 'beta' of 'momentum' given twice",
        "1:15",
    ),
    (
        "positional-after-keyword",
        "momentum(beta=0.9, true)",
        SoapArgumentError,
        r"positional argument follows a keyword argument",
        "1:20",
    ),
    (
        "out-of-range",
        "momentum(1.5)",
        SoapArgumentError,
        r"invalid beta=1\.5 for 'momentum': must be < 1\.0",
        "1:10",
    ),
    (
        "negative",
        "decay(-0.1)",
        SoapArgumentError,
        r"invalid weight_decay=-0\.1 for 'decay': must be >= 0",
        "1:7",
    ),
    ("wrong-type-bool", "momentum(true)", SoapArgumentError, r"invalid beta=true.*expected a number", "1:10"),
    ("wrong-type-int", "newton_schulz(2.5)", SoapArgumentError, r"invalid steps=2\.5.*valid integer", "1:15"),
    (
        "bad-enum",
        "rms_normalize(eps_at=rwa)",
        SoapArgumentError,
        r"expected one of corrected, raw; did you mean 'raw'\?",
        "1:22",
    ),
    ("short-tuple", "newton_schulz(coeffs=(1, 2))", SoapArgumentError, r"item 2 is missing", "1:22"),
    # a string that is no choice shows as a literal: a line break in it broke the message's line
    (
        "bad-enum-string",
        "momentum(kind='sgd\\n')",
        SoapArgumentError,
        r"invalid kind=\"sgd\\n\" for 'momentum': expected one of ema, sgd; did you mean 'sgd'\?$",
        "1:15",
    ),
    (
        "bad-combination",
        "newton_schulz(5, dtype=bf16, form=gram)",
        SoapArgumentError,
        r"invalid form=gram for 'newton_schulz': the Gram form needs dtype fp32, fp64 or auto",
        "1:35",
    ),
    (
        "range-via-param",
        "recipe r(lr=0.1, b=2.0) = momentum(b)",
        SoapArgumentError,
        r"invalid beta=2\.0 for 'momentum'",
        "1:36",
    ),
    ("arith-on-symbol", "scale(left * 2)", SoapArgumentError, r"arithmetic needs numbers", "1:7"),
    (
        "division-by-zero",
        "recipe r(lr=0.1, z=0) = scale(1 / z)",
        SoapArgumentError,
        r"division by zero",
        "1:31",
    ),
    ("lr-twice", "momentum(0.9) |> lr |> lr", SoapRecipeError, r"the update is applied twice", "1:24"),
    ("block-on-non-scope", "momentum(0.9) { sign }", SoapRecipeError, r"'momentum' is not a scope", "1:1"),
    (
        "lr-in-block",
        "rotate(both) { momentum(0.9) |> lr }",
        SoapRecipeError,
        r"'lr' applies the update .* \(write it after the block",
        "1:33",
    ),
    (
        "lr-in-bare-scope",
        "rotate(left, freq=40) |> momentum(0.9) |> lr",
        SoapRecipeError,
        r"'lr' applies the update .* \(a bare scope runs to the end of its pipeline",
        "1:43",
    ),
    ("empty-bare-scope", "momentum(0.9) |> rotate(left)", SoapRecipeError, r"'rotate' has nothing inside", "1:18"),
    (
        "empty-schedule",
        "rotate(both, freq=()) { sign }",
        SoapArgumentError,
        r"invalid freq=\(\) for 'rotate': a schedule needs at least its final period",
        "1:19",
    ),
    (
        "no-lr-param",
        "recipe r(beta=0.9) = momentum(beta)",
        SoapRecipeError,
        r"declares no 'lr' parameter",
        "1:1",
    ),
    (
        "duplicate-param",
        "recipe r(lr=1, lr=2) = sign",
        SoapNameError,
        r"parameter 'lr' .* declared twice",
        "1:16",
    ),
    (
        "reserved-param",
        "recipe r(lr=1, params=()) = sign |> lr",
        SoapNameError,
        r"parameter name 'params' is reserved",
        "1:16",
    ),
    (
        "reserved-param-route",
        "recipe r(lr=1, route=0.5) = scale(route) |> lr",
        SoapNameError,
        r"parameter name 'route' is reserved",
        "1:16",
    ),
    (
        "macro-doubling",
        "macro m0 = sign\n"
        + "".join(f"macro m{i} = m{i - 1} |> m{i - 1}\n" for i in range(1, 12))
        + "recipe r(lr=1) = m11 |> lr\n",
        SoapRecipeError,
        r"macro 'm10' expands into 1024 stages; a macro use may expand into at most 1000",
        "11:1",
    ),
    (
        "macro-recursion",
        "macro a(x=1) = b\nmacro b(x=1) = a\nrecipe r(lr=1) = a\n",
        SoapRecipeError,
        r"macro 'a' expands into itself \(a -> b -> a\)",
        "2:16",
    ),
    (
        "macro-bad-keyword",
        "macro m(b=0.9) = momentum(b)\nrecipe r(lr=1) = m(bb=0.5)\n",
        SoapArgumentError,
        r"macro 'm' has no parameter 'bb'; did you mean 'b'\?",
        "2:20",
    ),
    (
        "macro-missing-argument",
        "macro heavy_ball(beta) = momentum(beta, kind=sgd)\nrecipe sgdm(lr=0.1) = heavy_ball |> lr\n",
        SoapArgumentError,
        r"^macro 'heavy_ball' needs argument 'beta': write heavy_ball\(beta=\.\.\.\)$",
        "2:23",
    ),
    (
        "macro-twice",
        "macro m = sign\nmacro m = sign\n",
        SoapNameError,
        r"macro 'm' is defined twice \(first at <inline>:1:1\)",
        "2:1",
    ),
    ("macro-shadows-op", "macro sign = lr\n", SoapNameError, r"has the name of a primitive", "1:1"),
    (
        "recipe-twice",
        "recipe r(lr=1) = sign\nrecipe r(lr=1) = sign\n",
        SoapNameError,
        r"recipe 'r' is defined twice \(first at <inline>:1:1\)",
        "2:1",
    ),
    (
        "duplicate-route",
        R + "  route vector: sign\n  route vector: lr\n",
        SoapRouteError,
        r"duplicates the route at <inline>:2:3;",
        "3:3",
    ),
    (
        "unreachable-route",
        R + "  route default: sign\n  route vector: lr\n",
        SoapRouteError,
        r"unreachable: the route at <inline>:2:3 matches every parameter",
        "3:3",
    ),
    (
        "unknown-selector",
        R + "  route vectr: sign\n",
        SoapRouteError,
        r"unknown selector 'vectr'; did you mean 'vector'\?",
        "2:9",
    ),
    (
        "unknown-quantity",
        R + "  route ndimm > 2: sign\n",
        SoapRouteError,
        r"unknown shape quantity 'ndimm'",
        "2:9",
    ),
    ("selector-non-number", R + '  route ndim > "left": sign\n', SoapRouteError, r"needs a number", "2:16"),
    (
        "bad-route-setting",
        R + "  route default [lrr=1]: sign\n",
        SoapNameError,
        r"route setting 'lrr' is no parameter of recipe 'r'; did you mean 'lr'\?",
        "2:18",
    ),
    (
        "pipeline-default",
        "recipe r(lr=1, x={ sign }) = lr",
        SoapArgumentError,
        r"pipeline cannot be a parameter default",
        "1:18",
    ),
    # learning rates that every build refuses are refused by the check, at the value
    (
        "lr-default-negative",
        "recipe r(lr=-1e-3) = sign",
        SoapArgumentError,
        r"invalid lr=-0\.001 for recipe 'r': the learning rate must be a finite number >= 0$",
        "1:13",
    ),
    ("lr-default-string", 'recipe r(lr="abc") = sign', SoapArgumentError, r"invalid lr=abc for recipe 'r'", "1:13"),
    ("lr-default-bool", "recipe r(lr=true) = sign", SoapArgumentError, r"invalid lr=true for recipe 'r'", "1:13"),
    ("lr-default-symbol", "recipe r(lr=inf) = sign", SoapArgumentError, r"invalid lr=inf for recipe 'r'", "1:13"),
    (
        "lr-setting-bool",
        "recipe r(lr=1e-3):\n  route default [fused=false, lr=true]: sign\n",
        SoapArgumentError,
        r"invalid lr=true in route 'default': the learning rate must be a finite number >= 0",
        "2:34",
    ),
    (
        "lr-setting-negative",
        "recipe r(lr=1e-3):\n  route matrix [lr=-1]: sign\n  route default: sign\n",
        SoapArgumentError,
        r"invalid lr=-1 in route 'matrix'",
        "2:20",
    ),
    # stages that read a labelled stage find it
    (
        "unknown-label",
        "sign |> graft(norm, from=nolabel)",
        SoapRecipeError,
        r"'graft' reads the stage labelled 'nolabel', which is not an earlier stage of this pipeline or of one",
        "1:26",
    ),
    (
        "label-defined-later",
        "momentum(0.9) |> graft(norm, from=later) |> sign as later",
        SoapRecipeError,
        r"not an earlier stage .*: 'later' labels a stage after it \('sign' at <inline>:1:45\)",
        "1:35",
    ),
    (
        "label-misspelt-in-a-block",
        "momentum(0.9) as mom |> rotate(left) { sign |> graft(norm, from=mon) }",
        SoapRecipeError,
        r"stage labelled 'mon'.*; did you mean 'mom'\?",
        "1:65",
    ),
    (
        "nothing-before-a-reader",
        "graft(norm) |> sign",
        SoapRecipeError,
        r"'graft' reads the input of the stage before it, and there is none here",
        "1:1",
    ),
    # a label names one stage of its pipeline
    (
        "label-twice",
        "momentum(0.9) as a |> sign as a |> graft(norm, from=a)",
        SoapRecipeError,
        r"label 'a' is given twice in this pipeline \(first at <inline>:1:18\)",
        "1:31",
    ),
    (
        "label-twice-in-a-block",
        "rotate(left) { sign } as a |> momentum(0.9) as a",
        SoapRecipeError,
        r"label 'a' is given twice",
        "1:48",
    ),
    (
        "label-twice-on-macro-calls",
        "macro m = sign\nrecipe r(lr=1) = m as a |> m as a\n",
        SoapRecipeError,
        r"label 'a' is given twice in this pipeline \(first at <inline>:2:23\)",
        "2:33",
    ),
    # a name in an argument is a parameter first: a label of the same name cannot be read by it
    (
        "label-named-like-a-parameter",
        R + "  route default: momentum(beta) as beta |> sign |> graft(norm, from=beta)\n",
        SoapNameError,
        r"^from=beta reads the parameter 'beta' \(= 0\.9\), not the stage labelled 'beta' at <inline>:2:36:"
        r" a name in an argument is a parameter first; rename the label \(or the parameter\)$",
        "2:69",
    ),
    (
        "label-named-like-a-macro-parameter",
        "macro m(b=0.9) = momentum(b) as b |> rotate(left) { sign |> graft(norm, from=b) }\nrecipe r(lr=1) = m\n",
        SoapNameError,
        r"^from=b reads the parameter 'b' \(= 0\.9\), not the stage labelled 'b' at <inline>:1:33:",
        "1:78",
    ),
    # `true` and `false` are the booleans wherever a value is written: a parameter or a label of
    # that name checked ok and could never be read (`scale(true)` got the boolean)
    (
        "parameter-named-true",
        "recipe r(lr=1, true=2) = scale(true) |> lr\n",
        SoapNameError,
        r"^'true' cannot be the name of a parameter: `true` is always the boolean where a value is written,"
        r" so no argument could read it; choose another name$",
        "1:16",
    ),
    (
        "required-parameter-named-false",
        "recipe r(lr=1, false) = sign |> lr\n",
        SoapNameError,
        r"^'false' cannot be the name of a parameter",
        "1:16",
    ),
    (
        "macro-parameter-named-false",
        "macro m(false=1) = scale(false)\nrecipe r(lr=1) = m |> lr\n",
        SoapNameError,
        r"^'false' cannot be the name of a parameter",
        "1:9",
    ),
    (
        "label-named-true",
        "recipe r(lr=1) = momentum(0.9) as true |> rotate(left) { sign |> graft(norm, from=true) } |> lr\n",
        SoapNameError,
        r"^'true' cannot be the name of a label: `true` is always the boolean",
        "1:35",
    ),
    (
        "label-named-false-in-a-macro",
        "macro m = momentum(0.9) as false\nrecipe r(lr=1) = m |> sign |> lr\n",
        SoapNameError,
        r"^'false' cannot be the name of a label",
        "1:28",
    ),
]


def _raise(source: str) -> None:
    library.resolve(source)


@pytest.mark.parametrize(("source", "cls", "pattern", "where"), [s[1:] for s in SOURCES], ids=[s[0] for s in SOURCES])
def test_bad_source(source, cls, pattern, where):
    with pytest.raises(SoapError) as info:
        _raise(source)
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert re.search(pattern, err.message), err.message
    if where is not None:
        assert err.loc is not None, err
        assert f"{err.loc.line}:{err.loc.col}" == where, str(err)
        text = str(err)
        assert f"<inline>:{where}:" in text
        assert "^" in text  # the caret line


def test_at_least_thirty_bad_inputs():
    assert len(SOURCES) + len(COMPILE) + len(CONFIGS) >= 30


# -- errors that need parameters (compile time) ---------------------------------------------

COMPILE = [
    (
        "matrix-op-on-vector",
        "momentum(0.9) |> newton_schulz(5) |> lr",
        {"bias": (8,)},
        {},
        SoapShapeError,
        r"parameter 'bias' of shape \[8\] cannot go through this stage: 'newton_schulz' needs a matrix",
        "1:18",
    ),
    (
        "no-route",
        'recipe r(lr=1):\n  route "w*": sign\n',
        {"bias": (3,)},
        {},
        SoapRouteError,
        r"parameter 'bias' \(shape \[3\]\) matches no route",
        "1:1",
    ),
    (
        "unknown-recipe-arg",
        "adamw",
        {"w": (2, 2)},
        {"lrr": 0.1},
        SoapNameError,
        r"recipe 'adamw' has no parameter 'lrr'; did you mean 'lr'\?",
        None,
    ),
    (
        # torch's spelling: difflib alone would answer beta2
        "torch-betas",
        "adamw",
        {"w": (2, 2)},
        {"betas": (0.9, 0.99)},
        SoapNameError,
        r"recipe 'adamw' has no parameter 'betas'; write beta1 and beta2 \(torch's betas=\(beta1, beta2\) is 2",
        None,
    ),
    (
        # a stage's argument does not default to the parameter of its name: decay decayed by
        # its own 0.01 while weight_decay=0.5 sat in the param_group
        "inline-unread-parameter",
        "sign |> decay |> lr",
        {"w": (2, 2)},
        {"weight_decay": 0.5},
        SoapNameError,
        r"^no stage of the inline pipeline reads 'weight_decay' \(weight_decay=0\.5 is given\).*"
        r" as in decay\(weight_decay=weight_decay\)$",
        "1:1",
    ),
    (
        # muon's Adam routes spell theirs with a prefix
        "torch-betas-prefixed",
        "muon",
        {"w": (2, 2)},
        {"betas": (0.9, 0.99)},
        SoapNameError,
        r"recipe 'muon' has no parameter 'betas'; write adam_beta1 and adam_beta2 \(torch's betas=\(adam_beta1,",
        None,
    ),
    (
        "arg-out-of-range",
        "adamw",
        {"w": (2, 2)},
        {"beta1": 1.0},
        SoapArgumentError,
        r"invalid beta=1\.0 for 'momentum'",
        "7:12",
    ),
    (
        "unknown-recipe",
        "adamww",
        {"w": (2, 2)},
        {},
        SoapNameError,
        r"unknown recipe 'adamww'; did you mean 'adamw'\?",
        None,
    ),
    (
        "missing-file",
        "no/such/file.soap",
        {"w": (2, 2)},
        {},
        SoapNameError,
        r"cannot read recipe file",
        None,
    ),
    # a path the OS refuses outright escaped as ValueError ("embedded null byte") and OSError
    # ("File name too long") from pathlib
    (
        "nul-in-path",
        "my\x00recipe.soap",
        {"w": (2, 2)},
        {},
        SoapNameError,
        r"^cannot read recipe file 'my\\x00recipe.soap': a file name cannot hold a NUL character$",
        None,
    ),
    (
        "path-too-long",
        "r" * 300 + ".soap",
        {"w": (2, 2)},
        {},
        SoapNameError,
        r"^cannot read recipe file 'r{300}\.soap': File name too long$",
        None,
    ),
    ("arg-bad-type", "adamw", {"w": (2, 2)}, {"lr": [1]}, SoapArgumentError, r"must be a number", None),
    (
        "missing-recipe-arg",
        "recipe r(lr=0.1, beta) = momentum(beta) |> lr",
        {"w": (2, 2)},
        {},
        SoapArgumentError,
        r"^recipe 'r' needs argument 'beta': its header gives it no default$",
        "1:18",  # at the parameter in the header, not the header's start
    ),
]


@pytest.mark.parametrize(
    ("recipe", "shapes", "args", "cls", "pattern", "where"),
    [c[1:] for c in COMPILE],
    ids=[c[0] for c in COMPILE],
)
def test_bad_compile(recipe, shapes, args, cls, pattern, where):
    params = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in shapes.items()]
    with pytest.raises(SoapError) as info:
        soapdsl.build(recipe, params, **args)
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert re.search(pattern, err.message), err.message
    if where is not None:
        assert f"{err.loc.line}:{err.loc.col}" == where, str(err)


@pytest.mark.parametrize(
    ("fmt", "shape", "seen", "how"),
    [
        ("channels_first", (3, 5, 7), [105], ""),
        ("channels_last", (3, 5, 1, 1), [15], " (channels_last: permuted to NCHW first)"),
    ],
)
def test_a_shape_error_after_merged_dims_says_they_were_merged(fmt, shape, seen, how):
    """The error named a shape the parameter does not have ('got shape [105]' for [3, 5, 7]),
    with no word of the merge that made it."""
    recipe = f"rotate(both, merge_dims=true, max_dim=200, data_format={fmt}) {{ newton_schulz }} |> lr"
    w = torch.nn.Parameter(torch.zeros(shape))
    with pytest.raises(SoapShapeError) as info:
        soapdsl.build(recipe, [("w", w)])
    assert info.value.message.endswith(f"'newton_schulz' needs a matrix (ndim >= 2), got shape {seen}")
    assert info.value.notes[0] == (
        "inside 'rotate', merge_dims=true merges consecutive dims while their product is <= max_dim=200"
        f"{how}: shape {list(shape)} is seen as {seen}"
    )
    # resized into that shape after the build: the step's error says the same
    opt = soapdsl.build(recipe, [("w", w := torch.nn.Parameter(torch.zeros(200, 3)))])
    w.data, w.grad = torch.zeros(shape), torch.zeros(shape)
    with pytest.raises(SoapShapeError) as info:
        opt.step()
    assert info.value.notes[0].endswith(f"shape {list(shape)} is seen as {seen}")


# -- configs --------------------------------------------------------------------------------

CONFIGS = [
    ("yaml-syntax", "recipe: adamw\nargs: {lr: [1,\n", SoapConfigError, r"invalid YAML", "3:1"),
    ("yaml-tab", "recipe: adamw\nargs:\n\tlr: 1\n", SoapConfigError, r"invalid YAML", "3:1"),
    (
        "unknown-key",
        "optimizer:\n  recipe: adamw\n  argz: {lr: 1}\n",
        SoapConfigError,
        r"optimizer\.argz: unknown key \(allowed: recipe, args, routes, distributed, torch_compile, cuda_graphs,"
        r" stochastic_round\)",
        "3:3",
    ),
    ("missing-recipe", "args: {lr: 1}\n", SoapConfigError, r"recipe: is required", None),
    ("not-a-mapping", "- adamw\n", SoapConfigError, r"is a mapping", None),
    ("unknown-arg", "recipe: adamw\nargs: {lrr: 1}\n", SoapNameError, r"has no parameter 'lrr'", "2:8"),
    (
        "reserved-arg",
        'recipe: "momentum(0.9) |> sign |> lr"\nargs: {lr: 0.01, params: []}\n',
        SoapNameError,
        r"parameter name 'params' is reserved",
        "2:18",
    ),
    (
        "route-needs-selector",
        "recipe: adamw\nroutes:\n  - recipe: adam\n",
        SoapConfigError,
        r"routes\.0: needs 'match' or 'where'",
        "3:5",
    ),
    (
        "route-bad-where",
        "recipe: adamw\nroutes:\n  - where: vectr\n    recipe: adam\n",
        SoapRouteError,
        r"unknown selector 'vectr'",
        None,
    ),
    ("unknown-recipe", "recipe: adamx\n", SoapNameError, r"unknown recipe 'adamx'", "1:9"),
]


@pytest.mark.parametrize(("text", "cls", "pattern", "where"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_bad_config(text, cls, pattern, where):
    model = torch.nn.Linear(3, 3)
    with pytest.raises(SoapError) as info:
        soapdsl.from_config(model, text)
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert re.search(pattern, err.message), err.message
    if where is not None:
        assert f"{err.loc.line}:{err.loc.col}" == where, str(err)
        assert err.loc.file == "<config>"


def test_state_dict_of_another_recipe():
    model = torch.nn.Linear(3, 3)
    a = soapdsl.build("adam", model)
    model(torch.ones(1, 3)).sum().backward()
    a.step()
    b = soapdsl.build("adamw", model)
    with pytest.raises(SoapStateError, match="saved by recipe 'adam'"):
        b.load_state_dict(a.state_dict())


def test_state_dict_of_another_recipe_of_the_same_name_says_what_differs():
    """'saved by recipe adamw (fingerprint ...), but this optimizer runs recipe adamw' left the
    user to guess what differs."""
    model = torch.nn.Linear(3, 3)
    sd = soapdsl.build("adamw", model).state_dict()
    with_override = soapdsl.from_config(model, {"recipe": "adamw", "routes": [{"match": "bias", "recipe": "adam"}]})
    with pytest.raises(SoapStateError) as info:
        with_override.load_state_dict(sd)
    assert info.value.message.endswith(
        ": its routes were default, this optimizer's are \"bias\", default (a config's route overrides are"
        " part of the recipe)"
    )
    with pytest.raises(SoapStateError) as info:
        soapdsl.build("recipe adamw(lr=1e-3) = sign |> lr", model).load_state_dict(sd)
    assert info.value.message.endswith(
        ": a recipe of the same name with other stages, arguments or routes (an edited recipe file, or"
        " another recipe by that name)"
    )


def _stepped_soap():
    model = torch.nn.Linear(6, 4)
    opt = soapdsl.build("soap", model, freq=1)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (5.0, r"state '0\.rotate\.beta' of parameter 'weight' is 5\.0, outside \[0, 1\)"),
        (float("nan"), r"is nan, outside \[0, 1\)"),
        (10**400, r"is 1e\+400, outside \[0, 1\)"),
        ("x", r"is a str, expected the factors' decay"),
        (torch.tensor(0.5), r"is a tensor, expected a number"),
    ],
)
def test_loaded_host_values_are_checked(value, pattern):
    """A loaded factor decay outside [0, 1) made the factors grow without bound (5.0) or NaN."""
    opt = _stepped_soap()
    sd = opt.state_dict()
    sd["state"][0] = {**sd["state"][0], "0.rotate.beta": value}
    with pytest.raises(SoapStateError, match=pattern):
        opt.load_state_dict(sd)
    sd["state"][0] = {**sd["state"][0], "0.rotate.beta": 0.95, "0.rotate.ready": torch.tensor(True)}
    with pytest.raises(SoapStateError, match=r"'0\.rotate\.ready' of parameter 'weight' is a tensor, expected a bool"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("key", ["step", "0.rotate.ready"])
def test_a_state_without_its_step_or_a_host_value_is_refused_when_loaded(key):
    """Either one missing beside the state's tensors was loaded, and the next step raised KeyError
    from inside the optimizer."""
    opt = _stepped_soap()
    sd = opt.state_dict()
    del sd["state"][0][key]
    with pytest.raises(
        SoapStateError, match=rf"error: state dict lacks state \['{re.escape(key)}'\] for parameter 'weight'$"
    ):
        opt.load_state_dict(sd)
    # a host value whose fresh value is None may be missing: saved before the stage kept it
    del sd["state"][1]["0.rotate.beta"]
    sd["state"][0] = opt.state_dict()["state"][0]
    opt.load_state_dict(sd)
    opt.step()


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (None, r"takes the dict that state_dict\(\) returned, not a NoneType"),
        ("ckpt.pt", r"not a str \(load the file with torch.load first\)"),
        ({"state": [], "param_groups": []}, r"'state' is a list, not a dict"),
    ],
)
def test_load_state_dict_of_something_else(bad, pattern):
    with pytest.raises(SoapStateError, match=pattern):
        _stepped_soap().load_state_dict(bad)


def test_a_parameter_key_that_cannot_be_a_key_is_refused():
    """A list among a group's parameter indices raised TypeError (unhashable) from the map of the
    saved indices to this optimizer's parameters."""
    opt = _stepped_soap()
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = [[0], 1]
    with pytest.raises(SoapStateError, match=r"param_groups\[0\]\['params'\] holds \[0\], expected the list of"):
        opt.load_state_dict(sd)


def _no_meta_and_a_list_for_recipe(sd):
    del sd["soapdsl"]
    sd["param_groups"][0]["recipe"] = [1]


@pytest.mark.parametrize(
    ("spoil", "pattern"),
    [
        (lambda sd: sd["soapdsl"].update(format=torch.tensor([1, 1])), r"format tensor\(\[1, 1\]\) cannot be read"),
        (lambda sd: sd["soapdsl"].update(format=np.array([1, 1])), r"format array\(\[1, 1\]\) cannot be read"),
        (lambda sd: sd["soapdsl"].update(fingerprint=np.array(["a", "b"])), r"saved by recipe 'soap' \(fingerprint"),
        (
            lambda sd: sd["soapdsl"].update(routes=np.array(["a", "b"])),
            r"holds routes \['a' 'b'\], but this optimizer's",
        ),
        (
            lambda sd: sd["soapdsl"].update(shards={"rank": 0, "world": torch.tensor([1, 2])}),
            r"the share of the state of rank 0 of tensor\(\[1, 2\]\) under FSDP2",
        ),
        (_no_meta_and_a_list_for_recipe, r"was not saved by a soapdsl optimizer \(it has no 'soapdsl' entry\)"),
    ],
)
def test_state_dict_metadata_of_another_type_is_refused(spoil, pattern):
    """A tensor or an array where the 'soapdsl' entry holds a number, a string or a list raised
    RuntimeError or ValueError (its truth value is ambiguous) from the comparison that checks it,
    and a list where a group holds its recipe TypeError (unhashable) from a set of them."""
    opt = _stepped_soap()
    sd = opt.state_dict()
    spoil(sd)
    with pytest.raises(SoapStateError, match=pattern):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("plan", [None, "adamw"])
def test_soap_optimizer_needs_a_plan(plan):
    with pytest.raises(SoapArgumentError, match="SoapOptimizer takes a compiled Plan"):
        soapdsl.SoapOptimizer(plan)


def test_deeply_nested_yaml_is_a_config_error():
    text = "model: " + "[" * 500 + "1" + "]" * 500 + "\noptimizer: {recipe: adamw}\n"
    with pytest.raises(SoapConfigError, match="nested too deeply"):
        soapdsl.from_config(torch.nn.Linear(2, 2), text)


def test_error_format_has_file_line_col_source_and_caret():
    with pytest.raises(SoapError) as info:
        soapdsl.parse("recipe r(lr=1):\n  route default:\n    momentum(0.9) |> = lr\n", "my.soap")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("my.soap:3:22: syntax error: unexpected '='")
    assert lines[1].endswith("momentum(0.9) |> = lr")
    caret_col = lines[2].index("^")
    assert lines[1][caret_col] == "="


@pytest.mark.parametrize(
    "eol", ["\f\n", "\r\n", "  # a\x1cb\n", "  # a\u2028b\n"], ids=["form_feed", "crlf", "fs", "ls"]
)
def test_error_shows_the_line_the_lexer_counted(eol):
    """The lexer counts lines at "\\n"; str.splitlines also breaks at a form feed (an Emacs
    page break), \\x1c or \\u2028, so the error showed line 2 under the label of line 3."""
    source = f"recipe r(lr=1) ={eol}  momentum |>{eol}  signn\n"
    with pytest.raises(SoapError) as info:
        soapdsl.compile(source, torch.nn.Linear(2, 2))
    lines = str(info.value).splitlines()
    assert lines[0].startswith("<inline>:3:3: error: unknown operator 'signn'")
    assert lines[1] == "    3 |   signn" and lines[2] == "      |   ^^^^^"


# -- what the check alone finds ---------------------------------------------------------------


def test_check_refuses_what_every_build_refuses(tmp_path, capsys):
    from soapdsl.cli import main

    bad = tmp_path / "bad.soap"
    bad.write_text("recipe r(lr=1e-3):\n  route default [lr=-1]: sign\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:21: error: invalid lr=-1 in route 'default'" in err


def test_an_lr_setting_from_a_parameter_notes_its_value():
    with pytest.raises(SoapArgumentError, match=r"invalid lr=-1 in route 'default'") as info:
        library.resolve("recipe r(lr=1e-3, adam_lr=-1):\n  route default [lr=adam_lr]: sign\n")
    assert info.value.notes == ("adam_lr = -1",)


def test_an_lr_given_by_the_user_is_still_checked_when_built():
    with pytest.raises(SoapArgumentError, match=r"route 'default' has lr=-1") as info:
        soapdsl.build("sign |> lr", [torch.nn.Parameter(torch.zeros(2))], lr=-1)
    # the location is where the recipe takes the lr; the note says the value was the user's
    assert info.value.notes == ("recipe arguments given: lr=-1",)


def test_a_label_inside_a_macro_twice_notes_the_use():
    with pytest.raises(SoapRecipeError, match=r"label 's' is given twice") as info:
        library.resolve("macro m = sign as s\nrecipe r(lr=1) = momentum(0.9) as s |> m\n")
    assert info.value.notes == ("in macro 'm' used at <inline>:2:40",)


def test_a_macro_that_labels_a_stage_used_twice_says_so():
    """The error said `first at` the very place it pointed at: both uses label the stage the
    macro's body writes."""
    source = "macro m = momentum(0.9) as s\nrecipe r(lr=1) = m |> sign |> m\n"
    with pytest.raises(SoapRecipeError) as info:
        library.resolve(source)
    err = info.value
    assert (
        err.message
        == "label 's' is given twice in this pipeline (first at <inline>:1:11, in macro 'm' used at <inline>:2:18)"
    )
    assert (err.loc.line, err.loc.col) == (1, 11)
    assert err.notes == (
        "in macro 'm' used at <inline>:2:31",
        "each use of macro 'm' labels a stage 's', and a label names one stage: give one use a label of its own"
        " (`m as s2`), which replaces it",
    )
    library.resolve(source.replace("|> m\n", "|> m as s2\n"))
    # a label inside the expansion cannot be replaced
    with pytest.raises(SoapRecipeError) as info:
        library.resolve("macro m = momentum(0.9) as s |> sign\nrecipe r(lr=1) = m |> m\n")
    assert info.value.notes[-1].endswith("use it once per pipeline (a scope's block is a pipeline of its own)")


@pytest.mark.parametrize("name", ["true", "false"])
def test_an_inline_pipeline_or_config_argument_named_like_a_boolean_is_refused(name):
    """An inline pipeline declares a parameter per keyword argument (a config's args, --set):
    one called `true` could never be read, as in a recipe's header."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SoapNameError, match=f"error: '{name}' cannot be the name of a parameter"):
        soapdsl.build("sign |> lr", model, lr=1, **{name: 3})
    with pytest.raises(SoapNameError, match=f"error: '{name}' cannot be the name of a parameter") as info:
        soapdsl.from_config(model, f'recipe: "sign |> scale(s) |> lr"\nargs: {{s: 1, "{name}": 2}}\n')
    assert (info.value.loc.line, info.value.loc.col) == (2, 14)


def test_a_label_named_like_a_parameter_is_fine_while_no_argument_names_it():
    library.resolve(R + "  route default: momentum(beta) as beta |> sign |> lr\n")


def test_a_label_named_like_a_required_parameter_shows_no_value():
    with pytest.raises(SoapNameError) as info:
        library.resolve("recipe r(lr=1, m) = momentum(0.9) as m |> graft(norm, from=m)")
    assert info.value.message.startswith("from=m reads the parameter 'm', not the stage labelled 'm' at <inline>:1:38:")


def test_an_inner_label_may_shadow_an_outer_one():
    library.resolve("sign as m |> rotate(left) { momentum(0.9) as m |> sign |> graft(norm, from=m) }")


# -- notes on errors inside macros --------------------------------------------------------------


def test_an_error_in_a_macro_body_found_where_it_is_defined_claims_no_use():
    with pytest.raises(SoapNameError) as info:  # (the macro is used nowhere)
        library.resolve("macro m(b=0.9) =\n  momentum(b)\n  |> newton_shulz(5)\nrecipe r(lr=1e-3) = sign |> lr\n")
    assert (info.value.loc.line, info.value.loc.col) == (3, 6)
    assert info.value.notes == ()


def test_an_error_in_a_macro_body_found_at_a_use_points_at_the_use():
    with pytest.raises(SoapArgumentError, match=r"invalid beta=1\.5 for 'momentum'") as info:
        library.resolve("macro m(b) = momentum(b)\nrecipe r(lr=1e-3) = sign |> m(1.5) |> lr\n")
    assert info.value.notes == ("in macro 'm' used at <inline>:2:29",)


@pytest.mark.parametrize(
    ("body", "cls", "pattern", "col"),
    [
        ("momentm(beta)", SoapNameError, r"unknown operator 'momentm'; did you mean 'momentum'\?", 17),
        ("momentum(beta, true, ema, 4)", SoapArgumentError, r"'momentum' takes at most 3 positional", 43),
        (
            "momentum(beta, nesterv=true)",
            SoapArgumentError,
            r"'momentum' has no parameter 'nesterv'; did you mean 'nesterov'\?",
            32,
        ),
        ("momentum(beta) { sign }", SoapRecipeError, r"'momentum' is not a scope and takes no block", 17),
        ("rotate(left) { momentum(beta) |> lr }", SoapRecipeError, r"'lr' applies the update", 50),
        ("m(beta) |> sign", SoapRecipeError, r"macro 'm' expands into itself \(m -> m\)", 17),
    ],
)
def test_a_macro_with_required_parameters_is_checked_where_it_is_defined(body, cls, pattern, col):
    """A macro whose parameters have no default was skipped where it was defined, so that
    `soapdsl check` passed a macro library with a misspelt operator, a recursion or an `lr`
    inside a scope, until some recipe used the macro: what does not depend on the arguments'
    values is checked there too."""
    with pytest.raises(cls, match=pattern) as info:
        library.resolve(f"macro m(beta) = {body}\nrecipe r(lr=1) = sign\n")
    assert (info.value.loc.line, info.value.loc.col) == (1, col)
    assert info.value.notes == ()


def test_a_macro_with_required_parameters_leaves_their_values_to_its_uses():
    """Arguments that read a required parameter cannot be validated where the macro is
    defined (its value is known at a use); the rest of the stage's arguments are."""
    library.resolve(
        "macro m(beta, side) = rotate(side, freq=3) { momentum(beta * 2) } |> graft(norm, from=side)\n"
        "recipe r(lr=1) = sign\n"
    )
    with pytest.raises(SoapArgumentError, match=r"invalid freq=0 for 'rotate'"):
        library.resolve("macro m(beta) = rotate(left, freq=0) { momentum(beta) }\nrecipe r(lr=1) = sign\n")


def test_an_error_in_another_macro_names_the_definition_being_checked():
    with pytest.raises(SoapRecipeError, match=r"expands into itself") as info:
        library.resolve("macro a(x=1) = b\nmacro b(x=1) = a\nrecipe r(lr=1) = sign\n")
    assert info.value.notes == ("in macro 'b' used at <inline>:1:16", "in macro 'a' defined at <inline>:1:1")


# -- choices given from outside the recipe text -------------------------------------------------


def test_a_misspelt_choice_given_as_an_argument_gets_a_suggestion():
    with pytest.raises(
        SoapArgumentError, match=r"expected one of auto, fp32, bf16, fp64; did you mean 'bf16'\?"
    ) as info:
        soapdsl.build("muon", [("w", torch.nn.Parameter(torch.zeros(4, 3)))], ns_dtype="bf17")
    assert "ns_dtype = bf17" in info.value.notes


MISSING_PIPE = "two stages in a row need '|>' between them"


@pytest.mark.parametrize(
    ("source", "cls", "where"),
    [
        ("sign sign", SoapSyntaxError, "1:6"),
        ("momentum(0.9) adam |> lr", SoapSyntaxError, "1:15"),
        ("rotate(left) { sign sign } |> lr", SoapSyntaxError, "1:21"),
        ("recipe r(lr=1) = sign sign", SoapSyntaxError, "1:23"),
        ("recipe r(lr=1e-3):\n  route default: momentum(0.9) rms_normalize(0.99, 1e-8)\n", SoapSyntaxError, "2:32"),
    ],
)
def test_a_missing_pipe_between_two_stages_is_named(source, cls, where):
    """The parser has already reduced the first stage when it meets the second, so '|>' is not
    among its expected tokens: a note says what is missing."""
    with pytest.raises(cls) as info:
        library.resolve(source)
    assert f"{info.value.loc.line}:{info.value.loc.col}" == where
    assert f"note: {MISSING_PIPE}" in str(info.value)


@pytest.mark.parametrize(
    "source",
    ["recipe r(lr=1):\n  route matrix foo: sign\n", "recipe r(lr=1) foo", "recipe r(lr=1e-3) = sign\nmomentum |> lr\n"],
)
def test_no_missing_pipe_note_where_a_pipe_would_not_help(source):
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    assert MISSING_PIPE not in str(info.value)


def _macro_chain(n: int) -> str:
    return "".join(f"macro m{i} = m{i + 1}\n" for i in range(n)) + f"macro m{n} = sign\nrecipe r(lr=1) = m0 |> lr\n"


def test_a_long_macro_chain_is_refused_not_a_recursion_error():
    """500 macros each calling the next ran the checker out of Python's recursion limit."""
    library.resolve(_macro_chain(99))
    with pytest.raises(SoapRecipeError, match=r"macros may nest at most 100 deep") as info:
        library.resolve(_macro_chain(500))
    assert len(info.value.notes) == 9 and info.value.notes[-1].startswith("...")


def test_a_shipped_recipe_used_as_a_stage_says_what_it_is():
    with pytest.raises(SoapNameError, match=r"unknown operator 'muon'\n") as info:
        library.resolve("recipe r(lr=1):\n  route matrix: muon\n  route default: adamw\n")
    assert len(info.value.notes) == 1 and info.value.notes[0].startswith("'muon' is a shipped recipe; a stage is")


@pytest.mark.parametrize(
    ("text", "name", "where"),
    [
        ("recipe a(lr=1) = sign |> a\n", "a", "<inline>:1:1"),
        ("recipe a(lr=1) = b\nrecipe b(lr=1) = a\n", "b", "<inline>:2:1"),
        ("recipe a(lr=1):\n  route default: b |> lr\nrecipe b(lr=1) = sign\n", "b", "<inline>:3:1"),
    ],
    ids=["itself", "each other", "another"],
)
def test_a_recipe_of_the_source_used_as_a_stage_says_what_it_is(text, name, where):
    """`recipe a(lr=1) = a`, or two recipes calling each other, said only "unknown operator 'a'",
    of a name the source had just defined."""
    with pytest.raises(SoapNameError, match=rf"unknown operator '{name}'\n") as info:
        library.check_source(soapdsl.parse(text))
    assert info.value.notes == (
        f"'{name}' is a recipe of this source ({where}); a stage is an operator or a macro, and no recipe"
        " can be called, by another or by itself: to share a pipeline, write it as a macro (macro NAME(...) = ...)",
    )
    with pytest.raises(SoapNameError) as info:
        library.resolve("recipe r(lr=1) = sgn |> lr")
    assert info.value.notes == ()


@pytest.mark.parametrize(
    ("source", "word", "keyword", "where"),
    [
        ("Recipe r(lr=1) = sign", "Recipe", "recipe", "1:1"),
        ("recpie r(lr=1) = sign", "recpie", "recipe", "1:1"),
        ("recipe a(lr=1) = sign\nRECIPE b(lr=1) = sign\n", "RECIPE", "recipe", "2:1"),
        ("marco m(b=1) = sign\nrecipe r(lr=1) = m\n", "marco", "macro", "1:1"),
        ("recipe r(lr=1):\n  route matrix: sign\n  Route default: sign\n", "Route", "route", "3:3"),
        ("recipe r(lr=1):\n  route matrix: sign\n  rout default: sign\n", "rout", "route", "3:3"),
    ],
)
def test_a_misspelt_keyword_is_named(source, word, keyword, where):
    """The parser read `Recipe` as a stage and stopped at the name after it, with the advice
    that two stages need '|>' between them; the fault is the keyword."""
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    assert info.value.message == f"'{word}' is not a keyword; did you mean '{keyword}'?"
    assert f"{info.value.loc.line}:{info.value.loc.col}" == where
    assert info.value.loc.end_col - info.value.loc.col == len(word)
    assert info.value.notes == ()


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("route default: sign\n", "1:1"),
        ("recipe r(lr=1) = sign\nroute matrix: sign\n", "2:1"),
        ("recipe r(lr=1) =\n  momentum\n  route matrix: sign\n", "3:3"),
    ],
)
def test_a_route_outside_a_recipe_is_named(source, where):
    """It read as the stage 'route' followed by another ("two stages in a row need '|>'"), or
    as an unexpected 'route' after a short-form recipe."""
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    assert info.value.message.startswith("a route outside a recipe: routes follow a header written with ':'")
    assert f"{info.value.loc.line}:{info.value.loc.col}" == where


@pytest.mark.parametrize(
    ("source", "where", "keyword", "at"),
    [
        ("recipe r(lr=1):\n  route vector: sign |>\n  route default: sign\n", "2:22", "route", "3:3"),
        ("recipe r(lr=1):\n  route vector: sign |>  # c\n\n  route not matrix: sign\n", "2:22", "route", "4:3"),
        ('recipe r(lr=1):\n  route vector: sign |>\n  route "a*": sign\n', "2:22", "route", "3:3"),
        ("recipe r(lr=1) = sign |>\nrecipe s(lr=1) = sign\n", "1:23", "recipe", "2:1"),
        ("macro m = sign |>\nmacro n = sign\n", "1:16", "macro", "2:1"),
    ],
)
def test_a_pipe_that_ends_a_line_before_a_keyword_is_named(source, where, keyword, at):
    """`sign |>` and then a line `route default: sign`: the '|>' read the keyword as a stage,
    and the error was an unexpected ':' or '=' on the next line (or, after `route not`, two
    stages in a row without '|>')."""
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    assert info.value.message == "'|>' with no stage after it: a pipeline cannot end in '|>'"
    assert f"{info.value.loc.line}:{info.value.loc.col}" == where
    assert info.value.loc.end_col - info.value.loc.col == 2
    assert info.value.notes == (f"'{keyword}' at <inline>:{at} starts a {keyword}, which '|>' would read as a stage",)


@pytest.mark.parametrize(
    "source", ["def r(lr=1) = sign", "recipe r(lr=1) = sign\n  rotate sign\n", "rotate(left) { Route sign } |> lr"]
)
def test_a_word_far_from_a_keyword_keeps_the_missing_pipe_note(source):
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    assert "is not a keyword" not in str(info.value)
    assert f"note: {MISSING_PIPE}" in str(info.value)


_M = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("call", "cls", "message"),
    [
        (
            lambda: soapdsl.build(_M, "adamw"),
            SoapError,
            "a recipe is a name, a path or recipe text, got Linear; the recipe comes first:"
            " soapdsl.build(recipe, model, ...)",
        ),
        (
            lambda: soapdsl.from_config({"recipe": "adamw"}, _M),
            SoapConfigError,
            "a config is a dict, YAML text or a path to a YAML file, got Linear; the model comes first:"
            " soapdsl.from_config(model, cfg)",
        ),
        (
            lambda: soapdsl.apply(torch.ones(3), "sign"),
            SoapArgumentError,
            "apply() takes a tensor, got str; the pipeline comes first: soapdsl.apply(pipeline, tensor)",
        ),
        # a string was iterated character by character: "parameter 'param.0' is a str"
        (
            lambda: soapdsl.build("adamw", "model"),
            SoapArgumentError,
            "params must be an nn.Module or an iterable of parameters, got str",
        ),
    ],
)
def test_arguments_in_the_wrong_order_are_named(call, cls, message):
    with pytest.raises(cls) as info:
        call()
    assert info.value.message == message


# -- a decimal comma: valid text that most likely does not say what was meant ----------------

DECIMAL_COMMAS = [
    # (source, "line:col" of the warning, what it says the text reads as, the caret line)
    ("rms_normalize(0,999) |> lr", "1:15", "beta=0 and eps=999", "              ^^^^^"),
    ("newton_schulz(5, coeffs=(3,4445, -4.775, 2.0315)) |> lr", "1:26", "items 0 and 1 of coeffs", " " * 25 + "^" * 6),
]


@pytest.mark.parametrize(("source", "where", "reading", "caret"), DECIMAL_COMMAS, ids=["two-args", "tuple-items"])
def test_a_decimal_comma_where_a_real_number_goes_warns_with_its_location(source, where, reading, caret):
    with pytest.warns(soapdsl.SoapWarning) as record:
        try:
            soapdsl.compile(source, torch.nn.Linear(3, 2))
        except SoapError:
            pass  # coeffs=(3, 4445, ...) has too many items: the warning comes first
    (w,) = [r.message for r in record]
    assert f"{w.loc.line}:{w.loc.col}" == where
    assert reading in w.message and "a decimal comma?" in w.message
    lines = str(w).splitlines()
    assert lines[0].startswith(f"<inline>:{where}: warning: ")
    assert lines[1:] == [
        f"    1 | {source}",
        f"      | {caret}",
        f"  note: to mean two numbers, write them with a space: '{', '.join(w.message.split(chr(39))[1].split(','))}'",
    ]
    assert record[0].filename == __file__  # the warning names the user's line, not soapdsl's


def test_a_decimal_comma_that_then_fails_to_check_warns_before_the_error():
    with pytest.warns(soapdsl.SoapWarning, match="beta=0 and nesterov=95"), pytest.raises(SoapArgumentError):
        soapdsl.compile("momentum(0,95) |> lr", torch.nn.Linear(3, 2))


@pytest.mark.parametrize(
    "source",
    [
        "rms_normalize(0, 999) |> lr",  # two numbers, written as two
        "rms_normalize(0.999) |> lr",
        "rms_normalize(0 ,999) |> lr",
        "rms_normalize(0e0,999) |> lr",  # not plain digits
        "rotate(left, freq=((100,1),10)) { sqrt_whiten } |> lr",  # integers: a schedule
        "rotate(left,freq=10) { sqrt_whiten } |> lr",
        "recipe m(lr=0.1):\n  route ndim == 2: newton_schulz(5,(3.4445,-4.775,2.0315)) |> lr\n"
        "  route default: sign |> lr",
    ],
)
def test_no_decimal_comma_warning_for_what_reads_as_written(source):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soapdsl.compile(source, torch.nn.Linear(3, 2))


def test_a_decimal_comma_after_a_keyword_is_noted_in_the_error():
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.compile("rms_normalize(beta=0,999) |> lr", torch.nn.Linear(3, 2))
    assert info.value.notes == ("a decimal comma? the decimal point is '.': beta=0.999",)


def test_the_cli_prints_a_decimal_comma_warning_as_it_prints_errors(tmp_path, capsys):
    from soapdsl.cli import main

    f = tmp_path / "dc.soap"
    f.write_text("recipe dc(lr=0.001) =\n  rms_normalize(0,999) |> lr\n")
    with warnings.catch_warnings():
        warnings.simplefilter("always", soapdsl.SoapWarning)
        assert main(["check", str(f)]) == 0  # valid text: a warning, not an error
    err = capsys.readouterr().err
    # made an error (python -W error), it prints as one and fails the check, without a traceback
    with warnings.catch_warnings():
        warnings.simplefilter("error", soapdsl.SoapWarning)
        assert main(["check", str(f)]) == 1
    assert capsys.readouterr().err == err
    assert err.splitlines() == [
        f"{f}:2:17: warning: '0,999' in 'rms_normalize' reads as two numbers, beta=0 and eps=999; a decimal comma?"
        " the decimal point is '.': 0.999",
        "    2 |   rms_normalize(0,999) |> lr",
        "      |                 ^^^^^",
        "  note: to mean two numbers, write them with a space: '0, 999'",
    ]


def test_a_decimal_comma_in_a_value_outside_recipe_text_is_named(tmp_path, capsys):
    from soapdsl.cli import main

    hint = "; a decimal comma? the decimal point is '.': 0.9"
    assert main(["compile", "adamw", "--set", "beta1=0,9"]) == 1
    assert capsys.readouterr().err.strip() == "error: --set beta1: expected one value, got '0,9'" + hint
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.build("adamw", torch.nn.Linear(2, 2), beta1="0,9")
    assert info.value.message == "argument beta1 of recipe 'adamw' must be a number, got '0,9'" + hint
    cfg = tmp_path / "opt.yaml"
    cfg.write_text("optimizer:\n  recipe: adamw\n  args:\n    beta1: 0,9\n")  # YAML reads a string
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.from_config(torch.nn.Linear(2, 2), cfg)
    assert info.value.message.endswith(hint) and (info.value.loc.line, info.value.loc.col) == (4, 5)


# -- a missing argument says how to give it ------------------------------------------------


def test_a_missing_macro_argument_notes_what_it_takes():
    with pytest.raises(SoapArgumentError) as info:
        library.resolve("macro look(s) = rotate(left) { sign |> graft(mode=s) }\nrecipe r(lr=1) = look |> lr\n")
    assert info.value.notes == ("s is argument 'mode' of 'graft', which takes one of norm, rms",)


@pytest.mark.parametrize(
    ("recipe", "reader"),
    [
        ("recipe r(lr=0.1, beta) = momentum(beta) |> lr", "beta is argument 'beta' of 'momentum', which takes"),
        ("recipe r(lr) = momentum(0.9) |> lr", "lr is the learning rate, a number >= 0"),
        (
            "recipe r(lr=0.1, beta):\n  route vector [lr=beta]: sign\n  route default: sign\n",
            "beta is the learning rate of route 'vector', a number >= 0",
        ),
    ],
)
def test_a_missing_recipe_argument_notes_what_reads_it_and_how_to_pass_it(recipe, reader):
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.build(recipe, [("w", torch.nn.Parameter(torch.zeros(2, 2)))])
    k = info.value.message.split("'")[3]
    assert info.value.notes[0].startswith(reader)
    assert info.value.notes[-1] == (
        f"pass {k}=...: build(..., {k}=...), --set {k}=... (compile), RECIPE:{k}=... (race),"
        f" or args: {{{k}: ...}} (config)"
    )


class _Bounded(registry.OpArgs):
    beta: registry.Hyper = pydantic.Field(ge=0.0, lt=1.0)
    side: Literal["left", "right"] = "left"


class _NeedsBeta(registry.Op):
    """An op with a required argument (no shipped op has one)."""

    name = "needs_beta"
    Args = _Bounded


class _NeedsSide(registry.Op):
    name = "needs_side"

    class Args(registry.OpArgs):
        side: Literal["left", "right"]


@pytest.mark.parametrize(
    ("cls", "message", "note"),
    [
        (
            _NeedsBeta,
            "'needs_beta' needs argument 'beta': write needs_beta(beta=...)",
            "beta takes a number >= 0.0, < 1.0",
        ),
        (_NeedsSide, "'needs_side' needs argument 'side': write needs_side(side=...)", "side takes one of left, right"),
    ],
)
def test_a_missing_operator_argument_says_how_to_write_it_and_what_it_takes(monkeypatch, cls, message, note):
    monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    with pytest.raises(SoapArgumentError) as info:
        library.resolve(f"momentum |> {cls.name} |> lr")
    assert info.value.message == message and info.value.notes == (note,)
    assert (info.value.loc.line, info.value.loc.col) == (1, 13)


def test_a_long_source_line_is_shown_in_part_around_the_span():
    """A line of thousands of characters (a 5000-digit literal, generated recipe text) is cut to
    the span and some context, marked '...', with the caret still under the span."""
    src = "momentum(0.9)" + " " * 300 + "|> newton_shulz(5) |> lr" + " " * 300
    with pytest.raises(SoapNameError) as info:
        soapdsl.compile(src, torch.nn.Linear(3, 2))
    _, shown, caret = str(info.value).splitlines()[:3]
    assert len(shown) < 200 and shown.startswith("    1 | ...") and shown.endswith("...")
    at = caret.index("^")
    assert shown[at : at + len("newton_shulz")] == "newton_shulz" and caret[at:] == "^" * len("newton_shulz")
    with pytest.raises(SoapSyntaxError) as info:  # a span longer than the window: cut too
        soapdsl.compile("lr(" + "9" * 5000 + ")", torch.nn.Linear(3, 2))
    assert len(str(info.value)) < 600
    _, shown, caret = str(info.value).splitlines()[:3]
    assert shown.startswith("    1 | lr(999") and shown.endswith("9...") and caret.index("^") == shown.index("9")


def test_torch_betas_in_an_operator_names_both_betas() -> None:
    with pytest.raises(SoapArgumentError, match=r"'adamw' has no parameter 'betas'; write beta1 and beta2"):
        soapdsl.build("adamw(betas=(0.9, 0.99)) |> lr", [torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)


def test_torch_betas_names_every_beta_of_ademamix() -> None:
    with pytest.raises(
        SoapNameError, match=r"write beta1, beta2 and beta3 \(torch's betas=\(beta1, beta2, beta3\) is 3"
    ):
        soapdsl.build("ademamix", [torch.nn.Parameter(torch.zeros(2, 2))], betas=(0.9, 0.999, 0.9999))


@pytest.mark.parametrize(
    ("recipe", "given", "hint"),
    [
        # the reference's keyword names, which difflib answers wrongly or not at all
        ("soap", "precondition_frequency", "did you mean 'freq'? (the reference's precondition_frequency)"),
        ("soap", "max_precond_dim", "did you mean 'max_dim'? (the reference's max_precond_dim)"),
        ("soap_muon", "newton_schulz_steps", "did you mean 'ns_steps'? (the reference's newton_schulz_steps)"),
        ("muon", "adjust_lr_fn", "did you mean 'adjust_lr'? (the reference's adjust_lr_fn)"),
        ("adamw", "foreach", "soapdsl picks the kernel per route itself"),
        ("muon", "fused", "soapdsl picks the kernel per route itself"),
    ],
)
def test_reference_keyword_names_point_at_soapdsl_names(recipe, given, hint) -> None:
    with pytest.raises(SoapNameError) as info:
        soapdsl.build(recipe, [torch.nn.Parameter(torch.zeros(2, 2))], **{given: 1})
    assert info.value.message.startswith(f"recipe '{recipe}' has no parameter '{given}'; {hint}"), info.value.message


@pytest.mark.parametrize(("given", "shipped"), [("AdamW", "adamw"), ("SOAP", "soap"), ("Soap_Muon", "soap_muon")])
def test_a_recipe_name_in_capitals_is_told_the_lower_case_name(given, shipped) -> None:
    with pytest.raises(SoapNameError, match=rf"unknown recipe '{given}'; recipe names are lower case: '{shipped}'"):
        soapdsl.build(given, [torch.nn.Parameter(torch.zeros(2, 2))])


@pytest.mark.parametrize(
    ("item", "col", "comment"),
    [("lr=1e-3 # c", 9, "# c"), ("lr=1e-3#", 8, "#"), ("lr=(0.9, # beta2", 10, "# beta2")],
)
def test_a_comment_in_a_set_value_is_refused_at_the_comment(capsys, item, col, comment):
    """The value is parsed as x(VALUE): a comment ran over the wrapper's ')', and the error asked
    for a ')' (or '%', ...) the user never wrote."""
    from soapdsl.cli import main

    assert main(["compile", "adamw", "--set", item, "--shapes", "w=4x3"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"<--set lr>:1:{col}: syntax error: --set lr: a value cannot hold a comment ('#' starts one):"
        f" leave out {comment!r}",
        f"    1 | {item}",
        "      | " + " " * (col - 1) + "^" * len(comment),
    ]


def test_a_comment_in_a_race_override_is_refused_and_a_hash_in_a_string_is_none():
    from soapdsl.race.spec import parse_overrides

    spec = "adamw:lr=1e-3 # c,beta1=0.9"
    with pytest.raises(SoapSyntaxError) as info:
        parse_overrides("lr=1e-3 # c,beta1=0.9", spec)
    assert info.value.message == (
        f"recipe spec '{spec}': lr: a value cannot hold a comment ('#' starts one): leave out '# c'"
    )
    assert (info.value.loc.col, info.value.loc.end_col) == (15, 18)
    assert parse_overrides("match='a#b'", "x:match='a#b'") == {"match": "a#b"}
