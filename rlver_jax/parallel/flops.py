"""Matmul FLOPs of a traced program, counted on its jaxpr: XLA's `cost_analysis()` counts a
`while` body once, so a layer scan's FLOPs would be 1 / L of the truth.

    flops(dot_general) = 2 x prod(output shape) x prod(contracted dims)

summed over the program, a `scan` body times its length, the larger branch of a `cond`, and
every nested jaxpr (jit, remat, custom derivatives) once. A `while` loop's body (the decode
loop, which stops at the last token) is reported apart, per iteration. Global FLOPs (all
devices together); matmuls are nearly all of a transformer's, so the rest are left out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.extend import core as ext_core


@dataclasses.dataclass(frozen=True)
class Flops:
    """`per_call` outside loops of unknown length, `per_iteration` inside them."""

    per_call: float
    per_iteration: float = 0.0


def _subjaxprs(value: Any) -> list[Any]:
    if isinstance(value, ext_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, ext_core.Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [j for v in value for j in _subjaxprs(v)]
    return []


def _count(jaxpr: Any) -> Flops:
    call = it = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            call += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "scan":
            body = _count(params["jaxpr"].jaxpr)
            call += body.per_call * params["length"]
            it += body.per_iteration * params["length"]
        elif name == "while":
            body = _count(params["body_jaxpr"].jaxpr)
            it += body.per_call + body.per_iteration
        elif name == "cond":
            branches = [_count(b.jaxpr) for b in params["branches"]]
            call += max(b.per_call for b in branches)
            it += max(b.per_iteration for b in branches)
        else:
            for sub in (j for v in params.values() for j in _subjaxprs(v)):
                inner = _count(sub)
                call, it = call + inner.per_call, it + inner.per_iteration
    return Flops(call, it)


def traced_flops(traced: Any) -> Flops:
    """The FLOPs of a `jax.stages.Traced` program (`jax.jit(f).trace(*args)`)."""
    return _count(traced.jaxpr.jaxpr)
