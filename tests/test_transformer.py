"""Logits parity with transformers' torch models, KV-cache decoding, scan/remat/bf16 options."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.models.attention import attention
from rlver_jax.models.config import ModelConfig, ModelConfigError
from rlver_jax.models.decode_step import (
    decode_step,
    decode_weight_logical_axes,
    decode_weights,
    one_query_attention,
)
from rlver_jax.models.kv_cache import init_cache
from rlver_jax.models.transformer import (
    apply_rope,
    attention_mask,
    forward,
    init_params,
    param_logical_axes,
    param_shapes,
    positions_from_mask,
    rope_tables,
)
from rlver_jax.parallel import MeshConfig, make_mesh
from rlver_jax.parallel.rules import named_sharding
from tests.helpers import params_from_torch, tiny_torch_model, torch_logits, unstack_cache

FAMILIES = ["llama", "qwen2", "qwen3"]


def _config_of(model, **runtime) -> ModelConfig:
    return ModelConfig.from_hf_dict(model.config.to_dict()).replace(**runtime)


def _run(params, tokens, mask, config):
    pos = positions_from_mask(jnp.asarray(mask))
    logits, _ = forward(params, jnp.asarray(tokens), pos, jnp.asarray(mask), config)
    return np.asarray(logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(family: str, tie: bool) -> None:
    model = tiny_torch_model(family, tie=tie)
    config = _config_of(model)
    assert config.family == family and config.tie_word_embeddings == tie
    params = params_from_torch(model, config)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, (2, 11))
    mask = np.ones_like(tokens)
    ours = _run(params, tokens, mask, config)
    ref = torch_logits(model, tokens, mask)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_transformers(family: str) -> None:
    model = tiny_torch_model(family, seed=3)
    config = _config_of(model)
    params = params_from_torch(model, config)
    rng = np.random.default_rng(2)
    lengths = [9, 5, 1]
    T = max(lengths)
    tokens = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, T - n :] = rng.integers(1, config.vocab_size, n)
        mask[row, T - n :] = 1
    ours = _run(params, tokens, mask, config)
    ref = torch_logits(model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    # Each padded row equals the same sequence run alone, unpadded.
    for row, n in enumerate(lengths):
        alone = _run(params, tokens[row : row + 1, T - n :], mask[row : row + 1, T - n :], config)
        np.testing.assert_allclose(ours[row, T - n :], alone[0], atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matches_transformers() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_torch_model("llama", rope_scaling=scaling, rope_theta=500000.0)
    config = _config_of(model)
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    params = params_from_torch(model, config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 120))
    mask = np.ones_like(tokens)
    np.testing.assert_allclose(
        _run(params, tokens, mask, config), torch_logits(model, tokens, mask), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("scan", [True, False])
def test_prefill_into_empty_cache_equals_cached_forward(scan: bool) -> None:
    """`empty_cache=True` (attention over the block alone, cache filled at the end) gives the
    logits and the cache that the block written into the cache and read back gives."""
    model = tiny_torch_model("qwen2", seed=6)
    config = _config_of(model, scan_layers=scan)
    params = params_from_torch(model, config)
    rng = np.random.default_rng(7)
    B, P = 3, 7
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (B, P)))
    mask = np.ones((B, P), bool)
    mask[0, :3] = False  # left padding
    pos = positions_from_mask(jnp.asarray(mask))
    runs = [
        forward(
            params,
            tokens,
            pos,
            jnp.asarray(mask),
            config,
            init_cache(config, B, P + 4),
            empty_cache=empty,
        )
        for empty in (False, True)
    ]
    (ref_logits, ref_cache), (logits, cache) = runs
    np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref_logits)[mask], atol=1e-5)
    assert int(cache.end) == int(ref_cache.end) == P
    np.testing.assert_array_equal(np.asarray(cache.key_mask), np.asarray(ref_cache.key_mask))
    # Compared on real slots: a pad query attends to nothing real (its k/v is never read).
    real = np.asarray(cache.key_mask)[None, :, None, None, :]  # k: [L, B, K, Dh, S]
    k, ref_k = np.asarray(cache.k), np.asarray(ref_cache.k)
    np.testing.assert_allclose(np.where(real, k, 0), np.where(real, ref_k, 0), atol=1e-5)
    v, ref_v = np.moveaxis(np.asarray(cache.v), 3, 4), np.moveaxis(np.asarray(ref_cache.v), 3, 4)
    np.testing.assert_allclose(np.where(real, v, 0), np.where(real, ref_v, 0), atol=1e-5)
    with pytest.raises(ValueError, match="needs a cache"):
        forward(params, tokens, pos, jnp.asarray(mask), config, empty_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["scan", "unrolled", "decode_step"])
def test_incremental_decoding_equals_full_forward(family: str, layout: str) -> None:
    """Stacked cache under scan / an unrolled loop, and `decode_step` (feature-major, per-layer
    weights and cache buffers: the sampler's CPU decode) all equal the full forward."""
    model = tiny_torch_model(family, seed=5)
    config = _config_of(model, scan_layers=layout == "scan")
    params = params_from_torch(model, config)
    rng = np.random.default_rng(4)
    B, P, N = 2, 6, 5
    tokens = rng.integers(1, config.vocab_size, (B, P + N))
    mask = np.ones((B, P + N), bool)
    mask[1, :2] = False  # row 1 is left-padded by two tokens
    full = _run(params, tokens, mask, config)

    cache = init_cache(config, B, P + N + 3)
    pos = positions_from_mask(jnp.asarray(mask))
    step_logits, cache = forward(
        params, jnp.asarray(tokens[:, :P]), pos[:, :P], jnp.asarray(mask[:, :P]), config, cache
    )
    outs = [np.asarray(step_logits)]
    if layout == "decode_step":
        weights, cache = decode_weights(params, config), unstack_cache(cache)
        assert isinstance(weights["layers"], tuple) and cache.per_layer
    for t in range(P, P + N):
        if layout == "decode_step":  # one real token per row (decode_step's contract)
            logit, cache = decode_step(weights, jnp.asarray(tokens[:, t]), pos[:, t], cache, config)
            logit = logit[:, None]
        else:
            logit, cache = forward(
                params,
                jnp.asarray(tokens[:, t : t + 1]),
                pos[:, t : t + 1],
                jnp.asarray(mask[:, t : t + 1]),
                config,
                cache,
            )
        outs.append(np.asarray(logit))
    incremental = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(incremental[mask], full[mask], atol=1e-4, rtol=0)
    assert int(cache.end) == P + N


@pytest.mark.parametrize(
    ("tie", "dtype"),
    [
        (False, "float32"),
        (True, "float32"),
        (True, "bfloat16"),
        pytest.param(False, "bfloat16", marks=pytest.mark.slow),  # the default run's time limit
    ],
)
def test_decode_step_equals_forward_step(tie: bool, dtype: str) -> None:
    """`decode_step` on a feature-major hidden state == `forward` on one token with a stacked
    cache: logits (fp32 1e-5; bf16 compute to bf16 rounding) and every cache slot it wrote."""
    model = tiny_torch_model("qwen2", tie=tie, seed=7)
    config = _config_of(model, dtype=dtype)
    params = params_from_torch(model, config)
    rng = np.random.default_rng(8)
    B, P = 3, 5
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (B, P + 2)))
    mask = np.ones((B, P + 2), bool)
    mask[2, :3] = False
    pos = positions_from_mask(jnp.asarray(mask))
    _, cache = forward(params, tokens[:, :P], pos[:, :P], jnp.asarray(mask[:, :P]), config,
                       init_cache(config, B, P + 4))  # fmt: skip
    weights, per_layer = decode_weights(params, config), unstack_cache(cache)
    for t in (P, P + 1):
        ref, cache = forward(params, tokens[:, t : t + 1], pos[:, t : t + 1],
                             jnp.ones((B, 1), bool), config, cache)  # fmt: skip
        got, per_layer = decode_step(weights, tokens[:, t], pos[:, t], per_layer, config)
        atol = 1e-5 if dtype == "float32" else 5e-2
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref[:, 0]), atol=atol, rtol=0)
    assert int(per_layer.end) == int(cache.end) == P + 2
    np.testing.assert_array_equal(np.asarray(per_layer.key_mask), np.asarray(cache.key_mask))
    for i in range(config.num_layers):
        np.testing.assert_allclose(np.asarray(per_layer.k[i], np.float32),
                                   np.asarray(cache.k[i], np.float32), atol=atol)  # fmt: skip
        np.testing.assert_allclose(np.asarray(per_layer.v[i], np.float32),
                                   np.asarray(cache.v[i], np.float32), atol=atol)  # fmt: skip


