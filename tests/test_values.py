"""Argument values: numbers are finite and never spelt as text, wherever they come from.

Python's float() reads "nan", "inf", "Infinity" and "0.5" as floats, and a literal such as
1e999 or an overflowing product is inf: none of these may reach a stage as a number. Each is
one located error naming the argument, from recipe text, Python keyword arguments, `--set`,
a YAML config or a param_group changed during training.
"""

from __future__ import annotations

import math
import re
import sys
import warnings

import pytest
import torch

import soapdsl
from soapdsl import library
from soapdsl.cli import main
from soapdsl.errors import (
    SoapArgumentError,
    SoapConfigError,
    SoapError,
    SoapNameError,
    SoapRouteError,
    SoapSyntaxError,
)
from soapdsl.ir import const_text

HUGE = "9" * 400  # an int literal no float can hold

# (id, source, error class, message regex, "line:col" of the caret)
SOURCES = [
    (
        "symbol-nan",
        "momentum(0.9) |> scale(nan)",
        r"invalid factor=nan for 'scale': expected a number, got the name 'nan' \(numbers must be finite\)",
        "1:24",
    ),
    (
        "symbol-inf",
        "momentum(0.9) |> scale(inf)",
        r"invalid factor=inf for 'scale': expected a number, got the name 'inf'",
        "1:24",
    ),
    (
        "symbol-Infinity",
        "scale(Infinity)",
        r"invalid factor=Infinity for 'scale': expected a number, got the name 'Infinity'",
        "1:7",
    ),
    ("symbol-inf-eps", "rms_normalize(0.99, inf)", r"invalid eps=inf for 'rms_normalize': expected a number", "1:21"),
    ("symbol-inf-decay", "decay(inf) |> sign", r"invalid weight_decay=inf for 'decay': expected a number", "1:7"),
    ("literal-overflow", "scale(1e999)", r"invalid factor=inf for 'scale': must be finite$", "1:7"),
    (
        "literal-overflow-eps",
        "rms_normalize(0.999, 1e999)",
        r"invalid eps=inf for 'rms_normalize': must be finite",
        "1:22",
    ),
    (
        "literal-overflow-int-field",
        "newton_schulz(1e999)",
        r"invalid steps=inf for 'newton_schulz': must be finite",
        "1:15",
    ),
    (
        "arithmetic-overflow",
        "scale(1e308 * 10)",
        r"invalid factor=inf for 'scale': must be finite \('1e\+308 \* 10' overflows\)",
        "1:7",
    ),
    (
        "int-too-large-for-float",
        f"scale({HUGE})",
        r"invalid factor=1e\+400 for 'scale': is too large for a float",
        "1:7",
    ),
    ("int-too-large-arithmetic", f"scale({HUGE} * 1.5)", r"is too large for a float", "1:7"),
    (
        "tuple-item-symbol",
        "newton_schulz(5, coeffs=(nan, 1, 2))",
        r"invalid coeffs=\(nan, 1, 2\) for 'newton_schulz': item 0: expected a number, got the name 'nan'",
        "1:26",
    ),
    ("tuple-item-overflow", "newton_schulz(5, coeffs=(1, 1e999, 2))", r"item 1: must be finite", "1:29"),
    ("tuple-item-string", 'newton_schulz(5, coeffs=(1, 2, "3"))', r"item 2: expected a number, got a string", "1:32"),
    (
        "schedule-item-string",
        'rotate(left, freq=((10, "2"), 5)) { sign }',
        r"invalid freq=\(\(10, \"2\"\), 5\) for 'rotate': item 0: expected a number, got a string",
        "1:20",
    ),
    (
        "string-for-float",
        'scale("0.5")',
        r"invalid factor=\"0\.5\" for 'scale': expected a number, got a string$",
        "1:7",
    ),
    (
        "string-for-int",
        'newton_schulz("5")',
        r"invalid steps=\"5\" for 'newton_schulz': expected a number, got a string",
        "1:15",
    ),
    ("union-number-overflow", "shampoo(exponent=1e999)", r"invalid exponent=inf for 'shampoo': must be finite", "1:18"),
    (
        "union-symbol-nan",
        "shampoo(exponent=nan)",
        r"invalid exponent=nan for 'shampoo': expected a number, got the name 'nan'",
        "1:18",
    ),
    (
        "union-misspelt-choice",
        "shampoo(exponent=clasic)",
        r"expected one of classic, power_half, or a number; did you mean 'classic'\?",
        "1:18",
    ),
    (
        "header-overflow",
        "recipe r(lr=1e-3, b=1e999) = scale(b)",
        r"invalid b=inf for recipe 'r': must be finite",
        "1:21",
    ),
    (
        "header-arithmetic-overflow",
        "recipe r(lr=1e308 * 10) = sign",
        r"invalid lr=inf for recipe 'r': must be finite",
        "1:13",
    ),
    (
        "header-symbol-via-parameter",
        "recipe r(lr=1e-3, f=inf) = scale(f)",
        r"invalid factor=inf for 'scale': expected a number, got the name 'inf'",
        "1:34",
    ),
    (
        "macro-header-overflow",
        "macro m(b=1e999) = scale(b)\nrecipe r(lr=1) = m\n",
        r"invalid b=inf for macro 'm': must be finite",
        "1:11",
    ),
    (
        "setting-overflow",
        "recipe r(lr=1e-3, b=0.9):\n  route default [b=1e999]: momentum(b)\n",
        r"invalid b=inf in route 'default': must be finite",
        "2:20",
    ),
    (
        "selector-overflow",
        "recipe r(lr=1e-3):\n  route numel > 1e999: sign\n  route default: sign\n",
        r"'numel >' needs a finite number, got inf",
        "2:17",
    ),
]


