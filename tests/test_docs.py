"""The documentation stays true: the operator reference is fresh, and every example parses.

* docs/operators.md is exactly what ``python -m soapdsl.docgen`` renders from the registry.
* Every ```soap block in docs/*.md and README.md parses; a block whose first line is not
  ``# parse-only`` must also pass the checker (recipes and macros through
  ``library.check_module``, a bare pipeline through ``library.resolve``).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

import soapdsl
from soapdsl import library
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
        if module.definitions:
            recipes, _ = library.check_module(module)
            assert module.pipeline is None or not recipes, f"{where}: recipes and a bare pipeline"
        if module.pipeline is not None:
            library.resolve(text)
    except soapdsl.SoapError as e:
        pytest.fail(
            f"{where}: example parses but does not check (mark it `{PARSE_ONLY}` if it uses"
            f" operators that do not exist yet):\n{e}",
            pytrace=False,
        )
