"""`kernels.select`: one knob per choice, explicit choices that cannot run refused at config
load with the knob and the reason, auto logged once, old keys naming their replacement."""

from __future__ import annotations

import logging

import pytest

from rlver_jax.config_io import ConfigError
from rlver_jax.kernels import select
from rlver_jax.model_io.loader import ModelSpec
from rlver_jax.run_config import load_run_config
from rlver_jax.sampling.config import SamplerConfig
from tests.helpers import CONFIG

TINY = ["model.source=random", "rollout.max_prompt_tokens=900"]


def test_explicit_choices_that_cannot_run_are_refused_at_config_load() -> None:
    """The CPU attention kernel has no backward pass: a training config may not choose it (a
    rollout config may); the fused Pallas step does not fuse Qwen3's q/k norms; the CPU
    kernels need one CPU device. Each message names the knob."""
    kernel = {"model": ModelSpec(source="random", attention="cpu_kernel")}
    with pytest.raises(select.BackendError, match=r"model\.attention=cpu_kernel.*no backward"):
        select.check_backends(kernel, "auto", 1, training=True, platform="cpu")
    select.check_backends(kernel, "auto", 1, training=False, platform="cpu")  # a rollout may
    # the tests' 8 fake CPU devices fill the default mesh: the kernel cannot partition
    with pytest.raises(select.BackendError, match=r"model\.attention=cpu_kernel.*one CPU"):
        load_run_config(None, [*TINY, "model.attention=cpu_kernel"], training=False)
    with pytest.raises(select.BackendError, match=r"sampler\.decode=pallas.*not partitioned"):
        load_run_config(None, [*TINY, "sampler.decode=pallas"])
    qwen3 = {"model": ModelSpec(source="random", family="qwen3")}
    with pytest.raises(select.BackendError, match=r"sampler\.decode=pallas.*Qwen3"):
        select.check_backends(qwen3, "pallas", 1, training=True, platform="gpu")
    with pytest.raises(select.BackendError, match=r"user\.model\.attention=cpu_kernel"):
        select.check_backends(
            {"model": ModelSpec(source="random"),
             "user.model": ModelSpec(source="random", attention="cpu_kernel", dtype="bfloat16")},
            "auto", 1, training=False,
        )  # fmt: skip
    with pytest.raises(select.BackendError, match="one CPU device"):
        select.check_backends({"model": ModelSpec(source="random")}, "cpu_kernels", 8,
                              training=True, platform="cpu")  # fmt: skip
    for platform in ("cpu", "gpu", "tpu"):  # auto always finds a form that runs
        select.check_backends({"model": ModelSpec(source="random")}, "auto", 8,
                              training=True, platform=platform)  # fmt: skip


def test_values_outside_the_choices_and_old_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.attention must be one of auto, xla"):
        load_run_config(None, [*TINY, "model.attention=flash"])
    with pytest.raises(ConfigError, match=r"sampler\.decode must be one of"):
        load_run_config(None, [*TINY, "sampler.decode=fused"])
    for old in SamplerConfig.RENAMED:
        with pytest.raises(ConfigError, match=rf"sampler\.{old} was replaced by"):
            load_run_config(None, [*TINY, f"sampler.{old}=true"])


def test_auto_per_platform_and_phase() -> None:
    """auto: training and scoring take XLA's reference everywhere; a prefill takes XLA's
    reference on accelerators; the decode scans on accelerators and unrolls on CPUs."""
    for platform in ("gpu", "tpu"):
        target = select.Target(platform, 8)
        for phase in ("train", "score", "prefill"):
            assert select.attention_choice(CONFIG, phase, target).impl == "xla"
        assert select.decode_choice("auto", CONFIG, target).impl == "scan"
    cpu8 = select.Target("cpu", 8)
    assert select.attention_choice(CONFIG, "prefill", cpu8).impl == "xla_causal"
    plan = select.decode_choice("auto", CONFIG, cpu8)
    assert plan.impl == "unrolled" and plan.unrolled and not plan.packed
    assert select.decode_choice("scan", CONFIG, cpu8).unrolled is False
    explicit = select.attention_choice(CONFIG.replace(attention="xla_causal"), "train", cpu8)
    assert explicit.impl == "xla_causal" and "config" in explicit.why


def test_a_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    select._logged.clear()
    with caplog.at_level(logging.INFO, logger="rlver_jax.kernels.select"):
        for _ in range(3):
            select.resolve_decode("scan", CONFIG, None)
    lines = [r.getMessage() for r in caplog.records if "decode: scan" in r.getMessage()]
    assert lines == ["backend decode: scan (chosen in the config)"]
