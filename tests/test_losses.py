"""Parity tests of rlver_jax.rl.losses against plain-numpy loop references."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.rl import registry
from rlver_jax.rl.losses import (
    LossTerm,
    aggregate,
    apply_kl_reward_penalty,
    grpo_policy_loss,
    kl_penalty,
    logprobs_and_entropy,
    ppo_policy_loss,
    value_loss,
)
from rlver_jax.rl.optim import accumulate_gradients

PATTERN = [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
B, T, V = 6, 11, 7


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    mask = np.zeros((B, T), np.float32)
    mask[0] = PATTERN
    mask[1, 3:9] = 1
    mask[2] = 0  # empty sequence
    mask[3, :2] = 1
    mask[3, 5:11] = 1
    mask[4] = 1
    mask[5, 10] = 1
    old = rng.normal(size=(B, T)) - 2.0
    new = old + rng.normal(size=(B, T)) * 0.4  # ratios on both sides of the clip range
    adv = rng.normal(size=(B, T))
    return mask, old, new, adv


# ----------------------------------------------------------------------------- numpy references


def np_aggregate(x, mask, mode):
    if mode == "token-mean":
        num = den = 0.0
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if mask[b, t]:
                    num += x[b, t]
                    den += 1
        return num / den if den else 0.0
    seq_vals = []
    for b in range(x.shape[0]):
        toks = [x[b, t] for t in range(x.shape[1]) if mask[b, t]]
        if toks:
            seq_vals.append(np.mean(toks) if mode == "seq-mean-token-mean" else np.sum(toks))
    return float(np.mean(seq_vals)) if seq_vals else 0.0


def np_ppo_per_token(new, old, adv, clip_low, clip_high, clip_c=None):
    out = np.zeros_like(new)
    clipped = np.zeros_like(new)
    for idx in np.ndindex(new.shape):
        r = math.exp(min(max(new[idx] - old[idx], -20), 20))
        a = adv[idx]
        unclipped = -a * r
        clip = -a * min(max(r, 1 - clip_low), 1 + clip_high)
        loss = max(unclipped, clip)
        clipped[idx] = float(clip > unclipped)
        if clip_c is not None and a < 0:
            loss = min(loss, -a * clip_c)
        out[idx] = loss
    return out, clipped


def np_entropy(logits):
    out = np.zeros(logits.shape[:-1])
    for idx in np.ndindex(out.shape):
        z = logits[idx].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        out[idx] = -sum(pi * math.log(pi) for pi in p if pi > 0)
    return out


def np_kl(logp, ref, kind):
    out = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        d = logp[idx] - ref[idx]
        if kind == "k1":
            out[idx] = d
        elif kind == "k2":
            out[idx] = 0.5 * d * d
        else:
            x = min(max(ref[idx] - logp[idx], -20), 20)
            out[idx] = min(max(math.exp(x) - x - 1, -10), 10)
    return out


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_and_microbatch_combination(batch, mode):
    mask, _, _, x = batch
    full = aggregate(x, mask, mode)
    np.testing.assert_allclose(full.value(), np_aggregate(x, mask, mode), rtol=1e-5)
    for splits in ([2, 4], [1, 3, 5], [3]):
        parts = [
            aggregate(xs, ms, mode)
            for xs, ms in zip(np.split(x, splits), np.split(mask, splits), strict=True)
        ]
        combined = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), parts)
        np.testing.assert_allclose(combined.value(), full.value(), rtol=1e-5)
        np.testing.assert_allclose(combined.count, full.count)
    # the learner's sum over micro-batches (accumulate_gradients adds their LossTerms so)
    micro = (x.reshape(3, 2, T), mask.reshape(3, 2, T))
    objective = lambda w, mb, count: (aggregate(w * mb[0], mb[1], mode).total / count,
                                      aggregate(w * mb[0], mb[1], mode))  # fmt: skip
    _, loss, summed = accumulate_gradients(objective, jnp.float32(1.0), micro, full.count)
    np.testing.assert_allclose(summed.value(), full.value(), rtol=1e-5)
    np.testing.assert_allclose(summed.count, full.count)
    np.testing.assert_allclose(loss, full.total / full.count, rtol=1e-5)


def test_aggregate_seq_mean_counts_nonempty(batch):
    mask, _, _, x = batch
    term = aggregate(x, mask, "seq-mean-token-mean")
    assert float(term.count) == B - 1  # sequence 2 is empty
    assert float(aggregate(x, np.zeros_like(mask), "token-mean").value()) == 0.0
    with pytest.raises(ValueError, match="available"):
        aggregate(x, mask, "bogus")


def test_lossterm_is_pytree():
    t = LossTerm(jnp.array(3.0), jnp.array(2.0))
    leaves = jax.tree_util.tree_leaves(t)
    assert len(leaves) == 2
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, t)
    assert float(doubled.value()) == 1.5
    assert float(jax.jit(lambda s: jax.tree.map(jnp.add, s, s).value())(t)) == 1.5
    assert float(LossTerm(2.0 * t.total, t.count).value()) == 3.0  # a loss coefficient


# ----------------------------------------------------------------------------- PPO / GRPO


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    "clip_low,clip_high,clip_c", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)]
)
def test_ppo_policy_loss_matches_numpy(batch, mode, clip_low, clip_high, clip_c):
    mask, old, new, adv = batch
    loss, metrics = ppo_policy_loss(new, old, adv, mask, clip_low, clip_high, mode, clip_c)
    per_tok, clipped = np_ppo_per_token(new, old, adv, clip_low, clip_high, clip_c)
    np.testing.assert_allclose(loss.value(), np_aggregate(per_tok, mask, mode), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["clipfrac"].value(), np_aggregate(clipped, mask, "token-mean"), rtol=1e-5
    )
    assert 0.0 < float(metrics["clipfrac"].value()) < 1.0
    np.testing.assert_allclose(
        metrics["approx_kl"].value(), np_aggregate(old - new, mask, "token-mean"), rtol=1e-5
    )


def test_dual_clip_bounds_negative_advantage():
    new = np.array([[5.0]])  # ratio e^5 >> c
    old = np.array([[0.0]])
    loss, metrics = ppo_policy_loss(new, old, np.array([[-1.0]]), np.ones((1, 1)), clip_ratio_c=3.0)
    assert float(loss.value()) == pytest.approx(3.0)
    assert float(metrics["clipfrac_lower"].value()) == 1.0
    loss_nc, _ = ppo_policy_loss(new, old, np.array([[-1.0]]), np.ones((1, 1)))
    assert float(loss_nc.value()) == pytest.approx(math.exp(5.0), rel=1e-5)
    with pytest.raises(ValueError):
        ppo_policy_loss(new, old, np.array([[-1.0]]), np.ones((1, 1)), clip_ratio_c=0.5)


def test_grpo_loss_broadcasts_sample_advantages(batch):
    mask, old, new, _ = batch
    sample_adv = np.linspace(-1, 1, B)
    loss, _ = grpo_policy_loss(new, old, sample_adv, mask)
    ref, _ = ppo_policy_loss(new, old, np.repeat(sample_adv[:, None], T, 1), mask)
    np.testing.assert_allclose(loss.value(), ref.value(), rtol=1e-6)


def test_policy_loss_gradient_finite_and_onpolicy_value(batch):
    mask, old, _, adv = batch

    def f(logp):
        return ppo_policy_loss(logp, old, adv, mask, clip_ratio_c=3.0)[0].value()

    logp = jnp.asarray(old, jnp.float32)
    g = jax.jit(jax.grad(f))(logp)
    assert np.all(np.isfinite(np.asarray(g)))
    # on-policy (r = 1): grad = -A m / n_tokens
    np.testing.assert_allclose(g, -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    # extreme log-ratios are clamped: still finite
    g2 = jax.grad(f)(logp + 100.0)
    assert np.all(np.isfinite(np.asarray(g2)))


# ----------------------------------------------------------------------------- value loss


@pytest.mark.parametrize("clip", [0.5, 0.1, None])
def test_value_loss_matches_numpy(batch, clip):
    mask, old_v, v, ret = batch
    loss, metrics = value_loss(v, old_v, ret, mask, clip=clip)
    per_tok = np.zeros_like(v)
    clipped = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        l1 = (v[idx] - ret[idx]) ** 2
        if clip is None:
            per_tok[idx] = 0.5 * l1
            continue
        vc = min(max(v[idx], old_v[idx] - clip), old_v[idx] + clip)
        l2 = (vc - ret[idx]) ** 2
        per_tok[idx] = 0.5 * max(l1, l2)
        clipped[idx] = float(l2 > l1)
    np.testing.assert_allclose(loss.value(), np_aggregate(per_tok, mask, "token-mean"), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["vf_clipfrac"].value(),
        np_aggregate(clipped, mask, "token-mean"),
        rtol=1e-5,
        atol=1e-7,
    )
    g = jax.grad(lambda x: value_loss(x, old_v, ret, mask, clip=clip)[0].value())(
        jnp.asarray(v, jnp.float32)
    )
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- entropy / logprobs


def test_entropy_and_logprobs_match_numpy(batch):
    """`logprobs_and_entropy` (what `model_outputs.policy_outputs` returns per token) and the
    actor's entropy term, `aggregate(entropy, mask, loss_agg)`."""
    mask = batch[0]
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, T, V)) * 3
    logits[0, 0, 0] = 80.0  # near-deterministic, still stable
    targets = rng.integers(0, V, size=(B, T))
    ent = logprobs_and_entropy(logits, targets)[1]
    np.testing.assert_allclose(ent, np_entropy(logits), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        aggregate(ent, mask, "token-mean").value(),
        np_aggregate(np_entropy(logits), mask, "token-mean"),
        rtol=1e-4,
    )
    big = logprobs_and_entropy(jnp.array([[1e4, -1e4, 0.0]], jnp.bfloat16), jnp.array([0]))[1]
    assert np.all(np.isfinite(np.asarray(big)))
    lp = logprobs_and_entropy(jnp.asarray(logits, jnp.bfloat16), targets)[0]
    assert lp.dtype == jnp.float32
    ref = np.zeros((B, T))
    lb = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    for b in range(B):
        for t in range(T):
            z = lb[b, t]
            ref[b, t] = z[targets[b, t]] - (z.max() + math.log(np.exp(z - z.max()).sum()))
    np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda z: jnp.sum(sum(logprobs_and_entropy(z, targets))))(
        jnp.asarray(logits, jnp.float32)
    )
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_numpy(batch, kind):
    mask, ref, logp, _ = batch
    logp = logp.copy()
    logp[4, 0] = ref[4, 0] - 30.0  # exercises the k3 clamp
    kl = kl_penalty(logp, ref, kind)
    np.testing.assert_allclose(kl, np_kl(logp, ref, kind), rtol=1e-5, atol=1e-6)
    # the actor's KL term (objectives.actor_objective): aggregate(kl_penalty(...), mask, agg)
    kl_term = lambda x: aggregate(kl_penalty(x, ref, kind), mask, "token-mean")
    np.testing.assert_allclose(
        kl_term(logp).value(), np_aggregate(np_kl(logp, ref, kind), mask, "token-mean"), rtol=1e-5
    )
    g = jax.grad(lambda x: kl_term(x).value())(jnp.asarray(logp, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))
    if kind == "k3":
        assert np.all(np.asarray(kl) >= -1e-6)


