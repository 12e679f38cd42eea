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
- On CPU the decode step is `decode_step.decode_step` (`SamplerConfig.unroll_decode`): layers
  unrolled over per-layer weights and cache buffers (XLA:CPU copies every weight slice a
  scanned matmul reads: 1.6x slower for SmolLM2) and feature-major activations, so each
  projection streams its weight as the left operand (2x faster matmuls at batch 8). The
  per-layer weights (`decode_step.decode_weights`) are made once per params.
- Decode is ONE jitted `lax.while_loop` that exits on device when every row has stopped or the
  budget is spent. A host loop over a jitted step would pay a dispatch + host sync per token
  (~0.1-1 ms on CPU, more with a mesh) and a device->host read per step to stop early.
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
from flax import struct
from jax.sharding import Mesh

from rlver_jax.kernels.cpu import attention as cpu_attention
from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.kernels.gpu import decode as gpu_decode
from rlver_jax.models import transformer as tfm
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import (
    decode_step,
    decode_weight_logical_axes,
    decode_weights,
    one_query_attention,
    packable_config,
    slot_rope_tables,
)
from rlver_jax.models.kv_cache import KVCache, as_bits, init_cache
from rlver_jax.models.sharding import cache_shardings, param_shardings
from rlver_jax.models.transformer import Params
from rlver_jax.parallel import mesh as mesh_lib
from rlver_jax.parallel.compiler_options import large_gemm_options, platform_of
from rlver_jax.parallel.rules import (
    DEFAULT_RULES,
    MeshAxes,
    axis_rules,
    named_sharding,
    tree_shardings,
)
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.sampling.tokens import Settings, sample_tokens

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


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}; add a bucket")


# --------------------------------------------------------------------------- prefill / decode
@struct.dataclass
class DecodeState:
    """Everything the decode loop carries (donated from prefill to decode)."""

    cache: KVCache
    logits: jax.Array  # [B, V] float32, next-token logits
    tokens: jax.Array  # [B, N] int32 outputs
    logprobs: jax.Array  # [B, N] float32
    positions: jax.Array  # [B] RoPE position of the next token
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended on a stop token
    lengths: jax.Array  # [B] int32
    step: jax.Array  # [] int32, next output slot
    key: jax.Array
    settings: Settings


def prefill(
    params: Params, prompt: jax.Array, prompt_mask: jax.Array, prefix: jax.Array, live: jax.Array,
    settings: Settings, seed: jax.Array, *, config: ModelConfig, cache_len: int, out_len: int,
    pad_id: int, per_layer: bool = False,
) -> DecodeState:  # fmt: skip
    """Run prompt + forced prefix through the model; sampling starts in `decode`. Only the F + 1
    positions that matter (prefix logprobs, first free token) are projected to the vocabulary;
    sampling code stays out of this program (it compiles once, in decode). `per_layer` fills
    the per-layer cache the unrolled decode step reads (bf16 as bits, `kv_cache.as_bits`)
    directly: a stacked one would be written, then copied layer by layer (SmolLM2 at batch
    32: 566 MB)."""
    B, P = prompt.shape
    F = prefix.shape[0]
    tokens = jnp.concatenate([prompt, jnp.broadcast_to(prefix, (B, F))], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.ones((B, F), bool)], axis=1)
    positions = tfm.positions_from_mask(mask)
    cache = init_cache(config, B, cache_len, per_layer=per_layer)
    hidden, cache = tfm.forward(
        params, tokens, positions, mask, config, cache, return_hidden=True, empty_cache=True
    )
    cache = as_bits(cache)
    logits = tfm.lm_logits(params, hidden[:, P - 1 :], config)  # [B, F + 1, V]
    out_tok = jnp.full((B, out_len), pad_id, jnp.int32)
    out_lp = jnp.zeros((B, out_len), jnp.float32)
    if F:
        t = jnp.where(settings.temperature <= 0, 1.0, settings.temperature)[:, None, None]
        lp = jax.nn.log_softmax(logits[:, :F] / t, axis=-1)
        pre = jnp.broadcast_to(prefix, (B, F))
        out_tok = out_tok.at[:, :F].set(pre)
        out_lp = out_lp.at[:, :F].set(jnp.take_along_axis(lp, pre[..., None], -1)[..., 0])
    return DecodeState(
        cache=cache, logits=logits[:, F], tokens=out_tok, logprobs=out_lp,
        positions=positions[:, -1] + 1, done=~live, stopped=jnp.zeros((B,), bool),
        lengths=jnp.full((B,), F, jnp.int32), step=jnp.asarray(F, jnp.int32),
        key=jax.random.key(seed), settings=settings,
    )  # fmt: skip


