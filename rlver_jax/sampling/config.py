"""The sampler's static configuration (`SamplerConfig`): its buckets and which decode-step
implementation it runs on each backend (the choices' measurements are in their docs)."""

from __future__ import annotations

import dataclasses

from rlver_jax.kernels.gpu import decode as gpu_decode
from rlver_jax.models.config import check_attention_block


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static shapes: each distinct bucket combination compiles once.

    prompt_buckets: widths a batch of prompts is left-padded to (the largest bounds a prompt).
    batch_buckets: row counts a batch of prompts is padded to.
    new_token_buckets: decode lengths a request's token budget is rounded up to.
    top_k_pool: candidates taken with `lax.top_k` for top-k / top-p (top_k above it is clamped).
    Top-p is exact regardless: rows whose nucleus exceeds the pool use a bisection over the full
    vocabulary. (A full sort of 49k logits costs ~0.5 s per step on CPU at batch 32.)
    unroll_decode: decode with `decode_step.decode_step` (unrolled layers over per-layer,
    transposed weights and cache buffers, feature-major activations) instead of
    `transformer.forward` (`lax.scan` over stacked ones). None picks it on CPU, where XLA copies
    every weight slice that a scanned matmul reads and row-major [batch, D] x [D, F] products
    run at a fraction of the matmul peak; the price is a longer compile and a per-layer
    copy of the weights, made once per params object and kept by the `Sampler`.
    cpu_attention_kernel: the unrolled decode's attention as a compiled C++ kernel
    (`models.cpu_attention`, built on first use with the system's compiler by
    `models.cpu_kernels`), and the prefill's causal attention over the prompt as another
    (`models.cpu_causal_attention`, float32 only: bf16 prefills keep XLA's form). None uses
    them where they apply (an unrolled decode on one CPU device) and build; True requires them
    (an error where they do not apply or cannot be built); False keeps XLA's forms.
    cpu_matmul_kernel: the same for the unrolled decode's projections (`models.cpu_matmul`,
    weights packed once per params; it also needs `decode_step.packable_config`).
    pallas_decode: the unrolled decode step as fused Pallas (Triton) kernels, five a layer
    (`models.gpu_decode`): for GPUs at small batch, where XLA's ~12 kernels a layer leave a
    batch-1 step launch-bound. Needs an unrolled decode on one device and a model
    `gpu_decode.supported`; on CPU the kernels run in Pallas' interpret mode (slow: for tests).
    Batch buckets above `gpu_decode.MAX_BATCH` (8) keep XLA's step. Off by default until
    measured on a GPU. `pallas_blocks`: the kernels' block sizes.
    prefill_causal_block: `ModelConfig.causal_block` of the prefill: its causal attention over
    the prompt in blocks of this many queries, skipping the masked keys above the diagonal
    (0: one block). None picks 64 on CPU, where it cuts the prefill's attention by a third
    (SmolLM2, 32 x 256 tokens), and 0 elsewhere (not measured there).
    """

    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    new_token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    top_k_pool: int = 256
    unroll_decode: bool | None = None
    cpu_attention_kernel: bool | None = None
    cpu_matmul_kernel: bool | None = None
    pallas_decode: bool = False
    pallas_blocks: gpu_decode.Blocks = gpu_decode.BLOCKS
    prefill_causal_block: int | None = None

    def __post_init__(self) -> None:
        if self.prefill_causal_block is not None:
            check_attention_block(self.prefill_causal_block, "prefill_causal_block")

    def resolved_unroll_decode(self, platform: str) -> bool:
        """`unroll_decode` on `platform` ("cpu" or an accelerator's): None is on on CPU only."""
        return platform == "cpu" if self.unroll_decode is None else self.unroll_decode

    def resolved_prefill_causal_block(self, platform: str) -> int:
        """`prefill_causal_block` on `platform`: None is CPU_PREFILL_CAUSAL_BLOCK on CPU, 0
        elsewhere."""
        if self.prefill_causal_block is not None:
            return self.prefill_causal_block
        return CPU_PREFILL_CAUSAL_BLOCK if platform == "cpu" else 0


CPU_PREFILL_CAUSAL_BLOCK = 64  # SamplerConfig.prefill_causal_block=None on CPU
