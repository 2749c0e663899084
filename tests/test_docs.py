"""The documentation stays true: the operator reference is fresh, and every example parses.

* docs/operators.md is exactly what ``python -m soapdsl.docgen`` renders from the registry.
* Every ```soap block in docs/*.md and README.md parses; a block whose first line is not
  ``# parse-only`` must also pass the checker, as ``soapdsl check`` runs it
  (``library.check_source``: recipes, macros and a bare pipeline).
* Each file in docs/examples is the ```soap block that names it in its first line.
* Every ``$ soapdsl check`` and ``$ soapdsl compile`` transcript prints what the docs show. It
  runs in an empty folder holding the files the transcript shows with ``$ cat NAME`` and those
  that an earlier ```soap block of the same page names in its first line (``# NAME.soap: ...``).
  A line ``...`` in the expected output stands for lines left out.
* Every ``>>>`` transcript (a ```python or ```text block) prints what the docs show: its lines
  run in order in a fresh namespace holding ``soapdsl``, ``torch``, ``nn`` and ``model``, an
  ``nn.Linear(4, 3)``; an expression prints its repr, an exception ``module.Class: message``.
  ``$ cat NAME`` lines write their files first, as above.
* how-it-works.md's parse tree, AST, IR and state dict entry of `tiny` are what those stages give.
* Every ``soapdsl race`` command and race spec (``soap:freq=20``) takes race's options and
  resolves its recipes; it does not train.
* Every link from one page to another, or to a heading of the same page, resolves.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import shlex
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import soapdsl
from soapdsl import library, registry
from soapdsl.cli import main as cli_main
from soapdsl.docgen import render_operator_reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PARSE_ONLY = "# parse-only"
_BLOCK = re.compile(r"^```soap[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    readme = ROOT / "README.md"
    if readme.is_file():
        files.append(readme)
    return files


def _soap_blocks() -> list[tuple[str, str]]:
    """(id, text) of every soap block; the id is "file.md:LINE" of the block's first line."""
    out = []
    for path in _doc_files():
        text = path.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(1)) + 1
            out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return out


BLOCKS = _soap_blocks()


def test_operator_reference_is_fresh() -> None:
    path = DOCS / "operators.md"
    expected = render_operator_reference()
    actual = path.read_text(encoding="utf-8") if path.is_file() else ""
    if actual != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    actual.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    "docs/operators.md",
                    "rendered",
                )
            )[:40]
        )
        pytest.fail(
            "docs/operators.md is stale: regenerate it with `python -m soapdsl.docgen --write`\n" + diff,
            pytrace=False,
        )


def _pending_scale_line(name: str) -> str:
    text = (DOCS / "operators.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^- \*\*pending scale\*\*: (.*)$", section, re.M).group(1)


@pytest.mark.parametrize("name", sorted(registry.all_ops()))
def test_pending_scale_says_what_the_runtime_does_with_the_default_arguments(name: str) -> None:
    """operators.md read the flags of the class, where renorm and graft compute them from their
    arguments (properties, which are always true as class attributes): it said renorm 'passes
    it on', so that `bias_correct(0.9) |> renorm` read as a bias-corrected unit step, while the
    runtime applies the factor first and renorm removes it."""
    cls = registry.all_ops()[name]
    op = cls(cls.Args())
    if op.linear:
        expected = "passes it on"
    elif op.homogeneous:
        expected = "passes a positive one on, applies a negative one first"
    elif op.scale_invariant:
        expected = "drops a positive one, applies a negative one first"
    else:
        expected = "applies it first"
    line = _pending_scale_line(name)
    assert line == expected or line.startswith(expected + " with the default arguments"), line


def test_docs_have_soap_examples() -> None:
    assert any(i.startswith("docs/language.md") for i, _ in BLOCKS)
    assert any(i.startswith("docs/operators.md") for i, _ in BLOCKS)


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[i for i, _ in BLOCKS])
def test_soap_block(where: str, text: str) -> None:
    try:
        module = soapdsl.parse(text, where)
    except soapdsl.SoapError as e:
        pytest.fail(f"{where}: example does not parse:\n{e}", pytrace=False)
    if text.lstrip().startswith(PARSE_ONLY):
        return
    try:
        library.check_source(module)  # as `soapdsl check` checks it
    except soapdsl.SoapError as e:
        pytest.fail(
            f"{where}: example parses but does not check (mark it `{PARSE_ONLY}` if it uses"
            f" operators that do not exist yet):\n{e}",
            pytrace=False,
        )


