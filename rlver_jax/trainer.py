"""The training loop: rollout -> learner update -> metrics -> checkpoint, resumable exactly.

    summary = train(load_run_config("configs/tiny_cpu.yaml", ["trainer.steps=20"]))

One step ``s`` (1-based) of :func:`train`::

    profiles      = next(profile_iterator)                       # B profiles (grain, seeded)
    result        = engine.run(state.policy, profiles, rollout_seed(cfg.seed, s))
    state, m      = learner.update(state, result.trajectories)   # PPO / GRPO (skips non-finite)
    checkpoint    every trainer.checkpoint_every steps, at the last step and on SIGTERM / SIGINT
    metrics.jsonl + TensorBoard, transcripts.jsonl every trainer.log_transcripts_every steps

Outputs under ``cfg.output_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl``,
TensorBoard events, ``transcripts.jsonl`` (sample dialogues, each tagged with its step) and
``checkpoints/<step>/`` (orbax: the whole :class:`~rlver_jax.rl.learner.TrainState`, i.e.
params, optimiser states, step and RNG, plus a JSON sidecar with the data-iterator state).

Exact resume: a rerun with the same ``output_dir`` restores the latest checkpoint (state bitwise,
the grain iterator's position) and truncates the logs past it. Everything random in a step is a
function of ``(cfg.seed, step)`` and the restored state, so ``N`` steps in one go and ``k`` steps,
an interruption and ``N - k`` more give bit-identical parameters (on one platform).

Data: every process iterates the same global profile stream (``shard_count=1``). The sampler and
the LLM user are SPMD programs over the global mesh that expect every process to hold the whole
batch of prompts, so a per-host shard of profiles would need per-host rollouts; with one global
stream the iterator state is also one JSON value, saved once.

``learner.total_steps`` is the LR schedule's horizon (warm-up = ratio x total_steps);
``trainer.steps`` is where the run stops. Real configs set both to the same value; a run may
stop earlier (``trainer.steps=...``) and be continued later with the schedule unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from rlver_jax import components
from rlver_jax.buckets import pow2_multiple
from rlver_jax.env.profile_dataset import (
    custom_profile_config,
    profile_data_source,
    profile_iterator,
)
from rlver_jax.env.rollout import RolloutEngine, RolloutResult, write_transcripts
from rlver_jax.metrics import MetricsWriter, PhaseTimer, ProgressBar
from rlver_jax.models.config import ModelConfig
from rlver_jax.parallel.compile_count import compile_count
from rlver_jax.parallel.rules import DEFAULT_RULES, Rules
from rlver_jax.rl.checkpoint import Checkpointer, checkpoint_extra, restore_iterator
from rlver_jax.rl.learner import Learner, LearnerConfig, TrainState
from rlver_jax.rl.signals import PreemptionGuard, save_and_stop_if_requested, save_on_crash
from rlver_jax.run_config import RunConfig, check_training_lengths, run_config_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TRANSCRIPTS_FILE = "transcripts.jsonl"
CHECKPOINT_DIR = "checkpoints"
REWARD_KEY = "reward/mean"
MAX_ROLLOUT_SEED = 2_000_000  # the engine sends seed * 1009 + turn to the sampler as an int32

# Rollout metric (RolloutEngine._metrics) -> logged name.
_ROLLOUT_KEYS = {
    "reward_mean": REWARD_KEY,
    "final_emotion_mean": "reward/final_emotion_mean",
    "success_rate": "reward/success_rate",
    "failure_rate": "reward/failure_rate",
    "turns_mean": "rollout/turns_mean",
    "format_break_rate": "rollout/format_break_rate",
    "reply_tokens_mean": "rollout/reply_tokens_mean",
    "thought_tokens_mean": "rollout/thought_tokens_mean",
    "samples": "rollout/samples",
    "sampled_tokens": "rollout/sampled_tokens",
    "sampling_tokens_per_s": "perf/sampling_tokens_per_s",
    "time/policy_sampling_s": "time/rollout/policy_sampling",
    "time/user_judging_s": "time/rollout/user_judging",
    "time/user_replies_s": "time/rollout/user_replies",
    "time/collate_s": "time/rollout/collate",
}

# Keys every step's metrics record holds (PPO adds critic/*; see the tests).
STEP_KEYS: tuple[str, ...] = (
    *_ROLLOUT_KEYS.values(),
    "rollout/logprob_gap_mean",
    "actor/pg_loss",
    "actor/entropy",
    "actor/approx_kl",
    "actor/clipfrac",
    "actor/grad_norm",
    "actor/lr",
    "skipped",
    "time/rollout",
    "time/learner",
    "time/checkpoint",
    "time/step",
    "perf/learner_tokens_per_s",
    "perf/compiles",
    "perf/compiles_step",
)
PPO_KEYS: tuple[str, ...] = ("critic/vf_loss", "critic/explained_var", "critic/grad_norm")


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What :func:`train` did.

    start_step: the step resumed from (0 for a fresh run); final_step: the last step completed.
    preempted: stopped by SIGTERM / SIGINT (a checkpoint of ``final_step`` was saved).
    checkpoints: the checkpoint steps on disk at the end; last_metrics: the final step's record.
    rewards: ``reward/mean`` of each step run by this call, in order.
    """

    output_dir: str
    start_step: int
    final_step: int
    preempted: bool
    checkpoints: tuple[int, ...]
    last_metrics: dict[str, Any]
    rewards: tuple[float, ...]
    wall_s: float


