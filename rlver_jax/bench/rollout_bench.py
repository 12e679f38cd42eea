"""`rlver-jax bench rollout`: where the time of one full RL step goes.

Runs ``--steps`` training steps exactly as :func:`rlver_jax.trainer.train` does (rollout
through :class:`~rlver_jax.env.rollout.RolloutEngine`, :meth:`Learner.update`, a checkpoint
save) on a small config: SmolLM2-135M policy + the reference (lexicon) user by default,
a random tiny model with ``--tiny``, or any ``--config`` YAML plus ``key=value`` overrides.

Phase split of each step (seconds and % of the step; they sum to 100%):

- sampling / judging / replies / collate: the engine's own ``time/*`` metrics (policy sampler
  calls, ``user.judge``, ``user.opening`` + ``user.reply``, building the Trajectories);
- learner: :meth:`Learner.update` (pad, compute_old, compute_advantages, train_step, metrics);
- checkpoint: the ``Checkpointer.save`` call (async by default: the call, not the write);
- other: the rest (prompt building, reply parsing, emotion dynamics: the engine's host loop).

Non-model overhead (the target is < 10% of a step, padding waste included)::

    device_s   = sampler prefill + decode (jitted, incl. the output transfer; Sampler timings)
               + user judging kernel (the reference user's jitted `_kernel`, run to completion;
                 for an LLM user the whole `judge` call counts as model time)
               + learner compute_old + compute_advantages + train_step (each run to completion)
    overhead_s = step_s - device_s          # host bookkeeping, transfers, replies, checkpoint
    pad_frac   = 1 - real tokens / (filled rows x T): padding in the rows the learner computes
                 on (all rows, or with ``pack_sequences`` the micro-batches holding samples)
    pad_waste  = pad_frac x learner device time (compute spent on padding)
    total_pct  = (overhead_s + pad_waste) / step_s     # what the target counts

Compilations are counted per step from jax's monitoring events; after the first step there
must be none (target: 0).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax

from rlver_jax.bench.common import (
    finish,
    format_row,
    header,
    machine_line,
    timed_update,
)
from rlver_jax.bench.sample_bench import rss_peak_mb

PHASES = ("sampling", "judging", "replies", "collate", "learner", "checkpoint", "other")
PHASE_COLUMNS = (
    ("step", "{}"), ("unit", "{}"), ("step_s", "{:.3f}"),
    *((p, "{:.3f}") for p in PHASES), ("compiles", "{}"),
)  # fmt: skip
OVERHEAD_COLUMNS = (
    ("step", "{}"), ("step_s", "{:.3f}"), ("sample_dev_s", "{:.3f}"), ("judge_dev_s", "{:.3f}"),
    ("learn_dev_s", "{:.3f}"), ("overhead_s", "{:.3f}"), ("overhead_pct", "{:.1f}"),
    ("pad_frac", "{:.3f}"), ("pad_waste_s", "{:.3f}"), ("total_pct", "{:.1f}"), ("rows_x_T", "{}"),
    ("compiles", "{}"), ("rss_peak_mb", "{:.0f}"),
)  # fmt: skip
TARGET_OVERHEAD = 0.10

TINY: dict[str, Any] = {
    "name": "bench_rollout_tiny",
    "model": {"source": "random"},  # ModelSpec's defaults: qwen2, 64 wide, 2 layers
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "scaffold": {"mode": "think", "language": "en", "format_break_reward": None},
    "user": {"kind": "reference", "reference": {"language": "en", "max_reply_tokens": 24}},
    "dynamics": {"max_turns_train": 3},
    "rollout": {"profiles_per_batch": 4, "max_reply_tokens": 24, "max_prompt_tokens": 1024,
                "seq_len_buckets": [256, 512, 1024, 2048]},
    "learner": {"algorithm": "ppo", "mini_batch_size": 4, "micro_batch_size": 1,
                "pack_sequences": True, "seq_buckets": [256, 512, 1024, 2048],
                "actor_warmup_ratio": 0.0, "critic_warmup_ratio": 0.0},
}  # fmt: skip
SMALL: dict[str, Any] = {
    "name": "bench_rollout_smollm2",
    # remat: think-mode rows of 3 turns reach the 1,024-token bucket, where the PPO step
    # (actor + critic, no remat) needs 36 GB of temporaries; with remat 5 GB.
    "model": {"source": "smollm2", "remat": "full"},
    "scaffold": {"mode": "think", "language": "en"},
    "user": {"kind": "reference", "reference": {"language": "en"}},
    "dynamics": {"max_turns_train": 3},
    "rollout": {"profiles_per_batch": 4, "max_reply_tokens": 64, "temperature": 1.0},
    # One mini-batch per step as in RLVER (mini = batch = 32 dialogues), packed rows in
    # micro-batches of one: the learner computes on the filled rows only, and picks among
    # 64-token buckets the row length whose packing computes the fewest tokens.
    "learner": {"algorithm": "ppo", "mini_batch_size": 16, "micro_batch_size": 1,
                "pack_sequences": True, "seq_buckets": list(range(256, 4097, 64)),
                "actor_warmup_ratio": 0.0, "critic_warmup_ratio": 0.0},
}  # fmt: skip


class TimedSampler:
    """Stands in for a :class:`~rlver_jax.sampling.Sampler` in the engine: forwards every call
    (phase timing switched on) and sums ``prefill_s + decode_s`` into ``device_s``."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        sampler.time_phases = True
        self.device_s = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.sampler(*args, **kwargs)
        tm = self.sampler.last_timings
        self.device_s += tm["prefill_s"] + tm["decode_s"]
        return out