def decode(
    params: Params, state: DecodeState, *, config: ModelConfig, pool: int, pad_id: int,
    unroll: bool, kernel: bool = False, fused: gpu_decode.Blocks | None = None,
) -> DecodeState:  # fmt: skip
    """Sample, write, feed back: one `lax.while_loop` iteration per token until all rows stop.
    The last token is still fed through the model (unused logits): skipping that one forward
    would need a `lax.cond` around the cache update inside the loop.

    With `unroll` (`SamplerConfig.unroll_decode`) `params` are `decode_step.decode_weights`
    and each token runs `decode_step.decode_step` on the per-layer cache buffers (bf16 ones
    held as bits, `kv_cache.as_bits`) that `prefill(per_layer=True)` leaves (`decode_step`
    rejects a stacked cache). Either way the donated cache is updated in place: the returned state
    holds it (as the output aliasing the donated input: without that XLA would copy the whole
    cache into the loop). `kernel` runs the unrolled step's attention as `cpu_attention`'s
    compiled kernel (`SamplerConfig.cpu_attention_kernel`); packed weights
    (`decode_weights(..., packed=True)`) run its projections as `cpu_matmul`'s. `fused` (block
    sizes) runs it as `gpu_decode.decode_step` (`SamplerConfig.pallas_decode`).
    """
    B = state.logits.shape[0]
    ones = jnp.ones((B, 1), bool)
    rope = slot_rope_tables(config, state.cache.max_len) if unroll else None

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < s.settings.max_new) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        key = jax.random.fold_in(s.key, s.step)
        tok, lp = sample_tokens(s.logits, key, s.settings, pool)
        active = ~s.done
        tok = jnp.where(active, tok, pad_id)
        hit = active & jnp.any(tok[:, None] == s.settings.stop_ids[None, :], axis=-1)
        if fused is not None:
            logits, cache = gpu_decode.decode_step(
                params, tok, s.positions, s.cache, config, rope, fused
            )
        elif unroll:
            attention = cpu_attention.one_query_attention if kernel else one_query_attention
            logits, cache = decode_step(params, tok, s.positions, s.cache, config, attention, rope)
        else:
            hidden, cache = tfm.forward(
                params, tok[:, None], s.positions[:, None], ones, config, s.cache,
                return_hidden=True,
            )  # fmt: skip
            logits = tfm.lm_logits(params, hidden, config)[:, 0]
        return s.replace(
            cache=cache,
            logits=logits,
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(
                s.logprobs, jnp.where(active, lp, 0.0)[:, None], (0, s.step)
            ),
            positions=s.positions + 1,
            done=s.done | hit | (s.step + 1 >= s.settings.max_new),
            stopped=s.stopped | hit,
            lengths=s.lengths + active.astype(jnp.int32),
            step=s.step + 1,
        )

    return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=32)
