"""The decode step as five fused Pallas (Triton) kernels per layer: the GPU's small-batch path.

At batch 1 an H100 decode step under XLA is ~12 kernels a layer (363 in all), whose launches
take far longer than the step's weight traffic, so launch latency, not bandwidth, sets its speed
(figures: docs/performance.md). Here a layer is

    1. `_qkv_kernel`        RMS norm, the q/k/v projection, biases, RoPE, the k/v cache write
    2. `_attention_kernel`  one query per row over a block of cache slots (split over slots
                            as in flash-decoding: partial max, sum and weighted values)
    3. `_out_kernel`        the blocks' partials combined, the output projection, the residual
    4. `_mlp_in_kernel`     RMS norm, the gate and up projections, silu(gate) * up
    5. `_down_kernel`       the down projection and the residual

with every program reading whole rows of its weight block (loads issued together, no loop
over the input), the batch unrolled inside a program so weights are read once at any batch,
and all arithmetic in float32. It computes what `decode_step.decode_step` computes (tested in
Pallas' interpret mode against it, and lowered for CUDA in the default tests); weights are
`decode_step.decode_weights` (unpacked), the cache the per-layer one.

Triton blocks have power-of-two sizes, so rows of a non-power-of-two width (SmolLM2's 576)
are read as power-of-two pieces (512 + 64), and each grid divides its axis exactly: no load
strays out of bounds (interpret mode would clamp it, silently). Block sizes are first guesses
for an H100 (`Blocks`' defaults), not tuned on one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from rlver_jax.models.attention import MASK_VALUE
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import step_inputs, step_layers, step_logits
from rlver_jax.models.kv_cache import KVCache, as_held, cache_values

Params = dict[str, Any]
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Rows of the weight each program reads, the cache slots of an attention program (each
    capped at the largest power of two dividing its axis), and Triton's warps per program
    (`SamplerConfig.pallas_blocks`)."""

    qkv_rows: int = 8  # per half head: a program computes 2 x qkv_rows outputs (a RoPE pair)
    out_rows: int = 16  # rows of the attention output projection per program
    mlp_rows: int = 16  # MLP units (a gate and an up row each) per program
    down_rows: int = 8  # rows of the down projection per program
    slots: int = 32  # cache slots per attention program
    num_warps: int = 4  # Triton warps per program

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            n = getattr(self, field.name)
            if not isinstance(n, int) or n < 1 or n & (n - 1):
                raise ValueError(f"pallas_blocks.{field.name} must be a power of two, got {n!r}")
        if self.num_warps > 32:
            raise ValueError(f"pallas_blocks.num_warps must be <= 32, got {self.num_warps}")


BLOCKS = Blocks()

# The kernels unroll the batch inside each program (each weight block is read once for every
# row), so code size, registers and compile time grow with it (`bench/triton_check.py` compiles
# them for a given batch); larger batches are GEMM-shaped work that XLA's own step does well.
# The sampler runs bigger batch buckets through XLA's step.
MAX_BATCH = 8


def supported(config: ModelConfig) -> str | None:
    """None when the fused kernels compute this model's decode step, else why not."""
    if config.qk_norm:
        return "q/k norms (Qwen3) are not fused"
    dh = config.head_dim
    if dh & (dh - 1) or dh < 4:
        return f"head_dim {dh} is not a power of two >= 4"
    return None


def _pieces(n: int) -> tuple[tuple[int, int], ...]:
    """[0, n) as power-of-two (start, size) slices, largest first: 576 -> (0, 512), (512, 64)."""
    out, start = [], 0
    for bit in reversed(range(n.bit_length())):
        if n & (1 << bit):
            out.append((start, 1 << bit))
            start += 1 << bit
    return tuple(out)


def _block(rows: int, want: int) -> int:
    """The largest power of two <= `want` that divides `rows`."""
    return math.gcd(rows, 1 << (max(want, 1).bit_length() - 1))