def test_decode_weights_group_fused_rows_by_what_is_sharded() -> None:
    """`decode_weights` fuses q/k/v and gate/up into one matrix each; per kv head j its rows are
    query heads jG..jG+G-1, key head j, value head j, and gate/up rows interleave per MLP unit,
    so splitting the output axis over `tensor` hands each shard whole heads and whole units."""
    config = ModelConfig(
        family="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=4,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), param_shapes(config)
    )
    K, G, Dh, D, F = 2, 2, 4, 16, 24
    layer = decode_weights(params, config)["layers"][1]
    wq = np.asarray(params["layers"]["wq"][1]).reshape(D, K * G, Dh)
    wk = np.asarray(params["layers"]["wk"][1]).reshape(D, K, Dh)
    wv = np.asarray(params["layers"]["wv"][1]).reshape(D, K, Dh)
    qkv = np.asarray(layer["wqkv"]).reshape(K, G + 2, Dh, D)
    for j in range(K):
        for g in range(G):
            np.testing.assert_array_equal(qkv[j, g], wq[:, j * G + g].T)
        np.testing.assert_array_equal(qkv[j, G], wk[:, j].T)
        np.testing.assert_array_equal(qkv[j, G + 1], wv[:, j].T)
    gate_up = np.asarray(layer["w_gate_up"]).reshape(F, 2, D)
    np.testing.assert_array_equal(gate_up[:, 0], np.asarray(params["layers"]["w_gate"][1]).T)
    np.testing.assert_array_equal(gate_up[:, 1], np.asarray(params["layers"]["w_up"][1]).T)

    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    axes = decode_weight_logical_axes(config)["layers"][1]
    for name, rows_per_shard in (("wqkv", (G + 2) * Dh), ("w_gate_up", F)):
        sharding = named_sharding(axes[name], layer[name].shape, mesh)
        assert sharding.spec[0] == "tensor"
        starts = {
            idx[0].start or 0 for idx in sharding.devices_indices_map(layer[name].shape).values()
        }
        assert starts == {0, rows_per_shard}  # shard t = kv head t / units t F/2 .. (t+1) F/2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_query_attention_equals_the_gemm_form(dtype: str) -> None:
    """The decode step's one-query attention (multiply-add scores, multiply-reduce output) ==
    `attention`'s batched GEMMs for one query per row over a cache with masked (left-padding,
    unwritten) slots."""
    config = ModelConfig(
        family="llama", vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1,
        num_heads=6, num_kv_heads=2, head_dim=4, dtype=dtype,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    B, S, K, Dh = 3, 7, 2, 4
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype)
               for s in ((B, 1, 6, Dh), (B, K, Dh, S), (B, K, S, Dh)))  # fmt: skip
    mask = np.ones((B, 1, S), bool)
    mask[0, 0, :2] = False  # left padding
    mask[:, 0, 5:] = False  # slots not written yet
    got = one_query_attention(q, k, v, jnp.asarray(mask), config)
    ref = attention(q, k, v, jnp.asarray(mask), config)
    assert got.shape == ref.shape == (B, 1, 6, Dh) and got.dtype == ref.dtype
    atol = 1e-6 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=atol)
    # a masked slot has no effect: change its value, the output stays
    k2 = k.at[:, :, :, 6].set(100.0)
    np.testing.assert_array_equal(
        np.asarray(one_query_attention(q, k2, v, jnp.asarray(mask), config)), np.asarray(got)
    )


