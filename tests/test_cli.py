"""The command line: golden `compile` output per shipped recipe, check, list, fmt."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import soapdsl
from soapdsl import library, registry
from soapdsl.cli import main

GOLDEN = Path(__file__).parent / "golden"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_golden(path: Path, text: str, update: bool) -> None:
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run pytest --update-goldens and review the diff"
    assert text == path.read_text(), f"{path} is stale; run pytest --update-goldens and review the diff"


@pytest.mark.parametrize("name", library.shipped_names())
def test_compile_golden_text(capsys, update_goldens, name):
    code, out, err = run(capsys, "compile", name)
    assert code == 0, err
    check_golden(GOLDEN / f"compile_{name}.txt", out, update_goldens)


@pytest.mark.parametrize("name", library.shipped_names())
def test_compile_golden_json(capsys, update_goldens, name):
    code, out, err = run(capsys, "compile", name, "--format", "json", "--shapes", "w=64x32,v=32,k=8x4x3x3")
    assert code == 0, err
    data = json.loads(out)
    assert data["recipe"]["name"] == name
    check_golden(GOLDEN / f"compile_{name}.json", out, update_goldens)


def test_compile_state_bytes_match_adam_formula(capsys):
    _, out, _ = run(capsys, "compile", "adamw", "--format", "json", "--shapes", "w=64x32,v=32")
    data = json.loads(out)
    for p in data["params"]:
        numel = 1
        for d in p["shape"]:
            numel *= d
        assert p["state_bytes"] == 2 * 4 * numel  # exp_avg + exp_avg_sq, fp32
    assert data["totals"]["state_per_param_byte"] == 2.0


def test_compile_set_and_inline(capsys):
    code, out, _ = run(capsys, "compile", "adamw", "--set", "lr=0.5", "--set", "beta1=0.8", "--shapes", "w=4x3")
    assert code == 0
    assert "arguments: lr=0.5, beta1=0.8," in out
    code, out, _ = run(capsys, "compile", "momentum(0.9) |> newton_schulz(5)", "--shapes", "w=4x3,u=4x3")
    assert code == 0
    assert "batched by shape" in out and "# implicit" in out


def test_compile_notes_which_newton_schulz_form_runs(capsys):
    """form=gram is decided per shape: compile shows the choice for each parameter (text and JSON)."""
    argv = ["compile", "muon", "--set", "ns_form=gram", "--shapes", "wide=64x256,square=64x64,tall=256x64"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "[" in line}
    assert rows["wide"].endswith("newton_schulz: Gram form on 64 x 256")
    assert rows["tall"].endswith("newton_schulz: Gram form on 64 x 256")
    assert rows["square"].endswith("newton_schulz: standard form (the Gram form counts more flops on 64 x 64)")
    code, out, _ = run(capsys, *argv, "--format", "json")
    notes = {p["name"]: p["notes"] for p in json.loads(out)["params"]}
    assert notes["wide"] == ["newton_schulz: Gram form on 64 x 256"]
    assert notes["square"] == ["newton_schulz: standard form (the Gram form counts more flops on 64 x 64)"]
    # the default form has nothing to say, and the table keeps its columns
    code, out, _ = run(capsys, "compile", "muon", "--shapes", "wide=64x256")
    assert "notes" not in out


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["compile", "adamw", "--set", "beta1=2"], "invalid beta=2"),
        (["compile", "adamw", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["compile", "adamw", "--shapes", "w=3xq"], "--shapes expects NAME=MxN"),
        # full-width digits, which int() reads and recipe text refuses
        (["compile", "adamw", "--shapes", "w=\uff12x3"], "--shapes expects NAME=MxN"),
        (["compile", "adamw", "--shapes", "w=+2"], "--shapes expects NAME=MxN"),
        (["compile", "adamww"], "unknown recipe 'adamww'; did you mean 'adamw'"),
        (["compile", "momentum |> newton_schulz(5)", "--shapes", "b=3"], "parameter 'b' of shape \\[3\\]"),
    ],
)
def test_compile_errors(capsys, argv, pattern):
    import re

    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert re.search(pattern, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ("w=4x3,w=5x5", "--shapes names parameter 'w' twice"),
        ("", "--shapes names no parameter"),
        (" , ", "--shapes names no parameter"),
        (
            "w=99999999999999999999x2",
            "--shapes: parameter 'w' of shape 99999999999999999999x2 has more elements than a tensor can hold",
        ),
        (
            "w=99999x99999x99999x99999",
            "--shapes: parameter 'w' of shape 99999x99999x99999x99999 has more elements than a tensor can hold",
        ),
    ],
)
def test_compile_shapes_refused(capsys, shapes, message):
    code, out, err = run(capsys, "compile", "adamw", "--shapes", shapes)
    assert (code, out) == (1, "")
    assert err == f"error: {message}\n"


def test_compile_shapes_empty_dims_is_a_scalar(capsys):
    code, out, err = run(capsys, "compile", "adamw", "--shapes", "w=4x3,t=", "--format", "json")
    assert code == 0, err
    assert {p["name"]: p["shape"] for p in json.loads(out)["params"]} == {"w": [4, 3], "t": []}


def test_compile_and_check_name_a_directory_or_a_missing_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.soap").write_text("recipe r(lr=1e-3):\n  route default: sign\n")
    code, out, err = run(capsys, "compile", "one.soap::nope", "--shapes", "w=4x3")
    assert (code, out, err) == (1, "", "error: no recipe 'nope' in one.soap (recipes: r)\n")
    for cmd in ("compile", "check", "fmt"):
        code, out, err = run(capsys, cmd, str(tmp_path))
        assert (code, out, err) == (1, "", f"error: '{tmp_path}' is a directory, not a recipe file\n")


def test_check_and_fmt_skip_a_byte_order_mark(tmp_path, capsys):
    path = tmp_path / "bom.soap"
    path.write_bytes("\ufeffrecipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n".encode())
    assert run(capsys, "check", str(path)) == (0, f"{path}: ok (recipe r)\n", "")
    assert run(capsys, "fmt", str(path)) == (0, "recipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n", "")


def test_check_reports_syntax_error_with_caret(tmp_path):
    bad = tmp_path / "bad.soap"
    bad.write_text("recipe r(lr=1):\n  route default:\n    momentum(0.9) |> |> lr\n")
    good = tmp_path / "good.soap"
    good.write_text("recipe g(lr=1) = momentum(0.9) |> sign\n")
    proc = subprocess.run(
        [sys.executable, "-m", "soapdsl", "check", str(good), str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert f"{good}: ok (recipe g)" in proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:3:22: syntax error: unexpected '|>'")
    assert lines[1].endswith("momentum(0.9) |> |> lr")
    assert lines[2].index("^") == lines[1].index("|> lr")
    assert "Traceback" not in proc.stderr


def test_check_all_good_exits_zero(capsys):
    files = [str(p) for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.soap"))]
    code, out, err = run(capsys, "check", *files)
    assert code == 0, err
    assert out.count(": ok (") == len(files)


def test_list_shows_every_op_and_recipe(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name, cls in registry.all_ops().items():
        assert f"  {name}" in out and cls.summary() in out
    for name in library.shipped_names():
        assert f"  {name}(lr=" in out


def test_list_shows_a_macros_defaults_as_a_recipes(capsys, monkeypatch):
    """The prelude's macros were listed as `adam(beta1, beta2, eps)`, as if every argument had to
    be given, where prelude.soap has `adam(beta1=0.9, beta2=0.999, eps=1e-8)`."""
    lib = library.library()
    extra = soapdsl.parse("macro needs(k, eps=-2.5e-3) = scale(k) |> sign\n")  # a required parameter
    monkeypatch.setattr(library, "library", lambda: library.Library(lib.recipes, lib.macros.with_module(extra)))
    code, out, _ = run(capsys, "list")
    assert code == 0
    recipes, macros = out.split("\nrecipes:\n")[1].split("\nmacros (prelude):\n")
    assert "  adam(lr=0.001, beta1=0.9, beta2=0.999, eps=1e-08, weight_decay=0)\n" in recipes
    assert "  adam(beta1=0.9, beta2=0.999, eps=1e-08)\n" in macros
    assert "  adamw(beta1=0.9, beta2=0.999, eps=1e-08, weight_decay=0.01)\n" in macros
    assert "  needs(k, eps=-0.0025)\n" in macros


def test_every_option_says_its_default():
    """The README says `soapdsl COMMAND --help` lists every option with its default: an option
    that has one (not off, not absent) says it in its help; race's --task did not."""
    import argparse

    from soapdsl.cli import make_parser

    (sub,) = [a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [
        f"{command} {action.option_strings[0]}"
        for command, parser in sub.choices.items()
        for action in parser._actions
        if action.option_strings
        and action.help not in (None, argparse.SUPPRESS)
        and action.default not in (None, False, argparse.SUPPRESS)
        and "default" not in action.help
    ]
    assert not silent, f"options whose help does not give their default: {silent}"


def test_fmt_prints_canonical_form(tmp_path, capsys):
    f = tmp_path / "x.soap"
    f.write_text("recipe   x( lr = 1e-3 )=momentum( 0.9 )|>sign\n")
    code, out, _ = run(capsys, "fmt", str(f))
    assert code == 0
    assert out == "recipe x(lr=1e-3) = momentum(0.9) |> sign\n"


def test_a_repeated_set_is_refused(capsys):
    """A config's or a race override's repeated key is an error; --set silently took the last."""
    code, out, err = run(capsys, "compile", "adamw", "--set", "lr=1", "--set", "lr=2")
    assert (code, out) == (1, "")
    assert err == "error: --set lr is given twice: give each parameter once\n"


@pytest.mark.parametrize("spec", ["my_recipe.sop", "recipes/muon", "s/two.soap:slow"])
def test_a_mistyped_path_says_it_was_read_as_recipe_text(capsys, spec):
    code, out, err = run(capsys, "compile", spec)
    assert (code, out) == (1, "")
    assert f"note: no file '{spec}' exists, so it was read as recipe text" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("item", "message", "shown"),
    [
        ("lr=1)", "<--set lr>:1:5: syntax error: unexpected ')'", ["    1 | lr=1)", "      |     ^"]),
        ("lr=$", "<--set lr>:1:4: syntax error: unexpected character '$'", ["    1 | lr=$", "      |    ^"]),
        (
            "lr={sign}",
            "<--set lr>:1:4: error: a pipeline cannot be the value of --set lr",
            ["    1 | lr={sign}", "      |    ^^^^^^"],
        ),
    ],
)
def test_a_bad_set_value_points_into_what_was_typed(capsys, item, message, shown):
    """The value is parsed as x(VALUE); errors showed that wrapper, at its columns."""
    code, out, err = run(capsys, "compile", "adamw", "--set", item)
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines[0].startswith(message) and lines[1:3] == shown


