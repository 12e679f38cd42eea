"""Per-program XLA options, chosen by what dominates the program and the platform it runs on.

XLA:CPU runs dots through YNNPACK fusions by default. They win on the decode step's small-N
GEMMs and its batched cache attention, but lose to XLA's own dot emitter (Eigen) on the large
GEMMs of a prefill over whole prompts. The options go to ``jax.jit(..., compiler_options=...)``
of the one program, so a process that also runs other code (a peer tool in a benchmark, the
learner) keeps XLA's defaults there. Other platforms get no options.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

__all__ = ["LARGE_GEMM_CPU_OPTIONS", "large_gemm_options", "platform_of"]

# YNNPACK fusions off: a prefill's large GEMMs run faster through XLA's own dot emitter (the
# module docstring says why; the prefill's figures are in docs/performance.md).
LARGE_GEMM_CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def platform_of(mesh: Mesh | None) -> str:
    """The platform a program runs on: the mesh's devices', else jax's default backend's."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def large_gemm_options(platform: str) -> dict[str, str]:
    """XLA options for a program dominated by large GEMMs (prompt prefill) on ``platform``."""
    return dict(LARGE_GEMM_CPU_OPTIONS) if platform == "cpu" else {}