def _decode_weights_jit(config: ModelConfig, mesh: Mesh | None, rules: Any, packed: bool) -> Any:
    """Jitted `decode_weights` without the embedding (placed like the decode jit expects its
    params): the caller adds the params' own embedding, which a jit output would copy."""

    def fn(params: Params) -> Params:
        weights = decode_weights(params, config, packed)
        del weights["embed"]
        return weights

    if mesh is None:
        return jax.jit(fn)
    shardings = param_shardings(config, mesh, rules)
    out = dict(_decode_weight_shardings(config, mesh, rules, packed))
    del out["embed"]
    return jax.jit(fn, in_shardings=(shardings,), out_shardings=out)


def _decode_weight_shardings(config: ModelConfig, mesh: Mesh, rules: Any, packed: bool) -> Any:
    """Shardings of `decode_weights` from their logical axes (packed weights only exist on a
    one-device mesh: replicated)."""
    shapes = jax.eval_shape(
        functools.partial(decode_weights, config=config, packed=packed), tfm.param_shapes(config)
    )
    if packed:
        return jax.tree.map(lambda _: mesh_lib.replicated(mesh), shapes)
    return tree_shardings(decode_weight_logical_axes(config), shapes, mesh, rules)


@functools.lru_cache(maxsize=256)
def _jitted(
    config: ModelConfig, mesh: Mesh | None, rules: Any, pool: int, pad_id: int, unroll: bool,
    kernel: bool, packed: bool, fused: gpu_decode.Blocks | None, causal_block: int, B: int,
    P: int, N: int,
) -> tuple[Any, Any, Any]:  # fmt: skip
    """(prefill jit, decode jit, prefill input shardings) for the bucket (B, P, N); the prefill
    attends in `causal_block`-query blocks (`SamplerConfig.prefill_causal_block`, resolved), or
    with `kernel` through `cpu_causal_attention` where that applies.

    Cached per process, so samplers of the same model shape share compiled programs. The
    prefix length F only changes prefill's input shapes (jit retraces it; decode is shared).
    """
    pre = functools.partial(
        prefill, config=config.replace(causal_block=causal_block, causal_kernel=kernel),
        cache_len=P + N, out_len=N, pad_id=pad_id, per_layer=unroll,
    )  # fmt: skip
    dec = functools.partial(
        decode,
        config=config,
        pool=pool,
        pad_id=pad_id,
        unroll=unroll,
        kernel=kernel,
        fused=fused,
    )
    pre_opts = large_gemm_options(platform_of(mesh))
    if mesh is None:
        return jax.jit(pre, compiler_options=pre_opts), jax.jit(dec, donate_argnums=(1,)), None
    rep, row = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh, (B,), rules)
    grid, out = (mesh_lib.batch_sharding(mesh, (B, n), rules) for n in (P, N))
    ins = (grid, grid, rep, row, Settings(row, row, row, rep, rep), rep)
    params = param_shardings(config, mesh, rules)
    dec_params = _decode_weight_shardings(config, mesh, rules, packed) if unroll else params
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
    every step). With a `mesh`, place params with `shard_params` (the jits declare explicit
    in/out shardings from the logical axis rules); prompts are split over the batch axes and
    the programs are traced under `rules.axis_rules(mesh)`.
    """

    def __init__(
        self, config: ModelConfig, *, mesh: Mesh | None = None, pad_id: int = 0,
        stop_token_ids: Sequence[int] = (), sampler_config: SamplerConfig | None = None,
        rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES, seed: int = 0,
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
        self.unroll_decode = self.sampler_config.resolved_unroll_decode(platform_of(mesh))
        self.pallas_decode = self._use_pallas_decode()
        self.attention_kernel = self._use_kernel("cpu_attention_kernel", True)
        self.matmul_kernel = self._use_kernel("cpu_matmul_kernel", packable_config(config))
        self.prefill_causal_block = self.sampler_config.resolved_prefill_causal_block(
            platform_of(mesh)
        )
        self.last_timings: dict[str, float] = {}
        self._calls = 0
        self._per_layer: tuple[list[Any], Params] | None = None  # (params' leaves, weights)

    @property
    def num_devices(self) -> int:
        """Devices the sampler runs on: its mesh's, or the one default device."""
        return 1 if self.mesh is None else self.mesh.devices.size

    def _use_kernel(self, option: str, shape_ok: bool) -> bool:
        """`SamplerConfig.<option>` (a CPU kernel) resolved for this sampler (see there)."""
        want, mesh, devices = getattr(self.sampler_config, option), self.mesh, self.num_devices
        applies = self.unroll_decode and platform_of(mesh) == "cpu" and devices == 1
        if want and not applies:
            raise ValueError(
                f"{option}=True needs an unrolled decode on one CPU device (XLA cannot "
                "partition the kernel's custom call); this sampler has unroll_decode="
                f"{self.unroll_decode} on {platform_of(mesh)} with {devices} device(s)"
            )
        if want and self.pallas_decode:
            raise ValueError(f"{option}=True and pallas_decode=True both replace the decode step")
        applies = applies and not self.pallas_decode
        if want and not shape_ok:
            raise ValueError(
                f"{option}=True needs float32 or bfloat16 weights whose projections and "
                "vocabulary are multiples of 16 (decode_step.packable_config)"
            )
        if want is False or not applies or not shape_ok:
            return False
        if cpu_kernels.available():
            return True
        if want:
            raise RuntimeError(f"{option}=True, but the CPU kernels did not build (see log)")
        return False

    def _use_pallas_decode(self) -> bool:
        """`SamplerConfig.pallas_decode` checked against this sampler (see there)."""
        if not self.sampler_config.pallas_decode:
            return False
        devices = self.num_devices
        if not self.unroll_decode or devices != 1:
            raise ValueError(
                "pallas_decode=True needs an unrolled decode on one device (the kernels are "
                f"not partitioned); this sampler has unroll_decode={self.unroll_decode} with "
                f"{devices} device(s)"
            )
        why = gpu_decode.supported(self.config)
        if why is not None:
            raise ValueError(f"pallas_decode=True does not support this model: {why}")
        return True

    def _decode_params(self, params: Params) -> Params:
        """`params` as the decode jit takes them. Unrolled: `decode_weights`, made once per
        params object (a rollout calls the sampler once per turn with the same weights) and
        held until other params arrive."""
        if not self.unroll_decode:
            return params
        leaves = jax.tree.leaves(params)
        cached = self._per_layer
        if (
            cached is None
            or len(cached[0]) != len(leaves)
            or any(a is not b for a, b in zip(cached[0], leaves, strict=True))
        ):
            self._per_layer = None  # drop the old copy before making the new one
            make = _decode_weights_jit(self.config, self.mesh, self.rules, self.matmul_kernel)
            weights = make(params)
            cached = self._per_layer = (leaves, {**weights, "embed": params["embed"]})
        return cached[1]

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
        P = _bucket(max(lens), sc.prompt_buckets, "prompt length")
        N = _bucket(max_new_tokens, sc.new_token_buckets, "max_new_tokens")
        B = _bucket(n, sc.batch_buckets, "batch size")
        if self.mesh is not None:
            dp = mesh_lib.batch_axis_size(self.mesh, self.rules)
            B = -(-B // dp) * dp
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
        fused = self.pallas_decode and B <= gpu_decode.MAX_BATCH  # larger: XLA's step
        jits = _jitted(
            self.config, self.mesh, rules, pool, self.pad_id, self.unroll_decode,
            self.attention_kernel, self.matmul_kernel,
            self.sampler_config.pallas_blocks if fused else None, self.prefill_causal_block,
            B, P, N,
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


def _per_row(value: Any, n: int, B: int, dtype: Any, fill: Any, name: str) -> np.ndarray:
    """A scalar or n per-prompt values -> [B] (dummy rows get the neutral `fill`)."""
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        arr = np.full((n,), arr, dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one value per prompt ({n})")
    return np.concatenate([arr, np.full((B - n,), fill, dtype)])
