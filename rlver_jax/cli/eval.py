"""`rlver-jax eval --config X [--checkpoint DIR | --hf DIR] [key=value ...]`: the benchmark.

Plays every TEST profile once under the SAGE protocol (emotion starts at 40, the profile's
`first_talk` opens, at most 10 policy turns; see `eval.sentient`) with the policy taken from a
training checkpoint (`--checkpoint`, its params restored by `export_cli.load_checkpoint_policy`
and its saved model spec), a HF directory (`--hf`) or the config's own `model`. The scaffold,
simulated user, sampling and dynamics come from the config (plus overrides). Writes
`transcripts.jsonl`, `capability.jsonl`, `summary.json` and `emotion_trajectories.png` under
`--out` (default `<output_dir>/eval`) and prints the summary's headline numbers.

Capability judge (`--judge`): "reference" (lexicon rates, `eval.capability`), "llm" (the
config's `user.model` reads each dialogue per dimension), "none", or "auto" (= "reference" with
the reference user, "llm" with an LLM user).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rlver_jax.run_config import RunConfig

JudgeKind = Literal["auto", "reference", "llm", "none"]
JUDGES: tuple[str, ...] = ("auto", "reference", "llm", "none")


def build_capability_judge(
    kind: JudgeKind, cfg: RunConfig, policy_tokenizer: Any, user: Any, mesh: Any
) -> Any:
    """The capability judge named by `kind` (None for "none"; see the module docstring). The
    LLM judge reuses an LLM user's model when there is one, else loads `cfg.user.model`."""
    from rlver_jax.eval.capability import LLMCapabilityJudge, ReferenceCapabilityJudge

    if kind == "auto":
        kind = "reference" if cfg.user.kind == "reference" else "llm"
    lang = cfg.scaffold.language
    if kind == "none":
        return None
    if kind == "reference":
        return ReferenceCapabilityJudge(policy_tokenizer, language=lang)
    if kind != "llm":
        raise ValueError(f"--judge: expected one of {JUDGES}, got {kind!r}")
    from rlver_jax.env.llm_user import LLMUser

    if isinstance(user, LLMUser):
        params, config, tok = user.params, user.model_config, user.tokenizer
    else:
        from rlver_jax.model_io.loader import load_model
        from rlver_jax.models.sharding import param_shardings

        params, config, tok = load_model(cfg.user.model, lambda c: param_shardings(c, mesh))
    return LLMCapabilityJudge(params, config, tok, language=lang, mesh=mesh)


def run_eval(
    cfg: RunConfig,
    *,
    out_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    step: int | None = None,
    hf: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    judge: JudgeKind = "auto",
    label: str | None = None,
    bootstrap_samples: int = 2000,
) -> dict[str, Any]:
    """Evaluate a policy on the test profiles (see the module docstring); returns the summary
    written to `out_dir/summary.json`, which also records the policy's source."""
    from rlver_jax import components
    from rlver_jax.eval.sentient import benchmark_rollout_config, evaluate
    from rlver_jax.sampling.sampler import Sampler

    if checkpoint is not None and hf is not None:
        raise ValueError("give --checkpoint or --hf, not both")
    mesh = components.build_mesh(cfg)
    t0 = time.perf_counter()
    source: dict[str, Any]
    if checkpoint is not None:
        from rlver_jax.cli.export import load_checkpoint_policy

        policy = load_checkpoint_policy(checkpoint, step, mesh)
        params, mcfg, tok = policy.params, policy.model_config, policy.tokenizer
        sampler = Sampler(
            mcfg, mesh=mesh, pad_id=tok.pad_id, stop_token_ids=tok.stop_token_ids,
            sampler_config=cfg.sampler, seed=cfg.seed,
        )  # fmt: skip
        source = {"kind": "checkpoint", "path": str(policy.directory), "step": policy.step}
    else:
        spec = cfg.model
        if hf is not None:
            spec = dataclasses.replace(cfg.model, source="hf", path=str(hf))
        params, mcfg, tok, sampler = components.build_policy(spec, mesh, cfg)
        source = {"kind": spec.source, "path": spec.path}
    user = components.build_user(cfg, mesh, tok)
    eval_cfg = dataclasses.replace(cfg, rollout=benchmark_rollout_config(cfg.rollout, batch_size))
    engine = components.build_engine(eval_cfg, sampler, tok, user)
    profiles = components.load_split(cfg, "test")
    profiles = profiles[:limit] if limit else profiles
    capability_judge = build_capability_judge(judge, cfg, tok, user, mesh)
    load_s = time.perf_counter() - t0
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "eval"
    return evaluate(
        engine, params, profiles, out,
        seed=cfg.seed, judge=capability_judge, label=label or cfg.name,
        bootstrap_samples=bootstrap_samples,
        extra={"policy": source, "user": cfg.user.kind, "load_s": load_s},
    )  # fmt: skip


def headline(summary: dict[str, Any]) -> str:
    """One line: score, success and failure rates, turns."""
    return (
        f"{summary['label']} ({summary['scaffold']}): score {summary['score']:.2f}, "
        f"success {100 * summary['success_rate']:.1f}%, failure "
        f"{100 * summary['failure_rate']:.1f}%, turns {summary['turns_mean']:.2f}, "
        f"n={summary['n']}"
    )


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

    from rlver_jax.run_config import load_run_config

    config = args.config
    if config is None:
        if args.checkpoint is None:
            parser.error("--config is required unless --checkpoint is given")
        from rlver_jax.cli.export import resolve_checkpoint_dir

        config = resolve_checkpoint_dir(args.checkpoint)[0].parent / "config.yaml"
    cfg = load_run_config(config, args.overrides)
    summary = run_eval(
        cfg, out_dir=args.out, checkpoint=args.checkpoint, step=args.step, hf=args.hf,
        limit=args.limit, batch_size=args.batch_size, judge=args.judge, label=args.label,
    )  # fmt: skip
    print(headline(summary))
    if "capability" in summary:
        caps = {v["name"]: round(v["mean"], 3) for v in summary["capability"].values()}
        print("capability:", json.dumps(caps, ensure_ascii=False))
    print(f"wrote {args.out or Path(cfg.output_dir) / 'eval'}")
    return 0
