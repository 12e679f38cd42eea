"""Where a compiled program's time goes, per XLA op, from XLA's own runtime trace.

    ops = profile_call(lambda: sampler(params, prompts), module="jit_decode", steps=128)

runs the call once under `jax.profiler.trace` (a Perfetto JSON trace in a temporary folder) and
sums the duration of every op event of that HLO module: on XLA:CPU each thunk (a fusion, a
library GEMM, a copy) is one event tagged with ``hlo_module`` and ``hlo_op``. Ops are grouped by
output shape and kind (``ynn_fusion.17`` and ``ynn_fusion.40`` of the same shape are one row)
when the optimized HLO is found in an XLA dump folder (``XLA_FLAGS=--xla_dump_to=DIR
--xla_dump_hlo_as_text``), else by name. Times are summed over threads, so concurrent ops can
add up to more than the wall time; the figures rank ops, they do not partition the wall clock.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

_DUMP_FLAG = re.compile(r"--xla_dump_to=(\S+)")
_OP_SHAPE = re.compile(r"^\s*%(\S+) = (\S+) [\w-]+\(", re.M)


def load_trace(trace_dir: str) -> list[dict[str, Any]]:
    """The complete ("X") events of the newest Perfetto trace under ``trace_dir``."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def op_times(events: list[dict[str, Any]], module: str) -> dict[str, tuple[float, int]]:
    """{op name: (total microseconds, number of runs)} of ``module``'s op events."""
    out: dict[str, tuple[float, int]] = {}
    for e in events:
        args = e.get("args") or {}
        if args.get("hlo_module") != module or "hlo_op" not in args:
            continue
        total, runs = out.get(args["hlo_op"], (0.0, 0))
        out[args["hlo_op"]] = (total + float(e.get("dur", 0.0)), runs + 1)
    return out


def hlo_shapes(module: str, dump_dir: str | None = None) -> dict[str, str]:
    """{op name: output shape} from ``module``'s optimized HLO in the XLA dump folder (the
    ``--xla_dump_to`` of ``XLA_FLAGS`` by default); empty when there is none."""
    dump_dir = dump_dir or next(iter(_DUMP_FLAG.findall(os.environ.get("XLA_FLAGS", ""))), None)
    if not dump_dir:
        return {}
    files = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations.txt")))
    if not files:
        return {}
    with open(files[-1]) as f:
        text = f.read()
    return dict(_OP_SHAPE.findall(text))


def top_ops(
    times: dict[str, tuple[float, int]], shapes: dict[str, str], steps: int, n: int = 12
) -> list[dict[str, Any]]:
    """The ``n`` costliest op groups: {"op", "ms_per_step", "runs_per_step", "share"}, grouped
    by output shape (where ``shapes`` knows the op) and name without its numeric suffix."""
    groups: dict[str, list[float]] = {}
    for name, (us, runs) in times.items():
        base = re.sub(r"\.\d+$", "", name)
        key = f"{shapes[name]} {base}" if name in shapes else base
        acc = groups.setdefault(key, [0.0, 0.0])
        acc[0] += us
        acc[1] += runs
    total = sum(us for us, _ in groups.values()) or 1.0
    rows = [
        {"op": key, "ms_per_step": us / 1e3 / steps, "runs_per_step": runs / steps,
         "share": us / total}
        for key, (us, runs) in groups.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:n]


def profile_call(
    fn: Callable[[], Any], module: str, steps: int, n: int = 12
) -> list[dict[str, Any]]:
    """Run ``fn`` once under the profiler and return `top_ops` of ``module`` per step; ``fn``
    must return when its work is done (results on the host, or blocked on)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            fn()
        events = load_trace(trace_dir)
    return top_ops(op_times(events, module), hlo_shapes(module), steps, n)
