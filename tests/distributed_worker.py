"""One process of the two-process `jax.distributed` test (run by tests/test_distributed.py).

Each process owns 2 fake CPU devices (XLA_FLAGS set by the parent); together they form one
(data=1, fsdp=2, tensor=2) mesh, so weights are FSDP-sharded across the two processes and every
matmul all-gathers over the process boundary (gloo collectives). The process runs a sharded
forward (and with --sample a greedy sharded sample) and saves the results, gathered to host,
for the parent to compare with a single-process run.

Weights come from numpy, not `init_params`: jitting the threefry-heavy initialiser as one SPMD
program takes ~30 s to compile on a small CPU, and eager ops each compile separately.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Shared with the parent test, which imports this module.
MODEL_KWARGS: dict[str, Any] = {
    "family": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
}
TOKENS = (np.arange(4 * 8, dtype=np.int32).reshape(4, 8) * 7) % 120 + 3
PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12], [13]]
NEW_TOKENS = 8


def host_params(config: Any, seed: int = 0) -> dict[str, Any]:
    """Deterministic numpy weights (N(0, 0.2), unit norms) in the params pytree layout."""
    from rlver_jax.models.transformer import param_shapes

    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaves = [
        np.ones(s.shape, np.float32)
        if "norm" in jax.tree_util.keystr(p)
        else rng.normal(0.0, 0.2, s.shape).astype(np.float32)
        for p, s in paths
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sample", action="store_true", help="also run a sharded greedy sample")
    args = ap.parse_args(argv)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlver_jax.parallel import distributed

    assert distributed.initialize(
        args.coordinator, args.num_processes, args.process_id, initialization_timeout=60
    )
    assert distributed.initialize()  # idempotent: a second call is a no-op
    from rlver_jax.models.config import ModelConfig
    from rlver_jax.models.sharding import param_shardings
    from rlver_jax.models.transformer import forward, positions_from_mask
    from rlver_jax.parallel.mesh import (
        MeshConfig,
        batch_sharding,
        host_to_global,
        make_mesh,
        shard_params,
        to_host,
    )
    from rlver_jax.parallel.rules import axis_rules

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    config = ModelConfig(**MODEL_KWARGS)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    p_shard = param_shardings(config, mesh)
    params = shard_params(host_params(config), p_shard)
    row = batch_sharding(mesh, TOKENS.shape)
    tokens = host_to_global(TOKENS, row)
    mask = host_to_global(np.ones(TOKENS.shape, bool), row)

    def fwd(params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return forward(params, tokens, positions_from_mask(mask), mask, config)[0]

    with axis_rules(mesh):
        fwd_jit = jax.jit(fwd, in_shardings=(p_shard, row, row))
        logits = fwd_jit(params, tokens, mask)
    results = {"logits": to_host(logits)}
    if args.sample:
        from rlver_jax.sampling.sampler import Sampler, SamplerConfig

        buckets = SamplerConfig(prompt_buckets=(8,), batch_buckets=(4,), new_token_buckets=(8,))
        sampler = Sampler(config, mesh=mesh, sampler_config=buckets)
        out = sampler(params, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)
        results |= {"tokens": out.tokens, "logprobs": out.logprobs}
    np.savez(args.out / f"proc{jax.process_index()}.npz", **results)
    print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