def test_example_files_are_the_blocks_that_show_them() -> None:
    """tutorial.md says docs/examples/cautious_soap.soap is the file its block saves: each example
    file is, byte for byte, the ```soap block that names it in its first line."""
    shown = {}
    for path in _doc_files():
        for m in _BLOCK.finditer(path.read_text(encoding="utf-8")):
            hit = _NAMED.match(m.group(1))
            if hit:
                shown[hit.group(1)] = m.group(1)
    examples = sorted((DOCS / "examples").glob("*.soap"))
    assert examples
    for f in examples:
        if f.name in shown:
            assert f.read_text(encoding="utf-8") == shown[f.name], f"{f.relative_to(ROOT)} differs from the docs' block"
    assert any(f.name in shown for f in examples)


# -- transcripts -------------------------------------------------------------------------------

_FENCE = re.compile(r"^```(soap|text)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_NAMED = re.compile(r"^# ([\w.-]+\.soap):")
_RUNS = ("check", "compile")  # `race` trains for minutes; the Python (>>>) lines need a model


def _transcripts() -> list[tuple[str, dict[str, str], list[tuple[str, list[str]]]]]:
    """(id, files, [(command, lines after it)]) of every text block with a soapdsl command."""
    out = []
    for path in _doc_files():
        text = path.read_text(encoding="utf-8")
        named: dict[str, str] = {}
        for m in _FENCE.finditer(text):
            body = m.group(2)
            if m.group(1) == "soap":
                hit = _NAMED.match(body)
                if hit:
                    named[hit.group(1)] = body
                continue
            steps: list[tuple[str, list[str]]] = []
            for line in body.rstrip("\n").split("\n"):
                if line.startswith(("$ ", ">>> ")):
                    steps.append((line, []))
                elif steps:
                    steps[-1][1].append(line)
            if any(cmd.split()[1:3] in (["soapdsl", r] for r in _RUNS) for cmd, _ in steps):
                line_no = text.count("\n", 0, m.start(2)) + 1
                out.append((f"{path.relative_to(ROOT)}:{line_no}", dict(named), steps))
    return out


TRANSCRIPTS = _transcripts()


def _shows(expected: list[str], got: list[str]) -> bool:
    """``got`` equals ``expected``, where a line ``...`` in ``expected`` matches any lines."""
    chunks: list[list[str]] = [[]]
    for line in expected:
        if line == "...":
            chunks.append([])
        else:
            chunks[-1].append(line)
    if len(chunks) == 1:
        return got == expected
    at = 0
    for i, chunk in enumerate(chunks):
        if i == 0:
            if got[: len(chunk)] != chunk:
                return False
            at = len(chunk)
            continue
        if i == len(chunks) - 1 and chunk:
            return len(got) - len(chunk) >= at and got[len(got) - len(chunk) :] == chunk
        while at + len(chunk) <= len(got) and got[at : at + len(chunk)] != chunk:
            at += 1
        if at + len(chunk) > len(got):
            return False
        at += len(chunk)
    return True


def test_docs_have_transcripts() -> None:
    assert sum(1 for _, _, steps in TRANSCRIPTS for cmd, _ in steps if cmd.startswith("$ soapdsl check")) >= 30
    assert any(i.startswith("docs/how-it-works.md") for i, _, _ in TRANSCRIPTS)


@pytest.mark.parametrize(("where", "files", "steps"), TRANSCRIPTS, ids=[i for i, _, _ in TRANSCRIPTS])
def test_transcript(where, files, steps, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    ran = 0
    for cmd, shown in steps:
        if cmd.startswith("$ cat "):
            (tmp_path / cmd[len("$ cat ") :].strip()).write_text("\n".join(shown) + "\n")
            continue
        argv = shlex.split(cmd[2:])
        if argv[0] != "soapdsl" or len(argv) < 2 or argv[1] not in _RUNS:
            continue
        # both streams in the order a terminal shows them; a soapdsl warning the docs do not show
        # fails the test (pyproject's filterwarnings), one they show is printed as the CLI does
        with contextlib.redirect_stderr(sys.stdout), warnings.catch_warnings():
            if any(": warning: " in line for line in shown):
                warnings.simplefilter("always", soapdsl.SoapWarning)
            cli_main(argv[1:])
        out, err = capsys.readouterr()
        got = (out + err).rstrip("\n").split("\n")
        while shown and not shown[-1]:
            shown = shown[:-1]
        if not _shows(shown, got):
            diff = "\n".join(difflib.unified_diff(shown, got, "the docs", "soapdsl", lineterm=""))
            pytest.fail(f"{where}: `{cmd[2:]}` prints something else:\n{diff}", pytrace=False)
        ran += 1
    assert ran, f"{where}: no check or compile command ran"


# -- Python transcripts ------------------------------------------------------------------------

_PY_FENCE = re.compile(r"^```(python|text)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _python_transcripts() -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """(id, [(line, lines after it)]) of every block with ``>>>`` lines; ``$ cat`` lines kept."""
    out = []
    for path in _doc_files():
        text = path.read_text(encoding="utf-8")
        for m in _PY_FENCE.finditer(text):
            steps: list[tuple[str, list[str]]] = []
            for line in m.group(2).rstrip("\n").split("\n"):
                if line.startswith(("$ ", ">>> ")):
                    steps.append((line, []))
                elif steps:
                    steps[-1][1].append(line)
            if any(cmd.startswith(">>> ") for cmd, _ in steps):
                line_no = text.count("\n", 0, m.start(2)) + 1
                out.append((f"{path.relative_to(ROOT)}:{line_no}", steps))
    return out


PY_TRANSCRIPTS = _python_transcripts()


def _run_line(source: str, namespace: dict) -> list[str]:
    """What the interactive interpreter prints for one line, exceptions as ``module.Class: msg``."""
    buf = io.StringIO()
    try:
        code = compile(source, "<docs>", "single")
        with contextlib.redirect_stdout(buf):
            old_hook, sys.displayhook = sys.displayhook, sys.__displayhook__
            try:
                exec(code, namespace)
            finally:
                sys.displayhook = old_hook
    except Exception as e:  # the transcript shows what any exception prints
        cls = type(e)
        buf.write(f"{cls.__module__}.{cls.__qualname__}: {e}\n")
    return buf.getvalue().rstrip("\n").split("\n") if buf.getvalue() else []


def test_docs_have_python_transcripts() -> None:
    assert sum(1 for i, _ in PY_TRANSCRIPTS if i.startswith("docs/errors.md")) >= 15


@pytest.mark.parametrize(("where", "steps"), PY_TRANSCRIPTS, ids=[i for i, _ in PY_TRANSCRIPTS])
def test_python_transcript(where, steps, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"soapdsl": soapdsl, "torch": torch, "nn": nn, "model": nn.Linear(4, 3)}
    for cmd, shown in steps:
        if cmd.startswith("$ cat "):
            (tmp_path / cmd[len("$ cat ") :].strip()).write_text("\n".join(shown) + "\n")
            continue
        if not cmd.startswith(">>> "):
            continue
        got = _run_line(cmd[len(">>> ") :], namespace)
        while shown and not shown[-1]:
            shown = shown[:-1]
        if not _shows(shown, got):
            diff = "\n".join(difflib.unified_diff(shown, got, "the docs", "python", lineterm=""))
            pytest.fail(f"{where}: `{cmd[4:]}` prints something else:\n{diff}", pytrace=False)


# -- how-it-works.md's stages of `tiny` ----------------------------------------------------------


def test_how_it_works_shows_what_each_stage_makes_of_tiny() -> None:
    """The parse tree, the AST, the checked IR and the state dict entry that how-it-works.md
    prints for its recipe `tiny` are what those stages give (the AST and IR up to the line
    breaks the page adds)."""
    import json

    from soapdsl.syntax.parser import _parser

    text = (DOCS / "how-it-works.md").read_text(encoding="utf-8")
    (tiny,) = [b for b in (m.group(1) for m in _BLOCK.finditer(text)) if b.startswith("recipe tiny(")]
    shown = {}
    for m in _FENCE.finditer(text):
        body = m.group(2).rstrip("\n")
        for start in ("start\n", "Module(", "Recipe(name='tiny'", '{"soapdsl":'):
            if m.group(1) == "text" and body.startswith(start):
                shown[start] = body
    assert len(shown) == 4, f"how-it-works.md no longer shows all four: {sorted(shown)}"

    def squeezed(s: str) -> str:
        return re.sub(r"\s+", "", s)

    assert shown["start\n"] == _parser().parse(tiny).pretty().rstrip("\n")
    assert squeezed(shown["Module("]) == squeezed(repr(soapdsl.parse(tiny)))
    assert squeezed(shown["Recipe(name='tiny'"]) == squeezed(repr(library.resolve(tiny)))
    opt = soapdsl.build(tiny, nn.Linear(3, 4))
    assert json.loads(shown['{"soapdsl":']) == {"soapdsl": opt.state_dict()["soapdsl"]}


# -- race commands -------------------------------------------------------------------------------

_RACE = re.compile(r"(?:^|[\s/`])soapdsl race ([^`\n]+)|`([A-Za-z_]\w*:[A-Za-z_]\w*=[^`\s]*)`")


def _race_commands() -> list[tuple[str, dict[str, str], str]]:
    """(id, files, arguments) of every ``soapdsl race`` command the docs show, in a code block or
    in inline code, and of every race spec in inline code (``soap:freq=20``); a synopsis or an
    elided one (``RECIPE...``, ``race ...``) is no command, and errors.md's are examples of what
    is refused."""
    out = []
    for path in _doc_files():
        if path.name == "errors.md":
            continue
        text = path.read_text(encoding="utf-8")
        named = {hit.group(1): m.group(1) for m in _BLOCK.finditer(text) if (hit := _NAMED.match(m.group(1)))}
        for m in _RACE.finditer(text):
            args = (m.group(1) or m.group(2)).strip()
            if "..." in args:
                continue
            at = m.start(1) if m.group(1) is not None else m.start(2)
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, at) + 1}"
            out.append((where, named, args))
    return out


RACE_COMMANDS = _race_commands()


def test_docs_have_race_commands() -> None:
    assert len(RACE_COMMANDS) >= 5


@pytest.mark.parametrize(("where", "files", "args"), RACE_COMMANDS, ids=[i for i, _, _ in RACE_COMMANDS])
def test_race_command(where, files, args, tmp_path, monkeypatch) -> None:
    """Every race the docs show takes its options and resolves each of its recipes (it does not
    train: that takes minutes). It runs in an empty folder holding the page's named ```soap
    files, with docs/ reachable as from the repository root."""
    from soapdsl.cli import make_parser
    from soapdsl.race.spec import parse_specs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").symlink_to(DOCS)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    try:
        ns = make_parser().parse_args(["race", *shlex.split(args)])
    except SystemExit:
        ns = None
    if ns is None:
        pytest.fail(f"{where}: `soapdsl race {args}` is refused by race's options", pytrace=False)
    problem = None
    try:
        for spec in parse_specs(ns.recipes):
            if spec.recipe.strip() != "-":  # `-` is text on standard input, which a page does not show
                spec.resolve()
    except soapdsl.SoapError as e:
        problem = str(e)
    if problem is not None:
        pytest.fail(f"{where}: `soapdsl race {args}` names a recipe that does not resolve:\n{problem}", pytrace=False)


# -- links ---------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE):
        base = _anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_links_resolve() -> None:
    broken = []
    for path in _doc_files():
        text = path.read_text(encoding="utf-8")
        for m in _LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            file, _, frag = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            if not dest.exists():
                broken.append(f"{where}: {target}: no such file")
            elif frag and dest.suffix == ".md" and frag not in _anchors(dest):
                broken.append(f"{where}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)