@pytest.mark.parametrize(("source", "pattern", "where"), [s[1:] for s in SOURCES], ids=[s[0] for s in SOURCES])
def test_non_numbers_in_source_are_located_errors(source, pattern, where):
    with pytest.raises(SoapError) as info:
        library.resolve(source)
    err = info.value
    assert isinstance(err, SoapArgumentError | SoapRouteError), f"{type(err).__name__}: {err}"
    assert re.search(pattern, err.message), err.message
    assert err.loc is not None and f"{err.loc.line}:{err.loc.col}" == where, str(err)


def test_a_misspelt_parameter_is_still_an_unknown_name():
    with pytest.raises(
        SoapNameError, match=r"unknown name 'lrr' for argument 'factor' of 'scale'; did you mean 'lr'\?"
    ):
        library.resolve("scale(lrr)")


def test_finite_values_still_pass():
    library.resolve("scale(-0.5) |> newton_schulz(5, coeffs=(3, -4, 2)) |> shampoo(exponent=0.25)")
    library.resolve(f"recipe r(lr=1e-3, big={HUGE}) = rotate(left, max_dim=big) {{ sign }}")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ({"weight_decay": float("inf")}, r"invalid weight_decay=inf for 'decay': must be finite"),
        ({"beta1": float("nan")}, r"invalid beta=nan for 'momentum': must be finite"),
        ({"eps": float("inf")}, r"invalid eps=inf for 'rms_normalize': must be finite"),
        ({"eps": "inf"}, r"invalid eps=inf for 'rms_normalize': must be finite"),  # a numeric parameter reads the text
        ({"lr": float("inf")}, r"has lr=inf; the learning rate must be a finite number >= 0"),
        ({"lr": float("nan")}, r"has lr=nan; the learning rate must be a finite number >= 0"),
    ],
)
def test_non_finite_python_arguments_are_refused(args, pattern):
    with pytest.raises(SoapArgumentError, match=pattern) as info:
        soapdsl.build("adamw", _model(), **args)
    assert info.value.loc is not None


