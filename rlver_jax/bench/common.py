"""Helpers shared by the benchmarks (`bench sample` uses the tables; its own helpers --
`rss_peak_mb`, `device_peak_mb`, `copy_bandwidth` -- are imported by the others).

- :func:`machine_line`: the header every benchmark prints first (jax version, backend, CPU
  count, load average, and a warning when the machine is busier than it has cores: timings
  taken then are not representative).
- :func:`header` / :func:`format_row`: the fixed-width `" | "` tables of every benchmark, for
  any column list.
- :func:`matmul_peak`: the measured matmul peak that MFU is quoted against.
- :func:`timed_update`: :meth:`Learner.update` split into its jitted phases, each timed to
  completion (``block_until_ready``), so device time and host time can be told apart.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Columns = Sequence[tuple[str, str]]
CELL = 12


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def machine_line(title: str) -> str:
    """One self-describing line: what ran, on which jax / device / CPU count, under what load."""
    dev = jax.devices()[0]
    cpus = os.cpu_count() or 1
    l1, l5, l15 = load_average()
    line = (
        f"{title}; jax {jax.__version__}, {dev.platform} {dev.device_kind} x{jax.device_count()}, "
        f"{cpus} CPUs, load average {l1:.1f} / {l5:.1f} / {l15:.1f}"
    )
    if l1 > cpus:
        line += f"\nWARNING: load {l1:.1f} > {cpus} CPUs: timings are NOT representative"
    return line


def write_json(path: str | None, payload: Any) -> None:
    """`payload` as indented JSON at `path` (a benchmark's `--json`), when a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def finish(json_path: str | None, payload: Any) -> None:
    """A benchmark's last lines: the load average now, and its `--json` file."""
    print("load average now {:.1f} / {:.1f} / {:.1f}".format(*load_average()))
    write_json(json_path, payload)


def header(columns: Columns) -> str:
    """The column names, right-aligned in cells of `CELL` characters."""
    return " | ".join(f"{name:>{CELL}}" for name, _ in columns)


def format_row(columns: Columns, row: dict[str, Any]) -> str:
    """One table row; a missing or None value prints as '-'."""
    cells = []
    for name, fmt in columns:
        value = row.get(name)
        cells.append("-" if value is None else fmt.format(value))
    return " | ".join(f"{c:>{CELL}}" for c in cells)


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s of one jitted ``[n, n] @ [n, n]`` in ``dtype`` (``2 n^3`` FLOPs per
    call; the first call compiles and is not counted). This is the machine's *measured* matmul
    peak: MFU = achieved model FLOP/s / this number, for the same compute dtype."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def timed_update(
    learner: Any, state: Any, traj: Any, num_samples: int | None = None
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """:meth:`Learner.update` with each phase timed (its ``timings`` hook). Returns ``(state,
    metrics, timings)``; ``timings`` holds ``pad_s``, ``old_s`` (0 when the step is on-policy),
    ``adv_s``, ``train_s``, ``fetch_s``, ``device_s = old_s + adv_s + train_s``, ``total_s``,
    and the padded batch's ``rows``, ``seq``, ``real_tokens`` (the tokens its layout holds:
    :meth:`Learner.laid_out_tokens`, a shared prompt once), ``filled_rows`` (rows the train
    step computes on: :meth:`Learner.filled_rows`) and
    ``pad_frac = 1 - real_tokens / (filled_rows * seq)``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    state, metrics = learner.update(state, traj, num_samples, timings=timings)
    total = time.perf_counter() - t0
    padded = learner.pad(traj, num_samples)
    rows, seq = (int(x) for x in padded.tokens.shape)
    real, filled = learner.laid_out_tokens(padded), learner.filled_rows(padded)
    timings |= {
        "device_s": timings["old_s"] + timings["adv_s"] + timings["train_s"], "total_s": total,
        "rows": float(rows), "seq": float(seq), "real_tokens": float(real),
        "filled_rows": float(filled), "pad_frac": 1.0 - real / max(filled * seq, 1),
    }  # fmt: skip
    return state, metrics, timings