@pytest.mark.parametrize(
    ("item", "col"),
    [("lr=1) |> sign |> x(2", 5), ("lr=(1)) |> x((2)", 7), ("lr=1) as a |> x(", 5), ("lr=2)", 5)],
)
def test_a_set_value_that_closes_the_wrapper_is_refused_at_its_paren(capsys, item, col):
    """The value is parsed as x(VALUE): a ')' of its own closed the wrapper's '(', and the rest
    made a pipeline of more stages, whose first argument was taken silently (lr=1)."""
    code, out, err = run(capsys, "compile", "adamw", "--set", item, "--shapes", "w=4x3")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"<--set lr>:1:{col}: syntax error: unexpected ')': it closes no '(' of the value",
        f"    1 | {item}",
        "      | " + " " * (col - 1) + "^",
    ]


def test_a_race_override_that_closes_the_wrapper_is_refused():
    from soapdsl.errors import SoapSyntaxError
    from soapdsl.race.spec import parse_overrides

    spec = "adamw:lr=1) |> sign |> x(2"
    with pytest.raises(SoapSyntaxError, match=r"unexpected '\)': it closes no '\(' of the value") as info:
        parse_overrides("lr=1) |> sign |> x(2", spec)
    assert (info.value.loc.col, info.value.loc.end_col) == (11, 12)