def test_forward_rejects_a_per_layer_cache() -> None:
    model = tiny_torch_model("llama", seed=1)
    config = _config_of(model)
    params = params_from_torch(model, config)
    cache = init_cache(config, 1, 8, per_layer=True)
    with pytest.raises(ValueError, match="stacked KVCache"):
        forward(params, jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                jnp.ones((1, 1), bool), config, cache)  # fmt: skip


@pytest.mark.slow  # the default run's 15-minute limit (~15 s)
def test_remat_and_bf16_options() -> None:
    config = ModelConfig(
        family="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
    )
    params = init_params(config, jax.random.key(0))
    tokens = jnp.arange(12).reshape(2, 6) % 64
    mask = jnp.ones((2, 6), bool)
    pos = positions_from_mask(mask)

    def loss(p, cfg):
        logits, _ = forward(p, tokens, pos, mask, cfg)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # eager op-by-op autodiff is slow
    g_plain = grad(params, config)
    g_remat = grad(params, config.replace(remat="full"))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    bf16 = _run(params, np.asarray(tokens), np.asarray(mask), config.replace(dtype="bfloat16"))
    fp32 = _run(params, np.asarray(tokens), np.asarray(mask), config)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=5e-2)


def test_logical_axes_cover_every_weight() -> None:
    for family, extra in [
        ("llama", {}),
        ("qwen2", {"attention_bias": True}),
        ("qwen3", {"qk_norm": True}),
    ]:
        config = ModelConfig(
            family=family,
            vocab_size=50,
            hidden_size=16,
            intermediate_size=24,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=4,
            **extra,
        )
        shapes = param_shapes(config)
        axes = param_logical_axes(config)
        assert jax.tree.structure(shapes) == jax.tree.structure(
            jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, tuple))
        )
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
            names = axes
            for k in path:
                names = names[k.key]
            assert len(names) == len(leaf.shape), path


