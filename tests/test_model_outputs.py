"""`policy_outputs` with `needed`: the vocabulary projection in blocks, unneeded blocks skipped."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import init_params
from rlver_jax.rl.model_outputs import TARGET_BLOCK, policy_outputs

MCFG = ModelConfig(
    family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip


def test_blocked_outputs_equal_the_full_ones_where_needed_and_skip_the_rest() -> None:
    B, T = 3, 3 * TARGET_BLOCK
    rng = np.random.default_rng(0)
    params = init_params(MCFG, jax.random.key(0))
    tokens = jnp.asarray(rng.integers(1, MCFG.vocab_size, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None] < np.array([[T], [T - 5], [T - 70]]))
    needed = np.zeros((B, T), bool)
    needed[0, 3:9] = True  # block 0: one row needs a few tokens
    needed[1, 2 * TARGET_BLOCK + 1 :] = True  # block 2; block 1 needed by no row
    needed &= np.asarray(mask)
    needed = jnp.asarray(needed)
    full = policy_outputs(params, tokens, mask, MCFG, 0.7)
    blocked = policy_outputs(params, tokens, mask, MCFG, 0.7, needed=needed)
    block_used = np.asarray(needed).reshape(B, 3, TARGET_BLOCK).any(axis=(0, 2))
    assert block_used.tolist() == [True, False, True]
    for f, b in zip(full, blocked, strict=True):
        f, b = np.asarray(f), np.asarray(b)
        for j, used in enumerate(block_used):
            cols = slice(j * TARGET_BLOCK, (j + 1) * TARGET_BLOCK)
            if used:  # the whole block is computed, for every row
                np.testing.assert_allclose(b[:, cols], f[:, cols], atol=1e-5, rtol=0)
            else:
                assert not b[:, cols].any()
        assert not b[:, 0].any() and not f[:, 0].any()

    def masked_sum(p: Any, needed_arg: Any) -> jax.Array:
        logp, ent = policy_outputs(p, tokens, mask, MCFG, 0.7, needed=needed_arg)
        return jnp.sum((logp + 0.1 * ent) * needed)

    g_full = jax.grad(masked_sum)(params, None)
    g_blocked = jax.grad(masked_sum)(params, needed)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_blocked), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
