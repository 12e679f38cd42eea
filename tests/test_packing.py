"""Sequence packing (`rlver_jax.rl.packing`): the layout, the packed forward, and a packed
learner update equal to the padded one."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import forward, init_params, positions_from_mask, segment_parts
from rlver_jax.rl import packing
from rlver_jax.rl.learner import Learner, LearnerConfig, LearnerConfigError
from rlver_jax.rl.model_outputs import policy_outputs
from rlver_jax.rl.optim import strided_split
from rlver_jax.trajectories import Trajectories

FAST = {"xla_backend_optimization_level": 0}
MCFG = ModelConfig(
    family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
)  # fmt: skip
N, T = 16, 32
BASE = dict(
    seq_buckets=(T,), actor_lr=1e-3, critic_lr=4e-3, actor_warmup_ratio=0.0,
    critic_warmup_ratio=0.0, total_steps=100, adam_eps=1e-4,
)  # fmt: skip


def make_traj(seed: int, n: int = N, lo: int = 6, hi: int = 20) -> Trajectories:
    """Right-padded rows of ``lo..hi`` tokens: a 3-token prompt, then policy tokens with a
    2-token user turn in the middle; scores 0 / 1 alternate, groups of 4."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    tokens = rng.integers(1, MCFG.vocab_size, (n, T)).astype(np.int32)
    token_mask = np.arange(T)[None] < lengths[:, None]
    loss_mask = (np.arange(T)[None] >= 3) & token_mask
    loss_mask[:, 5:7] = False
    scores = (np.arange(n) % 2).astype(np.float32)
    rewards = np.zeros((n, T), np.float32)
    rewards[np.arange(n), lengths - 1] = scores
    return Trajectories(
        tokens=np.where(token_mask, tokens, 0), token_mask=token_mask, loss_mask=loss_mask,
        sampler_logprobs=np.where(loss_mask, -1.5, 0.0).astype(np.float32), rewards=rewards,
        scores=scores, group_ids=(np.arange(n) // 4).astype(np.int32),
        dialogue_ids=np.arange(n, dtype=np.int32), format_ok=np.ones(n, bool),
    )  # fmt: skip


@pytest.fixture(scope="module")
def params() -> Any:
    return jax.jit(init_params, static_argnums=0, compiler_options=FAST)(MCFG, jax.random.key(0))


def test_layout_keeps_samples_whole_in_their_mini_batch_and_fills_micro_batches_first() -> None:
    traj = make_traj(0)
    mask = np.asarray(traj.token_mask)
    lengths = mask.sum(1)
    n_mini, n_micro = 2, 4
    p = packing.plan_packing(mask, n_mini, n_micro)
    gather, seg = p.gather, p.segment_ids
    # Every real token is placed exactly once; padding slots read the zero entry.
    placed = gather[gather < N * T]
    assert sorted(placed.tolist()) == sorted(np.flatnonzero(mask.reshape(-1)).tolist())
    assert np.array_equal(seg > 0, gather < N * T)
    mini_of_row = np.empty(N, int)
    for k, rows in enumerate(np.asarray(strided_split(np.arange(N), n_mini, n_micro))):
        mini_of_row[rows.reshape(-1)] = k
    for i in range(N):  # contiguous, in order, in one row of the same mini-batch, own segment
        where = np.argwhere((gather // T == i) & (gather < N * T))
        row = where[0, 0]
        assert (where[:, 0] == row).all() and mini_of_row[row] == mini_of_row[i]
        cols = where[:, 1]
        assert np.array_equal(gather[row, cols] % T, np.arange(lengths[i]))
        assert np.array_equal(cols, cols[0] + np.arange(lengths[i]))
        assert len(set(seg[row, cols].tolist())) == 1
    # Packed: fewer rows than samples, and the filled rows are whole leading micro-batches.
    used = (seg > 0).any(1)
    assert used.sum() < N
    micro_used = np.asarray(strided_split(used, n_mini, n_micro)).any(-1)  # [n_mini, n_micro]
    for k in range(n_mini):
        j = micro_used[k].sum()
        assert micro_used[k, :j].all() and not micro_used[k, j:].any()
    assert packing.filled_rows(seg, n_mini, n_micro) == micro_used.sum() * (N // 8)
    assert packing.packed_rows(lengths, n_mini, n_micro, T) == micro_used.sum() * (N // 8)
    # unpack(pack(x)) == x off each sample's first token.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(N, T)).astype(np.float32))
    back = np.asarray(packing.unpack(packing.pack(x, gather), p.scatter))
    expect = np.where(mask, np.asarray(x), 0.0)
    expect[:, 0] = 0.0
    np.testing.assert_array_equal(back, expect)


def test_layout_rejects_rows_with_holes() -> None:
    mask = np.ones((4, 8), bool)
    mask[1, 3] = False
    with pytest.raises(ValueError, match="right-padded"):
        packing.plan_packing(mask, 1, 2)


def test_segment_positions_restart_per_segment() -> None:
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    expect = [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))]
    np.testing.assert_array_equal(np.asarray(positions_from_mask(seg)), expect)
    # Booleans keep their meaning (left padding: position 0 until the first real token).
    left = jnp.array([[False, False, True, True]])
    np.testing.assert_array_equal(np.asarray(positions_from_mask(left)), [[0, 0, 0, 1]])


def test_packed_forward_equals_each_sample_alone(params: Any) -> None:
    traj = make_traj(2)
    p = packing.plan_packing(traj.token_mask, 1, 4)
    tokens, mask = jnp.asarray(traj.tokens), jnp.asarray(traj.token_mask)
    alone, _ = policy_outputs(params, tokens, mask, MCFG)
    packed_tokens = packing.pack(tokens, p.gather)
    packed, _ = policy_outputs(params, packed_tokens, jnp.asarray(p.segment_ids), MCFG)
    got = np.asarray(packing.unpack(packed, p.scatter))
    want = np.where(mask, np.asarray(alone), 0.0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert (p.segment_ids.max(1) > 1).any()  # some row really holds several samples
    with pytest.raises(ValueError, match="segment ids"):
        from rlver_jax.models.kv_cache import init_cache

        forward(params, packed_tokens, positions_from_mask(jnp.asarray(p.segment_ids)),
                jnp.asarray(p.segment_ids), MCFG, init_cache(MCFG, N, T))  # fmt: skip


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("ppo", {"critic_mask": "response"}),
        # the default run's time limit: the GRPO case (reference KL) runs with `-m slow`
        pytest.param("grpo", {"kl_coef": 0.01, "kl_kind": "k3"}, marks=pytest.mark.slow),
    ],
)  # critic + GAE (values from the first policy token on) / reference KL
def test_packed_updates_equal_the_padded_update(
    params: Any, algo: str, extra: dict[str, Any]
) -> None:
    """Padded rows, packed rows, and packed rows with each group's prompt shared: two steps
    each on batches whose groups share 4-9-token prompts, the same params and metrics."""
    results = []
    for pack, share in ((False, False), (True, False), (True, True)):
        cfg = LearnerConfig(
            algorithm=algo, mini_batch_size=8, micro_batch_size=2, ppo_epochs=2,
            pack_sequences=pack, share_prefixes=share, **BASE, **extra,
        )  # fmt: skip
        learner = Learner(MCFG, cfg, compiler_options=FAST)
        state = learner.init_state(params, jax.random.key_data(jax.random.key(1)))
        for step in range(2):
            state, metrics = learner.update(state, shared_traj(10 + step))
        results.append((jax.device_get(state), metrics, learner))
    (padded, m_pad, _), *packed_runs = results
    keys = ["actor/pg_loss", "actor/entropy", "actor/grad_norm", "rollout/logprob_gap_mean"]
    keys += ["critic/vf_loss"] if algo == "ppo" else []
    for packed, m_packed, _ in packed_runs:
        models = (padded.policy, padded.critic), (packed.policy, packed.critic)  # critic: PPO
        for a, b in zip(jax.tree.leaves(models[0]), jax.tree.leaves(models[1]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
        for key in keys:
            assert m_packed[key] == pytest.approx(m_pad[key], rel=1e-4, abs=1e-6), key
        assert m_packed["skipped"] == 0.0
    batch = shared_traj(11)
    (_, _, plain), (_, _, shared) = packed_runs
    computed = [lr.laid_out_tokens(lr.pad(batch)) for lr in (plain, shared)]
    assert plain.filled_rows(plain.pad(batch)) < N  # packing computes on fewer rows
    assert computed[1] < computed[0] == int(np.asarray(batch.token_mask).sum())  # prompts once


def test_packed_updates_do_not_recompile(params: Any) -> None:
    cfg = LearnerConfig(
        algorithm="ppo", mini_batch_size=8, micro_batch_size=2, pack_sequences=True, **BASE
    )
    learner = Learner(MCFG, cfg, compiler_options=FAST)
    state = learner.init_state(params, jax.random.key_data(jax.random.key(2)))
    state, _ = learner.update(state, make_traj(20))
    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # other lengths, other row counts per micro-batch: same shapes
        state, _ = learner.update(state, make_traj(21, lo=3, hi=10))
        state, _ = learner.update(state, make_traj(22, lo=16, hi=32))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_packed_pad_picks_the_bucket_with_the_fewest_computed_tokens() -> None:
    traj = make_traj(3, n=4, lo=10, hi=10)  # four 10-token samples in 32-wide rows
    kw = dict(BASE, seq_buckets=(16, 20, 40), mini_batch_size=4, micro_batch_size=1)
    packed = Learner(MCFG, LearnerConfig(pack_sequences=True, **kw)).pad(traj)
    # 16: one sample per row (4 x 16 = 64 tokens computed); 20: two per row (2 x 20 = 40);
    # 40: four in one row (1 x 40 = 40): the tie goes to the shorter rows.
    assert packed.tokens.shape == (4, 20)
    np.testing.assert_array_equal(packed.tokens[:, :10], np.asarray(traj.tokens)[:, :10])
    assert not np.asarray(packed.token_mask)[:, 10:].any()
    padded = Learner(MCFG, LearnerConfig(pack_sequences=False, **kw)).pad(traj)
    assert padded.tokens.shape == (4, 40)  # unpacked: the smallest bucket holding the rows
    with pytest.raises(ValueError, match="exceeds the largest bucket 40"):
        packing.best_row_length(np.array([10, 41]), 1, 2, (16, 20, 40))


def test_packing_needs_token_mean() -> None:
    with pytest.raises(LearnerConfigError, match="pack_sequences"):
        LearnerConfig(pack_sequences=True, loss_agg="seq-mean-token-mean")


# ------------------------------------------------------------------ shared prefixes
def shared_traj(seed: int, n: int = N) -> Trajectories:
    """`make_traj` rows whose groups of 4 share a prompt of 4-9 tokens (the loss starts after
    it); one group's members also agree on their first policy token (not shared: loss)."""
    traj = make_traj(seed, n, lo=12, hi=24)
    rng = np.random.default_rng(seed + 100)
    tokens, loss = np.array(traj.tokens), np.array(traj.token_mask)
    for g in range(n // 4):
        rows, prompt = slice(4 * g, 4 * g + 4), int(rng.integers(4, 10))
        tokens[rows, :prompt] = tokens[4 * g, :prompt]
        loss[rows, :prompt] = False
    tokens[4:8, 9] = tokens[4, 9]
    loss[4:8, 9] = True
    return traj.replace(tokens=tokens, loss_mask=loss)


def test_shared_prefix_layout_holds_each_group_prompt_once() -> None:
    traj = shared_traj(0)
    mask, tokens = np.asarray(traj.token_mask), np.asarray(traj.tokens)
    share = packing.Share(tokens, np.asarray(traj.loss_mask), np.asarray(traj.group_ids))
    plain = packing.plan_packing(mask, 1, 4)
    p = packing.plan_packing(mask, 1, 4, share)
    own, prefix = (np.asarray(x) for x in segment_parts(jnp.asarray(p.segment_ids)))
    # each prefix segment is held once for all the member segments behind it (rows of T = 32
    # tokens hold 1-3 members of a group of 4, each such item with its own prefix copy)
    saved = 0
    for row in range(N):
        for seg in np.unique(prefix[row][prefix[row] > 0]):
            members = len(np.unique(own[row][prefix[row] == seg]))
            saved += (members - 1) * int((own[row] == seg).sum())
            assert members >= 2 and (prefix[row][own[row] == seg] == 0).all()
    assert saved > 0 and (p.segment_ids != 0).sum() == mask.sum() - saved
    # every sample's tokens are where the gather says, once (prefix tokens: at the first member)
    flat = np.asarray(traj.tokens).reshape(-1)
    packed = np.where(p.gather < N * T, flat[np.minimum(p.gather, N * T - 1)], 0)
    np.testing.assert_array_equal(packed != 0, p.segment_ids != 0)
    lengths = mask.sum(1)
    assert packing.packed_rows(lengths, 1, 4, T, share) <= packing.packed_rows(lengths, 1, 4, T)
    assert (plain.segment_ids != 0).sum() == mask.sum()


def test_shared_prefix_forward_equals_each_sample_alone(params: Any) -> None:
    traj = shared_traj(1)
    share = packing.Share(*(np.asarray(x) for x in (traj.tokens, traj.loss_mask, traj.group_ids)))
    p = packing.plan_packing(traj.token_mask, 1, 4, share)
    assert (np.asarray(segment_parts(jnp.asarray(p.segment_ids))[1]) > 0).any()
    tokens, mask = jnp.asarray(traj.tokens), jnp.asarray(traj.token_mask)
    seg, packed_tokens = jnp.asarray(p.segment_ids), packing.pack(tokens, p.gather)
    alone, alone_ent = policy_outputs(params, tokens, mask, MCFG)
    packed, packed_ent = policy_outputs(params, packed_tokens, seg, MCFG)
    for got, want in ((packed, alone), (packed_ent, alone_ent)):
        got = np.asarray(packing.unpack(got, p.scatter))
        np.testing.assert_allclose(got, np.where(mask, np.asarray(want), 0.0), atol=2e-5, rtol=0)


def test_share_prefixes_needs_packing() -> None:
    with pytest.raises(LearnerConfigError, match="share_prefixes"):
        LearnerConfig(share_prefixes=True)
    long = np.ones((1, 1 << 15), bool)
    share = packing.Share(long.astype(np.int32), ~long, np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="prefix sharing needs rows under 32768 tokens"):
        packing.plan_packing(long, 1, 1, share)
