"""Sentient-style benchmark (SAGE protocol, RLVER spec §5.1) on top of the rollout engine.

Protocol: every TEST profile is played once (G = 1) with `RolloutConfig.mode = "eval"`: the
emotion starts at 40, the profile's `first_talk` opens, the policy replies at most 10 times, and
a dialogue also ends on a goodbye, at 100, at 0 and (eval only) below 10 (`EndReason.SCORE_LOW`).

Scoring (pure, `sentient_scores`):

    score        = mean final emotion over the dialogues
    success_rate = share of dialogues with final emotion >= 100 (success_threshold)
    failure_rate = share of dialogues with final emotion <  10  (failure_threshold)

Emotion trajectories (`stats.emotion_matrix`) are padded to a common length by holding each
dialogue's last emotion (a finished dialogue keeps its final score), so the mean trajectory at
turn t averages every dialogue.

The benchmark never trains: it plays dialogues with `RolloutEngine.play`, which builds no
training samples, so its dialogues (up to 10 turns, longer than training's) are bounded only by
`rollout.max_prompt_tokens` (a longer next prompt ends the dialogue, CONTEXT_FULL) and never by
the training buckets (`rollout.seq_len_buckets`, `learner.seq_buckets`).

`evaluate` runs the benchmark for loaded components and `write_eval` writes, under its output
directory: `transcripts.jsonl` (one dialogue per line, emotion trajectory included),
`capability.jsonl` (per-dialogue capability scores, when a judge is given), `summary.json` and
`emotion_trajectories.png`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlver_jax.env import dynamics
from rlver_jax.env.rollout import RolloutConfig, RolloutEngine, write_transcripts
from rlver_jax.eval import report
from rlver_jax.eval.capability import CapabilityJudge, summarize_scores
from rlver_jax.eval.stats import emotion_matrix

if TYPE_CHECKING:
    from rlver_jax.env.profiles import Profile
    from rlver_jax.models.transformer import Params

log = logging.getLogger(__name__)

TRANSCRIPTS_FILE = "transcripts.jsonl"
CAPABILITY_FILE = "capability.jsonl"
SUMMARY_FILE = "summary.json"
TRAJECTORY_PLOT = "emotion_trajectories.png"


# --------------------------------------------------------------------------- pure scoring
def sentient_scores(
    final_emotions: Sequence[float] | np.ndarray,
    success_threshold: int = dynamics.DEFAULT_CONFIG.success_threshold,
    failure_threshold: int = dynamics.DEFAULT_CONFIG.failure_threshold,
) -> dict[str, float | int]:
    """Score (mean final emotion), success / failure counts and rates of a set of dialogues.

    Success is final >= `success_threshold` (exactly 100 counts), failure final <
    `failure_threshold` (exactly 10 does not). Rates are fractions in [0, 1]. An empty input
    raises ValueError.
    """
    final = np.asarray(final_emotions, np.float64).reshape(-1)
    if final.size == 0:
        raise ValueError("sentient_scores: no dialogues")
    successes = int(np.sum(final >= success_threshold))
    failures = int(np.sum(final < failure_threshold))
    return {
        "n": int(final.size),
        "score": float(final.mean()),
        "successes": successes,
        "failures": failures,
        "success_rate": successes / final.size,
        "failure_rate": failures / final.size,
    }


def summarize(
    transcripts: Sequence[dict[str, Any]],
    dyn: dynamics.EmotionDynamicsConfig = dynamics.DEFAULT_CONFIG,
) -> dict[str, Any]:
    """Benchmark summary of finished eval transcripts: `sentient_scores` of the final emotions,
    end reasons, mean turns, mean trajectory (held-last, `max_turns_eval + 1` points), the score
    per hidden intention, and the think-format break rate. `context_full` counts dialogues cut
    because the next prompt exceeded `rollout.max_prompt_tokens` (not a SAGE ending: their
    final emotion is the one reached so far; raise the limit for a faithful benchmark)."""
    finals = [float(t["final_emotion"]) for t in transcripts]
    out: dict[str, Any] = dict(
        sentient_scores(finals, dyn.success_threshold, dyn.failure_threshold)
    )
    out["end_reasons"] = dict(collections.Counter(t["end_reason"] for t in transcripts))
    out["context_full"] = out["end_reasons"].get("CONTEXT_FULL", 0)
    replies = [m for t in transcripts for m in t["messages"] if m["role"] == "assistant"]
    out["turns_mean"] = len(replies) / len(transcripts)
    out["format_break_rate"] = (
        float(np.mean([not m.get("format_ok", True) for m in replies])) if replies else 0.0
    )
    traj = emotion_matrix(transcripts, dynamics.max_turns(dyn, "eval") + 1)
    out["trajectory_mean"] = [round(float(x), 4) for x in traj.mean(axis=0)]
    out["trajectory_std"] = [round(float(x), 4) for x in traj.std(axis=0)]
    by_intention: dict[str, list[float]] = collections.defaultdict(list)
    for t, f in zip(transcripts, finals, strict=True):
        by_intention[str(t.get("intention"))].append(f)
    out["score_by_intention"] = {k: float(np.mean(v)) for k, v in sorted(by_intention.items())}
    return out


# --------------------------------------------------------------------------- running
def benchmark_rollout_config(
    rollout: RolloutConfig, batch_size: int | None = None
) -> RolloutConfig:
    """The rollout settings of the benchmark: mode "eval", one dialogue per profile."""
    return dataclasses.replace(
        rollout,
        mode="eval",
        samples_per_profile=1,
        profiles_per_batch=batch_size or rollout.profiles_per_batch,
    )


def run_benchmark(
    engine: RolloutEngine,
    params: Params,
    profiles: Sequence[Profile],
    *,
    seed: int,
    batch_size: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Play every profile once in batches (`RolloutEngine.play`: no training samples); returns
    (transcripts numbered 0..N-1 in profile order, rollout timings summed over the batches).
    The engine must be in eval mode with G = 1."""
    if engine.config.mode != "eval" or engine.config.samples_per_profile != 1:
        raise ValueError("run_benchmark needs an engine with mode='eval' and samples_per_profile=1")
    size = batch_size or engine.config.profiles_per_batch
    transcripts: list[dict[str, Any]] = []
    timings: dict[str, float] = collections.defaultdict(float)
    for k, start in enumerate(range(0, len(profiles), size)):
        result = engine.play(params, profiles[start : start + size], seed=seed + k)
        for t in result.transcripts:
            t["dialogue_id"] = t["group_id"] = start + int(t["group_id"])
            transcripts.append(t)
        for key, value in result.metrics.items():
            if key.startswith("time/"):
                timings[key] += value
    return transcripts, dict(timings)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented UTF-8 JSON (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def evaluate(
    engine: RolloutEngine,
    params: Params,
    profiles: Sequence[Profile],
    out_dir: str | Path,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    judge: CapabilityJudge | None = None,
    label: str = "policy",
    extra: dict[str, Any] | None = None,
    bootstrap_samples: int = 2000,
) -> dict[str, Any]:
    """Run the benchmark (`run_benchmark`) and write its results (`write_eval`)."""
    t0 = time.perf_counter()
    transcripts, timings = run_benchmark(engine, params, profiles, seed=seed, batch_size=batch_size)
    return write_eval(
        out_dir, transcripts, dyn=engine.dynamics, scaffold=engine.scaffold.mode, label=label,
        judge=judge, seed=seed, timings={"rollout_s": time.perf_counter() - t0, **timings},
        extra=extra, bootstrap_samples=bootstrap_samples,
    )  # fmt: skip


def write_eval(
    out_dir: str | Path,
    transcripts: Sequence[dict[str, Any]],
    *,
    dyn: dynamics.EmotionDynamicsConfig = dynamics.DEFAULT_CONFIG,
    scaffold: str = "",
    label: str = "policy",
    judge: CapabilityJudge | None = None,
    seed: int = 0,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    bootstrap_samples: int = 2000,
) -> dict[str, Any]:
    """Write transcripts, capability scores (when `judge` is given), summary and plot of
    finished benchmark dialogues under `out_dir`.

    Returns the summary (also `out_dir/summary.json`): `summarize`'s fields, plus `label`,
    `scaffold`, `capability` (per dimension: mean, bootstrap CI, argmax mean) and
    `capability_judge` when judged, `timings`, `files` (relative names) and the caller's `extra`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRANSCRIPTS_FILE).unlink(missing_ok=True)
    write_transcripts(out / TRANSCRIPTS_FILE, transcripts)
    summary: dict[str, Any] = {"label": label, "scaffold": scaffold}
    summary |= summarize(transcripts, dyn)
    summary["timings"] = dict(timings or {})
    files = {"transcripts": TRANSCRIPTS_FILE, "plot": TRAJECTORY_PLOT}
    if judge is not None:
        t1 = time.perf_counter()
        scores = judge.score(transcripts)
        summary["timings"]["capability_s"] = time.perf_counter() - t1
        records = scores.records([t["dialogue_id"] for t in transcripts])
        (out / CAPABILITY_FILE).unlink(missing_ok=True)
        write_transcripts(out / CAPABILITY_FILE, records)
        summary["capability"] = summarize_scores(scores, n_boot=bootstrap_samples, seed=seed)
        summary["capability_judge"] = judge.name
        files["capability"] = CAPABILITY_FILE
    report.plot_emotion_trajectories(
        transcripts,
        out / TRAJECTORY_PLOT,
        length=dynamics.max_turns(dyn, "eval") + 1,
        title=f"{label}: emotion trajectories (score {summary['score']:.1f})",
    )
    if summary["context_full"]:
        log.warning(
            "%s: %d of %d dialogues ended because the prompt outgrew rollout.max_prompt_tokens "
            "(CONTEXT_FULL); raise it for the full 10-turn protocol",
            label, summary["context_full"], summary["n"],
        )  # fmt: skip
    summary["files"] = files
    if extra:
        summary |= extra
    write_json(out / SUMMARY_FILE, summary)
    return summary
