"""Compile the fused decode kernels (`rlver_jax.models.gpu_decode`) for an H100 without one.

Lowers one decode step of a model's shape (SmolLM2-135M's by default) for CUDA (as
`jax.jit(...).lower` does on any machine), keeps each Pallas kernel's Triton IR, compiles it
with the `triton` package for sm_90 and prints ptxas' resource use per kernel (registers,
local memory = spills). A kernel that fails here will fail on the GPU; one that passes can
still fail there (XLA compiles with the Triton inside jaxlib, not this one). Needs
`pip install triton` (not a project dependency); hooks a private JAX function
(`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`) to read the IR, so it may
need mending across JAX versions. Run from the repository root:

    TRITON_DEFAULT_FP_FUSION=1 .venv/bin/python bench/triton_check.py --dtype float32 --batch 1
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import triton
from jax._src.pallas.triton import lowering
from triton.backends.compiler import GPUTarget

from rlver_jax.bench.models import model_config
from rlver_jax.kernels.gpu import decode as gpu_decode
from rlver_jax.models.decode_step import decode_weights
from rlver_jax.models.kv_cache import as_bits, init_cache
from rlver_jax.models.transformer import param_shapes


def triton_modules(model: str, dtype: str, batch: int, cache_len: int) -> dict[str, str]:
    """The Triton IR (text) of each kernel of one layer's fused decode step, by kernel name."""
    config = model_config(model).replace(num_layers=1, dtype=dtype, param_dtype=dtype)
    found: dict[str, str] = {}
    lower = lowering.lower_jaxpr_to_triton_module

    def keep(*args: object, **kwargs: object) -> object:
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm()
        found[re.search(r"tt.func public @(\w+)", text).group(1)] = text  # type: ignore[union-attr]
        return result

    lowering.lower_jaxpr_to_triton_module = keep
    try:
        weights = jax.eval_shape(lambda p: decode_weights(p, config), param_shapes(config))
        cache = jax.eval_shape(
            lambda: as_bits(init_cache(config, batch, cache_len, per_layer=True))
        )
        ids = jax.ShapeDtypeStruct((batch,), jnp.int32)

        def step(w: object, t: jax.Array, p: jax.Array, c: object) -> object:
            return gpu_decode.decode_step(w, t, p, c, config, interpret=False)  # type: ignore[arg-type]

        jax.jit(step).trace(weights, ids, ids, cache).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a shape `bench sample --model` knows")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-len", type=int, default=384, help="prompt 256 + 128 new tokens")
    args = ap.parse_args()
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    print(f"{args.model} shape, {args.dtype}, batch {args.batch}, cache {args.cache_len}; "
          f"triton {triton.__version__}, sm_90, {gpu_decode.BLOCKS}")  # fmt: skip
    for name, text in sorted(
        triton_modules(args.model, args.dtype, args.batch, args.cache_len).items()
    ):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, f"{name}.ttir")
            with open(src, "w") as f:
                f.write(text)
            options = {"num_warps": gpu_decode.BLOCKS.num_warps, "num_stages": 1}
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run(
                [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        regs = re.search(r"REG:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        seconds = time.perf_counter() - t0
        print(f"{name:20s} registers {regs and regs.group(1)}, local (spill) bytes "
              f"{local and local.group(1)}, compiled in {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
