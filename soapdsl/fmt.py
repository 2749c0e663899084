"""`soapdsl fmt`: print, check, diff or rewrite .soap files in canonical form.

Every file is processed: a file that cannot be read, parsed or checked has its error printed
on stderr and the next file is taken; the status is 1 at the end if any failed.
"""

from __future__ import annotations

import codecs
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from soapdsl.errors import SoapError, SoapNameError
from soapdsl.syntax.formatter import format_module
from soapdsl.syntax.parser import load_file, parse

#: what to do with each file's canonical form
PRINT, CHECK, DIFF, WRITE = "print", "check", "diff", "write"


def run(paths: Sequence[str], mode: str, read_stdin: Callable[[], str], stdin: str = "-") -> int:
    """Format each of ``paths`` (``stdin``: read with ``read_stdin``) as ``mode`` says; the
    exit status: 1 if a file failed, or, in CHECK and DIFF modes, would change."""
    from soapdsl import library  # (the operators, and torch: not for the CLI's parser, which reads the modes)

    failed = changed = False
    for path in paths:
        try:
            if path == stdin:
                name, text = "<stdin>", read_stdin()
                module = parse(text, name)
            else:
                name = path
                text, module = load_file(path)
            library.check_source(module)  # as `soapdsl check` checks it
            out = format_module(module)
            if mode == PRINT:
                sys.stdout.write(out)
            elif out != text:
                changed = True
                _report(mode, path, name, text, out)
        except SoapError as e:
            print(e.format(), file=sys.stderr)
            failed = True
    return 1 if failed or (changed and mode in (CHECK, DIFF)) else 0


def _as_written(raw: bytes, out: str) -> bytes:
    """The bytes of ``out`` with the conventions of the file's bytes ``raw``, which the text it
    was read as does not show (so --check passes a file that has them): CRLF line ends where
    its first line ends so, and a UTF-8 byte-order mark where it starts with one."""
    first = raw.split(b"\n", 1)[0]
    if first.endswith(b"\r") and len(first) < len(raw):
        out = out.replace("\n", "\r\n")
    return (codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b"") + out.encode("utf-8")


def _report(mode: str, path: str, name: str, text: str, out: str) -> None:
    """What to do with a file whose canonical form ``out`` differs from its ``text``."""
    if mode == CHECK:
        print(name)
    elif mode == DIFF:
        for line in difflib.unified_diff(text.splitlines(True), out.splitlines(True), name, name):
            # (only the source's last line can lack its line end: the canonical form has it)
            sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    else:
        try:
            Path(path).write_bytes(_as_written(Path(path).read_bytes(), out))
        except OSError as e:
            raise SoapNameError(f"cannot write recipe file {path!r}: {e.strerror}") from None
        print(name)
