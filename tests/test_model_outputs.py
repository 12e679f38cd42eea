"""`policy_outputs` with `needed`: the vocabulary projection in blocks, unneeded blocks skipped."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import init_params
from rlver_jax.rl.model_outputs import TARGET_BLOCK, policy_outputs

MCFG = ModelConfig(
    family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "tie",
    [True, pytest.param(False, marks=pytest.mark.slow)],  # the default run's time limit
)
def test_blocked_outputs_equal_the_full_ones_where_needed_and_skip_the_rest(tie: bool) -> None:
    B, T = 3, 3 * TARGET_BLOCK
    rng = np.random.default_rng(0)
    mcfg = dataclasses.replace(MCFG, tie_word_embeddings=tie)
    params = init_params(mcfg, jax.random.key(0))
    tokens = jnp.asarray(rng.integers(1, MCFG.vocab_size, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None] < np.array([[T], [T - 5], [T - 70]]))
    needed = np.zeros((B, T), bool)
    needed[0, 3:9] = True  # block 0: one row needs a few tokens
    needed[1, 2 * TARGET_BLOCK + 1 :] = True  # block 2; block 1 needed by no row
    needed &= np.asarray(mask)
    needed = jnp.asarray(needed)
    outputs = jax.jit(lambda p, n: policy_outputs(p, tokens, mask, mcfg, 0.7, needed=n))
    full, blocked = outputs(params, None), outputs(params, needed)
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
        logp, ent = policy_outputs(p, tokens, mask, mcfg, 0.7, needed=needed_arg)
        return jnp.sum((logp + 0.1 * ent) * needed)

    grad = jax.jit(jax.grad(masked_sum))
    blocked_grad = grad.lower(params, needed).compile()
    g_full, g_blocked = grad(params, None), blocked_grad(params, needed)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_blocked), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
    # The backward keeps one head gradient, not a copy of the head per block (a [3, V, D]
    # or [3, D, V] buffer is what autodiff of the mapped, skipped blocks used to build).
    hlo = blocked_grad.as_text()
    V, D = mcfg.vocab_size, mcfg.hidden_size
    assert f"f32[3,{V},{D}]" not in hlo and f"f32[3,{D},{V}]" not in hlo
