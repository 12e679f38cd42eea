"""Per-device sizes for the memory plan (`plan`): how many pieces the logical axis rules cut an
array into on a (data, fsdp, tensor) mesh, and the byte counts of pytrees, optimiser states,
KV caches and the sampler's per-layer weights built on it. Every size divides by the real
shard count: logical axes go through `rules.logical_to_spec` on the real shape, on an abstract
mesh, so a dimension the mesh does not divide is replicated exactly as at run time."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh

from rlver_jax.buckets import round_up
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import decode_weight_logical_axes, decode_weights
from rlver_jax.models.kv_cache import CACHE_LOGICAL_AXES
from rlver_jax.models.transformer import is_logical_axes, param_shapes
from rlver_jax.parallel.mesh import MESH_AXES
from rlver_jax.parallel.rules import LogicalAxes, logical_to_spec
from rlver_jax.rl.optim import AdamWConfig


def abstract_mesh(mesh_sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh with the project's axes, for `logical_to_spec`."""
    return AbstractMesh(tuple(mesh_sizes[a] for a in MESH_AXES), MESH_AXES)


def shard_count(names: LogicalAxes, shape: Sequence[int], mesh: AbstractMesh) -> int:
    """How many pieces the rules cut an array into (uneven dimensions stay whole)."""
    spec = logical_to_spec(names, tuple(shape), mesh)
    count = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            count *= mesh.shape[axis]
    return count


def split(n: int, name: str, mesh: AbstractMesh) -> int:
    """Per-device size of a dimension of `n` with logical axis `name`."""
    return n // shard_count((name,), (n,), mesh)


def tree_bytes(axes: Any, shapes: Any, mesh: AbstractMesh, itemsize: int | None = None) -> int:
    """Per-device bytes of a pytree of `ShapeDtypeStruct`s (dtype's or `itemsize` bytes)."""
    total = 0
    leaves = jax.tree.leaves(shapes)
    axes_leaves = jax.tree.leaves(axes, is_leaf=is_logical_axes)
    for names, leaf in zip(axes_leaves, leaves, strict=True):
        size = itemsize or np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * size // shard_count(names, leaf.shape, mesh)
    return total


def opt_state_bytes(opt: AdamWConfig, axes: Any, shapes: Any, mesh: AbstractMesh) -> int:
    """Per-device bytes of `opt.tx().init(params)` as the learner builds it: leaves shaped like a
    parameter are sharded like it (`optim.opt_state_shardings`), the rest replicated. The
    dtypes are optax's own (mu, nu follow the param dtype unless the optimiser says otherwise)."""
    is_struct = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    counts = jax.tree.map(
        lambda names, leaf: shard_count(names, leaf.shape, mesh),
        axes, shapes, is_leaf=lambda x: isinstance(x, tuple),
    )  # fmt: skip
    state = jax.eval_shape(opt.tx().init, shapes)
    nbytes = lambda leaf: math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    per_leaf = optax.tree_utils.tree_map_params(
        opt.tx(), lambda leaf, n: nbytes(leaf) // n, state, counts,
        transform_non_params=nbytes, is_leaf=is_struct,
    )  # fmt: skip
    return int(sum(jax.tree.leaves(per_leaf)))


def kv_cache_bytes(c: ModelConfig, batch: int, length: int, mesh: AbstractMesh) -> int:
    """2 x L x B' x K' x S x Dh x b, sharded by `CACHE_LOGICAL_AXES`."""
    shape = (c.num_layers, batch, c.num_kv_heads, c.head_dim, length)
    names: LogicalAxes = CACHE_LOGICAL_AXES.k  # type: ignore[assignment]
    return 2 * math.prod(shape) * np.dtype(c.dtype).itemsize // shard_count(names, shape, mesh)


def rows_per_device(n: int, mesh: AbstractMesh) -> int:
    """Rows of a batch of n on one device (split over data x fsdp when they divide n)."""
    return split(n, "batch", mesh)


def count(n: float) -> str:
    """7.62B, 135M, 107k."""
    return next(f"{n / s:.3g}{u}" for u, s in (("B", 1e9), ("M", 1e6), ("k", 1e3), ("", 1))
                if abs(n) >= s or s == 1)  # fmt: skip


def dp_round(n: int, mesh: AbstractMesh) -> int:
    """n rounded up to a multiple of the batch axes (the samplers pad their batch so)."""
    return round_up(n, mesh.shape["data"] * mesh.shape["fsdp"])


def decode_weight_bytes(c: ModelConfig, mesh: AbstractMesh) -> int:
    """Bytes per device of `decode_step.decode_weights` beyond the params: everything but the
    embedding, which it shares (transposed per-layer copies, and lm_head^T when untied)."""
    shapes = jax.eval_shape(functools.partial(decode_weights, config=c), param_shapes(c))
    axes = decode_weight_logical_axes(c)
    del shapes["embed"], axes["embed"]
    return tree_bytes(axes, shapes, mesh)


def fmt_bytes(n: float) -> str:
    """3 significant digits in B / kB / MB / GB (decimal)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