def _batch_rows(ref: Any) -> list[jax.Array]:
    """Indices of a [B, ...] ref's rows, unrolled (as arrays: interpret mode rejects Python
    ints in a ref's index)."""
    return [jnp.int32(b) for b in range(ref.shape[0])]


def _normed(x: list[jax.Array], scale_ref: Any, eps: float) -> list[jax.Array]:
    """`transformer.rms_norm` of the pieces of one row: x / sqrt(mean(x^2) + eps) * scale."""
    width = sum(p.shape[0] for p in x)
    inv = jax.lax.rsqrt(sum(jnp.sum(p * p) for p in x) / width + eps)
    out, start = [], 0
    for p in x:
        out.append(p * inv * scale_ref[pl.ds(start, p.shape[0])].astype(F32))
        start += p.shape[0]
    return out


def _rows(ref: Any, rows: Any, pieces: tuple[tuple[int, int], ...]) -> list[jax.Array]:
    """`ref[rows, :]` of a 2-d ref as float32 pieces: [R, n] for a weight's block of rows,
    [n] for one batch row of an input. The kernels load their weights before anything else:
    the loads are then in flight together, while the inputs are read and normed (a
    reduction's barrier would otherwise hold back every load after it)."""
    return [ref[rows, pl.ds(s, n)].astype(F32) for s, n in pieces]


def _matvec(w: list[jax.Array], xs: list[list[jax.Array]]) -> list[jax.Array]:
    """`w @ x` [R] for each batch row's pieces x in xs (w: `_rows`' pieces)."""
    return [sum(jnp.sum(wi * xi[None, :], axis=1) for wi, xi in zip(w, x, strict=True)) for x in xs]


def _qkv_kernel(
    start_ref, x_ref, norm_ref, w_ref, cos_ref, sin_ref, *refs, config: ModelConfig, rows: int
):  # fmt: skip
    """Program (c, r): rows r*R.. of the first half of q/k/v head c in `wqkv`'s order (per kv
    head j: G query heads, the key head, the value head) and the same rows of its second half,
    the pairs (y_i, y_{i+h}) that RoPE rotates:

        out_i = y_i cos_i - y_{i+h} sin_i,    out_{i+h} = y_{i+h} cos_i + y_i sin_i

    (values unrotated). Queries go to q [B, K, G', Dh], keys and values into slot `start`."""
    if config.attention_bias:
        bq_ref, bk_ref, bv_ref = refs[:3]
    q_ref, k_ref, v_ref = refs[-3:]
    G, Dh, half = config.num_groups, config.head_dim, config.head_dim // 2
    c, r = pl.program_id(0), pl.program_id(1)
    j, i = c // (G + 2), c % (G + 2)
    is_q, is_k, is_v = i < G, i == G, i == G + 1
    g = jnp.minimum(i, G - 1)  # the query head's index in its group (clamped for k and v)
    start = start_ref[0]
    pieces = _pieces(config.hidden_size)
    offsets = (r * rows, half + r * rows)  # the pair's two halves
    ws = [_rows(w_ref, pl.ds(c * Dh + offset, rows), pieces) for offset in offsets]
    xs = [
        _normed(_rows(x_ref, b, pieces), norm_ref, config.rms_norm_eps) for b in _batch_rows(q_ref)
    ]
    outs = []
    for offset, w in zip(offsets, ws, strict=True):
        y = _matvec(w, xs)
        if config.attention_bias:
            bias = jnp.where(
                is_q,
                bq_ref[pl.ds((j * G + g) * Dh + offset, rows)].astype(F32),
                jnp.where(
                    is_k,
                    bk_ref[pl.ds(j * Dh + offset, rows)].astype(F32),
                    bv_ref[pl.ds(j * Dh + offset, rows)].astype(F32),
                ),
            )
            y = [v + bias for v in y]
        outs.append(y)
    ones = jnp.ones((rows,), bool)
    cols_lo, cols_hi = pl.ds(r * rows, rows), pl.ds(half + r * rows, rows)
    for b, lo, hi in zip(_batch_rows(q_ref), *outs, strict=True):
        cos, sin = cos_ref[b, cols_lo].astype(F32), sin_ref[b, cols_lo].astype(F32)
        rotated = (
            jnp.where(is_v, lo, lo * cos - hi * sin),
            jnp.where(is_v, hi, hi * cos + lo * sin),
        )
        for cols, val in zip((cols_lo, cols_hi), rotated, strict=True):
            plt.store(q_ref.at[b, j, g, cols], val.astype(q_ref.dtype), mask=ones & is_q)
            plt.store(k_ref.at[b, j, cols, start], as_held(val, k_ref.dtype), mask=ones & is_k)
            plt.store(v_ref.at[b, j, start, cols], as_held(val, v_ref.dtype), mask=ones & is_v)


