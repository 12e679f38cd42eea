"""Sampler: correctness against the uncached forward, sharding, compile bounds, distributions."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.models.transformer import forward, positions_from_mask
from rlver_jax.parallel import MeshConfig, count_compiles, make_mesh
from rlver_jax.sampling.sampler import Sampler, StopReason
from rlver_jax.sampling.tokens import Settings, filter_logits, sample_tokens, top_p_bisect
from tests.helpers import BUCKETS, CONFIG, PAD, PROMPTS, random_params

STD = 0.5  # of the random params


@pytest.fixture(scope="module")
def params() -> dict:
    return random_params(CONFIG, std=STD)


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    return Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS, time_phases=True)


def _teacher_forced_logits(params: dict, prompts: list, outs: list) -> tuple[np.ndarray, list]:
    """Uncached forward over prompt + generated tokens, left-padded to 32: [B, 32, V]."""
    seqs = [list(p) + list(o) for p, o in zip(prompts, outs, strict=True)]
    toks = np.zeros((len(seqs), 32), np.int32)
    mask = np.zeros((len(seqs), 32), bool)
    for i, s in enumerate(seqs):
        toks[i, 32 - len(s) :], mask[i, 32 - len(s) :] = s, True
    return np.asarray(_forward(params, toks, mask)), seqs


@jax.jit
def _forward(params: dict, toks: jax.Array, mask: jax.Array) -> jax.Array:
    return forward(params, toks, positions_from_mask(mask), mask, CONFIG)[0]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_tokens_and_logprobs_match_the_uncached_forward(
    sampler: Sampler, params: dict, temperature: float
) -> None:
    out = sampler(params, PROMPTS, max_new_tokens=12, temperature=temperature, seed=1)
    _check_against_the_uncached_forward(params, out, temperature)


def test_causal_block_prefill_matches_the_uncached_forward(params: dict) -> None:
    """`model.attention: xla_causal`: the prompt attended in blocks of 4 queries over the keys
    up to the diagonal gives the tokens and logprobs of the uncached forward (the 16-slot
    prompt bucket: 4 blocks); the training programs keep XLA's reference form."""
    blocked_config = CONFIG.replace(attention="xla_causal", causal_block=4)
    blocked = Sampler(blocked_config, pad_id=PAD, sampler_config=BUCKETS)
    assert blocked.prefill_config.attention == "xla_causal"
    assert blocked.prefill_config.causal_block == 4
    out = blocked(params, PROMPTS, max_new_tokens=12, temperature=0.0, seed=1)
    _check_against_the_uncached_forward(params, out, 0.0)
    default = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS).prefill_config.attention
    assert default == ("cpu_kernel" if jax.default_backend() == "cpu" else "xla")


def _check_against_the_uncached_forward(params: dict, out: Any, temperature: float) -> None:
    """12 new tokens per prompt of PROMPTS: greedy ones are the forward's argmax, logprobs are
    its log-softmax at the temperature."""
    assert out.tokens.shape == (4, 12) and (out.lengths == 12).all()
    assert (out.stop_reason == StopReason.MAX_TOKENS).all()
    logits, seqs = _teacher_forced_logits(params, PROMPTS, out.sequences())
    t = 1.0 if temperature == 0 else temperature
    for i, (p, s) in enumerate(zip(PROMPTS, seqs, strict=True)):
        start = 32 - len(s) + len(p) - 1  # logits position predicting the first new token
        step_logits = logits[i, start : start + 12]
        if temperature == 0:
            np.testing.assert_array_equal(step_logits.argmax(-1), out.tokens[i])
        lp = _log_softmax(step_logits / t)[np.arange(12), out.tokens[i]]
        np.testing.assert_allclose(out.logprobs[i], lp, atol=2e-4)


def test_per_layer_weights_follow_the_params(sampler: Sampler, params: dict) -> None:
    """The unrolled decode's per-layer weights are made once per params object and remade
    when other params arrive (an RL step's new weights must be the ones sampled from)."""
    other = random_params(CONFIG, std=STD, seed=7)
    a = sampler(params, PROMPTS, max_new_tokens=8, temperature=0.0)
    kept = sampler._per_layer
    assert kept is not None
    assert kept[1]["embed"] is params["embed"]  # the embedding is shared, not copied
    sampler(params, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert sampler._per_layer is kept  # same params: no new copy
    b = sampler(other, PROMPTS, max_new_tokens=8, temperature=0.0)
    fresh = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS)
    np.testing.assert_array_equal(
        b.tokens, fresh(other, PROMPTS, max_new_tokens=8, temperature=0.0).tokens
    )
    assert not np.array_equal(a.tokens, b.tokens)


