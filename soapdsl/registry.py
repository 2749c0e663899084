"""The operator registry: the contract every primitive implements.

A primitive is one module in :mod:`soapdsl.ops` defining one :class:`Op` subclass decorated
with :func:`register`. Everything else (checker, compiler, runtime, CLI, docs) finds it here.

An op declares

* ``Args``: a pydantic model; field order is the positional-argument order. Fields annotated
  with :data:`Hyper` may be given a recipe parameter and are then read from the route's
  param_group at every step, so LR schedulers and users can change them during training.
  Fields annotated with :data:`FirstStepHyper` may too, but the op reads them once per
  parameter, at its first step, and keeps the value (in its host state).
* ``state(shape)``: the per-parameter state it needs (name -> :class:`StateSpec`).
* ``apply(ctx, x)``: the batched tensor function. ``x`` is a :class:`~soapdsl.runtime.context.Val`
  holding one tensor per bucket; in a batched route a bucket tensor has a leading batch
  dimension over parameters of equal shape.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from soapdsl.ir import Value
    from soapdsl.runtime.context import Ctx, Val


class _DynamicMarker:
    """Marks an argument that may be read from the param_group at every step."""

    def __repr__(self) -> str:
        return "Dynamic"


DYNAMIC = _DynamicMarker()


class _FirstStepMarker:
    """Marks a dynamic argument that the op reads once per parameter, at its first step."""

    def __repr__(self) -> str:
        return "FirstStep"


FIRST_STEP = _FirstStepMarker()


#: names that Python's float() reads as a non-finite number; soapdsl has no such literal
NONFINITE_NAMES = frozenset({"nan", "inf", "infinity"})
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _not_a_number(v: Any) -> PydanticCustomError | None:
    """The error for a value that no number field takes, or None.

    pydantic alone would read the string "0.5", and the symbols ``nan`` and ``inf`` (which
    arrive as strings), as floats, and take a float that overflowed to inf.
    """
    if isinstance(v, bool):
        return PydanticCustomError("number_type", "expected a number, got a boolean")
    if isinstance(v, str):
        if not _IDENT.fullmatch(v):
            return PydanticCustomError("number_type", "expected a number, got a string")
        hint = " (numbers must be finite)" if v.lower() in NONFINITE_NAMES else ""
        return PydanticCustomError("number_type", f"expected a number, got the name '{v}'{hint}")
    if isinstance(v, float) and not math.isfinite(v):
        return PydanticCustomError("finite_number", "must be finite")
    return None


def _number(v: Any) -> Any:
    err = _not_a_number(v)
    if err is not None:
        raise err
    return v


#: The largest float32: a float argument scales float32 tensors (a parameter's state and the
#: kernels' scalars), where a larger value overflows inside torch.
FLOAT32_MAX = 3.4028234663852886e38  # float(torch.finfo(torch.float32).max)


def _float(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max:
        raise PydanticCustomError("finite_number", "is too large for a float")
    v = _number(v)
    if isinstance(v, int | float) and abs(v) > FLOAT32_MAX:
        raise PydanticCustomError(
            "finite_number", f"must be at most {FLOAT32_MAX:.4g} in magnitude, the largest float32"
        )
    return v


#: A float argument that may follow a recipe parameter (read from the param_group per step).
Hyper = Annotated[float, BeforeValidator(_float), DYNAMIC]
#: A float argument that may follow a recipe parameter, but that the op reads from the
#: param_group only at a parameter's first step and then keeps for that parameter (in its
#: host state, so state dicts keep it): SOAP caches its resolved shampoo_beta so. A recipe
#: parameter that only such arguments read is fixed when the optimizer is built; one that
#: another stage follows stays free to change (that stage sees the change, this one does not).
FirstStepHyper = Annotated[float, BeforeValidator(_float), DYNAMIC, FIRST_STEP]
#: A float argument fixed at compile time.
Float = Annotated[float, BeforeValidator(_float)]
#: An int argument fixed at compile time.
Int = Annotated[int, BeforeValidator(_number)]


def _admits_text(annotation: Any) -> bool:
    """True when a field of this type may take a string (a name, a choice, a pattern)."""
    if annotation in (str, Any):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, str) for a in get_args(annotation))
    if origin is Annotated:
        return _admits_text(get_args(annotation)[0])
    return any(_admits_text(a) for a in get_args(annotation) if a is not Ellipsis)


def _check_numbers(value: Any, item: int | None = None) -> None:
    """Reject, anywhere in a (nested) tuple, what :func:`_not_a_number` rejects.

    ``item`` is the index in the outermost tuple, kept in the error's context so that the
    checker can point at that item.
    """
    if isinstance(value, tuple | list):
        for i, v in enumerate(value):
            _check_numbers(v, i if item is None else item)
        return
    err = _not_a_number(value)
    if err is not None:
        if item is not None:
            raise PydanticCustomError(err.type, err.message(), {"item": item})
        raise err


class OpArgs(BaseModel):
    """Base of every op's argument model.

    A field's public name (what recipes write) is its alias if it has one (``from``, a
    Python keyword), else its name.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=False, populate_by_name=True, arbitrary_types_allowed=True
    )

    @field_validator("*", mode="before")
    @classmethod
    def _strict_types(cls, value: Any, info: ValidationInfo) -> Any:
        """A boolean argument takes true or false only (pydantic alone would take 1, 0, "yes");
        a field that takes no text takes no string and no non-finite number, at any depth (so a
        tuple of plain ints or floats is as strict as :data:`Float`)."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if field.annotation in (bool, "bool"):
            if not isinstance(value, bool):
                raise PydanticCustomError("bool_type", "expected true or false")
            return value
        if not _admits_text(field.annotation):
            _check_numbers(value)
        return value


def public_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Public argument name -> pydantic FieldInfo, in positional order."""
    return {(f.alias or n): f for n, f in model.model_fields.items()}