def test_a_python_string_is_no_number_for_a_parameter_without_a_default():
    with pytest.raises(
        SoapArgumentError, match=r"invalid factor=\"0\.5\" for 'scale': expected a number, got a string"
    ):
        soapdsl.build("recipe r(lr=1e-3, f) = scale(f)", _model(), f="0.5")


FINITE = ": soapdsl has no inf or nan; give a finite value, or leave it out for the recipe's default"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("inf", "inf"),
        ("-inf", "-inf"),
        ("NaN", "NaN"),
        ("-nan", "-nan"),
        ("1e999", "1e999, which is inf"),
        ("(0.9, inf)", "(0.9, inf)"),
        ("-(inf)", "-(inf)"),
    ],
)
def test_set_on_the_command_line_is_refused_at_the_value(value, shown, capsys):
    """`-inf` was `cannot negate inf`, and `inf` was refused far from the --set, in the recipe."""
    code = main(["compile", "adamw", "--set", f"weight_decay={value}", "--shapes", "w=4x3"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [
        f"<--set weight_decay>:1:14: error: --set weight_decay must be a finite number, got {shown}{FINITE}",
        f"    1 | weight_decay={value}",
        "      |              " + "^" * len(value),
    ]


LONG = "1" * 5000  # past the 4300 digits Python's int() reads (sys.get_int_max_str_digits)
TOO_LONG = "a number of 5000 digits is too long: soapdsl reads integers of at most 4300 digits"


@pytest.mark.skipif(getattr(sys, "get_int_max_str_digits", lambda: 0)() != 4300, reason="Python's default limit")
def test_an_int_literal_past_pythons_digit_limit_is_a_located_error(capsys):
    """int() raised ValueError inside the parser (a lark VisitError traceback) and inside
    yaml.safe_load."""
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(f"momentum(0.9) |> scale({LONG}) |> lr")
    assert info.value.message == TOO_LONG and (info.value.loc.line, info.value.loc.col) == (1, 24)
    assert main(["compile", "adamw", "--set", f"lr={LONG}"]) == 1
    assert capsys.readouterr().err.startswith(f"<--set lr>:1:4: syntax error: {TOO_LONG}\n")
    with pytest.raises(SoapConfigError) as info:
        soapdsl.from_config(_model(), f"recipe: adamw\nargs:\n  lr: {LONG}\n")
    assert info.value.message == f"invalid YAML: {TOO_LONG}"
    assert (info.value.loc.file, info.value.loc.line, info.value.loc.col) == ("<config>", 3, 7)


def test_negating_inf_in_recipe_text_says_there_is_no_inf():
    with pytest.raises(SoapArgumentError) as info:
        library.resolve("momentum(0.9) |> scale(-inf) |> lr")
    assert (
        info.value.message
        == "cannot negate inf: soapdsl has no inf or nan ('inf' is a name here); write a finite number"
    )
    assert (info.value.loc.line, info.value.loc.col) == (1, 24)


@pytest.mark.parametrize(
    ("yaml_value", "shown"),
    [
        (".inf", "inf"),
        ("-.inf", "-inf"),
        (".nan", "nan"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("1e999", "1e999"),
        ("[0.9, .nan]", "(0.9, nan)"),
    ],
)
@pytest.mark.parametrize("recipe", ["adamw", "momentum(weight_decay) |> sign |> lr"], ids=["shipped", "inline"])
def test_yaml_infinity_is_refused_at_its_key(yaml_value, shown, recipe):
    """It was refused by the stage that reads it, in the recipe, away from the config."""
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.from_config(_model(), f"recipe: {recipe}\nargs:\n  lr: 1.0e-3\n  weight_decay: {yaml_value}\n")
    assert info.value.message == f"argument weight_decay must be a finite number, got {shown}{FINITE}"
    assert (info.value.loc.file, info.value.loc.line, info.value.loc.col) == ("<config>", 4, 3)


def test_yaml_number_text_still_works():
    # YAML 1.1 reads 3e-4 as text: a numeric recipe parameter takes it as the number it spells
    opt = soapdsl.from_config(_model(), "recipe: adamw\nargs: {lr: 3e-4, weight_decay: 1e-2}\n")
    assert opt.param_groups[0]["lr"] == 3e-4
    assert opt.param_groups[0]["weight_decay"] == 1e-2


@pytest.mark.parametrize(
    "recipe",
    [
        "momentum(beta) |> scale(f) |> lr",  # an inline pipeline: the arguments declare its parameters
        "recipe r(lr, beta, f) = momentum(beta) |> scale(f) |> lr",  # required parameters: no default
    ],
    ids=["inline", "required"],
)
def test_yaml_number_text_is_a_number_without_a_default_too(recipe):
    """`beta: 9e-1` reached the stage as the string "9e-1" (`expected a number, got a string`)
    where no numeric default said a number was meant."""
    text = f"recipe: '{recipe}'\nargs: {{lr: 1e-3, beta: 9e-1, f: 2.5e0}}\n"
    group = soapdsl.from_config(_model(), text).param_groups[0]
    assert (group["lr"], group["beta"], group["f"]) == (1e-3, 0.9, 2.5)
    assert isinstance(group["beta"], float)


def test_yaml_number_text_in_a_list_and_quoted_is_a_number():
    from soapdsl.config import _args

    assert _args({"a": ["1e-3", "2.0e3", "-.5E+1", 0.5], "b": "1e3", "c": "3e-4", "d": "left"}) == {
        "a": (1e-3, 2000.0, -5.0, 0.5),
        "b": 1000,  # an int, as a numeric parameter with an int default reads it
        "c": 3e-4,
        "d": "left",
    }
    group = soapdsl.from_config(_model(), "recipe: soap\nargs: {freq: 1e1, eps: '1e-6'}\n").param_groups[0]
    assert (group["freq"], group["eps"]) == (10, 1e-6) and isinstance(group["freq"], int)


def test_a_param_group_value_that_becomes_infinite_is_refused_at_the_next_step():
    model = _model()
    opt = soapdsl.build("adamw", model, lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.param_groups[0]["weight_decay"] = float("inf")
    with pytest.raises(SoapArgumentError, match=r"'decay' argument weight_decay became invalid.*must be finite"):
        opt.step()


# -- value display ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (10**20, "100000000000000000000"),
        (-(10**21) + 1, "-999999999999999999999"),
        (10**21, "1e+21"),
        (10**400, "1e+400"),
        (-(10**400), "-1e+400"),
        (int(HUGE), "1e+400"),
        (12345678901234567890123456, "1.2345678901234568e+25"),
        pytest.param(10**5000, "1e+5000", id="5001-digits"),  # str() refuses an int past 4300 digits
        ((1, 10**30), "(1, 1e+30)"),
        (3e-4, "0.0003"),
        (7, "7"),
    ],
)
def test_a_huge_int_shows_in_e_notation(value, text):
    assert const_text(value) == text


@pytest.mark.parametrize("big", [10**400, 10**5000], ids=["401-digits", "5001-digits"])
@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("lr", "route 'default' has lr={}; the learning rate"),
        ("beta1", "invalid beta={} for 'momentum': is too large for a float"),
        ("weight_decay", "invalid weight_decay=-{} for 'decay'"),
    ],
)
def test_a_huge_python_argument_shows_compactly_in_its_error(big, key, shown):
    """lr=10**400 was shown with all of its 401 digits (in the message and each note), and
    10**5000 raised ValueError from str() instead of the error."""
    value = -big if key == "weight_decay" else big
    exp = "1e+400" if big == 10**400 else "1e+5000"
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.build("adamw", _model(), **{key: value})
    assert shown.format(exp) in info.value.message
    assert len(str(info.value)) < 400, str(info.value)


