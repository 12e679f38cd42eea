"""The learner's pure pieces: the train batch with its advantages, and the actor and critic
objectives of one micro-batch (what `rl.learner.Learner` jits, shards and differentiates)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.models.config import ModelConfig
from rlver_jax.rl import advantages as adv_lib
from rlver_jax.rl.losses import (
    LossTerm,
    aggregate,
    apply_kl_reward_penalty,
    kl_penalty,
    value_loss,
)
from rlver_jax.rl.model_outputs import critic_values, policy_outputs
from rlver_jax.rl.optim import LearnerBatch, LearnerConfig, OldOutputs
from rlver_jax.rl.registry import get_advantage, get_policy_loss
from rlver_jax.trajectories import Trajectories

Array = jax.Array
Params = Any
Metrics = dict[str, Array]


def advantage_batch(
    cfg: LearnerConfig, traj: Trajectories, old: OldOutputs
) -> tuple[LearnerBatch, Metrics]:
    """Advantages (PPO: GAE on the rewards and old values; GRPO: group-normalised scores) and
    the train step's batch (see `Learner.compute_advantages`)."""
    lmask = traj.loss_mask.astype(jnp.float32)
    metrics: Metrics = {}
    n = traj.scores.shape[0]
    _, gids = jnp.unique(traj.group_ids, size=n, return_inverse=True)
    adv_in = adv_lib.AdvantageInputs(
        lmask, traj.scores, gids.reshape(-1), n, traj.dialogue_ids,
        gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages, eps=cfg.grpo_eps,
    )  # fmt: skip
    vmask = None
    if cfg.uses_critic:
        vmask = lmask
        if cfg.critic_mask == "response":  # every real token from the first policy token on
            vmask = ((jnp.cumsum(lmask, axis=1) > 0) & traj.token_mask).astype(jnp.float32)
        rewards = traj.rewards.astype(jnp.float32)
        if cfg.kl_as_reward:
            kl = kl_penalty(old.logprobs, old.ref_logprobs, cfg.kl_kind) * lmask
            rewards = apply_kl_reward_penalty(rewards, kl, cfg.kl_coef, lmask)
            metrics["actor/reward_kl"] = adv_lib.masked_mean(kl, lmask)
        adv_in = dataclasses.replace(adv_in, rewards=rewards, values=old.values, value_mask=vmask)
    adv, returns = get_advantage(cfg.advantage_estimator)(adv_in)
    kl_loss = cfg.uses_reference and not cfg.kl_as_reward
    ref = old.ref_logprobs if kl_loss else None
    inputs = (traj.tokens, traj.token_mask, traj.loss_mask, old.logprobs, adv)
    return LearnerBatch(*inputs, returns, old.values, vmask, ref), metrics


def actor_objective(
    cfg: LearnerConfig,
    mcfg: ModelConfig,
    params: Params,
    mb: LearnerBatch,
    count: Array,
    on_policy: bool = False,
) -> tuple[Array, dict[str, LossTerm]]:
    """``(sum_pg - c_H sum_H + c_KL sum_KL) / count`` on one micro-batch, plus metrics.

    ``on_policy``: ``mb.old_logprobs`` hold the SAMPLER's logprobs; the old logprobs are
    ``stop_gradient(logp)`` and ``rollout/logprob_gap_mean = sum |logp - lp_sampler| m /
    sum m`` is reported (see the module docs)."""
    logp, ent = policy_outputs(
        params, mb.tokens, mb.token_mask, mcfg, cfg.temperature, cfg.entropy_coef > 0,
        needed=mb.loss_mask,
    )  # fmt: skip
    mask, clip = mb.loss_mask, (cfg.clip_low, cfg.clip_high, cfg.loss_agg, cfg.clip_ratio_c)
    old = jax.lax.stop_gradient(logp) if on_policy else mb.old_logprobs
    pg, pg_metrics = get_policy_loss(cfg.policy_loss)(logp, old, mb.advantages, mask, *clip)
    entropy = aggregate(ent, mask, cfg.loss_agg)
    total = pg.total - cfg.entropy_coef * entropy.total
    terms = {"actor/pg_loss": pg, "actor/entropy": entropy}
    terms |= {f"actor/{k}": v for k, v in pg_metrics.items()}
    if on_policy:
        gap = jnp.abs(old - mb.old_logprobs.astype(jnp.float32))
        terms["rollout/logprob_gap_mean"] = aggregate(gap, mask, "token-mean")
    if mb.ref_logprobs is not None:
        kl = aggregate(kl_penalty(logp, mb.ref_logprobs, cfg.kl_kind), mask, cfg.loss_agg)
        total, terms["actor/kl_loss"] = total + cfg.kl_coef * kl.total, kl
    return total / jnp.maximum(count, 1.0), jax.lax.stop_gradient(terms)


def critic_objective(
    cfg: LearnerConfig, mcfg: ModelConfig, params: Params, mb: LearnerBatch, count: Array
) -> tuple[Array, dict[str, LossTerm]]:
    """``sum 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2) / count`` on one micro-batch."""
    v = critic_values(params, mb.tokens, mb.token_mask, mcfg)
    loss, metrics = value_loss(
        v, mb.old_values, mb.returns, mb.value_mask, cfg.value_clip, cfg.loss_agg
    )
    terms = {"critic/vf_loss": loss, "critic/vf_clipfrac": metrics["vf_clipfrac"]}
    terms["critic/vpred_mean"] = aggregate(v, mb.value_mask, "token-mean")
    return loss.total / jnp.maximum(count, 1.0), jax.lax.stop_gradient(terms)
