"""`soapdsl fmt`: every comment survives, in order and next to its code; the meaning of the
file (its syntax tree and its documentation comments) never changes; printing is idempotent."""

from __future__ import annotations

import errno
import os
import textwrap
from pathlib import Path

import pytest

from soapdsl import cli
from soapdsl.resources import recipe_files
from soapdsl.syntax.formatter import format_module
from soapdsl.syntax.parser import parse

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "docs" / "examples").glob("*.soap"))


def fmt(text: str) -> str:
    return format_module(parse(text))


def assert_fmt_keeps(text: str) -> str:
    """fmt(text), after checking that it keeps the comments and the meaning, and is a fixpoint."""
    before = parse(text)
    out = format_module(before)
    after = parse(out)
    assert after == before, out
    assert [d.doc for d in after.definitions] == [d.doc for d in before.definitions], out
    assert [c.text for c in after.comments] == [c.text for c in before.comments], out
    assert format_module(after) == out, out
    return out


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.mark.parametrize("path", recipe_files() + EXAMPLES, ids=lambda p: p.name)
def test_shipped_sources_keep_every_comment_line(path):
    text = path.read_text(encoding="utf-8")
    out = assert_fmt_keeps(text)
    comment_lines = [line.strip() for line in text.splitlines() if line.lstrip().startswith("#")]
    assert comment_lines, "every shipped source has comments"
    assert [line.strip() for line in out.splitlines() if line.lstrip().startswith("#")] == comment_lines


def test_in_route_comment_stays_before_its_route():
    path = next(p for p in recipe_files() if p.name == "soap_muon.soap")
    out = fmt(path.read_text(encoding="utf-8"))
    assert (
        "\n  # hidden matrices with a dim >= max_dim (soap_muon10): no Nesterov term, RMS-1 update. The\n"
        '  # reference\'s "std" projection rotates the smaller side whatever its size: max_dim=none\n'
        "  route matrix:\n"
    ) in out


def test_trailing_and_stray_comments_are_kept():
    text = dedent(
        """
        # doc for r
        recipe r(lr=1e-3) =
          momentum(0.9)  # trailing comment
          |> sign

        # stray comment at end
        """
    )
    assert assert_fmt_keeps(text) == text


def test_file_of_only_comments_prints_them():
    assert assert_fmt_keeps("# only a comment\n# another\n\n") == "# only a comment\n# another\n"
    assert assert_fmt_keeps("\n# a\n\n\n# b\n") == "# a\n\n# b\n"


PLACEMENTS = {
    "trailing on a route line": (
        "recipe r(lr=1):\n  route vector: sign   # one\n  route default: lr #two  \n",
        "recipe r(lr=1):\n  route vector: sign  # one\n  route default: lr  #two\n",
    ),
    "own line before a route": (
        "recipe r(lr=1):\n  route vector: sign\n      # about the next route\n  route default: lr\n",
        "recipe r(lr=1):\n  route vector: sign\n  # about the next route\n  route default: lr\n",
    ),
    "inside a one-line route: one stage a line": (
        "recipe r(lr=1):\n  route default: momentum(0.9)  # m\n    |> lr\n",
        "recipe r(lr=1):\n  route default:\n    momentum(0.9)  # m\n    |> lr\n",
    ),
    "between the header and the pipeline": (
        "recipe r(lr=1):\n  route vector:  # h\n    sign |> lr\n  route default: lr\n",
        "recipe r(lr=1):\n  route vector:  # h\n    sign\n    |> lr\n  route default: lr\n",
    ),
    "inside a stage's arguments: before the stage": (
        "sign |> momentum(0.9,  # beta\n  nesterov=true) |> lr\n",
        "sign\n# beta\n|> momentum(0.9, nesterov=true)\n|> lr\n",
    ),
    "inside a block: before the stage that holds it": (
        "recipe r(lr=1) = rotate(both) {\n    # inner\n    sign\n  } |> lr\n",
        "recipe r(lr=1) =\n  # inner\n  rotate(both) { sign }\n  |> lr\n",
    ),
    "inside a selector: before the route": (
        "recipe r(lr=1):\n  route vector or  # v\n    matrix: sign\n  route default: lr\n",
        "recipe r(lr=1):\n  # v\n  route vector or matrix: sign\n  route default: lr\n",
    ),
    "after a |>: before the stage after it": (
        "a |> # c\n  b\n",
        "a\n# c\n|> b\n",
    ),
    "inside a header: below it, not into the doc": (
        "# doc\nrecipe r(lr=1,  # the rate\n  b=2) =  # after\n  sign\n",
        "# doc\nrecipe r(lr=1, b=2) =\n  # the rate\n  # after\n  sign\n",
    ),
    "apart from a recipe: stays apart from its doc": (
        "recipe a(lr=1) = sign\n# end of a\n\n# doc of b\nrecipe b(lr=1) = lr\n",
        "recipe a(lr=1) = sign\n\n# end of a\n\n# doc of b\nrecipe b(lr=1) = lr\n",
    ),
    "verbatim text, comment-like strings untouched": (
        '#!no space\nrecipe r(lr=1):\n  route "a#b": sign   ##  two  \n',
        '#!no space\nrecipe r(lr=1):\n  route "a#b": sign  ##  two\n',
    ),
}


