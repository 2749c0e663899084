"""Names of a package imported at their first use (PEP 562): soapdsl's and soapdsl.race's
torch-bound names, so that the command line's parser and `soapdsl --help` import no torch."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy(
    package: str, names: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose globals are ``namespace``:
    each of ``names`` (name -> the module that defines it) is imported at its first use and
    then kept in ``namespace``, so later lookups are a module attribute's."""

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            # a submodule (soapdsl.library, soapdsl.registry): importing the package eagerly
            # made them attributes, and code reads them so
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(names))

    return getattr_, dir_
