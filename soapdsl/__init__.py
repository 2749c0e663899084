"""soapdsl: a declarative language for composing PyTorch optimizers.

import soapdsl
opt = soapdsl.build("adamw", model, lr=3e-4)
opt = soapdsl.build("momentum(0.9) |> sign |> lr", model, lr=1e-3)
"""

from soapdsl.api import apply, build, compile, from_config, parse
from soapdsl.compiler import Plan
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
from soapdsl.runtime.optimizer import SoapOptimizer

__version__ = "0.1.0"

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
