"""Policy / value / entropy / KL losses as unreduced ``(total, count)`` pairs (pure JAX).

Every loss is returned as a :class:`LossTerm` so that gradient accumulation over micro-batches
reproduces the full-batch mean exactly: accumulate ``total`` and ``count`` over micro-batches,
then ``value = sum_i total_i / sum_i count_i``. (To differentiate, take the gradient of each
micro-batch's ``total`` and divide the summed gradients by the global ``count``.)

Token arrays are ``[B, T]``; ``mask`` is 1 on policy tokens. Math runs in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlver_jax.rl.advantages import masked_sum
from rlver_jax.rl.registry import register_policy_loss

Array = jax.Array

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "LossTerm",
    "aggregate",
    "apply_kl_reward_penalty",
    "grpo_policy_loss",
    "kl_penalty",
    "logprobs_and_entropy",
    "ppo_policy_loss",
    "value_loss",
]

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS: dict[str, str] = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}
_LOG_RATIO_CLAMP = 20.0


def _f32(x: Array) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


class LossTerm(NamedTuple):
    """An unreduced loss ``(total, count)``; its value is ``total / count`` (0 if ``count == 0``).

    A pytree (NamedTuple), so it passes through ``jit`` / ``scan`` / ``tree_map``: micro-batches
    merge by ``jax.tree.map(jnp.add, a, b)`` (`optim.accumulate_gradients`).
    """

    total: Array
    count: Array

    def value(self) -> Array:
        """``total / count``, or 0 when ``count == 0``."""
        ok = self.count > 0
        return jnp.where(ok, self.total / jnp.where(ok, self.count, 1.0), 0.0)


def aggregate(per_token: Array, mask: Array, mode: str = "token-mean") -> LossTerm:
    """Reduce a ``[B, T]`` per-token loss ``x`` under ``mask`` ``m`` to a :class:`LossTerm`.

    - ``"token-mean"``: ``(sum_{b,t} x m, sum_{b,t} m)``, i.e. the mean over all policy tokens.
    - ``"seq-mean-token-mean"``: ``(sum_b [sum_t x m / sum_t m], #{b : sum_t m > 0})``, i.e. the
      mean over non-empty sequences of each sequence's token mean.
    - ``"seq-mean-token-sum"``: ``(sum_b sum_t x m, #{b : sum_t m > 0})``.
    """
    x, m = _f32(per_token), _f32(mask)
    if mode == "token-mean":
        return LossTerm(masked_sum(x, m), jnp.sum(m))
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        seq_sum = masked_sum(x, m, axis=-1)
        seq_len = jnp.sum(m, axis=-1)
        nonempty = seq_len > 0
        if mode == "seq-mean-token-mean":
            seq_sum = jnp.where(nonempty, seq_sum / jnp.where(nonempty, seq_len, 1.0), 0.0)
        return LossTerm(jnp.sum(seq_sum), jnp.sum(nonempty.astype(jnp.float32)))
    raise ValueError(f"unknown aggregation mode {mode!r}; available: {', '.join(AGG_MODES)}")


def _token_mean(x: Array, mask: Array) -> LossTerm:
    return aggregate(jax.lax.stop_gradient(x), mask, "token-mean")


@register_policy_loss("ppo")
def ppo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg_mode: str = "token-mean",
    clip_ratio_c: float | None = None,
) -> tuple[LossTerm, dict[str, LossTerm]]:
    """PPO clipped surrogate (with optional dual clip); returns ``(loss, metrics)``.

    ``r = exp(clamp(logp - logp_old, -20, 20))`` and per token::

        L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        if clip_ratio_c (dual clip, c > 1) and A < 0:  L = min(L, -A c)

    aggregated with ``agg_mode``. ``advantages`` may be ``[B, T]`` or per-sample ``[B]``.
    Metrics (token-mean LossTerms, no gradient): ``clipfrac`` (fraction where the clipped term
    is active), ``clipfrac_lower`` (dual clip active), ``approx_kl`` (``mean(logp_old - logp)``)
    and ``ratio``.
    """
    logp, old = _f32(logprobs), _f32(old_logprobs)
    adv = _f32(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    mask = _f32(mask)
    log_ratio = jnp.clip(logp - old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(loss1, loss2)
    metrics = {
        "clipfrac": _token_mean((loss2 > loss1).astype(jnp.float32), mask),
        "approx_kl": _token_mean(-log_ratio, mask),
        "ratio": _token_mean(ratio, mask),
    }
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        loss3 = -adv * clip_ratio_c
        lower = (adv < 0) & (per_token > loss3)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, loss3), per_token)
        metrics["clipfrac_lower"] = _token_mean(lower.astype(jnp.float32), mask)
    else:
        metrics["clipfrac_lower"] = _token_mean(jnp.zeros_like(per_token), mask)
    return aggregate(per_token, mask, agg_mode), metrics


# GRPO's policy loss is PPO's clipped surrogate (token-mean by default; per-sample ``[B]``
# advantages are broadcast over the tokens); the learner adds a KL term when ``kl_coef > 0``.
grpo_policy_loss = register_policy_loss("grpo")(ppo_policy_loss)


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    clip: float | None = 0.5,
    agg_mode: str = "token-mean",
) -> tuple[LossTerm, dict[str, LossTerm]]:
    """Clipped value loss; returns ``(loss, metrics)``.

    ``L = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` per token (no clipping if
    ``clip is None``: ``0.5 (V - R)^2``). Metric ``vf_clipfrac``: fraction of policy tokens where
    the clipped term is the larger one.
    """
    v, v_old, ret, mask = _f32(values), _f32(old_values), _f32(returns), _f32(mask)
    loss1 = jnp.square(v - ret)
    if clip is None:
        per_token = loss1
        clipfrac = jnp.zeros_like(loss1)
    else:
        loss2 = jnp.square(jnp.clip(v, v_old - clip, v_old + clip) - ret)
        per_token = jnp.maximum(loss1, loss2)
        clipfrac = (loss2 > loss1).astype(jnp.float32)
    return aggregate(0.5 * per_token, mask, agg_mode), {"vf_clipfrac": _token_mean(clipfrac, mask)}


def _entropy(z: Array, lse: Array) -> Array:
    """``lse - sum_v exp(z_v - lse) z_v`` for fp32 ``z`` ``[..., V]`` and ``lse`` ``[..., 1]``."""
    return lse[..., 0] - jnp.sum(jnp.exp(z - lse) * z, axis=-1)


def _picked_logprob(z: Array, targets: Array, lse: Array) -> Array:
    """``z_y - lse``; the target is picked with a one-hot mask, so its gradient is elementwise
    (a gather's gradient is a scatter, slow on CPU)."""
    onehot = jnp.arange(z.shape[-1], dtype=jnp.int32) == jnp.asarray(targets, jnp.int32)[..., None]
    return jnp.sum(jnp.where(onehot, z, 0.0), axis=-1) - lse[..., 0]


def logprobs_and_entropy(
    logits: Array, targets: Array, entropy_grad: bool = True
) -> tuple[Array, Array]:
    """``(z_y - logsumexp(z), H(z))`` over the last axis in fp32 with ONE logsumexp:
    ``log_softmax(logits)[..., targets]`` and the entropy ``H = logsumexp(z) - sum_v
    softmax(z)_v z_v`` (``logits`` ``[..., V]``, ``targets`` ``[...]`` integer ids; both
    results ``[...]``). ``entropy_grad=False`` stops the
    gradient through ``H`` (a metric when its loss coefficient is 0), which saves the backward
    pass of a softmax over the vocabulary."""
    z = _f32(logits)
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    logp = _picked_logprob(z, targets, lse)
    if not entropy_grad:
        z, lse = jax.lax.stop_gradient((z, lse))
    return logp, _entropy(z, lse)


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str = "k3") -> Array:
    """Per-token KL estimate between the policy and the reference, ``d = logp - logp_ref``.

    - ``k1`` (``kl``): ``d``
    - ``k2`` (``mse``): ``0.5 d^2``
    - ``k3`` (``low_var_kl``): ``exp(-d) - (-d) - 1`` with ``-d`` clamped to ``[-20, 20]`` and
      the result clamped to ``[-10, 10]`` (Schulman's unbiased, non-negative estimator).
    """
    canonical = KL_KINDS.get(kind)
    if canonical is None:
        raise ValueError(f"unknown KL kind {kind!r}; available: {', '.join(KL_KINDS)}")
    d = _f32(logprobs) - _f32(ref_logprobs)
    if canonical == "k1":
        return d
    if canonical == "k2":
        return 0.5 * jnp.square(d)
    neg = jnp.clip(-d, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(neg) - neg - 1.0, -10.0, 10.0)


def apply_kl_reward_penalty(
    token_rewards: Array, kl: Array, beta: float | Array, mask: Array
) -> Array:
    """KL as an in-reward penalty: ``r'_t = r_t - beta * kl_t * m_t`` (``kl`` from
    :func:`kl_penalty`, treated as a constant)."""
    kl = jax.lax.stop_gradient(_f32(kl))
    return _f32(token_rewards) - beta * kl * _f32(mask)
