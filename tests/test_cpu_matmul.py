"""The compiled CPU projection kernel: the packed layout, parity with numpy, the packed decode
step against the unpacked one, and the sampler's use of it."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.kernels.cpu import matmul as cpu_matmul
from rlver_jax.kernels.cpu.decode_ops import PACKED_KERNEL_OPS, XLA_CPU_OPS
from rlver_jax.kernels.cpu.matmul import packable_config
from rlver_jax.models.decode_step import decode_step, decode_weights
from rlver_jax.models.kv_cache import init_cache
from rlver_jax.models.transformer import forward
from rlver_jax.parallel import MeshConfig, make_mesh
from rlver_jax.sampling.sampler import Sampler
from tests.helpers import BUCKETS, CONFIG, random_params, unstack_cache

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="no C++ compiler: the sampler keeps XLA's projections"
)


def test_pack_layout_and_rows() -> None:
    w = jnp.arange(32 * 5, dtype=jnp.float32).reshape(32, 5)
    packed = np.asarray(cpu_matmul.pack(w))
    assert packed.shape == (2, 5, 16)
    for t, d, c in [(0, 0, 0), (1, 3, 7), (1, 4, 15), (0, 2, 9)]:
        assert packed[t, d, c] == w[16 * t + c, d]
    ids = jnp.asarray([0, 17, 31, 16, 5])
    np.testing.assert_array_equal(cpu_matmul.take_rows(cpu_matmul.pack(w), ids), w[ids])


def test_pack_and_project_reject_what_the_kernel_cannot_take() -> None:
    with pytest.raises(ValueError, match=r"shape \(24, 5\)"):
        cpu_matmul.pack(jnp.zeros((24, 5)))  # 24 rows: not whole 16-row tiles
    with pytest.raises(ValueError, match="float16"):
        cpu_matmul.pack(jnp.zeros((16, 5), jnp.float16))
    with pytest.raises(ValueError, match="does not multiply"):
        cpu_matmul.project(cpu_matmul.pack(jnp.zeros((16, 5))), jnp.zeros((6, 2)))


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("F", "D", "B"),
    [
        (16, 7, 1),
        (48, 300, 2),
        (160, 1030, 5),  # D spans several 8 KB weight blocks (float32 128 rows, bf16 256)
        (64, 96, 8),  # two register tiles of 4 rows
        (32, 40, 13),  # 5 + 4 + 4 rows
        (4096, 64, 32),  # many tiles: shared between threads
        (4096, 576, 1),
    ],
)
def test_project_equals_numpy(dtype: str, F: int, D: int, B: int) -> None:
    """out = w @ x accumulated in float32 (bf16 weights widened exactly), to float32 rounding."""
    assert cpu_kernels.available()
    rng = np.random.default_rng(F + D + B)
    w = jnp.asarray(rng.normal(size=(F, D)), dtype)
    x = jnp.asarray(rng.normal(size=(D, B)), jnp.float32)
    got = jax.jit(cpu_matmul.project)(cpu_matmul.pack(w), x)
    want = np.asarray(w, np.float64) @ np.asarray(x, np.float64)
    assert got.shape == (F, B) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * D)
    again = jax.jit(cpu_matmul.project)(cpu_matmul.pack(w), x)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))  # a fixed order per output


@needs_compiler
@pytest.mark.parametrize(("tie", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_packed_decode_step_equals_unpacked(tie: bool, dtype: str) -> None:
    """`decode_step` over packed weights (projections and head through the kernel) == over the
    plain ones (XLA's dots): logits and the cache it writes, to float32 / bf16 rounding."""
    config = dataclasses.replace(
        CONFIG, tie_word_embeddings=tie, dtype=dtype, param_dtype=dtype, attention_bias=True
    )
    assert packable_config(config) and cpu_kernels.available()
    params = random_params(config, seed=int(tie))
    B, P = 3, 6
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (B, P + 2)))
    pos = jnp.broadcast_to(jnp.arange(P + 2), (B, P + 2))
    _, cache = forward(params, tokens[:, :P], pos[:, :P], jnp.ones((B, P), bool), config,
                       init_cache(config, B, P + 4))  # fmt: skip
    plain = decode_weights(params, config)
    packed = decode_weights(params, config, PACKED_KERNEL_OPS.pack)
    assert packed["layers"][0]["wqkv"].ndim == 3 and packed["lm_head"].ndim == 3
    ops = {"plain": XLA_CPU_OPS, "packed": PACKED_KERNEL_OPS}
    step = jax.jit(
        lambda w, t, p, c, kind: decode_step(w, t, p, c, config, ops[kind]), static_argnums=4
    )
    a_cache = b_cache = unstack_cache(cache)
    atol = 2e-5 if dtype == "float32" else 0.1
    for t in (P, P + 1):
        a, a_cache = step(plain, tokens[:, t], pos[:, t], a_cache, "plain")
        b, b_cache = step(packed, tokens[:, t], pos[:, t], b_cache, "packed")
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol, rtol=0)
    for i in range(config.num_layers):
        np.testing.assert_allclose(np.asarray(b_cache.k[i], np.float32),
                                   np.asarray(a_cache.k[i], np.float32), atol=atol)  # fmt: skip


def test_packable_config() -> None:
    assert packable_config(CONFIG)
    assert not packable_config(dataclasses.replace(CONFIG, vocab_size=120))
    assert not packable_config(dataclasses.replace(CONFIG, intermediate_size=100))
    assert not packable_config(dataclasses.replace(CONFIG, param_dtype="float16"))


def test_the_projection_kernel_only_where_the_weights_pack() -> None:
    """`cpu_kernels` packs the weights for the projection kernel only where they pack; other
    models keep XLA's dots beside the attention kernel (the sampler's choice, no error)."""
    odd = dataclasses.replace(CONFIG, vocab_size=120)
    plan = Sampler(odd, sampler_config=dataclasses.replace(BUCKETS, decode="cpu_kernels")).decode
    assert plan.impl == "cpu_kernels" and not plan.packed and "do not pack" in plan.why
    assert Sampler(CONFIG, sampler_config=BUCKETS).decode.packed  # auto on one CPU device
    sharded = Sampler(CONFIG, mesh=make_mesh(MeshConfig(data=8, fsdp=1, tensor=1)))
    assert not sharded.decode.packed