def test_bad_config_errors_name_the_key() -> None:
    good = tiny_torch_model("llama").config.to_dict()
    with pytest.raises(ModelConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict(
            {**good, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
        )
    broken = dict(good)
    del broken["hidden_size"]
    with pytest.raises(ModelConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(broken, source="x/config.json")
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf_dict({**good, "num_hidden_layers": "3"})


@pytest.mark.parametrize("dtype,out_dtype,tol", [
    ("float32", None, 1e-5), ("float32", "float32", 1e-5), ("bfloat16", "float32", 2e-2),
])  # fmt: skip
def test_project_values_and_gradients_match_einsum(dtype: str, out_dtype: str | None, tol: float):
    """The CPU projection's custom backward (one shared transpose of x) against autodiff of
    plain einsums, for a group of weights of different output shapes."""
    from rlver_jax.kernels.cpu.projection import project_cpu as project

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), dtype)
    ws = (
        jnp.asarray(rng.normal(size=(8, 3, 4)), dtype),
        jnp.asarray(rng.normal(size=(8, 6)), dtype),
    )
    cot = [jnp.asarray(rng.normal(size=(2, 5, 3, 4))), jnp.asarray(rng.normal(size=(2, 5, 6)))]

    def loss(fn: Any, x: jax.Array, ws: tuple[jax.Array, ...]) -> jax.Array:
        return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(fn(x, ws), cot, strict=True))

    ref = lambda x, ws: tuple(
        jnp.tensordot(x, w, axes=1, preferred_element_type=out_dtype) for w in ws
    )
    ours = lambda x, ws: project(x, ws, out_dtype)
    for a, b in zip(ours(x, ws), ref(x, ws), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )
    g_ours = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(x, ws)
    g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(x, ws)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(np.max(np.abs(np.asarray(b, np.float32))))
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale, rtol=0
        )


def test_rope_gradient_is_the_inverse_rotation() -> None:
    """`apply_rope`'s hand-written VJP equals autodiff of the plain rotate-half formula, and
    the rotation keeps norms (its transpose is its inverse)."""
    config = ModelConfig(
        family="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=16,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 2, 16)), jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    positions = jnp.asarray([[0, 1, 2, 3, 4], [0, 0, 7, 8, 9]], jnp.int32)
    cos, sin = rope_tables(positions, config)

    def reference(x: jax.Array) -> jax.Array:
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[:, :, None] + rotated * sin[:, :, None]

    out, vjp = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    ref_out, ref_vjp = jax.vjp(reference, x)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], atol=1e-5)
    np.testing.assert_allclose(
        jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )
    # through a jitted, rematerialised use, as in the learner
    grad = jax.jit(jax.grad(jax.checkpoint(lambda x: (apply_rope(x, cos, sin) * g).sum())))(x)
    np.testing.assert_allclose(grad, ref_vjp(g)[0], atol=1e-5)


def _blocked_case() -> tuple[ModelConfig, Any, jax.Array, jax.Array, jax.Array]:
    """Tiny Qwen2 (biases) on two packed rows of 23 tokens: three samples, a shared-prefix
    member (`segment_parts`: prefix id in the high bits) and trailing padding (segment 0)."""
    config = ModelConfig(
        family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
    )  # fmt: skip
    params = init_params(config, jax.random.key(0))
    row0 = [1] * 9 + [2] * 10 + [0] * 4
    row1 = [3] * 6 + [4 | (3 << 16)] * 7 + [5] * 10
    seg = jnp.asarray([row0, row1], jnp.int32)
    tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, 64)
    return config, params, tokens, seg, positions_from_mask(seg)