def test_kl_aliases_and_reward_penalty(batch):
    mask, ref, logp, rewards = batch
    np.testing.assert_allclose(kl_penalty(logp, ref, "low_var_kl"), kl_penalty(logp, ref, "k3"))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")
    kl = kl_penalty(logp, ref, "k1")
    out = apply_kl_reward_penalty(rewards, kl, 0.1, mask)
    np.testing.assert_allclose(out, rewards - 0.1 * (logp - ref) * mask, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- registry


def test_policy_loss_registry():
    assert registry.get_policy_loss("ppo") is ppo_policy_loss
    assert registry.get_policy_loss("grpo") is grpo_policy_loss
    with pytest.raises(KeyError, match="available: grpo, ppo"):
        registry.get_policy_loss("reinforce")
    name = "test_custom_loss"

    @registry.register_policy_loss(name)
    def custom(logprobs, old_logprobs, advantages, mask, **kwargs):
        return aggregate(-logprobs * advantages, mask), {}

    try:
        fn = registry.get_policy_loss(name)
        loss, _ = fn(jnp.ones((1, 2)), None, jnp.ones((1, 2)), jnp.ones((1, 2)))
        assert float(loss.value()) == -1.0
        with pytest.raises(ValueError, match="already registered"):
            registry.register_policy_loss(name)(lambda *a: a)
    finally:
        registry.POLICY_LOSSES.unregister(name)
