"""How a recipe argument is found: `file.soap::NAME`, shipped names, directories, byte-order
marks; the Python entry points' own arguments; carets under wide characters."""

from __future__ import annotations

import pytest
import torch

import soapdsl
from soapdsl import library
from soapdsl.cli import main as cli_main
from soapdsl.errors import Loc, SoapArgumentError, SoapError, SoapNameError, SoapSyntaxError
from soapdsl.race.spec import parse_spec


def params():
    return [("w", torch.nn.Parameter(torch.zeros(4, 3)))]


def raises(cls: type[SoapError], fn, *args, **kw) -> SoapError:
    with pytest.raises(SoapError) as info:
        fn(*args, **kw)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


# -- file.soap::NAME ------------------------------------------------------------------------------


@pytest.fixture
def soap_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.soap").write_text("recipe r(lr=1e-3):\n  route default: sign\n")
    (tmp_path / "two.soap").write_text("recipe fast(lr=1e-2) = sign\nrecipe slow(lr=1e-4) = momentum\n")
    (tmp_path / "bare.soap").write_text("sign |> lr\n")
    return tmp_path


def test_a_named_recipe_must_be_in_a_file_of_one_recipe(soap_files):
    err = raises(SoapNameError, soapdsl.build, "one.soap::nope", params())
    assert err.message == "no recipe 'nope' in one.soap (recipes: r)"
    assert soapdsl.build("one.soap::r", params()).plan.recipe.name == "r"
    assert soapdsl.build("one.soap", params()).plan.recipe.name == "r"


def test_a_wrong_name_in_a_file_of_several_says_it_is_not_among_them(soap_files):
    err = raises(SoapNameError, soapdsl.compile, "two.soap::fsat", params())
    assert err.message == "no recipe 'fsat' in two.soap; did you mean 'fast'? (recipes: fast, slow)"
    assert soapdsl.compile("two.soap::slow", params()).recipe.name == "slow"
    err = raises(SoapNameError, soapdsl.compile, "two.soap", params())
    assert "defines several recipes (fast, slow)" in err.message


def test_a_name_in_a_file_holding_a_bare_pipeline(soap_files):
    err = raises(SoapNameError, soapdsl.compile, "bare.soap::r", params())
    assert err.message == "no recipe 'r' in bare.soap (it holds a bare pipeline, not named recipes)"
    assert soapdsl.compile("bare.soap", params()).recipe.name == "inline"


