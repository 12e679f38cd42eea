"""`rlver-jax plan --config X [key=value ...]`: per-device memory of a run, before launch.

    rlver-jax plan --config configs/tiny_cpu.yaml
    rlver-jax plan --config configs/qwen2.5-7b_ppo_think_v5p.yaml --accelerator v5p-32
    rlver-jax plan --config configs/qwen2.5-7b_grpo_plain_h100.yaml --device-kind h100

Prints one row per component (see `rlver_jax.plan` for the formulas), the peak of each phase
and the total against the device memory; exits 2, naming changes that would fit, when the
peak exceeds (1 - margin) x the device memory. Nothing is loaded: model shapes come from
config.json (an `hf` checkpoint absent on this machine is looked up by its directory name in
`KNOWN_HF_CONFIGS`, or given with --hf-config), devices from the flags or the local backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlver_jax.cli import plan_compile
from rlver_jax.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from rlver_jax.model_io.known_configs import KNOWN_HF_CONFIGS
from rlver_jax.model_io.loader import ModelSpec
from rlver_jax.models.config import ModelConfig
from rlver_jax.parallel.mesh import MeshConfig
from rlver_jax.plan import GB, MemoryPlan, count, plan_memory
from rlver_jax.plan_sizes import fmt_bytes
from rlver_jax.run_config import RunConfig

# Nominal memory of one JAX device (a chip; a TensorCore on v2/v3), decimal GB.
DEVICE_MEMORY_GB: dict[str, float] = {
    "v2": 8, "v3": 16, "v4": 32, "v5p": 95, "v5e": 16, "v6e": 32,
    "h100": 80, "h200": 141, "a100": 80, "a100-40": 40, "l4": 24,
}  # fmt: skip
# TPU slice names count TensorCores (v2-v4, v5p: 2 per chip) or chips (v5e, v6e); a JAX device
# is a chip, except on v2/v3 where it is a TensorCore. family -> name units per JAX device.
_UNITS_PER_DEVICE: dict[str, int] = {"v2": 1, "v3": 1, "v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


class PlanError(ValueError):
    """A plan that cannot be made (config, devices); the message says what to give."""


# --------------------------------------------------------------------------- config
def _stand_in_checkpoints(data: dict[str, Any], hf_config: str | None, tmp: Path) -> None:
    """Point `hf` model paths missing here at a temp dir holding only their config.json."""
    for keys in (("model",), ("user", "model")):
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get("source") != "hf":
            continue
        path = str(node.get("path") or "")
        if path and Path(path).exists():
            continue
        raw = KNOWN_HF_CONFIGS.get(Path(path.rstrip("/")).name.lower())
        if raw is None and hf_config:  # not a known name: the --hf-config shape
            file = Path(hf_config)
            raw = (
                json.loads(file.read_text())
                if file.is_file()
                else KNOWN_HF_CONFIGS.get(hf_config.lower())
            )
        if raw is None:
            raise PlanError(
                f"{'.'.join(keys)}.path {path!r} is not on this machine and its shape is not "
                f"known; pass --hf-config <config.json or one of {sorted(KNOWN_HF_CONFIGS)}>"
            )
        where = tmp / "_".join(keys)
        where.mkdir(parents=True, exist_ok=True)
        (where / "config.json").write_text(json.dumps(raw))
        node["path"] = str(where)


def load_plan_data(
    path: str | None, overrides: Sequence[str], tmp: Path, hf_config: str | None = None
) -> dict[str, Any]:
    """The config dict from YAML + overrides; absent `hf` checkpoints become shape-only
    stand-ins in `tmp` (validate it with `with_overrides(data)`)."""
    data = apply_overrides(load_yaml(path) if path else {}, overrides)
    _stand_in_checkpoints(data, hf_config, tmp)
    return data


@functools.lru_cache(maxsize=32)
def model_config(spec: ModelSpec) -> ModelConfig:
    """The ModelConfig of a spec without loading weights (SmolLM2: its cached HF export)."""
    if spec.source == "smollm2":
        from rlver_jax.model_io.default_model import default_hf_dir

        return ModelConfig.from_hf_dir(default_hf_dir(), **spec.runtime)
    return spec.model_config()


def resolve_models(run: RunConfig) -> tuple[ModelConfig, ModelConfig | None]:
    """(policy, LLM user or None)."""
    user = model_config(run.user.model) if run.user.kind == "llm" else None
    return model_config(run.model), user


def with_overrides(data: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of a config dict plus `key=value` overrides (validated as from YAML)."""
    return from_dict(RunConfig, apply_overrides(data, overrides))


