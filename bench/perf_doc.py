"""Build docs/performance.md from the benchmark results in bench/results/*/*.json.

    .venv/bin/python bench/perf_doc.py            # (re)write docs/performance.md
    .venv/bin/python bench/perf_doc.py --check    # exit 1 if docs/performance.md is stale

A result is one JSON file that `rlver-jax bench sample | train | rollout --json FILE` or
`bench/peer_bench.py --json FILE` wrote, stored in a folder named `<machine>-<YYYY-MM-DD>` with
an optional letter for a later session of the same day (`cpu-2026-11-27f`, `h100-2026-11-27b`).
For each machine and each benchmark kind the page shows one table whose every row is the
LATEST measurement of its configuration (a sample row is an engine, decode step, dtype and
batch; a train row a model, dtype, batch x length and micro-batch; ...), newest first by

    (folder date, folder letter, the run's clock time, its order in LEGACY, its file name)

where the clock time is the JSON's own `timestamp` field when it has one (ISO 8601 or Unix
seconds), else the time LEGACY records. Each row names its run; under the table every run
shows the command that produced it: the JSON's own `argv` when recorded, else LEGACY's entry
(the commands of the runs made before the JSON recorded them), else one rebuilt from the JSON
and the log beside it (marked as such). Files that are not a known result are listed with the
reason at the end, so nothing in bench/results goes unmentioned. Older figures stay in the
folders and in git history; the page shows no prose about them.

The script needs only the standard library (no jax): it reads files and writes Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OUT = REPO / "docs" / "performance.md"

KINDS = ("sample", "train", "rollout", "peer", "collectives", "dry_run")
MACHINES = {
    "cpu": "CPU: this project's 2-core machine (AMD EPYC, no AVX-512)",
    "h100": "GPU: one NVIDIA H100 80GB HBM3",
}
FOLDER = re.compile(r"^(?P<machine>[a-z0-9_]+)-(?P<date>\d{4}-\d{2}-\d{2})(?P<letter>[a-z]?)$")
# How to record a kind that a machine has no result for yet (write into a new folder).
RECORD = {
    "sample": "rlver-jax bench sample --batches 1,8,32 --json FILE.json",
    "train": "rlver-jax bench train --batch 8 --seq-len 512 --dtypes float32 --steps 3 "
    "--json FILE.json",
    "rollout": "rlver-jax bench rollout --steps 2 --json FILE.json",
    "peer": "bash bench/setup_peer_env.sh && /tmp/rlver-peer-venv/bin/python "
    "bench/peer_bench.py --json FILE.json",
    "collectives": "python bench/rollout_collectives.py --devices 16 --fsdp 16 --json FILE.json",
    "dry_run": "rlver-jax plan --compile --config CONFIG --json > FILE.json",
}
PROGRAM = {
    "sample": "rlver-jax bench sample",
    "train": "rlver-jax bench train",
    "rollout": "rlver-jax bench rollout",
    "peer": "python bench/peer_bench.py",
    "collectives": "python bench/rollout_collectives.py",
    "dry_run": "rlver-jax plan",
}

# Runs made before the JSON recorded its command and time: folder/file -> (the arguments of
# `rlver-jax bench <kind>` as run, the clock time HH:MM or "", a note; "skip: ..." leaves the
# file out of the tables). Taken from each folder's README.md and bench/HISTORY.md. Listed in
# run order within a folder (the order breaks ties between runs without a clock time).
B32 = "--batches 32 --dtypes float32 --repeats 2"
LEGACY: dict[str, tuple[str, str, str]] = {
    "cpu-2026-11-27/sample_f32.json": ("--batches 1,8,32 --dtypes float32 --repeats 2", "", ""),
    "cpu-2026-11-27/sample_bf16.json": (
        "--batches 1,8 --dtypes bfloat16 --skip-torch --repeats 2", "", ""),
    "cpu-2026-11-27b/bf16_kernels.json": (
        "--batches 1,8,32 --dtypes bfloat16 --skip-torch --repeats 2", "", ""),
    "cpu-2026-11-27b/fp32_kernels.json": (
        "--batches 1,8,32 --dtypes float32 --repeats 2", "", ""),
    "cpu-2026-11-27b/fp32.json": ("--batches 1,8,32 --dtypes float32 --repeats 2", "", ""),
    "cpu-2026-11-27b/bf16.json": ("--batches 1,8,32 --dtypes bfloat16 --repeats 1", "06:11", ""),
    "cpu-2026-11-27c/fp32.json": ("--batches 1,8,32 --dtypes float32", "09:35", ""),
    "cpu-2026-11-27c/fp32_b32_run2.json": ("--batches 32 --dtypes float32", "09:45", ""),
    "cpu-2026-11-27d/fp32.json": ("--batches 1,8,32 --dtypes float32 --repeats 2", "10:11", ""),
    "cpu-2026-11-27e/fp32.json": ("--batches 1,8,32 --dtypes float32 --repeats 2", "12:14", ""),
    "cpu-2026-11-27e/fp32_b32_run2.json": (B32, "12:31", ""),
    "cpu-2026-11-27e/bf16.json": ("--batches 1,8,32 --dtypes bfloat16 --repeats 1", "12:37", ""),
    "cpu-2026-11-27e/b1_bound.json": (
        "--batches 1 --dtypes bfloat16,float32 --repeats 3 --skip-torch", "12:49", ""),
    "cpu-2026-11-27e/b1_bf16_prefetch.json": (
        "--batches 1 --dtypes bfloat16 --repeats 3 --skip-torch", "12:53", ""),
    "cpu-2026-11-27e/fp32_b32_run3.json": (B32, "13:38", ""),
    "cpu-2026-11-27f/fp32_b32_1504.json": (B32, "15:04", ""),
    "cpu-2026-11-27f/fp32.json": ("--batches 1,8,32 --dtypes float32 --repeats 2", "15:27", ""),
    "cpu-2026-11-27f/bf16.json": ("--batches 1,8,32 --dtypes bfloat16 --repeats 1", "15:55", ""),
    "cpu-2026-11-27f/b1_bound.json": (
        "--batches 1 --dtypes bfloat16,float32 --repeats 3 --skip-torch", "16:04", ""),
    "cpu-2026-11-27f/fp32_b32_1622.json": (B32, "16:22", ""),
    "cpu-2026-11-27f/b1_bound_7f4c445.json": (
        "--batches 1 --dtypes bfloat16,float32 --repeats 3 --skip-torch", "17:06", ""),
    "h100-2026-11-26/1_sample_scan.json": ("--weights random --repeats 3", "", ""),
    "h100-2026-11-26/4_sample_scan.json": (
        "--weights random --repeats 3 --unroll-decode off --skip-torch", "", ""),
    "h100-2026-11-27/b1_1.json": ("", "", "skip: A/B run of an uncommitted copy of the package"),
    "h100-2026-11-27/b1_2.json": ("", "", "skip: A/B run of an uncommitted copy of the package"),
    "h100-2026-11-27/b1_3.json": ("", "", "skip: A/B run of an uncommitted copy of the package"),
    "h100-2026-11-27/b1_4.json": (
        "--weights random --skip-torch --repeats 3 --unroll-decode on --batches 1 "
        "--dtypes float32,bfloat16", "", ""),
    "h100-2026-11-27b/scan_torch.json": ("--weights random --repeats 3", "", ""),
    "h100-2026-11-27b/unrolled.json": (
        "--weights random --repeats 3 --unroll-decode on --skip-torch", "", ""),
}  # fmt: skip
LEGACY_ORDER = {name: i for i, name in enumerate(LEGACY)}


@dataclasses.dataclass
class Run:
    """One result file: where it is, what it holds, and how it sorts among the others."""

    rel: str  # folder/file.json, relative to the results folder
    machine: str
    kind: str
    data: dict[str, Any]
    order: tuple[Any, ...]
    when: str  # the date (and clock time) shown
    header: dict[str, str]  # what the log beside it says about the run
    command: str = ""
    rebuilt: bool = False  # the command was rebuilt from the JSON, not recorded
    label: str = ""


# ---------------------------------------------------------------------------------------------
# Reading the results


def kind_of(data: Any) -> str | None:
    """The benchmark that wrote `data`, from its own `kind` field or its schema."""
    if not isinstance(data, dict):
        return None
    if data.get("kind") in KINDS:
        return data["kind"]
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    if isinstance(data.get("meta"), dict) and all("engine" in r for r in rows):
        return "sample"
    if isinstance(data.get("peaks"), dict) and all("step_s" in r for r in rows):
        return "train"
    if isinstance(data.get("summary"), dict) and "phase_pct" in data["summary"]:
        return "rollout"
    if isinstance(data.get("shape"), dict) and all("tool" in r for r in rows):
        return "peer"
    return None


def own_time(data: dict[str, Any]) -> dt.datetime | None:
    """The JSON's own timestamp (top level or in `meta`), as UTC, or None."""
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    for value in (data.get("timestamp"), meta.get("timestamp")):
        if isinstance(value, int | float):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        if isinstance(value, str):
            try:
                t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return t if t.tzinfo is None else t.astimezone(dt.UTC).replace(tzinfo=None)
    return None


