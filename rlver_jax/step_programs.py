"""A dry run of one RL step at its real size: every program the step runs, traced from abstract
inputs (nothing is materialised), lowered and compiled for a mesh of real or fake devices.

    figures = compile_step(run, policy_config, user_config, mesh, platform="tpu")

The programs, in the order a step runs them: the reshard (learner weights -> the rollout copy,
`Sampler.rollout_params`), the policy's prefill and decode at the largest buckets, the LLM
user's judge and reply sampling, the old-logprob forward, the advantages and the train step
(`rlver_jax.step_shapes` gives the shapes). Per program: XLA's per-device memory
(`compiled.memory_analysis()`), the bytes its collectives move (`parallel.collectives`), its
FLOPs (`parallel.flops`), and its peak with what else is live on the device meanwhile:

    peak = arguments + outputs - aliased (donated) + temporaries + live
    live = the learner state and the LLM user's weights (resident all run), and the policy's
           rollout copy from the reshard to the end of the rollout, less what the program
           takes as an argument

`platform` names where the run will be (tpu, gpu, cpu): the `auto` knobs are resolved for it
(`kernels.select`), while the programs compile on this machine's backend. XLA:CPU's buffer
assignment stands in for the accelerator's: the same program, so the same arguments and
outputs; temporaries differ by fusion choices (and XLA:CPU copies the weights a scanned layer
reads, which makes its decode temporaries an upper bound).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlver_jax.env.llm_judge import JudgeScorer
from rlver_jax.kernels import select
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.sharding import param_shardings
from rlver_jax.models.transformer import param_shapes
from rlver_jax.parallel.collectives import Traffic, collective_traffic
from rlver_jax.parallel.flops import traced_flops
from rlver_jax.parallel.rules import axis_rules
from rlver_jax.plan_sizes import abstract_mesh
from rlver_jax.rl.learner import Learner, OldOutputs
from rlver_jax.run_config import RunConfig
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.sampling.sampler import Sampler
from rlver_jax.step_shapes import (
    JUDGE_CANDIDATES,
    SamplerShape,
    StepShapes,
    step_shapes,
    user_sampler_config,
)
from rlver_jax.trajectories import Trajectories

S = jax.ShapeDtypeStruct
_F32 = re.compile(r"^\s*%([\w.\-]+) = f32\[([\d,]*)\]\S* (fusion|convert|all-gather)\(([^)]*)\)")
_PARAM = re.compile(r"^\s*%([\w.\-]+) = bf16\[[\d,]*\]\S* parameter\(")
_BF16_OF = re.compile(r"^\s*%[\w.\-]+ = bf16\[[\d,]*\]\S* (?:fusion|convert)\(%([\w.\-]+)\)")
# The formula plan's (phase, group)s that size each program (`rlver_jax.plan`).
FORMULA_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "policy prefill": (("rollout", "policy sampler"),),
    "policy decode": (("rollout", "policy sampler decode"),),
    "user judge": (("rollout", "user judge"), ("rollout", "user judge candidates")),
    "user prefill": (("rollout", "user sampler"),),
    "user decode": (("rollout", "user sampler decode"),),
    "old logprobs": (("old", "forward"),),
    "train step": (("train", "actor"), ("train", "critic")),
}


@dataclasses.dataclass(frozen=True)
class ProgramFigures:
    """One compiled program: per-device bytes, collectives, FLOPs (global, per call; the
    decode loop's `per_iteration` figures are per decoded token, `iterations` of them)."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    live: int
    traffic: Traffic
    flops: float
    flops_per_iteration: float
    iterations: int
    compile_s: float
    cpu_upcast: int = 0

    @property
    def accelerator_peak(self) -> int:
        """The peak without XLA:CPU's f32 copies of bf16 work (`cpu_upcast_bytes`)."""
        return self.peak - self.cpu_upcast

    @property
    def program_bytes(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def peak(self) -> int:
        return self.program_bytes + self.live

    @property
    def collective_bytes_per_call(self) -> int:
        return self.traffic.total_per_call + self.iterations * self.traffic.total_per_iteration

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["traffic"] = dataclasses.asdict(self.traffic)
        return out | {
            "program_bytes": self.program_bytes, "peak": self.peak,
            "accelerator_peak": self.accelerator_peak,
        }  # fmt: skip


def cpu_upcast_bytes(hlo: str) -> int:
    """Bytes of the f32 copies XLA:CPU makes to run bf16 work in f32 (it has no bf16 matmul
    or collective): each bf16 weight argument converted once per program, each all-gather run
    in f32 and narrowed after. An accelerator runs them in bf16, without those buffers."""
    entry = hlo[hlo.index("\nENTRY") :]
    lines = entry[: entry.index("\n}")].splitlines()
    bf16_params = {m.group(1) for line in lines if (m := _PARAM.match(line))}
    narrowed = {m.group(1) for line in lines if (m := _BF16_OF.match(line))}
    total = 0
    for line in lines:
        m = _F32.match(line)
        if m is None:
            continue
        name, op, operand = m.group(1), m.group(3), m.group(4).strip().lstrip("%")
        nbytes = 4 * math.prod(int(d) for d in m.group(2).split(",") if d)
        upcast = op in ("fusion", "convert") and operand in bf16_params and "convert" in name
        if upcast or (op == "all-gather" and name in narrowed):
            total += nbytes
    return total


def device_bytes(tree: Any) -> int:
    """Bytes of one device's shards of an abstract (or concrete) tree with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def for_target(c: ModelConfig, phase: select.Phase, target: select.Target) -> ModelConfig:
    """`c` with its attention resolved for a `phase` program on `target` (not this host)."""
    return c.replace(attention=select.attention_choice(c, phase, target).impl)


def sampler_for_target(sc: SamplerConfig, c: ModelConfig, target: select.Target) -> SamplerConfig:
    """`sc` with its decode step resolved for `target`."""
    return dataclasses.replace(sc, decode=select.decode_choice(sc.decode, c, target).impl)


def _measure(name: str, traced: Any, live: int, iterations: int = 1) -> ProgramFigures:
    t0 = time.perf_counter()
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - t0
    mem, flops, hlo = compiled.memory_analysis(), traced_flops(traced), compiled.as_text()
    return ProgramFigures(
        name, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
        mem.temp_size_in_bytes, live, collective_traffic(hlo), flops.per_call,
        flops.per_iteration, iterations, seconds, cpu_upcast_bytes(hlo),
    )  # fmt: skip


def abstract_trajectories(rows: int, seq: int) -> Trajectories:
    """A learner batch's shapes and dtypes (as `Trajectories.pad_to` makes them)."""
    grid = lambda dtype: S((rows, seq), dtype)
    row = lambda dtype: S((rows,), dtype)
    return Trajectories(
        tokens=grid(jnp.int32), token_mask=grid(jnp.bool_), loss_mask=grid(jnp.bool_),
        sampler_logprobs=grid(jnp.float32), rewards=grid(jnp.float32), scores=row(jnp.float32),
        group_ids=row(jnp.int32), dialogue_ids=row(jnp.int32), format_ok=row(jnp.bool_),
    )  # fmt: skip


def _sampler_programs(
    label: str, sampler: Sampler, shape: SamplerShape, live: int
) -> list[ProgramFigures]:
    """A sampler's prefill and decode at `shape`."""
    traced = sampler.trace_programs(shape.batch, shape.prompt, shape.new_tokens)
    return [
        _measure(f"{label} prefill", traced["prefill"], live),
        _measure(f"{label} decode", traced["decode"], live, iterations=shape.new_tokens),
    ]


def compile_step(
    run: RunConfig, policy: ModelConfig, user: ModelConfig | None, mesh: Mesh, platform: str,
    *, user_prompt_tokens: int | None = None, log: Callable[[str], None] = lambda _: None,
) -> tuple[StepShapes, list[ProgramFigures]]:  # fmt: skip
    """The figures of every program of one RL step of `run` on `mesh` (see the module docs);
    `log` hears each program's name as it compiles."""
    target = select.Target(platform, int(mesh.devices.size))
    shapes = step_shapes(run, user, abstract_mesh(dict(mesh.shape)), user_prompt_tokens)
    learner_rules, rollout_rules = run.mesh.learner_rules, run.mesh.sampler_rules
    learner = Learner(for_target(policy, "train", target), run.learner, mesh, rules=learner_rules)
    state = learner.abstract_state()
    state_bytes, user_bytes = device_bytes(state), 0
    figures: list[ProgramFigures] = []

    def add(make: Callable[[], list[ProgramFigures]], name: str) -> None:
        log(name)
        figures.extend(make())

    # ---- rollout: the policy's copy, its sampler, the user's judge and sampler
    sc = sampler_for_target(run.sampler, policy, target)
    sampler = Sampler(
        for_target(policy, "prefill", target), mesh=mesh, sampler_config=sc, rules=rollout_rules
    )
    reshard = sampler.reshard_program(state.policy)
    copy_bytes = 0
    if user is not None:
        user_params = jax.tree.map(
            lambda s, sh: S(s.shape, jnp.dtype(user.param_dtype), sharding=sh),
            param_shapes(user), param_shardings(user, mesh, rollout_rules),
        )  # fmt: skip
        user_bytes = device_bytes(user_params)
    if reshard is not None:
        traced = reshard.trace(state.policy)
        copy_bytes = device_bytes(traced.out_info)
        others = state_bytes - device_bytes(state.policy) + user_bytes
        add(lambda: [_measure("reshard", traced, others)], "reshard")
        rollout_live = state_bytes + user_bytes
    else:  # the sampler decodes on the learner's own params
        rollout_live = state_bytes - device_bytes(state.policy) + user_bytes
    add(lambda: _sampler_programs("policy", sampler, shapes.policy, rollout_live), "policy")
    if user is not None and shapes.user is not None and shapes.judge is not None:
        user_live = state_bytes + copy_bytes
        llm = run.user.llm
        usc = sampler_for_target(user_sampler_config(run), user, target)
        u_sampler = Sampler(
            for_target(user, "prefill", target), mesh=mesh, sampler_config=usc,
            rules=rollout_rules,
        )  # fmt: skip
        scorer = JudgeScorer(
            for_target(user, "score", target), pad_id=0, prompt_buckets=llm.prompt_buckets,
            batch_buckets=llm.judge_batch_buckets, mesh=mesh, rules=rollout_rules,
        )  # fmt: skip
        j = shapes.judge
        fn = scorer.program(j.batch, j.prompt, JUDGE_CANDIDATES, j.new_tokens, 2)
        i32 = jnp.int32
        args = (
            S((j.batch, j.prompt), i32), S((j.batch, j.prompt), jnp.bool_),
            S((JUDGE_CANDIDATES, j.new_tokens), i32), S((JUDGE_CANDIDATES,), i32), S((2,), i32),
        )  # fmt: skip
        with axis_rules(mesh, rollout_rules):
            judge = fn.trace(user_params, *args)
        add(lambda: [_measure("user judge", judge, user_live)], "user judge")
        add(lambda: _sampler_programs("user", u_sampler, shapes.user, user_live), "user")

    # ---- learner: old logprobs, advantages, the train step
    ls = shapes.learner
    traj = abstract_trajectories(ls.rows, ls.seq)
    on_policy = learner.on_policy(ls.rows)
    if on_policy:
        old = OldOutputs(S(traj.tokens.shape, jnp.float32), None, None)  # the sampler's
    else:
        traced = learner.compute_old(state, traj, trace=True)
        add(lambda: [_measure("old logprobs", traced, user_bytes)], "old logprobs")
        old = traced.out_info[0]
    traced = learner.compute_advantages(traj, old, trace=True)
    add(lambda: [_measure("advantages", traced, state_bytes + user_bytes)], "advantages")
    batch = traced.out_info[0]
    traced = learner.train_step(state, batch, on_policy=on_policy, trace=True)
    add(lambda: [_measure("train step", traced, user_bytes)], "train step")
    return shapes, figures
