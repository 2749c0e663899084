"""`soapdsl race`: train a small model with several recipes from the same start and compare.

>>> from soapdsl.race import run_race
>>> result = run_race(["adamw", "soap:freq=20"], steps=300)   # doctest: +SKIP
>>> print(result.table())                                      # doctest: +SKIP
"""

from soapdsl.race.runner import RaceConfig, RaceResult, Row, RunResult, run_race
from soapdsl.race.spec import RecipeSpec, parse_spec, parse_specs

__all__ = ["RaceConfig", "RaceResult", "RecipeSpec", "Row", "RunResult", "parse_spec", "parse_specs", "run_race"]