SETTING = re.compile(r"^([a-z_]+) (\S+)$")
DEVICE = re.compile(
    r"jax (?P<jax>[\w.+-]+)(?: on|,) (?P<device>.+?) x(?P<devices>\d+), "
    r"(?:torch on (?P<torch>\S+), )?(?P<cpus>\d+) CPUs"
)


def log_header(path: Path) -> dict[str, str]:
    """Settings, jax version and device of the run, from the first line of its log."""
    if not path.is_file():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    if not lines:
        return {}
    first, out = lines[0], {}
    m = re.match(r"^(\S+) \((\w+) weights\)", first)
    if m:
        out["model"], out["weights"] = m.group(1), m.group(2)
    for item in first.split(";")[0].split(", "):
        s = SETTING.match(item.strip())
        if s:
            out[s.group(1)] = s.group(2)
    d = DEVICE.search(first)
    if d:
        out |= {k: v for k, v in d.groupdict().items() if v}
    return out


def load_runs(results: Path) -> tuple[list[Run], list[tuple[str, str]]]:
    """Every result under `results`, and (file, reason) for every file that is not one."""
    runs: list[Run] = []
    notes: list[tuple[str, str]] = [
        (p.name, "not in a results folder") for p in sorted(results.iterdir()) if p.is_file()
    ]
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        m = FOLDER.match(folder.name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(results).as_posix()
            if "ab" in path.relative_to(folder).parts[:-1]:
                if path.suffix == ".json":
                    notes.append((rel, "an A/B comparison run (ab/: see the folder's README)"))
                continue
            if path.suffix != ".json":
                twin = path.with_suffix(".json")
                if path.suffix == ".log" and twin.is_file():
                    continue  # the log of a result: read with it
                notes.append((rel, other_reason(path)))
                continue
            if not m:
                notes.append((rel, "folder name is not <machine>-<YYYY-MM-DD>[letter]"))
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                notes.append((rel, f"not readable as JSON ({err.__class__.__name__})"))
                continue
            kind = kind_of(data)
            if kind is None:
                notes.append((rel, "JSON of an unknown schema (not a bench result)"))
                continue
            legacy = LEGACY.get(rel, ("", "", ""))
            if legacy[2].startswith("skip:"):
                notes.append((rel, legacy[2].removeprefix("skip:").strip()))
                continue
            stamp = own_time(data)
            clock = stamp.strftime("%H:%M") if stamp else legacy[1]
            day = m.group("date")
            run = Run(
                rel=rel, machine=m.group("machine"), kind=kind, data=data,
                order=(day, m.group("letter"), clock, LEGACY_ORDER.get(rel, -1), path.name),
                when=f"{day} {clock}".strip(), header=log_header(path.with_suffix(".log")),
            )  # fmt: skip
            run.command = command_of(run, legacy[0], rel in LEGACY)
            runs.append(run)
    return runs, notes


def other_reason(path: Path) -> str:
    """Why a file that is not a JSON result is not rendered."""
    if path.name == "README.md":
        return "notes of the folder (how its runs were made)"
    if path.suffix != ".log":
        return "auxiliary output, not a benchmark result"
    text = path.read_text(errors="replace")
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        return "log of a run that ran out of memory (no result)"
    if "Traceback" in text:
        return "log of a run that failed (no result)"
    if text.startswith("==="):
        return "log of an A/B comparison of code versions (no JSON)"
    if "thunk time" in text or "decode ops" in text:
        return "log of a profiled run (per-op times; no JSON)"
    if "summary" not in text and "load average now" not in text:
        return "log of a run stopped before its end (a time limit; no JSON)"
    return "log of a run made without --json"


def command_of(run: Run, legacy_args: str, in_legacy: bool) -> str:
    """The command that produced `run`: its argv, LEGACY's entry, or one rebuilt."""
    argv = run.data.get("argv")
    if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
        if run.kind == "dry_run":  # --json is a flag there: the JSON goes to stdout
            return f"{PROGRAM[run.kind]} {shlex.join(argv)} > FILE.json"
        return f"{PROGRAM[run.kind]} {shlex.join(with_json(argv))}"
    if in_legacy:
        return f"{PROGRAM[run.kind]} {legacy_args} --json FILE.json".replace("  ", " ")
    run.rebuilt = True
    return f"{PROGRAM[run.kind]} {rebuilt_args(run)} --json FILE.json"


def with_json(argv: list[str]) -> list[str]:
    """`argv` with its `--json PATH` (a path on the machine that ran it) as `--json FILE.json`."""
    return [*without(argv, "--json"), "--json", "FILE.json"]


def rebuilt_args(run: Run) -> str:
    """The flags a run without a recorded command must have had, from its rows and log."""
    rows, h = run.data.get("rows", []), run.header
    if run.kind == "sample":
        jax_rows = [r for r in rows if r.get("engine") == "jax"]
        batches = sorted({r.get("batch") for r in jax_rows}, key=lambda b: (b is None, b))
        dtypes = list(dict.fromkeys(r.get("dtype") for r in jax_rows))
        args = [f"--batches {','.join(str(b) for b in batches)}", f"--dtypes {','.join(dtypes)}"]
        if h.get("weights") == "random":
            args.append("--weights random")
        if h.get("unroll_decode") in ("on", "off"):
            args.append(f"--unroll-decode {h['unroll_decode']}")
        if h.get("decode") not in (None, "auto"):
            args.append(f"--decode {h['decode']}")
        if run.data.get("meta", {}).get("torch") == "-":
            args.append("--skip-torch")
        return " ".join(args)
    if run.kind == "peer":
        shape = run.data.get("shape", {})
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shape.items())
    return "(flags not recorded)"


