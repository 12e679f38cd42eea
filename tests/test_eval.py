"""Tests of the Sentient-style benchmark (`eval/sentient.py`), `rlver-jax eval` and
`rlver-jax export`.

Scoring rules run on synthetic dialogues. The protocol and the commands run a tiny random policy
(tiny tokenizer) against the reference user. The export round trip writes a training checkpoint
in the trainer's layout (a whole `TrainState` via `rl.checkpoint.Checkpointer`), exports it,
loads the HF directory in transformers (same logits as our forward), and checks that
`eval --hf <export>` replays exactly the dialogues of `eval --checkpoint <run>`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rlver_jax.cli import main as cli
from rlver_jax.config_io import ConfigError
from rlver_jax.env import dynamics
from rlver_jax.eval.sentient import read_jsonl, sentient_scores, summarize, write_eval
from rlver_jax.eval.stats import emotion_matrix
from rlver_jax.run_config import check_training_lengths, load_run_config
from tests.helpers import PNG_MAGIC, write_checkpoint, write_tiny_config


def synthetic(finals_and_paths: list[list[int]], reasons: list[str] | None = None) -> list[dict]:
    """Transcripts with given emotion trajectories (one reply per change)."""
    out = []
    for i, emotions in enumerate(finals_and_paths):
        messages: list[dict[str, Any]] = []
        for t in range(1, len(emotions)):
            messages.append({"role": "user", "content": f"user {t}"})
            messages.append({"role": "assistant", "content": f"That sounds hard, {t}.",
                             "thought": "plan", "format_ok": t != 2,
                             "emotion_after": emotions[t],
                             "change": emotions[t] - emotions[t - 1]})  # fmt: skip
        reason = (reasons or ["TURN_LIMIT"] * len(finals_and_paths))[i]
        out.append({"dialogue_id": i, "profile_id": f"p{i}", "intention": "empathy" if i % 2
                    else "solution", "personality": "neutral", "emotions": emotions,
                    "final_emotion": emotions[-1], "messages": messages,
                    "end_reason": reason})  # fmt: skip
    return out


# --------------------------------------------------------------------------- scoring
def test_sentient_scores_rules() -> None:
    s = sentient_scores([100, 99, 10, 9, 0, 50])
    assert s["n"] == 6 and s["score"] == pytest.approx((100 + 99 + 10 + 9 + 0 + 50) / 6)
    assert (s["successes"], s["failures"]) == (1, 2)  # exactly 100 succeeds; 10 does not fail
    assert s["success_rate"] == pytest.approx(1 / 6) and s["failure_rate"] == pytest.approx(2 / 6)
    s = sentient_scores(np.asarray([100.0, 100.0]))
    assert (s["score"], s["success_rate"], s["failure_rate"]) == (100.0, 1.0, 0.0)
    s = sentient_scores([9.99, 10.0], success_threshold=90, failure_threshold=10)
    assert (s["successes"], s["failures"]) == (0, 1)
    with pytest.raises(ValueError, match="no dialogues"):
        sentient_scores([])


def test_emotion_matrix_and_summary() -> None:
    ts = synthetic([[40, 50, 60], [40, 30], [40, 45, 55, 70]], ["SCORE_FULL", "GOODBYE", "X"])
    m = emotion_matrix(ts, 5)
    assert m.tolist() == [[40, 50, 60, 60, 60], [40, 30, 30, 30, 30], [40, 45, 55, 70, 70]]
    assert emotion_matrix(ts).shape == (3, 4)
    s = summarize(ts)
    assert s["score"] == pytest.approx((60 + 30 + 70) / 3) and s["n"] == 3
    assert s["end_reasons"] == {"SCORE_FULL": 1, "GOODBYE": 1, "X": 1}
    assert s["turns_mean"] == pytest.approx(6 / 3)
    assert s["format_break_rate"] == pytest.approx(2 / 6)  # turn 2 of two dialogues
    assert len(s["trajectory_mean"]) == dynamics.DEFAULT_CONFIG.max_turns_eval + 1
    assert s["trajectory_mean"][:3] == pytest.approx([40, 125 / 3, 145 / 3])
    assert s["trajectory_mean"][-1] == pytest.approx(s["score"])
    assert s["score_by_intention"] == {"empathy": 30.0, "solution": 65.0}


def test_write_eval_files(tmp_path: Path) -> None:
    import matplotlib.image

    from rlver_jax.eval.capability import ReferenceCapabilityJudge
    from rlver_jax.model_io.tokenizer import Tokenizer

    ts = synthetic([[40, 50, 100], [40, 20, 5], [40, 45, 55]])
    judge = ReferenceCapabilityJudge(Tokenizer.tiny())
    s = write_eval(tmp_path, ts, scaffold="think", label="m", judge=judge, seed=1,
                   bootstrap_samples=100, extra={"policy": {"kind": "test"}})  # fmt: skip
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    assert on_disk["score"] == pytest.approx(160 / 3) and on_disk["successes"] == 1
    assert on_disk["failures"] == 1 and on_disk["policy"] == {"kind": "test"}
    assert read_jsonl(tmp_path / "transcripts.jsonl") == ts
    caps = read_jsonl(tmp_path / "capability.jsonl")
    assert [c["dialogue_id"] for c in caps] == [0, 1, 2]
    assert on_disk["capability"]["empathic_depth"]["mean"] == pytest.approx(
        np.mean([c["empathic_depth"] for c in caps])
    )
    png = tmp_path / "emotion_trajectories.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and matplotlib.image.imread(png).ndim == 3


# --------------------------------------------------------------------------- protocol
def test_benchmark_protocol(tmp_path: Path) -> None:
    """SAGE protocol with the default dynamics: start 40, first_talk opens, <= 10 replies,
    eval endings; dialogues numbered in profile order across batches."""
    from rlver_jax import components
    from rlver_jax.eval.sentient import benchmark_rollout_config, run_benchmark

    cfg = load_run_config(
        write_tiny_config(tmp_path / "c.yaml", tmp_path), ["dynamics.max_turns_eval=10"]
    )
    mesh = components.build_mesh(cfg)
    params, _, tok, sampler = components.build_policy(cfg.model, mesh, cfg)
    user = components.build_user(cfg, mesh, tok)
    rollout = benchmark_rollout_config(cfg.rollout, batch_size=2)
    assert (rollout.mode, rollout.samples_per_profile) == ("eval", 1)
    engine = components.build_engine(dataclasses.replace(cfg, rollout=rollout), sampler, tok, user)
    profiles = components.load_split(cfg, "test")[:3]
    ts, _ = run_benchmark(engine, params, profiles, seed=0)
    assert [t["dialogue_id"] for t in ts] == [0, 1, 2]
    assert [t["profile_id"] for t in ts] == [p.id for p in profiles]
    for t, p in zip(ts, profiles, strict=True):
        replies = [m for m in t["messages"] if m["role"] == "assistant"]
        assert t["emotions"][0] == 40 and t["messages"][0]["content"] == p.first_talk
        assert 1 <= len(replies) <= 10 and len(t["emotions"]) == len(replies) + 1
        final = t["final_emotion"]
        want = {100: "SCORE_FULL", 0: "SCORE_ZERO"}.get(final)
        if want is None and final < 10:
            want = "SCORE_LOW"
        if want is None and len(replies) == 10:
            want = "TURN_LIMIT"
        assert t["end_reason"] == (want or "GOODBYE")
        assert all(e >= 10 for e in t["emotions"][:-1])  # nothing continues below 10
    with pytest.raises(ValueError, match="mode='eval'"):
        run_benchmark(components.build_engine(cfg, sampler, tok, user), params, profiles, seed=0)
    # `play` (the benchmark's) plays exactly the dialogues of `run` (training's), without samples
    played = engine.play(params, profiles[:2], seed=0)
    ran = engine.run(params, profiles[:2], seed=0)
    assert played.transcripts == ran.transcripts
    turns = sum(len(t["emotions"]) - 1 for t in ran.transcripts)  # think: one sample per turn
    assert ran.metrics["samples"] == ran.trajectories.num_samples == turns
    assert "samples" not in played.metrics


# --------------------------------------------------------------------------- length limits
SHORT_BUCKETS = ["rollout.seq_len_buckets=[64]", "learner.seq_buckets=[64]"]


def test_eval_needs_no_training_buckets(tmp_path: Path) -> None:
    """Evaluation trains nothing: training buckets far below its dialogues' lengths (the think
    system prompt alone is ~600 tokens) do not matter to it (a crash before: "a sample of N
    tokens exceeds the largest seq_len bucket"), while training refuses them before any work."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    out = tmp_path / "ev"
    argv = ["eval", "--config", str(config), "--limit", "2", "--batch-size", "2", "--judge",
            "none", "--out", str(out), "dynamics.max_turns_eval=4", *SHORT_BUCKETS]  # fmt: skip
    assert cli.main(argv) == 0
    ts = read_jsonl(out / "transcripts.jsonl")
    assert json.loads((out / "summary.json").read_text())["n"] == len(ts) == 2
    assert any(len(t["emotions"]) > 2 for t in ts)  # multi-turn dialogues, all longer than 64

    cfg = load_run_config(config, SHORT_BUCKETS, training=False)
    with pytest.raises(ConfigError, match=r"rollout\.seq_len_buckets"):
        check_training_lengths(cfg)
    from rlver_jax.trainer import train

    with pytest.raises(ConfigError, match=r"rollout\.max_prompt_tokens"):
        train(cfg)  # refused at the trainer's start, before it writes anything
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (SHORT_BUCKETS, ("rollout.max_prompt_tokens + rollout.max_reply_tokens = 1016 + 8 = 1024",
                         "rollout.seq_len_buckets 64", "lower rollout.max_prompt_tokens to 56")),
        (["rollout.max_prompt_tokens=1024"], ("= 1032 tokens", "rollout.seq_len_buckets 1024")),
        (["rollout.seq_len_buckets=[2048]"], ("padded to the rollout.seq_len_buckets 2048",
                                              "learner.seq_buckets 1024")),
        (["rollout.seq_len_buckets=[2048]", "learner.pack_sequences=true",
          "learner.loss_agg=token-mean", "learner.seq_buckets=[512]"],
         ("= 1024 tokens", "learner.seq_buckets 512")),
        (["sampler.prompt_buckets=[512]"], ("rollout.max_prompt_tokens=1016",
                                            "sampler.prompt_buckets 512")),
        (["rollout.max_reply_tokens=2000", "rollout.max_prompt_tokens=100",
          "sampler.new_token_buckets=[16]"], ("rollout.max_reply_tokens=2000",
                                             "sampler.new_token_buckets 16")),
        (["rollout.profiles_per_batch=16", "sampler.batch_buckets=[1, 8]"],
         ("rollout.profiles_per_batch x rollout.samples_per_profile = 16", "batch_buckets 8")),
    ],
)  # fmt: skip
def test_limits_that_cannot_hold_are_config_errors(
    tmp_path: Path, overrides: list[str], keys: tuple[str, ...], capsys: pytest.CaptureFixture
) -> None:
    """A config whose length limits can be exceeded is refused when it is loaded, by `train`
    and `experiment` with one line naming the keys (exit 2), before anything is trained."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        load_run_config(config, overrides)
    assert all(k in str(err.value) for k in keys), str(err.value)
    for argv in (["train", "--config", str(config)],
                 ["experiment", "scaffold", "--config", str(config)]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, *overrides])
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "config error" in lines[0] and keys[0] in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_eval_batch_beyond_the_sampler_buckets_exits_2(tmp_path: Path, capsys) -> None:
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--config", str(config), "--batch-size", "1024", "--out",
                  str(tmp_path / "ev")])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "rollout.profiles_per_batch" in err and "sampler.batch_buckets" in err
    assert not (tmp_path / "ev").exists()


# --------------------------------------------------------------------------- commands
def test_eval_checkpoint_export_round_trip(tmp_path: Path) -> None:
    """eval --checkpoint; export -> transformers logits match; eval --hf replays the same."""
    import torch
    import transformers

    from rlver_jax.models.config import ModelConfig
    from rlver_jax.models.transformer import forward, positions_from_mask

    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "run")
    params = write_checkpoint(tmp_path / "run", config, step=3, shift=0.01)
    common = ["--config", str(config), "--limit", "3", "--batch-size", "2"]
    assert cli.main(["eval", *common, "--checkpoint", str(tmp_path / "run"),
                     "--out", str(tmp_path / "ev_ckpt")]) == 0  # fmt: skip
    s = json.loads((tmp_path / "ev_ckpt" / "summary.json").read_text())
    assert s["policy"] == {"kind": "checkpoint", "path": str(tmp_path / "run" / "checkpoints"),
                           "step": 3}  # fmt: skip
    ts = read_jsonl(tmp_path / "ev_ckpt" / "transcripts.jsonl")
    assert s["n"] == 3 and s["score"] == pytest.approx(np.mean([t["final_emotion"] for t in ts]))
    assert s["capability_judge"] == "reference" and set(s["files"]) == {
        "transcripts", "plot", "capability"}  # fmt: skip
    assert all(len(t["emotions"]) <= 3 for t in ts)  # max_turns_eval=2 from the config

    hf = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(hf)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    ids = np.asarray([tok.encode("I hear you, that sounds hard.")], np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    mcfg = ModelConfig.from_hf_dir(hf)
    mask = np.ones_like(ids, bool)
    ours, _ = forward(params, ids.astype(np.int32), positions_from_mask(mask), mask, mcfg)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=1e-4)

    assert cli.main(["eval", *common, "--hf", str(hf), "--out", str(tmp_path / "ev_hf")]) == 0
    again = read_jsonl(tmp_path / "ev_hf" / "transcripts.jsonl")
    assert again == ts  # same weights, tokenizer and seeds: the same dialogues


def test_export_errors(tmp_path: Path) -> None:
    from rlver_jax.policy_checkpoint import resolve_checkpoint_dir
    from rlver_jax.rl.checkpoint import CheckpointNotFoundError

    with pytest.raises(FileNotFoundError):
        resolve_checkpoint_dir(tmp_path / "missing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError):
        cli.main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    (tmp_path / "r" / "checkpoints" / "7" / "state").mkdir(parents=True)
    assert resolve_checkpoint_dir(tmp_path / "r" / "checkpoints" / "7") == (
        tmp_path / "r" / "checkpoints", 7)  # fmt: skip
    assert resolve_checkpoint_dir(tmp_path / "r") == (tmp_path / "r" / "checkpoints", None)
