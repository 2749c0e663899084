"""Hypothesis fuzzing: only soapdsl errors escape the parser, checker and compiler, and the
canonical printer round-trips every generated AST."""

from __future__ import annotations

import string

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import soapdsl
from soapdsl import library, registry
from soapdsl.errors import SoapError
from soapdsl.syntax import ast as A
from soapdsl.syntax.formatter import format_module
from tests.test_fmt import assert_fmt_keeps

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

TOKENS = [
    "recipe",
    "macro",
    "route",
    "default",
    "vector",
    "matrix",
    "and",
    "or",
    "not",
    "as",
    "true",
    "false",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "=",
    "|>",
    "+",
    "-",
    "*",
    "/",
    "<",
    ">=",
    "==",
    "#c\n",
    "\n",
    "lr",
    "momentum",
    "rms_normalize",
    "sign",
    "scale",
    "decay",
    "newton_schulz",
    "clip",
    "bias_correct",
    "beta",
    "eps",
    "x",
    "left",
    "0",
    "1",
    "0.9",
    "1e-8",
    "-1",
    '"w*"',
    "'s'",
    "ndim",
    "max_dim",
    "adamw",
    "adam",
    " ",
    "  ",
    "@",
    "$",
    '"',
    "\\",
]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_token_soup_only_raises_soap_errors(text):
    try:
        module = soapdsl.parse(text)
    except SoapError:
        return
    assert_fmt_keeps(text)  # comments ("#c") included
    try:
        library.check_source(module)
    except SoapError:
        pass


@FUZZ
@given(st.text(alphabet=string.printable, max_size=80))
def test_arbitrary_text_only_raises_soap_errors(text):
    try:
        library.resolve(text if text.strip() else "x" + text)
    except SoapError:
        pass


# -- generated ASTs -------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in {"recipe", "macro", "route", "and", "or", "not", "as", "true", "false"}
)
nums = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9),
).map(A.Num)
leaves = st.one_of(
    nums,
    st.text(alphabet=string.ascii_letters + " #'\"\\", max_size=6).map(A.Str),
    st.booleans().map(A.Bool),
    names.map(A.Name),
)


def exprs():
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner, inner).map(lambda t: A.BinOp(*t)),
            inner.filter(lambda e: not isinstance(e, A.Num)).map(A.Neg),
            st.lists(inner, max_size=3).map(lambda xs: A.Tuple(tuple(xs))),
        ),
        max_leaves=6,
    )


def stages(depth: int = 2):
    block = st.none() if depth == 0 else st.one_of(st.none(), pipelines(depth - 1))
    args = st.lists(st.tuples(st.one_of(st.none(), names), exprs()), max_size=3).map(
        lambda xs: tuple(A.Arg(n, v) for n, v in sorted(xs, key=lambda a: a[0] is not None))
    )
    return st.builds(A.Stage, names, args, block, st.one_of(st.none(), names))


def pipelines(depth: int = 2):
    return st.lists(stages(depth), min_size=1, max_size=3).map(lambda ss: A.Pipeline(tuple(ss)))


selectors = st.recursive(
    st.one_of(
        st.text(alphabet=string.ascii_letters + "*.?", min_size=1, max_size=6).map(A.SelPattern),
        st.sampled_from(["default", "vector", "matrix"]).map(A.SelName),
        st.tuples(st.sampled_from(["ndim", "max_dim"]), st.sampled_from(["<", ">=", "=="]), nums).map(
            lambda t: A.SelCompare(*t)
        ),
    ),
    lambda inner: st.one_of(
        inner.map(A.SelNot),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: A.SelAnd(tuple(xs))),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: A.SelOr(tuple(xs))),
    ),
    max_leaves=4,
)
params = st.lists(st.tuples(names, st.one_of(st.none(), nums)), max_size=3, unique_by=lambda t: t[0]).map(
    lambda xs: tuple(A.Param(n, d) for n, d in xs)
)
routes = st.builds(
    A.Route,
    selectors,
    st.lists(st.tuples(names, exprs()), max_size=2).map(lambda xs: tuple(A.Setting(n, v) for n, v in xs)),
    pipelines(1),
)
recipes = st.builds(A.Recipe, names, params, st.lists(routes, min_size=1, max_size=3).map(tuple))
macros = st.builds(A.Macro, names, params, pipelines(1))
modules = st.builds(
    A.Module, st.lists(st.one_of(recipes, macros), max_size=3).map(tuple), st.one_of(st.none(), pipelines(1))
)


@FUZZ
@given(modules)
def test_print_parse_identity_on_generated_asts(module):
    text = format_module(module)
    again = soapdsl.parse(text)
    assert again == module, text
    assert format_module(again) == text


#: comments to put between tokens: at the end of a line, on a line of its own, set apart
COMMENTS = ["  # t{}\n", "\n# o{}\n", "\n  # i{}\n", "\n\n# b{}\n\n"]


