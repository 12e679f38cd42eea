"""The model's projections on the CPU: the same products, with a CPU-friendly backward pass.

``project(x, (w1, w2, ...))`` is ``tuple(einsum("btd,d...->bt...", x, w) for w in ws)``. What
differs is the backward on XLA:CPU: each weight gradient ``dW = x^T @ dY`` contracts over tokens,
and the CPU dot wants its left operand token-minor, so XLA transposes one operand per gradient,
and it picks the output gradient ``dY`` (the wider one for q/k/v and gate/up) in a slow strided
loop fused with its producer. Here the backward transposes ``x`` once, materialised behind an
``optimization_barrier``, and reuses it for every weight of the group: one transpose per group
instead of a slow one per weight.

Other backends (TPU, GPU) handle transposed dot operands natively and get the plain products
of `models.projection`; this one is registered there for the "cpu" platform when
`rlver_jax.kernels` is imported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlver_jax.models.projection import register_platform

Array = jax.Array

__all__ = ["project_cpu"]


def _flat(w: Array) -> Array:
    return w.reshape(w.shape[0], -1)


def _dot(a: Array, b: Array, out_dtype: jnp.dtype | None) -> Array:
    return jnp.matmul(a, b, preferred_element_type=out_dtype)


def _forward(
    x: Array, weights: tuple[Array, ...], out_dtype: jnp.dtype | None
) -> tuple[Array, ...]:
    x2 = x.reshape(-1, x.shape[-1])
    return tuple(
        _dot(x2, _flat(w), out_dtype).reshape(*x.shape[:-1], *w.shape[1:]) for w in weights
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project_cpu(
    x: Array, weights: tuple[Array, ...], out_dtype: jnp.dtype | None
) -> tuple[Array, ...]:
    return _forward(x, weights, out_dtype)


def _project_cpu_fwd(
    x: Array, weights: tuple[Array, ...], out_dtype: jnp.dtype | None
) -> tuple[tuple[Array, ...], tuple[Array, tuple[Array, ...]]]:
    return _forward(x, weights, out_dtype), (x, weights)


def _project_cpu_bwd(
    out_dtype: jnp.dtype | None, res: tuple[Array, tuple[Array, ...]], cts: tuple[Array, ...]
) -> tuple[Array, tuple[Array, ...]]:
    """``dW_i = x^T dY_i`` (one shared transpose of ``x``), ``dx = sum_i dY_i W_i^T``, products
    accumulated in fp32 and returned in the operands' dtypes."""
    del out_dtype
    x, weights = res
    x2 = x.reshape(-1, x.shape[-1])
    x2t = jax.lax.optimization_barrier(x2.T)
    flat_cts = [ct.reshape(x2.shape[0], -1).astype(x.dtype) for ct in cts]
    f32 = jnp.float32
    dws = tuple(
        _dot(x2t, ct, f32).reshape(w.shape).astype(w.dtype)
        for w, ct in zip(weights, flat_cts, strict=True)
    )
    dx = sum(_dot(ct, _flat(w).T, f32) for w, ct in zip(weights, flat_cts, strict=True))
    return dx.reshape(x.shape).astype(x.dtype), dws


_project_cpu.defvjp(_project_cpu_fwd, _project_cpu_bwd)


def project_cpu(
    x: Array, weights: tuple[Array, ...], out_dtype: jnp.dtype | None = None
) -> tuple[Array, ...]:
    """`models.projection.project` with the backward pass above."""
    return _project_cpu(x, tuple(weights), out_dtype)


register_platform("cpu", project_cpu)