def _attention_kernel(
    valid_ref, q_ref, k_ref, v_ref, acc_ref, max_ref, sum_ref, *, config: ModelConfig, slots: int
):  # fmt: skip
    """Program (b K + j, s): the G query heads of kv head j of row b over cache slots
    [s S', (s+1) S'), as flash-decoding partials (masked slots excluded):

        m_g = max_t z_gt,   l_g = sum_t exp(z_gt - m_g),   a_g = sum_t exp(z_gt - m_g) v_t,
        z_gt = q_g . k_t / sqrt(Dh)."""
    K, G = config.num_kv_heads, config.num_groups
    b, j, s = pl.program_id(0) // K, pl.program_id(0) % K, pl.program_id(1)
    heads = q_ref.shape[2]  # G rounded up to a power of two
    t = pl.ds(s * slots, slots)
    live = valid_ref[b, t] != 0  # [S']
    # a bf16 cache held as bits is read and written as bits here, in the kernels: a bitcast of
    # the whole buffer outside them could cost XLA a copy of it
    k = cache_values(plt.load(k_ref.at[b, j, :, t], mask=live[None, :], other=0))  # [Dh, S']
    v = cache_values(plt.load(v_ref.at[b, j, t, :], mask=live[:, None], other=0))  # [S', Dh]
    k, v = k.astype(F32), v.astype(F32)
    q = q_ref[b, j].astype(F32) / math.sqrt(config.head_dim)  # [G', Dh]
    z = jnp.sum(q[:, :, None] * k[None, :, :], axis=1)  # [G', S']
    use = live[None, :] & (jnp.arange(heads) < G)[:, None]
    z = jnp.where(use, z, MASK_VALUE)
    m = jnp.max(z, axis=1)
    p = jnp.where(use, jnp.exp(z - m[:, None]), 0.0)
    acc_ref[b, j, :, s] = jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
    max_ref[b, j, :, s] = m
    sum_ref[b, j, :, s] = jnp.sum(p, axis=1)


