"""Learner hyper-parameters, data types and optimisation machinery (used by
:mod:`rlver_jax.rl.learner`): :class:`LearnerConfig`, :class:`TrainState` / :class:`OldOutputs` /
:class:`LearnerBatch`, AdamW with linear warm-up then constant LR, global-norm clipping,
non-finite skipping, and exact gradient accumulation over interleaved mini/micro-batches.

verl's optimiser, re-expressed for JAX (``torch.optim.AdamW`` + ``clip_grad_norm_`` +
``get_constant_schedule_with_warmup``):

- learning rate at training step ``s`` (the number of training steps already taken)::

      lr(s) = base_lr * min(1, s / max(1, W))     W = int(warmup_ratio * total_steps)

  so the first step runs with ``lr = 0`` when ``W > 0``, exactly as verl's ``LambdaLR``. The LR
  is a traced scalar: changing it never recompiles. Every optimiser update inside one training
  step (mini-batches, PPO epochs) uses the same ``lr(s)``, as verl steps its scheduler once per
  training step.
- global-norm clipping, torch's formula: ``g <- g * min(1, c / (||g||_2 + 1e-6))``.
- decoupled weight decay (AdamW) on every parameter, as verl (no mask)::

      p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)

- skip: when the loss or ``||g||`` is not finite (or the update is disabled, e.g. an empty
  mini-batch), params *and* optimiser state are returned unchanged (selected with ``jnp.where``,
  so they stay bit-identical); Adam's internal ``count`` therefore does not advance either.
- precision, whatever the params' dtype (``model.param_dtype``): gradients are accumulated in
  fp32, Adam's moments ``m``/``v`` are fp32 and the update ``p - lr * direction`` is computed in
  fp32, then cast back to the param dtype (round to nearest). So bf16 params keep bf16 storage
  and every carry of the train step keeps its dtype (docs/architecture.md, "Precision of the
  learner state"). With fp32 params all of it is the plain fp32 AdamW.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlver_jax.rl.losses import AGG_MODES, KL_KINDS, aggregate
from rlver_jax.rl.registry import list_advantages, list_policy_losses

Array = jax.Array
PyTree = Any

__all__ = [
    "MOMENT_DTYPE",
    "TOKEN_LEVEL_ESTIMATORS",
    "AdamWConfig",
    "LearnerBatch",
    "LearnerConfig",
    "LearnerConfigError",
    "OldOutputs",
    "TrainState",
    "UpdateStats",
    "accumulate_gradients",
    "clip_by_global_norm",
    "cond_or_zeros",
    "guarded_update",
    "minibatch_update",
    "opt_state_shardings",
    "strided_merge",
    "strided_split",
    "warmup_constant_lr",
    "warmup_steps",
    "widen",
]


MOMENT_DTYPE = jnp.float32  # Adam's moments, the accumulated gradients and the update math


def widen(tree: PyTree) -> PyTree:
    """Floating leaves of ``tree`` as :data:`MOMENT_DTYPE` (fp32 leaves as they are, no copy);
    other leaves (integers, optax's placeholders) unchanged."""

    def cast(x: Any) -> Any:
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or dtype == MOMENT_DTYPE:
            return x
        return x.astype(MOMENT_DTYPE)

    return jax.tree.map(cast, tree)


def warmup_steps(ratio: float, total_steps: int) -> int:
    """``int(ratio * total_steps)``, verl's ``num_warmup_steps``."""
    return int(ratio * total_steps)


def warmup_constant_lr(base_lr: float, num_warmup: int, step: Array | int) -> Array:
    """``base_lr * min(1, step / max(1, num_warmup))`` as an fp32 scalar (``base_lr`` if no
    warm-up)."""
    step_f = jnp.asarray(step, jnp.float32)
    if num_warmup <= 0:
        return jnp.full((), base_lr, jnp.float32)
    return base_lr * jnp.minimum(1.0, step_f / float(max(1, num_warmup)))


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """One model's optimiser (hashable: a static argument of the jitted train step)."""

    lr: float
    num_warmup: int
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0

    def tx(self) -> optax.GradientTransformation:
        """The LR-free direction ``m_hat / (sqrt(v_hat) + eps) + wd * p`` (lr applied outside),
        in fp32 whatever the params' dtype: the moments are initialised fp32 and the gradients
        and params widened to fp32 before the update, so the state's dtypes never change
        (optax alone keeps moments in the params' dtype and lets ``m`` turn fp32 on the first
        fp32 gradient: a scan carry that changes type)."""
        inner = optax.chain(
            optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps, mu_dtype=MOMENT_DTYPE),
            optax.add_decayed_weights(self.weight_decay),
        )

        def init(params: PyTree) -> optax.OptState:
            return inner.init(widen(params))  # zeros: only the shapes are read

        def update(
            updates: PyTree, state: optax.OptState, params: PyTree | None = None
        ) -> tuple[PyTree, optax.OptState]:
            return inner.update(widen(updates), state, widen(params))

        return optax.GradientTransformation(init, update)

    def lr_at(self, step: Array | int) -> Array:
        """The learning rate of training step ``step``."""
        return warmup_constant_lr(self.lr, self.num_warmup, step)


