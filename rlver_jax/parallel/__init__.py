"""Sharding: logical axis rules, the device mesh, multi-host start-up, compile counting.

Nothing here knows the model: the shardings of its params and cache are in `models.sharding`.
"""

from rlver_jax.parallel.compile_count import CompileCounter, compile_count, count_compiles
from rlver_jax.parallel.distributed import DistributedConfigError, initialize
from rlver_jax.parallel.mesh import (
    MESH_AXES,
    MeshConfig,
    MeshConfigError,
    batch_axis_size,
    batch_sharding,
    host_to_global,
    make_mesh,
    replicated,
    shard_params,
    to_host,
)
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
    "compile_count",
    "constrain",
    "count_compiles",
    "host_to_global",
    "initialize",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "replicated",
    "shard_params",
    "to_host",
    "tree_shardings",
]
