"""Trainer: outputs of a short run, bitwise-exact resume, SIGTERM checkpoint, config errors, and
every shipped config parses.

Runs use configs/tiny_cpu.yaml shrunk further (1 layer, d=32, 2 dialogues of 1 turn, replies of
8 tokens, fast learner compiles) so the whole module stays around a minute or two on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from rlver_jax import trainer as trainer_lib
from rlver_jax.config_io import ConfigError, load_yaml
from rlver_jax.metrics import read_metrics
from rlver_jax.rl.checkpoint import Checkpointer
from rlver_jax.run_config import RunConfig, load_run_config, run_config_dict
from rlver_jax.trainer import PPO_KEYS, STEP_KEYS, config_diff, rollout_seed, train

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "rlver_jax.cli.main", "train"]
TINY = REPO / "configs" / "tiny_cpu.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SMALL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.head_dim=8",
    "scaffold.mode=plain",
    "dynamics.max_turns_train=1",
    "rollout.profiles_per_batch=2",
    "rollout.max_reply_tokens=8",
    "user.reference.max_reply_tokens=8",
    "learner.mini_batch_size=2",
    "learner.micro_batch_size=2",
    "learner.total_steps=4",
    "trainer.checkpoint_every=2",
    "trainer.log_transcripts_every=1",
    "trainer.transcripts_per_log=2",
    "trainer.fast_compile=true",
    "trainer.progress_bar=false",
]


def small_config(out: Path, *extra: str) -> RunConfig:
    return load_run_config(TINY, [*SMALL, f"output_dir={out}", *extra])


def checkpoint_arrays(out: Path) -> dict[str, np.ndarray]:
    """Every array of the latest checkpoint's state (params, optimiser moments, step, RNG)."""
    ckpt = Checkpointer(out / "checkpoints", save_every=1, keep=1)
    step = ckpt.latest_step()
    path = ckpt.step_dir(step) / "state"
    with ocp.StandardCheckpointer() as reader:
        state = reader.restore(path)
    ckpt.close()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("two")
    summary = train(small_config(out, "trainer.steps=2"))
    return out, summary


def test_two_step_run_writes_outputs(two_steps: tuple[Path, object]) -> None:
    out, summary = two_steps
    assert summary.start_step == 0 and summary.final_step == 2 and not summary.preempted
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        missing = [k for k in (*STEP_KEYS, *PPO_KEYS) if k not in r]
        assert not missing, missing
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["time/step"] >= r["time/rollout"] + r["time/learner"] - 1e-6
    assert records[0]["perf/compiles"] > 0
    assert list(out.glob("events.out.tfevents*"))
    assert summary.checkpoints == (2,)
    lines = (out / "transcripts.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 1, 2, 2]
    assert json.loads(lines[0])["messages"][0]["role"] == "user"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"]["steps"] == 2
    assert saved == run_config_dict(load_run_config(out / "config.yaml"))  # loads back as is


def test_resume_is_bitwise_exact(two_steps: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = two_steps
    resumed = train(small_config(out, "trainer.steps=4"))
    assert resumed.start_step == 2 and resumed.final_step == 4
    straight = train(small_config(tmp_path, "trainer.steps=4"))
    assert straight.rewards[2:] == resumed.rewards
    a, b = checkpoint_arrays(out), checkpoint_arrays(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the replayed logs hold each step once
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    with pytest.raises(FileExistsError, match="resume is false"):
        train(small_config(out, "trainer.steps=5", "trainer.resume=false"))


def test_exception_saves_last_good_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer_lib._rollout
    calls = []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("user simulator crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_lib, "_rollout", failing)
    with pytest.raises(RuntimeError, match="simulator crashed"):
        train(small_config(tmp_path, "trainer.steps=3", "trainer.checkpoint_every=3"))
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=1)
    assert ckpt.all_steps() == [1]  # not a periodic step: saved by the crash handler
    ckpt.close()


def test_sigterm_saves_checkpoint_before_exit(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [*CLI, "--config"]
    cmd += [str(TINY), *SMALL, f"output_dir={tmp_path}"]
    cmd += ["trainer.steps=1000", "trainer.checkpoint_every=500"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step finished in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "preempted" in out
    last = read_metrics(tmp_path)[-1]["step"]
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=1)
    assert ckpt.all_steps() == [last] and last < 1000
    ckpt.close()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.'stepz'"):
        small_config(tmp_path, "trainer.stepz=3")
    proc = subprocess.run(
        [*CLI, "--config", str(TINY), "learner.actor_lrr=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2 and "learner" in proc.stderr and "actor_lrr" in proc.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_configs_parse(path: Path, tmp_path: Path) -> None:
    data = load_yaml(path)  # the resolved tree: the 7B configs are overlays on a base
    overrides = []
    for section in ("model", "user.model"):
        node = data
        for part in section.split("."):
            node = (node or {}).get(part) or {}
        if node.get("source") in ("hf", "gguf"):
            overrides.append(f"{section}.path={tmp_path}")
    cfg = load_run_config(path, overrides)
    assert cfg.trainer.steps >= 1
    if cfg.model.source == "hf":  # the real-scale configs: RLVER's hyper-parameters
        lc = cfg.learner
        assert (lc.actor_lr, lc.critic_lr, lc.clip_low, lc.entropy_coef) == (1e-6, 5e-6, 0.2, 1e-3)
        assert lc.kl_coef == 0 and lc.gamma == lc.lam == 1.0
        assert cfg.rollout.profiles_per_batch * cfg.rollout.samples_per_profile in (32, 128)
        assert cfg.model.dtype == "bfloat16" and cfg.model.remat != "none"


def test_helpers() -> None:
    assert rollout_seed(0, 1) == rollout_seed(0, 1) != rollout_seed(0, 2)
    assert rollout_seed(1, 1) != rollout_seed(0, 1)
    assert 0 <= rollout_seed(2**40, 10**9) < 2_000_000
    assert config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]