# ---------------------------------------------------------------------------------------------
# Rows of each kind: the configuration a row measures (its key) and its cells


def fmt(x: Any, digits: int | None = None) -> str:
    """A figure for a table: a few significant digits, thousands separated; '-' if missing."""
    if x is None or isinstance(x, bool) or not isinstance(x, int | float):
        return "-" if x is None or isinstance(x, bool) else str(x)
    if digits is not None:
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def ratio(x: Any) -> str:
    return f"{x:.2f}x" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
DTYPE_ORDER = {"float32": 0, "bfloat16": 1}


def decode_of(run: Run, row: dict[str, Any]) -> str:
    """The decode step a sample row ran, in `sampler.decode`'s names."""
    if row.get("engine") != "jax":
        return f"{row.get('engine')} generate"
    if isinstance(row.get("decode"), str):
        return row["decode"]
    h, cpu = run.header, run.machine == "cpu" or h_device_is_cpu(run.header)
    if row.get("pallas_decode") or h.get("pallas_decode") == "on":
        return "pallas"
    kernels = row.get("attention_kernel")
    if kernels is None and cpu and h.get("cpu_attention_kernel") in ("auto", "on"):
        kernels = h.get("devices", "1") == "1"
    if cpu and kernels:
        return "cpu_kernels"
    unrolled = row.get("unroll_decode")
    if unrolled is None:
        setting = h.get("unroll_decode", "auto")
        unrolled = setting == "on" or (setting == "auto" and cpu)
    return "unrolled" if unrolled else "scan"


