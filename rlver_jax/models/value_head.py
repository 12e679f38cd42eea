"""The critic for PPO: the policy's transformer backbone with a scalar value head.

The critic starts from the policy's weights (as in RLVER / OpenRLHF / verl), so that its features
already understand the dialogue, and replaces the vocab projection with one linear unit that reads
the final-norm hidden state of each token. Its params are a separate pytree (the critic trains on
its own optimizer), copied rather than shared so that donating the policy's buffers in a jitted
train step can never invalidate the critic's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import Params, forward, param_logical_axes, param_shapes


def _without_lm_head(tree: Params) -> Params:
    return {k: v for k, v in tree.items() if k != "lm_head"}


def init_value_params(policy_params: Params, config: ModelConfig, key: jax.Array) -> Params:
    """{"backbone": copy of the policy params without lm_head, "head": {"kernel", "bias"}}.

    The head kernel is small random N(0, 1/(D+1)^2) (OpenRLHF's value-head init) rather than
    exactly zero: values start near zero, yet gradients reach the backbone from the first step.
    """
    backbone = jax.tree.map(lambda x: jnp.array(x, copy=True), _without_lm_head(policy_params))
    D = config.hidden_size
    head_dtype = jnp.dtype(config.param_dtype)
    kernel = jax.random.normal(key, (D,), jnp.float32) / (D + 1)
    return {
        "backbone": backbone,
        "head": {"kernel": kernel.astype(head_dtype), "bias": jnp.zeros((), head_dtype)},
    }


def value_logical_axes(config: ModelConfig) -> Params:
    """Logical axes of the critic's params (the head is tiny: replicated like a norm scale)."""
    return {
        "backbone": _without_lm_head(param_logical_axes(config)),
        "head": {"kernel": ("norm",), "bias": ()},
    }


def value_param_shapes(config: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` of every critic weight (for shardings and checkpoint restore)."""
    dtype = jnp.dtype(config.param_dtype)
    return {
        "backbone": _without_lm_head(param_shapes(config)),
        "head": {
            "kernel": jax.ShapeDtypeStruct((config.hidden_size,), dtype),
            "bias": jax.ShapeDtypeStruct((), dtype),
        },
    }


def value_forward(
    value_params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    token_mask: jax.Array,
    config: ModelConfig,
    **forward_kwargs: Any,
) -> jax.Array:
    """Per-token values [B, T] float32: V(prefix up to and including token t).

    Padded positions get a value too (the head is applied everywhere); losses mask them out.
    """
    hidden, _ = forward(
        value_params["backbone"],
        tokens,
        positions,
        token_mask,
        config,
        return_hidden=True,
        **forward_kwargs,
    )
    head = value_params["head"]
    values = jnp.einsum(
        "btd,d->bt",
        hidden.astype(jnp.float32),
        head["kernel"].astype(jnp.float32),
        preferred_element_type=jnp.float32,
    )
    return values + head["bias"].astype(jnp.float32)
