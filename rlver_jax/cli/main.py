"""`rlver-jax` command line: one subcommand per job; each imports its module lazily."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _chat(argv: Sequence[str]) -> int:
    from rlver_jax.cli.chat import main

    return main(argv)


def _bench(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlver-jax bench")
    parser.add_argument(
        "what", choices=["sample", "train", "rollout"], help="which benchmark to run"
    )
    args, rest = parser.parse_known_args(argv)
    if args.what == "sample":
        from rlver_jax.bench.sample_bench import main
    elif args.what == "train":
        from rlver_jax.bench.train_bench import main
    else:
        from rlver_jax.bench.rollout_bench import main
    main(list(rest))
    return 0


def _rollout(argv: Sequence[str]) -> int:
    from rlver_jax.cli.rollout import main

    return main(argv)


def _eval(argv: Sequence[str]) -> int:
    from rlver_jax.cli.eval import main

    return main(argv)


def _experiment(argv: Sequence[str]) -> int:
    from rlver_jax.eval.experiment import main

    return main(argv)


def _export(argv: Sequence[str]) -> int:
    from rlver_jax.cli.export import main

    return main(argv)


def _train(argv: Sequence[str]) -> int:
    from rlver_jax.cli.train import main

    return main(argv)


def _plan(argv: Sequence[str]) -> int:
    from rlver_jax.cli.plan import main

    return main(argv)


def _config(argv: Sequence[str]) -> int:
    from rlver_jax.cli.config import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "chat": (_chat, "one chat turn with a model (default: SmolLM2-135M-Instruct, offline)"),
    "rollout": (_rollout, "roll out dialogues with a config and print the transcripts"),
    "train": (_train, "PPO / GRPO training from a config (resumes from its checkpoints)"),
    "bench": (_bench, "benchmarks: `bench sample | train | rollout`"),
    "eval": (_eval, "benchmark a policy on the test profiles (SAGE protocol + capability)"),
    "experiment": (_experiment, "think vs plain: `experiment scaffold` trains, evaluates, reports"),
    "export": (_export, "a training checkpoint -> a HF directory (weights, config, tokenizer)"),
    "plan": (_plan, "per-device memory of a config on a mesh, before launch (exit 2: no fit)"),
    "config": (_config, "`config show`: a config resolved, with each field's default and doc"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: rlver-jax <command> [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    handler, _ = COMMANDS[argv[0]]
    return handler(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
