"""`rlver-jax plan --compile`: the dry run of one RL step (`rlver_jax.step_programs`) beside
the formula plan, on the devices the plan is for (fake CPU devices when this machine has
fewer: `jax_num_cpu_devices`, set before JAX starts its backends)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from rlver_jax.models.config import ModelConfig
from rlver_jax.plan import MemoryPlan
from rlver_jax.plan_sizes import fmt_bytes
from rlver_jax.run_config import RunConfig
from rlver_jax.step_programs import FORMULA_GROUPS, ProgramFigures, compile_step


def reserve_cpu_devices(num: int | None) -> None:
    """Ask JAX for `num` CPU devices (before any JAX operation; unless XLA_FLAGS already
    fixes the count), so a mesh of `num` devices can be made on one host."""
    if num and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        # backends already started: `compile_devices` says what to do
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", num)


def compile_devices(num: int) -> list[Any]:
    """`num` devices to compile on: the default backend's if it has them, else CPU ones."""
    import jax

    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= num:
            return list(devices[:num])
    raise ValueError(
        f"--compile needs {num} devices and JAX has {jax.device_count()}: run it in a fresh "
        f"process, or set XLA_FLAGS=--xla_force_host_platform_device_count={num}"
    )


def compiles_on_cpu(num: int) -> bool:
    """Whether `compile_devices(num)` are CPU devices."""
    return compile_devices(num)[0].platform == "cpu"


def formula_peak(plan: MemoryPlan, name: str) -> int | None:
    """The formula plan's peak for the phase groups that size program `name`."""
    totals = plan.group_totals()
    groups = [totals[g] for g in FORMULA_GROUPS.get(name, ()) if g in totals]
    return plan.resident + max(groups) if groups else None


def peak_of(f: ProgramFigures, on_accelerator: bool) -> int:
    """The peak a program is judged by: on an accelerator without XLA:CPU's f32 copies."""
    return f.accelerator_peak if on_accelerator else f.peak


def format_figures(
    figures: list[ProgramFigures], plan: MemoryPlan, usable: float, on_accelerator: bool
) -> str:
    """One row per program; the decode rows add their collectives per decoded token.
    `on_accelerator`: compiled on CPU for a platform with bf16 matmuls (column `accel`)."""
    head = (
        f"{'program':<15} {'arguments':>9} {'outputs':>9} {'temps':>9} {'live':>9} "
        f"{'peak':>9} {'accel':>9} {'formula':>9} {'coll/call':>10} {'coll/token':>10} "
        f"{'TFLOP/dev':>9}"
    )
    rows = [head]
    devices = max(1, _devices(plan))
    for f in figures:
        formula = formula_peak(plan, f.name)
        per_token = fmt_bytes(f.traffic.total_per_iteration) if f.iterations > 1 else "-"
        tflops = (f.flops + f.iterations * f.flops_per_iteration) / devices / 1e12
        rows.append(
            f"{f.name:<15} {fmt_bytes(f.arguments):>9} {fmt_bytes(f.outputs):>9} "
            f"{fmt_bytes(f.temporaries):>9} {fmt_bytes(f.live):>9} {fmt_bytes(f.peak):>9} "
            f"{fmt_bytes(f.accelerator_peak) if on_accelerator else '-':>9} "
            f"{fmt_bytes(formula) if formula else '-':>9} "
            f"{fmt_bytes(f.collective_bytes_per_call):>10} {per_token:>10} {tflops:>9.3g}"
        )
    worst = max(figures, key=lambda f: peak_of(f, on_accelerator))
    peak = peak_of(worst, on_accelerator)
    verdict = "fits" if peak <= usable else "DOES NOT FIT"
    what = "peak (accel: without XLA:CPU's f32 copies of bf16 work)" if on_accelerator else "peak"
    rows.append(
        f"largest compiled {what}: {worst.name} {fmt_bytes(peak)} per device, "
        f"{100 * peak / usable:.0f}% of {fmt_bytes(usable)} usable: {verdict}"
    )
    return "\n".join(rows)


def dry_run_json(
    figures: list[ProgramFigures], plan: MemoryPlan, platform: str, on_accelerator: bool,
    argv: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The figures as a `bench/results` JSON (kind "dry_run", rendered by bench/perf_doc.py)."""
    import jax

    rows = [
        f.as_json() | {"formula_peak": formula_peak(plan, f.name),
                       "judged_peak": peak_of(f, on_accelerator)}
        for f in figures
    ]  # fmt: skip
    return {
        "kind": "dry_run", "argv": argv, "jax": jax.__version__,
        "platform": platform, "devices": _devices(plan),
        "mesh": plan.mesh, "device_memory": plan.device_memory, "rows": rows,
    }  # fmt: skip


def _devices(plan: MemoryPlan) -> int:
    return plan.mesh["data"] * plan.mesh["fsdp"] * plan.mesh["tensor"]


def dry_run(
    run: RunConfig, policy: ModelConfig, user: ModelConfig | None, num: int, platform: str,
    user_prompt_tokens: int | None = None,
) -> list[ProgramFigures]:  # fmt: skip
    """`compile_step` on a mesh of `num` devices (`compile_devices`)."""
    from rlver_jax.parallel.mesh import make_mesh

    mesh = make_mesh(run.mesh, devices=compile_devices(num))
    return compile_step(run, policy, user, mesh, platform, user_prompt_tokens=user_prompt_tokens)[1]


def report(
    figures: list[ProgramFigures], plan: MemoryPlan, usable: float, weights_bf16: int,
    on_accelerator: bool, out: Callable[[str], None],
) -> bool:  # fmt: skip
    """Print the table and the decode's per-token collectives against the policy's bf16
    weights; True when every program fits."""
    out(format_figures(figures, plan, usable, on_accelerator))
    for f in figures:
        if f.iterations > 1 and f.name.startswith("policy"):
            share = f.traffic.total_per_iteration / weights_bf16
            out(
                f"{f.name}: {fmt_bytes(f.traffic.total_per_iteration)} of collectives per "
                f"decoded token per device = {100 * share:.3g}% of the policy's bf16 weights "
                f"({fmt_bytes(weights_bf16)})"
            )
    return max(peak_of(f, on_accelerator) for f in figures) <= usable
