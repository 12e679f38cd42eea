"""The tiny config learns: for PPO and GRPO, think and plain, the mean reward of the last 5 steps
clearly exceeds that of the first 5 (seeded runs of configs/tiny_cpu.yaml against the reference
user). Slow (minutes per arm on CPU): opt in with ``pytest -m slow tests/test_learning.py``.
The GRPO plain arm also runs with bf16 params (``model.param_dtype=bfloat16``, bf16 compute) and
must learn by the same margin (the precision policy: docs/architecture.md).

Each arm runs the real command (``rlver-jax train --config configs/tiny_cpu.yaml ...``) in a
subprocess on one CPU device, as a user would (the test session's 8 fake devices would shard a
4-row batch 8 ways, several times slower on CPU). Each arm prints its reward curve (``-s``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlver_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
MARGIN = 0.03  # reward is final emotion / 100; the untrained tiny policy scores about 0.11
ARMS = {
    "ppo": [],
    # G = 4 clones of 2 profiles: the same 8 dialogues per step as PPO's 8 x 1
    "grpo": [
        "learner.algorithm=grpo",
        "rollout.profiles_per_batch=2",
        "rollout.samples_per_profile=4",
    ],
}


BF16 = ["model.param_dtype=bfloat16", "model.dtype=bfloat16"]


def train_rewards(label: str, overrides: list[str], tmp_path: Path) -> np.ndarray:
    """Run ``rlver-jax train`` on configs/tiny_cpu.yaml for ``STEPS`` steps with ``overrides``
    (one CPU device, a subprocess); print and return its per-step ``reward/mean``."""
    overrides = [
        *overrides,
        f"trainer.steps={STEPS}",
        f"learner.total_steps={STEPS}",
        f"output_dir={tmp_path}",
        "trainer.progress_bar=false",
    ]
    cmd = [sys.executable, "-m", "rlver_jax.cli.main", "train", "--config"]
    cmd += [str(REPO / "configs" / "tiny_cpu.yaml"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path)
    rewards = np.asarray([r["reward/mean"] for r in records])
    first, last = rewards[:5].mean(), rewards[-5:].mean()
    wall = sum(r["time/step"] for r in records)
    print(
        f"\n{label}: first-5 {first:.3f} last-5 {last:.3f} ({wall:.0f}s in steps)\n"
        f"  curve: {' '.join(f'{r:.3f}' for r in rewards)}"
    )
    assert len(rewards) == STEPS
    return rewards


def assert_learned(label: str, rewards: np.ndarray) -> None:
    first, last = rewards[:5].mean(), rewards[-5:].mean()
    assert last > first + MARGIN, f"{label} did not learn: {rewards.round(3)}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["think", "plain"])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_tiny_config_learns(algorithm: str, mode: str, tmp_path: Path) -> None:
    label = f"{algorithm}/{mode}"
    overrides = [*ARMS[algorithm], f"scaffold.mode={mode}"]
    assert_learned(label, train_rewards(label, overrides, tmp_path))


@pytest.mark.slow
def test_tiny_grpo_learns_with_bf16_params(tmp_path: Path) -> None:
    """bf16 params and compute (fp32 moments and update math) learn as the fp32 arm
    ``test_tiny_config_learns[grpo-plain]`` does, by the same margin."""
    label = "grpo/plain bf16 params"
    rewards = train_rewards(label, [*ARMS["grpo"], "scaffold.mode=plain", *BF16], tmp_path)
    assert_learned(label, rewards)