@pytest.mark.parametrize("argv", [["list"], ["compile", "soap"]])
def test_a_closed_pipe_ends_quietly(argv):
    """`soapdsl list | head` closes the pipe early; that printed a BrokenPipeError traceback."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write, as after `head` has exited
    try:
        proc = subprocess.run([sys.executable, "-m", "soapdsl", *argv], stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a program the signal ended
    assert proc.stderr == ""


@pytest.mark.parametrize("cmd", ["check", "compile", "fmt"])
def test_a_yaml_config_given_as_a_recipe_says_so(tmp_path, capsys, monkeypatch, cmd):
    """A config where a recipe file belongs gave a bare syntax error at its first ':'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.yaml").write_text("optimizer:\n  recipe: adamw\n")
    code, out, err = run(capsys, cmd, "train.yaml")
    assert (code, out) == (1, "")
    assert err.startswith("train.yaml:1:10: syntax error: unexpected ':'")
    assert err.endswith(
        "  note: 'train.yaml' looks like a YAML config, not a recipe file: soapdsl.from_config(model,"
        " 'train.yaml') reads a config; its 'recipe' key names the recipe\n"
    )


def test_ctrl_c_during_a_race_ends_with_one_line_and_status_130(tmp_path):
    """Ctrl-C in a race printed a KeyboardInterrupt traceback from inside torch's backward."""
    import signal

    argv = ["race", "adamw", "--steps", "100000", "--batch", "2", "--context", "16", "--d-model", "16"]
    argv += ["--layers", "1", "--heads", "2", "--threads", "1", "--out", str(tmp_path)]
    # SIGINT as a terminal delivers it: a suite started in the background of a script (`cmd &`)
    # runs with SIGINT ignored, which the race inherits and, rightly, keeps ignoring
    proc = subprocess.Popen(
        [sys.executable, "-m", "soapdsl", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    try:
        started = [proc.stderr.readline()]
        while started[-1] and not started[-1].startswith("adamw: 1/100000"):  # training has begun
            started.append(proc.stderr.readline())
        assert started[-1], started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, out, err) == (130, "", "interrupted\n")
    assert not (tmp_path / "race.json").exists()


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = code + "\nimport sys\nprint(' '.join(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(proc.stdout.splitlines()[-1].split())


def test_help_and_a_bad_command_line_do_not_import_torch():
    """Importing torch takes seconds on a CPU: `soapdsl --help` took 4 s, and a ^C during the
    import was a traceback. The commands import torch when they run, inside main()."""
    code = (
        "from soapdsl.cli import main\n"
        "for argv in (['--help'], ['race', '--help'], ['fmt', '--help'], ['race', 'adamw', '--steps', 'x']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass"
    )
    assert "torch" not in _modules_after(code)
    assert "torch" not in _modules_after("import soapdsl; soapdsl.SoapError; soapdsl.__version__")


def test_the_submodules_are_attributes_of_the_package_as_before():
    """`import soapdsl` imported the submodules eagerly, so `soapdsl.library.shipped_names()`
    worked after it alone; the names loaded at first use must keep that (a test file that read
    soapdsl.library at collection failed when run by itself)."""
    code = "import soapdsl\nsoapdsl.library.shipped_names(); soapdsl.registry.all_ops(); soapdsl.race.runner"
    assert "soapdsl.library" in _modules_after(code)


def test_the_commands_that_build_no_optimizer_do_not_import_dynamo():
    """torch.compiler.disable, as a decorator at import, imports torch._dynamo: half of `import
    soapdsl`'s 3 s, for code that runs only when something is compiled. (Building an optimizer
    imports it all the same: torch.optim.Optimizer's add_param_group does.)"""
    recipe = Path(__file__).parents[1] / "recipes" / "soap.soap"
    code = (
        "import torch, soapdsl\n"
        "from soapdsl.cli import main\n"
        "soapdsl.compile('soap', torch.nn.Linear(4, 3), stochastic_round=True)\n"
        f"for argv in (['compile', 'soap_muon'], ['check', {str(recipe)!r}], ['list']):\n"
        "    assert main(argv) == 0"
    )
    modules = _modules_after(code)
    assert "torch" in modules
    assert "torch._dynamo" not in modules


@pytest.mark.parametrize(
    ("argv", "message", "command"),
    [
        (["race", "adamw", "--steps", "abc"], "argument --steps: invalid int value: 'abc'", "soapdsl race"),
        (["race", "adamw", "--steps"], "argument --steps: expected one argument", "soapdsl race"),
        (["compile", "adamw", "--bogus"], "unrecognized arguments: --bogus", "soapdsl compile"),
        (["list", "extra"], "unrecognized arguments: extra", "soapdsl list"),
        (["compile"], "the following arguments are required: RECIPE", "soapdsl compile"),
        (
            ["compile", "adamw", "--format", "yaml"],
            "argument --format: invalid choice: 'yaml' (choose from 'text', 'json')",
            "soapdsl compile",
        ),
        (["lsit"], "argument command: invalid choice: 'lsit' (choose from 'compile',", "soapdsl"),
        ([], "the following arguments are required: command", "soapdsl"),
        # the second '-' found standard input empty: `check - -` said "<stdin>: ok (empty)"
        (["check", "-", "-"], "'-' is given more than once: standard input", "soapdsl check"),
        (["fmt", "--check", "-", "x.soap", "-"], "'-' is given more than once: standard input", "soapdsl fmt"),
    ],
)
def test_a_bad_command_line_is_one_error_with_status_1(capsys, argv, message, command):
    """argparse printed its usage text and exited with status 2, where every other bad option
    (--steps -1, --set lr, --shapes w=4by3) is one `error:` line and status 1, as docs/errors.md says."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    first, note = err.splitlines()
    assert first.startswith(f"error: {message}"), err
    assert note == f"  note: see '{command} --help'"


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        (["compile", "adamw", "--form", "json"], "--form json"),
        (["compile", "adamw", "--sha=w=4x3"], "--sha=w=4x3"),
        (["race", "adamw", "--steps", "0", "--thr", "2"], "--thr 2"),  # (--steps 0: never a race)
        (["race", "adamw", "--no", "--steps", "0"], "--no"),  # was the hidden --no-plot
    ],
)
def test_an_abbreviated_option_is_refused(capsys, argv, unknown):
    """argparse took any unique prefix of a long option (--thr for --threads, --no for the hidden
    --no-plot): a script that used one broke, or changed meaning, when an option was added."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: unrecognized arguments: {unknown}\n"), err


