"""`RunConfig`: the whole experiment in one frozen dataclass, loaded from YAML + overrides.

    cfg = load_run_config("configs/tiny_cpu.yaml", ["learner.actor_lr=2e-6", "seed=1"])

Each section is the config dataclass of the module that uses it; unknown keys and bad values
fail with the dotted key named (`config_io`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax

from rlver_jax.config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from rlver_jax.env.dynamics import EmotionDynamicsConfig
from rlver_jax.env.llm_user import LLMUserConfig
from rlver_jax.env.reference_user import ReferenceUserConfig
from rlver_jax.env.rollout import RolloutConfig
from rlver_jax.kernels.select import check_backends
from rlver_jax.model_io.loader import ModelSpec
from rlver_jax.parallel.mesh import MeshConfig, MeshConfigError
from rlver_jax.rl.optim import LearnerConfig
from rlver_jax.sampling.sampler import SamplerConfig
from rlver_jax.scaffold import ScaffoldConfig


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """The simulated user: `reference` (compiled lexicon model) or `llm` (a model plays it).

    kind: which user plays the other side: "reference" (the lexicon model of `reference`) or
      "llm" (the checkpoint `model`, prompted as in `llm`).
    model: the checkpoint that plays an `llm` user (frozen; loaded separately from the policy,
      placed on the same mesh).
    """

    kind: Literal["reference", "llm"] = "reference"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    reference: ReferenceUserConfig = dataclasses.field(default_factory=ReferenceUserConfig)
    llm: LLMUserConfig = dataclasses.field(default_factory=LLMUserConfig)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which profiles: a packaged set ("en": our English set; "rlver": RLVER's Chinese set) or
    JSONL files of the same schema (`train_path` / `test_path`, language given).

    profile_set: the packaged set: "en" (our English profiles) or "rlver" (RLVER's Chinese ones).
    train_path: a JSONL file of training profiles instead of the packaged set (None: packaged).
    test_path: a JSONL file of evaluation profiles (None: the packaged set's test split).
    language: the language of custom profile files, "en" or "zh" (required with them).
    shuffle: shuffle the training profiles (by `seed`; reshuffled every epoch).
    tfds_dir: where the profile dataset is prepared and cached (None: TFDS's default directory).
    """

    profile_set: Literal["en", "rlver"] = "en"
    train_path: str | None = None
    test_path: str | None = None
    language: Literal["en", "zh"] | None = None
    shuffle: bool = True
    tfds_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("train_path", "test_path"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path!r} does not exist")
        if (self.train_path or self.test_path) and self.language is None:
            raise ValueError("language is required with custom profile files (en or zh)")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The outer loop (`rlver_jax.trainer.train`): steps, checkpoints, logging.

    steps: where the run stops (the LR schedule's horizon is `learner.total_steps`).
    checkpoint_every: save every N steps (and always at the last step and on SIGTERM / SIGINT).
    keep_checkpoints: keep the last K checkpoints. async_checkpoint: write in the background.
    resume: continue from the latest checkpoint under `output_dir/checkpoints` when present
      (false: refuse to start in an output_dir that holds checkpoints).
    log_transcripts_every: append sample dialogues to `output_dir/transcripts.jsonl` every N
      steps; transcripts_per_log: how many (None: every dialogue of the step).
    tensorboard: also write TensorBoard scalars; progress_bar: a tqdm bar on process 0.
    fast_compile: compile the learner with XLA's backend optimisation level 0 (much faster CPU
      compiles of tiny models, slower steps; numerics unchanged in kind, not bitwise).
    """

    steps: int = 10
    checkpoint_every: int = 5
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume: bool = True
    log_transcripts_every: int = 1
    transcripts_per_log: int | None = 4
    tensorboard: bool = True
    progress_bar: bool = True
    fast_compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_transcripts_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.transcripts_per_log is not None and self.transcripts_per_log < 1:
            raise ValueError(
                f"transcripts_per_log must be >= 1 or null, got {self.transcripts_per_log}"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One experiment: policy, mesh, scaffold, simulated user, rollouts, learner, trainer.

    name: the run's name (in logs and reports).
    seed: the run's seed: rollout sampling, the order of the profiles, the learner's RNG.
    output_dir: where the run writes config.yaml, metrics, transcripts and checkpoints.
    """

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/run"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    scaffold: ScaffoldConfig = dataclasses.field(default_factory=ScaffoldConfig)
    user: UserConfig = dataclasses.field(default_factory=UserConfig)
    dynamics: EmotionDynamicsConfig = dataclasses.field(default_factory=EmotionDynamicsConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        check_sampling_lengths(self)


# --------------------------------------------------------------------------- length limits
def _largest(buckets: Sequence[int], key: str) -> int:
    if not buckets:
        raise ConfigError(f"{key}: needs at least one bucket")
    return max(buckets)


def check_sampling_lengths(cfg: RunConfig) -> None:
    """Limits that every rollout (training or evaluation) must hold; checked whenever a
    RunConfig is built, so before any work. A dialogue whose next prompt is longer than
    `rollout.max_prompt_tokens` ends (CONTEXT_FULL), so the sampler gets prompts of at most
    that many tokens, asks for at most `rollout.max_reply_tokens` and batches at most
    `profiles_per_batch x samples_per_profile` dialogues:

        rollout.max_prompt_tokens                        <= max(sampler.prompt_buckets)
        rollout.max_reply_tokens                         <= max(sampler.new_token_buckets)
        rollout.profiles_per_batch x samples_per_profile <= max(sampler.batch_buckets)

    Raises a one-line ConfigError naming the keys.
    """
    ro, sc = cfg.rollout, cfg.sampler
    prompt = _largest(sc.prompt_buckets, "sampler.prompt_buckets")
    if ro.max_prompt_tokens > prompt:
        raise ConfigError(
            f"rollout.max_prompt_tokens={ro.max_prompt_tokens} exceeds the largest "
            f"sampler.prompt_buckets {prompt}: add a prompt bucket >= {ro.max_prompt_tokens} "
            f"or lower rollout.max_prompt_tokens to {prompt}"
        )
    new = _largest(sc.new_token_buckets, "sampler.new_token_buckets")
    if ro.max_reply_tokens > new:
        raise ConfigError(
            f"rollout.max_reply_tokens={ro.max_reply_tokens} exceeds the largest "
            f"sampler.new_token_buckets {new}: add a bucket >= {ro.max_reply_tokens} or lower "
            "rollout.max_reply_tokens"
        )
    rows = ro.profiles_per_batch * ro.samples_per_profile
    batch = _largest(sc.batch_buckets, "sampler.batch_buckets")
    if rows > batch:
        raise ConfigError(
            f"rollout.profiles_per_batch x rollout.samples_per_profile = {rows} dialogues "
            f"exceed the largest sampler.batch_buckets {batch}: add a bucket >= {rows} or "
            "roll out fewer dialogues at once"
        )


def check_training_lengths(cfg: RunConfig) -> None:
    """Limits of the training samples, checked before the first training step (by
    `load_run_config` for training and at the start of `trainer.train`).

    A training sample is one prompt the policy was given plus its reply (the per-turn layout),
    or the whole dialogue up to the last reply, i.e. the last prompt plus that reply (the plain
    layout). A prompt longer than `rollout.max_prompt_tokens` is never sampled (the dialogue
    ends) and a reply has at most `rollout.max_reply_tokens` tokens, so whatever the number of
    turns (`dynamics.max_turns_*`) and the user's message lengths, a sample has at most

        L = rollout.max_prompt_tokens + rollout.max_reply_tokens    tokens, and

        L <= max(rollout.seq_len_buckets)           the rollout pads samples to one of these
        bucket(L) <= max(learner.seq_buckets)       the learner pads that width to one of its own
                                                    (with learner.pack_sequences: L itself)

    Evaluation builds no training samples and needs neither. Raises a one-line ConfigError
    naming the keys.
    """
    ro, lc = cfg.rollout, cfg.learner
    longest = ro.max_prompt_tokens + ro.max_reply_tokens
    what = (
        f"rollout.max_prompt_tokens + rollout.max_reply_tokens = {ro.max_prompt_tokens} + "
        f"{ro.max_reply_tokens} = {longest} tokens (the longest training sample)"
    )
    largest = _largest(ro.seq_len_buckets, "rollout.seq_len_buckets")
    if longest > largest:
        raise ConfigError(
            f"{what} exceed the largest rollout.seq_len_buckets {largest}: add a bucket >= "
            f"{longest} (and to learner.seq_buckets) or lower rollout.max_prompt_tokens to "
            f"{largest - ro.max_reply_tokens}"
        )
    width = longest if lc.pack_sequences else min(b for b in ro.seq_len_buckets if b >= longest)
    learner = _largest(lc.seq_buckets, "learner.seq_buckets")
    if width > learner:
        padded = "" if lc.pack_sequences else f", padded to the rollout.seq_len_buckets {width},"
        raise ConfigError(
            f"{what}{padded} exceed the largest learner.seq_buckets {learner}: add a learner "
            f"bucket >= {width} or lower rollout.max_prompt_tokens"
        )


def load_run_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, training: bool = True
) -> RunConfig:
    """RunConfig from a YAML file (or defaults when None) plus `key=value` overrides.

    Every config is checked against `check_sampling_lengths`; `training` (False for
    evaluation, which trains nothing) also checks `check_training_lengths`."""
    data = load_yaml(path) if path is not None else {}
    cfg = from_dict(RunConfig, apply_overrides(data, overrides))
    if training:
        check_training_lengths(cfg)
    models = {"model": cfg.model}
    if cfg.user.kind == "llm":
        models["user.model"] = cfg.user.model
    try:
        devices = math.prod(cfg.mesh.shape(jax.device_count()))
    except MeshConfigError:  # a mesh for another machine (`rlver-jax plan`): its devices
        devices = math.prod(max(n, 1) for n in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    check_backends(models, cfg.sampler.decode, devices, training=training)
    return cfg


def run_config_dict(cfg: RunConfig) -> dict:
    """A YAML-safe dict of the whole config (saved next to every run's outputs)."""
    return to_dict(cfg)
