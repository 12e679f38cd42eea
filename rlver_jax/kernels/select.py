"""Which implementation of each op runs on this platform, mesh and config, and why.

Two ops have several implementations, each chosen by one config knob:

- causal attention (`model.attention`): training's forward and backward, the old-logprob
  forward, a judge's scoring pass (phases "train" and "score") and the sampler's prefill
  ("prefill"). Implementations: "xla" (the reference, `models.attention`), "xla_causal" (the
  same, skipping the key blocks above the diagonal), "cpu_kernel" (`kernels.cpu.
  causal_attention`: float32, one CPU device, no backward pass).
- the decode step (`sampler.decode`): "scan" (`transformer.forward` scanning stacked layers),
  "unrolled" (`decode_step` over per-layer weights, XLA's forms), "cpu_kernels" (unrolled, with
  the CPU attention kernel and, where the weights pack, the CPU projection kernel), "pallas"
  (unrolled, each layer as fused Pallas kernels, `kernels.gpu.decode`; batch buckets up to
  its `MAX_BATCH`, larger ones run the unrolled XLA step).

Each backend declares what it supports (a `supports`-style function returning None or the
reason). An explicit choice that cannot run raises `BackendError` (a `ConfigError`: one line,
exit 2) naming the knob and the reason, before any work; "auto" picks per platform and logs its
choice once per process. The CPU's training projections have one form per platform and no
knob (`kernels.cpu.projection`, registered on import).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import jax
from jax.sharding import Mesh

from rlver_jax.config_io import ConfigError
from rlver_jax.kernels.cpu import build as cpu_build
from rlver_jax.kernels.cpu import causal_attention as cpu_causal
from rlver_jax.kernels.cpu import decode_ops as cpu_ops
from rlver_jax.kernels.cpu import matmul as cpu_matmul
from rlver_jax.kernels.cpu import projection as _cpu_projection  # registers the CPU backward
from rlver_jax.kernels.gpu import decode as gpu_decode
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import XLA_OPS, StepOps

del _cpu_projection

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("auto", "xla", "xla_causal", "cpu_kernel")
DECODE_CHOICES = ("auto", "scan", "unrolled", "cpu_kernels", "pallas")
Phase = Literal["train", "score", "prefill"]


class BackendError(ConfigError):
    """An explicit backend choice that cannot run here; the message names the knob and why."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a program runs: the platform ("cpu", "gpu", "tpu") and how many devices."""

    platform: str
    devices: int = 1

    @classmethod
    def of(cls, mesh: Mesh | None) -> Target:
        if mesh is None:
            return cls(jax.default_backend(), 1)
        return cls(mesh.devices.flat[0].platform, int(mesh.devices.size))


@dataclasses.dataclass(frozen=True)
class Choice:
    """One op's implementation and the reason it was chosen."""

    op: str
    impl: str
    why: str

    def line(self) -> str:
        return f"{self.op}: {self.impl} ({self.why})"


def check_choice(knob: str, value: str, choices: tuple[str, ...]) -> None:
    """A knob's value is one of its implementations (at config load)."""
    if value not in choices:
        raise ConfigError(f"{knob} must be one of {', '.join(choices)}; got {value!r}")


_logged: set[Choice] = set()


def _log_once(choice: Choice) -> Choice:
    if choice not in _logged:
        _logged.add(choice)
        log.info("backend %s", choice.line())
    return choice


# --------------------------------------------------------------------------- attention
def attention_choice(config: ModelConfig, phase: Phase, target: Target) -> Choice:
    """The causal attention of a `phase` program (`config.attention` is the knob's value)."""
    want, op = config.attention, f"attention/{phase}"
    check_choice("model.attention", want, ATTENTION_CHOICES)
    kernel_why = cpu_causal.supports(config, target.platform, target.devices)
    if phase != "prefill" and kernel_why is None:
        kernel_why = "it has no backward pass, and this program is not a prefill"
    if want == "cpu_kernel":
        if kernel_why is None and not cpu_build.available():
            kernel_why = "the CPU kernels could not be built (the log says why)"
        if kernel_why is not None:
            raise BackendError(f"model.attention=cpu_kernel cannot run the {phase}: {kernel_why}")
        return Choice(op, want, "chosen in the config")
    if want != "auto":
        return Choice(op, want, "chosen in the config")
    if phase != "prefill":
        return Choice(op, "xla", "auto: the reference; no fused kernel for training yet")
    if target.platform != "cpu":
        return Choice(op, "xla", f"auto on {target.platform}")
    if kernel_why is None and cpu_build.available():
        return Choice(op, "cpu_kernel", "auto: a float32 prefill on one CPU device")
    why = kernel_why or "the CPU kernels could not be built"
    return Choice(op, "xla_causal", f"auto on CPU, no kernel: {why}")


