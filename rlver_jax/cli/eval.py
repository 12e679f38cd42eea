"""`rlver-jax eval --config X [--checkpoint DIR | --hf DIR] [key=value ...]`: the benchmark.

Plays every TEST profile once under the SAGE protocol (emotion starts at 40, the profile's
`first_talk` opens, at most 10 policy turns; see `eval.sentient`) with the policy taken from a
training checkpoint (`--checkpoint`), a HF directory (`--hf`) or the config's own `model`, and
writes `transcripts.jsonl`, `capability.jsonl`, `summary.json` and `emotion_trajectories.png`
under `--out` (default `<output_dir>/eval`); prints the summary's headline numbers. The work is
`eval.run.run_eval`; this module parses the arguments. Config errors (and a `--batch-size` the
sampler's buckets cannot hold) exit 2 with one line naming the keys.

Capability judge (`--judge`): "reference" (lexicon rates, `eval.capability`), "llm" (the
config's `user.model` reads each dialogue per dimension), "none", or "auto" (= "reference" with
the reference user, "llm" with an LLM user).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rlver_jax.config_io import ConfigError
from rlver_jax.eval.run import JUDGES, headline, run_eval
from rlver_jax.policy_checkpoint import resolve_checkpoint_dir
from rlver_jax.run_config import load_run_config


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlver-jax eval", description=__doc__)
    parser.add_argument("--config", help="a RunConfig YAML (default: the checkpoint's config)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="training run / checkpoints / step directory")
    src.add_argument("--hf", help="a HF checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default last)")
    parser.add_argument("--out", help="output directory (default <output_dir>/eval)")
    parser.add_argument("--limit", type=int, default=None, help="first N test profiles only")
    parser.add_argument("--batch-size", type=int, default=None, help="dialogues per rollout")
    parser.add_argument("--judge", default="auto", choices=JUDGES, help="capability judge")
    parser.add_argument("--label", default=None, help="name of the model in the summary")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(list(argv))

    config = args.config
    if config is None:
        if args.checkpoint is None:
            parser.error("--config is required unless --checkpoint is given")
        config = resolve_checkpoint_dir(args.checkpoint)[0].parent / "config.yaml"
    try:
        cfg = load_run_config(config, args.overrides, training=False)
        summary = run_eval(
            cfg, out_dir=args.out, checkpoint=args.checkpoint, step=args.step, hf=args.hf,
            limit=args.limit, batch_size=args.batch_size, judge=args.judge, label=args.label,
        )  # fmt: skip
    except ConfigError as err:
        parser.exit(2, f"rlver-jax eval: config error: {err}\n")
    print(headline(summary))
    if "capability" in summary:
        caps = {v["name"]: round(v["mean"], 3) for v in summary["capability"].values()}
        print("capability:", json.dumps(caps, ensure_ascii=False))
    print(f"wrote {args.out or Path(cfg.output_dir) / 'eval'}")
    return 0
