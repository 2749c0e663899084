"""soapdsl: a declarative language for composing PyTorch optimizers.

import soapdsl
opt = soapdsl.build("adamw", model, lr=3e-4)
opt = soapdsl.build("momentum(0.9) |> sign |> lr", model, lr=1e-3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from soapdsl._lazy import lazy
from soapdsl.errors import (
    SoapArgumentError,
    SoapConfigError,
    SoapError,
    SoapNameError,
    SoapRecipeError,
    SoapRouteError,
    SoapShapeError,
    SoapStateError,
    SoapSyntaxError,
    SoapWarning,
)

if TYPE_CHECKING:
    from soapdsl.api import apply, build, compile, from_config, parse
    from soapdsl.compiler import Plan
    from soapdsl.runtime.optimizer import SoapOptimizer

__version__ = "0.1.0"

#: the names that need torch, imported at their first use: `soapdsl --help` and a command-line
#: error need none of them, and importing torch takes seconds
_LAZY = {
    "apply": "soapdsl.api",
    "build": "soapdsl.api",
    "compile": "soapdsl.api",
    "from_config": "soapdsl.api",
    "parse": "soapdsl.api",
    "Plan": "soapdsl.compiler",
    "SoapOptimizer": "soapdsl.runtime.optimizer",
}


__getattr__, __dir__ = lazy("soapdsl", _LAZY, globals())

__all__ = [
    "apply",
    "build",
    "compile",
    "from_config",
    "parse",
    "Plan",
    "SoapOptimizer",
    "SoapError",
    "SoapSyntaxError",
    "SoapNameError",
    "SoapArgumentError",
    "SoapRouteError",
    "SoapShapeError",
    "SoapConfigError",
    "SoapStateError",
    "SoapRecipeError",
    "SoapWarning",
    "__version__",
]
