"""The race's bundled dataset: the King James Bible as plain text (see soapdsl/data/README.md).

The text is stored xz-compressed inside the package: one verse per line, books separated by a
blank line, 66 books from Genesis to Revelation. Training uses the first 44 books (Genesis to
Acts, 90.7% of the characters); validation holds out the last 22 (Romans to Revelation).
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
KJV_FILE = DATA_DIR / "kjv.txt.xz"
N_BOOKS = 66
#: the first held-out book: Romans (book 45); validation is Romans..Revelation
VALID_FROM_BOOK = 44


@dataclass(frozen=True)
class Corpus:
    """A character corpus: train and validation ids (uint8) and the vocabulary."""

    name: str
    vocab: str  # id -> character
    train: torch.Tensor
    valid: torch.Tensor
    train_chars: int
    valid_chars: int

    def encode(self, text: str) -> torch.Tensor:
        lut = torch.zeros(256, dtype=torch.uint8)
        lut[torch.tensor([ord(c) for c in self.vocab])] = torch.arange(len(self.vocab), dtype=torch.uint8)
        return lut[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]

    def decode(self, ids: torch.Tensor) -> str:
        chars = torch.tensor([ord(c) for c in self.vocab], dtype=torch.uint8)
        return bytes(chars[ids.long()].tolist()).decode("ascii")


def kjv_text() -> str:
    """The whole cleaned text (about 4.1 MB)."""
    with lzma.open(KJV_FILE, "rt", encoding="ascii", newline="\n") as f:
        return f.read()


def kjv_books() -> list[str]:
    books = kjv_text().rstrip("\n").split("\n\n")
    if len(books) != N_BOOKS:  # pragma: no cover - a broken data file
        raise RuntimeError(f"{KJV_FILE} holds {len(books)} books, expected {N_BOOKS}")
    return books


@cache
def load_charlm() -> Corpus:
    """The charlm task's corpus, encoded once per process."""
    books = kjv_books()
    train_text = "\n\n".join(books[:VALID_FROM_BOOK]) + "\n\n"
    valid_text = "\n\n".join(books[VALID_FROM_BOOK:]) + "\n"
    vocab = "".join(sorted(set(train_text) | set(valid_text)))
    empty = torch.empty(0, dtype=torch.uint8)
    c = Corpus("kjv", vocab, empty, empty, len(train_text), len(valid_text))
    return Corpus("kjv", vocab, c.encode(train_text), c.encode(valid_text), len(train_text), len(valid_text))
