"""Bytes the policy sampler's decode loop all-gathers per decoded token, learner layout vs the
rollout layout, for a real shape on fake devices (nothing is materialised: XLA compiles the
decode program from abstract inputs, `Sampler.trace_programs`).

    .venv/bin/python bench/rollout_collectives.py --devices 16 --model qwen2.5-7b --fsdp 16

The decode program is one `lax.while_loop` whose body is one token: the collectives inside it
are those of one decoded token (`parallel.collectives`: a scanned layer's x its trip count).
"""

from __future__ import annotations

import os
import sys

if "--devices" in sys.argv:  # fake CPU devices: set before jax starts
    _n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_n} " + os.environ.get(
        "XLA_FLAGS", ""
    )

import argparse
import json
import time

import jax

from rlver_jax.bench.models import model_config
from rlver_jax.parallel import MeshConfig, make_mesh
from rlver_jax.parallel.collectives import collective_traffic
from rlver_jax.parallel.rules import DEFAULT_RULES, ROLLOUT_RULES
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.sampling.sampler import Sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, help="fake CPU devices (XLA_FLAGS, set at start)")
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    config = model_config(args.model).replace(dtype="bfloat16", param_dtype="float32")
    mesh = make_mesh(MeshConfig(data=1, fsdp=args.fsdp, tensor=args.tensor))
    weights_bf16 = config.num_params() * 2
    sc = SamplerConfig(prompt_buckets=(args.prompt,), batch_buckets=(args.batch,),
                       new_token_buckets=(args.new_tokens,), decode="scan")  # fmt: skip
    rows = []
    for layout, rules in (("learner (FSDP)", DEFAULT_RULES), ("rollout", ROLLOUT_RULES)):
        t0 = time.perf_counter()
        sampler = Sampler(config, mesh=mesh, sampler_config=sc, rules=rules)
        traced = sampler.trace_programs(args.batch, args.prompt, args.new_tokens)["decode"]
        compiled = traced.lower().compile()
        per_token = collective_traffic(compiled.as_text()).per_iteration
        mem = compiled.memory_analysis()
        row = {
            "layout": layout, "model": args.model, "devices": mesh.devices.size,
            "mesh": dict(mesh.shape), "batch": args.batch, "prompt": args.prompt,
            "new_tokens": args.new_tokens, "collective_bytes_per_token": per_token,
            "total_bytes_per_token": sum(per_token.values()),
            "x_bf16_weights": sum(per_token.values()) / weights_bf16,
            "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
            "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "compile_s": time.perf_counter() - t0,
        }  # fmt: skip
        rows.append(row)
        print(f"{layout:>15}: {row['total_bytes_per_token'] / 1e9:.3f} GB per decoded token "
              f"per device ({row['x_bf16_weights']:.4f} x the policy's bf16 weights, "
              f"{weights_bf16 / 1e9:.1f} GB); {per_token}; compiled in {row['compile_s']:.0f} s",
              flush=True)  # fmt: skip
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"kind": "collectives", "argv": sys.argv[1:],
                       "jax": jax.__version__, "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
