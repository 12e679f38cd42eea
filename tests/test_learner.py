"""Learner: exact gradient accumulation, non-finite skipping, learning sanity, sharding parity,
no recompiles, LR schedules, token alignment and the sampler logprob gap.

A tiny random Llama (d=32, 2 layers, vocab 64). Compiled learners are shared per module, and
every jit uses ``xla_backend_optimization_level=0`` (fast CPU compiles; the numerics under test
are the same on both sides of every comparison).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlver_jax.models.transformer import forward, init_params, positions_from_mask
from rlver_jax.models.value_head import value_forward
from rlver_jax.rl.learner import Learner, LearnerConfig, LearnerConfigError
from rlver_jax.rl.optim import AdamWConfig, OldOutputs, strided_merge, strided_split
from tests.helpers import (
    BASE,
    FAST,
    MCFG,
    N,
    T,
    assert_trees,
    host,
    make_traj,
    max_delta,
    row_logprob,
)

PPO = LearnerConfig(algorithm="ppo", mini_batch_size=8, micro_batch_size=4, **BASE)
GRPO = LearnerConfig(
    algorithm="grpo", mini_batch_size=8, micro_batch_size=4, kl_coef=0.01, kl_kind="k3", **BASE
)


@pytest.fixture(scope="module")
def params() -> Any:
    return jax.jit(init_params, static_argnums=0, compiler_options=FAST)(
        MCFG, jax.random.PRNGKey(0)
    )


@pytest.fixture(scope="module")
def ppo() -> Learner:
    return Learner(MCFG, PPO, compiler_options=FAST)


@pytest.fixture(scope="module")
def grpo() -> Learner:
    return Learner(MCFG, GRPO, compiler_options=FAST)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


# --------------------------------------------------------------------------- config / schedule
def test_config_validation_names_the_field() -> None:
    cases = {
        "algorithm": dict(algorithm="a2c"),
        "micro_batch_size": dict(mini_batch_size=8, micro_batch_size=3),
        "loss_agg": dict(loss_agg="sum"),
        "kl_kind": dict(kl_kind="k9"),
        "kl_as_reward": dict(algorithm="grpo", kl_as_reward=True),
        "advantage_estimator": dict(algorithm="grpo", advantage_estimator="gae"),
        "clip_low": dict(clip_low=1.5),
        "seq_buckets": dict(seq_buckets=(64, 32)),
    }
    for field, kwargs in cases.items():
        with pytest.raises(LearnerConfigError, match=f"LearnerConfig.{field}"):
            LearnerConfig(**kwargs)
    cfg = LearnerConfig(algorithm="grpo", mini_batch_size=8, micro_batch_size=8)
    assert (cfg.advantage_estimator, cfg.policy_loss, cfg.uses_critic) == ("grpo", "grpo", False)


def test_warmup_schedule_values() -> None:
    actor, critic = LearnerConfig().optimizers()  # RLVER: 1e-6 / 20 steps, 5e-6 / 50 steps
    assert (actor.lr, actor.num_warmup, critic.lr, critic.num_warmup) == (1e-6, 20, 5e-6, 50)
    for step, want in [(0, 0.0), (5, 0.25e-6), (10, 0.5e-6), (20, 1e-6), (21, 1e-6), (999, 1e-6)]:
        assert float(actor.lr_at(step)) == pytest.approx(want, rel=1e-6, abs=1e-15)
    for step, want in [(0, 0.0), (25, 2.5e-6), (50, 5e-6), (400, 5e-6)]:
        assert float(critic.lr_at(step)) == pytest.approx(want, rel=1e-6, abs=1e-15)
    assert float(AdamWConfig(3e-4, 0).lr_at(0)) == pytest.approx(3e-4)


def test_strided_split_roundtrip() -> None:
    x = jnp.arange(24).reshape(12, 2)
    y = strided_split(x, 3, 2)  # [mini, micro, m, ...]
    assert y.shape == (3, 2, 2, 2)
    assert set(np.asarray(y[1, :, :, 0]).ravel() // 2) == {1, 4, 7, 10}  # i % 3 == 1
    assert set(np.asarray(strided_split(x, 3, 4)[1, :, :, 0]).ravel() // 2) == {1, 4, 7, 10}
    np.testing.assert_array_equal(strided_merge(strided_split(x, 4)), x)


# --------------------------------------------------------------------------- alignment / gap
def test_compute_old_alignment_and_logprob_gap(ppo: Learner, params: Any) -> None:
    state = ppo.init_state(params, jax.random.PRNGKey(1))
    traj = ppo.pad(make_traj(0, n=7))
    old, metrics = ppo.compute_old(state, traj)

    @jax.jit
    def reference(policy: Any, critic: Any, tokens: jax.Array, tmask: jax.Array) -> Any:
        positions = positions_from_mask(tmask)
        logits, _ = forward(policy, tokens, positions, tmask, MCFG)
        logp = jax.nn.log_softmax(logits, -1)[:, :-1]  # position t - 1 predicts token t
        logp = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return logp, value_forward(critic, tokens, positions, tmask, MCFG)[:, :-1]

    logp, values = reference(state.policy, state.critic, traj.tokens, traj.token_mask)
    np.testing.assert_allclose(old.logprobs[:, 1:], logp * traj.loss_mask[:, 1:], atol=2e-5)
    np.testing.assert_allclose(old.values[:, 1:], values * traj.token_mask[:, 1:], atol=2e-5)
    assert not np.any(old.logprobs[:, 0]) and not np.any(old.values[:, 0])
    assert float(metrics["rollout/logprob_gap_mean"]) > 1.0  # sampler logprobs are all 0

    same = traj.replace(sampler_logprobs=np.asarray(old.logprobs))
    _, metrics = ppo.compute_old(state, same)
    assert float(metrics["rollout/logprob_gap_mean"]) < 1e-6
    assert float(metrics["rollout/logprob_gap_max"]) < 1e-5
    shifted = traj.replace(sampler_logprobs=np.asarray(old.logprobs) + 0.1 * traj.loss_mask)
    _, metrics = ppo.compute_old(state, shifted)
    assert float(metrics["rollout/logprob_gap_mean"]) == pytest.approx(0.1, abs=1e-5)


def test_gae_alignment_kl_reward_and_response_critic_mask() -> None:
    """gamma = lam = 1, no whitening: returns_t = sum of (penalised) rewards from t on and
    A_t = returns_t - V_t, with V read one position to the left (token-aligned values)."""
    cfg = LearnerConfig(
        algorithm="ppo",
        mini_batch_size=8,
        micro_batch_size=4,
        whiten_advantages=False,
        kl_coef=0.5,
        kl_kind="k1",
        kl_as_reward=True,
        critic_mask="response",
        **BASE,
    )
    learner = Learner(MCFG, cfg, compiler_options=FAST)
    traj = learner.pad(make_traj(11))
    lmask = np.asarray(traj.loss_mask, np.float32)
    values = np.random.default_rng(0).normal(size=lmask.shape).astype(np.float32)
    values *= np.asarray(traj.token_mask)
    logp = -np.ones_like(lmask) * lmask
    old = OldOutputs(logprobs=logp, values=values, ref_logprobs=logp - 0.1 * lmask)  # kl = 0.1
    batch, metrics = learner.compute_advantages(traj, old)
    assert metrics["actor/reward_kl"] == pytest.approx(0.1, abs=1e-6)
    rewards = np.asarray(traj.rewards) - 0.5 * 0.1 * lmask
    vmask = (np.cumsum(lmask, 1) > 0) & np.asarray(traj.token_mask)  # response: user tokens too
    want_ret = np.cumsum((rewards * vmask)[:, ::-1], 1)[:, ::-1] * vmask
    np.testing.assert_allclose(batch.returns, want_ret, atol=1e-5)
    np.testing.assert_allclose(batch.value_mask, vmask)
    np.testing.assert_allclose(batch.advantages, (want_ret - values) * lmask, atol=1e-5)
    assert batch.ref_logprobs is None  # the KL went into the reward, not the loss


def test_a_registered_estimator_is_what_the_learner_runs() -> None:
    """`register_advantage` and `learner.advantage_estimator`: the learner calls a user's
    estimator with the one signature of them all (`AdvantageInputs` -> token advantages,
    returns or None), its group ids made dense."""
    from rlver_jax.rl.advantages import AdvantageInputs, broadcast_to_tokens
    from rlver_jax.rl.registry import ADVANTAGES, register_advantage

    seen = {}

    @register_advantage("test_score_minus_group")
    def custom(x: AdvantageInputs) -> tuple[Any, None]:
        seen.update(groups=x.group_ids, num_groups=x.num_groups, rewards=x.rewards)
        return broadcast_to_tokens(x.scores - x.group_ids, x.loss_mask), None

    try:
        cfg = dataclasses.replace(GRPO, advantage_estimator="test_score_minus_group")
        learner = Learner(MCFG, cfg, compiler_options=FAST)
        raw = make_traj(12)
        traj = learner.pad(dataclasses.replace(raw, group_ids=raw.group_ids * 7 + 3))
        lmask = np.asarray(traj.loss_mask, np.float32)
        old = OldOutputs(
            logprobs=np.zeros_like(lmask), values=None, ref_logprobs=np.zeros_like(lmask)
        )
        batch, _ = learner.compute_advantages(traj, old)
        want = (np.asarray(traj.scores) - np.arange(N) // 4)[:, None] * lmask
        np.testing.assert_allclose(batch.advantages, want)
        assert batch.returns is None and seen["num_groups"] == N and seen["rewards"] is None
    finally:
        ADVANTAGES.unregister("test_score_minus_group")


# --------------------------------------------------------------------------- optimiser
def test_separate_actor_and_critic_learning_rates(ppo: Learner, params: Any) -> None:
    state = ppo.init_state(params, jax.random.PRNGKey(1))
    before = host(state)
    state, metrics = ppo.update(state, make_traj(1))
    after = host(state)
    assert metrics["actor/lr"] == pytest.approx(1e-3)
    assert metrics["critic/lr"] == pytest.approx(4e-3)
    # First Adam step: |update| = lr * |g| / (|g| + eps) (+ lr * wd * |p|) -> max ~= lr.
    assert max_delta(after.policy, before.policy) == pytest.approx(1e-3, rel=0.03)
    assert max_delta(after.critic, before.critic) == pytest.approx(4e-3, rel=0.03)
    assert int(after.step) == 1 and metrics["skipped"] == 0.0
    assert all(np.isfinite(v) for v in metrics.values())


def test_non_finite_batch_is_skipped_and_next_step_works(ppo: Learner, params: Any) -> None:
    state = ppo.init_state(params, jax.random.PRNGKey(1))
    bad = make_traj(2)
    bad.rewards[3, :] = np.nan  # NaN reward -> NaN advantages and returns -> both models skip
    before = host(state)
    state, metrics = ppo.update(state, bad)
    after = host(state)
    assert metrics["skipped"] == 1.0
    assert metrics["actor/skipped"] == 1.0 and metrics["critic/skipped"] == 1.0
    for name in ("policy", "critic", "policy_opt", "critic_opt", "rng"):
        assert_trees(getattr(after, name), getattr(before, name))  # bit-identical
    assert int(after.step) == 1  # the training-step counter still advances (documented)

    # NaN injected into one advantage: only the actor skips; the critic still learns.
    traj = ppo.pad(make_traj(3))
    old, _ = ppo.compute_old(state, traj)
    batch, _ = ppo.compute_advantages(traj, old)
    batch = batch.replace(advantages=batch.advantages.at[0, 5].set(jnp.nan))
    state, metrics = ppo.train_step(state, batch)
    mid = host(state)
    assert (float(metrics["actor/skipped"]), float(metrics["critic/skipped"])) == (1.0, 0.0)
    assert_trees(mid.policy, after.policy)
    assert_trees(mid.policy_opt, after.policy_opt)
    assert max_delta(mid.critic, after.critic) > 0

    state, metrics = ppo.update(state, make_traj(4))
    assert metrics["skipped"] == 0.0 and all(np.isfinite(v) for v in metrics.values())
    assert max_delta(host(state).policy, mid.policy) > 0


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "loss_agg", ["token-mean", pytest.param("seq-mean-token-mean", marks=pytest.mark.slow)]
)
def test_gradient_accumulation_is_exact(ppo: Learner, params: Any, loss_agg: str) -> None:
    state = ppo.init_state(params, jax.random.PRNGKey(1))
    traj = ppo.pad(make_traj(5))
    old, _ = ppo.compute_old(state, traj)
    batch, _ = ppo.compute_advantages(traj, old)  # independent of mini/micro sizes and loss_agg
    results = []
    # 2 interleaved mini-batches of 4: micro-batch = the whole mini-batch vs 1/4 of it. A larger
    # Adam eps keeps the update a smooth function of the gradient (with eps=1e-8 a gradient of
    # ~1e-9 turns float noise into +-lr), so params compare at atol 1e-6.
    for micro in (4, 1):
        cfg = LearnerConfig(
            algorithm="ppo",
            mini_batch_size=4,
            micro_batch_size=micro,
            loss_agg=loss_agg,
            adam_eps=1e-4,
            **BASE,
        )
        learner = Learner(MCFG, cfg, compiler_options=FAST)
        new_state, metrics = learner.train_step(learner.init_state(params, jax.random.PRNGKey(1)),
                                                batch)  # fmt: skip
        results.append((host(new_state), host(metrics)))
    (a, ma), (b, mb) = results
    assert max_delta(a.policy, host(state).policy) > 1e-4  # the step did move the params
    assert_trees(a.policy, b.policy, atol=1e-6)
    assert_trees(a.critic, b.critic, atol=1e-6)
    assert_trees(a.policy_opt, b.policy_opt, atol=1e-6)
    for key in ("actor/pg_loss", "actor/entropy", "critic/vf_loss", "actor/grad_norm"):
        assert float(ma[key]) == pytest.approx(float(mb[key]), rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- learning sanity
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rewarded_sequences_become_more_likely(
    algo: str, ppo: Learner, grpo: Learner, params: Any
) -> None:
    learner = ppo if algo == "ppo" else grpo
    state = learner.init_state(params, jax.random.PRNGKey(1))
    traj = make_traj(6)  # rows 1, 3, 5, 7 rewarded (score 1), rows 0, 2, 4, 6 not
    rewarded = np.asarray(traj.scores) > 0
    start = row_logprob(learner, state, learner.pad(traj))
    for _ in range(5):
        state, metrics = learner.update(state, traj)
        assert metrics["skipped"] == 0.0
    delta = row_logprob(learner, state, learner.pad(traj)) - start
    assert delta[rewarded].mean() > 0.05
    assert delta[rewarded].mean() - delta[~rewarded].mean() > 0.1
    if algo == "grpo":
        assert metrics["actor/kl_loss"] > 0 and state.critic is None and state.ref is not None


# --------------------------------------------------------------------------- sharding / compiles
def test_sharded_step_matches_single_device(ppo: Learner, params: Any, mesh: Mesh) -> None:
    traj = make_traj(7)
    single, m_single = ppo.update(ppo.init_state(params, jax.random.PRNGKey(1)), traj)
    sharded_learner = Learner(MCFG, PPO, mesh, compiler_options=FAST)
    sharded, m_sharded = sharded_learner.update(
        sharded_learner.init_state(params, jax.random.PRNGKey(1)), traj
    )
    assert_trees(host(sharded.policy), host(single.policy), atol=1e-5)
    assert_trees(host(sharded.critic), host(single.critic), atol=1e-5)
    assert m_sharded["actor/pg_loss"] == pytest.approx(m_single["actor/pg_loss"], abs=1e-5)

    planned = sharded_learner.state_shardings()
    is_sh = lambda x: isinstance(x, NamedSharding)
    leaves, planned_leaves = jax.tree.leaves(sharded), jax.tree.leaves(planned, is_leaf=is_sh)
    assert len(leaves) == len(planned_leaves)
    for leaf, sh in zip(leaves, planned_leaves, strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.sharding, sh)
    # Weights are really split: FSDP on embed, tensor on heads; Adam moments like their params.
    wq_spec = sharded.policy["layers"]["wq"].sharding.spec
    assert wq_spec == PartitionSpec(None, "fsdp", "tensor", None)
    mu = sharded.policy_opt[0].mu["layers"]["wq"]
    assert mu.sharding.is_equivalent_to(sharded.policy["layers"]["wq"].sharding, 4)


def test_second_step_does_not_recompile(ppo: Learner, params: Any) -> None:
    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    state = ppo.init_state(params, jax.random.PRNGKey(2))
    state, _ = ppo.update(state, make_traj(8))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, _ = ppo.update(state, make_traj(9, n=7, t=20))  # other data, same padded shape
        state, _ = ppo.update(state, make_traj(10, t=30))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert int(state.step) == 3
    # One executable per jitted function, whether the state came from init or a train step.
    for name in ("old", "adv", "train"):
        assert ppo._fns[(name, N, T)]._cache_size() == 1, name


# --------------------------------------------------------------------------- on-policy fast path
def test_on_policy_update_equals_the_compute_old_path(params: Any) -> None:
    """One epoch of one mini-batch, no critic / reference: `update` skips compute_old and the
    train step takes stop_gradient(logp) as the old logprobs. Same params and losses as the
    explicit pipeline (compute_old -> advantages -> train_step), and the sampler gap metric
    comes from the train step's own forward."""
    # adam_eps as in test_gradient_accumulation_is_exact: the two programs round differently,
    # and with eps=1e-8 a ~1e-9 gradient turns that float noise into +-lr.
    cfg = dataclasses.replace(GRPO, kl_coef=0.0, adam_eps=1e-4)
    learner = Learner(MCFG, cfg, compiler_options=FAST)
    assert learner.on_policy(N) and not learner.on_policy(2 * N)
    assert not Learner(MCFG, GRPO).on_policy(N)  # a reference model needs compute_old
    assert not Learner(MCFG, dataclasses.replace(cfg, ppo_epochs=2)).on_policy(N)
    traj = make_traj(11)
    timings: dict[str, float] = {}
    fast, m_fast = learner.update(learner.init_state(params, jax.random.PRNGKey(1)), traj,
                                  timings=timings)  # fmt: skip
    assert set(timings) == {"pad_s", "old_s", "adv_s", "train_s", "fetch_s"}

    state = learner.init_state(params, jax.random.PRNGKey(1))
    padded = learner.pad(traj)
    old, m_old = learner.compute_old(state, padded)
    batch, _ = learner.compute_advantages(padded, old)
    slow, m_slow = learner.train_step(state, batch)
    assert max_delta(host(fast.policy), host(slow.policy)) < 1e-6
    assert max_delta(host(fast.policy), host(params)) > 1e-4  # it did train
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert m_fast[key] == pytest.approx(float(m_slow[key]), abs=1e-6), key
    # The gap to the sampler's (all-zero) logprobs: the same number both ways.
    assert m_fast["rollout/logprob_gap_mean"] == pytest.approx(
        float(m_old["rollout/logprob_gap_mean"]), rel=1e-5
    )
    with pytest.raises(ValueError, match="on_policy needs"):
        Learner(MCFG, GRPO).train_step(state, batch, on_policy=True)