def _out_kernel(
    x_ref, w_ref, acc_ref, max_ref, sum_ref, out_ref, *, config: ModelConfig, rows: int,
    blocks: int,
):  # fmt: skip
    """Program n: rows n R.. of x + attention @ wo^T, each head's attention combined from its
    `blocks` slot blocks (partials past them, the padding to a power of two, are skipped):

        attn_g = sum_s exp(m_gs - M_g) a_gs / sum_s exp(m_gs - M_g) l_gs,  M_g = max_s m_gs."""
    K, G, Dh = config.num_kv_heads, config.num_groups, config.head_dim
    n = pl.program_id(0)
    out_rows = pl.ds(n * rows, rows)
    real = jnp.arange(acc_ref.shape[3]) < blocks  # [P]
    batch = _batch_rows(x_ref)
    heads = [(jnp.int32(j), jnp.int32(g), j * G + g) for j in range(K) for g in range(G)]
    ws = [w_ref[out_rows, pl.ds(h * Dh, Dh)].astype(F32) for _, _, h in heads]  # [R, Dh] each
    ys = [x_ref[b, out_rows].astype(F32) for b in batch]
    for (j, g, _), w in zip(heads, ws, strict=True):
        for i, b in enumerate(batch):
            m = plt.load(max_ref.at[b, j, g], mask=real, other=MASK_VALUE)
            weight = jnp.where(real, jnp.exp(m - jnp.max(m)), 0.0)
            total = jnp.sum(weight * plt.load(sum_ref.at[b, j, g], mask=real, other=0))
            acc = plt.load(acc_ref.at[b, j, g], mask=real[:, None], other=0)  # [P, Dh]
            attn = jnp.sum(weight[:, None] * acc, axis=0) / total  # [Dh]
            ys[i] = ys[i] + jnp.sum(w * attn[None, :], axis=1)
    for b, y in zip(batch, ys, strict=True):
        out_ref[b, out_rows] = y.astype(out_ref.dtype)


def _mlp_in_kernel(x_ref, norm_ref, w_ref, act_ref, *, config: ModelConfig, rows: int):
    """Program f: silu(gate) * up for MLP units f R.. (`w_gate_up` interleaves gate row u at
    2u and up row u at 2u + 1), from the RMS-normed x."""
    f = pl.program_id(0)
    pieces = _pieces(config.hidden_size)
    ws = [_rows(w_ref, pl.ds(2 * f * rows + i, rows, stride=2), pieces) for i in (0, 1)]
    xs = [
        _normed(_rows(x_ref, b, pieces), norm_ref, config.rms_norm_eps) for b in _batch_rows(x_ref)
    ]
    gates, ups = (_matvec(w, xs) for w in ws)
    for b, gate, up in zip(_batch_rows(x_ref), gates, ups, strict=True):
        act_ref[b, pl.ds(f * rows, rows)] = (jax.nn.silu(gate) * up).astype(act_ref.dtype)


def _down_kernel(x_ref, act_ref, w_ref, out_ref, *, config: ModelConfig, rows: int):
    """Program n: rows n R.. of x + act @ w_down^T."""
    n = pl.program_id(0)
    out_rows = pl.ds(n * rows, rows)
    pieces = _pieces(config.intermediate_size)
    w = _rows(w_ref, out_rows, pieces)
    acts = [_rows(act_ref, b, pieces) for b in _batch_rows(x_ref)]
    for b, y in zip(_batch_rows(x_ref), _matvec(w, acts), strict=True):
        out_ref[b, out_rows] = (x_ref[b, out_rows].astype(F32) + y).astype(out_ref.dtype)


def _call(
    kernel: Any, grid: tuple[int, ...], out_shape: Any, *args: jax.Array,
    aliases: dict[int, int] | None = None, num_warps: int, interpret: bool,
) -> Any:  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases or {},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(*args)


