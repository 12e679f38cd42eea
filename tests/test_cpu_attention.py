"""The compiled CPU attention kernel: parity with XLA's form, the sampler's use of it; the CPU
kernels' build (`cpu_kernels`)."""

from __future__ import annotations

import dataclasses
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.kernels import select
from rlver_jax.kernels.cpu import attention as cpu_attention
from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.kernels.cpu.decode_ops import KERNEL_OPS, XLA_CPU_OPS
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import decode_step, decode_weights, one_query_attention
from rlver_jax.models.kv_cache import as_bits, cache_values, init_cache
from rlver_jax.models.transformer import forward, param_shapes
from rlver_jax.parallel import MeshConfig, make_mesh
from rlver_jax.sampling.sampler import Sampler
from tests.helpers import BUCKETS, CONFIG, PAD, PROMPTS, random_params, unstack_cache

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="no C++ compiler: the sampler keeps XLA's attention"
)


def _case(B: int, K: int, G: int, S: int, dtype: str, seed: int = 0, Dh: int = 16) -> tuple:
    """q, k, v, mask [B,1,S] with left padding, an unwritten tail, a hole and (row 1) nothing."""
    rng = np.random.default_rng(seed)
    config = ModelConfig(
        family="llama", vocab_size=8, hidden_size=K * G * Dh, intermediate_size=8, num_layers=1,
        num_heads=K * G, num_kv_heads=K, head_dim=Dh, dtype=dtype,
    )  # fmt: skip
    q = jnp.asarray(rng.normal(size=(B, 1, K * G, Dh)), dtype)
    k = jnp.asarray(rng.normal(size=(B, K, Dh, S)) * 2, dtype)
    v = jnp.asarray(rng.normal(size=(B, K, S, Dh)), dtype)
    mask = np.ones((B, 1, S), bool)
    mask[:, :, S - 5 :] = False  # slots not written yet
    mask[0, :, :7] = False  # left padding
    mask[-1, :, S // 2] = False  # a hole inside the span
    if B > 1:
        mask[1] = False  # no slot at all: XLA's softmax is uniform over every slot
    return q, k, v, jnp.asarray(mask), config


@needs_compiler
@pytest.mark.parametrize(
    ("dtype", "B", "K", "G", "S", "Dh", "atol"),
    [
        ("float32", 3, 2, 3, 40, 16, 2e-6),
        ("float32", 1, 3, 1, 9, 16, 2e-6),
        ("float32", 16, 2, 2, 512, 16, 2e-6),  # 16 MB of cache: split over threads
        # 7 queries a kv head (query groups 3 + 3 + 1), 64 columns (4-vector output blocks)
        ("float32", 2, 2, 7, 70, 64, 2e-6),
        ("float32", 2, 1, 4, 33, 20, 2e-6),  # 20 columns: 8 + 8 + 4 one at a time
        ("bfloat16", 3, 2, 3, 40, 16, 2e-2),  # XLA's form rounds the probabilities to bf16 too
        ("bfloat16", 2, 2, 7, 70, 64, 2e-2),
    ],
)
def test_kernel_equals_xla_one_query_attention(
    dtype: str, B: int, K: int, G: int, S: int, Dh: int, atol: float
) -> None:
    assert cpu_kernels.available()
    q, k, v, mask, config = _case(B, K, G, S, dtype, Dh=Dh)
    want = jax.jit(lambda *a: one_query_attention(*a, config))(q, k, v, mask)
    got = jax.jit(lambda *a: cpu_attention.one_query_attention(*a, config))(q, k, v, mask)
    assert got.dtype == want.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=0
    )


@needs_compiler
def test_kernel_rejects_other_cache_dtypes() -> None:
    q, k, v, mask, config = _case(2, 2, 2, 8, "float32")
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_attention.one_query_attention(q, k.astype(jnp.float16), v.astype(jnp.float16), mask,
                                          config)  # fmt: skip


