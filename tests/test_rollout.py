"""Rollout engine: lockstep dialogues of a tiny random policy with the reference user."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rlver_jax.env.profiles import load_builtin_profiles
from rlver_jax.env.reference_user import ReferenceUser
from rlver_jax.env.rollout import RolloutConfig, RolloutEngine, write_transcripts
from rlver_jax.model_io.loader import ModelSpec, load_model
from rlver_jax.parallel.mesh import MeshConfig, make_mesh
from rlver_jax.sampling.sampler import Sampler
from rlver_jax.scaffold import ScaffoldConfig


@pytest.fixture(scope="module")
def tiny():
    params, config, tok = load_model(ModelSpec(source="random", hidden_size=32, num_layers=2))
    return params, config, tok, ReferenceUser(tok)


def _engine(tiny, scaffold_mode: str, mesh=None, **kw) -> tuple[RolloutEngine, object]:
    params, config, tok, user = tiny
    sampler = Sampler(config, mesh=mesh, pad_id=tok.pad_id, stop_token_ids=tok.stop_token_ids)
    cfg = RolloutConfig(profiles_per_batch=2, samples_per_profile=2, max_reply_tokens=16, **kw)
    engine = RolloutEngine(sampler, tok, user, ScaffoldConfig(mode=scaffold_mode), cfg)
    return engine, sampler.shard_params(params)


@pytest.mark.parametrize("mode", ["think", "plain"])
def test_rollout_shapes_rewards_and_transcripts(tiny, mode: str, tmp_path) -> None:
    engine, params = _engine(tiny, mode)
    profiles = load_builtin_profiles("en", "train")[:2]
    result = engine.run(params, profiles, seed=0)
    traj = result.trajectories
    traj.validate()
    assert len(result.transcripts) == 4
    # groups: 2 profiles x 2 clones, clones share the opening
    assert sorted({t["group_id"] for t in result.transcripts}) == [0, 1]
    first = [t["messages"][0]["content"] for t in result.transcripts]
    assert first[0] == first[1] and first[2] == first[3]
    for t in result.transcripts:
        # emotion trajectory: start at 30, one entry per policy turn, changes within [-10, 10]
        assert t["emotions"][0] == 30
        n_policy = sum(m["role"] == "assistant" for m in t["messages"])
        assert len(t["emotions"]) == n_policy + 1
        assert all(abs(d) <= 10 for d in np.diff(t["emotions"]))
        assert t["end_reason"] != "RUNNING"
    # reward = final emotion / 100 on the last policy token of each dialogue's last sample
    finals = {t["dialogue_id"]: max(t["final_emotion"] / 100, 0) for t in result.transcripts}
    for row in range(traj.num_samples):
        last = np.flatnonzero(traj.loss_mask[row])[-1]
        final = finals[int(traj.dialogue_ids[row])]
        expected = final if (traj.format_ok[row] or mode == "plain") else 0.0  # format rule
        assert traj.rewards[row, last] == pytest.approx(expected)
        assert np.count_nonzero(traj.rewards[row]) <= 1
    if mode == "plain":
        assert traj.num_samples == 4  # one sequence per dialogue
    else:
        turns = sum(
            sum(m["role"] == "assistant" for m in t["messages"]) for t in result.transcripts
        )
        assert traj.num_samples == turns  # one sample per policy turn
    assert 0.0 <= result.metrics["reward_mean"] <= 1.0
    path = write_transcripts(tmp_path / "t.jsonl", result.transcripts)
    assert len(path.read_text().splitlines()) == 4
    assert json.loads(path.read_text().splitlines()[0])["scaffold"] == mode


def test_rollout_is_deterministic_and_sharding_invariant(tiny) -> None:
    profiles = load_builtin_profiles("en", "test")[:2]
    engine, params = _engine(tiny, "plain")
    a = engine.run(params, profiles, seed=3)
    b = engine.run(params, profiles, seed=3)
    np.testing.assert_array_equal(a.trajectories.tokens, b.trajectories.tokens)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.devices.size == len(jax.devices()) == 8
    engine8, params8 = _engine(tiny, "plain", mesh=mesh)
    c = engine8.run(params8, profiles, seed=3)
    np.testing.assert_array_equal(a.trajectories.tokens, c.trajectories.tokens)
    np.testing.assert_array_equal(a.trajectories.rewards, c.trajectories.rewards)
    assert [t["emotions"] for t in a.transcripts] == [t["emotions"] for t in c.transcripts]


def test_eval_mode_starts_at_40_and_uses_first_talk(tiny) -> None:
    engine, params = _engine(tiny, "plain", mode="eval")
    profiles = load_builtin_profiles("en", "test")[:1]
    result = engine.run(params, profiles, seed=0)
    for t in result.transcripts:
        assert t["emotions"][0] == 40
        assert t["messages"][0]["content"] == profiles[0].first_talk
