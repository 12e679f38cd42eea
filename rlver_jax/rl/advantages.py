"""Advantage estimators: multi-turn GAE, GRPO and RLOO (pure JAX, jit-friendly).

Conventions: token arrays are ``[B, T]``; ``loss_mask`` is 1 on policy (assistant) tokens and 0 on
prompt, simulated-user and padding tokens. Per-sample arrays are ``[N]``. All math runs in fp32.

The learner calls every registered estimator the same way (`rl.registry`): ``estimator(inputs)``
with an :class:`AdvantageInputs`, returning ``(advantages [B, T], returns [B, T] | None)``.
``gae_estimator``, ``grpo_estimator`` and ``rloo_estimator`` are the built-in ones ("gae",
"grpo", "rloo"); the functions they call (:func:`gae_advantages`, ...) are the math.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from rlver_jax.rl.registry import register_advantage

Array = jax.Array

__all__ = [
    "AdvantageInputs",
    "broadcast_to_tokens",
    "dialogue_weights",
    "gae_advantages",
    "gae_estimator",
    "grpo_advantages",
    "grpo_estimator",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "rloo_advantages",
    "rloo_estimator",
]


def _f32(x: Array) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0 (finite gradients either way)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """``sum_i x_i m_i``."""
    return jnp.sum(_f32(x) * _f32(mask), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """``sum_i x_i m_i / sum_i m_i`` (0 where the mask is empty)."""
    return _safe_div(masked_sum(x, mask, axis), jnp.sum(_f32(mask), axis=axis))


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Masked variance over all elements.

    ``var = sum_i m_i (x_i - mu)^2 / sum_i m_i`` with ``mu = masked_mean(x, mask)``; if
    ``unbiased``, multiplied by ``n / (n - 1)`` with ``n = sum_i m_i`` (Bessel, as verl's
    ``masked_var``); left biased when ``n <= 1``.
    """
    mask = _f32(mask)
    mu = masked_mean(x, mask)
    var = masked_mean(jnp.square(_f32(x) - mu), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = jnp.where(n > 1, var * _safe_div(n, n - 1.0), var)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Whiten over the masked elements: ``(x - mu) / sqrt(var + eps)`` (unbiased ``var``).

    With ``shift_mean=False`` the mean is added back: ``(x - mu) / sqrt(var + eps) + mu``.
    Masked-out positions are set to 0.
    """
    x, mask = _f32(x), _f32(mask)
    mu = masked_mean(x, mask)
    out = (x - mu) * lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mu
    return out * mask


def gae_advantages(
    rewards: Array,
    values: Array,
    loss_mask: Array,
    gamma: float | Array = 1.0,
    lam: float | Array = 1.0,
    whiten: bool = True,
) -> tuple[Array, Array]:
    """Multi-turn GAE over ``[B, T]`` token arrays; returns ``(advantages, returns)``.

    Reverse recursion over ``t``, skipping masked (non-policy) positions::

        delta_t   = r_t + gamma * V_next - V_t
        A_t       = delta_t + gamma * lam * A_next
        (V_next, A_next) <- (V_t, A_t)          if m_t = 1
        (V_next, A_next) unchanged               if m_t = 0   (user turns, prompt, padding)

    starting from ``V_next = A_next = 0`` past the end. So the last policy token of turn ``k``
    bootstraps from the first policy token of turn ``k + 1`` (verl / tunix multi-turn semantics);
    rewards must sit on policy tokens (rewards on masked tokens are ignored). With
    ``gamma = lam = 1`` and one reward ``R`` on the last policy token, ``A_t = R - V_t``.

    ``returns = A + V`` (before whitening). If ``whiten``, ``A`` is whitened over the mask
    (:func:`masked_whiten`, unbiased variance). Both outputs are 0 on masked positions.
    """
    rewards, values, mask = _f32(rewards), _f32(values), _f32(loss_mask)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(
        carry: tuple[Array, Array], xs: tuple[Array, Array, Array]
    ) -> tuple[tuple[Array, Array], Array]:
        next_value, last_gae = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        gae = delta + gamma * lam * last_gae
        on = m_t > 0
        next_value = jnp.where(on, v_t, next_value)
        last_gae = jnp.where(on, gae, last_gae)
        return (next_value, last_gae), gae

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv_t = lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_t.T * mask
    returns = (advantages + values) * mask
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def dialogue_weights(dialogue_ids: Array) -> Array:
    """Per-sample weight ``w_i = 1 / n_{d(i)}``, ``n_d`` = number of samples of dialogue ``d``.

    Ids may be arbitrary integers (compared pairwise, ``O(N^2)``, fine for RL batch sizes).
    Each dialogue's weights sum to 1, so it counts once however many turns it has.
    """
    ids = jnp.asarray(dialogue_ids)
    counts = jnp.sum(ids[:, None] == ids[None, :], axis=1)
    return 1.0 / counts.astype(jnp.float32)


def _sample_weights(n: int, dialogue_ids: Array | None, sample_weights: Array | None) -> Array:
    w = jnp.ones((n,), jnp.float32)
    if dialogue_ids is not None:
        w = w * dialogue_weights(dialogue_ids)
    if sample_weights is not None:
        w = w * _f32(sample_weights)
    return w


def grpo_advantages(
    scores: Array,
    group_ids: Array,
    num_groups: int,
    eps: float = 1e-6,
    std_normalize: bool = True,
    ddof: int = 1,
    dialogue_ids: Array | None = None,
    sample_weights: Array | None = None,
) -> Array:
    """Group-normalised outcome advantage, one value per sample ``[N]``.

    With per-sample weights ``w_i`` (default 1), per group ``g``::

        K_g   = sum_{i in g} w_i                          (effective group size)
        mu_g  = sum_{i in g} w_i s_i / K_g
        var_g = sum_{i in g} w_i (s_i - mu_g)^2 / (K_g - ddof)
        A_i   = (s_i - mu_g) / (sqrt(var_g) + eps)        if std_normalize else s_i - mu_g

    ``ddof=1`` by default: the unbiased std, as ``torch.std`` in RLVER's verl and tunix's GRPO
    (``ddof=0`` gives the population std). A group with ``K_g <= 1`` (a single sample or a single
    dialogue) gets advantage 0.

    Per-turn layout (one sample per assistant turn, several per dialogue): pass ``dialogue_ids``
    and each sample is weighted by ``1 / n_{d(i)}`` (see :func:`dialogue_weights`), so ``K_g`` is
    the number of dialogues and each dialogue counts once in ``mu_g`` / ``var_g`` whatever its
    number of turns. When all samples of a dialogue share its score this equals computing the
    stats on per-dialogue scores and broadcasting back. ``sample_weights`` (frequency weights)
    multiply in. Every dialogue must lie in one group; ``group_ids`` in ``[0, num_groups)``.
    Use :func:`broadcast_to_tokens` to spread the result over a sample's policy tokens.
    """
    scores = _f32(scores)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    w = _sample_weights(scores.shape[0], dialogue_ids, sample_weights)

    def gsum(x: Array) -> Array:
        return jax.ops.segment_sum(x, group_ids, num_segments=num_groups)[group_ids]

    k = gsum(w)
    mu = _safe_div(gsum(w * scores), k)
    centered = scores - mu
    if std_normalize:
        var = _safe_div(gsum(w * jnp.square(centered)), k - ddof)
        adv = centered / (jnp.sqrt(var) + eps)
    else:
        adv = centered
    return jnp.where(k > 1.0 + 1e-4, adv, 0.0)


def rloo_advantages(
    scores: Array,
    group_ids: Array,
    num_groups: int,
    dialogue_ids: Array | None = None,
) -> Array:
    """REINFORCE leave-one-out advantage ``[N]``: the baseline is the mean of the others.

    Without ``dialogue_ids``: ``A_i = s_i - (S_g - s_i) / (n_g - 1)`` with ``S_g``, ``n_g`` the
    group's score sum and size. With ``dialogue_ids`` the whole dialogue is left out and each
    dialogue counts once (weights ``w = 1 / n_d``)::

        A_i = s_i - (S_g - S_{d(i)}) / (K_g - 1),  S = sum w s,  K_g = number of dialogues

    A group with a single sample / dialogue gets advantage 0.
    """
    scores = _f32(scores)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    if dialogue_ids is None:
        w = jnp.ones_like(scores)
        own = scores
    else:
        ids = jnp.asarray(dialogue_ids)
        same = (ids[:, None] == ids[None, :]).astype(jnp.float32)
        w = 1.0 / jnp.sum(same, axis=1)
        own = same @ (w * scores)  # S_d: the dialogue's weighted score sum (= its mean score)

    def gsum(x: Array) -> Array:
        return jax.ops.segment_sum(x, group_ids, num_segments=num_groups)[group_ids]

    k = gsum(w)
    baseline = _safe_div(gsum(w * scores) - own, k - 1.0)
    return jnp.where(k > 1.0 + 1e-4, scores - baseline, 0.0)


def broadcast_to_tokens(adv: Array, loss_mask: Array) -> Array:
    """Spread per-sample advantages ``[B]`` over policy tokens: ``A[b, t] = adv[b] * m[b, t]``."""
    return _f32(adv)[:, None] * _f32(loss_mask)


# --------------------------------------------------------------------------- registered estimators
@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What every registered estimator is called with: ``estimator(inputs) -> (advantages,
    returns)``, ``advantages`` ``[B, T]`` (0 off the policy tokens) and ``returns`` ``[B, T]``
    (the critic's targets) or None for an estimator without a critic.

    loss_mask: ``[B, T]`` float32, 1 on policy tokens.
    scores: ``[N]`` outcome score per sample (one sample per row).
    group_ids: ``[N]`` int32 group index in ``[0, num_groups)`` (the samples of one prompt).
    num_groups: a static bound on the number of groups (the learner passes ``N``).
    dialogue_ids: ``[N]``; the per-turn samples of one dialogue share it.
    rewards, values, value_mask: ``[B, T]`` token rewards (less the KL penalty with
      ``kl_as_reward``), the old critic values and the tokens the critic regresses on; set only
      when the learner has a critic (``algorithm: ppo``), None otherwise.
    gamma, lam: GAE's discount and lambda.
    whiten: whiten token-level advantages over ``loss_mask`` (``whiten_advantages``).
    eps: GRPO's epsilon under the group std (``grpo_eps``).
    """

    loss_mask: Array
    scores: Array
    group_ids: Array
    num_groups: int
    dialogue_ids: Array
    rewards: Array | None = None
    values: Array | None = None
    value_mask: Array | None = None
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    eps: float = 1e-6


@register_advantage("gae")
def gae_estimator(x: AdvantageInputs) -> tuple[Array, Array]:
    """:func:`gae_advantages` on the critic's mask, whitened over the policy tokens."""
    adv, returns = gae_advantages(x.rewards, x.values, x.value_mask, x.gamma, x.lam, whiten=False)
    if x.whiten:
        adv = masked_whiten(adv, x.loss_mask)
    return adv * x.loss_mask, returns * x.value_mask


@register_advantage("grpo")
def grpo_estimator(x: AdvantageInputs) -> tuple[Array, None]:
    """:func:`grpo_advantages` per sample (each dialogue counted once), over its tokens."""
    adv = grpo_advantages(
        x.scores, x.group_ids, x.num_groups, dialogue_ids=x.dialogue_ids, eps=x.eps
    )
    return broadcast_to_tokens(adv, x.loss_mask), None


@register_advantage("rloo")
def rloo_estimator(x: AdvantageInputs) -> tuple[Array, None]:
    """:func:`rloo_advantages` per sample (each dialogue left out whole), over its tokens."""
    adv = rloo_advantages(x.scores, x.group_ids, x.num_groups, dialogue_ids=x.dialogue_ids)
    return broadcast_to_tokens(adv, x.loss_mask), None
