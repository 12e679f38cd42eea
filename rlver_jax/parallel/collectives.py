"""The bytes a compiled program's collectives move, read from XLA's compiled HLO text: how a
layout is judged at real shapes without a pod (`rlver_jax.step_programs`, abstract inputs).

Each collective counts its output bytes (per device) times the number of times it runs: the
product of the trip counts of the `while` loops around it, which XLA records on each loop it
can count (`known_trip_count`: a layer scan, a scan over micro-batches). A loop without one
(the decode loop, a `lax.while_loop` that stops at the last token) runs an unknown number of
times: what runs inside it is reported apart, per iteration (per decoded token).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "u16": 2, "f16": 2, "pred": 1, "s8": 1}
_BYTES |= {"u8": 1, "f64": 8, "s64": 8, "u64": 8}
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"\s(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes per device by collective kind: `per_call` once per call of the program (loops
    of unknown length counted once), `per_iteration` inside loops of unknown length."""

    per_call: dict[str, int]
    per_iteration: dict[str, int]

    @property
    def total_per_call(self) -> int:
        return sum(self.per_call.values())

    @property
    def total_per_iteration(self) -> int:
        return sum(self.per_iteration.values())


def _output_bytes(line: str, op: re.Match[str]) -> int:
    """Bytes of a collective's result: every array of its output type; an async `-start`
    returns (operands, results), so only its second half."""
    shapes = _SHAPE.findall(line[line.index("=") + 1 : op.start()])
    if op.group(2):  # -start: ((operands...), (results...)) or (operand, result)
        shapes = shapes[len(shapes) // 2 :]
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for _, dims in shapes]
    return sum(n * _BYTES[t] for n, (t, _) in zip(sizes, shapes, strict=True))


def collective_traffic(hlo: str) -> Traffic:
    """The collectives of a compiled program's HLO text (`compiled.as_text()`)."""
    bodies: dict[str, list[str]] = {}
    current = entry = None
    for line in hlo.splitlines():
        head = _HEADER.match(line) if not line.startswith(" ") else None
        if head:
            current = head.group(1)
            bodies[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None:
            bodies[current].append(line)
    per_call: dict[str, int] = {}
    per_iter: dict[str, int] = {}

    def visit(name: str, times: int, unknown: bool, depth: int = 0) -> None:
        if depth > 64 or name not in bodies:
            return
        for line in bodies[name]:
            op = _OP.search(line)
            if op and "=" in line:
                out = per_iter if unknown else per_call
                out[op.group(1)] = out.get(op.group(1), 0) + _output_bytes(line, op) * times
                continue
            loop = _WHILE.search(line)
            if loop:
                trips = _TRIPS.search(line)
                n = int(trips.group(1)) if trips else 1
                visit(loop.group(1), times * n, unknown or trips is None, depth + 1)
                continue
            for callee in _CALLS.findall(line):
                visit(callee, times, unknown, depth + 1)
            branches = _BRANCHES.search(line)
            if branches:  # a conditional: count every branch (an upper bound)
                for callee in branches.group(1).split(","):
                    visit(callee.strip().lstrip("%"), times, unknown, depth + 1)

    if entry is not None:
        visit(entry, 1, False)
    return Traffic(per_call, per_iter)
