"""`soapdsl race`: train a small model with several recipes from the same start and compare.

>>> from soapdsl.race import run_race
>>> result = run_race(["adamw", "soap:freq=20"], steps=300)   # doctest: +SKIP
>>> print(result.table())                                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from soapdsl._lazy import lazy

if TYPE_CHECKING:
    from soapdsl.race.runner import RaceConfig, RaceResult, Row, RunResult, run_race
    from soapdsl.race.spec import RecipeSpec, parse_spec, parse_specs

#: imported at their first use, as soapdsl's own names are (soapdsl/__init__.py): the command
#: line's parser reads soapdsl.race.defaults without importing torch
_LAZY = {
    "RaceConfig": "soapdsl.race.runner",
    "RaceResult": "soapdsl.race.runner",
    "Row": "soapdsl.race.runner",
    "RunResult": "soapdsl.race.runner",
    "run_race": "soapdsl.race.runner",
    "RecipeSpec": "soapdsl.race.spec",
    "parse_spec": "soapdsl.race.spec",
    "parse_specs": "soapdsl.race.spec",
}


__getattr__, __dir__ = lazy("soapdsl.race", _LAZY, globals())

__all__ = ["RaceConfig", "RaceResult", "RecipeSpec", "Row", "RunResult", "parse_spec", "parse_specs", "run_race"]
