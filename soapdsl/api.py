"""The Python API: parse, compile, build, from_config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from soapdsl import library
from soapdsl.compiler import Plan, compile_plan, mark_routes, state_dtype, walk_ops, walk_shaped
from soapdsl.errors import SoapArgumentError
from soapdsl.runtime.context import Bucket, Ctx, Val
from soapdsl.runtime.optimizer import SoapOptimizer, run_ops
from soapdsl.syntax import ast as A
from soapdsl.syntax.parser import parse as _parse


def parse(text: str, file: str = "<inline>") -> A.Module:
    """Parse recipe text into its AST (no name resolution)."""
    return _parse(text, file)


def compile(
    recipe: str | Path,
    params: Any,
    *,
    torch_compile: bool = False,
    cuda_graphs: bool = False,
    stochastic_round: bool = False,
    **args: Any,
) -> Plan:
    """Compile a recipe for ``params`` into a :class:`~soapdsl.compiler.Plan`.

    ``recipe`` is a shipped name (``"soap"``), a path to a ``.soap`` file, or inline text
    (``"momentum(0.9) |> sign |> lr"``). ``params`` is an ``nn.Module``, an iterable of
    ``(name, parameter)``, or an iterable of parameters. ``args`` set the recipe's header
    parameters; for an inline pipeline they declare them. ``torch_compile`` marks every route
    for ``torch.compile``, ``cuda_graphs`` every route for CUDA graphs, ``stochastic_round``
    every route for stochastic rounding of bfloat16 and float16 parameters.
    """
    flags = (("torch_compile", torch_compile), ("cuda_graphs", cuda_graphs), ("stochastic_round", stochastic_round))
    for name, flag in flags:
        if not isinstance(flag, bool):
            # a truthy string such as "no" must not switch it on
            raise SoapArgumentError(f"{name} must be True or False, got {flag!r}")
    ir_recipe = library.resolve(recipe, args)
    plan = compile_plan(ir_recipe, params, args)
    mark_routes(plan, torch_compile=torch_compile, cuda_graphs=cuda_graphs, stochastic_round=stochastic_round)
    return plan


def build(
    recipe: str | Path,
    params: Any,
    *,
    torch_compile: bool = False,
    cuda_graphs: bool = False,
    stochastic_round: bool = False,
    distributed: Any = False,
    **args: Any,
) -> SoapOptimizer:
    """Build the optimizer: ``soapdsl.build("adamw", model, lr=3e-4)``.

    ``torch_compile=True`` runs every route's pipeline through ``torch.compile`` (the route
    option ``[compile=true]`` does it for one route); results match the eager path up to rounding.

    ``cuda_graphs=True`` replays each route's Newton-Schulz iterations on CUDA from CUDA graphs
    (the route option ``[cuda_graph=true]`` does it for one route): one launch per iteration
    instead of three or four per step of it, with the eager path's numbers bit for bit, for
    one buffer as large as the route's largest batch of matrices. Off CUDA it changes nothing.

    ``stochastic_round=True`` rounds every write into a bfloat16 or float16 parameter
    stochastically instead of to nearest (the route option ``[stochastic_round=true]`` does it
    for one route), so that steps smaller than half the gap between neighbouring values still
    move the parameter on average. The random bits are reproducible: they depend on the
    parameter's name, its step count and its device type, not on a global generator. float32
    and float64 parameters are written as usual.

    ``distributed=True`` (or a process group) is for data-parallel training (DDP), where every
    rank steps the same parameters with the same gradients: each eigenbasis refresh, inverse
    root and Newton-Schulz iteration then runs on one rank and its result is shared, instead of
    running on every rank. Every rank must build it, as every rank builds DDP; the state stays
    whole on every rank, and the numbers equal one process's.
    """
    plan = compile(
        recipe, params, torch_compile=torch_compile, cuda_graphs=cuda_graphs, stochastic_round=stochastic_round, **args
    )
    return SoapOptimizer(plan, distributed=distributed)


def apply(pipeline: str, tensor: torch.Tensor, **args: Any) -> torch.Tensor:
    """Apply a stateless pipeline to a tensor: ``soapdsl.apply("newton_schulz(10, cleanup=5)", G)``.

    For experiments on the operators themselves. The pipeline sees ``tensor`` as both the
    update and the raw gradient of a single parameter of its shape, at step 1. Stages that keep
    state (momentum, rotate, ...) or write a parameter (lr, decay) are refused.
    """
    if not isinstance(tensor, torch.Tensor):
        swapped = isinstance(pipeline, torch.Tensor)  # apply(G, "newton_schulz(5)")
        raise SoapArgumentError(
            f"apply() takes a tensor, got {type(tensor).__name__}"
            + ("; the pipeline comes first: soapdsl.apply(pipeline, tensor)" if swapped else "")
        )
    recipe = library.resolve(pipeline, args)
    if len(recipe.routes) != 1:
        raise SoapArgumentError("apply() takes a single pipeline, not a recipe with several routes")
    plan = compile_plan(recipe, [("x", torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))], args)
    (rp,) = plan.routes
    # the `lr` the checker appends to every route is no part of what was written; a written one
    # would write the parameter, and is refused below like `decay`
    ops = list(rp.ops[:-1] if recipe.routes[0].pipeline.stages[-1].implicit else rp.ops)
    for op, shape in walk_shaped(ops, tuple(tensor.shape)):
        if op.state(shape) or op.host_state(shape) or op.kind in ("apply", "param"):
            raise SoapArgumentError(
                f"apply() takes a stateless pipeline; '{op.name}' keeps state or writes the parameter",
                getattr(op, "loc", None),
            )
    x = tensor.detach().to(state_dtype(tensor.dtype))
    batched = rp.needs_batch_dim
    slab = x.unsqueeze(0) if batched else x
    bucket = Bucket([tensor], tuple(tensor.shape), batched)
    states: dict[str, dict[str, list[torch.Tensor]]] = {op.path: {} for op in walk_ops(ops)}
    ctx = Ctx(rp.hyper, 1, [bucket], [slab], states, run_ops)
    with torch.no_grad():
        out = ctx.materialize(run_ops(ctx, ops, Val([slab], owned=False))).ts[0]
    return (out[0] if batched else out).to(tensor.dtype)


def from_config(model: Any, cfg: Any) -> SoapOptimizer:
    """Build an optimizer from a config: a dict, YAML text, or a path to a YAML file.

    See :mod:`soapdsl.config` for the schema.
    """
    from soapdsl.config import build_from_config

    return build_from_config(model, cfg)
