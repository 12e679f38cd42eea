"""A prompt's causal attention over its own keys as a compiled CPU kernel:
`cpu_causal_attention.cc`, an XLA FFI call (built by `cpu_kernels`).

    if applies(q, k, config) and cpu_kernels.available():
        out = causal_attention(q, k, v, mask)       # attention.attention(..., causal=True)

`attention.attention` routes a causal call here when `ModelConfig.cpu_attention_kernel` is set
(the sampler sets it for its prefill on one CPU device, `SamplerConfig.cpu_attention_kernel`;
XLA cannot partition a custom call, so a mesh keeps XLA's form). The kernel computes each query's
scores over keys up to its own position only, with its softmax and value product in cache
(why and how: the .cc file's header). Float32 only: bfloat16 prefills keep XLA's form, whose
value product takes the probabilities in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.models.config import ModelConfig

_TILE = 16  # the kernel's register tiles: Dh must be a multiple (cpu_causal_attention.cc kCols)


def applies(q: jax.Array, k: jax.Array, v: jax.Array, config: ModelConfig) -> bool:
    """Whether the kernel takes these operands: float32, a head dim that is a multiple of 16,
    on the CPU."""
    f32 = jnp.dtype(jnp.float32)
    return (
        all(jnp.dtype(x.dtype) == f32 for x in (q, k, v))
        and config.head_dim % _TILE == 0
        and jax.default_backend() == "cpu"
    )


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention.attention(q, k, v, mask, config, causal=True)` over the block's own keys:
    q [B,T,H,Dh], k [B,K,Dh,T], v [B,K,T,Dh] float32, mask [B,T,T] (false above the
    diagonal) -> [B,T,H,Dh]. Equal to XLA's form to float32 rounding for every query that sees
    a key; a query that sees none (left padding) gets zeros, where XLA's form averages."""
    cpu_kernels.require()
    call = jax.ffi.ffi_call("rlver_causal_attention_f32", jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k, v, mask)
