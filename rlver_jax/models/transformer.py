"""Decoder-only transformer for the Llama (Llama-3, SmolLM2), Qwen2/Qwen2.5 and Qwen3 families.

The model is a pure function of a params pytree:

    logits, cache = forward(params, tokens, positions, token_mask, config, cache=None)

- GQA attention with RoPE (HF "rotate half" layout, optional linear / llama3 scaling), RMSNorm,
  SwiGLU MLP; q/k/v biases for Qwen2, per-head q/k RMSNorm for Qwen3; tied or untied embeddings.
- Layers are stacked on a leading `layers` axis so that they can run under `lax.scan` (one
  compiled layer; fast compiles) or an unrolled Python loop (`config.scan_layers=False`).
- `token_mask` marks real tokens; padded positions are never attended to, so left-padded batches
  give the same logits on their real tokens as unpadded ones.
- With a `KVCache` (`models/kv_cache.py`) the call appends the block's keys/values at slot
  `cache.end` (shared by all rows: prompts are left-padded to a common length) and attends over
  the whole cache; a prefill into an empty cache (`empty_cache=True`) over the block alone.
- Every weight has logical axis names (`param_logical_axes`) and activations are constrained with
  `rules.constrain`, so the sharding layer maps them to any mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.models.attention import attention
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.kv_cache import KVCache
from rlver_jax.models.projection import project
from rlver_jax.parallel.rules import LogicalAxes, constrain

Params = dict[str, Any]


# --------------------------------------------------------------------------- parameters
def param_logical_axes(config: ModelConfig) -> Params:
    """Logical axis names of every weight, in the same pytree structure as the params."""
    layers: dict[str, LogicalAxes] = {
        "attn_norm": ("layers", "norm"),
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if config.attention_bias:
        layers |= {
            "bq": ("layers", "heads", "head_dim"),
            "bk": ("layers", "kv_heads", "head_dim"),
            "bv": ("layers", "kv_heads", "head_dim"),
        }
    if config.qk_norm:
        layers |= {"q_norm": ("layers", "norm"), "k_norm": ("layers", "norm")}
    axes: Params = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` of every weight (no memory is allocated)."""
    dims = {
        "layers": config.num_layers,
        "embed": config.hidden_size,
        "mlp": config.intermediate_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab": config.vocab_size,
    }
    dtype = jnp.dtype(config.param_dtype)
    axes = param_logical_axes(config)

    def struct_of(names: LogicalAxes, norm_dim: int) -> jax.ShapeDtypeStruct:
        shape = tuple(norm_dim if n == "norm" else dims[n] for n in names)  # type: ignore[index]
        return jax.ShapeDtypeStruct(shape, dtype)

    shapes: Params = {k: struct_of(v, config.hidden_size) for k, v in axes.items() if k != "layers"}
    shapes["layers"] = {
        k: struct_of(v, config.head_dim if k in ("q_norm", "k_norm") else config.hidden_size)
        for k, v in axes["layers"].items()
    }
    return shapes