@contextlib.contextmanager
def timed_judge_kernel(acc: list[float]) -> Iterator[bool]:
    """While active, the reference user's jitted `_kernel` runs to completion and its seconds
    are added to ``acc[0]`` (benchmark instrumentation only; restored on exit). Yields False
    when the kernel cannot be found (then the whole `judge` call counts as model time)."""
    from rlver_jax.env import reference_user

    original = getattr(reference_user, "_kernel", None)
    if original is None:
        yield False
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = jax.block_until_ready(original(*args, **kwargs))
        acc[0] += time.perf_counter() - t
        return out

    reference_user._kernel = timed
    try:
        yield True
    finally:
        reference_user._kernel = original


def build_config(args: argparse.Namespace) -> Any:
    """The RunConfig: ``--config`` YAML (or the built-in TINY / SMALL dict) + overrides."""
    from rlver_jax.config_io import apply_overrides, from_dict, load_yaml
    from rlver_jax.run_config import RunConfig

    base = load_yaml(args.config) if args.config else (TINY if args.tiny else SMALL)
    return from_dict(RunConfig, apply_overrides(base, list(args.overrides)))


def run_steps(cfg: Any, steps: int, ckpt_dir: str) -> list[dict[str, Any]]:
    """``steps`` trainer steps of ``cfg``; one dict of phase seconds and counts per step."""
    from rlver_jax import components
    from rlver_jax.buckets import pow2_multiple
    from rlver_jax.parallel.compile_count import compile_count
    from rlver_jax.rl.checkpoint import Checkpointer, checkpoint_extra
    from rlver_jax.rl.learner import Learner
    from rlver_jax.trainer import rollout_seed

    compile_count()  # install the listener before the first jit
    mesh = components.build_mesh(cfg)
    params, mcfg, tok, sampler = components.build_policy(cfg.model, mesh, cfg)
    timed_sampler = TimedSampler(sampler)
    user = components.build_user(cfg, mesh, tok)
    engine = components.build_engine(cfg, timed_sampler, tok, user)  # type: ignore[arg-type]
    copts = {"xla_backend_optimization_level": 0} if cfg.trainer.fast_compile else None
    learner = Learner(mcfg, cfg.learner, mesh, copts)
    state = learner.init_state(params, jax.random.key_data(jax.random.key(cfg.seed)))
    del params
    profiles = components.load_split(cfg, "train")
    b = cfg.rollout.profiles_per_batch
    ckpt = Checkpointer(ckpt_dir, save_every=1, keep=2, async_save=cfg.trainer.async_checkpoint)
    judge_acc = [0.0]
    out = []
    with contextlib.ExitStack() as stack:
        stack.callback(ckpt.close)
        hooked = stack.enter_context(timed_judge_kernel(judge_acc))
        for step in range(1, steps + 1):
            c0, judge_acc[0], timed_sampler.device_s = compile_count(), 0.0, 0.0
            batch = [profiles[(step * b + i) % len(profiles)] for i in range(b)]
            t0 = time.perf_counter()
            result = engine.run(state.policy, batch, seed=rollout_seed(cfg.seed, step))
            n_rows = pow2_multiple(result.trajectories.num_samples, cfg.learner.mini_batch_size)
            state, _, lt = timed_update(learner, state, result.trajectories, n_rows)
            t = time.perf_counter()
            extra = checkpoint_extra(seed=cfg.seed, metrics={"step": step})
            ckpt.save(step, state, extra, force=True)
            ckpt_s = time.perf_counter() - t
            step_s = time.perf_counter() - t0
            m = result.metrics
            phases = {
                "sampling": m["time/policy_sampling_s"], "judging": m["time/user_judging_s"],
                "replies": m["time/user_replies_s"], "collate": m["time/collate_s"],
                "learner": lt["total_s"], "checkpoint": ckpt_s,
            }  # fmt: skip
            phases["other"] = step_s - sum(phases.values())
            judge_dev = (
                judge_acc[0] if hooked and cfg.user.kind == "reference" else phases["judging"]
            )
            device = timed_sampler.device_s + judge_dev + lt["device_s"]
            out.append({
                "step": step, "step_s": step_s, "phases": phases,
                "sample_dev_s": timed_sampler.device_s, "judge_dev_s": judge_dev,
                "learn_dev_s": lt["device_s"], "overhead_s": step_s - device,
                "overhead_pct": 100.0 * (step_s - device) / step_s, "pad_frac": lt["pad_frac"],
                "pad_waste_s": lt["pad_frac"] * lt["device_s"],
                "total_pct": 100.0 * (step_s - device + lt["pad_frac"] * lt["device_s"]) / step_s,
                "rows_x_T": f"{int(lt['rows'])}x{int(lt['seq'])}",
                "compiles": compile_count() - c0, "rss_peak_mb": rss_peak_mb(),
                "sampled_tokens": m["sampled_tokens"],
            })  # fmt: skip
            print(f"  step {step}: {step_s:.2f} s, {out[-1]['compiles']} compiles", flush=True)
        ckpt.wait()
    return out


