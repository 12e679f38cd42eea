"""PPO / GRPO learner: one jitted, donated, sharded train step with exact gradient accumulation.

Pipeline of one training step (:meth:`Learner.update`)::

    traj         = learner.pad(traj)                      # fixed N, bucketed T: no recompiles
    old, m_old   = learner.compute_old(state, traj)       # old logprobs, values, ref logprobs
    batch, m_adv = learner.compute_advantages(traj, old)  # GAE (PPO) / group-normalised (GRPO)
    state, m     = learner.train_step(state, batch)       # epochs x mini-batches x micro-batches

With ``pack_sequences`` the forward passes run on packed rows (several samples per row, see
:mod:`rlver_jax.rl.packing`): ``compute_old`` on ``pack(traj)``, its outputs unpacked for the
advantages, the batch packed again for ``train_step``. Micro-batches (and forward chunks)
without tokens are skipped, so the compute follows the real tokens.

On-policy steps (:meth:`Learner.on_policy`: one epoch, one mini-batch, no critic, no reference:
GRPO's usual setting) skip ``compute_old``: the only optimiser step runs at the params that
would have produced the old logprobs, so the train step uses ``stop_gradient(logp)`` of its own
forward as the old logprobs (ratio exactly 1, the same gradient) and reports the sampler gap
from that forward. That saves one forward pass over the batch (a quarter of the update).

Alignment (token-aligned everywhere): ``loss_mask[t] = 1`` means token ``t`` was generated; its
logprob comes from the logits at position ``t - 1`` and its value is the critic's output at
position ``t - 1`` (the state before token ``t``; verl's ``values[:, -L-1:-1]``). So
``logprobs[t]``, ``values[t]``, ``advantages[t]`` and ``returns[t]`` all refer to the action that
produced token ``t``; column 0 is always 0.

Mini-batches are interleaved (mini-batch ``k`` = samples ``i % n_mini == k``, see
:func:`rlver_jax.rl.optim.strided_split`). Each optimiser step uses the exact mini-batch mean
gradient: micro-batch gradients of the *unnormalised* loss sums, divided by the mini-batch's
global count (tokens or sequences).

Skip semantics: a mini-batch update whose loss or gradient norm is not finite leaves that model's
params and optimiser state bit-identical and adds 1 to ``actor/skipped`` / ``critic/skipped``;
``skipped`` counts mini-batch updates where either model skipped. ``state.step`` counts *training
steps* and always advances (verl steps its LR scheduler even when the optimiser skipped), so the
LR schedule stays aligned with the data; ``state.rng`` is left untouched by the train step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlver_jax.buckets import round_up, smallest_bucket
from rlver_jax.kernels.select import resolve_attention
from rlver_jax.metrics import PhaseTimer
from rlver_jax.models import value_head
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import param_logical_axes, param_shapes
from rlver_jax.parallel.rules import (
    DEFAULT_RULES,
    Rules,
    axis_rules,
    named_sharding,
    tree_shardings,
)
from rlver_jax.rl import advantages as adv_lib
from rlver_jax.rl import packing as packing_lib
from rlver_jax.rl.losses import LossTerm
from rlver_jax.rl.model_outputs import critic_values, policy_outputs
from rlver_jax.rl.objectives import actor_objective, advantage_batch, critic_objective
from rlver_jax.rl.optim import (
    LearnerBatch,
    LearnerConfig,
    LearnerConfigError,
    OldOutputs,
    TrainState,
    cond_or_zeros,
    minibatch_update,
    opt_state_shardings,
    strided_merge,
    strided_split,
)
from rlver_jax.trajectories import Trajectories

Array = jax.Array
Params = Any
Metrics = dict[str, Array]
_BT = ("batch", "seq")
__all__ = ["Learner", "LearnerBatch", "LearnerConfig", "LearnerConfigError", "OldOutputs"]
__all__ += ["TrainState"]


class Learner:
    """The static configs, the mesh and the jitted functions of one learner (see module docs)."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: LearnerConfig,
        mesh: Mesh | None = None,
        compiler_options: dict[str, Any] | None = None,
        rules: Rules = DEFAULT_RULES,
    ) -> None:
        """``compiler_options``: XLA options for every jit (e.g. tests pass
        ``{"xla_backend_optimization_level": 0}`` for fast CPU compiles); ``rules``: the
        logical axis rules of the state and batches (`mesh.rules`)."""
        # the attention of every training program, resolved once (kernels.select)
        self.mcfg = resolve_attention(model_config, "train", mesh)
        self.cfg, self.mesh, self.rules = config, mesh, tuple(rules)
        self.actor_opt, self.critic_opt = config.optimizers()
        self._fns: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._copts = compiler_options

    # ------------------------------------------------------------------ jit / sharding helpers
    def _call(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        sh: Any,
        donate: bool = False,
        shape: tuple[int, ...] | None = None,
        trace: bool = False,
    ) -> Any:
        """Run ``fn(*args)`` jitted once per (name, N, T), traced under the mesh's axis rules,
        with explicit shardings ``sh = (in_shardings, out_shardings)`` (inputs are
        ``device_put`` onto theirs first). ``shape``: ``(N, T)`` when no argument has tokens.
        ``trace``: return the program traced for ``args`` (`jax.stages.Traced`; abstract ones
        for the dry run of `rlver_jax.step_programs`) instead of running it."""
        in_sh, out_sh = sh
        shape = shape or next(a for a in args if hasattr(a, "tokens")).tokens.shape
        key = (name, *shape)
        if key not in self._fns:
            mesh = self.mesh

            def traced(*a: Any) -> Any:
                if mesh is None:
                    return fn(*a)
                with axis_rules(mesh, self.rules):
                    return fn(*a)

            kw: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
            if mesh is not None:
                kw |= {"in_shardings": in_sh, "out_shardings": out_sh}
            self._fns[key] = jax.jit(traced, compiler_options=self._copts, **kw)
        if trace:
            return self._fns[key].trace(*args)
        if self.mesh is not None:
            args = tuple(jax.device_put(a, sh) for a, sh in zip(args, in_sh, strict=True))
        return self._fns[key](*args)

    def _tok(self, n: int, t: int) -> NamedSharding | None:
        """``[N, T]`` arrays: batch-sharded rows (a prefix for OldOutputs / LearnerBatch)."""
        return None if self.mesh is None else named_sharding(_BT, (n, t), self.mesh, self.rules)

    def _replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def state_shardings(self) -> TrainState | None:
        """The planned ``NamedSharding`` of every state leaf (None without a mesh); optimiser
        moments are sharded like their parameters."""
        if self.mesh is None:
            return None
        mesh, cfg, rep = self.mesh, self.cfg, self._replicated()
        p_shapes = param_shapes(self.mcfg)
        p_sh = tree_shardings(param_logical_axes(self.mcfg), p_shapes, mesh, self.rules)
        critic_sh = copt_sh = None
        if cfg.uses_critic:
            c_shapes = value_head.value_param_shapes(self.mcfg)
            critic_sh = tree_shardings(
                value_head.value_logical_axes(self.mcfg), c_shapes, mesh, self.rules
            )
            copt_sh = opt_state_shardings(self.critic_opt, c_shapes, critic_sh, rep)
        popt_sh = opt_state_shardings(self.actor_opt, p_shapes, p_sh, rep)
        ref_sh = p_sh if cfg.uses_reference else None
        return TrainState(p_sh, critic_sh, popt_sh, copt_sh, ref_sh, step=rep, rng=rep)

    def batch_shardings(self, tree: Any) -> Any:
        """A ``batch``-sharded leading axis for every leaf of a batch pytree (None: no mesh)."""
        if self.mesh is None:
            return None
        mesh = self.mesh
        return jax.tree.map(
            lambda x: named_sharding(
                ("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, self.rules
            ),
            tree,
        )

    # ------------------------------------------------------------------ state
    def init_state(self, policy_params: Params, key: Array) -> TrainState:
        """Build the whole state in one jit with ``out_shardings`` (params, optimiser state and
        reference copy placed before the first train step, so it compiles once). The policy (and
        reference) are fresh copies: the caller's ``policy_params`` are not donated later."""
        if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        sh, key = self.state_shardings(), jnp.asarray(key, jnp.uint32)
        if sh is not None:  # place (shard) the incoming params first: no unsharded device copy
            policy_params, key = jax.device_put((policy_params, key), (sh.policy, sh.rng))
        return self._init_jit()(policy_params, key)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves; nothing
        is materialised): the inputs of a lowered program at its real size."""
        dtype = jnp.dtype(self.mcfg.param_dtype)
        params = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_shapes(self.mcfg)
        )
        return jax.eval_shape(self._init_jit(), params, jax.ShapeDtypeStruct((2,), jnp.uint32))

    def _init_jit(self) -> Callable[[Params, Array], TrainState]:
        cfg, mcfg = self.cfg, self.mcfg

        def init(policy: Params, key: Array) -> TrainState:
            k_critic, k_state = jax.random.split(jax.random.wrap_key_data(key))
            copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
            policy = copy(policy)
            critic = (
                value_head.init_value_params(policy, mcfg, k_critic) if cfg.uses_critic else None
            )
            return TrainState(
                policy=policy,
                critic=critic,
                policy_opt=self.actor_opt.tx().init(policy),
                critic_opt=self.critic_opt.tx().init(critic) if cfg.uses_critic else None,
                ref=copy(policy) if cfg.uses_reference else None,
                step=jnp.zeros((), jnp.int32),
                rng=jax.random.key_data(k_state),
            )

        if ("init",) not in self._fns:
            sh = self.state_shardings()
            self._fns[("init",)] = jax.jit(init, out_shardings=sh, compiler_options=self._copts)
        return self._fns[("init",)]

    # ------------------------------------------------------------------ padding
    def pad(self, traj: Trajectories, num_samples: int | None = None) -> Trajectories:
        """Pad to ``num_samples`` rows (default: the next multiple of ``mini_batch_size``) and to
        a ``seq_buckets`` length, so repeated steps reuse one compiled program: the smallest
        bucket that holds the rows, or with ``pack_sequences`` the bucket (holding the longest
        sample) whose packed layout computes the fewest ``filled rows x T`` tokens."""
        n, t = traj.tokens.shape
        m = self.cfg.mini_batch_size
        n_pad = num_samples if num_samples is not None else round_up(n, m)
        if n_pad % m:
            raise ValueError(f"num_samples={n_pad} must be a multiple of mini_batch_size={m}")
        if not self.cfg.pack_sequences:
            return traj.pad_to(n_pad, smallest_bucket(t, self.cfg.seq_buckets, "sequence length"))
        lengths = np.asarray(traj.token_mask).sum(axis=1)
        longest = max(int(lengths.max()), 1)  # the columns past it are padding in every row
        trimmed = jax.tree.map(lambda x: np.asarray(x)[:, :longest] if np.ndim(x) == 2 else x, traj)
        share = self._share(trimmed)  # indexed by the real rows only
        seq_len = packing_lib.best_row_length(
            np.pad(lengths, (0, n_pad - n)), *self._split_sizes(n_pad), self.cfg.seq_buckets, share
        )
        return trimmed.pad_to(n_pad, seq_len)

    # ------------------------------------------------------------------ packing
    def _split_sizes(self, num_samples: int) -> tuple[int, int]:
        """``(n_mini, n_micro)``: mini-batches per epoch and micro-batches per mini-batch."""
        cfg = self.cfg
        return num_samples // cfg.mini_batch_size, cfg.mini_batch_size // cfg.micro_batch_size

    def _share(self, traj: Trajectories) -> packing_lib.Share | None:
        """What prefix sharing reads of a padded batch (None unless ``share_prefixes``)."""
        if not self.cfg.share_prefixes:
            return None
        tokens, loss_mask, groups = jax.device_get((traj.tokens, traj.loss_mask, traj.group_ids))
        return packing_lib.Share(np.asarray(tokens), np.asarray(loss_mask), np.asarray(groups))

    def plan_packing(self, traj: Trajectories) -> packing_lib.Packing:
        """The packed layout of a padded batch (:mod:`rlver_jax.rl.packing`), mini-batch by
        mini-batch as the train step splits it (groups behind shared prefixes with
        ``share_prefixes``)."""
        split = self._split_sizes(traj.num_samples)
        return packing_lib.plan_packing(traj.token_mask, *split, self._share(traj))

    def filled_rows(self, traj: Trajectories) -> int:
        """Rows of a padded batch the train step computes on (in the packed layout when
        ``pack_sequences``): the rows of every micro-batch holding a real token."""
        split = self._split_sizes(traj.num_samples)
        if self.cfg.pack_sequences:
            lengths = np.asarray(traj.token_mask).sum(axis=1)
            return packing_lib.packed_rows(lengths, *split, traj.seq_len, self._share(traj))
        return packing_lib.filled_rows(traj.token_mask, *split)

    def laid_out_tokens(self, traj: Trajectories) -> int:
        """Token slots of a padded batch that the train step fills: its real tokens, less the
        prompt copies that ``share_prefixes`` holds once (the packed layout's tokens)."""
        if self.cfg.share_prefixes:
            return int(np.count_nonzero(self.plan_packing(traj).segment_ids))
        return int(np.count_nonzero(np.asarray(traj.token_mask)))

    def _relayout(self, name: str, tree: Any, index: Any, segment_ids: Any = None) -> Any:
        """Every ``[N, T]`` leaf of ``tree`` gathered through ``index`` (``Packing.gather`` packs,
        ``Packing.scatter`` unpacks); ``segment_ids`` replace ``token_mask`` when packing."""
        n, t = index.shape

        def relayout(tree: Any, index: Array, segment_ids: Any) -> Any:
            is_tok = lambda x: x.ndim >= 2 and x.shape[:2] == (n, t)
            out = jax.tree.map(lambda x: packing_lib.pack(x, index) if is_tok(x) else x, tree)
            return out if segment_ids is None else out.replace(token_mask=segment_ids)

        tok, tree_sh = self._tok(n, t), self.batch_shardings(tree)
        seg_sh = None if segment_ids is None else tok
        sh = ((tree_sh, tok, seg_sh), tree_sh)
        return self._call(name, relayout, (tree, index, segment_ids), sh, shape=(n, t))

    def pack(self, tree: Any, packing: packing_lib.Packing) -> Any:
        """A padded Trajectories / LearnerBatch in the packed layout (segment ids as mask)."""
        name = f"pack_{type(tree).__name__}"
        return self._relayout(name, tree, packing.gather, packing.segment_ids)

    def unpack(self, old: OldOutputs, packing: packing_lib.Packing) -> OldOutputs:
        """Packed :class:`OldOutputs` back in the padded layout."""
        return self._relayout("unpack_old", old, packing.scatter)

    # ------------------------------------------------------------------ old logprobs / values
    def _compute_old(self, state: TrainState, traj: Trajectories) -> tuple[OldOutputs, Metrics]:
        cfg, mcfg = self.cfg, self.mcfg
        n_chunks = traj.tokens.shape[0] // cfg.fwd_micro

        def chunk(xs: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            tokens, tmask, lmask = xs
            logprobs = lambda p: policy_outputs(
                p, tokens, tmask, mcfg, cfg.temperature, needed=lmask
            )[0]  # used under the loss mask only

            def run() -> tuple[Array, Array, Array]:
                logp = logprobs(state.policy)
                values = ref = jnp.zeros_like(logp)
                if cfg.uses_critic:
                    values = critic_values(state.critic, tokens, tmask, mcfg)
                if cfg.uses_reference:
                    ref = logprobs(state.ref)
                return logp, values, ref

            return cond_or_zeros(jnp.any(tmask != 0), run)  # empty chunks: no compute

        xs = tuple(
            strided_split(x, n_chunks) for x in (traj.tokens, traj.token_mask, traj.loss_mask)
        )
        logp, values, ref = (strided_merge(o) for o in jax.lax.map(chunk, xs))
        lmask = traj.loss_mask.astype(jnp.float32)
        old = OldOutputs(
            logprobs=logp * lmask,
            values=jnp.where(traj.token_mask != 0, values, 0.0) if cfg.uses_critic else None,
            ref_logprobs=ref * lmask if cfg.uses_reference else None,
        )
        gap = jnp.abs(old.logprobs - traj.sampler_logprobs.astype(jnp.float32)) * lmask
        return old, {
            "rollout/logprob_gap_mean": adv_lib.masked_mean(gap, lmask),
            "rollout/logprob_gap_max": jnp.max(gap),
        }

    def compute_old(
        self, state: TrainState, traj: Trajectories, *, trace: bool = False
    ) -> tuple[OldOutputs, Metrics]:
        """Recompute old logprobs (policy), values (critic) and reference logprobs in chunks of
        ``forward_micro_batch_size``. Metrics over the loss mask ``m``:
        ``rollout/logprob_gap_mean = sum |logp - logp_sampler| m / sum m`` and
        ``rollout/logprob_gap_max = max |logp - logp_sampler| m``. ``trace``: see `_call`."""
        in_sh = (self.state_shardings(), self.batch_shardings(traj))
        out_sh = (self._tok(*traj.tokens.shape), self._replicated())
        sh = (in_sh, out_sh)
        return self._call("old", self._compute_old, (state, traj), sh, trace=trace)

    # ------------------------------------------------------------------ advantages
    def compute_advantages(
        self, traj: Trajectories, old: OldOutputs, *, trace: bool = False
    ) -> tuple[LearnerBatch, Metrics]:
        """Advantages (and PPO returns) packed into the train step's :class:`LearnerBatch`.

        PPO: ``A, R = GAE(r, V, m_v; gamma, lam)`` with ``r_t - kl_coef * kl_t`` if
        ``kl_as_reward``, ``R = A + V``, then ``A`` whitened over the loss mask. GRPO:
        ``A_i = (s_i - mu_g) / (std_g + eps)`` on ``scores`` (each dialogue counts once, see
        :func:`rlver_jax.rl.advantages.grpo_advantages`), broadcast to the loss-mask tokens.
        """
        tok = self._tok(*traj.tokens.shape)
        in_sh, out_sh = (self.batch_shardings(traj), tok), (tok, self._replicated())
        fn = functools.partial(advantage_batch, self.cfg)
        return self._call("adv", fn, (traj, old), (in_sh, out_sh), trace=trace)

    # ------------------------------------------------------------------ train step
    def _update(
        self, name: str, params: Params, opt_state: Any, mb: LearnerBatch, lr: Array,
        on_policy: bool = False,
    ) -> tuple[Params, Any, dict[str, LossTerm], dict[str, Array]]:  # fmt: skip
        """Guarded step of ``name`` ("actor" / "critic") on a mini-batch ``[n_micro, m, T]``."""
        actor = functools.partial(actor_objective, self.cfg, self.mcfg, on_policy=on_policy)
        critic = functools.partial(critic_objective, self.cfg, self.mcfg)
        opt, objective, mask = (
            (self.actor_opt, actor, mb.loss_mask)
            if name == "actor"
            else (self.critic_opt, critic, mb.value_mask)
        )
        params, opt_state, terms, st = minibatch_update(
            opt, objective, params, opt_state, mb, mask, lr, self.cfg.loss_agg
        )
        finite = jnp.isfinite(st.grad_norm)  # grad norm: mean over finite updates
        norm = jnp.where(finite, st.grad_norm, 0.0)
        terms[f"{name}/grad_norm"] = LossTerm(norm, finite.astype(jnp.float32))
        return params, opt_state, terms, {f"{name}/skipped": st.skipped}

    def _train_step(
        self, state: TrainState, batch: LearnerBatch, on_policy: bool = False
    ) -> tuple[TrainState, Metrics]:
        cfg = self.cfg
        n_mini, n_micro = self._split_sizes(batch.tokens.shape[0])
        split = jax.tree.map(lambda x: strided_split(x, n_mini, n_micro), batch)
        lr_actor, lr_critic = self.actor_opt.lr_at(state.step), self.critic_opt.lr_at(state.step)

        def minibatch(carry: tuple[Any, ...], mb: LearnerBatch) -> tuple[tuple[Any, ...], Any]:
            policy, popt, critic, copt = carry
            policy, popt, terms, sums = self._update("actor", policy, popt, mb, lr_actor, on_policy)
            sums["skipped"] = sums["actor/skipped"]
            if cfg.uses_critic:
                critic, copt, c_terms, c_sums = self._update("critic", critic, copt, mb, lr_critic)
                terms, sums = terms | c_terms, sums | c_sums
                sums["skipped"] = jnp.maximum(sums["skipped"], c_sums["critic/skipped"])
            return (policy, popt, critic, copt), (terms, sums)

        def epoch(carry: tuple[Any, ...], _: None) -> tuple[tuple[Any, ...], Any]:
            return jax.lax.scan(minibatch, carry, split, unroll=n_mini == 1)

        carry = (state.policy, state.policy_opt, state.critic, state.critic_opt)
        one = cfg.ppo_epochs == 1  # length-1 loops are unrolled (faster compiles)
        carry, (terms, sums) = jax.lax.scan(epoch, carry, None, cfg.ppo_epochs, unroll=one)
        metrics = {k: LossTerm(t.total.sum(), t.count.sum()).value() for k, t in terms.items()}
        metrics |= {k: jnp.sum(v) for k, v in sums.items()}
        metrics |= self._batch_metrics(batch) | {"actor/lr": lr_actor}
        if cfg.uses_critic:
            metrics["critic/lr"] = lr_critic
        policy, popt, critic, copt = carry
        new_state = state.replace(
            policy=policy, policy_opt=popt, critic=critic, critic_opt=copt, step=state.step + 1
        )
        return new_state, {k: v.astype(jnp.float32) for k, v in metrics.items()}

    def _batch_metrics(self, batch: LearnerBatch) -> Metrics:
        """Advantage / return / value statistics of the (pre-update) batch."""
        lmask = batch.loss_mask.astype(jnp.float32)
        out = {
            "adv/mean": adv_lib.masked_mean(batch.advantages, lmask),
            "adv/std": jnp.sqrt(adv_lib.masked_var(batch.advantages, lmask)),
        }
        if batch.returns is not None:
            vmask = batch.value_mask
            ret_var = adv_lib.masked_var(batch.returns, vmask)
            resid_var = adv_lib.masked_var(batch.returns - batch.old_values, vmask)
            out |= {
                "returns/mean": adv_lib.masked_mean(batch.returns, vmask),
                "values/mean": adv_lib.masked_mean(batch.old_values, vmask),
                "critic/explained_var": 1.0 - resid_var / (ret_var + 1e-8),
            }
        return out

    def on_policy(self, num_samples: int) -> bool:
        """Whether a padded batch of ``num_samples`` rows trains on-policy (module docs): one
        epoch of one mini-batch, and no critic or reference model needing ``compute_old``."""
        cfg = self.cfg
        single = cfg.ppo_epochs == 1 and num_samples == cfg.mini_batch_size
        return single and not cfg.uses_critic and not cfg.uses_reference

    def train_step(
        self, state: TrainState, batch: LearnerBatch, *, on_policy: bool = False,
        trace: bool = False,
    ) -> tuple[TrainState, Metrics]:  # fmt: skip
        """One training step (``ppo_epochs`` x mini-batches x micro-batches) as ONE jitted call
        with explicit shardings; ``state`` is DONATED (do not reuse it). Metrics are fp32
        scalars: LossTerm metrics are ``sum total / sum count`` over the whole step, grad norms
        the mean over finite updates, ``*/skipped`` counts of skipped updates.

        ``on_policy=True`` (only where :meth:`on_policy` holds): ``batch.old_logprobs`` are the
        sampler's and the step's own forward gives the old logprobs (module docs). ``trace``:
        see `_call`."""
        n, t = batch.tokens.shape
        if n % self.cfg.mini_batch_size:
            raise ValueError(f"{n} samples: not a multiple of mini_batch_size; use Learner.pad")
        if on_policy and not self.on_policy(n):
            raise ValueError(
                f"on_policy needs ppo_epochs=1, one mini-batch ({n} samples, mini_batch_size="
                f"{self.cfg.mini_batch_size}) and no critic or reference model"
            )
        state_sh, tok = self.state_shardings(), self._tok(n, t)
        in_sh, out_sh = (state_sh, tok), (state_sh, self._replicated())
        fn = functools.partial(self._train_step, on_policy=on_policy)
        name = "train_on_policy" if on_policy else "train"
        return self._call(name, fn, (state, batch), (in_sh, out_sh), True, trace=trace)

    def update(
        self, state: TrainState, traj: Trajectories, num_samples: int | None = None, *,
        timings: dict[str, float] | None = None,
    ) -> tuple[TrainState, dict[str, float]]:  # fmt: skip
        """pad -> compute_old (skipped on-policy) -> compute_advantages -> train_step; metrics
        as Python floats. ``timings``: if given, each phase is run to completion and its wall
        seconds are stored there (``pad_s``, ``old_s``, ``adv_s``, ``train_s``, ``fetch_s``)."""
        timer = PhaseTimer(block=timings is not None)
        with timer("pad_s"):
            traj = self.pad(traj, num_samples)
            packing = self.plan_packing(traj) if self.cfg.pack_sequences else None
        on_policy = self.on_policy(traj.tokens.shape[0])
        with timer("old_s"):
            if on_policy:
                lmask = traj.loss_mask.astype(jnp.float32)
                old = OldOutputs(traj.sampler_logprobs.astype(jnp.float32) * lmask, None, None)
                m_old: Metrics = {}
            elif packing is None:
                old, m_old = timer.ready(self.compute_old(state, traj))
            else:  # forward on packed rows; advantages (GAE runs along a row) on padded ones
                old, m_old = self.compute_old(state, self.pack(traj, packing))
                old = timer.ready(self.unpack(old, packing))
        with timer("adv_s"):
            batch, m_adv = self.compute_advantages(traj, old)
            if packing is not None:
                batch = self.pack(batch, packing)
            batch = timer.ready(batch)
        with timer("train_s"):
            state, m_step = timer.ready(self.train_step(state, batch, on_policy=on_policy))
        with timer("fetch_s"):
            metrics = {k: float(v) for k, v in jax.device_get(m_old | m_adv | m_step).items()}
        if timings is not None:
            timings.update(timer.totals)
        return state, metrics
