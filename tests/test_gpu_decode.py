"""The fused Pallas decode step (`models.gpu_decode`): parity with `decode_step.decode_step` in
Pallas' interpret mode, its lowering to Triton kernels for CUDA (on this CPU machine), the
sampler's use of it, and the errors where it cannot run."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.config_io import ConfigError, from_dict, to_dict
from rlver_jax.kernels import select
from rlver_jax.kernels.gpu import decode as gpu_decode
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import decode_step, decode_weights
from rlver_jax.models.kv_cache import as_bits, cache_values, init_cache
from rlver_jax.models.transformer import forward, param_shapes
from rlver_jax.parallel import MeshConfig, make_mesh
from rlver_jax.sampling.sampler import Sampler, SamplerConfig
from tests.helpers import BUCKETS, PROMPTS, random_params, unstack_cache

# Widths that are not powers of two (hidden 96 = 64 + 32, MLP 160 = 128 + 32) and 3 query heads
# per kv head, as SmolLM2 has (576, 1536, 3): the kernels' pieces and padded head groups.
CONFIG = ModelConfig(
    family="llama", vocab_size=128, hidden_size=96, intermediate_size=160, num_layers=2,
    num_heads=6, num_kv_heads=2, head_dim=16,
)  # fmt: skip


def test_pieces_and_blocks() -> None:
    assert gpu_decode._pieces(576) == ((0, 512), (512, 64))
    assert gpu_decode._pieces(1536) == ((0, 1024), (1024, 512))
    assert gpu_decode._pieces(896) == ((0, 512), (512, 256), (768, 128))
    assert gpu_decode._pieces(64) == ((0, 64),)
    assert gpu_decode._block(384, 32) == 32 and gpu_decode._block(10, 32) == 2
    assert gpu_decode._block(576, 16) == 16 and gpu_decode._block(96, 100) == 32


@pytest.mark.parametrize(
    ("dtype", "tie", "bias", "heads"),
    [
        ("float32", False, True, 6),
        pytest.param("bfloat16", True, False, 6, marks=pytest.mark.slow),
        pytest.param("float32", True, True, 14, marks=pytest.mark.slow),  # 7 a group: Qwen2.5's
    ],
)
def test_fused_step_equals_decode_step(dtype: str, tie: bool, bias: bool, heads: int) -> None:
    """Two decode steps of the fused kernels (interpret mode) == `decode_step`'s, from a cache
    a prefill left with a left-padded row: logits and both caches (bf16 ones held as bits), to
    float32 / bf16 rounding."""
    config = dataclasses.replace(
        CONFIG, dtype=dtype, param_dtype=dtype, tie_word_embeddings=tie, attention_bias=bias,
        num_heads=heads,
    )  # fmt: skip
    params = random_params(config, seed=int(tie))
    B, P = 3, 6
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (B, P + 2)))
    pos = jnp.broadcast_to(jnp.arange(P + 2), (B, P + 2))
    key_mask = jnp.ones((B, P), bool).at[0, :2].set(False)  # row 0 left-padded
    _, cache = forward(params, tokens[:, :P], pos[:, :P], key_mask, config,
                       init_cache(config, B, P + 4))  # fmt: skip
    weights = decode_weights(params, config)
    want_cache = got_cache = as_bits(unstack_cache(cache))
    assert (want_cache.k[0].dtype == jnp.uint16) == (dtype == "bfloat16")
    reference = jax.jit(lambda w, t, p, c: decode_step(w, t, p, c, config))
    fused = jax.jit(lambda w, t, p, c: gpu_decode.decode_step(w, t, p, c, config))
    atol = 1e-5 if dtype == "float32" else 0.08
    for t in (P, P + 1):
        want, want_cache = reference(weights, tokens[:, t], pos[:, t], want_cache)
        got, got_cache = fused(weights, tokens[:, t], pos[:, t], got_cache)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=0)
    assert int(got_cache.end) == P + 2
    np.testing.assert_array_equal(np.asarray(got_cache.key_mask), np.asarray(want_cache.key_mask))
    for got_buf, want_buf in zip(
        got_cache.k + got_cache.v, want_cache.k + want_cache.v, strict=True
    ):
        assert got_buf.dtype == want_buf.dtype
        np.testing.assert_allclose(
            np.asarray(cache_values(got_buf), np.float32),
            np.asarray(cache_values(want_buf), np.float32),
            atol=atol,
        )


def test_lowers_to_five_triton_kernels_a_layer_for_cuda() -> None:
    """Lowered for CUDA here (no GPU needed): each layer is 5 Triton calls, and the one writing
    the cache aliases both cache buffers (an update in place, not a copy per step)."""
    config = dataclasses.replace(CONFIG, num_layers=3, attention_bias=True)
    weights = jax.eval_shape(lambda p: decode_weights(p, config), param_shapes(config))
    cache = jax.eval_shape(lambda: unstack_cache(init_cache(config, 2, 24)))
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)

    def step(w: dict, t: jax.Array, p: jax.Array, c: Any) -> Any:
        return gpu_decode.decode_step(w, t, p, c, config, interpret=False)

    traced = jax.jit(step, donate_argnums=(3,)).trace(weights, ids, ids, cache)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    # the layers share one lowered function (so each kernel is lowered once), called per layer
    assert text.count("@__gpu$xla.gpu.triton") == 5
    assert text.count("#stablehlo.output_operand_alias<") == 2
    assert len(re.findall(r"call @layer\b", text)) == config.num_layers


def test_sampler_pallas_decode_gives_the_unrolled_tokens() -> None:
    """The sampler with `decode: pallas` (interpret mode on CPU) samples what the unrolled XLA
    decode samples, greedily and at temperature 1 with one seed."""
    params = random_params(CONFIG, seed=3)
    outs = []
    for pallas in (False, True):
        decode = "pallas" if pallas else "unrolled"
        sampler_config = dataclasses.replace(BUCKETS, decode=decode)
        sampler = Sampler(CONFIG, pad_id=0, sampler_config=sampler_config, seed=5)
        assert sampler.decode.impl == decode and (sampler.decode.blocks is not None) == pallas
        greedy = sampler(params, PROMPTS, max_new_tokens=6, temperature=0.0)
        sampled = sampler(params, PROMPTS, max_new_tokens=6, temperature=1.0)
        outs.append((greedy, sampled))
    for want, got in zip(outs[0], outs[1], strict=True):
        assert got.sequences() == want.sequences()
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_pallas_decode_where_it_cannot_run_fails_early() -> None:
    """`sampler.decode: pallas` on a mesh or for a model the kernels do not fuse is a config
    error naming the knob and the reason, raised when the sampler is made."""
    fused = dataclasses.replace(BUCKETS, decode="pallas")
    with pytest.raises(select.BackendError, match="not partitioned"):
        Sampler(CONFIG, mesh=make_mesh(MeshConfig(data=2, fsdp=1, tensor=4)),
                sampler_config=fused)  # fmt: skip
    with pytest.raises(select.BackendError, match=r"sampler\.decode=pallas.*Qwen3"):
        Sampler(dataclasses.replace(CONFIG, qk_norm=True), sampler_config=fused)
    assert gpu_decode.supported(dataclasses.replace(CONFIG, head_dim=24)) is not None
    with pytest.raises(ConfigError, match=r"replaced by sampler\.decode"):
        from_dict(SamplerConfig, {"pallas_decode": True})
    with pytest.raises(ConfigError, match=r"sampler\.decode must be one of"):
        SamplerConfig(decode="fused")


def test_pallas_blocks_from_a_config_and_their_checks() -> None:
    """`sampler.pallas_blocks` reads from a config dict (as from YAML); sizes must be powers
    of two."""
    sampler = from_dict(
        SamplerConfig, {"decode": "pallas", "pallas_blocks": {"slots": 64, "num_warps": 8}}
    )
    assert sampler.pallas_blocks == gpu_decode.Blocks(slots=64, num_warps=8)
    assert to_dict(sampler)["pallas_blocks"]["qkv_rows"] == gpu_decode.BLOCKS.qkv_rows
    with pytest.raises(ValueError, match=r"pallas_blocks\.out_rows must be a power of two"):
        gpu_decode.Blocks(out_rows=12)
    with pytest.raises(ValueError, match="num_warps must be <= 32"):
        gpu_decode.Blocks(num_warps=64)


@pytest.mark.slow  # ~20 s of interpret-mode compiles; the default run has the sampler test
def test_sampler_keeps_xla_step_above_max_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch buckets up to `gpu_decode.MAX_BATCH` trace the fused step; larger ones XLA's."""
    traced: list[int] = []
    fused_step = gpu_decode.decode_step

    def spy(weights: Any, tokens: jax.Array, *args: Any) -> Any:
        traced.append(tokens.shape[0])
        return fused_step(weights, tokens, *args)

    monkeypatch.setattr(gpu_decode, "decode_step", spy)
    monkeypatch.setattr(gpu_decode, "MAX_BATCH", 2)
    config = dataclasses.replace(CONFIG, vocab_size=136)  # its own compiled programs
    sampler_config = dataclasses.replace(BUCKETS, batch_buckets=(2, 4), decode="pallas")
    sampler = Sampler(config, pad_id=0, sampler_config=sampler_config)
    params = random_params(config)
    small = sampler(params, PROMPTS[:2], max_new_tokens=3, temperature=0.0)
    large = sampler(params, PROMPTS, max_new_tokens=3, temperature=0.0)
    assert traced == [2]
    assert large.sequences()[:2] == small.sequences()