def resolve_attention(config: ModelConfig, phase: Phase, mesh: Mesh | None = None) -> ModelConfig:
    """`config` with `attention` resolved for a `phase` program on `mesh` (logged once)."""
    choice = _log_once(attention_choice(config, phase, Target.of(mesh)))
    return config.replace(attention=choice.impl)


# --------------------------------------------------------------------------- decode step
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The sampler's decode step: `impl` (a `DECODE_CHOICES` name other than auto), the
    unrolled step's `ops`, the fused kernels' `blocks` (pallas only), and why."""

    impl: str
    why: str
    ops: StepOps = XLA_OPS
    blocks: gpu_decode.Blocks | None = None

    @property
    def unrolled(self) -> bool:
        """Whether the step runs `decode_step` over per-layer weights (not a layer scan)."""
        return self.impl != "scan"

    @property
    def packed(self) -> bool:
        """Whether the per-layer weights are packed for a projection kernel."""
        return self.ops.pack is not None

    def fused_blocks(self, batch: int) -> gpu_decode.Blocks | None:
        """The Pallas blocks for a batch bucket, or None where XLA's unrolled step runs it."""
        if self.blocks is None or batch > gpu_decode.MAX_BATCH:
            return None
        return self.blocks


def decode_choice(
    want: str, config: ModelConfig, target: Target,
    blocks: gpu_decode.Blocks = gpu_decode.BLOCKS,
) -> DecodePlan:  # fmt: skip
    """The decode step for `sampler.decode = want` (see the module docstring)."""
    check_choice("sampler.decode", want, DECODE_CHOICES)
    cpu_xla = cpu_ops.XLA_CPU_OPS if target.platform == "cpu" else XLA_OPS
    one_cpu = target.platform == "cpu" and target.devices == 1
    if want == "scan":
        return DecodePlan("scan", "chosen in the config")
    if want == "unrolled":
        return DecodePlan("unrolled", "chosen in the config", cpu_xla)
    if want == "pallas":
        why = gpu_decode.supported(config)
        if target.devices != 1:
            why = f"the kernels are not partitioned (here: {target.devices} devices)"
        if why is not None:
            raise BackendError(f"sampler.decode=pallas cannot run: {why}")
        return DecodePlan("pallas", "chosen in the config", cpu_xla, blocks)
    if want == "cpu_kernels" or (want == "auto" and one_cpu):
        why = (
            None
            if one_cpu
            else (f"it runs on one CPU device (here: {target.devices} {target.platform} device(s))")
        )
        if why is None and not cpu_build.available():
            why = "the CPU kernels could not be built (the log says why)"
        if why is None:
            packed = cpu_matmul.packable_config(config)
            ops = cpu_ops.PACKED_KERNEL_OPS if packed else cpu_ops.KERNEL_OPS
            how = "" if packed else "; XLA's projections: the weights do not pack"
            src = "chosen in the config" if want == "cpu_kernels" else "auto: one CPU device"
            return DecodePlan("cpu_kernels", src + how, ops)
        if want == "cpu_kernels":
            raise BackendError(f"sampler.decode=cpu_kernels cannot run: {why}")
        return DecodePlan("unrolled", f"auto on CPU, no kernels: {why}", cpu_xla)
    if target.platform == "cpu":
        why = "auto on CPU: XLA:CPU copies the weights a scanned layer reads"
        return DecodePlan("unrolled", why, cpu_xla)
    return DecodePlan("scan", f"auto on {target.platform}")


def resolve_decode(
    want: str, config: ModelConfig, mesh: Mesh | None,
    blocks: gpu_decode.Blocks = gpu_decode.BLOCKS,
) -> DecodePlan:  # fmt: skip
    """`decode_choice` for a sampler on `mesh`, logged once."""
    plan = decode_choice(want, config, Target.of(mesh), blocks)
    _log_once(Choice("decode", plan.impl, plan.why))
    return plan


# --------------------------------------------------------------------------- at config load
def check_backends(
    models: dict[str, Any], sampler_decode: str, devices: int, *, training: bool,
    platform: str | None = None,
) -> None:  # fmt: skip
    """Refuse, before any work, an explicit choice that cannot run on this machine and mesh:
    `models` maps a config key prefix ("model", "user.model") to a ModelSpec-like object
    (`attention` and `model_config()`); `sampler_decode` is `sampler.decode`. "auto" needs no
    check (it always finds a form that runs); an explicit choice is checked against the model
    shape only when it is not auto (a shape read may load a checkpoint's config)."""
    target = Target(platform or jax.default_backend(), devices)
    for key, spec in models.items():
        if spec.attention == "cpu_kernel":
            config = spec.model_config().replace(attention="cpu_kernel")
            try:
                attention_choice(config, "prefill", target)
            except BackendError as err:
                raise BackendError(
                    str(err).replace("model.attention", f"{key}.attention")
                ) from None
            if key == "model" and training:  # the learner takes model.attention too
                attention_choice(config, "train", target)
    if sampler_decode in ("pallas", "cpu_kernels"):
        decode_choice(sampler_decode, models["model"].model_config(), target)