def _options_the_docs_use() -> set[tuple[str, str]]:
    """(command, --option) of every soapdsl command line written in README.md and docs/*.md."""
    import re

    root = Path(__file__).resolve().parents[1]
    used = set()
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for m in re.finditer(r"soapdsl (race|compile|check|fmt|list)\b([^`\n]*)", path.read_text(encoding="utf-8")):
            used.update((m[1], opt) for opt in re.findall(r"(?<![\w-])--[a-z][a-z-]*", m[2]))
    return used


def test_every_option_the_docs_use_is_in_its_commands_help():
    """docs/recipes.md's GPU race passes --d-model, --layers and --heads, which race --help hid
    (README: `soapdsl COMMAND --help` lists every option)."""
    from soapdsl.cli import make_parser

    used = _options_the_docs_use()
    assert ("race", "--d-model") in used and ("compile", "--shapes") in used
    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, option in sorted(used):
        assert option in commands[command]._option_string_actions, f"the docs use {command} {option}"
        assert option in commands[command].format_help(), f"{command} --help does not list {option}"


def test_help_lists_every_option():
    from soapdsl.cli import make_parser

    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        shown = parser.format_help()
        for action in parser._actions:
            for option in action.option_strings:
                assert option in shown, f"soapdsl {name} --help does not list {option}"