@pytest.mark.parametrize("text, expected", PLACEMENTS.values(), ids=PLACEMENTS.keys())
def test_comment_placement(text, expected):
    assert assert_fmt_keeps(text) == expected


def test_doc_comments_stay_docs():
    text = "# License header.\n\n# Doc of r,\n# two lines.\nrecipe r(lr=1) = sign\n"
    out = assert_fmt_keeps(text)
    assert out == text
    assert parse(out).recipes[0].doc == "Doc of r,\ntwo lines."


def test_cli_fmt_keeps_comments(tmp_path, capsys):
    path = tmp_path / "mine.soap"
    path.write_text("# doc\nrecipe r(lr=1e-3) =\n  momentum(0.9)  # beta\n  |> sign\n# tail\n")
    assert cli.main(["fmt", str(path)]) == 0
    assert capsys.readouterr().out == "# doc\nrecipe r(lr=1e-3) =\n  momentum(0.9)  # beta\n  |> sign\n# tail\n"


#: every construct, a token a word, so that a comment can go between any two tokens
EVERY_CONSTRUCT = (
    "macro m ( a , b = 2 ) = scale ( a ) |> scale ( b ) as s\n"
    "recipe r ( lr = 1 , big = 10 ) :\n"
    ' route "w*" , not ( vector and ndim >= 3 ) [ lr = lr * - 2 ] : sign |> lr\n'
    " route default : rotate ( both ) { m ( 1 ) |> sign } as q |> graft ( norm , from = { sign } ) |> lr\n"
    "recipe s ( lr = 1 ) = m ( ( 1 , 2 ) , b = - ( 3 ) ) |> lr\n"
    "sign |> lr\n"
)


#: block arguments too long for a line, nested, positional and followed by arguments
LONG_BLOCK_ARGUMENTS = (
    "recipe r ( lr = 1 ) :\n route default : momentum ( 0.95 ) |> graft ( norm , from = { momentum ( 0.9 )"
    " |> rms_normalize ( 0.999 , 1e-8 , eps_at = raw , correct = false ) |> bias_correct ( 0.9 ) } , eps = 1 )"
    " as g |> graft ( { graft ( norm , from = { momentum ( 0.9 ) |> rms_normalize ( 0.999 , 1e-8 , eps_at = raw"
    " , correct = false ) } ) } ) |> lr\n"
)


@pytest.mark.parametrize("source", [EVERY_CONSTRUCT, LONG_BLOCK_ARGUMENTS], ids=["every construct", "block arguments"])
@pytest.mark.parametrize("comment", ["  # t\n", "\n# o\n", "\n\n# b\n\n"], ids=["trailing", "own line", "apart"])
def test_a_comment_between_any_two_tokens_is_kept(comment, source):
    gaps = [i for i, ch in enumerate(source) if ch in " \n"] + [0]
    for i in gaps:
        assert_fmt_keeps(source[:i] + comment + source[i:])


