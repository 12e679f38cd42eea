"""Tests of `rlver-jax experiment scaffold` (`eval/experiment.py`) and its report.

The fast test runs the whole experiment on a test-local tiny config with a stand-in trainer
(it writes each arm's metrics.jsonl and a checkpoint in the trainer's layout) and the real
evaluations; the slow one runs the real trainer through the command line. Both check that every
part of the report exists (PNGs are valid images) and that its numbers are the runs' own
(metrics.jsonl, eval summary.json / transcripts.jsonl / capability.jsonl).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlver_jax.cli import main as cli
from rlver_jax.eval.capability import DIMENSIONS
from rlver_jax.eval.experiment import (
    ARMS,
    MODELS,
    REWARD_KEY,
    arm_config,
    run_scaffold_experiment,
    training_stats,
    write_report,
)
from rlver_jax.eval.sentient import read_jsonl
from rlver_jax.eval.stats import bootstrap_diff_ci
from rlver_jax.metrics import read_metrics
from rlver_jax.run_config import RunConfig, load_run_config
from tests.helpers import PNG_MAGIC, write_checkpoint, write_tiny_config

REPORT_FILES = (
    "README.md", "reward_curves.png", "capability_radar.png", "sentient_scores.md",
    "capability.md", "differences.md", "examples.md", "report.json",
)  # fmt: skip
FAKE_REWARDS = {"think": [0.1, 0.25, 0.3], "plain": [0.2, 0.15, 0.22]}


def check_report(out: Path) -> dict[str, Any]:
    """Every report file exists, PNGs are images, and each number equals the runs' files."""
    import matplotlib.image

    rep = out / "report"
    for name in REPORT_FILES:
        assert (rep / name).is_file(), name
        if name.endswith(".png"):
            assert (rep / name).read_bytes()[:8] == PNG_MAGIC
            assert matplotlib.image.imread(rep / name).ndim == 3
    data = json.loads((rep / "report.json").read_text())
    readme = (rep / "README.md").read_text()
    for arm in ARMS:
        records = read_metrics(out / arm / "metrics.jsonl")
        steps = [r["step"] for r in records]
        values = [r[REWARD_KEY] for r in records]
        assert data["reward_curves"][arm] == {"steps": steps, "values": values}
        t = data["training"][arm]
        assert t == training_stats(steps, values) and t["last_reward"] == values[-1]
        assert f"| {arm} | {steps[-1]} | {values[0]:.4f} | {values[-1]:.4f} |" in readme
    finals = {}
    for m in MODELS:
        d = out / "eval" / m
        summary = json.loads((d / "summary.json").read_text())
        ts = read_jsonl(d / "transcripts.jsonl")
        caps = read_jsonl(d / "capability.jsonl")
        finals[m] = [t["final_emotion"] for t in ts]
        e = data["eval"][m]
        assert e["score"] == summary["score"] == pytest.approx(np.mean(finals[m]))
        assert e["success_rate"] == summary["success_rate"] and e["n"] == len(ts)
        assert e["failure_rate"] == summary["failure_rate"]
        for dim in DIMENSIONS:
            want = np.mean([c[dim] for c in caps])
            assert e["capability"][dim] == summary["capability"][dim]["mean"] == pytest.approx(want)
        row = f"| {m} | {summary['scaffold']} | {summary['score']:.2f} |"
        assert row in readme and row in (rep / "sentient_scores.md").read_text()
        assert f"![{m} trajectories](../eval/{m}/emotion_trajectories.png)" in readme
        assert (d / "emotion_trajectories.png").read_bytes()[:8] == PNG_MAGIC
    diff = data["differences"]["think-plain"]
    assert diff["final_emotion"]["paired"] is True  # same test profiles, same order
    assert diff["final_emotion"]["mean"] == pytest.approx(
        np.mean(finals["think"]) - np.mean(finals["plain"])
    )
    think_caps = read_jsonl(out / "eval" / "think" / "capability.jsonl")
    plain_caps = read_jsonl(out / "eval" / "plain" / "capability.jsonl")
    for dim in DIMENSIONS:
        a, b = [c[dim] for c in think_caps], [c[dim] for c in plain_caps]
        assert diff[dim]["mean"] == pytest.approx(np.mean(a) - np.mean(b))
        assert diff[dim]["lo"] <= diff[dim]["mean"] + 1e-12 <= diff[dim]["hi"] + 2e-12
    assert "**think - plain**" in (rep / "differences.md").read_text()
    assert "#### think: dialogue 0" in (rep / "examples.md").read_text()
    assert "Empathic Depth" in (rep / "capability.md").read_text()
    return data