def print_tables(rows: list[dict[str, Any]]) -> None:
    """The phase table (an `s` and a `%` row per step) and the overhead table."""
    print("\nphases of each RL step (seconds, then % of the step)")
    print(header(PHASE_COLUMNS))
    for r in rows:
        base = {"step": r["step"], "step_s": r["step_s"], "compiles": r["compiles"]}
        print(format_row(PHASE_COLUMNS, base | {"unit": "s"} | r["phases"]))
        pct = {k: 100.0 * v / r["step_s"] for k, v in r["phases"].items()}
        print(format_row(PHASE_COLUMNS, base | {"unit": "%", "step_s": 100.0} | pct))
    print("\nnon-model overhead = step - device time of sampling, judging and learning")
    print(header(OVERHEAD_COLUMNS))
    for r in rows:
        print(format_row(OVERHEAD_COLUMNS, r))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the warm steps (all but the first; the first alone if there is one step)."""
    warm = rows[1:] or rows
    mean = lambda key: sum(r[key] for r in warm) / len(warm)
    return {
        "warm_steps": len(warm), "step_s": mean("step_s"), "overhead_pct": mean("overhead_pct"),
        "total_pct": mean("total_pct"),
        "pad_frac": mean("pad_frac"), "warm_compiles": sum(r["compiles"] for r in rows[1:]),
        "first_compiles": rows[0]["compiles"],
        "phase_pct": {p: 100.0 * sum(r["phases"][p] for r in warm) / sum(
            r["step_s"] for r in warm) for p in PHASES},
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlver-jax bench rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a RunConfig YAML (default: built-in small config)")
    ap.add_argument("--tiny", action="store_true", help="random tiny policy (tests, smoke)")
    ap.add_argument("--steps", type=int, default=3, help="RL steps; the first one compiles")
    ap.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run the steps, print both tables and the verdicts; returns the results."""
    args = build_parser().parse_args(argv)
    cfg = build_config(args)
    print(machine_line(
        f"bench rollout: {cfg.name}, policy {cfg.model.source}, user {cfg.user.kind}, "
        f"{cfg.learner.algorithm}, {cfg.rollout.profiles_per_batch} profiles x "
        f"{cfg.rollout.samples_per_profile}, {cfg.dynamics.max_turns_train} turns, "
        f"{cfg.rollout.max_reply_tokens} reply tokens"
    ), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rlver_bench_ckpt_") as ckpt_dir:
        rows = run_steps(cfg, args.steps, ckpt_dir)
    print_tables(rows)
    s = summarize(rows)
    split = ", ".join(f"{p} {v:.1f}%" for p, v in s["phase_pct"].items())
    print(f"\nwarm steps ({s['warm_steps']}): {s['step_s']:.3f} s per step; {split}")
    verdict = "meets" if s["total_pct"] < 100 * TARGET_OVERHEAD else "ABOVE"
    print(
        f"non-model overhead {s['total_pct']:.1f}% of a step ({verdict} the "
        f"{TARGET_OVERHEAD:.0%} target): host bookkeeping and transfers "
        f"{s['overhead_pct']:.1f}%, padding waste {s['total_pct'] - s['overhead_pct']:.1f}% "
        f"(learner padding {s['pad_frac']:.1%} of its tokens)"
    )
    verdict = "meets" if s["warm_compiles"] == 0 else "MISSES"
    print(
        f"compiles: {s['first_compiles']} in the first step, {s['warm_compiles']} after "
        f"({verdict} the no-recompile target)"
    )
    finish(args.json_path, {"argv": argv, "summary": s, "rows": rows})
    return {"rows": rows, "summary": s}


if __name__ == "__main__":
    main()
