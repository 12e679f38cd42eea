"""The CPU decode step's attention as a compiled kernel: `cpu_attention.cc`, an XLA FFI call.

    if cpu_kernels.available():
        attn = cpu_attention.one_query_attention(q, k, v, mask, config)  # decode_step's form

`decode_step.one_query_attention` in XLA streams the cache several times (scores, softmax
reductions, output) on one core; the kernel reads each (row, kv head) block of the cache once,
only over the row's unmasked span, and splits the pairs over the cores (why and how: the .cc
file's header). The `Sampler` uses it for an unrolled decode on one CPU device
(`sampler.decode: cpu_kernels`); on a mesh the XLA form stays, since XLA cannot
partition a custom call.

The kernel is built by `cpu_kernels` (on first use, with the system's C++ compiler); callers
check `cpu_kernels.available()` and keep the XLA form where it is False.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import grouped_query

_TARGETS = {  # k/v dtype -> FFI target name (cpu_kernels.TARGETS)
    jnp.dtype(jnp.float32): "rlver_one_query_attention_f32",
    jnp.dtype(jnp.bfloat16): "rlver_one_query_attention_bf16",
    jnp.dtype(jnp.uint16): "rlver_one_query_attention_bf16_bits",  # kv_cache.as_bits
}


def one_query_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: ModelConfig
) -> jax.Array:
    """`decode_step.one_query_attention` (same arguments, same result to float32 rounding) as
    the FFI kernel. q [B,1,H,Dh]; k [B,K,Dh,S] and v [B,K,S,Dh] in float32 or bfloat16;
    mask [B,1,S]."""
    B, _, H, Dh = q.shape
    if jnp.dtype(k.dtype) not in _TARGETS or k.dtype != v.dtype:
        raise TypeError(
            f"the CPU attention kernel takes float32 or bfloat16 (bits) caches, not {k.dtype}"
        )
    cpu_kernels.require()
    qg = grouped_query(q, config)
    call = jax.ffi.ffi_call(_TARGETS[jnp.dtype(k.dtype)], jax.ShapeDtypeStruct(qg.shape, qg.dtype))
    return call(qg, k, v, mask[:, 0, :]).astype(q.dtype).reshape(B, 1, H, Dh)
