"""The benchmark of one policy (`run_eval`): load it, play the test profiles, judge, write.

The policy comes from a training checkpoint (`checkpoint`: its params restored by
`policy_checkpoint.load_checkpoint_policy`, with its saved model spec), a HF directory (`hf`) or the
config's own `model`. The scaffold, simulated user, sampling and dynamics come from the config.
Every TEST profile is played once under the SAGE protocol (`eval.sentient`); the results
(`transcripts.jsonl`, `capability.jsonl`, `summary.json`, `emotion_trajectories.png`) go to
`out_dir` (default `<output_dir>/eval`).

Evaluation never trains: it builds no training samples, so the config's training buckets
(`rollout.seq_len_buckets`, `learner.seq_buckets`) play no part in it.

Capability judge (`judge`): "reference" (lexicon rates, `eval.capability`), "llm" (the
config's `user.model` reads each dialogue per dimension), "none", or "auto" (= "reference" with
the reference user, "llm" with an LLM user).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

from jax.sharding import Mesh

from rlver_jax import components
from rlver_jax.env.llm_user import LLMUser
from rlver_jax.eval.capability import (
    CapabilityJudge,
    LLMCapabilityJudge,
    ReferenceCapabilityJudge,
)
from rlver_jax.eval.sentient import benchmark_rollout_config, evaluate
from rlver_jax.model_io.loader import load_model
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.models.sharding import param_shardings
from rlver_jax.policy_checkpoint import load_checkpoint_policy
from rlver_jax.run_config import RunConfig
from rlver_jax.sampling.sampler import Sampler

JudgeKind = Literal["auto", "reference", "llm", "none"]
JUDGES: tuple[str, ...] = ("auto", "reference", "llm", "none")


def build_capability_judge(
    kind: JudgeKind, cfg: RunConfig, policy_tokenizer: Tokenizer, user: Any, mesh: Mesh
) -> CapabilityJudge | None:
    """The capability judge named by `kind` (None for "none"; see the module docstring). The
    LLM judge reuses an LLM user's model when there is one, else loads `cfg.user.model`."""
    if kind == "auto":
        kind = "reference" if cfg.user.kind == "reference" else "llm"
    lang = cfg.scaffold.language
    if kind == "none":
        return None
    if kind == "reference":
        return ReferenceCapabilityJudge(policy_tokenizer, language=lang)
    if kind != "llm":
        raise ValueError(f"judge: expected one of {JUDGES}, got {kind!r}")
    if isinstance(user, LLMUser):
        params, config, tok = user.params, user.model_config, user.tokenizer
    else:
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
    if checkpoint is not None and hf is not None:
        raise ValueError("give a checkpoint or a HF directory, not both")
    # Checked first (the sampler's buckets against --batch-size): a ConfigError before loading.
    eval_cfg = dataclasses.replace(cfg, rollout=benchmark_rollout_config(cfg.rollout, batch_size))
    mesh = components.build_mesh(cfg)
    t0 = time.perf_counter()
    source: dict[str, Any]
    if checkpoint is not None:
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
