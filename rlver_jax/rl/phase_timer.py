"""Wall time per phase of a step, for benchmarks (a no-op unless asked)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Wall time per phase into ``timings`` (a no-op when it is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.timings is not None:
            self.timings[name] = time.perf_counter() - t0

    def ready(self, tree: Any) -> Any:
        """``tree``, blocked on when timing (so a phase's time is its own)."""
        return jax.block_until_ready(tree) if self.timings is not None else tree
