"""Per-token sampling math: one token per row from logits, under traced per-row settings.

    ids, logprobs = sample_tokens(logits, key, settings, pool=256)

Temperature <= 0 is greedy for that row; top-k and top-p filter a `lax.top_k` pool (top-p falls
back to a bisection over the full vocabulary where the nucleus exceeds the pool); sampling inverts
a blocked CDF. Everything is traced, so changing a setting never recompiles. `sampling.Sampler`
calls `sample_tokens` once per decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Settings:
    """Per-call sampling settings, all traced: changing them never recompiles."""

    temperature: jax.Array  # [B] float32, <= 0: greedy
    top_p: jax.Array  # [B] float32, >= 1: off
    top_k: jax.Array  # [B] int32, <= 0: off
    stop_ids: jax.Array  # [sampling.MAX_STOP_IDS] int32, -1 = unused
    max_new: jax.Array  # [] int32


def top_p_bisect(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus mask over a full distribution without sorting. probs [B, V], top_p [B].

    Keeps token i iff the mass of tokens strictly more likely than i is < top_p. That set is
    {p >= x*} with x* the largest value whose upper mass sum(p[p >= x*]) is still >= top_p.
    Non-negative float32 values order like their int32 bit patterns, so 31 bisection steps over
    the bits find x* exactly.
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    lo = jnp.zeros(probs.shape[:1], jnp.int32)
    hi = jnp.max(bits, axis=-1) + 1

    def body(_: int, lh: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = lh
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return bits >= lo[:, None]


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, pool: int) -> jax.Array:
    """Top-k then top-p (on the renormalised top-k distribution); removed entries get -inf.

    logits [B, V] (temperature already applied); top_k [B] (<= 0: off; clamped to `pool`);
    top_p [B] (>= 1: off). Ties at a threshold are all kept.
    """
    V = logits.shape[-1]
    vals, _ = jax.lax.top_k(logits, min(pool, V))  # sorted, descending
    K = vals.shape[-1]
    k_on = top_k > 0
    k = jnp.where(k_on, jnp.clip(top_k, 1, K), K)
    in_k = jnp.arange(K)[None, :] < k[:, None]
    thr_k = jnp.where(k_on, jnp.take_along_axis(vals, (k - 1)[:, None], 1)[:, 0], -jnp.inf)
    log_z = jax.nn.logsumexp(jnp.where(in_k, vals, -jnp.inf), axis=-1)
    log_z = jnp.where(k_on, log_z, jax.nn.logsumexp(logits, axis=-1))
    p = jnp.where(in_k, jnp.exp(vals - log_z[:, None]), 0.0)
    cum = jnp.cumsum(p, axis=-1)
    m = jnp.maximum(jnp.sum(in_k & (cum - p < top_p[:, None]), axis=-1), 1)
    p_on = top_p < 1.0
    thr_p = jnp.where(p_on, jnp.take_along_axis(vals, (m - 1)[:, None], 1)[:, 0], -jnp.inf)
    keep = logits >= jnp.maximum(thr_k, thr_p)[:, None]
    # The pool holds the whole nucleus when top-k is on (renormalised mass 1) or when the
    # pool's mass reaches top_p; other rows need the exact full-vocabulary search.
    uncovered = p_on & ~k_on & (cum[:, -1] < top_p)

    exact = lambda k: jnp.where(
        uncovered[:, None], top_p_bisect(jax.nn.softmax(logits, axis=-1), top_p), k
    )
    keep = jax.lax.cond(jnp.any(uncovered), exact, lambda k: k, keep)
    return jnp.where(keep, logits, -jnp.inf)


def inverse_cdf(weights: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Sample index i with probability weights[i] / sum(weights), from one uniform u per row.

    Two-level inverse CDF: pick a block of `block` ids from the block sums, then an id inside
    it, reusing the same uniform (exact): two short scans instead of a flat cumsum over the
    whole vocabulary, which is the slower form on CPU.
    """
    B, V = weights.shape
    nb = -(-V // block)
    wb = jnp.pad(weights, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    bsum = jnp.sum(wb, axis=-1)
    bcdf = jnp.cumsum(bsum, axis=-1)
    target = u * bcdf[:, -1]
    blk = jnp.sum(bcdf <= target[:, None], axis=-1)
    blk = jnp.where(blk >= nb, jnp.argmax(bsum, axis=-1), blk)  # float round-off guard
    before = jnp.take_along_axis(bcdf - bsum, blk[:, None], 1)[:, 0]
    inner = jnp.take_along_axis(wb, blk[:, None, None], 1)[:, 0]
    icdf = jnp.cumsum(inner, axis=-1)
    idx = jnp.sum(icdf <= (target - before)[:, None], axis=-1)
    idx = jnp.where(idx >= block, jnp.argmax(inner, axis=-1), idx)
    return (blk * block + idx).astype(jnp.int32)


def sample_tokens(
    logits: jax.Array, key: jax.Array, settings: Settings, pool: int = 256
) -> tuple[jax.Array, jax.Array]:
    """One token per row from float32 logits [B, V] -> (ids [B], logprobs [B]). Filtering and
    sampling are skipped under `lax.cond` when no row needs them (all-greedy: only an argmax)."""
    temperature, top_p, top_k = settings.temperature, settings.top_p, settings.top_k
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    rows = jnp.arange(logits.shape[0])
    u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r)))(rows)

    def draw(scaled: jax.Array) -> jax.Array:
        need = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
        filt = jax.lax.cond(
            need, lambda x: filter_logits(x, top_k, top_p, pool), lambda x: x, scaled
        )
        w = jnp.exp(filt - jnp.max(filt, axis=-1, keepdims=True))
        return inverse_cdf(w, u)

    sampled = jax.lax.cond(
        jnp.all(greedy), lambda x: jnp.zeros(x.shape[:1], jnp.int32), draw, scaled
    )
    ids = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
    picked = jnp.take_along_axis(scaled, ids[:, None], 1)[:, 0]
    return ids, picked - jax.nn.logsumexp(scaled, axis=-1)