def test_a_shipped_name_with_a_recipe_name():
    plain = soapdsl.compile("adamw", params()).fingerprint
    assert soapdsl.compile("adamw::adamw", params()).fingerprint == plain
    err = raises(SoapNameError, soapdsl.compile, "adamw::fast", params())
    assert err.message == "no recipe 'fast' in shipped 'adamw' (its file holds only 'adamw')"
    err = raises(SoapNameError, soapdsl.compile, "adamww::adamw", params())
    assert err.message.startswith("unknown recipe 'adamww'; did you mean 'adamw'?")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("two.soap::", "'two.soap::' names no recipe after '::' (two.soap defines fast, slow: write 'two.soap::fast')"),
        (
            "two.soap:: ",
            "'two.soap::' names no recipe after '::' (two.soap defines fast, slow: write 'two.soap::fast')",
        ),
        (
            "one.soap::",
            "'one.soap::' names no recipe after '::' (one.soap defines only r: write 'one.soap::r' or 'one.soap')",
        ),
        (
            "bare.soap::",
            "'bare.soap::' names no recipe after '::' (bare.soap holds a bare pipeline, not named recipes: write"
            " 'bare.soap')",
        ),
        ("adamw::", "'adamw::' names no recipe after '::' (shipped 'adamw' holds only 'adamw': write 'adamw')"),
    ],
)
def test_an_empty_name_after_the_colons_is_refused_at_every_entry_point(soap_files, spec, message, capsys):
    """`two.soap::` silently took the file's default recipe (the one named like the file, or
    the only one): a name cut off by a script or a typo went unnoticed."""
    for entry in (soapdsl.build, soapdsl.compile):
        assert raises(SoapNameError, entry, spec, params()).message == message
    if spec.endswith("::"):  # a config's value; the race's spec (overrides follow a single ':')
        cfg = {"recipe": spec}
        assert raises(SoapNameError, soapdsl.from_config, torch.nn.Linear(3, 4), cfg).message == message
        assert raises(SoapNameError, parse_spec(spec).resolve).message == message
    assert cli_main(["compile", spec, "--shapes", "w=4x3"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_an_empty_name_before_race_overrides_is_refused(soap_files):
    spec = parse_spec("two.soap:::lr=1")
    assert raises(SoapNameError, spec.resolve).message.startswith("'two.soap:::lr=1' names no recipe after '::'")


def test_recipe_text_with_several_recipes_is_not_told_to_name_one_after_a_path():
    """It was told to `name one as '<inline>::NAME'`, which no recipe argument can spell."""
    err = raises(SoapNameError, soapdsl.compile, "recipe fast(lr=1) = sign\nrecipe slow(lr=1) = sign\n", params())
    assert err.message == (
        "<inline> defines several recipes (fast, slow); recipe text stands for one: keep one, or save them"
        " in a .soap file and name one as 'FILE.soap::NAME'"
    )


# -- directories and byte-order marks ------------------------------------------------------------


def test_a_directory_is_not_read_as_recipe_text(tmp_path):
    for spec in (str(tmp_path), tmp_path, f"{tmp_path}::r"):
        err = raises(SoapNameError, soapdsl.build, spec, params())
        assert err.message == f"'{tmp_path}' is a directory, not a recipe file"
    (tmp_path / "d.soap").mkdir()
    err = raises(SoapNameError, library.resolve, str(tmp_path / "d.soap"))
    assert "is a directory" in err.message


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.soap"
    path.write_bytes("\ufeffrecipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n".encode())
    assert soapdsl.compile(str(path), params()).recipe.name == "r"
    # columns are those of the text without the mark
    path.write_bytes("\ufeffrecipe r(lr=1e-3) = signn |> lr\n".encode())
    err = raises(SoapNameError, soapdsl.compile, path, params())
    assert (err.loc.line, err.loc.col) == (1, 21)


def test_a_byte_order_mark_at_the_start_of_recipe_text_is_skipped(tmp_path):
    """Text read from such a file by the user's own code (`open(path).read()`) kept the mark,
    which was a syntax error, `unexpected character '\\ufeff'`, under an invisible character."""
    assert soapdsl.compile("\ufeffmomentum(0.9) |> sign |> lr", params()).recipe.name == "inline"
    assert soapdsl.compile("\ufeffadamw", params()).recipe.name == "adamw"
    assert soapdsl.parse("\ufeffrecipe r(lr=1e-3) = sign").recipes[0].name == "r"
    err = raises(SoapNameError, soapdsl.compile, "\ufeffrecipe r(lr=1e-3) = signn |> lr", params())
    assert (err.loc.line, err.loc.col) == (1, 21)
    assert "    1 | recipe r(lr=1e-3) = signn |> lr\n" in str(err)


def test_a_byte_order_mark_inside_the_text_is_named():
    err = raises(SoapSyntaxError, soapdsl.compile, "momentum(0.9) |> \ufeffsign |> lr", params())
    assert err.message == "unexpected character '\\ufeff'" and (err.loc.line, err.loc.col) == (1, 18)
    assert err.notes == ("U+FEFF is a byte-order mark, which most editors do not show: delete it",)


def test_a_path_object_is_always_a_file(tmp_path):
    err = raises(SoapNameError, soapdsl.compile, tmp_path / "sign", params())
    assert err.message.startswith("cannot read recipe file")


# -- the entry points' own arguments --------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_torch_compile_must_be_a_bool(value):
    err = raises(SoapArgumentError, soapdsl.build, "adamw", params(), torch_compile=value)
    assert err.message == f"torch_compile must be True or False, got {value!r}"


# -- carets ---------------------------------------------------------------------------------------


def caret_lines(line: str, col: int, width: int) -> tuple[str, str]:
    loc = Loc("x.soap", 1, col, 1, col + width)
    text = SoapError("boom", loc, source=line + "\n").format().splitlines()
    return text[1], text[2]


def test_caret_counts_wide_characters_twice():
    src, caret = caret_lines('  route "漢字*": sign |> signn', 24, 5)
    # each CJK character takes two terminal columns; the caret lands under 'signn'
    assert caret.index("^") == src.index("signn") + 2
    assert caret.count("^") == 5


def test_caret_skips_combining_marks_and_underlines_wide_spans():
    src, caret = caret_lines('scale("e\u0301") |> signn', 16, 5)  # 'e' + a combining acute accent
    assert caret.index("^") == src.index("signn") - 1
    _, caret = caret_lines('scale("漢字")', 7, 4)
    assert caret.count("^") == 6


@pytest.mark.parametrize(
    "before",
    [
        "\u0e01\u0e31\u0e1a",  # Thai: its vowel sign U+0E31 is a mark of combining class 0
        "a\u200bb",  # a zero-width space, which a pattern copied from a web page can hold
        "a\u200db",  # a zero-width joiner
        "a\u034fb",  # the combining grapheme joiner, combining class 0 as well
    ],
)
def test_caret_skips_every_zero_width_character(before):
    """Only marks of a nonzero combining class took no column: a Thai vowel sign or a zero-width
    space or joiner before the error put the caret one column right of it."""
    src, caret = caret_lines(f'  route "{before}*": sign |> signn', 22 + len(before), 5)
    assert caret.index("^") == src.index("signn") - 1  # three characters, two columns


@pytest.mark.parametrize(("control", "shown"), [("\x1b[2J", "\u241b[2J"), ("\x07", "\u2407"), ("\x7f", "\u2421")])
def test_a_control_character_is_shown_as_its_picture(control, shown):
    """The source line was printed as it is: an escape sequence in a pattern (ESC [2J) cleared the
    terminal that showed the error, and the caret stood right of its text by the characters that
    the terminal did not show."""
    src, caret = caret_lines(f'  route "a{control}b*": sign |> signn', 24 + len(control), 5)
    assert src == f'    1 |   route "a{shown}b*": sign |> signn'
    assert caret.index("^") == src.index("signn")


def test_caret_unchanged_for_ascii_and_tabs():
    src, caret = caret_lines("momentum(0.9) |> signn |> lr", 18, 5)
    assert caret.index("^") == src.index("signn") and caret.count("^") == 5
    src, caret = caret_lines("\tsignn |> lr", 2, 5)
    assert caret.index("^") == src.index("signn")
