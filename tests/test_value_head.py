"""The critic: backbone copied from the policy, scalar head, shapes, gradients, shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import forward, init_params, positions_from_mask
from rlver_jax.models.value_head import (
    init_value_params,
    value_forward,
    value_logical_axes,
    value_param_shapes,
)
from rlver_jax.parallel.rules import axis_rules, tree_shardings


def _config(tie: bool = False) -> ModelConfig:
    return ModelConfig(
        family="qwen2",
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        attention_bias=True,
        tie_word_embeddings=tie,
    )


def _batch(config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 7)))
    mask = jnp.ones((3, 7), bool).at[1, :3].set(False)
    return tokens, positions_from_mask(mask), mask


@pytest.mark.parametrize("tie", [False, True])
def test_init_copies_policy_backbone(tie: bool) -> None:
    config = _config(tie)
    policy = init_params(config, jax.random.key(0))
    critic = init_value_params(policy, config, jax.random.key(1))
    assert "lm_head" not in critic["backbone"]
    policy_body = {k: v for k, v in policy.items() if k != "lm_head"}
    assert jax.tree.structure(critic["backbone"]) == jax.tree.structure(policy_body)
    for ours, theirs in zip(
        jax.tree.leaves(critic["backbone"]), jax.tree.leaves(policy_body), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        assert ours.unsafe_buffer_pointer() != theirs.unsafe_buffer_pointer()  # a real copy
    kernel = np.asarray(critic["head"]["kernel"])
    assert kernel.shape == (config.hidden_size,) and 0 < np.abs(kernel).max() < 0.1
    assert critic["head"]["bias"].shape == ()
    shapes = value_param_shapes(config)
    assert jax.tree.map(lambda x: x.shape, critic) == jax.tree.map(lambda x: x.shape, shapes)


def test_values_shape_and_definition() -> None:
    config = _config()
    policy = init_params(config, jax.random.key(0))
    critic = init_value_params(policy, config, jax.random.key(1))
    tokens, positions, mask = _batch(config)
    values = value_forward(critic, tokens, positions, mask, config)
    assert values.shape == tokens.shape and values.dtype == jnp.float32
    hidden, _ = forward(policy, tokens, positions, mask, config, return_hidden=True)
    expected = np.asarray(hidden) @ np.asarray(critic["head"]["kernel"])
    np.testing.assert_allclose(np.asarray(values), expected, atol=1e-5)
    # Left padding does not change the values of the real tokens.
    alone = value_forward(critic, tokens[1:2, 3:], positions[1:2, 3:], mask[1:2, 3:], config)
    np.testing.assert_allclose(np.asarray(values[1, 3:]), np.asarray(alone[0]), atol=1e-5)


def test_gradient_reaches_backbone_and_head() -> None:
    config = _config()
    critic = init_value_params(init_params(config, jax.random.key(0)), config, jax.random.key(1))
    tokens, positions, mask = _batch(config)
    targets = jnp.linspace(-1.0, 1.0, tokens.size).reshape(tokens.shape)

    def loss(p: dict) -> jax.Array:
        v = value_forward(p, tokens, positions, mask, config)
        return jnp.sum(jnp.where(mask, (v - targets) ** 2, 0.0))

    grads = jax.jit(jax.grad(loss))(critic)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
    assert np.abs(np.asarray(grads["head"]["bias"])) > 0
    assert np.abs(np.asarray(grads["head"]["kernel"])).max() > 0
    for key in ("wq", "w_down"):
        assert np.abs(np.asarray(grads["backbone"]["layers"][key])).max() > 0
    assert np.abs(np.asarray(grads["backbone"]["embed"])).max() > 0


def test_logical_axes_give_shardings_on_a_mesh() -> None:
    config = _config()
    # Auto axes: the model places activations with sharding constraints (rules.constrain).
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    shardings = tree_shardings(value_logical_axes(config), value_param_shapes(config), mesh)
    critic = init_value_params(init_params(config, jax.random.key(0)), config, jax.random.key(1))
    placed = jax.device_put(critic, shardings)
    tokens, positions, mask = _batch(config)
    ref = value_forward(critic, tokens, positions, mask, config)
    with axis_rules(mesh):
        got = jax.jit(value_forward, static_argnums=4)(placed, tokens, positions, mask, config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    assert placed["head"]["kernel"].sharding.is_fully_replicated