def test_a_huge_param_group_value_shows_compactly_at_the_step():
    model = _model()
    opt = soapdsl.build("adamw", model)
    opt.param_groups[0]["lr"] = 10**400
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(SoapArgumentError, match=r"param_group\['lr'\] of route 'default' is 1e\+400;"):
        opt.step()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("ééé", '"ééé"'),
        ("漢字", '"漢字"'),
        ("a b", '"a b"'),
        ('a"b', '"a\\"b"'),
        ("x\n", '"x\\n"'),
        ("\u2028", '"\\u2028"'),
        ("left", "left"),
    ],
)
def test_text_values_show_as_written(value, text):
    assert const_text(value) == text


def test_non_ascii_text_in_an_error_is_shown_as_it_is():
    with pytest.raises(SoapArgumentError) as info:
        library.resolve('scale("ééé")')
    assert 'invalid factor="ééé" for' in info.value.message


CUT = "recipe r(lr=1e-3, cut):\n  route matrix and max_dim < cut: adamw\n  route default: sign |> lr\n"


def test_a_selector_may_compare_with_a_required_parameter():
    """check cannot know a required parameter's value: it leaves the comparison to the build."""
    assert library.resolve(CUT).name == "r"
    params = [("small", torch.nn.Parameter(torch.zeros(4, 4))), ("big", torch.nn.Parameter(torch.zeros(4, 64)))]
    plan = soapdsl.compile(CUT, params, cut=10)
    assert {e.name: rp.index for rp in plan.routes for e in rp.params} == {"small": 0, "big": 1}