class UpdateStats(NamedTuple):
    """Per-update diagnostics (fp32 scalars)."""

    grad_norm: Array  # ||g||_2 before clipping (nan/inf when non-finite)
    applied: Array  # 1.0 when the update was applied
    skipped: Array  # 1.0 when it was skipped because the loss or gradient was not finite


def clip_by_global_norm(grads: PyTree, max_norm: float | None) -> tuple[PyTree, Array]:
    """torch ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``; returns
    ``(clipped, norm)`` (norm before clipping)."""
    norm = optax.tree.norm(grads).astype(jnp.float32)
    if max_norm is None:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


def guarded_update(
    cfg: AdamWConfig,
    params: PyTree,
    opt_state: optax.OptState,
    grads: PyTree,
    loss: Array,
    lr: Array,
    enabled: Array | bool = True,
) -> tuple[PyTree, optax.OptState, UpdateStats]:
    """One clipped AdamW step that is skipped (state unchanged) when not finite.

    ``ok = isfinite(loss) & isfinite(||g||) & enabled``; if ``ok`` the new params are
    ``p - lr * direction(clip(g))`` (computed in fp32, cast back to each param's dtype), else
    ``params`` / ``opt_state`` are returned as they were.
    """
    clipped, norm = clip_by_global_norm(grads, cfg.grad_clip)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    ok = finite & jnp.asarray(enabled, bool)
    direction, new_opt = cfg.tx().update(clipped, opt_state, params)
    new_params = jax.tree.map(lambda p, d: (widen(p) - lr * d).astype(p.dtype), params, direction)

    def select(new: PyTree, old: PyTree) -> PyTree:
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    stats = UpdateStats(
        grad_norm=norm.astype(jnp.float32),
        applied=ok.astype(jnp.float32),
        skipped=(~finite & jnp.asarray(enabled, bool)).astype(jnp.float32),
    )
    return select(new_params, params), select(new_opt, opt_state), stats


