"""The language's syntax: every construct parses to the expected AST; print -> parse is the identity."""

from __future__ import annotations

import sys

import pytest
import torch

import soapdsl
from soapdsl.errors import SoapSyntaxError
from soapdsl.resources import recipe_files
from soapdsl.syntax import ast as A
from soapdsl.syntax.formatter import format_module
from soapdsl.syntax.parser import MAX_DEPTH, parse_file

CARD = "rotate(left, freq=40) |> sqrt_whiten |> newton_schulz(5) |> graft(norm)"


def test_card_parses_verbatim():
    m = soapdsl.parse(CARD)
    assert m.definitions == ()
    stages = m.pipeline.stages
    assert [s.name for s in stages] == ["rotate", "sqrt_whiten", "newton_schulz", "graft"]
    assert stages[0].args == (A.Arg(None, A.Name("left")), A.Arg("freq", A.Num(40)))
    assert stages[1].args == () and not stages[1].has_parens
    assert stages[2].args == (A.Arg(None, A.Num(5)),)
    assert stages[3].args == (A.Arg(None, A.Name("norm")),)
    assert format_module(m) == CARD + "\n"


def test_literals():
    m = soapdsl.parse("f(1, 1e-8, 3.5, .5, 2E3, true, false, left, \"s t\", 'q', (1, 2), (1,), (), -1, -x, a - b * c)")
    values = [a.value for a in m.pipeline.stages[0].args]
    assert values[:5] == [A.Num(1), A.Num(1e-8), A.Num(3.5), A.Num(0.5), A.Num(2000.0)]
    assert isinstance(values[0].value, int) and isinstance(values[1].value, float)
    assert values[5:10] == [A.Bool(True), A.Bool(False), A.Name("left"), A.Str("s t"), A.Str("q")]
    assert values[10:13] == [A.Tuple((A.Num(1), A.Num(2))), A.Tuple((A.Num(1),)), A.Tuple(())]
    assert values[13] == A.Num(-1)
    assert values[14] == A.Neg(A.Name("x"))
    assert values[15] == A.BinOp("-", A.Name("a"), A.BinOp("*", A.Name("b"), A.Name("c")))


def test_blocks_labels_and_pipeline_arguments():
    m = soapdsl.parse("rotate(both) { rms_normalize(0.9) |> sign } as r |> graft(norm, from={ sign })")
    rot, graft = m.pipeline.stages
    assert rot.block is not None and [s.name for s in rot.block.stages] == ["rms_normalize", "sign"]
    assert rot.label == "r"
    assert isinstance(graft.args[1].value, A.Block)


def test_recipe_routes_selectors_settings_and_doc():
    text = (
        "# My recipe.\n"
        "# Second line.\n"
        "recipe mine(lr=3e-3, adam_lr=1e-3, big=10000):\n"
        '  route "embed*", "*.head.*" [lr=adam_lr]: adamw\n'
        "  route vector or ndim >= 3: adamw\n"
        "  route matrix and not (max_dim > big): momentum(0.9) |> newton_schulz(5)\n"
        "  route default: sign\n"
    )
    m = soapdsl.parse(text)
    (r,) = m.recipes
    assert r.name == "mine" and r.doc == "My recipe.\nSecond line."
    assert [p.name for p in r.params] == ["lr", "adam_lr", "big"]
    assert r.routes[0].selector == A.SelOr((A.SelPattern("embed*"), A.SelPattern("*.head.*")))
    assert r.routes[0].settings == (A.Setting("lr", A.Name("adam_lr")),)
    assert r.routes[1].selector == A.SelOr((A.SelName("vector"), A.SelCompare("ndim", ">=", A.Num(3))))
    assert r.routes[2].selector == A.SelAnd(
        (A.SelName("matrix"), A.SelNot(A.SelCompare("max_dim", ">", A.Name("big"))))
    )
    assert r.routes[3].selector == A.SelName("default")


def test_short_recipe_and_macros():
    m = soapdsl.parse("macro m(b=0.9, c) = momentum(b) |> scale(c)\nrecipe r(lr=1) = m(c=2)\n")
    macro, recipe = m.definitions
    assert isinstance(macro, A.Macro) and macro.params[1] == A.Param("c", None)
    assert isinstance(recipe, A.Recipe) and recipe.routes[0].selector == A.SelName("default")


def test_comments_and_hash_inside_strings():
    m = soapdsl.parse('# top\nsign # trailing\n|> scale(1) # "x"\n')
    assert [s.name for s in m.pipeline.stages] == ["sign", "scale"]
    m = soapdsl.parse('recipe r(lr=1):\n  route "a#b": sign\n')
    assert m.recipes[0].routes[0].selector == A.SelPattern("a#b")


def test_locations():
    m = soapdsl.parse("sign\n  |> newton_schulz(5)", "f.soap")
    ns = m.pipeline.stages[1]
    assert (ns.loc.file, ns.loc.line, ns.loc.col) == ("f.soap", 2, 6)
    assert ns.args[0].loc.line == 2 and ns.args[0].loc.col == 20


