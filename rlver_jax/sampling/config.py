"""The sampler's static configuration (`SamplerConfig`): its buckets and its decode step."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rlver_jax.kernels.gpu.decode import BLOCKS, Blocks
from rlver_jax.kernels.select import DECODE_CHOICES, check_choice


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static shapes: each distinct bucket combination compiles once.

    prompt_buckets: prompt lengths (left-padded up to the next bucket).
    batch_buckets: batch sizes (padded with dummy rows up to the next bucket).
    new_token_buckets: output widths (max_new_tokens rounded up).
    top_k_pool: candidates taken with `lax.top_k` for top-k / top-p (top_k above it is clamped).
        Top-p is exact regardless: rows whose nucleus exceeds the pool use a bisection over the
        full vocabulary (a full sort of the vocabulary per step is far slower on a CPU).
    decode: the decode step: auto | scan | unrolled | cpu_kernels | pallas
        (`kernels.select`: auto is cpu_kernels on one CPU device, unrolled on other CPUs, scan
        on accelerators; the prefill's attention follows `model.attention`).
    pallas_blocks: block sizes of the fused Pallas decode step (`decode: pallas`).
    """

    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    new_token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    top_k_pool: int = 256
    decode: str = "auto"
    pallas_blocks: Blocks = BLOCKS

    # Keys of earlier versions -> the key that replaced them (a config error names it).
    RENAMED: ClassVar[dict[str, str]] = {
        "unroll_decode": "sampler.decode (scan | unrolled)",
        "cpu_attention_kernel": "sampler.decode (cpu_kernels) and model.attention (cpu_kernel)",
        "cpu_matmul_kernel": "sampler.decode (cpu_kernels)",
        "pallas_decode": "sampler.decode (pallas)",
        "prefill_causal_block": "model.attention (xla_causal)",
    }

    def __post_init__(self) -> None:
        check_choice("sampler.decode", self.decode, DECODE_CHOICES)