# (attention_block, causal_block): the memory blocks (6, the last with one padded query) and
# the causal blocks that skip masked keys (6, the last clipped to 3 queries)
BLOCKINGS = [(4, 0), (0, 4)]


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_blocked_attention_equals_whole(remat: str) -> None:
    """`attention_block` splits the queries into checkpointed blocks (the last one padded) and
    `causal_block` into blocks over their keys up to the diagonal: logits and gradients equal
    the one-block attention's, on packed rows with a shared prefix and padding, and in a
    prefill into a KV cache."""
    config, params, tokens, seg, pos = _blocked_case()
    whole = config.replace(attention_block=0, causal_block=0)

    def loss(p: Any, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
        logits, _ = forward(p, tokens, pos, seg, cfg)
        real = (seg > 0)[..., None]
        return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)[..., 3]), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_whole, logits_whole), g_whole = grad(params, whole.replace(remat=remat))
    for block, causal in BLOCKINGS:
        cfg = config.replace(
            attention_block=block, attention="xla_causal", causal_block=causal, remat=remat
        )
        (l_blk, logits_blk), g_blk = grad(params, cfg)
        real = np.asarray(seg > 0)  # a padding query sees no key: its output is arbitrary
        np.testing.assert_allclose(logits_blk[real], logits_whole[real], atol=1e-5)
        np.testing.assert_allclose(l_blk, l_whole, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_whole), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)

    mask = jnp.ones((2, 16), bool).at[0, :5].set(False)  # left padding, into a 20-slot cache
    outs = []
    for cfg in (
        whole,
        *(
            config.replace(attention_block=a, attention="xla_causal", causal_block=c)
            for a, c in BLOCKINGS
        ),
    ):
        prefill = jax.jit(functools.partial(forward, config=cfg, empty_cache=True))
        cache = init_cache(cfg, 2, 20)
        logits, _ = prefill(params, tokens[:, :16], positions_from_mask(mask), mask, cache=cache)
        outs.append(np.asarray(logits)[:, 5:])
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-5)


def test_causal_blocks_skip_the_keys_above_the_diagonal() -> None:
    """The causal blocks compute only the scores up to the diagonal: XLA's own cost analysis
    of the attention over T = 256 tokens counts the skipped products' flops as gone (plus the
    softmax work on their scores)."""
    config, _, _, _, _ = _blocked_case()
    B, T, Tc, H, K, Dh = 2, 256, 64, config.num_heads, config.num_kv_heads, config.head_dim
    q, k, v = jnp.ones((B, T, H, Dh)), jnp.ones((B, K, Dh, T)), jnp.ones((B, K, T, Dh))
    mask = attention_mask(jnp.ones((B, T), bool))

    def flops(causal: int) -> float:
        cfg = config.replace(attention="xla_causal", causal_block=causal)
        run = jax.jit(lambda *a: attention(*a, cfg, causal=True))
        return run.lower(q, k, v, mask).compile().cost_analysis()["flops"]

    pairs_skipped = T * T - Tc * sum(range(Tc, T + Tc, Tc))  # query-key pairs above the blocks
    dots = pairs_skipped * 2 * (2 * Dh) * H * B  # q k^T and p v: 2 Dh flops a pair each
    saved = flops(0) - flops(Tc)
    assert dots <= saved <= 1.3 * dots, (saved, dots)


def test_blocked_attention_keeps_fewer_bytes() -> None:
    """The point of the blocks: a training step's compiled temporaries no longer hold every
    layer's T x T scores (XLA's own memory analysis of the forward + backward program)."""
    config, params, _, _, _ = _blocked_case()
    T = 256
    tokens = jnp.zeros((2, T), jnp.int32)
    mask = jnp.ones((2, T), bool)
    pos = positions_from_mask(mask)

    def temp_bytes(block: int) -> int:
        cfg = config.replace(attention_block=block)
        loss = lambda p: jnp.mean(forward(p, tokens, pos, mask, cfg)[0])
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, blocked = temp_bytes(0), temp_bytes(32)
    scores = 2 * config.num_heads * T * T * 4  # one layer's f32 scores
    assert whole >= config.num_layers * scores  # every layer's scores kept for the backward
    assert blocked < whole / 2, (blocked, whole)
