"""The CPU decode step's projections as a compiled kernel: `cpu_matmul.cc`, an XLA FFI call.

    packed = pack(w)                 # w [F, D] -> [F/16, D, 16], once per params
    out = project(packed, x)         # == w @ x for x [D, B], accumulated in float32

Why (how: the .cc file's header; figures: docs/performance.md): XLA:CPU's GEMM repacks the
weight at every call and, for bfloat16 weights, streams float32 copies of them; the kernel
streams the packed weights once per step in their own dtype. `sampler.decode: cpu_kernels` uses
it on one CPU device where the weights pack (`packable_config`); a call where the kernels
cannot be built raises `cpu_kernels.KernelBuildError`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlver_jax.kernels.cpu import build as cpu_kernels
from rlver_jax.models.config import ModelConfig

COLS = 16  # a packed tile's columns (cpu_matmul.cc's kCols)
_TARGETS = {
    jnp.dtype(jnp.float32): "rlver_packed_matmul_f32",
    jnp.dtype(jnp.bfloat16): "rlver_packed_matmul_bf16",
}


def packable(w_shape: tuple[int, ...], dtype: object) -> bool:
    """Whether a [F, D] matrix of `dtype` can be packed (F a multiple of 16; fp32 or bf16)."""
    return len(w_shape) == 2 and w_shape[0] % COLS == 0 and jnp.dtype(dtype) in _TARGETS


def packable_config(config: ModelConfig) -> bool:
    """Whether every decode matrix of `config` packs: each output size (q/k/v rows, the hidden
    size, gate/up rows, the vocabulary) a multiple of the 16-column tiles, weights in float32
    or bfloat16."""
    K, G, Dh = config.num_kv_heads, config.num_groups, config.head_dim
    outs = (K * (G + 2) * Dh, config.hidden_size, 2 * config.intermediate_size, config.vocab_size)
    return all(packable((n, 1), config.param_dtype) for n in outs)


def pack(w: jax.Array) -> jax.Array:
    """w [F, D] -> [F/16, D, 16] with packed[t, d, c] = w[16 t + c, d]."""
    if not packable(w.shape, w.dtype):
        raise ValueError(f"cannot pack a {w.dtype} matrix of shape {w.shape} (need [16 n, D])")
    F, D = w.shape
    return w.reshape(F // COLS, COLS, D).transpose(0, 2, 1)


def project(packed: jax.Array, x: jax.Array) -> jax.Array:
    """`unpacked @ x` for x [D, B] -> [F, B] float32 (x is widened to float32 first)."""
    tiles, D, cols = packed.shape
    if cols != COLS or x.ndim != 2 or x.shape[0] != D:
        raise ValueError(f"packed {packed.shape} does not multiply x {x.shape}")
    cpu_kernels.require()
    out = jax.ShapeDtypeStruct((tiles * COLS, x.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call(_TARGETS[jnp.dtype(packed.dtype)], out)
    return call(packed, x.astype(jnp.float32))


def take_rows(packed: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows `ids` of the unpacked matrix (an embedding lookup from a packed tied head)."""
    return packed[ids // COLS, :, ids % COLS]