def h_device_is_cpu(header: dict[str, str]) -> bool:
    return header.get("device", "").split(" ")[-1].lower() == "cpu"


def sample_rows(run: Run) -> list[tuple[tuple[Any, ...], tuple[Any, ...], list[str]]]:
    meta = run.data.get("meta", {})
    setup = (
        run.header.get("model") or meta.get("model") or "smollm2",
        run.header.get("weights") or meta.get("weights") or "smollm2",  # the bench's default
        meta.get("prompt_len"), meta.get("new_tokens"),
    )  # fmt: skip
    out = []
    for r in run.data["rows"]:
        decode = decode_of(run, r)
        key = (setup, r.get("engine") != "jax", decode, DTYPE_ORDER.get(r.get("dtype"), 9),
               r.get("dtype"), r.get("batch"))  # fmt: skip
        dev = r.get("dev_peak_mb")
        cells = [
            decode, DTYPE.get(r.get("dtype"), str(r.get("dtype"))), fmt(r.get("batch")),
            fmt(r.get("prefill_ms")), fmt(r.get("ms_per_step")), fmt(r.get("decode_tok_s")),
            fmt(r.get("e2e_tok_s")), fmt(r.get("bound_ms")), ratio(r.get("x_bound")),
            ratio(r.get("vs_torch")), fmt(r.get("rss_peak_mb"), 0),
            fmt(dev, 0) if dev else "-",
        ]  # fmt: skip
        out.append((setup, key, cells))
    return out


