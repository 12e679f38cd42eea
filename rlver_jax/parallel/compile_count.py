"""Count XLA compilations from jax's own monitoring events.

Recompiles are the main hidden cost of a JAX sampler (a new prompt length, batch size or
sampling setting that is accidentally static). Timing cannot tell them apart reliably, so we
listen to the event jax records around every backend compilation,
`/jax/core/compile/backend_compile_duration` (jax 0.10: `jax._src.dispatch.BACKEND_COMPILE_EVENT`,
recorded in `pxla` once per executable built, including persistent-cache hits). Every jitted
function, and every eager op run on a new shape, counts once.

    with count_compiles() as counter:
        sampler(...)
    assert counter.count == 0, counter.names
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from jax import monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Tracing and lowering precede every backend compile; together they are the "compile time".
COMPILE_TIME_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    BACKEND_COMPILE_EVENT,
)

_lock = threading.Lock()
_names: list[str] = []
_seconds = [0.0]
_registered = False


def _listener(event: str, duration_secs: float, **kwargs: Any) -> None:
    if event in COMPILE_TIME_EVENTS:
        with _lock:
            _seconds[0] += duration_secs
            if event == BACKEND_COMPILE_EVENT:
                _names.append(str(kwargs.get("fun_name", "?")))


def install() -> None:
    """Register the listener once per process (jax has no way to unregister one)."""
    global _registered
    with _lock:
        if not _registered:
            monitoring.register_event_duration_secs_listener(_listener)
            _registered = True


def compile_count() -> int:
    """Compilations seen since `install()` (called on first use)."""
    install()
    with _lock:
        return len(_names)


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling since `install()` (all threads)."""
    install()
    with _lock:
        return _seconds[0]


def compiled_names(since: int = 0) -> list[str]:
    """Names of the functions compiled since the count `since` (e.g. 'jit(decode)')."""
    install()
    with _lock:
        return list(_names[since:])


class CompileCounter:
    """Compilations between entering and the moment `count` / `names` is read."""

    def __init__(self) -> None:
        self.start = compile_count()
        self.start_seconds = compile_seconds()

    @property
    def count(self) -> int:
        return compile_count() - self.start

    @property
    def names(self) -> list[str]:
        return compiled_names(self.start)

    @property
    def seconds(self) -> float:
        """Trace + lower + compile time since the counter started (wall seconds)."""
        return compile_seconds() - self.start_seconds


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCounter]:
    """Context manager yielding a `CompileCounter` started on entry."""
    yield CompileCounter()
