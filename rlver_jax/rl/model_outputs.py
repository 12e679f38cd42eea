"""The policy's and the critic's token-aligned outputs on a batch of rows (the learner's forwards).

Token ``t``'s log-prob and entropy come from the logits at position ``t - 1`` and its value from
the critic at ``t - 1`` (:func:`shift_right`), so every output lines up with ``loss_mask[t]``;
column 0 is 0. ``token_mask`` may hold segment ids (packed rows, :mod:`rlver_jax.rl.packing`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.models import value_head
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import forward, lm_logits, positions_from_mask
from rlver_jax.parallel.rules import constrain
from rlver_jax.rl.losses import logprobs_and_entropy
from rlver_jax.rl.optim import cond_or_zeros

Array = jax.Array
Params = Any
_BT = ("batch", "seq")
__all__ = ["TARGET_BLOCK", "critic_values", "policy_outputs", "shift_right", "vocab_block"]
TARGET_BLOCK = 64  # target positions per vocabulary-projection block (see policy_outputs)


def shift_right(x: Array) -> Array:
    """``out[:, t] = x[:, t - 1]``, ``out[:, 0] = 0``: position ``t - 1`` -> token ``t``."""
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))


def vocab_block(seq_len: int) -> int:
    """Target positions per vocabulary-projection block of :func:`policy_outputs` (given
    ``needed``): :data:`TARGET_BLOCK` when it divides a longer ``seq_len``, else one block."""
    return TARGET_BLOCK if seq_len % TARGET_BLOCK == 0 and seq_len > TARGET_BLOCK else seq_len


def policy_outputs(
    params: Params, tokens: Array, token_mask: Array, mcfg: ModelConfig, temperature: float = 1.0,
    entropy_grad: bool = True, needed: Array | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """Token-aligned ``(logprobs, entropies)`` ``[B, T]``: ``logp[t] = log softmax(z_{t-1} /
    temperature)[tokens[t]]``, ``H[t] = entropy(z_{t-1} / temperature)``; ``entropy_grad=False``:
    no gradient flows through ``H`` (see :func:`~rlver_jax.rl.losses.logprobs_and_entropy`).

    ``needed`` ``[B, T]``: the tokens whose outputs are used (a loss mask). The vocabulary
    projection then runs in blocks of :data:`TARGET_BLOCK` target positions and skips (zeros)
    the blocks where no row needs a token: system prompts and user turns hold no policy tokens,
    and the projection with its softmax is a large share of a small model's step."""
    tokens, token_mask = constrain(tokens, _BT), constrain(token_mask, _BT)
    hidden, _ = forward(
        params, tokens, positions_from_mask(token_mask), token_mask, mcfg, return_hidden=True
    )
    hidden = shift_right(hidden)  # hidden[:, t] now predicts tokens[:, t]

    def outputs(h: Array, targets: Array) -> tuple[Array, Array]:
        logits = lm_logits(params, h, mcfg) / temperature
        return logprobs_and_entropy(logits, targets, entropy_grad)

    T = tokens.shape[1]
    if needed is None or vocab_block(T) == T:
        logp, ent = outputs(hidden, tokens)
    else:
        blocks = lambda x: jnp.swapaxes(x.reshape(x.shape[0], -1, TARGET_BLOCK, *x.shape[2:]), 0, 1)
        unblock = lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[1], T)

        # Rematerialised: a block keeps only its hidden states for the backward pass, so a
        # skipped block stores no [B, block, V] residuals (a cond's branches share them).
        remat_outputs = jax.checkpoint(outputs)

        def block(xs: tuple[Array, Array, Array]) -> tuple[Array, Array]:
            h, targets, need = xs
            return cond_or_zeros(jnp.any(need != 0), remat_outputs, h, targets)

        xs = (blocks(hidden), blocks(tokens), blocks(needed))
        logp, ent = (unblock(o) for o in jax.lax.map(block, xs))
    first = jnp.arange(T) == 0  # no position predicts token 0
    return jnp.where(first, 0.0, logp), jnp.where(first, 0.0, ent)


def critic_values(params: Params, tokens: Array, token_mask: Array, mcfg: ModelConfig) -> Array:
    """Token-aligned critic values ``[B, T]``: ``values[t] = V(position t - 1)``."""
    tokens, token_mask = constrain(tokens, _BT), constrain(token_mask, _BT)
    v = value_head.value_forward(params, tokens, positions_from_mask(token_mask), token_mask, mcfg)
    return shift_right(v.astype(jnp.float32))