def arg_value(argv: Any, flag: str) -> str | None:
    """The value of `flag` in a recorded argv, or None."""
    if not isinstance(argv, list):
        return None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if isinstance(a, str) and a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def without(argv: Any, *flags: str) -> list[str]:
    """A recorded argv less the given flags and their values (what a row's setup is)."""
    if not isinstance(argv, list):
        return []
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def train_rows(run: Run) -> list[tuple[tuple[Any, ...], tuple[Any, ...], list[str]]]:
    micro = arg_value(run.data.get("argv"), "--micro-batch")
    out = []
    for r in run.data["rows"]:
        mb = r.get("micro_batch", micro)
        key = ((), r.get("model"), DTYPE_ORDER.get(r.get("dtype"), 9), r.get("dtype"),
               r.get("batch"), r.get("seq"), str(mb))  # fmt: skip
        gflop, peak = r.get("gflop_s"), r.get("peak_gflop")
        dev = r.get("dev_peak_mb")
        cells = [
            str(r.get("model")), DTYPE.get(r.get("dtype"), str(r.get("dtype"))),
            f"{fmt(r.get('batch'))} x {fmt(r.get('seq'))}", fmt(mb) if mb else "-",
            fmt(r.get("step_s")), fmt(r.get("tok_s")),
            fmt(gflop / 1000 if gflop else None), fmt(peak / 1000 if peak else None),
            pct(r.get("mfu")), fmt(r.get("compile_s")), fmt(r.get("recompiles")),
            fmt(r.get("rss_peak_mb"), 0), fmt(dev, 0) if dev else "-",
        ]  # fmt: skip
        out.append(((), key, cells))
    return out


ROLLOUT_PHASES = ("sampling", "judging", "replies", "collate", "learner", "checkpoint", "other")


def rollout_rows(run: Run) -> list[tuple[tuple[Any, ...], tuple[Any, ...], list[str]]]:
    s, rows = run.data["summary"], run.data["rows"]
    argv = run.data.get("argv")
    what = shlex.join(without(argv, "--json", "--steps")) or "(the default small config)"
    phase = s.get("phase_pct", {})
    rss = max((r.get("rss_peak_mb") or 0 for r in rows), default=0)
    shapes = ", ".join(dict.fromkeys(str(r.get("rows_x_T")) for r in rows[1:] or rows))
    cells = [
        f"`{what}`", fmt(s.get("step_s")),
        " / ".join(f"{phase.get(p, 0):.1f}" for p in ROLLOUT_PHASES),
        f"{s.get('total_pct', 0):.1f}%", f"{s.get('overhead_pct', 0):.1f}%",
        pct(s.get("pad_frac")), shapes,
        f"{fmt(s.get('first_compiles'))} / {fmt(s.get('warm_compiles'))}",
        fmt(rss, 0) if rss else "-",
    ]  # fmt: skip
    return [((), ((), what), cells)]


PEER_COLUMNS = ("sample_tok_s", "train_tok_s", "trainstep_tok", "step_s", "compile_s")