def test_unrolled_and_scanned_decode_agree(sampler: Sampler, params: dict) -> None:
    """The CPU default (unrolled layers, per-layer cache buffers) and the accelerator default
    (scan over stacked layers and cache) sample the same tokens with the same logprobs (to
    float32 rounding: the CPU default's prefill attention is also a compiled kernel, whose sums
    run in another order, 1.3e-5 apart after 12 tokens)."""
    assert sampler.decode.unrolled  # CPU backend default
    scanned = Sampler(
        CONFIG, pad_id=PAD, sampler_config=dataclasses.replace(BUCKETS, decode="scan")
    )
    assert not scanned.decode.unrolled
    for temperature in (0.0, 0.8):
        a = sampler(params, PROMPTS, max_new_tokens=12, temperature=temperature, seed=3)
        b = scanned(params, PROMPTS, max_new_tokens=12, temperature=temperature, seed=3)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=5e-5)


@pytest.mark.parametrize(
    ("mesh_cfg", "block"),
    [
        (MeshConfig(data=2, fsdp=1, tensor=4), 1024),
        (MeshConfig(data=1, fsdp=8, tensor=1), 1024),
        (MeshConfig(data=2, fsdp=1, tensor=4), 4),  # the 16-token prefill in 4 query blocks
    ],
)
def test_sharded_greedy_matches_one_device(
    sampler: Sampler, params: dict, mesh_cfg: MeshConfig, block: int
) -> None:
    ref = sampler(params, PROMPTS, max_new_tokens=12, temperature=0.0)
    config = CONFIG.replace(attention_block=block)
    sharded = Sampler(config, mesh=make_mesh(mesh_cfg), pad_id=PAD, sampler_config=BUCKETS)
    out = sharded(sharded.shard_params(params), PROMPTS, max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


def test_no_recompilation_within_buckets(sampler: Sampler, params: dict) -> None:
    sampler(params, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9)  # warm-up
    calls = [
        dict(prompts=[[5] * 16], max_new_tokens=16, temperature=0.0),
        dict(prompts=PROMPTS[:3], max_new_tokens=5, temperature=[0.3, 0.0, 2.0], top_k=7),
        dict(prompts=[[9, 8]] * 4, max_new_tokens=9, top_p=[0.5, 1.0, 0.2, 0.95], seed=5),
        dict(prompts=PROMPTS, max_new_tokens=14, top_k=[1, 0, 3, 200], top_p=0.8),
        dict(prompts=PROMPTS[1:], max_new_tokens=7, stop_token_ids=[3, 4, 5], seed=9),
    ]
    with count_compiles() as counter:
        for kw in calls:
            prompts = kw.pop("prompts")
            sampler(params, prompts, **kw)
    assert counter.count == 0, counter.names


def test_top_k_one_is_greedy(sampler: Sampler, params: dict) -> None:
    greedy = sampler(params, PROMPTS, max_new_tokens=12, temperature=0.0)
    top1 = sampler(params, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_top_p_and_top_k_masks_on_a_hand_made_distribution() -> None:
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    logits = jnp.asarray(np.log(probs))[None].repeat(6, 0)
    top_p = jnp.asarray([0.45, 0.6, 0.8, 0.99, 1.0, 0.6], jnp.float32)
    top_k = jnp.asarray([0, 0, 0, 0, 0, 2], jnp.int32)
    expect = np.array(
        [
            [0, 1, 0, 0, 0],  # 0.5 alone reaches 0.45
            [0, 1, 0, 1, 0],  # 0.5 + 0.2
            [0, 1, 0, 1, 1],  # 0.5 + 0.2 + 0.15
            [1, 1, 1, 1, 1],  # everything but the last 1% ... which is the 0.05 token: kept
            [1, 1, 1, 1, 1],  # top_p = 1: off
            [0, 1, 0, 0, 0],  # top-2 renormalised {0.71, 0.29}: 0.71 alone reaches 0.6
        ],
        bool,
    )
    filt = jax.jit(filter_logits, static_argnums=3)  # one compile instead of one per op
    for pool in (5, 2):  # pool 2 is smaller than most nuclei: exact bisection fallback
        kept = np.isfinite(np.asarray(filt(logits, top_k, top_p, pool)))
        np.testing.assert_array_equal(kept, expect, err_msg=f"pool={pool}")
    keep_bisect = np.asarray(
        jax.jit(top_p_bisect)(jnp.asarray(probs)[None].repeat(4, 0), top_p[:4])
    )
    np.testing.assert_array_equal(keep_bisect, expect[:4])
    k3 = filt(logits[:1], jnp.asarray([3]), jnp.asarray([1.0]), 5)
    np.testing.assert_array_equal(np.isfinite(np.asarray(k3))[0], [0, 1, 0, 1, 1])


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    nz = expected > 0
    assert counts[~nz].sum() == 0, "sampled a token of probability 0"
    return float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 0.9)]
)
def test_sampled_frequencies_match_the_distribution(
    temperature: float, top_k: int, top_p: float
) -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], np.float32)
    n = 40_000
    settings = Settings(
        temperature=jnp.full((n,), temperature), top_p=jnp.full((n,), top_p),
        top_k=jnp.full((n,), top_k, jnp.int32), stop_ids=jnp.full((4,), -1),
        max_new=jnp.int32(1),
    )  # fmt: skip
    ids, lps = jax.jit(sample_tokens, static_argnums=3)(
        jnp.asarray(logits)[None].repeat(n, 0), jax.random.key(0), settings, 256
    )
    probs = np.exp(_log_softmax(logits / temperature))
    np.testing.assert_allclose(np.asarray(lps), np.log(probs[np.asarray(ids)]), atol=1e-5)
    if top_k:
        probs = np.where(probs >= np.sort(probs)[-top_k], probs, 0.0)
        probs /= probs.sum()
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    counts = np.bincount(np.asarray(ids), minlength=8)
    # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4.
    assert _chi2(counts, probs) < 30.0, (counts / n, probs)