# --------------------------------------------------------------------------- devices
def device_kind_key(kind: str) -> str | None:
    """A `DEVICE_MEMORY_GB` key ("cpu" for the CPU backend) for a jax `device_kind` string
    ("TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu") or a short name ("v6e", "h100")."""
    k = kind.lower().replace("nvidia ", "").strip()
    for pattern, key in (
        ("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5litepod", "v5e"), ("v5", "v5p"),
        ("v4", "v4"), ("v3", "v3"), ("v2", "v2"), ("h200", "h200"), ("h100", "h100"),
        ("a100-40", "a100-40"), ("a100", "a100"), ("l4", "l4"), ("cpu", "cpu"),
    ):  # fmt: skip
        if pattern in k:
            return key
    return None


def accelerator_devices(name: str) -> tuple[str, int]:
    """(kind, JAX devices) of a TPU slice: v5p-32 -> (v5p, 16), v6e-16 -> (v6e, 16),
    v3-8 -> (v3, 8). The chip counts agree with tpu/pod.py (tested)."""
    family, _, count = name.strip().lower().rpartition("-")
    family = {"v5litepod": "v5e"}.get(family, family)
    if family not in _UNITS_PER_DEVICE or not count.isdigit() or int(count) < 1:
        raise PlanError(f"accelerator {name!r}: expected e.g. v5p-32, v6e-16, v5e-8, v4-32")
    return family, max(1, int(count) // _UNITS_PER_DEVICE[family])


def host_memory_bytes() -> int:
    """Physical RAM of this machine."""
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def detect_devices(args: argparse.Namespace, mesh: MeshConfig) -> tuple[int, float, str]:
    """(num_devices, bytes per device, where the memory figure came from). Devices: the flag,
    the accelerator's, the product of a mesh without -1, else jax's device count."""
    kind, num = args.device_kind, args.num_devices
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    if num is None and not args.accelerator and -1 not in sizes:
        num = sizes[0] * sizes[1] * sizes[2]
    if args.accelerator:
        kind, n = accelerator_devices(args.accelerator)
        num = num or n
    if num is None or (kind is None and args.device_memory_gb is None):
        import jax

        num = num or jax.device_count()
        if kind is None and args.device_memory_gb is None:
            dev = jax.devices()[0]
            stats = dev.memory_stats() or {}
            if stats.get("bytes_limit"):
                return num, float(stats["bytes_limit"]), f"{dev.device_kind} (memory_stats)"
            kind = dev.device_kind
    if args.device_memory_gb is not None:
        return num, args.device_memory_gb * GB, "--device-memory-gb"
    key = device_kind_key(kind or "")
    if key == "cpu":
        import jax

        local = max(1, jax.local_device_count()) if args.num_devices is None else num
        return num, host_memory_bytes() / local, f"cpu (host RAM / {local} devices)"
    if key is None:
        raise PlanError(f"device kind {kind!r} is unknown; pass --device-memory-gb")
    return num, DEVICE_MEMORY_GB[key] * GB, f"{key} ({DEVICE_MEMORY_GB[key]:g} GB)"


def target_platform(args: argparse.Namespace) -> str:
    """Where the run is planned for: tpu (a slice or a v* kind), gpu, or this backend's."""
    if args.accelerator:
        return "tpu"
    key = device_kind_key(args.device_kind or "")
    if key in ("h100", "h200", "a100", "a100-40", "l4"):
        return "gpu"
    if key is not None and key != "cpu":
        return "tpu"
    import jax

    return key or jax.default_backend()


def expected_devices(args: argparse.Namespace, mesh: MeshConfig) -> int | None:
    """The device count known before JAX starts (flag, slice, a mesh without -1)."""
    if args.num_devices:
        return args.num_devices
    if args.accelerator:
        return accelerator_devices(args.accelerator)[1]
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    return None if -1 in sizes else sizes[0] * sizes[1] * sizes[2]


# --------------------------------------------------------------------------- fixes
@dataclasses.dataclass(frozen=True)
class Fix:
    """Config overrides (or a device count) and the peak they would give."""

    overrides: tuple[str, ...]
    peak: int
    fits: bool


def candidate_fixes(run: RunConfig, mesh: dict[str, int]) -> list[list[str]]:
    """Override sets to try, the least intrusive first."""
    m, lc, ro = run.model, run.learner, run.rollout
    fixes: list[list[str]] = [["model.remat=full"]] if m.remat != "full" else []
    for key in ("param_dtype", "dtype"):
        if getattr(m, key) == "float32":
            fixes.append([f"model.{key}=bfloat16"])
    for block in (512, 256, 128):  # fewer queries' scores at a time (0: all of them)
        if not m.attention_block or m.attention_block > block:
            fixes.append([f"model.attention_block={block}"])
    dp, micro = mesh["data"] * mesh["fsdp"], lc.micro_batch_size
    while micro % 2 == 0 and (micro // 2) % dp == 0:  # smaller, still split over all devices
        micro //= 2
        fixes.append(
            [f"learner.micro_batch_size={micro}", f"learner.forward_micro_batch_size={micro}"]
        )
    if mesh["data"] > 1:
        fixes.append(["mesh.data=1", "mesh.fsdp=-1", f"mesh.tensor={mesh['tensor']}"])
    for key in ("samples_per_profile", "profiles_per_batch"):
        if getattr(ro, key) > 1:
            fixes.append([f"rollout.{key}={getattr(ro, key) // 2}"])
    tokens = ro.max_prompt_tokens
    while tokens > 256:
        tokens //= 2
        fixes.append([f"rollout.max_prompt_tokens={tokens}"])
    if run.user.kind == "llm" and max(run.user.llm.judge_batch_buckets) > 1:
        fixes.append(["user.llm.judge_batch_buckets=[1]"])
    if lc.uses_reference:
        fixes.append(["learner.kl_coef=0"])
    return fixes


def suggest_fixes(
    data: dict[str, Any], plan: MemoryPlan, num_devices: int, margin: float, **kw: Any
) -> list[Fix]:
    """One line per knob: its least drastic value that fits (knobs that fit first, in the
    order of `candidate_fixes`), else its best try; if no knob fits alone, all of them
    together; and the device count at which the unchanged config fits."""

    def make(cfg: RunConfig, devices: int = num_devices) -> MemoryPlan:
        return plan_memory(cfg, *resolve_models(cfg), devices, plan.device_memory, **kw)

    best: dict[str, Fix] = {}
    chosen: dict[str, list[str]] = {}  # knob -> its last (most drastic) try
    for fix in candidate_fixes(with_overrides(data), plan.mesh):
        try:
            p = make(with_overrides(data, fix))
        except ValueError:
            continue
        new, key = Fix(tuple(fix), p.peak, p.fits(margin)), fix[0].split("=")[0]
        chosen[key] = fix
        old = best.get(key)
        if old is None or (not old.fits and (new.fits or new.peak < old.peak)):
            best[key] = new
    out = [f for f in best.values() if f.fits]
    out += sorted((f for f in best.values() if not f.fits), key=lambda f: f.peak)
    combined = [o for fix in chosen.values() for o in fix]
    if combined and not any(f.fits for f in out):
        p_all = make(with_overrides(data, combined))
        out.insert(0, Fix(tuple(combined), p_all.peak, p_all.fits(margin)))
    devices = num_devices
    while devices < 16384:
        devices *= 2
        try:
            p = make(with_overrides(data), devices)
        except ValueError:
            break
        if p.fits(margin):
            out.append(Fix((f"--num-devices {devices} (same config)",), p.peak, True))
            break
    return out


HINTS: dict[str, str] = {
    "prefill": "a prefill holds H x Pq x (P + N) attention scores per row, Pq = the queries of "
    "one attention block (no flash attention): a smaller model.attention_block, shorter "
    "prompts (rollout.max_prompt_tokens) or fewer sampler rows per device",
    "activations": "a micro-batch's activations: fewer rows per device, model.remat=full, "
    "a smaller model.attention_block, shorter sequences (T grows with max_prompt_tokens + "
    "max_reply_tokens)",
    "forward": "the old-logprob pass: learner.forward_micro_batch_size or shorter sequences",
    "moments": "optimiser states: more devices on fsdp, or bf16 params",
    "params": "weights: more devices on fsdp (mesh.fsdp=-1), bf16 params",
    "cache": "KV caches: fewer dialogues per step or shorter prompts",
    "judge": "the judge's 21 cache copies: user.llm.judge_batch_buckets",
}


# --------------------------------------------------------------------------- output
def format_plan(plan: MemoryPlan, margin: float) -> str:
    """The component table, the phase peaks and the verdict."""
    rows = [f"{'component':<30} {'phase':<9} {'group':<15} {'per device':>10}  formula"]
    for c in plan.components:
        if not c.nbytes:
            continue
        rows.append(
            f"{c.name:<30} {c.phase:<9} {c.group:<15} {fmt_bytes(c.nbytes):>10}  {c.formula}"
        )
    rows.append(f"{'resident':<56} {fmt_bytes(plan.resident):>10}")
    for (phase, group), total in plan.group_totals().items():
        peak = fmt_bytes(plan.resident + total)
        rows.append(f"{'peak of ' + phase + ' / ' + group:<56} {peak:>10}  resident + group")
    usable = (1 - margin) * plan.device_memory
    phase, group = plan.peak_phase
    verdict = "fits" if plan.fits(margin) else "DOES NOT FIT"
    rows.append(
        f"{'PEAK (' + phase + ' / ' + group + ')':<56} {fmt_bytes(plan.peak):>10}  "
        f"{100 * plan.peak / usable:.0f}% of {fmt_bytes(usable)} usable "
        f"({fmt_bytes(plan.device_memory)} x {1 - margin:g}): {verdict}"
    )
    return "\n".join(rows + [f"note: {n}" for n in plan.notes])


def plan_json(plan: MemoryPlan, margin: float) -> dict[str, Any]:
    """The plan as JSON-ready data (bytes per device)."""
    return {
        "mesh": plan.mesh,
        "device_memory": plan.device_memory,
        "components": [dataclasses.asdict(c) for c in plan.components],
        "resident": plan.resident,
        "peak": plan.peak,
        "peak_phase": list(plan.peak_phase),
        "fits": plan.fits(margin),
        "notes": list(plan.notes),
    }


def _drop(_: str) -> None:
    """An output that prints nothing (--json prints the figures itself)."""


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """Exit codes: 0 fits, 2 does not fit (or the plan cannot be made)."""
    parser = argparse.ArgumentParser(prog="rlver-jax plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config YAML (default: the defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--accelerator", help="TPU slice, e.g. v5p-32, v6e-16 (devices + memory)")
    parser.add_argument(
        "--num-devices", "--devices", type=int, help="default: accelerator's, mesh's, jax's"
    )
    parser.add_argument("--device-kind", help="v5p, v6e, v5e, v4, h100, h200, a100, cpu")
    parser.add_argument("--device-memory-gb", type=float, help="memory per device (GB, 1e9 B)")
    parser.add_argument("--margin", type=float, default=0.05, help="kept free (default 0.05)")
    parser.add_argument("--user-prompt-tokens", type=int, help="LLM user prompt length")
    parser.add_argument("--hf-config", help="config.json (or a known name) for absent hf paths")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "--compile", action="store_true",
        help="also lower and compile every program of one RL step on that many (fake CPU) "
        "devices, abstract inputs: XLA's per-device memory, collectives and FLOPs",
    )  # fmt: skip
    args = parser.parse_intermixed_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    kw: dict[str, Any] = {"user_prompt_tokens": args.user_prompt_tokens}
    with tempfile.TemporaryDirectory(prefix="rlver_plan_") as tmp:
        try:
            data = load_plan_data(args.config, args.overrides, Path(tmp), args.hf_config)
            run = with_overrides(data)
            if args.compile:  # before JAX starts: fake CPU devices for the mesh
                plan_compile.reserve_cpu_devices(expected_devices(args, run.mesh))
            num, memory, source = detect_devices(args, run.mesh)
            on_cpu = source.startswith("cpu") or device_kind_key(args.device_kind or "") == "cpu"
            kw["platform"] = "cpu" if on_cpu else "accelerator"
            policy, user = resolve_models(run)
            plan = plan_memory(run, policy, user, num, memory, **kw)
        except (PlanError, ConfigError, ValueError) as err:
            print(f"rlver-jax plan: {err}", file=sys.stderr)
            return 2
        fits = plan.fits(args.margin)
        if args.json:
            if not args.compile:  # else one JSON with the compiled figures, below
                out(json.dumps(plan_json(plan, args.margin), indent=1))
        else:
            mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
            out(f"memory plan: {args.config or '(defaults)'} on {num} devices, mesh {mesh}; "
                f"{source} per device")  # fmt: skip
            lc = run.learner
            out(f"policy: {policy.family}, {count(policy.num_params())} params, params "
                f"{policy.param_dtype}, compute {policy.dtype}, remat {policy.remat}; "
                f"{lc.algorithm}, kl_coef {lc.kl_coef}, user {run.user.kind}")  # fmt: skip
            out(format_plan(plan, args.margin))
        if args.compile:
            usable, platform = (1 - args.margin) * plan.device_memory, target_platform(args)
            try:
                figures = plan_compile.dry_run(
                    run, policy, user, num, platform, args.user_prompt_tokens
                )
            except ValueError as err:
                print(f"rlver-jax plan: {err}", file=sys.stderr)
                return 2
            on_accel = platform != "cpu" and plan_compile.compiles_on_cpu(num)
            if args.json:
                doc = plan_compile.dry_run_json(figures, plan, platform, on_accel, argv)
                out(json.dumps(doc | {"config": args.config, "plan": plan_json(plan, args.margin)},
                               indent=1))  # fmt: skip
            else:
                out(f"compiled dry run (abstract inputs, {num} devices, auto knobs for "
                    f"{platform}):")  # fmt: skip
            show = _drop if args.json else out
            bf16 = policy.num_params() * 2
            if not plan_compile.report(figures, plan, usable, bf16, on_accel, show):
                worst = max(figures, key=lambda f: plan_compile.peak_of(f, on_accel))
                print(f"rlver-jax plan: REFUSED: the compiled {worst.name} needs "
                      f"{fmt_bytes(plan_compile.peak_of(worst, on_accel))} per device > "
                      f"{fmt_bytes(usable)} usable", file=sys.stderr)  # fmt: skip
                return 2
        if fits:
            return 0
        fixes = suggest_fixes(data, plan, num, args.margin, **kw)
    at_peak = [
        c for c in plan.components if c.phase == "resident" or (c.phase, c.group) == plan.peak_phase
    ]
    biggest = sorted(at_peak, key=lambda c: -c.nbytes)[:3]
    lines = [
        f"rlver-jax plan: REFUSED: peak {fmt_bytes(plan.peak)} per device > "
        f"{fmt_bytes((1 - args.margin) * plan.device_memory)} usable. Largest: "
        + ", ".join(f"{c.name} {fmt_bytes(c.nbytes)}" for c in biggest)
        + f" (at the {'/'.join(plan.peak_phase)} peak). Changes (peak after):"
    ]
    hint = next((h for k, h in HINTS.items() if k in biggest[0].name), "")
    lines += [f"  {'fits ' if f.fits else 'still'} {fmt_bytes(f.peak):>9}  {' '.join(f.overrides)}"
              for f in fixes]  # fmt: skip
    if hint:
        lines.append(f"Largest component: {hint}.")
    print("\n".join(lines), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