def peer_rows(run: Run) -> list[tuple[tuple[Any, ...], tuple[Any, ...], list[str]]]:
    shape = run.data.get("shape", {})
    setup = tuple(sorted((k, str(v)) for k, v in shape.items()))
    out = []
    for i, r in enumerate(run.data["rows"]):
        tool = str(r.get("tool"))
        speed = tool == "speedup"
        cells = [
            tool if not speed else "rlver_jax / tunix",
            str(r.get("dtype")),
            fmt(r.get("rows")),
        ]
        for c in PEER_COLUMNS:
            cells.append(ratio(r.get(c)) if speed else fmt(r.get(c)))
        out.append((setup, (setup, i, tool), cells))
    return out


def collectives_rows(run: Run) -> list[tuple[tuple[Any, ...], tuple[Any, ...], list[str]]]:
    out = []
    for r in run.data["rows"]:
        setup = (r.get("model"), r.get("batch"), r.get("prompt"), r.get("new_tokens"))
        mesh = " x ".join(f"{k} {v}" for k, v in (r.get("mesh") or {}).items() if v != 1)
        cells = [
            str(r.get("layout")), f"{fmt(r.get('devices'))} ({mesh or '1'})",
            f"{(r.get('total_bytes_per_token') or 0) / 1e9:.3f}",
            f"{100 * (r.get('x_bf16_weights') or 0):.2f}%",
            fmt(r.get("compile_s")),
        ]  # fmt: skip
        out.append((setup, (setup, r.get("devices"), str(r.get("layout"))), cells))
    return out


def dry_run_rows(run: Run) -> list[tuple[tuple[Any, ...], tuple[Any, ...], list[str]]]:
    out = []
    d = run.data
    setup = (d.get("config"), d.get("devices"), d.get("platform"))
    gb = lambda x: "-" if not isinstance(x, int | float) else f"{x / 1e9:.1f}"
    for i, r in enumerate(d["rows"]):
        traffic = r.get("traffic") or {}
        per_token = sum((traffic.get("per_iteration") or {}).values())
        per_call = sum((traffic.get("per_call") or {}).values())
        per_call += (r.get("iterations") or 1) * per_token
        flops = (r.get("flops") or 0) + (r.get("iterations") or 1) * (
            r.get("flops_per_iteration") or 0
        )
        cells = [
            str(r.get("name")), gb(r.get("peak")), gb(r.get("judged_peak")),
            gb(r.get("formula_peak")), gb(per_call),
            f"{per_token / 1e6:.1f}" if (r.get("iterations") or 1) > 1 else "-",
            f"{flops / max(1, d.get('devices') or 1) / 1e12:.3g}",
        ]  # fmt: skip
        out.append((setup, (setup, i, str(r.get("name"))), cells))
    return out