# -- layout within 88 columns -----------------------------------------------------------------

LONG_HEADER = (
    "recipe long_one(lr=3e-3, beta1=0.95, beta2=0.95, shampoo_beta=-1, eps=1e-8, weight_decay=0.01,"
    " freq=10, max_dim=10000):\n  route default: lr\n"
)

LAYOUTS = {
    "a header fills its lines, aligned after the (": (
        LONG_HEADER,
        "recipe long_one(lr=3e-3, beta1=0.95, beta2=0.95, shampoo_beta=-1, eps=1e-8,\n"
        "                weight_decay=0.01, freq=10, max_dim=10000):\n"
        "  route default: lr\n",
    ),
    "a short recipe's pipeline goes below a header that does not leave it room": (
        "recipe adam(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0) ="
        " l2(weight_decay) |> adam(beta1, beta2, eps) |> lr\n",
        "recipe adam(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0) =\n"
        "  l2(weight_decay) |> adam(beta1, beta2, eps) |> lr\n",
    ),
    "a route's pipeline goes below its head, then one stage a line": (
        "recipe r(lr=1):\n  route ndim >= 2 and max_dim < 10000: rotate(left, freq=40) |> sqrt_whiten"
        " |> newton_schulz(5) |> graft(norm)\n"
        "  route default: momentum(0.9) |> rms_normalize(0.999, 1e-8) |> bias_correct(0.9)"
        " |> decay(0.01) |> lr\n",
        "recipe r(lr=1):\n"
        "  route ndim >= 2 and max_dim < 10000:\n"
        "    rotate(left, freq=40) |> sqrt_whiten |> newton_schulz(5) |> graft(norm)\n"
        "  route default:\n"
        "    momentum(0.9)\n"
        "    |> rms_normalize(0.999, 1e-8)\n"
        "    |> bias_correct(0.9)\n"
        "    |> decay(0.01)\n"
        "    |> lr\n",
    ),
    "a selector breaks before an or, settings after a comma": (
        'recipe r(lr=1, adam_lr=1):\n  route "*embed*", "*wte*", "*wpe*", "*lm_head*", "head.*", "*.head.*",'
        ' "output.*" [lr=adam_lr, weight_decay=0]: adamw\n  route default: lr\n',
        "recipe r(lr=1, adam_lr=1):\n"
        '  route "*embed*" or "*wte*" or "*wpe*" or "*lm_head*" or "head.*" or "*.head.*"\n'
        '        or "output.*" [lr=adam_lr, weight_decay=0]:\n'
        "    adamw\n"
        "  route default: lr\n",
    ),
    "a negated group too long for a line breaks inside its parentheses": (
        'recipe r(lr=1):\n  route not ("*embedding_table_weights*" and matrix and "*transformer_block_seven*"'
        " and ndim >= 2): sign\n  route default: lr\n",
        "recipe r(lr=1):\n"
        '  route not ("*embedding_table_weights*" and matrix and "*transformer_block_seven*"\n'
        "        and ndim >= 2):\n"
        "    sign\n"
        "  route default: lr\n",
    ),
    "top-level breaks come first; a group breaks only where they are not enough": (
        'recipe r(lr=1):\n  route ("*a_rather_long_module_name*" or "*another_long_module_name*") and'
        ' (matrix or ndim >= 3) and not ("*the_excluded_one*" or "*and_another_excluded*"'
        ' or "*and_a_third_one_that_is_long_too*"): sign\n  route default: lr\n',
        "recipe r(lr=1):\n"
        '  route ("*a_rather_long_module_name*" or "*another_long_module_name*")\n'
        "        and (matrix or ndim >= 3)\n"
        '        and not ("*the_excluded_one*" or "*and_another_excluded*"\n'
        '        or "*and_a_third_one_that_is_long_too*"):\n'
        "    sign\n"
        "  route default: lr\n",
    ),
    "a stage's arguments fill their lines; its block below it, closed under its name": (
        "recipe r(lr=1) = momentum(0.9) |> rotate(smaller, freq=10, beta=-1, beta_fallback=0.95,"
        " max_dim=10000, skip_first=true, jitter=0) { rms_normalize(0.95, 1e-8, eps_at=raw) |> sign } as q |> lr\n",
        "recipe r(lr=1) =\n"
        "  momentum(0.9)\n"
        "  |> rotate(smaller, freq=10, beta=-1, beta_fallback=0.95, max_dim=10000,\n"
        "            skip_first=true, jitter=0) {\n"
        "       rms_normalize(0.95, 1e-8, eps_at=raw) |> sign\n"
        "     } as q\n"
        "  |> lr\n",
    ),
    "a block that does not fit after its stage goes below it": (
        "recipe r(lr=1):\n  route default:\n    rotate(both, freq=10) { momentum(0.95) |> rms_normalize(0.95,"
        " 1e-8, eps_at=raw, correct=false) |> sign }\n    |> lr\n",
        "recipe r(lr=1):\n"
        "  route default:\n"
        "    rotate(both, freq=10) {\n"
        "      momentum(0.95) |> rms_normalize(0.95, 1e-8, eps_at=raw, correct=false) |> sign\n"
        "    }\n"
        "    |> lr\n",
    ),
    "a label goes with the last argument": (
        "macro m(x) = clip(aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb,"
        " c=1) as the_label\n",
        "macro m(x) =\n"
        "  clip(aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa,\n"
        "       bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb, c=1) as the_label\n",
    ),
    "a block argument that fits on a line of its own goes there whole": (
        "recipe r(lr=1) = momentum(0.95, nesterov=true) |> newton_schulz(5)"
        " |> graft(norm, from={ momentum(0.9) |> rms_normalize(0.999, 1e-8, eps_at=raw) })\n",
        "recipe r(lr=1) =\n"
        "  momentum(0.95, nesterov=true)\n"
        "  |> newton_schulz(5)\n"
        "  |> graft(norm, from={ momentum(0.9) |> rms_normalize(0.999, 1e-8, eps_at=raw) })\n",
    ),
    "a block argument too long for a line opens on its line and closes under the stage": (
        "recipe r(lr=1):\n  route matrix: momentum(0.95, nesterov=true) |> newton_schulz(5) |> graft(norm,"
        " from={ momentum(0.9) |> rms_normalize(0.999, 1e-8, eps_at=raw, correct=false)"
        " |> bias_correct(0.9) }, eps=1e-8) as g\n  route default: lr\n",
        "recipe r(lr=1):\n"
        "  route matrix:\n"
        "    momentum(0.95, nesterov=true)\n"
        "    |> newton_schulz(5)\n"
        "    |> graft(norm, from={\n"
        "         momentum(0.9)\n"
        "         |> rms_normalize(0.999, 1e-8, eps_at=raw, correct=false)\n"
        "         |> bias_correct(0.9)\n"
        "       }, eps=1e-8) as g\n"
        "  route default: lr\n",
    ),
    "block arguments nest, a positional one too, and a scope block follows them": (
        "recipe r(lr=1) = graft(norm, from={ graft(norm, from={ momentum(0.9) |> rms_normalize(0.999,"
        " 1e-8, eps_at=raw, correct=false) |> bias_correct(0.9) |> sign }) |> rms_normalize(0.999, 1e-8,"
        " eps_at=raw, correct=false) }) |> rotate(both, { momentum(0.95) |> rms_normalize(0.95, 1e-8,"
        " eps_at=raw, correct=false) |> sign }) { sign }\n",
        "recipe r(lr=1) =\n"
        "  graft(norm, from={\n"
        "    graft(norm, from={\n"
        "      momentum(0.9)\n"
        "      |> rms_normalize(0.999, 1e-8, eps_at=raw, correct=false)\n"
        "      |> bias_correct(0.9)\n"
        "      |> sign\n"
        "    })\n"
        "    |> rms_normalize(0.999, 1e-8, eps_at=raw, correct=false)\n"
        "  })\n"
        "  |> rotate(both, {\n"
        "       momentum(0.95) |> rms_normalize(0.95, 1e-8, eps_at=raw, correct=false) |> sign\n"
        "     }) {\n"
        "       sign\n"
        "     }\n",
    ),
    "one token longer than a line stays whole": (
        "recipe r(lr=1):\n  route " + '"' + "w" * 90 + '"' + ": sign\n  route default: lr\n",
        "recipe r(lr=1):\n  route " + '"' + "w" * 90 + '"' + ":\n    sign\n  route default: lr\n",
    ),
}


