"""Batched autoregressive sampling: one jitted prefill, one jitted decode loop, bounded compiles.

    sampler = Sampler(config, mesh=mesh, pad_id=tok.pad_id, stop_token_ids=tok.stop_token_ids)
    out = sampler(params, prompts, max_new_tokens=256, temperature=1.0, top_p=0.9, seed=0)

Design (Tunix's sampler with Levanter's traced settings):

- Prompts are LEFT-padded to a prompt-length bucket (every row writes the KV cache at the same
  slot), the batch is padded with dummy rows to a batch bucket, the output width is a new-token
  bucket: a handful of compiled programs over a whole RL run.
- Temperature, top-p, top-k (per row), stop ids, max_new_tokens and the seed are TRACED
  arrays: changing them never recompiles. Temperature <= 0 is greedy for that row.
- Prefill (prompt + forced prefix in one forward) and decode are separate jits; the decode state
  (KV cache, outputs, settings) is donated, so XLA updates the cache in place.
- The decode step is what `sampler.decode` picks (`kernels.select`): on CPU
  `decode_step.decode_step`, layers unrolled over per-layer weights and cache buffers (XLA:CPU
  copies every weight slice a scanned matmul reads) with feature-major activations, so each
  projection streams its weight as the left operand; its per-layer weights
  (`decode_step.decode_weights`) are made once per params. The programs are in `loop.py`.
- Decode is ONE jitted `lax.while_loop` that exits on device when every row has stopped or the
  budget is spent. A host loop over a jitted step would pay a dispatch + host sync per token
  (more with a mesh) and a device->host read per step to stop early.
- Logprobs are log-softmax of the temperature-scaled logits over the FULL vocabulary (before
  top-k/top-p truncation: what a trainer recomputes at the rollout temperature); greedy rows
  report temperature-1 logprobs; forced-prefix tokens get logprobs the same way.
- Randomness: row r at output slot j uses `fold_in(fold_in(key(seed), j), r)`, so a row's
  sample does not depend on the batch bucket, the mesh, or the other rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlver_jax.buckets import round_up, smallest_bucket
from rlver_jax.kernels.gpu.decode import Blocks
from rlver_jax.kernels.select import DecodePlan, resolve_attention, resolve_decode
from rlver_jax.models import transformer as tfm
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import StepOps, decode_weight_logical_axes, decode_weights
from rlver_jax.models.kv_cache import as_bits, init_cache
from rlver_jax.models.sharding import cache_shardings, param_shardings
from rlver_jax.models.transformer import Params
from rlver_jax.parallel import mesh as mesh_lib
from rlver_jax.parallel.compiler_options import large_gemm_options, platform_of
from rlver_jax.parallel.rules import (
    ROLLOUT_RULES,
    MeshAxes,
    axis_rules,
    named_sharding,
    tree_shardings,
)
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.sampling.loop import DecodeState, decode, prefill
from rlver_jax.sampling.tokens import Settings

MAX_STOP_IDS = 16  # stop ids are a traced [16] array padded with -1: any set up to 16 ids


class StopReason(enum.IntEnum):
    """Why a row ended: it sampled a stop token, or it used all `max_new_tokens`."""

    STOP_TOKEN = 0
    MAX_TOKENS = 1


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Host-side results of one `Sampler` call (numpy; rows in prompt order).

    tokens:      [B, N] int32, generated ids (forced prefix first), `pad_id` after the end.
    logprobs:    [B, N] float32, log-softmax of the temperature-scaled full-vocabulary logits
                 at the sampled id (temperature 1 for greedy rows), 0 after the end.
    lengths:     [B] int32, generated tokens including the prefix and the stop token.
    stop_reason: [B] int8 `StopReason` values.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray

    def sequences(self) -> list[list[int]]:
        """Each row's tokens up to its length, as Python lists."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


@functools.lru_cache(maxsize=32)
def _decode_weights_jit(config: ModelConfig, mesh: Mesh | None, rules: Any, ops: StepOps) -> Any:
    """Jitted `decode_weights` without the embedding (placed like the decode jit expects its
    params): the caller adds the params' own embedding, which a jit output would copy."""

    def fn(params: Params) -> Params:
        weights = decode_weights(params, config, ops.pack)
        del weights["embed"]
        return weights

    if mesh is None:
        return jax.jit(fn)
    shardings = param_shardings(config, mesh, rules)
    out = dict(_decode_weight_shardings(config, mesh, rules, ops))
    del out["embed"]
    return jax.jit(fn, in_shardings=(shardings,), out_shardings=out)


