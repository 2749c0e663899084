"""Where the grammar and the shipped recipes live.

In a wheel they are packaged under ``soapdsl/_data/``; in a source checkout (editable
install, or tests run from the repository) they are the top-level ``grammar/`` and
``recipes/`` folders.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@cache
def data_dir(kind: str) -> Path:
    """Directory of shipped data of ``kind`` ("grammar" or "recipes")."""
    for candidate in (_PKG / "_data" / kind, _PKG.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"soapdsl installation is missing its {kind}/ folder")


def grammar_path() -> Path:
    return data_dir("grammar") / "soap.lark"


def recipe_files() -> list[Path]:
    return sorted(data_dir("recipes").glob("*.soap"))
