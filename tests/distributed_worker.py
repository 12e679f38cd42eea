"""One process of the two-process `jax.distributed` test (run by tests/test_distributed.py).

Each process owns 2 fake CPU devices (XLA_FLAGS set by the parent); together they form one
(data=1, fsdp=2, tensor=2) mesh, so weights are FSDP-sharded across the two processes and every
matmul all-gathers over the process boundary (gloo collectives). The process runs a sharded
forward and a greedy sharded sample and saves both, gathered to host, for the parent to compare
with a single-process run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

# Shapes shared with the parent test (which imports this module for them).
MODEL_KWARGS = {
    "family": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
}
PARAM_SEED = 0
TOKENS = np.arange(4 * 8, dtype=np.int32).reshape(4, 8) % 120 + 3
PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12], [13]]
NEW_TOKENS = 8


def main(argv: list[str] | None = None) -> None:
    import time

    t0 = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlver_jax.parallel import distributed

    assert distributed.initialize(
        args.coordinator, args.num_processes, args.process_id, initialization_timeout=60
    )
    assert distributed.initialize()  # idempotent
    print("init", time.time() - t0, flush=True)
    from rlver_jax.models.config import ModelConfig
    from rlver_jax.models.transformer import forward, init_params, positions_from_mask
    from rlver_jax.parallel.mesh import (
        MeshConfig,
        batch_sharding,
        host_to_global,
        make_mesh,
        param_shardings,
        to_host,
    )
    from rlver_jax.parallel.rules import axis_rules
    from rlver_jax.sampling import Sampler, SamplerConfig

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    config = ModelConfig(**MODEL_KWARGS)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    # One jitted, sharded init: eager ops each compile, which is slow across processes.
    init = jax.jit(init_params, static_argnums=0, out_shardings=param_shardings(config, mesh))
    params = init(config, jax.random.key(PARAM_SEED))
    jax.block_until_ready(params)
    print("shard", time.time() - t0, flush=True)
    row = batch_sharding(mesh, TOKENS.shape)
    tokens = host_to_global(TOKENS, row)
    mask = host_to_global(np.ones(TOKENS.shape, bool), row)

    def fwd(params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return forward(params, tokens, positions_from_mask(mask), mask, config)[0]

    with axis_rules(mesh):
        compiled = jax.jit(fwd).lower(params, tokens, mask).compile()
        print("compile", time.time() - t0, flush=True)
        logits = compiled(params, tokens, mask)
    logits.block_until_ready()
    print("forward", time.time() - t0, flush=True)
    sampler = Sampler(
        config,
        mesh=mesh,
        sampler_config=SamplerConfig(prompt_buckets=(8,), batch_buckets=(4,), new_token_buckets=(8,)),
    )
    out = sampler(params, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
    print("sample", time.time() - t0, flush=True)
    np.savez(
        args.out / f"proc{jax.process_index()}.npz",
        logits=to_host(logits),
        tokens=out.tokens,
        logprobs=out.logprobs,
    )
    print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
