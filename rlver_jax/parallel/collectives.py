"""The bytes a compiled program's collectives move, read from XLA's compiled HLO text: how a
layout is judged at real shapes without a pod (`Sampler.compile_programs`, abstract inputs)."""

from __future__ import annotations

import re

import numpy as np

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "u16": 2, "f16": 2, "pred": 1, "s8": 1}
_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all|all-reduce|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b(f32|bf16|s32|u32|u16|f16|pred|s8)\[([\d,]*)\]")


def collective_bytes(hlo: str, layers: int) -> dict[str, int]:
    """Output bytes of each collective kind in a compiled program, the ops inside the layer
    scan's while loop counted `layers` times."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shape = _SHAPE.search(line.split("=", 1)[1])
        if shape is None:
            continue
        dims = [int(d) for d in shape.group(2).split(",") if d]
        n = int(np.prod(dims)) if dims else 1
        times = layers if "/while/body/while/body" in line or "/scan/" in line else 1
        out[m.group(1)] = out.get(m.group(1), 0) + n * _BYTES[shape.group(1)] * times
    return out
