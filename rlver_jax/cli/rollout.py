"""`rlver-jax rollout --config X.yaml [key=value ...]`: roll out dialogues and print them."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlver-jax rollout", description=__doc__)
    parser.add_argument("--config", required=True, help="a RunConfig YAML file")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--batches", type=int, default=1, help="rollout batches to run")
    parser.add_argument("--quiet", action="store_true", help="print metrics only")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(list(argv))

    from rlver_jax import components
    from rlver_jax.env.rollout import format_transcript, write_transcripts
    from rlver_jax.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    out_dir = Path(cfg.output_dir)
    mesh = components.build_mesh(cfg)
    t0 = time.perf_counter()
    params, _, tok, sampler = components.build_policy(cfg.model, mesh, cfg)
    user = components.build_user(cfg, mesh, tok)
    profiles = components.load_split(cfg, args.split)
    engine = components.build_engine(cfg, sampler, tok, user)
    print(
        f"loaded policy and {cfg.user.kind} user in {time.perf_counter() - t0:.1f}s; "
        f"scaffold={cfg.scaffold.mode}, {len(profiles)} {args.split} profiles"
    )
    B = cfg.rollout.profiles_per_batch
    for k in range(args.batches):
        batch = [profiles[(k * B + i) % len(profiles)] for i in range(B)]
        result = engine.run(params, batch, seed=cfg.seed + k)
        path = write_transcripts(out_dir / "rollouts.jsonl", result.transcripts)
        if not args.quiet:
            for t in result.transcripts:
                print(format_transcript(t))
        print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
    print(f"transcripts: {path}")
    return 0