@settings(FUZZ, max_examples=100)
@given(modules, st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(COMMENTS)), max_size=6))
def test_fmt_keeps_comments_and_meaning_on_generated_sources(module, comments):
    """Comments anywhere between tokens: fmt keeps them all, in order, and the tree and the
    documentation comments unchanged, and its output is a fixpoint."""
    text = format_module(module)
    gaps = [i for i, ch in enumerate(text) if ch in " \n"] + [0, len(text)]
    for n, (i, comment) in enumerate(sorted(((gaps[w % len(gaps)], c) for w, c in comments), reverse=True)):
        text = text[:i] + comment.format(n) + text[i:]
    try:
        source = soapdsl.parse(text)
    except SoapError:  # a comment in a string literal
        assume(False)
    assert source == module
    assert_fmt_keeps(text)


# -- generated ASTs too long for one line: the 88-column layout ------------------------------

long_names = st.from_regex(r"[a-z][a-z0-9_]{4,11}", fullmatch=True).filter(
    lambda s: s not in {"recipe", "macro", "route"}
)
long_leaves = st.one_of(nums, st.booleans().map(A.Bool), long_names.map(A.Name))


def long_stages(depth: int = 2):
    block = st.none() if depth == 0 else st.one_of(st.none(), long_pipelines(depth - 1))
    args = st.lists(st.tuples(st.one_of(st.none(), long_names), long_leaves), max_size=8).map(
        lambda xs: tuple(A.Arg(n, v) for n, v in sorted(xs, key=lambda a: a[0] is not None))
    )
    return st.builds(A.Stage, long_names, args, block, st.one_of(st.none(), long_names))


def long_pipelines(depth: int = 2):
    return st.lists(long_stages(depth), min_size=1, max_size=4).map(lambda ss: A.Pipeline(tuple(ss)))


long_params = st.lists(st.tuples(long_names, st.one_of(st.none(), nums)), max_size=10, unique_by=lambda t: t[0])
long_routes = st.builds(
    A.Route,
    selectors,
    st.lists(st.tuples(long_names, long_leaves), max_size=4).map(lambda xs: tuple(A.Setting(n, v) for n, v in xs)),
    long_pipelines(2),
)
long_modules = st.builds(
    A.Module,
    st.lists(
        st.one_of(
            st.builds(
                A.Recipe,
                long_names,
                long_params.map(lambda xs: tuple(A.Param(n, d) for n, d in xs)),
                st.lists(long_routes, min_size=1, max_size=3).map(tuple),
            ),
            st.builds(
                A.Macro, long_names, long_params.map(lambda xs: tuple(A.Param(n, d) for n, d in xs)), long_pipelines(2)
            ),
        ),
        max_size=2,
    ).map(tuple),
    st.one_of(st.none(), long_pipelines(2)),
)


@settings(FUZZ, max_examples=150)
@given(long_modules)
def test_long_generated_asts_fit_in_88_columns_and_round_trip(module):
    """With no token longer than a line, every line fits in 88 columns; printing is still the
    inverse of parsing, and idempotent."""
    text = format_module(module)
    assert max(map(len, text.splitlines()), default=0) <= 88, text
    again = soapdsl.parse(text)
    assert again == module, text
    assert format_module(again) == text


@settings(FUZZ, max_examples=60)
@given(long_modules, st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(COMMENTS)), max_size=6))
def test_fmt_keeps_comments_in_long_generated_sources(module, comments):
    text = format_module(module)
    gaps = [i for i, ch in enumerate(text) if ch in " \n"] + [0, len(text)]
    for n, (i, comment) in enumerate(sorted(((gaps[w % len(gaps)], c) for w, c in comments), reverse=True)):
        text = text[:i] + comment.format(n) + text[i:]
    assert soapdsl.parse(text) == module
    assert_fmt_keeps(text)


# -- generated recipes over the real operators ------------------------------------------------

OPS = sorted(registry.all_ops())
arg_values = st.one_of(
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(repr),
    st.integers(-3, 12).map(str),
    st.sampled_from(["true", "false", "left", "raw", "corrected", "ema", "sgd", "fp32", "(1, 2, 3)", "lr"]),
)
stage_text = st.tuples(st.sampled_from(OPS), st.lists(arg_values, max_size=3)).map(
    lambda t: f"{t[0]}({', '.join(t[1])})" if t[1] else t[0]
)
pipeline_text = st.lists(stage_text, min_size=1, max_size=4).map(" |> ".join)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(pipeline_text, st.sampled_from([(3,), (4, 3), (2, 3, 2), ()]))
def test_generated_pipelines_compile_and_step_or_raise_soap_errors(text, shape):
    p = torch.nn.Parameter(torch.randn(shape))
    try:
        opt = soapdsl.build(text, [("p", p)], lr=0.01)
    except SoapError:
        return
    p.grad = torch.randn(shape)
    opt.step()
    opt.step()
    assert p.shape == torch.Size(shape)