def _decode_weight_shardings(config: ModelConfig, mesh: Mesh, rules: Any, ops: StepOps) -> Any:
    """Shardings of `decode_weights` from their logical axes (packed weights only exist on a
    one-device mesh: replicated)."""
    shapes = jax.eval_shape(
        functools.partial(decode_weights, config=config, pack=ops.pack), tfm.param_shapes(config)
    )
    if ops.pack is not None:
        return jax.tree.map(lambda _: mesh_lib.replicated(mesh), shapes)
    return tree_shardings(decode_weight_logical_axes(config), shapes, mesh, rules)


@functools.lru_cache(maxsize=256)
def _jitted(
    config: ModelConfig, prefill_config: ModelConfig, mesh: Mesh | None, rules: Any, pool: int,
    pad_id: int, unroll: bool, ops: StepOps, fused: Blocks | None, B: int, P: int,
    N: int,
) -> tuple[Any, Any, Any]:  # fmt: skip
    """(prefill jit, decode jit, prefill input shardings) for the bucket (B, P, N); the prefill
    runs `prefill_config` (its attention resolved for a prefill), the decode `config` with the
    unrolled step's `ops` or the fused kernels' blocks (`kernels.select.DecodePlan`).

    Cached per process, so samplers of the same model shape share compiled programs. The
    prefix length F only changes prefill's input shapes (jit retraces it; decode is shared).
    """
    pre = functools.partial(
        prefill, config=prefill_config, cache_len=P + N, out_len=N, pad_id=pad_id,
        per_layer=unroll,
    )  # fmt: skip
    dec = functools.partial(
        decode, config=config, pool=pool, pad_id=pad_id, unroll=unroll, ops=ops, fused=fused
    )
    pre_opts = large_gemm_options(platform_of(mesh))
    if mesh is None:
        return jax.jit(pre, compiler_options=pre_opts), jax.jit(dec, donate_argnums=(1,)), None
    rep, row = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh, (B,), rules)
    grid, out = (mesh_lib.batch_sharding(mesh, (B, n), rules) for n in (P, N))
    ins = (grid, grid, rep, row, Settings(row, row, row, rep, rep), rep)
    params = param_shardings(config, mesh, rules)
    dec_params = _decode_weight_shardings(config, mesh, rules, ops) if unroll else params
    state = DecodeState(
        cache=cache_shardings(
            jax.eval_shape(lambda: as_bits(init_cache(config, B, P + N, per_layer=unroll))),
            mesh,
            rules,
        ),
        logits=named_sharding(("batch", "act_vocab"), (B, config.vocab_size), mesh, rules),
        tokens=out, logprobs=out, positions=row, done=row, stopped=row, lengths=row,
        step=rep, key=rep, settings=ins[4],
    )  # fmt: skip
    return (
        jax.jit(pre, in_shardings=(params, *ins), out_shardings=state, compiler_options=pre_opts),
        jax.jit(
            dec,
            in_shardings=(dec_params, state),
            donate_argnums=(1,),
            out_shardings=state,
        ),
        ins,
    )


