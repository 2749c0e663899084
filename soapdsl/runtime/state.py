"""``SoapOptimizer.state``: torch's ``defaultdict(dict)``, which notices changes made to it.

The optimizer keeps a layout between steps (runtime/optimizer.py): which parameters run
together, their state stacked into slabs, a host copy of their step counts. Code outside the
optimizer may change ``opt.state`` as it would a torch optimizer's: reset it
(``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p] = {}``), or replace a tensor
(``opt.state[p][key] = torch.zeros_like(...)``). Each such change sets ``dirty`` on the
mapping, and the next step builds its layout again from what the mapping then holds. (A
mapping assigned whole, ``opt.state = defaultdict(dict)``, is a different object, which the
optimizer notices by identity.) Changes made in place to a state tensor need nothing: the
tensors are views of the slabs. The "step" counters are the exception: the optimizer keeps a
host copy of each count, so a count changed in place is not seen; assign a new tensor.

Both classes pickle as the plain ``defaultdict(dict)`` and ``dict`` they stand for (the
optimizer wraps them again when it is unpickled), and ``state_dict()`` holds plain dicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["OptimizerState", "ParamState"]


class ParamState(dict):  # type: ignore[type-arg]
    """One parameter's state; a change to it marks its optimizer's state ``dirty``."""

    def __init__(self, owner: OptimizerState, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        super().__init__(items)
        self.owner = owner

    def _changed(self) -> None:
        self.owner.dirty = True

    def __setitem__(self, key: str, value: Any) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other: Any) -> ParamState:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        self._changed()
        super().clear()

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self._changed()
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._changed()
        super().update(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


class OptimizerState(defaultdict):  # type: ignore[type-arg]
    """``param -> ParamState``; ``dirty`` is set by any change but the creation of an empty entry."""

    def __init__(self, items: Iterable[tuple[torch.Tensor, Mapping[str, Any]]] = ()) -> None:
        super().__init__(dict)
        self.dirty = True
        for key, value in items:
            dict.__setitem__(self, key, self._own(value))

    def _own(self, value: Any) -> Any:
        if isinstance(value, ParamState) and value.owner is self:
            return value
        return ParamState(self, value) if isinstance(value, Mapping) else value

    def __missing__(self, key: torch.Tensor) -> ParamState:
        # reading the state of a parameter that has none changes nothing a layout holds
        value = ParamState(self)
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: torch.Tensor, value: Any) -> None:
        self.dirty = True
        super().__setitem__(key, self._own(value))

    def __delitem__(self, key: torch.Tensor) -> None:
        self.dirty = True
        super().__delitem__(key)

    def __ior__(self, other: Any) -> OptimizerState:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        self.dirty = True
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.dirty = True
        return super().pop(*args)

    def popitem(self) -> tuple[torch.Tensor, Any]:
        self.dirty = True
        return super().popitem()

    def setdefault(self, key: torch.Tensor, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self) -> tuple[Any, ...]:
        items = {k: dict(v) if isinstance(v, Mapping) else v for k, v in self.items()}
        return (defaultdict, (dict,), None, None, iter(items.items()))
