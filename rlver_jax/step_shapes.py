"""The largest shapes one RL step of a config runs at, per program: what the memory formulas
(`rlver_jax.plan`) size and what the compiled dry run (`rlver_jax.step_programs`) lowers.

Buckets are the configs' own (`buckets.capped_bucket`: the bucket that holds the longest
request, or the largest one, which truncates); batches are rounded up to a multiple of the
mesh's batch axes (data x fsdp), as the samplers and the learner pad them.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import AbstractMesh

from rlver_jax.buckets import capped_bucket, pow2_multiple
from rlver_jax.models.config import ModelConfig
from rlver_jax.plan_sizes import dp_round, rows_per_device
from rlver_jax.run_config import RunConfig
from rlver_jax.sampling.config import SamplerConfig

JUDGE_CANDIDATES = 21  # the judge scores emotion changes -10 .. 10
CANDIDATE_WIDTH = 3  # C: tokens of the judge's longest candidate answer (a sign and 2 digits)


@dataclasses.dataclass(frozen=True)
class SamplerShape:
    """One sampler call: `batch` rows (B), a `prompt` bucket (P), `new_tokens` (N)."""

    batch: int
    prompt: int
    new_tokens: int


@dataclasses.dataclass(frozen=True)
class LearnerShape:
    """The learner's batch: `rows` (N) x `seq` (T), `micro` / `forward_micro` rows per
    device in a train micro-batch / an old-logprob chunk, `rows_per_device` of N."""

    rows: int
    seq: int
    micro: int
    forward_micro: int
    rows_per_device: int


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The policy sampler's call, the LLM user's reply sampler and judge (None without an LLM
    user; the judge's `new_tokens` is the candidate width C), and the learner's batch."""

    policy: SamplerShape
    learner: LearnerShape
    user: SamplerShape | None = None
    judge: SamplerShape | None = None


def user_sampler_config(run: RunConfig) -> SamplerConfig:
    """The LLM user's own `SamplerConfig` (`env.llm_user.LLMUser`): defaults, its prompt
    buckets."""
    return SamplerConfig(prompt_buckets=run.user.llm.prompt_buckets)


def learner_shape(run: RunConfig, mesh: AbstractMesh) -> LearnerShape:
    """T: the learner's bucket of the longest sample (prompt + reply); N: the trainer's rows
    (dialogues, x turns in think mode's per-turn layout, rounded as the trainer pads)."""
    ro, lc = run.rollout, run.learner
    width = capped_bucket(ro.max_prompt_tokens + ro.max_reply_tokens, ro.seq_len_buckets)
    T = capped_bucket(width, lc.seq_buckets)
    per_turn = run.scaffold.mode == "think" and run.scaffold.strip_thoughts_from_context
    n = ro.profiles_per_batch * ro.samples_per_profile
    n *= run.dynamics.max_turns_train if per_turn else 1
    N = pow2_multiple(n, lc.mini_batch_size)
    return LearnerShape(
        rows=N, seq=T, micro=rows_per_device(lc.micro_batch_size, mesh),
        forward_micro=rows_per_device(lc.fwd_micro, mesh), rows_per_device=rows_per_device(N, mesh),
    )  # fmt: skip


def step_shapes(
    run: RunConfig, user: ModelConfig | None, mesh: AbstractMesh,
    user_prompt_tokens: int | None = None, candidate_width: int = CANDIDATE_WIDTH,
) -> StepShapes:  # fmt: skip
    """The shapes of `run`'s step on `mesh`. `user_prompt_tokens` (default:
    rollout.max_prompt_tokens + 512 for the persona and instructions) sizes the LLM user's
    prompt bucket."""
    ro, sc = run.rollout, run.sampler
    dialogues = ro.profiles_per_batch * ro.samples_per_profile
    policy = SamplerShape(
        dp_round(capped_bucket(dialogues, sc.batch_buckets), mesh),
        capped_bucket(ro.max_prompt_tokens, sc.prompt_buckets),
        capped_bucket(ro.max_reply_tokens, sc.new_token_buckets),
    )
    shapes = StepShapes(policy, learner_shape(run, mesh))
    if user is None:
        return shapes
    llm, usc = run.user.llm, user_sampler_config(run)
    tokens = user_prompt_tokens or ro.max_prompt_tokens + 512
    bound = min(max(llm.prompt_buckets), user.max_position_embeddings - candidate_width)
    P = capped_bucket(min(tokens, bound), llm.prompt_buckets)
    reply = SamplerShape(
        dp_round(capped_bucket(dialogues, usc.batch_buckets), mesh), P,
        capped_bucket(llm.max_reply_tokens, usc.new_token_buckets),
    )  # fmt: skip
    chunk = dp_round(max(llm.judge_batch_buckets), mesh)
    Bj = dp_round(capped_bucket(min(dialogues, chunk), llm.judge_batch_buckets), mesh)
    judge = SamplerShape(Bj, P, candidate_width)
    return dataclasses.replace(shapes, user=reply, judge=judge)
