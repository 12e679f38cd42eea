"""`rlver-jax train --config X.yaml [key=value ...]`: PPO / GRPO training (resumes by itself).

    rlver-jax train --config configs/tiny_cpu.yaml                       # think arm, PPO
    rlver-jax train --config configs/tiny_cpu.yaml scaffold.mode=plain learner.algorithm=grpo \\
        rollout.samples_per_profile=4 output_dir=runs/tiny_grpo_plain

Rerunning the same command continues from the latest checkpoint in `output_dir` (exactly: data
position, RNG and optimiser state are restored). SIGTERM / Ctrl-C save a checkpoint and exit 0;
rerun to continue. Unknown keys or bad values fail before any work, naming the key.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """Parse the arguments, load the config, train, print a one-line summary; exit status."""
    parser = argparse.ArgumentParser(prog="rlver-jax train", description=__doc__)
    parser.add_argument("--config", required=True, help="a RunConfig YAML file")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(list(argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from rlver_jax.config_io import ConfigError
    from rlver_jax.run_config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"rlver-jax train: config error: {err}\n")

    from rlver_jax.trainer import train

    summary = train(cfg)
    rewards = " ".join(f"{r:.3f}" for r in summary.rewards)
    status = "preempted (rerun to resume)" if summary.preempted else "done"
    print(
        f"{status}: steps {summary.start_step}->{summary.final_step} in {summary.wall_s:.1f}s; "
        f"checkpoints {list(summary.checkpoints)}; outputs in {summary.output_dir}\n"
        f"reward per step: {rewards}"
    )
    return 0