def opt_state_shardings(
    cfg: AdamWConfig, param_shapes: PyTree, param_shardings: PyTree, replicated: Any
) -> PyTree:
    """Shardings of ``cfg.tx().init(params)``: moment leaves like their parameter, the rest
    (step counts) ``replicated``."""
    state_shapes = jax.eval_shape(cfg.tx().init, param_shapes)
    return optax.tree_utils.tree_map_params(
        cfg.tx(),
        lambda _leaf, sharding: sharding,
        state_shapes,
        param_shardings,
        transform_non_params=lambda _leaf: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


# --------------------------------------------------------------------------- batching helpers
def strided_split(x: Array, *sizes: int) -> Array:
    """Split the leading axis ``N`` into interleaved chunks ``[*sizes, N / prod(sizes), ...]``.

    With ``sizes = (a, b)``, element ``[k, j]`` holds the samples ``i`` with ``i % a == k`` and
    ``(i // a) % b == j``. The chunk of index ``k`` does not depend on ``b`` (so mini-batches do
    not depend on the micro-batch size), and the innermost axis keeps a contiguous block layout
    of ``N`` (so a batch sharded on ``N`` stays sharded after the split).
    """
    lead = x.shape[0] // int(np.prod(sizes))
    y = x.reshape((lead, *reversed(sizes), *x.shape[1:]))
    k = len(sizes)
    return jnp.moveaxis(y, tuple(range(k + 1)), tuple(reversed(range(k + 1))))


def strided_merge(y: Array) -> Array:
    """Inverse of ``strided_split(x, a)``: ``[a, N / a, ...] -> [N, ...]``."""
    return jnp.swapaxes(y, 0, 1).reshape((-1, *y.shape[2:]))


def cond_or_zeros(pred: Array, fn: Callable[..., Any], *operands: Any) -> Any:
    """``fn(*operands)`` if ``pred``, else zeros of its output's shapes and dtypes
    (``lax.cond``: the skipped branch does no work)."""
    zeros = lambda *ops: jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *ops)
    )
    return jax.lax.cond(pred, fn, zeros, *operands)