def test_forced_prefix_comes_first_with_logprobs(sampler: Sampler, params: dict) -> None:
    prefix = [100, 101, 102]
    out = sampler(params, PROMPTS, max_new_tokens=10, temperature=0.0, forced_prefix=prefix)
    np.testing.assert_array_equal(out.tokens[:, :3], np.array([prefix] * 4))
    assert (out.lengths == 10).all()
    logits, seqs = _teacher_forced_logits(params, PROMPTS, out.sequences())
    for i, (p, s) in enumerate(zip(PROMPTS, seqs, strict=True)):
        start = 32 - len(s) + len(p) - 1
        lp = _log_softmax(logits[i, start : start + 10])[np.arange(10), out.tokens[i]]
        np.testing.assert_allclose(out.logprobs[i], lp, atol=2e-4)
        np.testing.assert_array_equal(
            logits[i, start + 3 : start + 10].argmax(-1), out.tokens[i, 3:]
        )


def test_stop_tokens_end_rows_and_pad_the_rest(sampler: Sampler, params: dict) -> None:
    free = sampler(params, PROMPTS, max_new_tokens=12, temperature=0.0)
    stop = int(free.tokens[0, 4])  # row 0 emits it at step 4 (or earlier)
    first = [int(np.argmax(row == stop)) if (row == stop).any() else None for row in free.tokens]
    out = sampler(params, PROMPTS, max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])
    for i, f in enumerate(first):
        if f is None:
            assert out.lengths[i] == 12 and out.stop_reason[i] == StopReason.MAX_TOKENS
            continue
        assert out.lengths[i] == f + 1 and out.stop_reason[i] == StopReason.STOP_TOKEN
        np.testing.assert_array_equal(out.tokens[i, : f + 1], free.tokens[i, : f + 1])
        assert (out.tokens[i, f + 1 :] == PAD).all() and (out.logprobs[i, f + 1 :] == 0).all()
    # Everyone stops at once: the loop exits early instead of running the whole budget.
    one = sampler(params, [PROMPTS[0]], max_new_tokens=12, temperature=0.0, stop_token_ids=[stop])
    assert one.lengths[0] == first[0] + 1
    assert sampler.last_timings["decode_steps"] == first[0] + 1


def test_seed_reproduces_and_differs(sampler: Sampler, params: dict) -> None:
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = sampler(params, PROMPTS, seed=11, **kw)
    b = sampler(params, PROMPTS, seed=11, **kw)
    c = sampler(params, PROMPTS, seed=12, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    # Without a seed, calls differ from each other but a fresh sampler replays them.
    fresh = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS, seed=4)
    again = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS, seed=4)
    x1, x2 = fresh(params, PROMPTS, **kw), fresh(params, PROMPTS, **kw)
    assert (x1.tokens != x2.tokens).any()
    np.testing.assert_array_equal(again(params, PROMPTS, **kw).tokens, x1.tokens)


def test_invalid_requests_are_rejected(sampler: Sampler, params: dict) -> None:
    with pytest.raises(ValueError, match="prompt length 17 exceeds"):
        sampler(params, [[1] * 17], max_new_tokens=4)
    with pytest.raises(ValueError, match="must exceed the prefix"):
        sampler(params, PROMPTS, max_new_tokens=2, forced_prefix=[1, 2])
    with pytest.raises(ValueError, match="one value per prompt"):
        sampler(params, PROMPTS, max_new_tokens=4, temperature=[1.0, 0.5])
    with pytest.raises(ValueError, match="at least one prompt"):
        sampler(params, [[]], max_new_tokens=4)
