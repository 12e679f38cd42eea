"""Per-program XLA options: the sampler's prefill is compiled without YNNPACK dots on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import XLA_OPS
from rlver_jax.models.transformer import init_params
from rlver_jax.parallel.compiler_options import large_gemm_options, platform_of
from rlver_jax.sampling.sampler import MAX_STOP_IDS, Settings, _jitted

YNN = "__ynn_fusion"
CFG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8,
)  # fmt: skip


def test_options_by_platform() -> None:
    assert large_gemm_options("gpu") == {} and large_gemm_options("tpu") == {}
    assert large_gemm_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert platform_of(None) == jax.default_backend()
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    assert platform_of(mesh) == jax.devices()[0].platform


def test_prefill_compiles_without_ynnpack_dots_and_decode_with_them() -> None:
    """The option reaches XLA (a renamed flag would leave YNNPACK fusions in the prefill) and
    only the prefill program gets it."""
    if jax.default_backend() != "cpu":
        return
    B, P, N = 2, 8, 4
    pre, dec, _ = _jitted(CFG, CFG, None, (), 16, 0, False, XLA_OPS, None, B, P, N)
    params = init_params(CFG, jax.random.key(0))
    settings = Settings(
        temperature=jnp.zeros((B,)), top_p=jnp.ones((B,)), top_k=jnp.zeros((B,), jnp.int32),
        stop_ids=jnp.full((MAX_STOP_IDS,), -1, jnp.int32), max_new=jnp.int32(N),
    )  # fmt: skip
    args = (
        jnp.ones((B, P), jnp.int32), jnp.ones((B, P), bool), jnp.zeros((0,), jnp.int32),
        jnp.ones((B,), bool), settings, jnp.int32(0),
    )  # fmt: skip
    pre_hlo = pre.lower(params, *args).compile().as_text()
    assert "dot(" in pre_hlo and YNN not in pre_hlo
    state = pre(params, *args)
    assert YNN in dec.lower(params, state).compile().as_text()
    np.testing.assert_array_equal(np.asarray(state.positions), P)