def accumulate_gradients(
    objective: Callable[[PyTree, PyTree, Array], tuple[Array, PyTree]],
    params: PyTree,
    micro_batches: PyTree,
    count: Array,
    active: Array | None = None,
) -> tuple[PyTree, Array, PyTree]:
    """Exact gradient accumulation over the leading (micro-batch) axis of ``micro_batches``.

    ``objective(params, micro, count)`` must return ``(sum_over_micro / count, aux)`` where
    ``count`` is the *global* denominator of the whole mini-batch (e.g. its number of loss
    tokens). Then ``sum_j grad objective_j = grad (sum_j total_j / count)``: the gradient of the
    full mini-batch mean, whatever the micro-batch size. Returns ``(grads (fp32), loss, aux)``
    with ``loss`` and every ``aux`` leaf summed over micro-batches.

    ``active`` (``[n_micro]`` bool): micro-batches where it is False are not computed
    (``lax.cond``) and leave the sums as they are; exact when their objective, gradient and aux
    are zero, as for a micro-batch without loss tokens (padding rows, the empty rows of a
    packed batch).
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    out_shape = jax.eval_shape(grad_fn, params, first, count)

    def add(carry: tuple[PyTree, Array, PyTree], micro: PyTree) -> tuple[PyTree, Array, PyTree]:
        g_acc, l_acc, a_acc = carry
        (loss, aux), grads = grad_fn(params, micro, count)
        g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
        return g_acc, l_acc + loss, jax.tree.map(jnp.add, a_acc, aux)

    def body(carry: tuple[PyTree, Array, PyTree], xs: tuple[PyTree, Array]) -> tuple[Any, None]:
        micro, on = xs  # a skipped micro-batch leaves the sums as they are (no zeros added)
        return jax.lax.cond(on, add, lambda c, _: c, carry, micro), None

    (loss0, aux0), _ = out_shape
    init = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        jnp.zeros(loss0.shape, jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0),
    )
    if active is None:
        active = jnp.ones(jax.tree.leaves(micro_batches)[0].shape[0], bool)
    (grads, loss, aux), _ = jax.lax.scan(body, init, (micro_batches, active))
    return grads, loss, aux


def minibatch_update(
    opt: AdamWConfig,
    objective: Callable[[PyTree, PyTree, Array], tuple[Array, PyTree]],
    params: PyTree,
    opt_state: optax.OptState,
    micro_batches: PyTree,
    mask: Array,
    lr: Array,
    agg_mode: str,
) -> tuple[PyTree, optax.OptState, PyTree, UpdateStats]:
    """One guarded optimiser step on a mini-batch laid out ``[n_micro, m, ...]``.

    ``count = aggregate(., mask, agg_mode).count`` over the whole mini-batch (tokens for
    "token-mean", non-empty rows for the seq modes) is the global denominator handed to
    ``objective`` (see :func:`accumulate_gradients`); a mini-batch with ``count == 0`` (all
    padding) is a no-op. Micro-batches without a token under ``mask`` are skipped (exact: the
    objective masks every term with it). Returns ``(params, opt_state, aux, stats)``.
    """
    flat = mask.reshape(-1, mask.shape[-1]).astype(jnp.float32)
    count = aggregate(jnp.zeros_like(flat), flat, agg_mode).count
    active = jnp.any(mask.reshape(mask.shape[0], -1) != 0, axis=1)
    grads, loss, aux = accumulate_gradients(objective, params, micro_batches, count, active)
    params, opt_state, stats = guarded_update(opt, params, opt_state, grads, loss, lr, count > 0)
    return params, opt_state, aux, stats


# --------------------------------------------------------------------------- learner data types
@struct.dataclass
class TrainState:
    """Everything the learner updates. ``critic``/``critic_opt`` are None for GRPO, ``ref`` is None
    unless ``kl_coef > 0``. ``step``: training steps taken (int32); ``rng``: raw uint32[2] key."""

    policy: PyTree
    critic: PyTree | None
    policy_opt: optax.OptState
    critic_opt: optax.OptState | None
    ref: PyTree | None
    step: Array
    rng: Array


@struct.dataclass
class OldOutputs:
    """Token-aligned ``[N, T]`` outputs of :meth:`Learner.compute_old` (0 off their masks)."""

    logprobs: Array
    values: Array | None
    ref_logprobs: Array | None


@struct.dataclass
class LearnerBatch:
    """The ``[N, T]`` inputs of the train step (``returns``/``old_values``/``value_mask`` only for
    PPO, ``ref_logprobs`` only for a KL loss)."""

    tokens: Array
    token_mask: Array
    loss_mask: Array
    old_logprobs: Array
    advantages: Array
    returns: Array | None = None
    old_values: Array | None = None
    value_mask: Array | None = None
    ref_logprobs: Array | None = None


# --------------------------------------------------------------------------- learner config
TOKEN_LEVEL_ESTIMATORS: tuple[str, ...] = ("gae",)  # need a critic; the others are outcome-level


class LearnerConfigError(ValueError):
    """An invalid :class:`LearnerConfig`; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Learner hyper-parameters (defaults: RLVER's PPO run, spec section 4.1). Hashable/static.

    ``mini_batch_size``: samples per optimiser step (verl counts prompts, times ``n`` for GRPO);
    ``micro_batch_size``: samples per gradient-accumulation chunk; ``forward_micro_batch_size``
    (default ``micro_batch_size``): samples per chunk of :meth:`Learner.compute_old`.
    ``critic_mask``: "policy" regresses the critic on policy tokens only; "response" on every token
    from the first policy token on (verl's non-think behaviour, user tokens included).
    ``kl_as_reward``: subtract ``kl_coef * kl`` from token rewards (PPO) instead of adding
    ``kl_coef * kl`` to the actor loss. ``seq_buckets``: allowed padded lengths ``T``.
    ``pack_sequences``: pack each mini-batch's samples several to a row and skip the empty
    micro-batches (:mod:`rlver_jax.rl.packing`; RLVER's verl runs use dynamic batch size to the
    same end); it saves compute in whole micro-batches, so pair it with a ``micro_batch_size``
    below ``mini_batch_size``. It needs ``loss_agg="token-mean"``. ``share_prefixes`` (with
    ``pack_sequences``): the samples of a group in one mini-batch hold their common prompt once
    per packed row (:mod:`rlver_jax.rl.packing`), so the forward and backward compute it once
    instead of once per sample; the update is the same. It pays where whole prompts repeat
    (single-turn GRPO groups); on RLVER's per-turn rows it only lengthens them (README).
    """

    algorithm: Literal["ppo", "grpo"] = "ppo"  # ppo: a critic and GAE; grpo: group baselines
    advantage_estimator: str | None = None  # default: "gae" (ppo) / "grpo" (grpo)
    policy_loss: str | None = None  # default: the algorithm's name
    gamma: float = 1.0  # GAE's discount
    lam: float = 1.0  # GAE's lambda
    whiten_advantages: bool = True  # PPO: normalise advantages over the loss mask
    clip_low: float = 0.2  # PPO clip: the ratio is kept >= 1 - clip_low
    clip_high: float = 0.2  # PPO clip: the ratio is kept <= 1 + clip_high
    clip_ratio_c: float | None = None  # dual clip for negative advantages, c > 1 (None: off)
    value_clip: float | None = 0.5  # clip new values to old +- value_clip (None: off)
    entropy_coef: float = 0.001  # weight of the entropy bonus in the actor loss
    kl_coef: float = 0.0  # weight of the KL to the reference policy (0: no reference model)
    kl_kind: str = "k1"  # KL estimator: k1, k2 or k3 (also kl, mse, low_var_kl)
    kl_as_reward: bool = False
    loss_agg: str = "token-mean"  # token-mean, seq-mean-token-mean or seq-mean-token-sum
    critic_mask: Literal["policy", "response"] = "policy"
    temperature: float = 1.0  # logprobs are computed at this temperature (the rollout's)
    actor_lr: float = 1e-6  # the policy's learning rate (AdamW)
    critic_lr: float = 5e-6  # the critic's learning rate (AdamW)
    actor_warmup_ratio: float = 0.02  # linear LR warm-up over this share of total_steps
    critic_warmup_ratio: float = 0.05  # the critic's warm-up share of total_steps
    total_steps: int = 1000  # the LR schedule's horizon (trainer.steps is where a run stops)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (b1, b2)
    adam_eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float | None = 1.0  # clip gradients to this global norm (None: no clip)
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batch_size: int = 32
    micro_batch_size: int = 32
    forward_micro_batch_size: int | None = None
    grpo_eps: float = 1e-6  # GRPO: added to a group's reward std before dividing
    seq_buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    pack_sequences: bool = False
    share_prefixes: bool = False

    def __post_init__(self) -> None:
        if self.advantage_estimator is None:
            est = "gae" if self.algorithm == "ppo" else "grpo"
            object.__setattr__(self, "advantage_estimator", est)
        if self.policy_loss is None:
            object.__setattr__(self, "policy_loss", self.algorithm)
        pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
        unit = lambda v: 0.0 <= v <= 1.0
        opt_pos = lambda v: v is None or v > 0
        adv, algo, mini = self.advantage_estimator, self.algorithm, self.mini_batch_size
        micro, fwd, c = self.micro_batch_size, self.forward_micro_batch_size, self.clip_ratio_c
        in01, pos, nonneg = "must lie in [0, 1]", "must be > 0", "must be >= 0"
        divides = f"must be a positive integer dividing mini_batch_size={mini}"
        rules: list[tuple[str, Callable[[], bool], str]] = [
            ("algorithm", lambda: algo in ("ppo", "grpo"), "must be 'ppo' or 'grpo'"),
            (
                "advantage_estimator",
                lambda: adv in list_advantages(),
                f"not in {list_advantages()}",
            ),
            (
                "policy_loss",
                lambda: self.policy_loss in list_policy_losses(),
                "unknown policy loss",
            ),
            (
                "advantage_estimator",
                lambda: (adv in TOKEN_LEVEL_ESTIMATORS) == (algo == "ppo"),
                "'ppo' needs 'gae' (a critic), 'grpo' an outcome-level estimator",
            ),
            ("gamma", lambda: unit(self.gamma), in01),
            ("lam", lambda: unit(self.lam), in01),
            ("actor_warmup_ratio", lambda: unit(self.actor_warmup_ratio), in01),
            ("critic_warmup_ratio", lambda: unit(self.critic_warmup_ratio), in01),
            ("clip_low", lambda: 0.0 <= self.clip_low < 1.0, "must lie in [0, 1)"),
            ("clip_high", lambda: self.clip_high >= 0, nonneg),
            ("clip_ratio_c", lambda: c is None or c > 1, "must be > 1 or None"),
            ("value_clip", lambda: opt_pos(self.value_clip), "must be > 0 or None"),
            ("grad_clip", lambda: opt_pos(self.grad_clip), "must be > 0 or None"),
            ("entropy_coef", lambda: self.entropy_coef >= 0, nonneg),
            ("kl_coef", lambda: self.kl_coef >= 0, nonneg),
            ("kl_kind", lambda: self.kl_kind in KL_KINDS, f"must be one of {sorted(KL_KINDS)}"),
            ("kl_as_reward", lambda: not self.kl_as_reward or algo == "ppo", "needs ppo (GAE)"),
            ("loss_agg", lambda: self.loss_agg in AGG_MODES, f"must be one of {AGG_MODES}"),
            (
                "pack_sequences",
                lambda: not self.pack_sequences or self.loss_agg == "token-mean",
                "needs loss_agg='token-mean' (a packed row holds several sequences)",
            ),
            (
                "share_prefixes",
                lambda: not self.share_prefixes or self.pack_sequences,
                "needs pack_sequences: true (shared prefixes live in packed rows)",
            ),
            ("critic_mask", lambda: self.critic_mask in ("policy", "response"), "policy|response"),
            ("temperature", lambda: self.temperature > 0, pos),
            ("actor_lr", lambda: self.actor_lr >= 0, nonneg),
            ("critic_lr", lambda: self.critic_lr >= 0, nonneg),
            ("total_steps", lambda: pos_int(self.total_steps), "must be a positive integer"),
            ("weight_decay", lambda: self.weight_decay >= 0, nonneg),
            ("betas", lambda: len(self.betas) == 2 and all(map(unit, self.betas)), in01),
            ("adam_eps", lambda: self.adam_eps > 0, pos),
            ("ppo_epochs", lambda: pos_int(self.ppo_epochs), "must be a positive integer"),
            ("mini_batch_size", lambda: pos_int(mini), "must be a positive integer"),
            ("micro_batch_size", lambda: pos_int(micro) and mini % micro == 0, divides),
            (
                "forward_micro_batch_size",
                lambda: fwd is None or (pos_int(fwd) and mini % fwd == 0),
                divides,
            ),
            ("grpo_eps", lambda: self.grpo_eps > 0, pos),
            (
                "seq_buckets",
                lambda: (
                    bool(self.seq_buckets)
                    and list(self.seq_buckets) == sorted(set(self.seq_buckets))
                ),
                "must be a non-empty, strictly increasing tuple",
            ),
        ]
        for name, ok, why in rules:
            if not ok():
                raise LearnerConfigError(
                    f"LearnerConfig.{name}: {why} (got {getattr(self, name)!r})"
                )

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def fwd_micro(self) -> int:
        return self.forward_micro_batch_size or self.micro_batch_size

    def optimizers(self) -> tuple[AdamWConfig, AdamWConfig]:
        """(actor, critic) optimisers with their own LR and warm-up."""
        b1, b2 = self.betas
        make = lambda lr, ratio: AdamWConfig(
            lr, warmup_steps(ratio, self.total_steps), b1, b2, self.adam_eps, self.weight_decay,
            self.grad_clip,
        )  # fmt: skip
        return make(self.actor_lr, self.actor_warmup_ratio), make(
            self.critic_lr, self.critic_warmup_ratio
        )