def rollout_seed(seed: int, step: int) -> int:
    """The rollout seed of training step ``step``: a hash of ``(seed, step)`` (resume-exact)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1)
    return int(state[0]) % MAX_ROLLOUT_SEED


def profile_source(cfg: RunConfig) -> Sequence[Any]:
    """The train split as a tfds (array_record) data source: the packaged set, or the config's
    own JSONL file under a config name derived from its path."""
    config: Any = cfg.data.profile_set
    if cfg.data.train_path is not None:
        path = str(Path(cfg.data.train_path).resolve())
        name = "custom_" + hashlib.sha256(path.encode()).hexdigest()[:12]
        config = custom_profile_config(name, cfg.data.language or "en", train_path=path)
    return profile_data_source(config, "train", cfg.data.tfds_dir)


def write_config(cfg: RunConfig, out_dir: Path) -> Path:
    """Save the resolved config as ``out_dir/config.yaml`` (loadable by ``load_run_config``)."""
    path = out_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(run_config_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def _truncate_transcripts(path: Path, after_step: int) -> None:
    """Drop transcript lines of steps past ``after_step`` (replayed after a resume)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in kept if json.loads(ln).get("step", 0) <= after_step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


_LEARNERS: dict[tuple[Any, ...], Learner] = {}


def cached_learner(
    model_config: ModelConfig, config: LearnerConfig, mesh: Mesh, fast_compile: bool = False,
    rules: Rules = DEFAULT_RULES,
) -> Learner:  # fmt: skip
    """One :class:`Learner` per (model, learner config, mesh devices): later :func:`train` calls
    in the same process (tests, sweeps) reuse its compiled steps instead of recompiling. (Keyed
    by device ids: equal meshes do not always hash equal.)"""
    key = (model_config, config, mesh.axis_names, mesh.devices.shape, fast_compile, rules)
    key += tuple(d.id for d in mesh.devices.flat)
    if key not in _LEARNERS:
        if len(_LEARNERS) >= 4:
            _LEARNERS.pop(next(iter(_LEARNERS)))
        copts = {"xla_backend_optimization_level": 0} if fast_compile else None
        _LEARNERS[key] = Learner(model_config, config, mesh, copts, rules)
    return _LEARNERS[key]


def _abstract_state(learner: Learner, params: Any, key: jax.Array) -> TrainState:
    """``ShapeDtypeStruct``s (with shardings) of the state ``learner.init_state`` would build
    (traced by a twin without compiler options: those are refused on a jit nested in a trace)."""
    twin = Learner(learner.mcfg, learner.cfg, learner.mesh, rules=learner.rules)
    shapes = jax.eval_shape(twin.init_state, params, key)
    shardings = learner.state_shardings()
    if shardings is None:
        return shapes
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def step_metrics(
    result: RolloutResult, learner_metrics: Mapping[str, float], phases: Mapping[str, float]
) -> dict[str, float]:
    """One step's record: rollout metrics (renamed), learner metrics, phase times, rates."""
    out = {new: result.metrics[old] for old, new in _ROLLOUT_KEYS.items() if old in result.metrics}
    out |= dict(learner_metrics) | dict(phases)
    tokens = float(np.asarray(result.trajectories.token_mask).sum())
    out["perf/learner_tokens_per_s"] = tokens / max(phases.get("time/learner", 0.0), 1e-9)
    return out


def _rollout(
    engine: RolloutEngine, state: TrainState, profiles: Sequence[Any], seed: int
) -> RolloutResult:
    """One step's rollout (the engine seeds the user with ``seed`` too)."""
    return engine.run(state.policy, list(profiles), seed=seed)