@pytest.mark.parametrize(
    ("value", "pattern"),
    [("abc", r"needs a number, got abc"), (True, r"needs a number, got true"), (math.nan, r"needs a finite number")],
)
def test_a_required_parameter_in_a_selector_is_checked_at_the_build(value, pattern):
    with pytest.raises(SoapRouteError, match=r"'max_dim <' " + pattern) as info:
        soapdsl.compile(CUT, [("w", torch.nn.Parameter(torch.zeros(4, 4)))], cut=value)
    assert f"{info.value.loc.line}:{info.value.loc.col}" == "2:30"
    assert "recipe arguments given: cut=" in str(info.value)


# -- digits other than 0-9 ------------------------------------------------------------------

# NUMBER was `\d`, which is any Unicode digit: full-width and Arabic-Indic digits checked ok as
# numbers, while a name refuses any non-ASCII character
NON_ASCII_DIGITS = [
    ("recipe r(lr=\uff11e-3) = sign |> lr", "1:13", "'\uff11' (FULLWIDTH DIGIT ONE) is not an ASCII digit; write 1"),
    (
        "momentum(\u0660.\u0669) |> lr",
        "1:10",
        "'\u0660' (ARABIC-INDIC DIGIT ZERO) is not an ASCII digit; write 0.9 for '\u0660.\u0669'",
    ),
    ("newton_schulz(\uff15) |> lr", "1:15", "'\uff15' (FULLWIDTH DIGIT FIVE) is not an ASCII digit; write 5"),
    ("momentum(0.\u0669) |> lr", "1:12", "'\u0669' (ARABIC-INDIC DIGIT NINE) is not an ASCII digit; write 9"),
]


@pytest.mark.parametrize(("source", "where", "note"), NON_ASCII_DIGITS)
def test_a_digit_other_than_0_to_9_is_an_unexpected_character_with_the_ascii_digit(source, where, note):
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    err = info.value
    assert err.message == f"unexpected character {source[int(where[2:]) - 1]!r}"
    assert err.loc is not None and f"{err.loc.line}:{err.loc.col}" == where, str(err)
    assert err.notes == (note,)


@pytest.mark.parametrize(
    ("source", "plain", "name"),
    [
        ("rotate(side=\u201cleft\u201d) { sign } |> lr", '"', "LEFT DOUBLE QUOTATION MARK"),
        ("rotate(side=\u2018left\u2019) { sign } |> lr", "'", "LEFT SINGLE QUOTATION MARK"),
    ],
)
def test_a_typographic_quote_is_told_to_be_a_plain_one(source, plain, name):
    """A recipe pasted from a word processor or a web page: the bare 'unexpected character'
    did not say what was wrong with a quote that looks right."""
    with pytest.raises(SoapSyntaxError) as info:
        library.resolve(source)
    err = info.value
    assert err.loc is not None and (err.loc.line, err.loc.col) == (1, 13)
    assert err.notes == (
        f"{source[12]!r} ({name}) is a typographic quote; a string is written between plain {plain} quotes",
    )


