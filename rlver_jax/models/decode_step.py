"""One decode step with feature-major activations: the CPU sampler's per-token forward.

At decode time every matmul multiplies a few rows (the batch) by a whole weight matrix. On
XLA:CPU `x [B, D] @ W [D, F]` costs about the same at any small batch and scales with the
weight's size (consistent with its GEMM packing the right-hand operand at every call), far
below the machine's matmul peak. Here the hidden state is carried transposed, `xT [D, B]`, and
each projection is `W^T [F, D] @ xT`, the weight being the streamed left operand: faster at
every batch above 1, and no slower at batch 1 (figures: docs/performance.md).

    weights = decode_weights(params, config)     # once per params: per layer, transposed
    logits, cache = decode_step(weights, tokens, positions, cache, config)  # per-layer cache

Only the projections are feature-major; q/k/v biases, norms, RoPE and attention run on the
row-major [B, 1, heads, head_dim] blocks through `transformer.finish_qkv` / `attend` (with
`one_query_attention`: multiply-adds and a multiply-reduce over the cache), so the step
computes what `transformer.forward` computes for one token per row (tested to 1e-5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.models import transformer as tfm
from rlver_jax.models.attention import MASK_VALUE
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.kv_cache import KVCache, cache_values, write_slot
from rlver_jax.parallel.rules import LogicalAxes, constrain

Params = dict[str, Any]

_COLS = ("act_embed", "batch")  # a feature-major hidden state [D, B]
# Applied on the row-major q/k/v blocks (`tfm.finish_qkv`): kept as the params hold them.
_ROW_MAJOR = ("bq", "bk", "bv", "q_norm", "k_norm")


_MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")


def decode_weights(
    params: Params, config: ModelConfig, pack: Callable[[jax.Array], jax.Array] | None = None
) -> Params:
    """Per-layer copies of the weights in the layouts `decode_step` reads (as many bytes as the
    params' layers): matrices as [out, in], norm scales and biases as [features, 1] columns.
    `pack` (a backend's `StepOps.pack`, e.g. the CPU projection kernel's tiles) stores the
    matrices and the output head (`lm_head`, tied or not) in the form its `StepOps.project`
    takes (one more copy of a tied embedding).

    Projections of the same input are one matrix, so a step runs one GEMM for q, k and v and one
    for gate and up (at batch 1 on a GPU a step is mostly per-kernel launch latency, so fewer
    kernels per layer make it faster). Their rows are grouped so that a split of the output
    axis over a mesh axis stays aligned with what is sharded: `wqkv` [K (G+2) Dh, D] holds, per
    kv head j, the rows of query heads jG..jG+G-1, then key head j, then value head j (sharded
    like kv heads); `w_gate_up` [2F, D] interleaves gate row f and up row f (sharded like the
    MLP axis)."""
    H, K, Dh, D = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size

    G, F = config.num_groups, config.intermediate_size

    def layer(i: int) -> Params:
        p = jax.tree.map(lambda x: x[i], params["layers"])
        qkv = (  # per kv head j: its G query heads, its key head, its value head
            p["wq"].reshape(D, K, G * Dh),
            p["wk"].reshape(D, K, Dh),
            p["wv"].reshape(D, K, Dh),
        )
        out = {
            "attn_norm": p["attn_norm"][:, None],
            "wqkv": jnp.concatenate(qkv, axis=2).reshape(D, K * (G + 2) * Dh).T,
            "wo": p["wo"].reshape(H * Dh, D).T,
            "mlp_norm": p["mlp_norm"][:, None],
            "w_gate_up": jnp.stack([p["w_gate"], p["w_up"]], axis=2).reshape(D, 2 * F).T,
            "w_down": p["w_down"].T,
        }
        out |= {k: p[k] for k in _ROW_MAJOR if k in p}
        return out

    layers = tuple(layer(i) for i in range(config.num_layers))
    weights: Params = {"embed": params["embed"], "final_norm": params["final_norm"][:, None]}
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"].T  # [V, D]
    if pack is not None:
        layers = tuple(p | {k: pack(p[k]) for k in _MATRICES} for p in layers)
        weights["lm_head"] = pack(head)
    elif not config.tie_word_embeddings:
        weights["lm_head"] = head
    weights["layers"] = layers
    return weights


def decode_weight_logical_axes(config: ModelConfig) -> Params:
    """Logical axis names of `decode_weights`' leaves (for their shardings on a mesh)."""
    layer: dict[str, LogicalAxes] = {
        "attn_norm": ("norm", None),
        "wqkv": ("kv_heads", "embed"),
        "wo": ("embed", "heads"),
        "mlp_norm": ("norm", None),
        "w_gate_up": ("mlp", "embed"),
        "w_down": ("embed", "mlp"),
    }
    stacked = tfm.param_logical_axes(config)["layers"]
    layer |= {k: v[1:] for k, v in stacked.items() if k in _ROW_MAJOR}
    axes: Params = {
        "embed": ("vocab", "embed"),
        "final_norm": ("norm", None),
        "layers": (layer,) * config.num_layers,
    }
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("vocab", "embed")
    return axes


def xla_project(w: jax.Array, x: jax.Array) -> jax.Array:
    """`w [F, D] @ x [D, B]` -> [F, B] in x's dtype: the weight streamed as the left operand."""
    return jnp.dot(w.astype(x.dtype), x)


def xla_head(head: jax.Array, h: jax.Array) -> jax.Array:
    """The output head: `head [V, D] @ h [D, B]` -> logits [V, B] accumulated in float32."""
    return jnp.dot(head.astype(h.dtype), h, preferred_element_type=jnp.float32)


def _to_rows(x: jax.Array, heads: int, head_dim: int) -> jax.Array:
    """[heads * head_dim, B] -> [B, 1, heads, head_dim] (a few KB: the transpose is cheap)."""
    return x.T.reshape(x.shape[1], 1, heads, head_dim)


def one_query_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: ModelConfig
) -> jax.Array:
    """`attention.attention` for one query per row, q [B,1,H,Dh] over the cache layouts
    k [B,K,Dh,S], v [B,K,S,Dh] under mask [B,1,S], without batched GEMMs (query heads grouped
    by kv head, h = j G + g):

        scores[b,j,g,s] = sum_d (q[b,j,g,d] / sqrt(Dh)) k[b,j,d,s]   (masked slots: MASK_VALUE)
        out[b,j,g,d]    = sum_s softmax_s(scores)[b,j,g,s] v[b,j,s,d]

    Both sums accumulate in float32. Why: the GEMM form multiplies a G-row (3 for SmolLM2)
    matrix by each row's whole cache block, B*K tiny GEMMs per product per layer. The output is
    one fused multiply-reduce over the cache (XLA:CPU streams it). The scores are written as a
    chain of Dh elementwise multiply-adds (`_sum_over_head_dim`), which XLA:CPU emits as one
    loop vectorised over the slots s; as a multiply-reduce over d (a non-minor axis) it was
    the slower half of the attention. The barrier keeps the chain out of the softmax's
    fusions, which would otherwise recompute it once per reduction. The chain is faster at
    batch 8 and no slower at batches 1 and 32; its price is a longer compile of the decode
    program (the chain is num_layers x Dh ops)."""
    B, _, H, Dh = q.shape
    f32 = jnp.float32
    k, v = cache_values(k), cache_values(v)
    scores = _sum_over_head_dim(grouped_query(q, config), k.astype(f32))  # [B, K, G, S]
    scores = jnp.where(mask[:, None, None, 0, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(jax.lax.optimization_barrier(scores), axis=-1).astype(v.dtype)
    out = jnp.sum(probs[..., None].astype(f32) * v[:, :, None].astype(f32), axis=3)
    return out.astype(q.dtype).reshape(B, 1, H, Dh)


def grouped_query(q: jax.Array, config: ModelConfig) -> jax.Array:
    """q [B,1,H,Dh] -> [B,K,G,Dh] float32 scaled by 1/sqrt(Dh): query heads grouped by their kv
    head (h = j G + g), as both forms of the one-query attention take them."""
    B, _, _, Dh = q.shape
    grouped = q.reshape(B, config.num_kv_heads, config.num_groups, Dh)
    return grouped.astype(jnp.float32) / math.sqrt(Dh)


def _sum_over_head_dim(q: jax.Array, k: jax.Array) -> jax.Array:
    """`sum_d q[b,j,g,d] k[b,j,d,s]` -> [B,K,G,S] as an unrolled chain of multiply-adds over d
    (in order d = 0, 1, ...), for q [B,K,G,Dh] and k [B,K,Dh,S]."""
    total = q[..., 0, None] * k[:, :, None, 0, :]
    for d in range(1, q.shape[-1]):
        total = total + q[..., d, None] * k[:, :, None, d, :]
    return total


@dataclasses.dataclass(frozen=True)
class StepOps:
    """The decode step's replaceable pieces: what a backend may implement its own way
    (`kernels.select.resolve_decode` picks them; the defaults are XLA's forms, `XLA_OPS`).

    attention: ``attention(q, k, v, mask, config)``, as `one_query_attention`.
    project:   ``project(w, x)`` = ``w [F, D] @ x [D, B]`` -> [F, B] in x's dtype.
    head:      ``head(w, h)`` = ``w [V, D] @ h [D, B]`` -> logits [V, B] float32.
    pack:      each matrix ``[F, D]`` -> the form `project` and `head` take (None: as is),
               applied once per params by `decode_weights`.
    """

    attention: Callable[..., jax.Array] = one_query_attention
    project: Callable[[jax.Array, jax.Array], jax.Array] = xla_project
    head: Callable[[jax.Array, jax.Array], jax.Array] = xla_head
    pack: Callable[[jax.Array], jax.Array] | None = None


XLA_OPS = StepOps()


def _layer(
    x: jax.Array, p: Params, cos: jax.Array, sin: jax.Array, mask: jax.Array,
    k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, config: ModelConfig, ops: StepOps,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # fmt: skip
    """`transformer._layer` for one token per row on a feature-major x [D, B]."""
    H, K, Dh, eps = config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps
    G, B = config.num_groups, x.shape[1]
    y = tfm.rms_norm(x, p["attn_norm"], eps, axis=0)
    qkv = ops.project(p["wqkv"], y).reshape(K, G + 2, Dh, B)  # see `decode_weights`
    q = _to_rows(qkv[:, :G].reshape(H * Dh, B), H, Dh)
    k = _to_rows(qkv[:, G].reshape(K * Dh, B), K, Dh)
    v = _to_rows(qkv[:, G + 1].reshape(K * Dh, B), K, Dh)
    q, k, v = tfm.finish_qkv(q, k, v, p, cos, sin, config)  # k [B,K,Dh,1], v [B,K,1,Dh]
    k_cache, v_cache = write_slot(k_cache, k, 3, start), write_slot(v_cache, v, 2, start)
    attn = ops.attention(q, k_cache, v_cache, mask, config)
    x = x + ops.project(p["wo"], attn.reshape(x.shape[1], H * Dh).T)
    x = constrain(x, _COLS)

    y = tfm.rms_norm(x, p["mlp_norm"], eps, axis=0)
    gate_up = ops.project(p["w_gate_up"], y).reshape(-1, 2, B)  # rows f: (gate f, up f)
    act = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
    x = x + ops.project(p["w_down"], constrain(act, ("act_mlp", "batch")))
    return constrain(x, _COLS), (k_cache, v_cache)


def slot_rope_tables(config: ModelConfig, max_len: int) -> tuple[jax.Array, jax.Array]:
    """RoPE cos and sin tables [max_len, head_dim] over a cache's slots, for `decode_step`.

    A decode step gathers its rows' positions from them (a row's position never passes its
    slot). Computing cos and sin of the positions instead, XLA fused them into every layer's q
    and k rotation, recomputing them there; a gather from the tables makes the rotations and
    the key writes cheaper. A decode loop makes the tables once, outside the loop (inside, XLA
    recomputes them every step)."""
    cos, sin = tfm.rope_tables(jnp.arange(max_len)[None], config)
    return cos[0], sin[0]


def decode_step(
    weights: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
    config: ModelConfig, ops: StepOps | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """Feed one token per row: tokens, positions [B] int; `cache` per layer
    written at slot `cache.end`. `ops` (default `XLA_OPS`) are the step's replaceable pieces;
    its attention gets the cache buffers as they are held (bf16 ones possibly as bits,
    `kv_cache.as_bits`). `rope`:
    `slot_rope_tables(config, cache.max_len)`, made here when None.

    Returns (next-token logits [B, V] float32, the updated cache).
    """
    ops = XLA_OPS if ops is None else ops
    x, cos, sin, key_mask, mask = step_inputs(weights, tokens, positions, cache, config, rope)

    def layer(x: jax.Array, p: Params, k: jax.Array, v: jax.Array) -> Any:
        return _layer(x, p, cos, sin, mask, k, v, cache.end, config, ops)

    x, new_cache = step_layers(layer, constrain(x.T, _COLS), weights, cache, key_mask)
    return step_logits(weights, x, config, ops.head), new_cache


def step_layers(
    layer: Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]], x: jax.Array,
    weights: Params, cache: KVCache, key_mask: jax.Array,
) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """A decode step's layer loop: ``x, (k, v) = layer(x, p, k, v)`` over the layers' weights
    and cache buffers. Returns (x, the cache with the new buffers, `key_mask` and `end` + 1)."""
    ks, vs = [], []
    for p, k_cache, v_cache in zip(weights["layers"], cache.k, cache.v, strict=True):
        x, (k_cache, v_cache) = layer(x, p, k_cache, v_cache)
        ks.append(k_cache)
        vs.append(v_cache)
    return x, cache.replace(k=tuple(ks), v=tuple(vs), key_mask=key_mask, end=cache.end + 1)


def step_inputs(
    weights: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
    config: ModelConfig, rope: tuple[jax.Array, jax.Array] | None,
) -> tuple[jax.Array, ...]:  # fmt: skip
    """What every layer of a decode step reads: (the tokens' embeddings [B, D] in the model's
    dtype, RoPE cos and sin [B, 1, Dh] at their positions, the cache's key mask with slot
    `cache.end` set [B, S], the attention mask [B, 1, S]: set slots up to `cache.end`)."""
    if not cache.per_layer:
        raise ValueError("decode_step takes a per-layer cache (init_cache(..., per_layer=True))")
    B = tokens.shape[0]
    x = jnp.take(weights["embed"], tokens, axis=0).astype(jnp.dtype(config.dtype))
    cos_table, sin_table = slot_rope_tables(config, cache.max_len) if rope is None else rope
    cos = jnp.take(cos_table, positions, axis=0, mode="clip")[:, None]
    sin = jnp.take(sin_table, positions, axis=0, mode="clip")[:, None]
    start = cache.end
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, jnp.ones((B, 1), bool), (0, start))
    mask = (key_mask & (jnp.arange(cache.max_len) <= start)[None, :])[:, None, :]  # [B, 1, S]
    return x, cos, sin, key_mask, mask


def step_logits(
    weights: Params, x: jax.Array, config: ModelConfig,
    head: Callable[[jax.Array, jax.Array], jax.Array] = xla_head,
) -> jax.Array:  # fmt: skip
    """Next-token logits [B, V] float32 of the last layer's feature-major output x [D, B];
    `head(w, h)` is the output projection (`StepOps.head`)."""
    h = tfm.rms_norm(x, weights["final_norm"], config.rms_norm_eps, axis=0)
    logits = head(weights.get("lm_head", weights["embed"]), h)  # [V, B]
    return constrain(jax.lax.optimization_barrier(logits).T, ("batch", "act_vocab"))
