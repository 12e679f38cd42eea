"""The policy's and the critic's token-aligned outputs on a batch of rows (the learner's forwards).

Token ``t``'s log-prob and entropy come from the logits at position ``t - 1`` and its value from
the critic at ``t - 1`` (:func:`align_to_targets`), so every output lines up with
``loss_mask[t]``; column 0 is 0. ``token_mask`` may hold segment ids (packed rows,
:mod:`rlver_jax.rl.packing`), where a member's first token after a shared prefix is predicted
from the prefix's last position instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.models import value_head
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import (
    forward,
    is_segment_ids,
    lm_logits,
    param_logical_axes,
    positions_from_mask,
    predecessors,
)
from rlver_jax.parallel.rules import constrain
from rlver_jax.rl.losses import logprobs_and_entropy
from rlver_jax.rl.optim import cond_or_zeros

Array = jax.Array
Params = Any
_BT = ("batch", "seq")
__all__ = ["TARGET_BLOCK", "align_to_targets", "critic_values", "policy_outputs", "shift_right"]
__all__ += ["vocab_block"]
TARGET_BLOCK = 64  # target positions per vocabulary-projection block (see policy_outputs)


def shift_right(x: Array) -> Array:
    """``out[:, t] = x[:, t - 1]``, ``out[:, 0] = 0``: position ``t - 1`` -> token ``t``."""
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))


def align_to_targets(x: Array, token_mask: Array) -> Array:
    """Per-position outputs ``x`` ``[B, T, ..]`` moved to the token they predict: ``out[:, t] =
    x[:, parent(t)]`` with ``parent(t) = t - 1`` (:func:`shift_right`), except that a packed
    member's first token after a shared prefix takes the prefix's last position
    (:func:`rlver_jax.models.transformer.predecessors`); ``out[:, 0] = 0``."""
    if not is_segment_ids(token_mask):
        return shift_right(x)
    parent = predecessors(token_mask)  # -1 at t = 0
    index = jnp.maximum(parent, 0).reshape(*parent.shape, *(1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, index, axis=1)
    return jnp.where((parent >= 0).reshape(index.shape), out, jnp.zeros((), x.dtype))


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
    hidden = align_to_targets(hidden, token_mask)  # hidden[:, t] now predicts tokens[:, t]
    T = tokens.shape[1]
    if needed is None or vocab_block(T) == T:
        head = _head_params(params, mcfg)
        logp, ent = _outputs(head, hidden, tokens, mcfg, temperature, entropy_grad)
    else:
        blocks = lambda x: jnp.swapaxes(x.reshape(x.shape[0], -1, TARGET_BLOCK, *x.shape[2:]), 0, 1)
        unblock = lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[1], T)
        run = _blocked_outputs(mcfg, temperature, entropy_grad)
        xs = (blocks(hidden), blocks(tokens), blocks(needed))
        logp, ent = (unblock(o) for o in run(_gathered_head(params, mcfg), *xs))
    first = jnp.arange(T) == 0  # no position predicts token 0
    return jnp.where(first, 0.0, logp), jnp.where(first, 0.0, ent)


def _head_params(params: Params, mcfg: ModelConfig) -> Params:
    """The weights `lm_logits` reads (so the blocked backward carries only their gradient)."""
    return (
        {"embed": params["embed"]} if mcfg.tie_word_embeddings else {"lm_head": params["lm_head"]}
    )


def _gathered_head(params: Params, mcfg: ModelConfig) -> Params:
    """`_head_params` gathered over the `embed` (FSDP) axes once, before the block loop: a
    sharded head in the loop is gathered again for every block (XLA does not hoist it; at 7B,
    T = 16384: 256 gathers of a 2.2 GB head per row chunk, `rlver-jax plan --compile`). Still
    split over `vocab`; its gradient is reduce-scattered once."""
    axes = param_logical_axes(mcfg)
    unsplit = lambda names: tuple(None if n == "embed" else n for n in names)
    head = _head_params(params, mcfg)
    return {k: constrain(w, unsplit(axes[k])) for k, w in head.items()}


def _outputs(
    head: Params, h: Array, targets: Array, mcfg: ModelConfig, temperature: float,
    entropy_grad: bool,
) -> tuple[Array, Array]:  # fmt: skip
    logits = lm_logits(head, h, mcfg) / temperature
    return logprobs_and_entropy(logits, targets, entropy_grad)


def _blocked_outputs(
    mcfg: ModelConfig, temperature: float, entropy_grad: bool
) -> Callable[[Params, Array, Array, Array], tuple[Array, Array]]:
    """``run(head, hidden, targets, needed)`` over ``[n_blocks, B, block, ..]``: `_outputs` per
    block, zeros where no row needs a token, with a hand-written VJP.

    Autodiff of a ``lax.map`` of ``lax.cond`` blocks stacks the head weight once per block as a
    residual (``[n_blocks, V, D]``: 1.8 GB for SmolLM2 at 1,024 tokens). Here the forward keeps
    only its inputs, and the backward recomputes each needed block's logits (as the
    rematerialised blocks did) and accumulates the head's gradient in one fp32 scan carry."""

    def out(head: Params, h: Array, targets: Array) -> tuple[Array, Array]:
        return _outputs(head, h, targets, mcfg, temperature, entropy_grad)

    @jax.custom_vjp
    def run(head: Params, hb: Array, tb: Array, nb: Array) -> tuple[Array, Array]:
        def block(xs: tuple[Array, Array, Array]) -> tuple[Array, Array]:
            h, targets, need = xs
            return cond_or_zeros(jnp.any(need != 0), functools.partial(out, head), h, targets)

        return jax.lax.map(block, (hb, tb, nb))

    def fwd(head: Params, hb: Array, tb: Array, nb: Array) -> tuple[Any, Any]:
        return run(head, hb, tb, nb), (head, hb, tb, nb)

    def bwd(res: Any, cts: tuple[Array, Array]) -> tuple[Any, Array, None, None]:
        head, hb, tb, nb = res

        def grads(d_head: Params, h: Array, targets: Array, ct: Any) -> tuple[Params, Array]:
            _, vjp = jax.vjp(lambda hd, x: out(hd, x, targets), head, h)
            g_head, g_h = vjp(ct)
            return jax.tree.map(lambda a, g: a + g.astype(a.dtype), d_head, g_head), g_h

        def skip(d_head: Params, h: Array, targets: Array, ct: Any) -> tuple[Params, Array]:
            return d_head, jnp.zeros_like(h)

        def step(d_head: Params, xs: Any) -> tuple[Params, Array]:
            h, targets, need, ct = xs
            return jax.lax.cond(jnp.any(need != 0), grads, skip, d_head, h, targets, ct)

        zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), head)  # fp32 sum
        d_head, d_hidden = jax.lax.scan(step, zeros, (hb, tb, nb, cts))
        d_head = jax.tree.map(lambda g, w: g.astype(w.dtype), d_head, head)
        return d_head, d_hidden, None, None

    run.defvjp(fwd, bwd)
    return run


def critic_values(params: Params, tokens: Array, token_mask: Array, mcfg: ModelConfig) -> Array:
    """Token-aligned critic values ``[B, T]``: ``values[t] = V(position t - 1)``."""
    tokens, token_mask = constrain(tokens, _BT), constrain(token_mask, _BT)
    v = value_head.value_forward(params, tokens, positions_from_mask(token_mask), token_mask, mcfg)
    return align_to_targets(v.astype(jnp.float32), token_mask)