def test_a_set_value_in_non_ascii_digits_is_refused_at_the_digit(capsys):
    assert main(["compile", "adamw", "--set", "lr=\uff11e-3", "--shapes", "w=4x3"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "<--set lr>:1:4: syntax error: unexpected character '\uff11'",
        "    1 | lr=\uff11e-3",
        "      |    ^^",  # a full-width character takes two columns
        "  note: '\uff11' (FULLWIDTH DIGIT ONE) is not an ASCII digit; write 1",
    ]


def test_a_number_as_text_in_non_ascii_digits_is_no_number():
    """A numeric parameter reads a Python or YAML string that spells a number (YAML 1.1 reads
    3e-4 as text), with float(), which reads any Unicode digit."""
    note = "'\uff11' (FULLWIDTH DIGIT ONE) is not an ASCII digit; write 1"
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.build("adamw", _model(), lr="\uff11e-3")
    assert info.value.message == f"argument lr of recipe 'adamw' must be a number, got '\uff11e-3': {note}"
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.from_config(_model(), "recipe: adamw\nargs: {eps: 2\u0665}\n")
    note = "'\u0665' (ARABIC-INDIC DIGIT FIVE) is not an ASCII digit; write 5"
    assert info.value.message == f"argument eps of recipe 'adamw' must be a number, got '2\u0665': {note}"
    assert info.value.loc is not None and (info.value.loc.line, info.value.loc.col) == (2, 8)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("newton_schulz(1e20)", "invalid steps=1e+20 for 'newton_schulz': must be < 100"),
        ("newton_schulz(-1e19)", "invalid steps=-1e+19 for 'newton_schulz': must be >= 0"),
        ("rotate(left, freq=((1e30, 1), 10)) |> sign", None),
        ("rotate(left, freq=1e30) |> sign", None),
    ],
)
def test_an_integral_float_past_int64_is_the_integer_it_spells(source, message):
    """An integral float is accepted for an int field (5.0 is 5), but pydantic reads one only
    below 2**63: 1e20 gave "unable to parse input string as an integer, exceeded maximum size",
    of a number that is no string, where 100000000000000000000 got its bound."""
    params = [torch.zeros(3, 3)]
    if message is None:
        soapdsl.compile(source, params)
        return
    with pytest.raises(SoapArgumentError) as info:
        soapdsl.compile(source, params)
    assert info.value.message == message


def test_an_inline_pipelines_arguments_are_read_as_a_recipes_are():
    """A named recipe's arguments were read as Python values (a NumPy or 0-d tensor scalar as
    the number it holds) and refused by type before the check; an inline pipeline's were not:
    a NumPy boolean was 'invalid nesterov=True ...: expected true or false', a set reached the
    operator ('a schedule is ...'), and a 0-d tensor that requires grad warned from inside
    pydantic."""
    np = pytest.importorskip("numpy")
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    opt = soapdsl.build("momentum(0.9, nesterov=n) |> sign", params, n=np.bool_(True))
    assert type(opt.param_groups[0]["n"]) is bool
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = soapdsl.build("momentum(b) |> sign", params, b=torch.tensor(0.5, requires_grad=True))
    assert opt.param_groups[0]["b"] == 0.5
    for value in ({1, 2}, {1: 2}, 1j, np.array([10])):
        with pytest.raises(SoapArgumentError) as info:
            soapdsl.build("rotate(left, freq=f) |> sign", params, f=value)
        assert info.value.message == (
            f"argument f of recipe 'inline' must be a number, boolean, name or tuple, got {type(value).__name__}"
        )