@pytest.mark.parametrize(
    ("raw", "where", "byte", "shown", "caret"),
    [
        (b"recipe r(lr=1) = sign |> lr # caf\xe9\n", "1:34", "0xe9", "recipe r(lr=1) = sign |> lr # caf\ufffd", 33),
        (  # after a BOM, a CRLF, a tab and a wide character: columns count characters, as the parser's
            "\ufeff# \u4e2d\r\nrecipe r(lr=1) =\tsign |> lr # \u4e2d".encode() + b"\x96\r\n",
            "2:32",
            "0x96",
            "recipe r(lr=1) = sign |> lr # \u4e2d\ufffd",
            32,  # the wide character takes two columns
        ),
    ],
)
def test_a_file_that_is_not_utf8_points_at_its_first_bad_byte(tmp_path, capsys, raw, where, byte, shown, caret):
    """A Latin-1 or Windows-1252 byte in a comment gave 'is not UTF-8 text' and no location."""
    path = tmp_path / "bad.soap"
    path.write_bytes(raw)
    for cmd in ("check", "fmt", "compile"):
        code, out, err = run(capsys, cmd, str(path))
        assert (code, out) == (1, "")
        assert err.splitlines() == [
            f"{path}:{where}: syntax error: recipe file '{path}' is not UTF-8 text",
            f"{where.split(':')[0]:>5} | {shown}",
            "      | " + " " * caret + "^",
            f"  note: byte {byte} here is not UTF-8: save the file as UTF-8",
        ]