@needs_compiler
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("vocab", [CONFIG.vocab_size, CONFIG.vocab_size - 1])
def test_sampler_with_the_kernels_matches_xla(vocab: int, temperature: float) -> None:
    """`sampler.decode: cpu_kernels` (auto on one CPU device) against `unrolled` (XLA's forms):
    same tokens, logprobs to 1e-4; with both kernels, and with the attention kernel alone where
    the weights do not pack (a vocabulary that is not a multiple of 16)."""
    config = CONFIG.replace(vocab_size=vocab)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32), param_shapes(config)
    )
    with_kernel = Sampler(config, pad_id=PAD, sampler_config=BUCKETS)
    xla = Sampler(
        config, pad_id=PAD, sampler_config=dataclasses.replace(BUCKETS, decode="unrolled")
    )
    assert with_kernel.decode.impl == "cpu_kernels" and xla.decode.impl == "unrolled"
    assert with_kernel.decode.ops.attention is cpu_attention.one_query_attention
    assert with_kernel.decode.packed == (vocab == CONFIG.vocab_size)
    assert not xla.decode.packed and xla.decode.ops.attention is one_query_attention
    a = with_kernel(params, PROMPTS, max_new_tokens=12, temperature=temperature, seed=3)
    b = xla(params, PROMPTS, max_new_tokens=12, temperature=temperature, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_requiring_the_kernels_where_they_cannot_run_fails_early() -> None:
    """An explicit `cpu_kernels` on a mesh is a config error naming the knob; auto keeps XLA's
    forms there (unrolled on a CPU mesh, the scan on an accelerator)."""
    required = dataclasses.replace(BUCKETS, decode="cpu_kernels")
    with pytest.raises(select.BackendError, match=r"sampler\.decode=cpu_kernels.*one CPU device"):
        Sampler(CONFIG, mesh=make_mesh(MeshConfig(data=2, fsdp=1, tensor=4)),
                sampler_config=required)  # fmt: skip
    sharded = Sampler(CONFIG, mesh=make_mesh(MeshConfig(data=8, fsdp=1, tensor=1)))
    assert sharded.decode.impl == "unrolled" and not sharded.decode.packed
    assert select.decode_choice("auto", CONFIG, select.Target("gpu", 1)).impl == "scan"
    assert select.decode_choice("auto", CONFIG, select.Target("tpu", 8)).impl == "scan"


def test_build_errors_name_the_compiler(tmp_path) -> None:
    with pytest.raises(
        cpu_kernels.KernelBuildError, match=re.escape("no C++ compiler 'no-such-cxx'")
    ):
        cpu_kernels.build("no-such-cxx", tmp_path)
    with pytest.raises(cpu_kernels.KernelBuildError, match="failed"):
        cpu_kernels.build("false", tmp_path)  # a "compiler" that exits 1
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_build_is_cached_by_key(tmp_path) -> None:
    """A build is reused for the same key and redone for another compiler (a stand-in compiler
    that writes its -o file and counts its runs: the real build is what `available()` tests)."""
    log = tmp_path / "runs"
    fake = tmp_path / "fake-cxx"
    fake.write_text(
        '#!/bin/sh\necho run >> "$(dirname "$0")/runs"\n'
        'while [ "$1" != "-o" ]; do shift; done\ntouch "$2"\n'
    )
    fake.chmod(0o755)
    first = cpu_kernels.build(str(fake), tmp_path)
    stamp = first.stat().st_mtime_ns
    again = cpu_kernels.build(str(fake), tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert first.parent == tmp_path / "kernels" and first.suffix == ".so"
    assert log.read_text().count("run") == 1
    other = tmp_path / "other-cxx"
    other.write_text(fake.read_text())
    other.chmod(0o755)
    assert cpu_kernels.build(str(other), tmp_path) != first  # the compiler is in the key
    assert log.read_text().count("run") == 2


@needs_compiler
def test_bf16_cache_held_as_bits_decodes_the_same() -> None:
    """A bf16 per-layer cache held as uint16 bits (`as_bits`, the sampler's form: XLA:CPU writes
    integer slots in place) gives the same logits and cache as the bf16 cache, with XLA's
    attention and with the kernel."""
    config = dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_params(CONFIG, std=0.5))
    B, P = 2, 5
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (B, P + 2)))
    pos = jnp.broadcast_to(jnp.arange(P + 2), (B, P + 2))
    _, cache = forward(params, tokens[:, :P], pos[:, :P], jnp.ones((B, P), bool), config,
                       init_cache(config, B, P + 4))  # fmt: skip
    weights = decode_weights(params, config)
    plain = unstack_cache(cache)
    bits = as_bits(plain)
    assert bits.k[0].dtype == jnp.uint16 and plain.k[0].dtype == jnp.bfloat16
    for ops in (XLA_CPU_OPS, KERNEL_OPS):
        step = jax.jit(lambda w, t, p, c, o=ops: decode_step(w, t, p, c, config, o))
        a_cache, b_cache = plain, bits
        for t in (P, P + 1):
            a, a_cache = step(weights, tokens[:, t], pos[:, t], a_cache)
            b, b_cache = step(weights, tokens[:, t], pos[:, t], b_cache)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for i in range(config.num_layers):
            np.testing.assert_array_equal(cache_values(b_cache.k[i]), a_cache.k[i])
            np.testing.assert_array_equal(cache_values(b_cache.v[i]), a_cache.v[i])
