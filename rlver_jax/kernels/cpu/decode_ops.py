"""The CPU's pieces of the unrolled decode step (`decode_step.StepOps`).

- `XLA_CPU_OPS`: XLA's forms, with each projection's result behind a barrier: XLA:CPU would
  otherwise fold a later transpose into the dot and turn it back into the slow ``x^T @ w^T``
  form (GPUs and TPUs take either form at full speed, and there a barrier would only stop
  fusions, so they keep `decode_step.XLA_OPS`).
- `KERNEL_OPS`: the one-query attention as the compiled kernel (`attention`), projections as
  above; `PACKED_KERNEL_OPS` adds the projection kernel over packed weights (`matmul`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlver_jax.kernels.cpu import attention, matmul
from rlver_jax.models.decode_step import StepOps


def barrier_project(w: jax.Array, x: jax.Array) -> jax.Array:
    """`decode_step.xla_project` whose result XLA cannot fuse into a transposed form."""
    return jax.lax.optimization_barrier(jnp.dot(w.astype(x.dtype), x))


def packed_project(w: jax.Array, x: jax.Array) -> jax.Array:
    """`decode_step.xla_project` over a packed weight, through the kernel."""
    return matmul.project(w, x).astype(x.dtype)


XLA_CPU_OPS = StepOps(project=barrier_project)
KERNEL_OPS = StepOps(attention=attention.one_query_attention, project=barrier_project)
PACKED_KERNEL_OPS = StepOps(
    attention=attention.one_query_attention,
    project=packed_project,
    head=matmul.project,
    pack=matmul.pack,
)
