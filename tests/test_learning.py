"""The tiny config learns: for PPO and GRPO, think and plain, the mean reward of the last 5 steps
clearly exceeds that of the first 5 (seeded runs of configs/tiny_cpu.yaml against the reference
user). Slow (minutes per arm on CPU): opt in with ``pytest -m slow tests/test_learning.py``.

Each arm prints its reward curve (``-s`` shows it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlver_jax.rl.trainer import train
from rlver_jax.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
MARGIN = 0.03  # reward is final emotion / 100; the untrained tiny policy scores about 0.1
ARMS = {
    "ppo": [],
    # G = 4 clones of 2 profiles: the same 8 dialogues per step as PPO's 8 x 1
    "grpo": [
        "learner.algorithm=grpo",
        "rollout.profiles_per_batch=2",
        "rollout.samples_per_profile=4",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["think", "plain"])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_tiny_config_learns(algorithm: str, mode: str, tmp_path: Path) -> None:
    overrides = [
        *ARMS[algorithm],
        f"scaffold.mode={mode}",
        f"trainer.steps={STEPS}",
        f"learner.total_steps={STEPS}",
        f"output_dir={tmp_path}",
        "trainer.progress_bar=false",
    ]
    summary = train(load_run_config(REPO / "configs" / "tiny_cpu.yaml", overrides))
    rewards = np.asarray(summary.rewards)
    first, last = rewards[:5].mean(), rewards[-5:].mean()
    print(
        f"\n{algorithm}/{mode}: first-5 {first:.3f} last-5 {last:.3f} "
        f"({summary.wall_s:.0f}s)\n  curve: {' '.join(f'{r:.3f}' for r in rewards)}"
    )
    assert len(rewards) == STEPS
    assert last > first + MARGIN, f"{algorithm}/{mode} did not learn: {rewards.round(3)}"
