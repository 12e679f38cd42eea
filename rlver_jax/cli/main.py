"""`rlver-jax` command line: one subcommand per job; each imports its module lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence


def _lazy(module: str) -> Callable[[Sequence[str]], int]:
    """A command that imports `module` when it runs and calls its `main(argv)`."""

    def run(argv: Sequence[str]) -> int:
        return importlib.import_module(module).main(argv)

    return run


_BENCHES = {
    "sample": "rlver_jax.bench.sample_bench",
    "train": "rlver_jax.bench.train_bench",
    "rollout": "rlver_jax.bench.rollout_bench",
}


def _bench(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlver-jax bench")
    parser.add_argument("what", choices=list(_BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args(argv)
    importlib.import_module(_BENCHES[args.what]).main(list(rest))
    return 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "chat": (
        _lazy("rlver_jax.cli.chat"),
        "one chat turn with a model (default: SmolLM2-135M-Instruct, offline)",
    ),
    "rollout": (
        _lazy("rlver_jax.cli.rollout"),
        "roll out dialogues with a config and print the transcripts",
    ),
    "train": (
        _lazy("rlver_jax.cli.train"),
        "PPO / GRPO training from a config (resumes from its checkpoints)",
    ),
    "bench": (_bench, "benchmarks: `bench sample | train | rollout`"),
    "eval": (
        _lazy("rlver_jax.cli.eval"),
        "benchmark a policy on the test profiles (SAGE protocol + capability)",
    ),
    "experiment": (
        _lazy("rlver_jax.eval.experiment"),
        "think vs plain: `experiment scaffold` trains, evaluates, reports",
    ),
    "export": (
        _lazy("rlver_jax.cli.export"),
        "a training checkpoint -> a HF directory (weights, config, tokenizer)",
    ),
    "plan": (
        _lazy("rlver_jax.cli.plan"),
        "per-device memory of a config on a mesh, before launch (exit 2: no fit)",
    ),
    "config": (
        _lazy("rlver_jax.cli.config"),
        "`config show`: a config resolved, with each field's default and doc",
    ),
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
