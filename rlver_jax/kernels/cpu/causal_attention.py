"""A prompt's causal attention over its own keys as a compiled CPU kernel:
`cpu_causal_attention.cc`, an XLA FFI call (built by `cpu_kernels`).

    out = causal_attention(q, k, v, mask)       # attention.attention(..., causal=True)

Registered as the attention implementation "cpu_kernel" (`ModelConfig.attention`); the
selection (`kernels.select`) gives it to a float32 prefill on one CPU device (`supports`; XLA
cannot partition a custom call, so a mesh keeps XLA's form; it has no backward pass). The
kernel computes each query's scores over keys up to its own position only, with its softmax
and value product in cache (why and how: the .cc file's header). Float32 only: bfloat16
prefills keep XLA's form, whose value product takes the probabilities in bfloat16.
"""

from __future__ import annotations

import jax

from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.models.attention import register_causal
from rlver_jax.models.config import ModelConfig

_TILE = 16  # the kernel's register tiles: Dh must be a multiple (cpu_causal_attention.cc kCols)


def supports(config: ModelConfig, platform: str, devices: int) -> str | None:
    """None when the kernel runs a causal attention of `config` here, else why not."""
    if platform != "cpu" or devices != 1:
        return f"it runs on one CPU device (here: {devices} {platform} device(s))"
    if config.dtype != "float32":
        return f"it computes in float32 (model.dtype is {config.dtype})"
    if config.head_dim % _TILE:
        return f"head_dim {config.head_dim} is not a multiple of {_TILE}"
    return None


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention.attention(q, k, v, mask, config, causal=True)` over the block's own keys:
    q [B,T,H,Dh], k [B,K,Dh,T], v [B,K,T,Dh] float32, mask [B,T,T] (false above the
    diagonal) -> [B,T,H,Dh]. Equal to XLA's form to float32 rounding for every query that sees
    a key; a query that sees none (left padding) gets zeros, where XLA's form averages."""
    cpu_kernels.require()
    call = jax.ffi.ffi_call("rlver_causal_attention_f32", jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k, v, mask)


def _registered(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: ModelConfig
) -> jax.Array:
    del config
    return causal_attention(q, k, v, mask)


register_causal("cpu_kernel", _registered)
