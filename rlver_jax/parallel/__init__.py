"""Sharding: logical axis rules, the device mesh, multi-host start-up, compile counting.

`mesh` names are loaded lazily (PEP 562): `models.transformer` imports `parallel.rules`, and
`parallel.mesh` imports `models.transformer`, so importing `mesh` eagerly here would be circular.
"""

from typing import Any

from rlver_jax.parallel.compile_count import CompileCounter, compile_count, count_compiles
from rlver_jax.parallel.distributed import DistributedConfigError, initialize
from rlver_jax.parallel.rules import (
    DEFAULT_RULES,
    axis_rules,
    constrain,
    logical_to_spec,
    named_sharding,
    tree_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "CompileCounter",
    "DistributedConfigError",
    "MeshConfig",
    "MeshConfigError",
    "axis_rules",
    "batch_axis_size",
    "batch_sharding",
    "cache_shardings",
    "compile_count",
    "constrain",
    "count_compiles",
    "host_to_global",
    "initialize",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "param_shardings",
    "replicated",
    "shard_params",
    "to_host",
    "tree_shardings",
]

_MESH_NAMES = {
    "MESH_AXES",
    "MeshConfig",
    "MeshConfigError",
    "batch_axis_size",
    "batch_sharding",
    "cache_shardings",
    "host_to_global",
    "make_mesh",
    "param_shardings",
    "replicated",
    "shard_params",
    "to_host",
}


def __getattr__(name: str) -> Any:
    if name in _MESH_NAMES:
        from rlver_jax.parallel import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module 'rlver_jax.parallel' has no attribute {name!r}")
