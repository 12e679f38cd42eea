"""The KV cache of the decoder (`transformer.forward`, `decode_step.decode_step`): its layouts,
logical axes, and the empty cache."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlver_jax.models.config import ModelConfig
from rlver_jax.parallel.rules import LogicalAxes


@struct.dataclass
class KVCache:
    """Keys and values of every layer, written left to right at slot `end`.

    k:         [layers, batch, kv_heads, head_dim, max_len] (stacked: what `lax.scan` carries),
               or a tuple of one [batch, kv_heads, head_dim, max_len] buffer per layer
               (`init_cache(per_layer=True)`, read by `decode_step.decode_step`: its unrolled
               layer loop then writes each layer's buffer in place; slicing a stacked cache
               makes XLA:CPU copy the slice). `forward` takes the stacked form.
    v:         [.., kv_heads, max_len, head_dim]. With these layouts both attention products
               are plain [M, K] @ [K, N] GEMMs over the stored buffers (q @ k, probs @ v; see
               `attention._block`), with no transpose of a cache buffer before either: faster
               than k [.., max_len, head_dim] / v [.., head_dim, max_len] in both the prefill
               and the decode step.
    key_mask:  [batch, max_len] True where the slot holds a real (non-pad) token
    end:       [] int32, the next slot to write (the same for every row)
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    key_mask: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)


_K_AXES: LogicalAxes = ("cache_batch", "act_kv_heads", "head_dim", "cache_seq")
_V_AXES: LogicalAxes = ("cache_batch", "act_kv_heads", "cache_seq", "head_dim")
CACHE_LOGICAL_AXES = KVCache(
    k=("layers", *_K_AXES),  # type: ignore[arg-type]
    v=("layers", *_V_AXES),  # type: ignore[arg-type]
    key_mask=("cache_batch", "cache_seq"),  # type: ignore[arg-type]
    end=(),  # type: ignore[arg-type]
)


def cache_logical_axes(cache: KVCache) -> KVCache:
    """Logical axis names of `cache`'s leaves, stacked or per layer."""
    if not cache.per_layer:
        return CACHE_LOGICAL_AXES
    n = len(cache.k)  # type: ignore[arg-type]
    return CACHE_LOGICAL_AXES.replace(k=(_K_AXES,) * n, v=(_V_AXES,) * n)


def init_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: Any = None, *, per_layer: bool = False
) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (see `KVCache`)."""
    shape = (batch, config.num_kv_heads, config.head_dim, max_len)
    v_shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    if per_layer:
        k: Any = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        v: Any = tuple(jnp.zeros(v_shape, dtype) for _ in range(config.num_layers))
    else:
        k = jnp.zeros((config.num_layers, *shape), dtype)
        v = jnp.zeros((config.num_layers, *v_shape), dtype)
    return KVCache(
        k=k, v=v, key_mask=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32)
    )


def as_bits(cache: KVCache) -> KVCache:
    """A per-layer cache with its bf16 buffers held as their uint16 bits (others unchanged).

    Why: XLA:CPU's float normalization widens a bf16 dynamic-update-slice to float32 (convert
    the whole buffer, update, convert back), so each decode step would copy every layer's
    cache instead of writing one slot in place (a large share of a bf16 step); an integer
    update stays in place. `write_slot` writes bits into such a cache, `cache_values` reads it.
    """
    if not cache.per_layer or jnp.dtype(cache.k[0].dtype) != jnp.bfloat16:
        return cache
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint16)
    return cache.replace(k=tuple(map(bits, cache.k)), v=tuple(map(bits, cache.v)))


def cache_values(buffer: jax.Array) -> jax.Array:
    """A cache buffer's values: bf16 for one held as bits (`as_bits`), else itself."""
    if buffer.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(buffer, jnp.bfloat16)
    return buffer


def as_held(values: jax.Array, dtype: Any) -> jax.Array:
    """`values` in a cache buffer's dtype `dtype`: bf16 bits for one held as bits (`as_bits`),
    the inverse of `cache_values`."""
    if jnp.dtype(dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
    return values.astype(dtype)


def write_slot(cache: jax.Array, block: jax.Array, axis: int, slot: jax.Array) -> jax.Array:
    """`block` (size 1 on `axis`, the cache's size elsewhere) written into `cache` at index
    `slot` of `axis`, in the cache's form (`as_held`): the per-layer decode step's cache write."""
    at = tuple(slot if i == axis else 0 for i in range(cache.ndim))
    return jax.lax.dynamic_update_slice(cache, as_held(block, cache.dtype), at)