COLUMNS = {
    "sample": ("decode", "dtype", "batch", "prefill ms", "ms / step", "decode tok/s",
               "e2e tok/s", "bound ms", "x bound", "vs torch", "RSS peak MB",
               "device peak MB"),
    "train": ("model", "dtype", "batch x seq", "micro-batch", "step s", "tokens/s",
              "model TFLOP/s", "peak TFLOP/s", "MFU", "compile s", "recompiles", "RSS peak MB",
              "device peak MB"),
    "rollout": ("config", "warm step s", "% " + " / ".join(ROLLOUT_PHASES),
                "non-model overhead", "host overhead", "padding", "rows x T",
                "compiles first / after", "RSS peak MB"),
    "peer": ("tool", "dtype", "rows", "sampling tok/s", "training tok/s", "train step tok/s",
             "step s", "compile s"),
    "collectives": ("layout", "devices (mesh)", "GB per decoded token per device",
                    "x the policy's bf16 weights", "compile s"),
    "dry_run": ("program", "peak GB (XLA:CPU)", "judged peak GB", "formula GB",
                "collectives GB / call", "MB / decoded token", "TFLOP / device"),
}  # fmt: skip
TITLES = {
    "sample": "Sampling (`bench sample`)",
    "train": "Learner step (`bench train`)",
    "rollout": "RL step (`bench rollout`)",
    "peer": "Against tunix (`bench/peer_bench.py`)",
    "collectives": "Decode collectives at full size (`bench/rollout_collectives.py`)",
    "dry_run": "One RL step compiled at full size (`rlver-jax plan --compile`)",
}
ROWS = {
    "sample": sample_rows, "train": train_rows, "rollout": rollout_rows, "peer": peer_rows,
    "collectives": collectives_rows, "dry_run": dry_run_rows,
}  # fmt: skip
ABOUT = {
    "sample": (
        "`rlver-jax bench sample`: greedy sampling of {setup}. *bound* = the weights' and the "
        "KV cache's bytes per decode step over the copy rate measured in the same run "
        "(read+write: a pure read stream can beat it, so *x bound* < 1 is possible); "
        "*vs torch* = end-to-end tokens/s over transformers' `generate` on the same machine, "
        "timed in the same run."
    ),
    "train": (
        "`rlver-jax bench train`: one GRPO learner step (on-policy) on a synthetic batch, random "
        "weights of the named shape. "
        "*MFU* = model FLOPs (forward + backward, the vocabulary projection at every position) "
        "over the matmul peak measured in the same run (*peak TFLOP/s*)."
    ),
    "rollout": (
        "`rlver-jax bench rollout`: whole RL steps (rollout with the simulated user, learner "
        "update, checkpoint), means over the warm steps. *Non-model overhead* = host "
        "bookkeeping and transfers plus padding waste, as a share of the step."
    ),
    "peer": (
        "`bench/peer_bench.py`: the same GRPO step in rlver_jax and google-tunix, one process, "
        "shape {setup}. The last row is rlver_jax's speed-up (> 1: rlver_jax faster)."
    ),
    "collectives": (
        "`bench/rollout_collectives.py`: the policy sampler's decode loop for {setup}, bf16 "
        "compute, compiled by XLA from abstract inputs on fake CPU devices; the bytes its "
        "collectives move per decoded token per device, with the learner's FSDP layout and "
        "with the rollout layout (`parallel.rules.ROLLOUT_RULES`)."
    ),
    "dry_run": (
        "`rlver-jax plan --compile`: every program of one RL step of {setup}, compiled by XLA "
        "from abstract inputs on fake CPU devices (`rlver_jax.step_programs`). Per device: "
        "*peak* = arguments + outputs - donated + temporaries + what else is live (learner "
        "state, user weights, the rollout copy); *judged peak* leaves out XLA:CPU's f32 copies "
        "of bf16 work, which an accelerator does not make; *formula* = `rlver-jax plan`'s "
        "estimate of the same program. Collectives per call count loops by their trip counts."
    ),
}


# ---------------------------------------------------------------------------------------------
# The page


def sortable(x: Any) -> Any:
    """`x` (a row key: nested tuples of numbers, strings and None) in a total order."""
    if isinstance(x, tuple):
        return tuple(sortable(e) for e in x)
    if x is None:
        return (0, 0, "")
    if isinstance(x, int | float) and not isinstance(x, bool):
        return (1, x, "")
    return (2, 0, str(x))


def latest_rows(runs: list[Run]) -> dict[tuple[Any, ...], tuple[Run, list[str]]]:
    """For every configuration (row key) of these runs, the newest run's row."""
    best: dict[tuple[Any, ...], tuple[Run, list[str]]] = {}
    for run in sorted(runs, key=lambda r: r.order):
        for _setup, key, cells in ROWS[run.kind](run):
            best[key] = (run, cells)
    return best


def setup_text(kind: str, setup: tuple[Any, ...]) -> str:
    if kind == "sample" and len(setup) == 4:
        model, weights, prompt, new = setup
        which = {
            "random": "random weights of its shape, which run at the speed of real ones",
            "smollm2": "its real weights",
        }
        return (
            f"{model} ({which.get(weights, f'{weights} weights')}), prompt {fmt(prompt)} "
            f"tokens, {fmt(new)} new tokens"
        )
    if kind == "peer":
        return ", ".join(f"{k} {v}" for k, v in setup) or "(not recorded)"
    if kind == "dry_run" and len(setup) == 3:
        config, devices, platform = setup
        return f"`{config}` on {fmt(devices)} devices, `auto` knobs resolved for {platform}"
    if kind == "collectives" and len(setup) == 4:
        model, batch, prompt, new = setup
        return f"{model}, batch {fmt(batch)}, prompt {fmt(prompt)}, {fmt(new)} new tokens"
    return ""


