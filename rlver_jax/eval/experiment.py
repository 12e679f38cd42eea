"""`rlver-jax experiment scaffold --config X [key=value ...]`: think vs plain under one reward.

RLVER's key experiment (spec §5.2-5.4): the same config, seed and reward train a think-then-say
arm and a plain arm; both and the untrained base model are benchmarked, and the report shows
that thinking helps empathy and insight while plain helps solutions (at full scale).

    <out>/think, <out>/plain     training runs (`trainer.train`: metrics.jsonl, checkpoints)
    <out>/eval/{base,think,plain} benchmark results (`eval.run.run_eval`: summary.json, ...)
    <out>/report/                README.md (the summary), reward_curves.png, sentient_scores.md,
                                 capability.md, capability_radar.png, differences.md,
                                 examples.md, report.json (every number shown)

The report is built from the runs' own files only (`write_report` reads metrics.jsonl,
summary.json, capability.jsonl and transcripts.jsonl), so it can be rebuilt without rerunning
anything (`--report-only`). Differences between arms are paired over dialogues (the same test
profiles in the same order) with seeded bootstrap intervals.

The training limits (`run_config.check_training_lengths`) are checked before the first arm
trains; the evaluations build no training samples and need none of the training buckets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlver_jax.config_io import ConfigError
from rlver_jax.eval import report
from rlver_jax.eval.capability import DIMENSIONS
from rlver_jax.eval.run import JUDGES, run_eval
from rlver_jax.eval.sentient import (
    CAPABILITY_FILE,
    SUMMARY_FILE,
    TRANSCRIPTS_FILE,
    read_jsonl,
    write_json,
)
from rlver_jax.eval.stats import Interval, bootstrap_diff_ci
from rlver_jax.run_config import RunConfig, check_training_lengths, load_run_config

ARMS: tuple[str, ...] = ("think", "plain")
MODELS: tuple[str, ...] = ("base", *ARMS)
REWARD_KEY = "reward/mean"  # trainer.REWARD_KEY: the mean reward of a step's rollouts
METRICS_FILE = "metrics.jsonl"
REPORT_DIR = "report"
_EVAL_KEYS = ("label", "scaffold", "n", "score", "success_rate", "failure_rate", "successes")
_EVAL_KEYS += ("failures", "turns_mean", "end_reasons", "context_full", "capability_judge")
_EVAL_KEYS += ("policy",)


def arm_config(cfg: RunConfig, mode: str, out_dir: str | Path) -> RunConfig:
    """`cfg` with scaffold mode `mode`, output under `out_dir/mode`, name suffixed; seed,
    reward, user and everything else unchanged."""
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-{mode}",
        output_dir=str(Path(out_dir) / mode),
        scaffold=dataclasses.replace(cfg.scaffold, mode=mode),  # type: ignore[arg-type]
    )


def run_scaffold_experiment(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    eval_limit: int | None = None,
    eval_batch_size: int | None = None,
    judge: str = "auto",
    base_scaffold: str = "plain",
    train: bool = True,
    train_fn: Callable[[RunConfig], Any] | None = None,
    bootstrap_samples: int = 2000,
    examples: int = 2,
    command: str | None = None,
) -> dict[str, Any]:
    """Train both arms (unless `train=False`), evaluate base / think / plain, write the report;
    returns `report.json`'s content. `train_fn` defaults to `trainer.train`."""
    out = Path(out_dir)
    if train:
        check_training_lengths(cfg)  # both arms share the rollout and learner: one check
        if train_fn is None:
            from rlver_jax.trainer import train as train_fn
        for arm in ARMS:
            train_fn(arm_config(cfg, arm, out))
    opts: dict[str, Any] = dict(
        limit=eval_limit, batch_size=eval_batch_size, judge=judge,
        bootstrap_samples=bootstrap_samples,
    )  # fmt: skip
    base_cfg = dataclasses.replace(
        cfg,
        scaffold=dataclasses.replace(cfg.scaffold, mode=base_scaffold),  # type: ignore[arg-type]
    )
    run_eval(base_cfg, out_dir=out / "eval" / "base", label="base", **opts)
    for arm in ARMS:
        run_eval(
            arm_config(cfg, arm, out), out_dir=out / "eval" / arm, label=arm,
            checkpoint=out / arm, **opts,
        )  # fmt: skip
    return write_report(
        out, bootstrap_samples=bootstrap_samples, seed=cfg.seed, examples=examples,
        command=command, title=cfg.name,
    )  # fmt: skip


