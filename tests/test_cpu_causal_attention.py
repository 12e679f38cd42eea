"""The compiled causal attention of a prefill (`cpu_causal_attention`): parity with XLA's form,
where it applies, and the sampler's prefill running it."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.kernels import select
from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.kernels.cpu import causal_attention as cpu_causal_attention
from rlver_jax.models.attention import attention
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import attention_mask
from rlver_jax.sampling import sampler as sampling
from tests.helpers import BUCKETS, CONFIG, PAD, random_params

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="no C++ compiler: the prefill keeps XLA's attention"
)


def _case(B: int, T: int, K: int, G: int, Dh: int, pad: int, seed: int = 0) -> tuple:
    """q, k, v (cache layouts), the causal mask [B,T,T] with row b left-padded by b * pad
    tokens, its token mask, and a config of that shape."""
    rng = np.random.default_rng(seed)
    config = ModelConfig(
        family="llama", vocab_size=8, hidden_size=K * G * Dh, intermediate_size=8, num_layers=1,
        num_heads=K * G, num_kv_heads=K, head_dim=Dh,
    )  # fmt: skip
    q = jnp.asarray(rng.normal(size=(B, T, K * G, Dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, Dh, T)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, T, Dh)), jnp.float32)
    tokens = np.ones((B, T), bool)
    for b in range(B):
        tokens[b, : b * pad] = False
    return q, k, v, attention_mask(jnp.asarray(tokens)), tokens, config


@pytest.mark.parametrize(
    ("B", "T", "K", "G", "Dh", "pad"),
    [
        (2, 37, 2, 3, 16, 3),  # 37 keys: a partial last key tile; tiles of 6 rows span tokens
        (3, 64, 3, 3, 64, 5),  # SmolLM2's heads
        (1, 5, 4, 1, 32, 0),  # one query a kv head; fewer tokens than a tile
        (2, 259, 3, 3, 64, 7),  # a 256-token prompt + a 3-token forced prefix
        (1, 17, 1, 2, 128, 1),
        (4, 200, 2, 2, 16, 60),  # many work items: split over the threads
    ],
)
def test_kernel_equals_xla_causal_attention(
    B: int, T: int, K: int, G: int, Dh: int, pad: int
) -> None:
    """Every query that sees a key matches XLA's form to float32 rounding (whole and in causal
    blocks); padding queries, which see none, get zeros."""
    assert cpu_kernels.available()
    q, k, v, mask, tokens, config = _case(B, T, K, G, Dh, pad)
    got = np.asarray(jax.jit(cpu_causal_attention.causal_attention)(q, k, v, mask))
    real = tokens[:, :, None, None]
    for block in (0, 16):
        c = config.replace(attention="xla_causal", causal_block=block)
        want = np.asarray(jax.jit(lambda *a, c=c: attention(*a, c, causal=True))(q, k, v, mask))
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=5e-6)
    assert not np.any(np.where(real, 0, got))


def test_attention_routes_causal_calls_to_the_kernel_and_select_gives_it_where_it_applies():
    """``ModelConfig.attention == "cpu_kernel"`` sends causal calls to the kernel (its zeros on
    the padding queries show it ran) and non-causal ones to XLA's form; the kernel declares
    what it supports (float32, head dims of 16 n, one CPU device), and `kernels.select` gives it
    to a prefill under auto only there (bf16: XLA's causal blocks; training: XLA's form)."""
    q, k, v, mask, tokens, config = _case(2, 24, 2, 2, 16, 4)
    on = config.replace(attention="cpu_kernel")
    pad = ~tokens[:, :, None, None]
    run = jax.jit(lambda *a, c=on, causal=True: attention(*a, c, causal=causal))
    assert not np.any(np.where(pad, np.asarray(run(q, k, v, mask)), 0))  # the kernel's zeros
    xla = jax.jit(lambda *a: attention(*a, on))(q, k, v, mask)  # not causal: XLA averages
    assert np.any(np.where(pad, np.asarray(xla), 0))
    supports = cpu_causal_attention.supports
    assert supports(config, "cpu", 1) is None
    assert "float32" in supports(config.replace(dtype="bfloat16"), "cpu", 1)
    assert "head_dim 20" in supports(_case(1, 8, 1, 1, 20, 0)[-1], "cpu", 1)
    assert "one CPU device" in supports(config, "cpu", 8)
    auto, cpu = config.replace(attention="auto"), select.Target("cpu", 1)
    assert select.attention_choice(auto, "prefill", cpu).impl == "cpu_kernel"
    bf16 = auto.replace(dtype="bfloat16")
    assert select.attention_choice(bf16, "prefill", cpu).impl == "xla_causal"
    assert select.attention_choice(auto, "train", cpu).impl == "xla"
    assert select.attention_choice(auto, "prefill", select.Target("gpu", 1)).impl == "xla"
    with pytest.raises(select.BackendError, match="no backward pass"):
        select.attention_choice(on, "train", cpu)
    with pytest.raises(select.BackendError, match="float32"):
        select.attention_choice(on.replace(dtype="bfloat16"), "prefill", cpu)


@pytest.mark.parametrize("kernel", [True, False])
def test_sampler_prefill_runs_the_kernel_when_its_option_is_on(kernel: bool) -> None:
    """The prefill program holds the kernel's custom call exactly when the sampler's prefill
    attention resolved to it (auto on one CPU device in float32; xla_causal chosen: none)."""
    model = CONFIG.replace(attention="auto" if kernel else "xla_causal")
    sampler = sampling.Sampler(model, pad_id=PAD, sampler_config=BUCKETS)
    assert (sampler.prefill_config.attention == "cpu_kernel") == kernel
    B, P, N = 4, 16, 16
    plan = sampler.decode
    pre = sampling._jitted(model, sampler.prefill_config, None, (), 256, PAD, plan.unrolled,
                           plan.ops, None, B, P, N)[0]  # fmt: skip
    S = jax.ShapeDtypeStruct
    settings = sampling.Settings(
        S((B,), jnp.float32), S((B,), jnp.float32), S((B,), jnp.int32),
        S((sampling.MAX_STOP_IDS,), jnp.int32), S((), jnp.int32),
    )  # fmt: skip
    args = (S((B, P), jnp.int32), S((B, P), jnp.bool_), S((0,), jnp.int32), S((B,), jnp.bool_),
            settings, S((), jnp.int32))  # fmt: skip
    hlo = pre.lower(jax.eval_shape(lambda: random_params(CONFIG, std=0.5)), *args).as_text()
    assert ("rlver_causal_attention_f32" in hlo) == kernel