def run_line(label: str, run: Run, display: str) -> str:
    h, meta = run.header, run.data.get("meta", {})
    facts = [run.when]
    if h.get("device"):
        facts.append(f"{h['device']} x{h.get('devices', '?')}, {h.get('cpus', '?')} CPUs")
    if h.get("jax"):
        facts.append(f"jax {h['jax']}")
    bw = meta.get("copy_bandwidth_bytes_s")
    if isinstance(bw, int | float):
        facts.append(f"copy rate {bw / 1e9:,.1f} GB/s")
    how = " (rebuilt from the JSON and its log: not recorded)" if run.rebuilt else ""
    return f"- **{label}** `{display}/{run.rel}` ({'; '.join(facts)}): `{run.command}`{how}"


def render(results: Path, display: str) -> str:
    """docs/performance.md for the results under `results` (`display`: how to name that folder)."""
    runs, notes = load_runs(results)
    lines = [
        "# Performance",
        "",
        "<!-- Generated by bench/perf_doc.py from bench/results/*/*.json: do not edit by hand. -->",
        "",
        "The latest measurement of every benchmark configuration, per machine. Each row is the "
        "newest result of its configuration; the runs under each table name their result "
        "file and the command that produced it (`rlver-jax` = `.venv/bin/rlver-jax`, or "
        "`python -m rlver_jax.cli` on a machine without the install; flags as they were at "
        "the time of the run). To update this page, run a benchmark with `--json FILE.json` "
        "into a new folder `bench/results/<machine>-<YYYY-MM-DD>[letter]/` (with its printed "
        "log beside it as `FILE.log`), then `.venv/bin/python bench/perf_doc.py`. Older "
        "figures stay in those folders and in git history. Timings move with the machine's "
        "phases (the 2-core CPU's copy rate varies by tens of percent between runs), so "
        "compare ratios within a run rather than rates across runs.",
        "",
        "Design decisions and why they were made: [architecture.md](architecture.md).",
        "",
    ]
    machines = sorted({r.machine for r in runs}, key=lambda m: (m not in MACHINES, m))
    superseded: list[str] = []
    for machine in machines:
        lines += [f"## {MACHINES.get(machine, machine)}", ""]
        mine = [r for r in runs if r.machine == machine]
        kinds = [k for k in KINDS if any(r.kind == k for r in mine)]
        for kind in kinds:
            best = latest_rows([r for r in mine if r.kind == kind])
            used = sorted({run.rel: run for run, _ in best.values()}.values(),
                          key=lambda r: r.order, reverse=True)  # fmt: skip
            for i, run in enumerate(used, 1):
                run.label = f"{kind[0]}{i}"
            superseded += [r.rel for r in mine if r.kind == kind and r not in used]
            setups = sorted({k[0] for k in best}, key=sortable)
            lines += [f"### {TITLES[kind]}", ""]
            for setup in setups:
                lines += [ABOUT[kind].format(setup=setup_text(kind, setup)), ""]
                cols = (*COLUMNS[kind], "run")
                lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                for key in sorted((k for k in best if k[0] == setup), key=sortable):
                    run, cells = best[key]
                    lines.append("| " + " | ".join([*cells, run.label]) + " |")
                lines.append("")
            lines += [run_line(run.label, run, display) for run in used] + [""]
        missing = [k for k in KINDS if k not in kinds]
        if missing:
            lines += ["No result recorded on this machine yet for: "
                      + ", ".join(f"{k} (`{RECORD[k]}`)" for k in missing) + ".", ""]  # fmt: skip
    if not runs:
        lines += ["No benchmark results found.", ""]
    lines += ["## Other files in the results folders", ""]
    if superseded:
        lines += [
            "Superseded by a newer result of the same configurations (not shown): "
            + ", ".join(f"`{display}/{s}`" for s in sorted(superseded))
            + ".",
            "",
        ]
    for rel, reason in sorted(notes):
        lines.append(f"- `{display}/{rel}`: {reason}")
    if notes:
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    ap.add_argument("--out", type=Path, default=OUT, help="the Markdown file to write")
    ap.add_argument("--check", action="store_true", help="exit 1 if --out is not up to date")
    args = ap.parse_args(argv)
    results = args.results.resolve()
    try:
        display = results.relative_to(REPO).as_posix()
    except ValueError:
        display = results.name
    text = render(results, display)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run .venv/bin/python bench/perf_doc.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
