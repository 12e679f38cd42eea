"""Logical axis rules: one table that maps every logical axis name to mesh axes.

Weights, optimizer state, KV caches and activations are annotated with logical names
(`("embed", "mlp")`, `("batch", "seq", "act_embed")`, ...). This module turns those names into
`PartitionSpec`s for a given mesh. The model code calls `constrain` on activations; outside an
`axis_rules` context (single device, plain tests) that is a no-op, so the model never needs to know
how many devices exist.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "fsdp", "tensor")

# Weights are stored FSDP-sharded on their `embed` dimension and tensor-parallel on heads / mlp /
# vocab; activations keep `act_embed` unsharded so that matmuls all-gather weights (FSDP) rather
# than activations. Batches are split over both data-parallel axes.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)

# The rollout's weights: tensor-parallel over heads / mlp / vocab as the learner's, but not
# FSDP-sharded on `embed`: replicated over the batch axes, so a decode step gathers no weight
# (an FSDP layout would all-gather every layer's weights for every decoded token).
ROLLOUT_RULES: Rules = tuple((n, None if n == "embed" else a) for n, a in DEFAULT_RULES)


def merged_rules(base: Sequence[tuple[str, MeshAxes]], overrides: Any) -> Rules:
    """`base` with `overrides` (a mapping or pairs of ``name: axes``; axes a mesh axis, a list
    of them, or None: replicated) merged over it; an unknown logical name or mesh axis is a
    ValueError naming it."""
    table = dict(base)
    pairs = overrides.items() if isinstance(overrides, dict) else overrides
    for name, axes in pairs:
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(sorted(table))}")
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        bad = [a for a in names if a not in MESH_AXES]
        if bad:
            raise ValueError(
                f"logical axis {name!r}: unknown mesh axis {bad[0]!r}; mesh axes: "
                f"{', '.join(MESH_AXES)}"
            )
        table[name] = None if not names else (names[0] if len(names) == 1 else names)
    return tuple(table.items())


_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, MeshAxes]] | None] = contextvars.ContextVar(
    "rlver_axis_rules", default=None
)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Iterator[None]:
    """Activate `mesh` and `rules` for `constrain` while tracing code inside the block."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _mesh_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def logical_to_spec(
    names: LogicalAxes,
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: dict[str, MeshAxes] | Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names` (and `shape`, when known).

    A dimension that the mapped mesh axes do not divide evenly is replicated instead of failing:
    for example SmolLM2's 3 kv heads on a 2-way tensor axis. A mesh axis already used by an
    earlier dimension is not reused (a spec may name each mesh axis once).
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        if axes is not None:
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
            axes_t = tuple(a for a in axes_t if a in mesh.shape and a not in used)
            if shape is not None and axes_t and shape[dim] % _mesh_size(mesh, axes_t):
                axes_t = ()
            used.update(axes_t)
            axes = None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t)
        out.append(axes)
    return PartitionSpec(*out)


def named_sharding(
    names: LogicalAxes,
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def tree_shardings(
    logical_tree: Any,
    shapes_tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> Any:
    """NamedShardings for a pytree, given a matching pytree of logical-axis tuples.

    `shapes_tree` holds arrays or `jax.ShapeDtypeStruct`s (anything with `.shape`).
    """
    return jax.tree.map(
        lambda names, leaf: named_sharding(names, leaf.shape, mesh, rules),
        logical_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x),
    )


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
    """Sharding constraint for an activation; a no-op outside an `axis_rules` block."""
    state = _ACTIVE.get()
    if state is None:
        return x
    mesh, rules = state
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
