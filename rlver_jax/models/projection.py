"""Projections of one input by several weights: ``project(x, (w1, w2, ...))``.

    ``project(x, ws) = tuple(einsum("btd,d...->bt...", x, w) for w in ws)``

The products are the model's math; how their backward pass is laid out is the platform's
business, so a backend may register its own form per platform (`register_platform`; the CPU's,
which transposes ``x`` once for the whole group, is `kernels.cpu.projection`). The model
itself imports no backend.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Projection = Callable[[Array, tuple[Array, ...], "jnp.dtype | None"], tuple[Array, ...]]

__all__ = ["project", "register_platform"]

_BY_PLATFORM: dict[str, Projection] = {}


def register_platform(platform: str, fn: Projection) -> None:
    """Use `fn` for `project` on `platform` (`jax.default_backend()`'s name)."""
    _BY_PLATFORM[platform] = fn


def project(
    x: Array, weights: tuple[Array, ...], out_dtype: jnp.dtype | None = None
) -> tuple[Array, ...]:
    """``x`` ``[..., D]`` times each ``w`` ``[D, ...]`` -> ``[..., *w.shape[1:]]``, in
    ``out_dtype`` (default: the operands')."""
    fn = _BY_PLATFORM.get(jax.default_backend())
    if fn is not None:
        return fn(x, tuple(weights), out_dtype)
    return tuple(jnp.tensordot(x, w, axes=1, preferred_element_type=out_dtype) for w in weights)