@dataclass(frozen=True)
class StateSpec:
    """One state tensor per parameter.

    ``shape`` is per parameter (no batch dim), in the coordinates the op sees (inside a
    scope that merges dims, the merged shape). State is kept in at least fp32 (fp64 for fp64
    parameters). ``init`` is "zeros" or "eye" (identity over the last two dims).

    ``basis`` says what happens to the tensor when an enclosing scope refreshes its basis:
    "rotate" re-expresses it exactly in the new basis (first moments), "permute" only permutes
    it by the new eigenvalue order (SOAP's second moment), "none" leaves it alone.
    """

    shape: tuple[int, ...]
    init: Literal["zeros", "eye"] = "zeros"
    basis: Literal["rotate", "permute", "none"] = "rotate"
    #: one tensor per share group (see Op.share_key), kept in the group leader's state only
    shared: bool = False
    #: the parameter dim each dim of the tensor runs along (None: the same dims, in order);
    #: e.g. Adafactor's row moment of an [m, n] parameter has axes (0,)
    axes: tuple[int, ...] | None = None


class Op:
    """Base class of a primitive operator. Subclasses set the class attributes below."""

    #: name used in recipes
    name: ClassVar[str]
    #: argument model (field order = positional order)
    Args: ClassVar[type[OpArgs]] = OpArgs
    #: "elementwise" ops work on any shape; "matrix" ops need ndim >= 2 and are batched over
    #: same-shape parameters; "batched" ops take any shape and are batched the same way;
    #: "scope" ops take a block; "apply" writes the parameter; "param" acts on the parameter.
    kind: ClassVar[Literal["elementwise", "matrix", "batched", "scope", "apply", "param"]] = "elementwise"
    #: True when op(c * x) == c * op(x) for a scalar c > 0 held on the host, so a pending
    #: scale (from bias_correct, scale, ...) can pass through without touching memory.
    linear: ClassVar[bool] = False
    #: True when op(c * x) == c * op(x) only for c > 0 (a sign-dependent op): a positive pending
    #: scale passes through, a negative one is applied first.
    homogeneous: ClassVar[bool] = False
    #: True when the op never reads the value's tensors (it only scales, or acts on the
    #: parameter): a pending division (Val.denom) passes through it.
    passes_quotient: ClassVar[bool] = False
    #: True when op(c * x) == op(x) for a scalar c > 0: a pending scale is dropped unapplied.
    scale_invariant: ClassVar[bool] = False

    def __init__(self, args: OpArgs, dynamic: Mapping[str, Value] | None = None, path: str = "") -> None:
        self.args = args
        self.dynamic = dict(dynamic or {})
        self.path = path  # position in the pipeline, e.g. "2" or "1.0"; namespaces state keys

    # -- compile time ---------------------------------------------------------------------

    def check_placement(self) -> str | None:
        """Return why this op cannot stand where it is (``self.depth``: 0 at top level), or None."""
        return None

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Return why this op cannot handle a parameter of ``shape``, or None."""
        if self.kind == "matrix" and len(shape) < 2:
            return f"'{self.name}' needs a matrix (ndim >= 2), got shape {list(shape)}"
        return None

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        """Per-parameter state this op allocates for a parameter of ``shape``."""
        return {}

    def notes(self, shape: tuple[int, ...]) -> list[str]:
        """What this op does for a parameter of ``shape`` that its arguments alone do not say
        (which form of an iteration runs); ``soapdsl compile`` lists them per parameter."""
        return []

    def host_state(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Per-parameter host-side values (Python scalars) and their initial values.

        They live in ``self.state[param]`` beside the tensors (so state dicts keep them) and
        parameters with different host values never share a batch.
        """
        return {}

    def host_problem(self, name: str, value: Any, initial: Any) -> str | None:
        """Why ``value`` cannot be host value ``name`` (loaded from a state dict), or None.
        ``initial`` is its value in a fresh state: a bool must stay a bool; an op with other
        host values says what they may hold."""
        if isinstance(initial, bool) and not isinstance(value, bool):
            return f"is a {type(value).__name__}, expected a bool"
        return None

    def inner_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of a parameter as the stages inside this scope see it."""
        return shape

    def reshape_note(self, shape: tuple[int, ...]) -> str:
        """Why the stages inside this scope see ``shape`` as :meth:`inner_shape` does: a shape
        error inside names a shape the parameter does not have, and this says where it came from."""
        return f"inside '{self.name}' a parameter of shape {list(shape)} is seen as {list(self.inner_shape(shape))}"

    def children(self) -> list[list[Op]]:
        """Op lists nested in this op: a scope's body, pipeline-valued arguments."""
        out = []
        body = getattr(self, "body", None)
        if body:
            out.append(body)
        out.extend(getattr(self, "branches", {}).values())
        return out

    def before(self, ctx: Ctx) -> bool:
        """Called for every op before the pipeline runs; False skips this step's update."""
        return True

    def after(self, ctx: Ctx) -> None:
        """Called for every op after the pipeline ran (preconditioner maintenance)."""

    def reduces_over_route(self) -> bool:
        """True when the op combines values of all the route's parameters (a global norm)."""
        return False

    def pointwise(self) -> bool:
        """True when each element of the op's output, state and parameter depends only on the
        same element of its input, gradient, state and parameter (its state is shaped like the
        parameter): the op may run on any block of a parameter's rows, as it does on an FSDP2
        shard (runtime/fsdp.py). False unless an op says so."""
        return False

    def share_key(self, name: str) -> str:
        """Parameters with equal keys share this op's ``shared`` state (default: none share)."""
        return name

    def share_problem(self, names: Sequence[str]) -> str | None:
        """Why this op's sharing, as its arguments ask for it, shares nothing between the
        parameters ``names`` of its route (a pattern that matches none of them), or None."""
        return None

    # -- run time -------------------------------------------------------------------------

    def hp(self, name: str, group: Mapping[str, Any]) -> Any:
        """Value of argument ``name``: from the param_group if it follows a recipe parameter."""
        expr = self.dynamic.get(name)
        if expr is None:
            return getattr(self.args, name)
        value = expr.evaluate(group)
        # a float, as the argument validated: a Python int past int64 (eps=10**30) overflows in
        # torch. A tensor a group holds stays one (float() of a GPU tensor would sync every step)
        return float(value) if isinstance(value, int) else value

    def apply(self, ctx: Ctx, x: Val) -> Val:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_key(self, name: str) -> str:
        return f"{self.path}.{self.name}.{name}"

    def __repr__(self) -> str:
        return f"<op {self.name} at {self.path}>"

    # -- introspection --------------------------------------------------------------------

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.split("\n\n")[0].replace("\n", " ").strip()

    @classmethod
    def dynamic_fields(cls) -> frozenset[str]:
        return frozenset(n for n, f in public_fields(cls.Args).items() if any(m is DYNAMIC for m in f.metadata))

    @classmethod
    def first_step_fields(cls) -> frozenset[str]:
        """Dynamic fields read once per parameter, at its first step (typed ``FirstStepHyper``)."""
        return frozenset(n for n, f in public_fields(cls.Args).items() if any(m is FIRST_STEP for m in f.metadata))


def walk_ops(ops: Iterable[Op]) -> Iterator[Op]:
    """Every op, depth first: scope bodies and pipeline-valued arguments included."""
    for op in ops:
        yield op
        for child in op.children():
            yield from walk_ops(child)


_REGISTRY: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    """Class decorator adding an op to the registry."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise RuntimeError(f"operator {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def _load() -> None:
    import soapdsl.ops  # noqa: F401  (imports every op module, which registers it)


def get(name: str) -> type[Op] | None:
    _load()
    return _REGISTRY.get(name)


def all_ops() -> dict[str, type[Op]]:
    _load()
    return dict(sorted(_REGISTRY.items()))


OpFactory = Callable[..., Op]
