"""The sampler's two programs: `prefill` (prompt + forced prefix through the model into a fresh
KV cache) and `decode` (ONE `lax.while_loop` that samples, writes and feeds back a token per
iteration until every row has stopped). `sampler.Sampler` jits them per bucket and drives them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rlver_jax.kernels.gpu import decode as gpu_decode
from rlver_jax.models import transformer as tfm
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import XLA_OPS, StepOps, decode_step, slot_rope_tables
from rlver_jax.models.kv_cache import KVCache, as_bits, init_cache
from rlver_jax.models.transformer import Params
from rlver_jax.sampling.tokens import Settings, sample_tokens


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries (donated from prefill to decode)."""

    cache: KVCache
    logits: jax.Array  # [B, V] float32, next-token logits
    tokens: jax.Array  # [B, N] int32 outputs
    logprobs: jax.Array  # [B, N] float32
    positions: jax.Array  # [B] RoPE position of the next token
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended on a stop token
    lengths: jax.Array  # [B] int32
    step: jax.Array  # [] int32, next output slot
    key: jax.Array
    settings: Settings


def prefill(
    params: Params, prompt: jax.Array, prompt_mask: jax.Array, prefix: jax.Array, live: jax.Array,
    settings: Settings, seed: jax.Array, *, config: ModelConfig, cache_len: int, out_len: int,
    pad_id: int, per_layer: bool = False,
) -> DecodeState:  # fmt: skip
    """Run prompt + forced prefix through the model; sampling starts in `decode`. Only the F + 1
    positions that matter (prefix logprobs, first free token) are projected to the vocabulary;
    sampling code stays out of this program (it compiles once, in decode). `per_layer` fills
    the per-layer cache the unrolled decode step reads (bf16 as bits, `kv_cache.as_bits`)
    directly: a stacked one would be written, then copied layer by layer (SmolLM2 at batch
    32: 566 MB)."""
    B, P = prompt.shape
    F = prefix.shape[0]
    tokens = jnp.concatenate([prompt, jnp.broadcast_to(prefix, (B, F))], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.ones((B, F), bool)], axis=1)
    positions = tfm.positions_from_mask(mask)
    cache = init_cache(config, B, cache_len, per_layer=per_layer)
    hidden, cache = tfm.forward(
        params, tokens, positions, mask, config, cache, return_hidden=True, empty_cache=True
    )
    cache = as_bits(cache)
    logits = tfm.lm_logits(params, hidden[:, P - 1 :], config)  # [B, F + 1, V]
    out_tok = jnp.full((B, out_len), pad_id, jnp.int32)
    out_lp = jnp.zeros((B, out_len), jnp.float32)
    if F:
        t = jnp.where(settings.temperature <= 0, 1.0, settings.temperature)[:, None, None]
        lp = jax.nn.log_softmax(logits[:, :F] / t, axis=-1)
        pre = jnp.broadcast_to(prefix, (B, F))
        out_tok = out_tok.at[:, :F].set(pre)
        out_lp = out_lp.at[:, :F].set(jnp.take_along_axis(lp, pre[..., None], -1)[..., 0])
    return DecodeState(
        cache=cache, logits=logits[:, F], tokens=out_tok, logprobs=out_lp,
        positions=positions[:, -1] + 1, done=~live, stopped=jnp.zeros((B,), bool),
        lengths=jnp.full((B,), F, jnp.int32), step=jnp.asarray(F, jnp.int32),
        key=jax.random.key(seed), settings=settings,
    )  # fmt: skip


def decode(
    params: Params, state: DecodeState, *, config: ModelConfig, pool: int, pad_id: int,
    unroll: bool, ops: StepOps = XLA_OPS, fused: gpu_decode.Blocks | None = None,
) -> DecodeState:  # fmt: skip
    """Sample, write, feed back: one `lax.while_loop` iteration per token until all rows stop.
    The last token is still fed through the model (unused logits): skipping that one forward
    would need a `lax.cond` around the cache update inside the loop.

    With `unroll` (an unrolled `sampler.decode`) `params` are `decode_step.decode_weights`
    and each token runs `decode_step.decode_step` on the per-layer cache buffers (bf16 ones
    held as bits, `kv_cache.as_bits`) that `prefill(per_layer=True)` leaves (`decode_step`
    rejects a stacked cache). Either way the donated cache is updated in place: the returned state
    holds it (as the output aliasing the donated input: without that XLA would copy the whole
    cache into the loop). `ops` are the unrolled step's pieces (`kernels.select.DecodePlan`);
    `fused` (block sizes) runs each step as `kernels.gpu.decode.decode_step` instead.
    """
    B = state.logits.shape[0]
    ones = jnp.ones((B, 1), bool)
    rope = slot_rope_tables(config, state.cache.max_len) if unroll else None

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < s.settings.max_new) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        key = jax.random.fold_in(s.key, s.step)
        tok, lp = sample_tokens(s.logits, key, s.settings, pool)
        active = ~s.done
        tok = jnp.where(active, tok, pad_id)
        hit = active & jnp.any(tok[:, None] == s.settings.stop_ids[None, :], axis=-1)
        if fused is not None:
            logits, cache = gpu_decode.decode_step(
                params, tok, s.positions, s.cache, config, rope, fused
            )
        elif unroll:
            logits, cache = decode_step(params, tok, s.positions, s.cache, config, ops, rope)
        else:
            hidden, cache = tfm.forward(
                params, tok[:, None], s.positions[:, None], ones, config, s.cache,
                return_hidden=True,
            )  # fmt: skip
            logits = tfm.lm_logits(params, hidden, config)[:, 0]
        return s.replace(
            cache=cache,
            logits=logits,
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(
                s.logprobs, jnp.where(active, lp, 0.0)[:, None], (0, s.step)
            ),
            positions=s.positions + 1,
            done=s.done | hit | (s.step + 1 >= s.settings.max_new),
            stopped=s.stopped | hit,
            lengths=s.lengths + active.astype(jnp.int32),
            step=s.step + 1,
        )

    return jax.lax.while_loop(cond, body, state)
