"""Shardings of the model's pytrees (params, KV cache) from their logical axes.

They live with the model, not in `parallel`, so that `parallel` (the axis rules and the mesh)
knows nothing of the model and the import graph has no circle.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.kv_cache import KVCache, cache_logical_axes
from rlver_jax.models.transformer import is_logical_axes, param_logical_axes, param_shapes
from rlver_jax.parallel.mesh import Rules
from rlver_jax.parallel.rules import DEFAULT_RULES, named_sharding, tree_shardings


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """`NamedSharding` of every weight of `config`, in the params pytree structure."""
    return tree_shardings(param_logical_axes(config), param_shapes(config), mesh, rules)


def cache_shardings(cache: KVCache, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> KVCache:
    """Shardings of a `KVCache` (or one of `jax.ShapeDtypeStruct`s), stacked or per layer."""
    return jax.tree.map(
        lambda names, leaf: named_sharding(names, leaf.shape, mesh, rules),
        cache_logical_axes(cache),
        cache,
        is_leaf=is_logical_axes,
    )