def is_logical_axes(x: Any) -> bool:
    """True for a tuple of logical axis names (a leaf of `param_logical_axes`)."""
    return isinstance(x, tuple) and all(isinstance(n, str | None) for n in x)


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random initialisation: N(0, std) matrices, zero biases, unit norm scales."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, leaf, k in zip(paths, leaves, keys, strict=True):
        if "norm" in path:
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        elif path.endswith("['bq']") or path.endswith("['bk']") or path.endswith("['bv']"):
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            out.append((std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """y = x / sqrt(mean(x^2) + eps) * scale over `axis`, computed in float32 (as HF does);
    `scale` broadcasts against x (shape [D] for the last axis, [D, 1] for axis 0 of [D, B])."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies theta^(-2i/d), with linear or llama3 scaling where configured."""
    dh = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def rope_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, head_dim] for integer `positions` [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` on x [B, T, heads, head_dim] (tables [B, T, head_dim]).

    The map is a rotation of each (x_i, x_{i + half}) pair, so its transpose is the rotation
    by the opposite angle: ``dx = apply_rope(g, cos, -sin)`` (``sin`` repeats over the two
    halves). Autodiff of the concatenation instead builds the gradient from padded halves
    (pad + add passes over q and k of every layer); positions are integers, so the tables
    get no gradient."""
    return _rotate(x, cos, sin)


def _rope_fwd(x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, Any]:
    return _rotate(x, cos, sin), (cos, sin)


def _rope_bwd(tables: Any, g: jax.Array) -> tuple[jax.Array, None, None]:
    cos, sin = tables
    return _rotate(g, cos, -sin), None, None  # None: zero cotangents for the tables


apply_rope.defvjp(_rope_fwd, _rope_bwd)


def is_segment_ids(token_mask: jax.Array) -> bool:
    """True when a ``token_mask`` holds integer segment ids (packed rows, see
    `rlver_jax.rl.packing`: samples 1, 2, ... back to back, 0 on padding) rather than booleans."""
    return bool(jnp.issubdtype(token_mask.dtype, jnp.integer))


PREFIX_SHIFT = 16  # see `segment_parts`


def segment_parts(seg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(own segment, shared-prefix segment) of packed segment ids: ``seg = own | prefix <<
    PREFIX_SHIFT`` (`rlver_jax.rl.packing`'s shared prefixes; prefix 0: none). A token sees the
    keys of its own segment and of its prefix segment."""
    return seg & ((1 << PREFIX_SHIFT) - 1), seg >> PREFIX_SHIFT


def _per_segment(own: jax.Array, values: jax.Array, init: int, op: str) -> jax.Array:
    """``[.., T + 1]``: per segment id of each row, ``op`` ("add" / "max") of ``values``."""
    table = jnp.full((*own.shape[:-1], own.shape[-1] + 1), init, values.dtype)
    rows = jnp.indices(own.shape)[:-1]
    return getattr(table.at[(*rows, own)], op)(values)


def _prefix_lookup(table: jax.Array, prefix: jax.Array) -> jax.Array:
    return jnp.take_along_axis(table, prefix, axis=-1)


def _indices(seg: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)


def _segment_starts(seg: jax.Array) -> jax.Array:
    """True at the first token of each segment (and at ``t = 0``)."""
    before = jnp.pad(seg[..., :-1], [(0, 0)] * (seg.ndim - 1) + [(1, 0)], constant_values=-1)
    return seg != before


def positions_from_mask(token_mask: jax.Array) -> jax.Array:
    """Positions 0, 1, ... counted over real tokens only (left padding gets position 0). With
    segment ids (`is_segment_ids`), positions restart at each segment: ``t - start(segment)``,
    plus the length of the token's shared prefix segment (`segment_parts`)."""
    if not is_segment_ids(token_mask):
        return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)
    seg, prefix = segment_parts(token_mask)
    idx = _indices(seg)
    start = jax.lax.cummax(jnp.where(_segment_starts(seg), idx, 0), axis=seg.ndim - 1)
    lengths = _per_segment(seg, jnp.ones_like(seg), 0, "add")
    offset = jnp.where(prefix > 0, _prefix_lookup(lengths, prefix), 0)
    return jnp.where(seg > 0, idx - start + offset, 0)


def predecessors(token_mask: jax.Array) -> jax.Array:
    """Per token of packed segment ids: the position whose output predicts it, ``t - 1``,
    except the first token of a member behind a shared prefix (`segment_parts`), which is
    predicted from the prefix's last position; -1 at ``t = 0``."""
    seg, prefix = segment_parts(token_mask)
    idx = _indices(seg)
    ends = _prefix_lookup(_per_segment(seg, idx, -1, "max"), prefix)  # each segment's last slot
    return jnp.where(_segment_starts(seg) & (prefix > 0), ends, idx - 1)


def attention_mask(token_mask: jax.Array) -> jax.Array:
    """``[B, T, T]`` mask of a cache-free block: query ``t`` sees real keys ``s <= t``; with
    segment ids (`is_segment_ids`) only keys of its own segment and of its shared prefix
    (`segment_parts`), so a packed sample attends exactly as it would alone in a row."""
    T = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    if not is_segment_ids(token_mask):
        return causal & token_mask.astype(bool)[:, None, :]
    seg, prefix = segment_parts(token_mask)
    key = seg[:, None, :]
    visible = (seg[:, :, None] == key) | (prefix[:, :, None] == key)
    return causal & visible & (key > 0)


def finish_qkv(
    q: jax.Array, k: jax.Array, v: jax.Array, p: Params, cos: jax.Array, sin: jax.Array,
    config: ModelConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Biases, Qwen3's q/k norms and RoPE on projected q [B,T,H,Dh], k, v [B,T,K,Dh]; returns
    q as is and k [B,K,Dh,T], v [B,K,T,Dh] in the cache layouts (see `KVCache`)."""
    dtype = q.dtype
    if config.attention_bias:
        q, k, v = q + p["bq"].astype(dtype), k + p["bk"].astype(dtype), v + p["bv"].astype(dtype)
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "act_kv_heads", "head_dim"))
    return q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
    kv: tuple[jax.Array, jax.Array, jax.Array | int, jax.Array] | None,
    config: ModelConfig,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # fmt: skip
    """Attention of q [B,T,H,Dh] over the block's k, v (cache layouts; causal, see
    `attention.attention`) or, with `kv` = (k cache, v cache, layer index, write slot), over
    the stacked caches of all layers after writing the block into this layer's.

    Only the block's new slots are written, so XLA updates the cache in place instead of copying
    a layer's cache out and back at every decode step. Returns (attention output [B,T,H,Dh],
    the updated (k, v) caches, or without a cache the block's own (k, v))."""
    if kv is not None:
        k_cache, v_cache, layer, start = kv
        k_at, v_at = (layer, 0, 0, 0, start), (layer, 0, 0, start, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), k_at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), v_at)
        k = jax.lax.dynamic_index_in_dim(k_cache, layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v_cache, layer, 0, keepdims=False)
        new_kv = (k_cache, v_cache)
    else:
        new_kv = (k, v)
    dtype = q.dtype
    out = attention(q, k.astype(dtype), v.astype(dtype), mask, config, causal=kv is None)
    return out, new_kv


def _layer(
    h: jax.Array,
    p: Params,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    kv: tuple[jax.Array, jax.Array, jax.Array | int, jax.Array] | None,
    config: ModelConfig,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm block; `kv` and the returned (k, v) as in `attend`."""
    dtype = h.dtype
    x = rms_norm(h, p["attn_norm"], config.rms_norm_eps)
    q, k, v = project(x, tuple(p[w].astype(dtype) for w in ("wq", "wk", "wv")))
    q, k, v = finish_qkv(q, k, v, p, cos, sin, config)
    attn, new_kv = attend(q, k, v, mask, kv, config)
    h = h + jnp.einsum("bthk,hkd->btd", attn, p["wo"].astype(dtype))
    h = constrain(h, ("batch", "seq", "act_embed"))

    x = rms_norm(h, p["mlp_norm"], config.rms_norm_eps)
    gate, up = project(x, (p["w_gate"].astype(dtype), p["w_up"].astype(dtype)))
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    h = h + jnp.einsum("btf,fd->btd", act, p["w_down"].astype(dtype))
    return constrain(h, ("batch", "seq", "act_embed")), new_kv


def _remat(fn: Any, policy: str) -> Any:
    if policy == "none":
        return fn
    saveable = (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
    )
    return jax.checkpoint(fn, policy=saveable, static_argnums=(6,))


# --------------------------------------------------------------------------- forward
def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    token_mask: jax.Array,
    config: ModelConfig,
    cache: KVCache | None = None,
    *,
    return_hidden: bool = False,
    empty_cache: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder on a block of tokens.

    Args:
      tokens: [B, T] int token ids (pad ids are ignored through `token_mask`).
      positions: [B, T] int RoPE positions (see `positions_from_mask`).
      token_mask: [B, T] bool, True on real tokens; or int segment ids of packed rows (no
        cache; see `attention_mask`).
      cache: optional KV cache; the block is written at slots [cache.end, cache.end + T).
      return_hidden: return final-norm hidden states [B, T, D] instead of logits.
      empty_cache: the caller's promise that `cache` holds nothing yet (a prefill): attention
        then runs over the block's own T keys, not all of the cache's slots, and the block's
        keys and values fill the cache once at the end. Such a cache may be per layer
        (`init_cache(per_layer=True)`: what `decode_step` reads next).

    Returns:
      (logits [B, T, V] float32 | hidden [B, T, D], the updated cache or None).
    """
    dtype = jnp.dtype(config.dtype)
    h = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    h = constrain(h, ("batch", "seq", "act_embed"))
    cos, sin = rope_tables(positions, config)
    T = tokens.shape[1]

    if empty_cache and cache is None:
        raise ValueError("empty_cache=True needs a cache to fill")
    start = key_mask = None  # start None: attention within the block (no cache, or an empty one)
    if cache is not None:
        if is_segment_ids(token_mask):
            raise ValueError("packed rows (segment ids) take no KV cache")
        token_mask = token_mask.astype(bool)
        if cache.per_layer and not empty_cache:
            raise ValueError(
                "forward reads a stacked KVCache; it fills a per-layer one only as a prefill "
                "(empty_cache=True): reading per-layer caches is decode_step's "
                "(rlver_jax.models.decode_step)"
            )
    if cache is None or empty_cache:
        mask = attention_mask(token_mask)
    else:
        start = cache.end
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, start))
        q_slot = start + jnp.arange(T)
        k_slot = jnp.arange(cache.max_len)
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]

    layer_fn = _remat(_layer, config.remat)
    layers = params["layers"]
    new_k: Any = None if cache is None else cache.k
    new_v: Any = None if cache is None else cache.v
    block_kv: Any = None  # with empty_cache: every layer's block (k, v), stacked

    if config.scan_layers and start is None:

        def body(carry: jax.Array, p: Params) -> tuple[jax.Array, Any]:
            out, kv = layer_fn(carry, p, cos, sin, mask, None, config)
            return out, kv if empty_cache else None

        h, block_kv = jax.lax.scan(body, h, layers)
    elif config.scan_layers:

        def body_cached(
            carry: tuple[jax.Array, jax.Array, jax.Array], xs: tuple[Params, jax.Array]
        ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
            h_c, k_all, v_all = carry
            p, i = xs
            out, (k_all, v_all) = layer_fn(h_c, p, cos, sin, mask, (k_all, v_all, i, start), config)
            return (out, k_all, v_all), None

        idx = jnp.arange(config.num_layers)
        (h, new_k, new_v), _ = jax.lax.scan(body_cached, (h, new_k, new_v), (layers, idx))
    else:
        kvs = []
        for i in range(config.num_layers):
            p = jax.tree.map(lambda x, i=i: x[i], layers)
            kv = None if start is None else (new_k, new_v, i, start)
            h, (k_l, v_l) = layer_fn(h, p, cos, sin, mask, kv, config)
            if start is not None:
                new_k, new_v = k_l, v_l
            elif empty_cache:
                kvs.append((k_l, v_l))
        if empty_cache:
            block_kv = tuple(jnp.stack(x) for x in zip(*kvs, strict=True))

    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    new_cache = None
    if empty_cache:  # the block's keys and values at slots [0, T), written once
        ks, vs = block_kv
        if cache.per_layer:  # layer i's block into its own buffer: no stacked copy to split
            ks, vs = (tuple(x[i] for i in range(config.num_layers)) for x in (ks, vs))
        write = lambda buf, block: jax.lax.dynamic_update_slice(
            buf, block.astype(buf.dtype), (0,) * buf.ndim
        )
        new_cache = cache.replace(
            k=jax.tree.map(write, cache.k, ks),
            v=jax.tree.map(write, cache.v, vs),
            key_mask=jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, 0)),
            end=jnp.asarray(T, jnp.int32),
        )
    elif cache is not None:
        new_cache = KVCache(k=new_k, v=new_v, key_mask=key_mask, end=start + T)
    if return_hidden:
        return h, new_cache
    return lm_logits(params, h, config), new_cache


def lm_logits(params: Params, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits [.., V] in float32 from final hidden states [.., D]."""
    if config.tie_word_embeddings:
        head = params["embed"].astype(hidden.dtype).T
    else:
        head = params["lm_head"].astype(hidden.dtype)
    (logits,) = project(hidden, (head,), jnp.float32)
    return constrain(logits, ("batch", "seq", "act_vocab"))
