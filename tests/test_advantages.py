"""Parity tests of rlver_jax.rl.advantages against plain-numpy loop references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.rl import registry
from rlver_jax.rl.advantages import (
    AdvantageInputs,
    broadcast_to_tokens,
    dialogue_weights,
    gae_advantages,
    gae_estimator,
    grpo_advantages,
    grpo_estimator,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    rloo_estimator,
)

# prompt, turn 1, user, turn 2, pad
PATTERN = [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]


# ----------------------------------------------------------------------------- numpy references


def np_multiturn_gae(rewards, values, mask, gamma, lam):
    """verl-style multi-turn GAE: walk backwards, skip masked steps, carry nextvalue/lastgaelam."""
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        nextvalue = 0.0
        lastgaelam = 0.0
        for t in reversed(range(T)):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * nextvalue - values[b, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            nextvalue = values[b, t]
            adv[b, t] = lastgaelam
    returns = (adv + values) * mask
    return adv, returns


def np_whiten(x, mask):
    sel = x[mask > 0].astype(np.float64)
    mu = sel.mean()
    var = sel.var(ddof=1)
    return (x - mu) / np.sqrt(var + 1e-8) * mask


def np_grpo(scores, groups, ddof=1, eps=1e-6, std_normalize=True):
    out = np.zeros(len(scores))
    for g in set(groups.tolist()):
        idx = [i for i in range(len(scores)) if groups[i] == g]
        if len(idx) <= 1:
            continue
        s = np.array([scores[i] for i in idx], np.float64)
        a = s - s.mean()
        if std_normalize:
            a = a / (s.std(ddof=ddof) + eps)
        for j, i in enumerate(idx):
            out[i] = a[j]
    return out


def np_rloo(scores, groups):
    out = np.zeros(len(scores))
    for i in range(len(scores)):
        others = [scores[j] for j in range(len(scores)) if groups[j] == groups[i] and j != i]
        if others:
            out[i] = scores[i] - np.mean(others)
    return out


def ragged_mask(rng, B, T):
    """Several multi-turn patterns, shifted / truncated so the batch is ragged."""
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        t = int(rng.integers(0, 3))  # prompt length
        while t < T:
            turn = int(rng.integers(1, 4))
            mask[b, t : t + turn] = 1
            t += turn + int(rng.integers(1, 4))  # user turn
        mask[b, T - int(rng.integers(0, 3)) :] = 0  # padding
    mask[0] = 0
    mask[0, : len(PATTERN)] = PATTERN
    return mask


# ----------------------------------------------------------------------------- helpers


def test_masked_helpers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 11))
    m = np.tile(np.array(PATTERN, np.float32), (4, 1))
    m[2] = 0
    sel = x[m > 0]
    np.testing.assert_allclose(masked_mean(x, m), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, m), sel.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, m, unbiased=False), sel.var(), rtol=1e-5)
    np.testing.assert_allclose(masked_whiten(x, m), np_whiten(x, m), rtol=1e-4, atol=1e-5)
    shifted = masked_whiten(x, m, shift_mean=False)
    np.testing.assert_allclose(shifted, (np_whiten(x, m) + sel.mean()) * m, rtol=1e-4, atol=1e-5)
    assert float(masked_mean(x, np.zeros_like(m))) == 0.0


# ----------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 1.0), (1.0, 0.5)])
def test_gae_matches_numpy_multiturn(gamma, lam):
    rng = np.random.default_rng(1)
    B, T = 6, 17
    mask = ragged_mask(rng, B, T)
    rewards = rng.normal(size=(B, T)) * mask  # dense per-turn rewards on policy tokens
    values = rng.normal(size=(B, T))
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam, whiten=False)
    ref_adv, ref_ret = np_multiturn_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    adv_w, ret_w = gae_advantages(rewards, values, mask, gamma, lam, whiten=True)
    np.testing.assert_allclose(adv_w, np_whiten(ref_adv, mask), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ret_w, ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_bootstraps_across_user_turn():
    mask = np.array([PATTERN], np.float32)
    values = np.arange(11, dtype=np.float32)[None] + 1.0
    rewards = np.zeros_like(values)
    adv, _ = gae_advantages(rewards, values, mask, 1.0, 0.0, whiten=False)
    # last token of turn 1 (t=4) bootstraps from the first token of turn 2 (t=7): V7 - V4
    assert float(adv[0, 4]) == pytest.approx(values[0, 7] - values[0, 4])
    assert float(adv[0, 8]) == pytest.approx(-values[0, 8])  # terminal: next value 0
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_closed_form_terminal_reward():
    rng = np.random.default_rng(2)
    B, T = 5, 13
    mask = ragged_mask(rng, B, T)
    values = rng.normal(size=(B, T))
    R = rng.normal(size=B) * 3
    rewards = np.zeros((B, T))
    for b in range(B):
        last = np.nonzero(mask[b])[0][-1]
        rewards[b, last] = R[b]
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0, whiten=False)
    expected = (R[:, None] - values) * mask
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, R[:, None] * mask, rtol=1e-5, atol=1e-5)


def test_gae_jit_and_grad_finite():
    rng = np.random.default_rng(3)
    mask = jnp.asarray(ragged_mask(rng, 3, 11))
    rewards = jnp.asarray(rng.normal(size=(3, 11))) * mask
    fn = jax.jit(lambda v: jnp.sum(gae_advantages(rewards, v, mask, 0.99, 0.95)[0] ** 2))
    g = jax.grad(fn)(jnp.asarray(rng.normal(size=(3, 11)), jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- GRPO / RLOO


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_grpo_matches_numpy(ddof, std_normalize):
    rng = np.random.default_rng(4)
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 0, 1])  # group 2 has a single member
    scores = rng.normal(size=len(groups))
    adv = grpo_advantages(scores, groups, 4, ddof=ddof, std_normalize=std_normalize)
    ref = np_grpo(scores, groups, ddof=ddof, std_normalize=std_normalize)
    np.testing.assert_allclose(adv, ref, rtol=1e-4, atol=1e-5)
    assert float(adv[7]) == 0.0


def test_grpo_jit_static_groups_and_constant_group():
    fn = jax.jit(grpo_advantages, static_argnums=(2,))
    scores = jnp.array([1.0, 1.0, 1.0, 2.0, 0.0])
    adv = fn(scores, jnp.array([0, 0, 0, 1, 1]), 2)
    np.testing.assert_allclose(adv[:3], 0.0, atol=1e-6)  # identical scores: no NaN, zero adv
    np.testing.assert_allclose(adv[3:], [1 / (np.sqrt(2) + 1e-6), -1 / (np.sqrt(2) + 1e-6)])


def _per_turn_batch():
    # group 0: dialogue 10 (3 turns), 11 (1 turn), 12 (2 turns); group 1: dialogues 20, 21
    dialogues = np.array([10, 10, 10, 11, 12, 12, 20, 20, 21])
    groups = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    dscore = {10: 3.0, 11: -1.0, 12: 0.5, 20: 2.0, 21: 1.0}
    scores = np.array([dscore[d] for d in dialogues])
    return dialogues, groups, scores, dscore


def test_grpo_per_turn_counts_each_dialogue_once():
    dialogues, groups, scores, dscore = _per_turn_batch()
    adv = grpo_advantages(scores, groups, 2, dialogue_ids=dialogues)
    # reference: stats on per-dialogue scores, broadcast back
    d_list = sorted(dscore)
    d_adv = np_grpo(np.array([dscore[d] for d in d_list]), np.array([d // 10 - 1 for d in d_list]))
    ref = np.array([d_adv[d_list.index(d)] for d in dialogues])
    np.testing.assert_allclose(adv, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        dialogue_weights(dialogues), [1 / 3] * 3 + [1, 0.5, 0.5, 0.5, 0.5, 1]
    )


def test_grpo_per_turn_duplication_invariance():
    dialogues, groups, scores, _ = _per_turn_batch()
    base = np.asarray(grpo_advantages(scores, groups, 2, dialogue_ids=dialogues))
    # duplicate all samples of dialogue 10 (it now has 6 turns): its group stats must not move
    dup = dialogues == 10
    d2 = np.concatenate([dialogues, dialogues[dup]])
    g2 = np.concatenate([groups, groups[dup]])
    s2 = np.concatenate([scores, scores[dup]])
    adv2 = np.asarray(grpo_advantages(s2, g2, 2, dialogue_ids=d2))
    np.testing.assert_allclose(adv2[: len(scores)], base, rtol=1e-5, atol=1e-6)
    # without dialogue ids, duplication does change the stats (the longer dialogue weighs more)
    naive = np.asarray(grpo_advantages(scores, groups, 2))
    naive2 = np.asarray(grpo_advantages(s2, g2, 2))
    assert not np.allclose(naive, naive2[: len(scores)])


def test_grpo_single_dialogue_group_is_zero():
    adv = grpo_advantages(np.array([1.0, 2.0, 5.0]), np.array([0, 0, 0]), 1, dialogue_ids=[7, 7, 7])
    np.testing.assert_allclose(adv, 0.0)


def test_rloo_matches_numpy_and_per_turn():
    rng = np.random.default_rng(5)
    groups = np.array([0, 0, 0, 1, 1, 2, 0])
    scores = rng.normal(size=len(groups))
    np.testing.assert_allclose(rloo_advantages(scores, groups, 3), np_rloo(scores, groups), 1e-5)
    dialogues, g, s, dscore = _per_turn_batch()
    adv = rloo_advantages(s, g, 2, dialogue_ids=dialogues)
    d_list = sorted(dscore)
    d_adv = np_rloo(np.array([dscore[d] for d in d_list]), np.array([d // 10 for d in d_list]))
    ref = np.array([d_adv[d_list.index(d)] for d in dialogues])
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-6)


def test_broadcast_to_tokens():
    mask = np.array([PATTERN, [1] * 11], np.float32)
    out = broadcast_to_tokens(np.array([2.0, -1.0]), mask)
    np.testing.assert_allclose(out, np.array([2.0, -1.0])[:, None] * mask)


# ----------------------------------------------------------------------------- registry


def test_registry_builtins_and_unknown():
    assert registry.get_advantage("gae") is gae_estimator
    assert registry.get_advantage("grpo") is grpo_estimator
    assert registry.get_advantage("rloo") is rloo_estimator
    assert {"gae", "grpo", "rloo"} <= set(registry.list_advantages())
    with pytest.raises(KeyError, match="available: gae, grpo"):
        registry.get_advantage("nope")


def test_registered_estimators_share_one_signature():
    """Every estimator takes AdvantageInputs and returns token advantages (and returns or
    None): "gae" is the whitened, masked GAE; "grpo" / "rloo" their per-sample advantage over
    each sample's policy tokens."""
    rng = np.random.default_rng(6)
    dialogues, groups, scores, _ = _per_turn_batch()
    n, T = len(scores), 11
    lmask = jnp.asarray(ragged_mask(rng, n, T))
    vmask = jnp.asarray(np.maximum(np.asarray(lmask), rng.random((n, T)) < 0.3), jnp.float32)
    rewards, values = (jnp.asarray(rng.normal(size=(n, T)), jnp.float32) for _ in range(2))
    x = AdvantageInputs(lmask, scores, groups, 2, dialogues, rewards, values, vmask, 0.9, 0.8,
                        whiten=True, eps=1e-3)  # fmt: skip
    adv, ret = registry.get_advantage("gae")(x)
    ref_adv, ref_ret = gae_advantages(rewards, values, vmask, 0.9, 0.8, whiten=False)
    np.testing.assert_array_equal(adv, masked_whiten(ref_adv, lmask) * lmask)
    np.testing.assert_array_equal(ret, ref_ret * vmask)
    for name, per_sample in [
        ("grpo", grpo_advantages(scores, groups, 2, eps=1e-3, dialogue_ids=dialogues)),
        ("rloo", rloo_advantages(scores, groups, 2, dialogue_ids=dialogues)),
    ]:
        adv, ret = registry.get_advantage(name)(x)
        assert ret is None
        np.testing.assert_array_equal(adv, broadcast_to_tokens(per_sample, lmask))


def test_registry_custom_and_duplicate():
    name = "test_custom_adv"

    @registry.register_advantage(name)
    def custom(x: AdvantageInputs):
        return broadcast_to_tokens(x.scores - jnp.mean(x.scores), x.loss_mask), None

    try:
        assert registry.get_advantage(name) is custom
        x = AdvantageInputs(jnp.ones((2, 3)), jnp.array([1.0, 3.0]), jnp.zeros(2, int), 1,
                            jnp.arange(2))  # fmt: skip
        adv, ret = registry.get_advantage(name)(x)
        np.testing.assert_allclose(adv, [[-1] * 3, [1] * 3])
        assert ret is None
        with pytest.raises(ValueError, match="already registered"):
            registry.register_advantage(name)(lambda s: s)
        registry.register_advantage(name, override=True)(lambda s: s)
        assert registry.get_advantage(name) is not custom
    finally:
        registry.ADVANTAGES.unregister(name)
    assert name not in registry.ADVANTAGES
