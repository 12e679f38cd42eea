"""Training metrics: a JSONL log (the source of truth), TensorBoard scalars, phase timers and a
progress bar.

``metrics.jsonl`` holds one JSON object per step, ``{"step": 12, "time": ..., "actor/pg_loss":
0.31, ...}``, flushed after every line so a killed run loses at most the line being written.
Strict JSON has no NaN / inf: such values are written as ``null`` and their keys listed under
``"nonfinite"`` so a diverging run stays visible and machine-readable. On resume,
``truncate_after=step`` drops lines past the restored checkpoint, so a replayed step is not
logged twice.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
NONFINITE_KEY = "nonfinite"


def to_scalar(value: Any, key: str = "value") -> float | int | bool | str | None:
    """A JSON scalar from a Python / numpy / jax scalar or size-1 array (fetched from the device);
    ``None`` for NaN / inf. Raises ``ValueError`` naming ``key`` for larger arrays."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        arr = np.asarray(jax.device_get(value))
        if arr.size != 1:
            raise ValueError(
                f"metric {key!r}: expected a scalar, got an array of shape {arr.shape}"
            )
        return to_scalar(arr.reshape(()).item(), key)
    raise TypeError(f"metric {key!r}: unsupported type {type(value).__name__}")


class MetricsWriter:
    """Append per-step metrics to ``directory/metrics.jsonl`` and (optionally) TensorBoard.

    Only one process of a multi-host run should write: ``enabled`` defaults to
    ``jax.process_index() == 0``; a disabled writer accepts and drops every call.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        tensorboard: bool = True,
        enabled: bool | None = None,
        truncate_after: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / METRICS_FILE
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file: Any = None
        self._tb: Any = None
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after]
            self.path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.directory))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one step's metrics; returns the JSON record. Scalars only (jax arrays are
        fetched here, which waits for them: call after the step's outputs are ready)."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        nonfinite = []
        for key, value in metrics.items():
            if key in record or key == NONFINITE_KEY:
                raise ValueError(f"metric name {key!r} is reserved")
            record[key] = to_scalar(value, key)
            if record[key] is None and value is not None:  # only NaN / inf map to None
                nonfinite.append(key)
        if nonfinite:
            record[NONFINITE_KEY] = nonfinite
        if not self.enabled:
            return record
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, int | float):
                    self._tb.add_scalar(key, float(value), int(step))
            self._tb.flush()
        return record

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (or of a directory holding one). A truncated last line
    (the run was killed mid-write) is skipped; a bad line elsewhere raises ``ValueError`` with
    ``path:line``."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: not a JSON object: {e}") from e
    return records


class PhaseTimer:
    """Wall-clock seconds per named phase ("rollout", "learner", "checkpoint", ...) in a step.

    JAX dispatches asynchronously, so a phase only measures device work if its block waits for
    the results before leaving: pass them through :meth:`ready`, which blocks on them when the
    timer was made with ``block=True`` (a benchmark's phase breakdown) and returns them as they
    are otherwise (training adds no synchronisation). :attr:`totals` holds the seconds per
    phase so far; :meth:`lap` returns ``{"time/<phase>": s, ..., "time/step": s}`` and starts
    the next step.
    """

    def __init__(self, *, block: bool = False) -> None:
        self.block = block
        self.totals: dict[str, float] = collections.defaultdict(float)
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] += time.perf_counter() - start

    def ready(self, tree: Any) -> Any:
        """``tree``, blocked on (``jax.block_until_ready``) when the timer blocks."""
        return jax.block_until_ready(tree) if self.block else tree

    def lap(self) -> dict[str, float]:
        now = time.perf_counter()
        out = {f"time/{k}": v for k, v in self.totals.items()}
        out["time/step"] = now - self._step_start
        self.totals.clear()
        self._step_start = now
        return out


class ProgressBar:
    """A tqdm bar over training steps showing the reward and seconds per step."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        reward_key: str = "reward/mean",
        disable: bool | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        if disable is None:
            disable = jax.process_index() != 0
        self.reward_key = reward_key
        self._bar = tqdm(total=total, initial=initial, unit="step", disable=disable)
        self._last = time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Advance to ``step`` and show ``step``, the reward (if in ``metrics``) and s/step."""
        now = time.perf_counter()
        advance = max(int(step) - self._bar.n, 0)
        sec = (now - self._last) / max(advance, 1)
        self._last = now
        post: dict[str, str] = {"step": str(int(step)), "s/step": f"{sec:.2f}"}
        value = None if metrics is None else metrics.get(self.reward_key)
        if value is not None:
            reward = to_scalar(value, self.reward_key)
            post["reward"] = f"{reward:.4g}" if isinstance(reward, int | float) else "nan"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(advance)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, *, initial: int = 0, reward_key: str = "reward/mean") -> ProgressBar:
    """A :class:`ProgressBar` from ``initial`` (the resumed step) to ``total`` steps."""
    return ProgressBar(total, initial=initial, reward_key=reward_key)
