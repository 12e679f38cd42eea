"""`rlver-jax export --checkpoint DIR --out HFDIR [--step N]`: a trained policy -> HF directory
(`policy_checkpoint.export_checkpoint`; DIR: a run's output directory, its `checkpoints/` or
one `checkpoints/<step>`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rlver_jax.policy_checkpoint import export_checkpoint


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlver-jax export", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoints or step directory")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default last)")
    args = parser.parse_args(list(argv))
    out = export_checkpoint(args.checkpoint, args.out, args.step)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