def fake_train(cfg: RunConfig) -> None:
    """Stand-in for `trainer.train`: metrics.jsonl and a final checkpoint, trainer layout."""
    from rlver_jax.metrics import MetricsWriter

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    arm = cfg.scaffold.mode
    with MetricsWriter(out, tensorboard=False) as writer:
        for step, reward in enumerate(FAKE_REWARDS[arm], start=1):
            writer.write(step, {REWARD_KEY: reward, "actor/pg_loss": 0.1})
    write_checkpoint(out, cfg, step=3, shift=0.02 if arm == "think" else -0.02)


def test_arm_config_changes_only_the_scaffold(tmp_path: Path) -> None:
    cfg = load_run_config(write_tiny_config(tmp_path / "tiny.yaml", tmp_path))
    think, plain = (arm_config(cfg, a, tmp_path / "x") for a in ARMS)
    assert (think.scaffold.mode, plain.scaffold.mode) == ("think", "plain")
    assert think.output_dir == str(tmp_path / "x" / "think") and plain.name == "tiny_eval-plain"
    assert think.seed == plain.seed == cfg.seed and think.user == plain.user == cfg.user
    assert think.learner == plain.learner and think.rollout == plain.rollout
    assert think.scaffold.format_break_reward == plain.scaffold.format_break_reward


def test_scaffold_experiment_report(tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path)
    cfg = load_run_config(config)
    data = run_scaffold_experiment(
        cfg, tmp_path, train_fn=fake_train, eval_limit=2, eval_batch_size=2,
        bootstrap_samples=200, examples=1, command="rlver-jax experiment scaffold (test)",
    )  # fmt: skip
    assert data == check_report(tmp_path)
    assert data["training"]["think"]["last_reward"] == FAKE_REWARDS["think"][-1]
    assert data["eval"]["base"]["scaffold"] == "plain"  # the base model runs plain by default
    assert data["eval"]["think"]["policy"]["kind"] == "checkpoint"
    assert data["eval"]["think"]["policy"]["step"] == 3
    readme = (tmp_path / "report" / "README.md").read_text()
    assert readme.startswith("# Think vs plain: tiny_eval")
    assert "Command: `rlver-jax experiment scaffold (test)`" in readme

    # The report is a pure function of the files: rebuilding it gives the same numbers.
    (tmp_path / "report" / "report.json").unlink()
    command = "rlver-jax experiment scaffold (test)"
    again = write_report(tmp_path, bootstrap_samples=200, seed=cfg.seed, examples=1,
                         command=command, title="tiny_eval")  # fmt: skip
    assert again == data
    # ... and it follows the files: a changed metrics file changes the report.
    with (tmp_path / "plain" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, REWARD_KEY: 0.5}) + "\n")
    changed = write_report(tmp_path, bootstrap_samples=200, seed=cfg.seed)
    assert changed["training"]["plain"]["last_reward"] == 0.5
    check_report(tmp_path)


def test_training_stats() -> None:
    from rlver_jax import trainer

    assert trainer.REWARD_KEY == REWARD_KEY  # the curve plots what the trainer logs
    s = training_stats([1, 2, 3, 4, 5, 6, 7, 8], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
    assert s["tail_steps"] == 2 and s["tail_mean_reward"] == pytest.approx(0.8)
    assert (s["first_reward"], s["last_reward"], s["max_reward"], s["steps"]) == (0.1, 0.9, 0.9, 8)
    assert training_stats([], []) == {"steps": 0}
    ci = bootstrap_diff_ci([1.0, 2.0], [1.0, 2.0])
    assert ci.mean == 0.0


@pytest.mark.slow
def test_experiment_command_with_trainer(tmp_path: Path) -> None:
    """The real command: both arms trained by `trainer.train` (2 steps each)."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tmp_path / "exp")
    argv = ["experiment", "scaffold", "--config", str(config), "--eval-limit", "2",
            "--eval-batch-size", "2", "--bootstrap", "200", "trainer.steps=2"]  # fmt: skip
    assert cli.main(argv) == 0
    out = tmp_path / "exp"
    data = check_report(out)
    for arm in ARMS:
        saved = yaml.safe_load((out / arm / "config.yaml").read_text())
        assert saved["scaffold"]["mode"] == arm and saved["seed"] == 0
        assert [r["step"] for r in read_metrics(out / arm / "metrics.jsonl")] == [1, 2]
        assert data["eval"][arm]["policy"]["step"] == 2
    assert data["command"].startswith("rlver-jax experiment scaffold --config")
