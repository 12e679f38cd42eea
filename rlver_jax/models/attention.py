"""Grouped-query attention over the KV cache layouts, as two batched GEMMs.

    out = attention(q, k, v, mask, config)          # q [B,T,H,Dh], k [B,K,Dh,S], v [B,K,S,Dh]

softmax(q k^T / sqrt(Dh), masked) v for every query head, its kv head shared by G = H / K query
heads. Long query blocks run in `config.attention_block` pieces under `jax.checkpoint`
(memory). A causal attention over the queries' own keys runs as `config.attention` names:
"xla" (this module), "xla_causal" (this module, in `config.causal_block`-query pieces that skip
the masked keys above the diagonal: less work), or a kernel that `rlver_jax.kernels`
registers here (`register_causal`); which one a program gets is decided in one place,
`kernels.select`. `transformer.attend` calls it; the decode step's one-query form is
`decode_step.one_query_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlver_jax.models.config import ModelConfig

__all__ = ["MASK_VALUE", "XLA_IMPLEMENTATIONS", "attention", "query_block", "register_causal"]

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

XLA_IMPLEMENTATIONS = ("xla", "xla_causal")  # the implementations written in this module

# name -> fn(q, k, v, mask, config): causal attention of q over its own keys, as `attention`.
CausalAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, ModelConfig], jax.Array]
_KERNELS: dict[str, CausalAttention] = {}


def register_causal(name: str, fn: CausalAttention) -> None:
    """Make `fn` the causal attention of ``config.attention == name`` (a kernel backend calls
    this when `rlver_jax.kernels` imports it; the model itself imports no kernel)."""
    if name in XLA_IMPLEMENTATIONS or name == "auto":
        raise ValueError(f"attention implementation name {name!r} is reserved")
    _KERNELS[name] = fn


def query_block(config: ModelConfig, T: int) -> int:
    """Queries of a T-query block whose scores `attention` computes at once: T, or
    ``config.attention_block`` when T is longer (0: never blocked)."""
    block = config.attention_block
    return T if not block or block >= T else block


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: ModelConfig,
    causal: bool = False,
) -> jax.Array:  # fmt: skip
    """Grouped-query attention of q [B,T,H,Dh] over k [B,K,Dh,S], v [B,K,S,Dh] (the cache
    layouts) under mask [B,T,S] -> [B,T,H,Dh], in blocks of ``Tq = config.attention_block``
    queries when T is longer: ``out[:, i:i+Tq] = attn(q[:, i:i+Tq], k, v, mask[:, i:i+Tq])``,
    exact because each query's softmax runs over its own keys only. Each block is a
    `jax.checkpoint`: the backward pass recomputes a block's scores instead of keeping every
    block's, so scores take ``B H Tq S`` at a time instead of ``B H T S`` (309 GB -> a few GB
    per device for a 7B prefill of 8192 tokens). The last block is padded with fully masked
    queries, whose outputs are dropped.

    `causal`: the caller's promise that the keys are the queries' own T positions under a mask
    that is causal (attention within a block of tokens: a prompt's prefill, training). Such a
    call runs as ``config.attention`` says: "xla" as above; "xla_causal": an unblocked T in
    blocks of ``Tc = config.causal_block`` queries over keys ``[0, i + Tc)`` only, skipping the
    key blocks above the diagonal, all masked (T = 256, Tc = 64: 37.5% of the scores); another
    name: the kernel registered under it ("auto", unresolved by `kernels.select`, is "xla").
    Other calls (a decode step over a cache) always run
    as "xla". Queries with no visible key (padding) get an output used by nobody: an average of
    keys, or zeros."""
    T = q.shape[1]
    impl = "xla" if config.attention == "auto" else config.attention  # unresolved: the reference
    if impl not in XLA_IMPLEMENTATIONS and impl not in _KERNELS:
        raise ValueError(
            f"attention implementation {impl!r} is not registered: kernel backends register "
            "theirs when rlver_jax.kernels.select is imported"
        )
    if causal and impl in _KERNELS:
        return _KERNELS[impl](q, k, v, mask, config)
    block = query_block(config, T)
    Tc = config.causal_block if impl == "xla_causal" else 0
    if block == T and causal and 0 < Tc < T:
        parts = [
            _block(q[:, e - Tc : e], k[..., :e], v[:, :, :e], mask[:, e - Tc : e, :e], config)
            for e in range(Tc, T + Tc, Tc)  # slicing clips the last block to T
        ]
        return jnp.concatenate(parts, axis=1)
    if block == T:
        return _block(q, k, v, mask, config)
    n = -(-T // block)
    pad = n * block - T
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))

    def one(qm: tuple[jax.Array, jax.Array]) -> jax.Array:
        return _block(qm[0], k, v, qm[1], config)

    split = lambda x: x.reshape(x.shape[0], n, block, *x.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(one), (split(q), split(mask)))  # [n, B, Tq, H, Dh]
    out = out.swapaxes(0, 1).reshape(q.shape)
    return out[:, :T] if pad else out


def _block(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: ModelConfig
) -> jax.Array:
    """`attention` of one block of queries, all at once.

    Both products are written as plain [M, K] @ [K, N] GEMMs batched over (B, K): queries of a
    kv head's group as the rows, scores with the key axis minor (the softmax axis). The softmax
    is normalised after the value product, ``out = (e @ v) / sum(e)`` with ``e = exp(s -
    max s)``: the division runs over [.., Dh] outputs instead of [.., S] weights, one pass over
    the scores fewer."""
    B, T, H, Dh = q.shape
    K, G = config.num_kv_heads, config.num_groups
    q = q.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(
        q, k, (((3,), (2,)), batch), preferred_element_type=jnp.float32
    ).reshape(B, K, G, T, -1)
    scores = scores / math.sqrt(Dh)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    # Shift-invariant: the max is a constant to autodiff (as in jax.nn.softmax).
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(e, axis=-1).reshape(B, K, G * T, 1)
    e = e.astype(v.dtype).reshape(B, K, G * T, -1)
    out = jax.lax.dot_general(e, v, (((3,), (2,)), batch), preferred_element_type=jnp.float32)
    out = (out / total).astype(v.dtype)  # [B, K, G*T, Dh]
    return out.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