EXAMPLES = [
    CARD,
    "momentum(0.9, nesterov=true) |> newton_schulz(5, coeffs=(3.4445, -4.775, 2.0315)) |> lr",
    "scale(-(a - b) * 2 / (c + d)) |> scale(a - (b - c)) |> scale(-1) |> scale(2 * -x)",
    'recipe r(lr=0.01, x="a b", t=(1, (2, 3))):\n  route "w*" [lr=lr * 2]: sign\n  route default: lr\n',
    "recipe r(lr=1):\n  route (vector or matrix) and not ndim == 3: sign\n  route default: lr\n",
    "macro m(a, b=2) = scale(a) |> scale(b)\n\nrecipe r(lr=1) = m(1) as z",
    "f({ g |> h { i } }, k={ l })",
    "scale(1e999) |> scale(-1e999, 2 * -1e999)",  # too big for a float: inf, printed back as 1e999
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_print_parse_identity(text):
    m = soapdsl.parse(text)
    printed = format_module(m)
    again = soapdsl.parse(printed)
    assert again == m
    assert format_module(again) == printed  # canonical: printing is idempotent


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.name)
def test_shipped_recipes_round_trip(path):
    m = parse_file(path)
    assert soapdsl.parse(format_module(m)) == m


def test_printed_ir_is_checked_the_same():
    """Round trip through the printer preserves the checked IR, not just the AST."""
    from soapdsl import library

    for name in library.shipped_names():
        original = library.shipped(name)
        module = parse_file(next(p for p in recipe_files() if p.stem == name))
        recipes, _ = library.check_module(soapdsl.parse(format_module(module)))
        assert recipes[0] == original


# -- nesting depth -------------------------------------------------------------------------

#: sources nested ``d`` levels deep, each kind as the checker, compiler and runtime take it
NESTED = {
    "sum": lambda d: "recipe r(lr=1e-3) = scale(" + "+".join(["1"] * (d + 1)) + ") |> lr",
    "negation": lambda d: "recipe r(lr=1e-3, x=1) = scale(" + "-" * d + "x) |> lr",
    "tuple": lambda d: "recipe r(lr=1e-3) = scale(" + "(" * d + "1" + ",)" * d + ") |> lr",
    "blocks": lambda d: "recipe r(lr=1e-3) = " + "rotate(both) { " * d + "sign" + " }" * d + " |> lr",
    "block arguments": lambda d: "recipe r(lr=1e-3) = " + "sign |> graft(norm, from={ " * d + "sign" + " })" * d,
    "selector": lambda d: "recipe r(lr=1e-3):\n  route " + "not " * d + "vector: sign\n  route default: lr\n",
}


def _with_frames_used(n: int, f):
    """Call ``f`` with ``n`` more frames on the stack: a caller's own depth, as headroom."""
    return f() if n == 0 else _with_frames_used(n - 1, f)


@pytest.mark.parametrize("kind", ["sum", "negation", "blocks", "block arguments"])
def test_source_at_the_depth_limit_builds_and_steps(kind):
    text = NESTED[kind](MAX_DEPTH)

    def build_and_step() -> None:
        module = soapdsl.parse(text)
        assert soapdsl.parse(format_module(module)) == module
        p = torch.nn.Parameter(torch.ones(3, 2))
        opt = soapdsl.build(text, [("w", p)])
        p.grad = torch.ones(3, 2)
        opt.step()
        opt.load_state_dict(opt.state_dict())

    # the deepest stack soapdsl uses here, plus 150 frames that a caller may have used already
    assert sys.getrecursionlimit() >= 1000
    _with_frames_used(150, build_and_step)


@pytest.mark.parametrize("kind", NESTED)
def test_source_past_the_depth_limit_is_one_located_error(kind):
    soapdsl.parse(NESTED[kind](MAX_DEPTH))
    with pytest.raises(SoapSyntaxError, match=rf"expression nested too deeply \(more than {MAX_DEPTH} levels\)") as e:
        soapdsl.parse(NESTED[kind](MAX_DEPTH + 1), "deep.soap")
    assert e.value.loc is not None and e.value.loc.file == "deep.soap"


@pytest.mark.parametrize("n", [700, 3000])
def test_long_sums_and_deep_blocks_point_at_where_the_limit_is_crossed(n):
    with pytest.raises(SoapSyntaxError) as e:
        soapdsl.parse("scale(" + "+".join(["1"] * n) + ")")
    assert (e.value.loc.line, e.value.loc.col) == (1, 7)  # the chain, from its first term
    assert e.value.notes == ("each operator of a chain such as a + b + c counts one level",)
    head = "recipe r(lr=1e-3) = "
    with pytest.raises(SoapSyntaxError) as e:
        soapdsl.parse(head + "rotate(both) { " * n + "sign" + " }" * n)
    # the first block past the limit
    assert (e.value.loc.line, e.value.loc.col) == (1, len(head) + len("rotate(both) { ") * MAX_DEPTH + 1)


def test_a_long_run_of_minus_signs_on_a_number_is_just_a_number():
    # "- - 1" folds into the literal as it parses, so there is no nesting to refuse
    m = soapdsl.parse("scale(" + "-" * 1001 + "1)")
    assert m.pipeline.stages[0].args[0].value == A.Num(-1)


# -- what a syntax error expects ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # not ':' or ']' (from a selector's comparison, which shares the parser state), but '//'
        ("momentum(0.9 |> sign", "unexpected '|>'; expected '%', ')', '*', '+', ',', '-', '/', '//'"),
        ("f(1 2)", "unexpected '2'; expected '%', ')', '*', '+', ',', '-', '/', '//'"),
        (
            "recipe r(lr=1):\n  route default sign",
            "unexpected 'sign'; expected ',', ':', '[', 'and', 'or', a comparison (<, <=, ==, !=, >=, >)",
        ),
        ("f(a=)", "unexpected ')'; expected '(', '-', 'false', 'true', '{', a name, a number, a string"),
    ],
)
def test_syntax_errors_expect_only_what_would_be_accepted(text, expected):
    with pytest.raises(SoapSyntaxError) as e:
        soapdsl.parse(text)
    assert e.value.message == expected