# --------------------------------------------------------------------------- report
def reward_curve(run_dir: str | Path, key: str = REWARD_KEY) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in a run's metrics.jsonl (records without it are skipped)."""
    from rlver_jax.metrics import read_metrics

    records = read_metrics(Path(run_dir) / METRICS_FILE)
    pairs = [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def training_stats(steps: Sequence[int], values: Sequence[float]) -> dict[str, Any]:
    """Steps, first / last / best reward and the mean over the last quarter of steps."""
    if not values:
        return {"steps": 0}
    tail = values[-max(1, len(values) // 4) :]
    return {
        "steps": int(steps[-1]), "first_reward": float(values[0]),
        "last_reward": float(values[-1]), "max_reward": float(max(values)),
        "tail_mean_reward": float(np.mean(tail)), "tail_steps": len(tail),
    }  # fmt: skip


def _capability_matrix(eval_dir: Path) -> np.ndarray | None:
    """[N, 5] capability scores of an eval directory in dialogue order (None: not judged)."""
    path = eval_dir / CAPABILITY_FILE
    if not path.exists():
        return None
    recs = sorted(read_jsonl(path), key=lambda r: r["dialogue_id"])
    return np.asarray([[r[d] for d in DIMENSIONS] for r in recs], np.float64)


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two evals played the same profiles in the same dialogue order."""
    key = lambda ts: [t["profile_id"] for t in sorted(ts, key=lambda t: t["dialogue_id"])]
    return key(a) == key(b)


def _differences(
    x: str, y: str, evals: dict[str, Any], n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    """Bootstrap intervals of model x minus model y: final emotion and each dimension."""
    tx, ty = evals[x]["transcripts"], evals[y]["transcripts"]
    paired = _paired(tx, ty)
    fx = [t["final_emotion"] for t in sorted(tx, key=lambda t: t["dialogue_id"])]
    fy = [t["final_emotion"] for t in sorted(ty, key=lambda t: t["dialogue_id"])]
    opts = dict(paired=paired, n_boot=n_boot, seed=seed)
    out = {"final_emotion": bootstrap_diff_ci(fx, fy, **opts).as_dict()}  # type: ignore[arg-type]
    cx, cy = evals[x]["capability"], evals[y]["capability"]
    if cx is not None and cy is not None:
        for i, d in enumerate(DIMENSIONS):
            ci = bootstrap_diff_ci(cx[:, i], cy[:, i], **opts)  # type: ignore[arg-type]
            out[d] = ci.as_dict()
    for v in out.values():
        v["paired"] = paired
    return out


def _interval(d: dict[str, Any]) -> Interval:
    """An `Interval` back from its `as_dict()`."""
    return Interval(d["mean"], d["lo"], d["hi"], int(d["n"]), d["level"])


def write_report(
    out_dir: str | Path,
    *,
    bootstrap_samples: int = 2000,
    seed: int = 0,
    examples: int = 2,
    command: str | None = None,
    title: str = "scaffold experiment",
) -> dict[str, Any]:
    """Build `<out_dir>/report/` from the runs' files (see the module docstring)."""
    out = Path(out_dir)
    rep = out / REPORT_DIR
    rep.mkdir(parents=True, exist_ok=True)
    curves = {arm: reward_curve(out / arm) for arm in ARMS if (out / arm / METRICS_FILE).exists()}
    training = {arm: training_stats(*curve) for arm, curve in curves.items()}
    report.plot_reward_curves(curves, rep / "reward_curves.png", ylabel=REWARD_KEY,
                              title=f"{title}: training reward per step")  # fmt: skip
    evals: dict[str, Any] = {}
    for m in MODELS:
        d = out / "eval" / m
        if (d / SUMMARY_FILE).exists():
            evals[m] = {
                "summary": json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8")),
                "transcripts": read_jsonl(d / TRANSCRIPTS_FILE),
                "capability": _capability_matrix(d),
            }
    summaries = {m: e["summary"] for m, e in evals.items()}
    diffs: dict[str, Any] = {}
    pairs = [("think", "plain"), ("think", "base"), ("plain", "base")]
    for i, (x, y) in enumerate(pairs):
        if x in evals and y in evals:
            diffs[f"{x}-{y}"] = _differences(x, y, evals, bootstrap_samples, seed + 101 * i)
    names = {d: v["name"] for s in summaries.values() for d, v in s.get("capability", {}).items()}
    radar = {m: {d: v["mean"] for d, v in s["capability"].items()}
             for m, s in summaries.items() if "capability" in s}  # fmt: skip
    if radar:
        report.radar_chart(radar, rep / "capability_radar.png", names=names,
                           title=f"{title}: capability (1-5)")  # fmt: skip
    tables = {
        "sentient_scores.md": report.sentient_table(summaries),
        "capability.md": report.capability_table(summaries),
        "differences.md": _differences_md(diffs, names),
        "examples.md": _examples_md(evals, examples),
    }
    for name, text in tables.items():
        (rep / name).write_text(text + "\n", encoding="utf-8")
    data = {
        "title": title, "command": command, "reward_key": REWARD_KEY, "training": training,
        "reward_curves": {a: {"steps": s, "values": v} for a, (s, v) in curves.items()},
        "eval": {m: {k: s.get(k) for k in _EVAL_KEYS}
                 | {"capability": {d: v["mean"] for d, v in s.get("capability", {}).items()}}
                 for m, s in summaries.items()},
        "differences": diffs,
    }  # fmt: skip
    write_json(rep / "report.json", data)
    (rep / "README.md").write_text(_summary_md(data, tables, rep, out), encoding="utf-8")
    return data


def _differences_md(diffs: dict[str, Any], names: dict[str, str]) -> str:
    """One difference table per model pair."""
    parts = []
    for pair, values in diffs.items():
        label = {"final_emotion": "Final emotion (Sentient score)"} | names
        table = report.diff_table({k: _interval(v) for k, v in values.items()}, label)
        kind = "paired" if next(iter(values.values()))["paired"] else "unpaired"
        parts.append(f"**{pair.replace('-', ' - ')}** ({kind} bootstrap over dialogues)\n\n{table}")
    return "\n\n".join(parts) or "(not enough models evaluated)"


def _examples_md(evals: dict[str, Any], k: int) -> str:
    """The first `k` test profiles as played by each model (same user, side by side)."""
    parts = []
    for m, e in evals.items():
        ts = sorted(e["transcripts"], key=lambda t: t["dialogue_id"])[:k]
        for t in ts:
            parts.append(f"#### {m}: dialogue {t['dialogue_id']}\n\n{report.dialogue_markdown(t)}")
    return "\n\n".join(parts)


def _summary_md(data: dict[str, Any], tables: dict[str, str], rep: Path, out: Path) -> str:
    """The report's README.md: training, benchmark, capability, differences, examples."""
    rel = lambda p: Path(p).relative_to(out).as_posix()
    lines = [f"# Think vs plain: {data['title']}", ""]
    if data["command"]:
        lines += [f"Command: `{data['command']}`", ""]
    lines += ["## Training reward", "", "![reward curves](reward_curves.png)", ""]
    rows = [
        [arm, t["steps"], f"{t['first_reward']:.4f}", f"{t['last_reward']:.4f}",
         f"{t['max_reward']:.4f}", f"{t['tail_mean_reward']:.4f} (last {t['tail_steps']})"]
        for arm, t in data["training"].items() if t.get("steps")
    ]  # fmt: skip
    header = ["arm", "steps", "first reward", "last reward", "best reward", "tail mean"]
    lines += [report.markdown_table(header, rows), ""]
    lines += ["## Sentient-style benchmark (test profiles, SAGE protocol)", ""]
    lines += [tables["sentient_scores.md"], ""]
    cut = {m: s["context_full"] for m, s in data["eval"].items() if s.get("context_full")}
    if cut:
        counts = ", ".join(f"{m} {n}" for m, n in cut.items())
        lines += [
            "**Caution:** dialogues cut by the prompt limit (CONTEXT_FULL, not a SAGE ending; "
            f"final emotion taken where they stopped): {counts}. Raise "
            "`rollout.max_prompt_tokens` for the full 10-turn protocol.",
            "",
        ]
    for m in data["eval"]:
        lines.append(
            f"![{m} trajectories](../{rel(out / 'eval' / m / 'emotion_trajectories.png')})"
        )
    judges = {s.get("capability_judge") for s in data["eval"].values()} - {None}
    lines += ["", f"## Capability (judge: {', '.join(sorted(judges)) or 'none'})", ""]
    lines += [tables["capability.md"], "", "![capability radar](capability_radar.png)", ""]
    lines += ["## Differences (mean, 95% bootstrap interval; * = excludes 0)", ""]
    lines += [tables["differences.md"], "", "## Example dialogues", "", tables["examples.md"], ""]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlver-jax experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=["scaffold"], help="which experiment")
    parser.add_argument("--config", required=True, help="a RunConfig YAML")
    parser.add_argument("--out", help="experiment directory (default: the config's output_dir)")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N test profiles")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="dialogues per batch")
    parser.add_argument("--judge", default="auto", choices=JUDGES, help="capability judge")
    parser.add_argument("--base-scaffold", default="plain", choices=["plain", "think"])
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--examples", type=int, default=2, help="example dialogues per model")
    parser.add_argument("--skip-train", action="store_true", help="evaluate existing runs")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(list(argv))

    training = not (args.skip_train or args.report_only)
    try:
        cfg = load_run_config(args.config, args.overrides, training=training)
    except ConfigError as err:
        parser.exit(2, f"rlver-jax experiment: config error: {err}\n")
    out = Path(args.out or cfg.output_dir)
    command = "rlver-jax experiment " + shlex.join(list(argv))
    if args.report_only:
        data = write_report(out, bootstrap_samples=args.bootstrap, seed=cfg.seed,
                            examples=args.examples, command=command, title=cfg.name)  # fmt: skip
    else:
        try:
            data = run_scaffold_experiment(
                cfg, out, eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size,
                judge=args.judge, base_scaffold=args.base_scaffold, train=training,
                bootstrap_samples=args.bootstrap, examples=args.examples, command=command,
            )  # fmt: skip
        except ConfigError as err:  # e.g. an --eval-batch-size the sampler cannot hold
            parser.exit(2, f"rlver-jax experiment: config error: {err}\n")
    for m, s in data["eval"].items():
        print(f"{m:>6}: score {s['score']:.2f}  success {100 * s['success_rate']:.1f}%  "
              f"failure {100 * s['failure_rate']:.1f}%")  # fmt: skip
    print(f"report: {out / REPORT_DIR / 'README.md'}")
    return 0