def test_a_dash_reads_standard_input(capsys, monkeypatch):
    """`soapdsl fmt -` (an editor piping a buffer through the formatter) said "cannot read recipe
    file '-'", and `soapdsl compile -` read '-' as recipe text."""
    import io

    def stdin(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))

    stdin("recipe   r( lr = 1e-3 )=momentum( 0.9 )|>sign |> lr\n")
    assert run(capsys, "fmt", "-") == (0, "recipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n", "")
    stdin("recipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n")
    assert run(capsys, "check", "-") == (0, "<stdin>: ok (recipe r)\n", "")
    stdin("recipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n")
    code, out, err = run(capsys, "compile", "-", "--shapes", "w=4x3")
    assert (code, err) == (0, "") and out.startswith("recipe r  (<stdin>)")
    stdin("recipe r(lr=1e-3) = momentum(0.9) |> |> lr\n")
    code, out, err = run(capsys, "check", "-")
    assert (code, out) == (1, "")
    assert err.splitlines()[0] == "<stdin>:1:38: syntax error: unexpected '|>'; expected a name"


def test_a_pipe_given_as_a_path_is_read(tmp_path):
    """`soapdsl compile <(gen_recipe)` and /dev/stdin name a pipe, not a regular file: the path was
    read as recipe text and failed with a syntax error at its '/'."""
    proc = subprocess.run(
        [sys.executable, "-m", "soapdsl", "compile", "/dev/stdin", "--shapes", "w=4x3"],
        input="recipe r(lr=1e-3) = momentum(0.9) |> sign |> lr\n",
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("recipe r  (/dev/stdin)")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["list"], ["compile", "soap"], ["check", "recipes/adam.soap"]])
def test_an_output_that_cannot_be_written_is_one_error(argv):
    """`soapdsl list > /dev/full` (a full disk) printed an OSError traceback from inside soapdsl."""
    root = Path(__file__).resolve().parents[1]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "soapdsl", *argv], stdout=full, stderr=subprocess.PIPE, text=True, cwd=root
        )
    assert (proc.returncode, proc.stderr) == (1, "error: cannot write the output: No space left on device\n")


def test_standard_input_that_cannot_be_read_is_one_error(capsys, monkeypatch):
    class Broken:
        def read(self) -> bytes:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": Broken()})())
    assert run(capsys, "check", "-") == (1, "", "error: cannot read standard input: Input/output error\n")


def test_compile_state_rows_cover_every_shape_of_a_route(capsys):
    """The rows listed the route's first parameter's state: a route with a vector and two
    matrices showed its factors at the vector's (none) or the first matrix's shape only."""
    assert main(["compile", "soap", "--shapes", "w=100x3,b=5,c=7x3"]) == 0
    out = capsys.readouterr().out
    assert "state per parameter (d0, d1, ...: the parameter's dims):" in out
    assert re.search(r"0\.rotate\.GG0 +\[d0, d0\]; none for \[5\]\n", out), out
    assert re.search(r"0\.rotate\.Q1 +\[3, 3\]; none for \[5\]\n", out), out  # the same for both matrices
    assert re.search(r"0\.0\.momentum\.buf +like the parameter\n", out), out
    # a vector first: the factors are still listed, in the order of the stages
    assert main(["compile", "soap", "--shapes", "b=5,w=100x3"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    0.")]
    assert rows == [
        "0.rotate.GG0",
        "0.rotate.Q0",
        "0.rotate.GG1",
        "0.rotate.Q1",
        "0.0.momentum.buf",
        "0.1.rms_normalize.v",
    ]
    # shapes that do not share dims in one place: each named
    assert main(["compile", "soap", "--set", "max_dim=50", "--shapes", "w=100x3,c=7x60"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"0\.rotate\.GG0 +\[7, 7\]; none for \[100, 3\]\n", out), out
