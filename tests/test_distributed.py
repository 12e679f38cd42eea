"""Multi-host start-up: settings from flags / environment, and a real two-process CPU run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rlver_jax.parallel import distributed
from rlver_jax.parallel.distributed import DistributedConfigError, resolve

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("RLVER_COORDINATOR", "RLVER_NUM_PROCESSES", "RLVER_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_resolve_single_host_by_default(clean_env: pytest.MonkeyPatch) -> None:
    settings = resolve()
    assert not settings.enabled and settings.num_processes is None


def test_resolve_from_environment_and_flags(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RLVER_COORDINATOR", "10.0.0.1:1234")
    clean_env.setenv("RLVER_NUM_PROCESSES", "4")
    clean_env.setenv("RLVER_PROCESS_ID", "3")
    assert resolve() == distributed.DistributedSettings("10.0.0.1:1234", 4, 3)
    # Flags win over the environment.
    assert resolve("h:1", 2, 1) == distributed.DistributedSettings("h:1", 2, 1)


def test_resolve_auto_needs_no_counts(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RLVER_COORDINATOR", "auto")
    settings = resolve()
    assert settings.auto and settings.enabled


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("h:1", None, 0), {}, "RLVER_NUM_PROCESSES"),
        (("h:1", 2, None), {}, "RLVER_PROCESS_ID"),
        (("h:1", 2, 2), {}, "process_id (2)"),
        ((None, 2, 1), {}, "RLVER_COORDINATOR"),
        ((None, None, None), {"RLVER_NUM_PROCESSES": "two", "RLVER_COORDINATOR": "h:1"}, "two"),
    ],
)
def test_resolve_errors_name_the_setting(
    clean_env: pytest.MonkeyPatch, args: tuple, env: dict[str, str], needle: str
) -> None:
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(
        DistributedConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")
    ):
        resolve(*args)


def test_initialize_is_a_noop_on_one_host(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(distributed, "_started", None)
    assert distributed.initialize() is False
    assert distributed.initialize("ignored:1", 2, 0) is False  # idempotent: first outcome wins
    assert not jax.distributed.is_initialized()
    assert jax.process_index() == 0 and jax.process_count() == 1  # the main, only process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_two_processes(tmp_path: Path, extra: list[str], timeout: float) -> list[dict]:
    """Start both workers, wait (killing them on timeout) and load their results."""
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    for var in ("RLVER_COORDINATOR", "RLVER_NUM_PROCESSES", "RLVER_PROCESS_ID"):
        env.pop(var, None)
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(worker.__file__)),
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--out",
                str(tmp_path),
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"two-process run did not finish in {timeout:.0f} s")
    for p, log in zip(procs, logs, strict=False):
        tail = "\n".join(line for line in log.splitlines() if "Gloo" not in line)[-3000:]
        assert p.returncode == 0, f"worker exited with {p.returncode}:\n{tail}"
    return [dict(np.load(tmp_path / f"proc{i}.npz")) for i in range(2)]


def _reference_logits() -> tuple[object, dict, np.ndarray]:
    from rlver_jax.models.config import ModelConfig
    from rlver_jax.models.transformer import forward, positions_from_mask

    config = ModelConfig(**worker.MODEL_KWARGS)
    params = worker.host_params(config)
    mask = np.ones(worker.TOKENS.shape, bool)
    logits, _ = forward(params, worker.TOKENS, positions_from_mask(mask), mask, config)
    return config, params, np.asarray(logits)


def test_two_processes_share_one_mesh(tmp_path: Path) -> None:
    """2 processes x 2 CPU devices: one fsdp=2 x tensor=2 mesh, same logits as one process."""
    results = _run_two_processes(tmp_path, [], timeout=120)  # ~12 s on an idle 2-core box
    _, _, ref = _reference_logits()
    for res in results:
        np.testing.assert_allclose(res["logits"], ref, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_two_processes_sample_like_one(tmp_path: Path) -> None:
    """Greedy sampling on the two-process mesh gives the single-process tokens."""
    from rlver_jax.sampling.sampler import Sampler, SamplerConfig

    results = _run_two_processes(tmp_path, ["--sample"], timeout=240)
    config, params, _ = _reference_logits()
    buckets = SamplerConfig(prompt_buckets=(8,), batch_buckets=(4,), new_token_buckets=(8,))
    ref = Sampler(config, sampler_config=buckets)(
        params, worker.PROMPTS, max_new_tokens=worker.NEW_TOKENS, temperature=0.0
    )
    for res in results:
        np.testing.assert_array_equal(res["tokens"], ref.tokens)
        np.testing.assert_allclose(res["logprobs"], ref.logprobs, atol=1e-4)