# --------------------------------------------------------------------------- host driver
class Sampler:
    """Bucketed, sharded sampler for one model shape; params are passed at every call.

    Params per call keep the weights out of the compiled programs (an RL trainer swaps them
    every step). With a `mesh`, give it params in its layout: `rollout_params` from the
    learner's, `shard_params` from the host. Its `rules` default to `ROLLOUT_RULES` (weights
    tensor-parallel, not FSDP-sharded, while decoding); the jits declare explicit in/out
    shardings from them, prompts are split over the batch axes and the programs are traced
    under `rules.axis_rules(mesh)`.
    """

    def __init__(
        self, config: ModelConfig, *, mesh: Mesh | None = None, pad_id: int = 0,
        stop_token_ids: Sequence[int] = (), sampler_config: SamplerConfig | None = None,
        rules: Sequence[tuple[str, MeshAxes]] = ROLLOUT_RULES, seed: int = 0,
        time_phases: bool = False,
    ) -> None:  # fmt: skip
        self.config = config
        self.mesh = mesh
        self.pad_id = int(pad_id)
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.sampler_config = sampler_config or SamplerConfig()
        self.rules = tuple(rules)
        self.seed = int(seed)
        self.time_phases = time_phases
        self.decode: DecodePlan = resolve_decode(
            self.sampler_config.decode, config, mesh, self.sampler_config.pallas_blocks
        )
        self.prefill_config = resolve_attention(config, "prefill", mesh)
        self.last_timings: dict[str, float] = {}
        self._calls = 0
        self._per_layer: tuple[list[Any], Params] | None = None  # (params' leaves, weights)
        self._reshard: Any = None  # the jitted `rollout_params` copy, made on first use

    @property
    def num_devices(self) -> int:
        """Devices the sampler runs on: its mesh's, or the one default device."""
        return 1 if self.mesh is None else self.mesh.devices.size

    def _decode_params(self, params: Params) -> Params:
        """`params` as the decode jit takes them. Unrolled: `decode_weights`, made once per
        params object (a rollout calls the sampler once per turn with the same weights) and
        held until other params arrive."""
        if not self.decode.unrolled:
            return params
        leaves = jax.tree.leaves(params)
        cached = self._per_layer
        if (
            cached is None
            or len(cached[0]) != len(leaves)
            or any(a is not b for a, b in zip(cached[0], leaves, strict=True))
        ):
            self._per_layer = None  # drop the old copy before making the new one
            make = _decode_weights_jit(self.config, self.mesh, self.rules, self.decode.ops)
            weights = make(params)
            cached = self._per_layer = (leaves, {**weights, "embed": params["embed"]})
        return cached[1]

    def rollout_params(self, params: Params) -> Params:
        """The sampling weights of (learner) `params`: in the compute dtype (`model.dtype`) and
        laid out by the sampler's rules (`mesh.rollout_rules`: tensor-parallel, not FSDP), by
        one jitted copy. `params` themselves where they already are both (one device, float32
        weights, a matching layout): no copy. Made once per rollout; the caller drops it when
        the rollout ends, so the learner's layout stays the only resident copy."""
        copy = self.reshard_program(params)
        return params if copy is None else copy(params)

    def reshard_program(self, params: Params) -> Any | None:
        """The jitted copy `rollout_params` runs on `params` (concrete, or abstract with their
        shardings for the dry run), or None where they are already in its dtype and layout."""
        dtype = jnp.dtype(self.config.dtype)
        targets = None
        if self.mesh is not None:
            targets = param_shardings(self.config, self.mesh, self.rules)
        leaves = jax.tree.leaves(params)
        layouts = [None] * len(leaves) if targets is None else jax.tree.leaves(targets)
        if all(_in_layout(x, sh, dtype) for x, sh in zip(leaves, layouts, strict=True)):
            return None
        if self._reshard is None:  # cast where the weights are, then move the narrower copy
            sources = jax.tree.map(lambda x: getattr(x, "sharding", None), params)

            def cast(x: jax.Array, source: Any) -> jax.Array:
                if source is None:
                    return x.astype(dtype)
                y = jax.lax.with_sharding_constraint(x.astype(dtype), source)
                return jax.lax.optimization_barrier(y)  # not moved after the gather

            self._reshard = jax.jit(lambda p: jax.tree.map(cast, p, sources), out_shardings=targets)
        return self._reshard

    def trace_programs(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
        """The prefill and decode programs of the buckets of (batch, prompt_len, new_tokens),
        traced from abstract inputs (nothing is materialised; `jax.stages.Traced`: `.jaxpr`,
        `.lower().compile()`): XLA's memory, collectives and FLOPs at real shapes
        (`rlver_jax.step_programs`, `rlver-jax plan --compile`)."""
        sc = self.sampler_config
        P = smallest_bucket(prompt_len, sc.prompt_buckets, "prompt length")
        N = smallest_bucket(new_tokens, sc.new_token_buckets, "max_new_tokens")
        B = smallest_bucket(batch, sc.batch_buckets, "batch size")
        if self.mesh is not None:
            dp = mesh_lib.batch_axis_size(self.mesh, self.rules)
            B = round_up(B, dp)
        plan = self.decode
        pre, dec, _ = _jitted(
            self.config, self.prefill_config, self.mesh, self.rules, sc.top_k_pool, self.pad_id,
            plan.unrolled, plan.ops, plan.fused_blocks(B), B, P, N,
        )  # fmt: skip
        S, f32, i32 = jax.ShapeDtypeStruct, jnp.float32, jnp.int32
        params = jax.tree.map(
            lambda s: S(s.shape, jnp.dtype(self.config.dtype)), tfm.param_shapes(self.config)
        )
        row = S((B,), f32)
        settings = Settings(row, row, S((B,), i32), S((MAX_STOP_IDS,), i32), S((), i32))
        args = (S((B, P), i32), S((B, P), jnp.bool_), S((0,), i32), S((B,), jnp.bool_), settings,
                S((), i32))  # fmt: skip
        dec_params = params
        if plan.unrolled:
            make = _decode_weights_jit(self.config, self.mesh, self.rules, plan.ops)
            dec_params = {**jax.eval_shape(make, params), "embed": params["embed"]}
        ctx = contextlib.nullcontext() if self.mesh is None else axis_rules(self.mesh, self.rules)
        with ctx:
            state = jax.eval_shape(pre, params, *args)
            return {"prefill": pre.trace(params, *args), "decode": dec.trace(dec_params, state)}

    def shard_params(self, params: Params) -> Params:
        """Place `params` as the sampler's jits expect (a no-op without a mesh)."""
        if self.mesh is None:
            return params
        shardings = param_shardings(self.config, self.mesh, self.rules)
        return mesh_lib.shard_params(params, shardings)

    def __call__(
        self, params: Params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
        temperature: float | Sequence[float] = 1.0, top_p: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None,
        forced_prefix: Sequence[int] = (), seed: int | None = None,
    ) -> SampleOutput:  # fmt: skip
        """Sample up to `max_new_tokens` tokens (forced prefix included) for every prompt.

        Per-row settings accept a scalar or one value per prompt. `seed=None` draws from the
        sampler's own seed and call counter (reproducible for a fixed call sequence); an
        explicit seed reproduces the same tokens whatever happened before.
        """
        n, lens, F = len(prompts), [len(p) for p in prompts], len(forced_prefix)
        if n == 0 or min(lens) == 0:
            raise ValueError("need at least one prompt, and every prompt needs >= 1 token")
        if max_new_tokens <= F:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must exceed the prefix ({F})")
        sc = self.sampler_config
        P = smallest_bucket(max(lens), sc.prompt_buckets, "prompt length")
        N = smallest_bucket(max_new_tokens, sc.new_token_buckets, "max_new_tokens")
        B = smallest_bucket(n, sc.batch_buckets, "batch size")
        if self.mesh is not None:
            dp = mesh_lib.batch_axis_size(self.mesh, self.rules)
            B = round_up(B, dp)
        prompt = np.full((B, P), self.pad_id, np.int32)
        mask = np.zeros((B, P), bool)
        for i, p in enumerate(prompts):
            prompt[i, P - len(p) :] = np.asarray(p, np.int32)
            mask[i, P - len(p) :] = True
        stops = self.stop_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(stops)}")
        if seed is None:
            seed = (self.seed * 1_000_003 + self._calls) & 0x7FFFFFFF
        self._calls += 1
        settings = Settings(
            temperature=_per_row(temperature, n, B, np.float32, 0.0, "temperature"),
            top_p=_per_row(top_p, n, B, np.float32, 1.0, "top_p"),
            top_k=_per_row(top_k, n, B, np.int32, 0, "top_k"),
            stop_ids=np.asarray(stops + (-1,) * (MAX_STOP_IDS - len(stops)), np.int32),
            max_new=np.int32(max_new_tokens),
        )
        prefix = np.asarray(forced_prefix, np.int32).reshape(F)
        args = (prompt, mask, prefix, np.arange(B) < n, settings, np.int32(seed % 2**31))
        pool, rules = self.sampler_config.top_k_pool, self.rules
        plan = self.decode
        jits = _jitted(
            self.config, self.prefill_config, self.mesh, rules, pool, self.pad_id, plan.unrolled,
            plan.ops, plan.fused_blocks(B), B, P, N,
        )  # fmt: skip
        pre, dec, ins = jits
        ctx = contextlib.nullcontext() if self.mesh is None else axis_rules(self.mesh, rules)
        with ctx:
            if ins is not None:
                args = jax.tree.map(mesh_lib.host_to_global, args, ins)
            t0 = time.perf_counter()
            state = pre(params, *args)
            if self.time_phases:
                jax.block_until_ready(state)
            t1 = time.perf_counter()
            state = dec(self._decode_params(params), state)
            tokens, logprobs, lengths, stopped, step = mesh_lib.to_host(
                (state.tokens, state.logprobs, state.lengths, state.stopped, state.step)
            )
        t2 = time.perf_counter()
        self.last_timings = {
            "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": float(step) - F,
        }  # fmt: skip
        reason = np.where(stopped[:n], StopReason.STOP_TOKEN, StopReason.MAX_TOKENS)
        return SampleOutput(
            tokens=tokens[:n, :max_new_tokens],
            logprobs=logprobs[:n, :max_new_tokens],
            lengths=lengths[:n].astype(np.int32),
            stop_reason=reason.astype(np.int8),
        )


def _in_layout(x: Any, sharding: Any, dtype: Any) -> bool:
    """Whether a leaf already has the rollout's dtype and (when given) sharding."""
    if jnp.dtype(x.dtype) != dtype:
        return False
    if sharding is None:
        return True
    own = getattr(x, "sharding", None)
    return own is not None and own.is_equivalent_to(sharding, x.ndim)


def _per_row(value: Any, n: int, B: int, dtype: Any, fill: Any, name: str) -> np.ndarray:
    """A scalar or n per-prompt values -> [B] (dummy rows get the neutral `fill`)."""
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        arr = np.full((n,), arr, dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one value per prompt ({n})")
    return np.concatenate([arr, np.full((B - n,), fill, dtype)])