@functools.partial(jax.jit, static_argnames=("config", "blocks", "interpret"))
def layer(
    x: jax.Array, p: Params, cos: jax.Array, sin: jax.Array, valid: jax.Array,
    start: jax.Array, k_cache: jax.Array, v_cache: jax.Array, config: ModelConfig,
    blocks: Blocks = BLOCKS, interpret: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # fmt: skip
    """One decoder layer for one token per row: x [B, D] row-major, `p` a layer of
    `decode_step.decode_weights`, cos / sin [B, Dh] at the rows' positions, `valid` [B, S]
    int32 (1: the slot is attended), `start` [1] int32 the slot written; the caches in the
    per-layer layouts (`KVCache`). Returns (x, (k cache, v cache)); the caches are updated in
    place (the kernels alias them).

    A jit of its own: a step's layers then share one lowering, so each kernel is lowered to
    Triton IR once, not once per layer (a lowering per layer made the compile slow). JAX 0.10.2
    and 0.11.2 hand that IR to XLA as `__gpu$xla.gpu.triton` custom calls, which XLA compiles."""
    B, D = x.shape
    K, G, Dh, F = config.num_kv_heads, config.num_groups, config.head_dim, config.intermediate_size
    S = k_cache.shape[-1]
    heads = pl.next_power_of_2(G)
    call = functools.partial(_call, num_warps=blocks.num_warps, interpret=interpret)
    sds = jax.ShapeDtypeStruct

    qkv_rows = _block(Dh // 2, blocks.qkv_rows)
    bias = tuple(p[n].reshape(-1) for n in ("bq", "bk", "bv")) if config.attention_bias else ()
    n_in = 6 + len(bias)  # the caches' places among the inputs: aliased to outputs 1 and 2
    q, k_cache, v_cache = call(
        functools.partial(_qkv_kernel, config=config, rows=qkv_rows),
        (K * (G + 2), Dh // 2 // qkv_rows),
        (sds((B, K, heads, Dh), x.dtype), sds(k_cache.shape, k_cache.dtype),
         sds(v_cache.shape, v_cache.dtype)),
        start, x, p["attn_norm"].reshape(D), p["wqkv"], cos, sin, *bias, k_cache, v_cache,
        aliases={n_in: 1, n_in + 1: 2},
    )  # fmt: skip

    slots = _block(S, blocks.slots)
    n_blocks = S // slots
    per_head = (B, K, heads, pl.next_power_of_2(n_blocks))  # per query head: its slot blocks
    acc, maxes, sums = call(
        functools.partial(_attention_kernel, config=config, slots=slots),
        (B * K, n_blocks),
        (sds((*per_head, Dh), F32), sds(per_head, F32), sds(per_head, F32)),
        valid, q, k_cache, v_cache,
    )  # fmt: skip

    out_rows = _block(D, blocks.out_rows)
    x = call(
        functools.partial(_out_kernel, config=config, rows=out_rows, blocks=n_blocks),
        (D // out_rows,), sds(x.shape, x.dtype), x, p["wo"], acc, maxes, sums,
    )  # fmt: skip
    mlp_rows = _block(F, blocks.mlp_rows)
    act = call(
        functools.partial(_mlp_in_kernel, config=config, rows=mlp_rows),
        (F // mlp_rows,), sds((B, F), x.dtype), x, p["mlp_norm"].reshape(D), p["w_gate_up"],
    )  # fmt: skip
    down_rows = _block(D, blocks.down_rows)
    x = call(
        functools.partial(_down_kernel, config=config, rows=down_rows),
        (D // down_rows,), sds(x.shape, x.dtype), x, act, p["w_down"],
    )  # fmt: skip
    return x, (k_cache, v_cache)


def decode_step(
    weights: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
    config: ModelConfig, rope: tuple[jax.Array, jax.Array] | None = None,
    blocks: Blocks = BLOCKS, interpret: bool | None = None,
) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """`decode_step.decode_step` with every layer as the fused kernels (`layer`); the same
    arguments, returns and cache forms. `interpret` (None: on CPU) runs them in Pallas' interpret
    mode, as the tests do; XLA computes the embedding and the output head."""
    why = supported(config)
    if why is not None:
        raise ValueError(f"the fused GPU decode step does not support this model: {why}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    x, cos, sin, key_mask, mask = step_inputs(weights, tokens, positions, cache, config, rope)
    cos, sin = cos[:, 0], sin[:, 0]
    valid = mask[:, 0].astype(jnp.int32)
    start = cache.end.reshape(1).astype(jnp.int32)

    def fused(x: jax.Array, p: Params, k: jax.Array, v: jax.Array) -> Any:
        return layer(
            x, p, cos, sin, valid, start, k, v, config=config, blocks=blocks, interpret=interpret
        )

    x, new_cache = step_layers(fused, x, weights, cache, key_mask)
    return step_logits(weights, x.T, config), new_cache