@pytest.mark.parametrize("text, expected", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout(text, expected):
    out = assert_fmt_keeps(text)
    assert out == expected
    if "w" * 90 not in text:
        assert max(len(line) for line in out.splitlines()) <= 88


def test_a_comment_in_a_wrapped_stage_goes_before_it_and_a_trailing_one_after_its_block():
    text = dedent(
        """
        recipe r(lr=1):
          route default:
            rotate(both, freq=10, beta=-1, beta_fallback=0.95,  # the factors' EMA
                   max_dim=10000, skip_first=true) {
              momentum(0.95) |> rms_normalize(0.95, 1e-8, eps_at=raw, correct=false, power=0.5)
            }  # rotated back
            |> lr
        """
    )
    assert assert_fmt_keeps(text) == dedent(
        """
        recipe r(lr=1):
          route default:
            # the factors' EMA
            rotate(both, freq=10, beta=-1, beta_fallback=0.95, max_dim=10000, skip_first=true) {
              momentum(0.95) |> rms_normalize(0.95, 1e-8, eps_at=raw, correct=false, power=0.5)
            }  # rotated back
            |> lr
        """
    )


def test_numbers_keep_their_spelling():
    text = "recipe r(lr=3e-4, eps=1E-8, b=.5, c=1., d=-1e-3, big=1e999, n=007) = scale(- 2.50) |> lr\n"
    out = assert_fmt_keeps(text)
    assert out == "recipe r(lr=3e-4, eps=1e-8, b=.5, c=1., d=-1e-3, big=1e999, n=007) = scale(-2.50) |> lr\n"


def test_a_likely_decimal_comma_keeps_its_spelling_and_so_its_warning():
    """fmt printed rms_normalize(0,999) as rms_normalize(0, 999), the spelling that says two
    numbers were meant: the checker's warning of a likely decimal comma (eps=999) was gone for
    good from a file rewritten with -w."""
    text = "recipe r(lr=1) = rms_normalize(0,999) |> newton_schulz(5, coeffs=(3,4, 2.0)) |> scale(1 ,2)\n"
    out = assert_fmt_keeps(text)
    assert out == ("recipe r(lr=1) =\n  rms_normalize(0,999) |> newton_schulz(5, coeffs=(3,4, 2.0)) |> scale(1, 2)\n")
    long = "macro m = clip(" + ", ".join(["1"] * 40) + ",2)\n"
    assert assert_fmt_keeps(long).endswith(" 1,2)\n")


def test_a_recipe_keeps_its_form():
    short, long = "recipe r(lr=1) = sign |> lr\n", "recipe r(lr=1):\n  route default: sign |> lr\n"
    assert assert_fmt_keeps(short) == short
    assert assert_fmt_keeps(long) == long


EMPTY_LINES = {
    "between routes: one kept, however many": (
        "recipe r(lr=1):\n  route vector: sign\n\n\n  route matrix: sign\n  route default: lr\n",
        "recipe r(lr=1):\n  route vector: sign\n\n  route matrix: sign\n  route default: lr\n",
    ),
    "around a comment between routes": (
        "recipe r(lr=1):\n  route vector: sign\n\n  # m\n\n  route matrix: sign\n  # d\n  route default: lr\n",
        "recipe r(lr=1):\n  route vector: sign\n\n  # m\n\n  route matrix: sign\n  # d\n  route default: lr\n",
    ),
    "after a multi-line route": (
        "recipe r(lr=1):\n  route vector:\n    sign\n    |> lr  # t\n\n  route default: lr\n",
        "recipe r(lr=1):\n  route vector: sign |> lr  # t\n\n  route default: lr\n",
    ),
    "none after a header, between stages or inside a route": (
        "recipe r(lr=1):\n\n  route vector:\n\n    sign\n\n    |> lr\n  route default: lr\n",
        "recipe r(lr=1):\n  route vector: sign |> lr\n  route default: lr\n",
    ),
    "definitions: one": (
        "macro m = sign\n\n\n\nrecipe r(lr=1) = m\nrecipe s(lr=1) = m\n",
        "macro m = sign\n\nrecipe r(lr=1) = m\n\nrecipe s(lr=1) = m\n",
    ),
}


@pytest.mark.parametrize("text, expected", EMPTY_LINES.values(), ids=EMPTY_LINES.keys())
def test_empty_lines(text, expected):
    assert assert_fmt_keeps(text) == expected


# -- the command ----------------------------------------------------------------------------


def test_every_shipped_source_is_in_canonical_form(capsys):
    """`soapdsl fmt --check recipes/*.soap docs/examples/*.soap` passes: the canonical layout is
    the one the shipped recipes are written in."""
    assert cli.main(["fmt", "--check", *map(str, recipe_files() + EXAMPLES)]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """ugly.soap (not canonical), fine.soap (canonical) and bad.soap (a syntax error), in the
    working directory."""
    monkeypatch.chdir(tmp_path)
    Path("ugly.soap").write_text("recipe   x( lr = 1e-3 )=momentum( 0.9 )|>sign\n")
    Path("fine.soap").write_text("recipe y(lr=1) = sign\n")
    Path("bad.soap").write_text("recipe z(lr=1) = nope(\n")
    return tmp_path


BAD_ERROR = "bad.soap:1:23: syntax error: unexpected end of text"


def run_fmt(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["fmt", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_file_is_processed_and_an_error_does_not_stop_the_run(files, capsys):
    code, out, err = run_fmt(capsys, "ugly.soap", "bad.soap", "fine.soap")
    assert code == 1
    assert out == "recipe x(lr=1e-3) = momentum(0.9) |> sign\nrecipe y(lr=1) = sign\n"
    assert err.startswith(BAD_ERROR) and "    1 | recipe z(lr=1) = nope(\n" in err and "Traceback" not in err


def test_check_names_the_files_that_would_change(files, capsys):
    code, out, err = run_fmt(capsys, "--check", "ugly.soap", "bad.soap", "fine.soap")
    assert (code, out) == (1, "ugly.soap\n")
    assert err.startswith(BAD_ERROR)
    assert run_fmt(capsys, "--check", "fine.soap") == (0, "", "")
    assert Path("ugly.soap").read_text().startswith("recipe   x(")


def test_diff_shows_what_would_change(files, capsys):
    Path("nonl.soap").write_text("recipe q(lr=1) =  sign")
    code, out, err = run_fmt(capsys, "--diff", "ugly.soap", "fine.soap", "nonl.soap")
    assert (code, err) == (1, "")
    assert out == (
        "--- ugly.soap\n+++ ugly.soap\n@@ -1 +1 @@\n"
        "-recipe   x( lr = 1e-3 )=momentum( 0.9 )|>sign\n+recipe x(lr=1e-3) = momentum(0.9) |> sign\n"
        "--- nonl.soap\n+++ nonl.soap\n@@ -1 +1 @@\n"
        "-recipe q(lr=1) =  sign\n\\ No newline at end of file\n+recipe q(lr=1) = sign\n"
    )
    assert run_fmt(capsys, "--diff", "fine.soap") == (0, "", "")


def test_write_rewrites_only_the_files_that_change(files, capsys):
    fine = Path("fine.soap")
    before = fine.stat().st_mtime_ns
    code, out, err = run_fmt(capsys, "-w", "ugly.soap", "bad.soap", "fine.soap")
    assert (code, out) == (1, "ugly.soap\n")
    assert err.startswith(BAD_ERROR)
    assert Path("ugly.soap").read_text() == "recipe x(lr=1e-3) = momentum(0.9) |> sign\n"
    assert fine.stat().st_mtime_ns == before
    assert Path("bad.soap").read_text() == "recipe z(lr=1) = nope(\n"
    assert run_fmt(capsys, "--write", "ugly.soap", "fine.soap") == (0, "", "")


def test_write_keeps_the_files_line_ends_and_byte_order_mark(files, capsys):
    """--check passed a canonical file with CRLF line ends (or a BOM), as read; but -w rewrote
    one that needed other changes with LF line ends and without its BOM, every line changed."""
    Path("win.soap").write_bytes(b"recipe   x( lr = 1e-3 )=momentum( 0.9 )\r\n  |>sign\r\n")
    Path("bom.soap").write_bytes(b"\xef\xbb\xbfrecipe   x( lr = 1e-3 )=sign\n")
    Path("fine.soap").write_bytes(b"\xef\xbb\xbfrecipe y(lr=1) = sign\r\n")
    assert run_fmt(capsys, "--check", "fine.soap") == (0, "", "")
    assert run_fmt(capsys, "-w", "win.soap", "bom.soap", "fine.soap") == (0, "win.soap\nbom.soap\n", "")
    assert Path("win.soap").read_bytes() == b"recipe x(lr=1e-3) = momentum(0.9) |> sign\r\n"
    assert Path("bom.soap").read_bytes() == b"\xef\xbb\xbfrecipe x(lr=1e-3) = sign\n"
    assert Path("fine.soap").read_bytes() == b"\xef\xbb\xbfrecipe y(lr=1) = sign\r\n"
    assert run_fmt(capsys, "--check", "win.soap", "bom.soap") == (0, "", "")


def test_write_refuses_standard_input_and_the_options_exclude_each_other(files, capsys):
    code, out, err = run_fmt(capsys, "-w", "ugly.soap", "-")
    assert (code, out) == (1, "")
    assert err == "error: --write cannot rewrite standard input ('-'): leave out --write\n" + (
        "  note: see 'soapdsl fmt --help'\n"
    )
    assert Path("ugly.soap").read_text().startswith("recipe   x(")
    code, out, err = run_fmt(capsys, "--check", "--diff", "ugly.soap")
    assert (code, out) == (1, "")
    assert err.startswith("error: argument --diff: not allowed with argument --check")


def test_check_reads_standard_input(files, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"recipe r(lr=1)=sign\n")))
    assert run_fmt(capsys, "--check", "-") == (1, "<stdin>\n", "")


def test_a_file_that_cannot_be_written_is_an_error_and_the_run_goes_on(files, capsys, monkeypatch):
    write_bytes = Path.write_bytes

    def full_disk(self, data):
        if self.name == "full.soap":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    Path("full.soap").write_text("recipe x(lr=1)=sign\n")
    code, out, err = run_fmt(capsys, "-w", "full.soap", "ugly.soap")
    assert (code, out) == (1, "ugly.soap\n")
    assert err == "error: cannot write recipe file 'full.soap': No space left on device\n"


@pytest.mark.parametrize(
    "text, error",
    [
        ("momentum(0.9) |> sgn\n", "b.soap:1:18: error: unknown operator 'sgn'; did you mean 'sign'?"),
        ("momentum(1.5) |> sign\n", "b.soap:1:10: error: invalid beta=1.5 for 'momentum': must be < 1.0"),
        ("sign |> lr |> lr\n", "b.soap:1:15: error: the update is applied twice ('lr' again; first at b.soap:1:9)"),
        (
            "recipe r(lr=1) = sign\nsign |> lr\n",
            "b.soap:2:1: syntax error: a source that defines recipes cannot also end in a bare pipeline",
        ),
    ],
    ids=["unknown operator", "bad argument", "lr twice", "recipes and a pipeline"],
)
def test_a_bare_pipeline_is_checked_as_soapdsl_check_checks_it(files, capsys, text, error):
    """fmt checked a source's recipes and macros but not its bare pipeline: `momentum(0.9) |> sgn`
    printed with status 0, and `fmt --check` passed it, where `soapdsl check` refused it."""
    Path("b.soap").write_text(text)
    code, out, err = cli.main(["check", "b.soap"]), *capsys.readouterr()
    assert (code, out, err.splitlines()[0]) == (1, "", error)
    for mode in ([], ["--check"], ["--diff"]):
        assert run_fmt(capsys, *mode, "b.soap") == (1, "", err)