def train(cfg: RunConfig) -> TrainSummary:
    """Train ``cfg`` to ``cfg.trainer.steps`` steps (resuming when a checkpoint exists); see the
    module docstring.

    Stops early, after saving, on SIGTERM / SIGINT. On an exception the last completed step is
    saved (unless its buffers were donated to the failing step) and the exception re-raised.
    """
    check_training_lengths(cfg)  # ConfigError before any work
    t_start = time.perf_counter()
    tc, primary = cfg.trainer, jax.process_index() == 0
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compile_count()  # install the compile listener before the first jit
    if cfg.learner.temperature != cfg.rollout.temperature:
        log.warning(
            "learner.temperature=%s differs from rollout.temperature=%s: the learner's old "
            "logprobs will not match the sampler's (see rollout/logprob_gap_mean)",
            cfg.learner.temperature,
            cfg.rollout.temperature,
        )

    mesh = components.build_mesh(cfg)  # first: starts jax.distributed, which orbax needs
    ckpt = Checkpointer(
        out_dir / CHECKPOINT_DIR,
        save_every=tc.checkpoint_every,
        keep=tc.keep_checkpoints,
        async_save=tc.async_checkpoint,
    )
    if not tc.resume and ckpt.latest_step() is not None:
        ckpt.close()
        raise FileExistsError(
            f"{ckpt.directory} holds checkpoints {ckpt.all_steps()} and trainer.resume is false: "
            "pick a new output_dir (or delete them) to start over, or resume"
        )
    if primary:
        write_config(cfg, out_dir)
    params, mcfg, tok, sampler = components.build_policy(cfg.model, mesh, cfg)
    user = components.build_user(cfg, mesh, tok)
    engine = components.build_engine(cfg, sampler, tok, user)
    learner = cached_learner(mcfg, cfg.learner, mesh, tc.fast_compile, cfg.mesh.learner_rules)
    key = jax.random.key_data(jax.random.key(cfg.seed))
    batch = cfg.rollout.profiles_per_batch
    profiles_it = profile_iterator(
        profile_source(cfg),
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        shard_index=0,
        shard_count=1,
        batch_size=batch,
    )
    start = 0
    if ckpt.latest_step() is not None:
        abstract = _abstract_state(learner, params, key)
        del params  # free the loaded weights before the restored copy arrives
        state, extra = ckpt.restore(abstract_state=abstract)
        start = int(ckpt.latest_step() or 0)
        restore_iterator(profiles_it, extra)
        changed = config_diff(extra.get("config") or {}, run_config_dict(cfg))
        changed = [k for k in changed if not k.startswith("trainer.")]
        if changed:
            log.warning("resuming step %d with a changed config: %s", start, ", ".join(changed))
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        state = learner.init_state(params, key)
        del params
    config_dict = run_config_dict(cfg)

    rewards: list[float] = []
    record: dict[str, Any] = {}
    step, preempted = start, False
    with contextlib.ExitStack() as stack:
        stack.callback(ckpt.close)
        writer = stack.enter_context(
            MetricsWriter(out_dir, tensorboard=tc.tensorboard, truncate_after=start)
        )
        if primary:
            _truncate_transcripts(out_dir / TRANSCRIPTS_FILE, start)
        bar = stack.enter_context(
            ProgressBar(
                tc.steps, initial=start, reward_key=REWARD_KEY, disable=not tc.progress_bar
                or not primary,
            )
        )  # fmt: skip
        guard = stack.enter_context(PreemptionGuard())
        last = stack.enter_context(save_on_crash(ckpt))
        timer = PhaseTimer()
        for step in range(start + 1, tc.steps + 1):
            compiles0 = compile_count()
            seed = rollout_seed(cfg.seed, step)
            with timer("rollout"):
                result = _rollout(engine, state, next(profiles_it), seed)
            with timer("learner"):
                # whole mini-batches, a power of two of them: think mode has a varying number
                # of per-turn samples, and the buckets bound the learner's compilations
                n_rows = pow2_multiple(result.trajectories.num_samples, cfg.learner.mini_batch_size)
                state, learner_metrics = learner.update(state, result.trajectories, n_rows)
            if learner_metrics.get("skipped", 0.0) > 0:
                log.warning(
                    "step %d: %d update(s) skipped (non-finite loss or gradient)",
                    step,
                    int(learner_metrics["skipped"]),
                )
            extra = checkpoint_extra(
                data_iterator=profiles_it,
                seed=cfg.seed,
                config=config_dict,
                metrics={REWARD_KEY: result.metrics["reward_mean"]},
                rollout_seed=seed,
            )
            last.update(step, state, extra)
            with timer("checkpoint"):
                ckpt.save(step, state, extra, force=step == tc.steps)
            metrics = step_metrics(result, learner_metrics, timer.lap())
            metrics["perf/compiles"] = compile_count()
            metrics["perf/compiles_step"] = compile_count() - compiles0
            record = writer.write(step, metrics)
            rewards.append(float(result.metrics["reward_mean"]))
            if primary and step % tc.log_transcripts_every == 0:
                keep = result.transcripts[: tc.transcripts_per_log or None]
                write_transcripts(out_dir / TRANSCRIPTS_FILE, [{"step": step} | t for t in keep])
            bar.update(step, metrics)
            if save_and_stop_if_requested(guard, ckpt, step, state, extra):
                preempted = True
                break
        ckpt.wait()
        checkpoints = tuple(ckpt.all_steps())
    return TrainSummary(
        output_dir=str(out_dir),
        start_step=start,
        final_step=step,
        preempted=preempted,
        checkpoints=checkpoints,
        last_metrics=record,
        rewards=tuple(rewards),
        wall_s=time.perf_counter() - t_start,
    )
