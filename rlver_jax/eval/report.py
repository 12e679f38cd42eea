"""Report building blocks: Markdown tables and PNG plots (the statistics are `eval.stats`).

Tables show `stats.Interval`s (a mean with its seeded bootstrap interval). Plots use
matplotlib's Agg backend (no display needed): emotion trajectories (mean +- one standard
deviation band plus a thin line per dialogue), reward curves of training runs, and a capability
radar chart (one polygon per model over the five dimensions, axis 1-5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlver_jax.eval.stats import Interval, emotion_matrix


# --------------------------------------------------------------------------- tables
def fmt_ci(ci: Mapping[str, Any] | Interval, digits: int = 2) -> str:
    """ "m [lo, hi]" of an `Interval` or its `as_dict()`."""
    d = ci.as_dict() if isinstance(ci, Interval) else ci
    return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sentient_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Sentient-style scores per model (from eval summaries): score, success, failure, turns,
    and how the dialogues ended."""
    rows = [
        [
            label, s.get("scaffold", ""), f"{s['score']:.2f}",
            f"{100 * s['success_rate']:.1f}% ({s['successes']})",
            f"{100 * s['failure_rate']:.1f}% ({s['failures']})",
            f"{s['turns_mean']:.2f}", s["n"],
            ", ".join(f"{k} {v}" for k, v in sorted(s.get("end_reasons", {}).items())),
        ]
        for label, s in summaries.items()
    ]  # fmt: skip
    header = ["model", "scaffold", "score", "success", "failure", "turns", "dialogues", "endings"]
    return markdown_table(header, rows)


def capability_table(summaries: Mapping[str, Mapping[str, Any]], digits: int = 2) -> str:
    """Mean capability score per dimension and model, with bootstrap intervals."""
    with_cap = {k: s["capability"] for k, s in summaries.items() if "capability" in s}
    if not with_cap:
        return "(no capability scores)"
    dims = list(next(iter(with_cap.values())))
    names = [next(iter(with_cap.values()))[d]["name"] for d in dims]
    rows = [[label, *(fmt_ci(cap[d], digits) for d in dims)] for label, cap in with_cap.items()]
    return markdown_table(["model", *names], rows)


def diff_table(diffs: Mapping[str, Interval], names: Mapping[str, str], digits: int = 3) -> str:
    """Per-dimension differences (e.g. think - plain) with intervals; '*' when 0 is outside."""
    rows = []
    for key, ci in diffs.items():
        sig = "*" if ci.lo > 0 or ci.hi < 0 else ""
        rows.append([names.get(key, key), f"{ci.mean:+.{digits}f}{sig}",
                     f"[{ci.lo:+.{digits}f}, {ci.hi:+.{digits}f}]", ci.n])  # fmt: skip
    return markdown_table(["dimension", "difference", f"{100 * _level(diffs):.0f}% CI", "n"], rows)


def _level(diffs: Mapping[str, Interval]) -> float:
    """The confidence level of a set of intervals (0.95 when empty)."""
    return next(iter(diffs.values())).level if diffs else 0.95


def dialogue_markdown(t: Mapping[str, Any], max_messages: int = 8) -> str:
    """One transcript as Markdown: header with the emotion trajectory, then the messages (the
    policy's thought, if any, as a quoted line before its reply)."""
    lines = [
        f"**profile {str(t['profile_id'])[:8]}** ({t.get('intention')}, "
        f"{t.get('personality')}): emotions {t['emotions']} -> {t['end_reason']}",
        "",
    ]
    for m in t["messages"][:max_messages]:
        text = " ".join(str(m["content"]).split())
        if m["role"] == "user":
            lines.append(f"- **user**: {text}")
            continue
        if m.get("thought"):
            lines.append(f"  - *think*: {' '.join(str(m['thought']).split())}")
        lines.append(f"- **policy** ({m['emotion_after']}, {m['change']:+d}): {text}")
    if len(t["messages"]) > max_messages:
        lines.append(f"- ... ({len(t['messages']) - max_messages} more messages)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Save `fig` as a PNG at `path` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_emotion_trajectories(
    transcripts: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    length: int | None = None,
    title: str = "emotion trajectories",
) -> Path:
    """Mean emotion per turn +- one standard deviation (held-last padding, see
    `stats.emotion_matrix`) and a thin line per dialogue over its real turns."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in transcripts:
        ax.plot(range(len(t["emotions"])), t["emotions"], color="tab:gray", lw=0.6, alpha=0.4)
    traj = emotion_matrix(transcripts, length)
    if len(traj):
        x, mean, std = np.arange(traj.shape[1]), traj.mean(axis=0), traj.std(axis=0)
        ax.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.2, label="+- 1 sd")
        ax.plot(x, mean, color="tab:blue", lw=2.2, label=f"mean (n={len(traj)})")
    ax.set(xlabel="policy turn", ylabel="emotion (0-100)", ylim=(-2, 102), title=title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reward_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    ylabel: str = "mean reward",
    title: str = "training reward",
) -> Path:
    """One line (with markers) per run: `label -> (steps, values)`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o", ms=3, lw=1.5, label=label)
    ax.set(xlabel="training step", ylabel=ylabel, title=title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def radar_chart(
    models: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    names: Mapping[str, str] | None = None,
    title: str = "capability profile",
    scale: tuple[float, float] = (1.0, 5.0),
) -> Path:
    """Radar chart: one closed polygon per model over the dimensions of the first model
    (`label -> {dimension key -> mean score}`), radial axis `scale`."""
    plt = _pyplot()
    dims = list(next(iter(models.values()))) if models else []
    angles = np.linspace(0, 2 * np.pi, len(dims), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for label, values in models.items():
        v = [values[d] for d in dims]
        ax.plot([*angles, angles[0]], [*v, v[0]], lw=1.8, label=label)
        ax.fill([*angles, angles[0]], [*v, v[0]], alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels([(names or {}).get(d, d) for d in dims], fontsize=9)
    ax.set_ylim(*scale)
    ax.set_title(title, pad=18)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    return _save(fig, path)
