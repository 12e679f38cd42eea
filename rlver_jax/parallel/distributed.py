"""Multi-host start-up: one call that starts `jax.distributed` when, and only when, needed.

Every process of a multi-host job must call `initialize` before it touches a JAX device, after
which `jax.devices()` lists the devices of all processes and one mesh can span them. Settings
come from arguments (CLI flags) first, then from the environment:

    RLVER_COORDINATOR     "host:port" of process 0, or "auto"
    RLVER_NUM_PROCESSES   total process count
    RLVER_PROCESS_ID      this process's index, 0 .. N-1

"auto" calls `jax.distributed.initialize()` with no arguments, which detects the cluster
itself on TPU pods, SLURM, Open MPI and similar (and fails on a plain single machine). Without a
coordinator the call is a no-op (single host), so the same entry point serves laptops and pods.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax

ENV_COORDINATOR = "RLVER_COORDINATOR"
ENV_NUM_PROCESSES = "RLVER_NUM_PROCESSES"
ENV_PROCESS_ID = "RLVER_PROCESS_ID"
AUTO = "auto"

log = logging.getLogger(__name__)


class DistributedConfigError(ValueError):
    """Incomplete or inconsistent multi-host settings; the message names flag and variable."""


@dataclass(frozen=True)
class DistributedSettings:
    """What `initialize` resolved from its arguments and the environment."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None

    @property
    def auto(self) -> bool:
        return self.coordinator == AUTO


_started: DistributedSettings | None = None


def _int_setting(value: int | None, env: str, flag: str) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedConfigError(f"{env}={raw!r} (or --{flag}) must be an integer") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> DistributedSettings:
    """Merge arguments with the RLVER_* environment and validate them (starts nothing)."""
    coord = coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None
    n = _int_setting(num_processes, ENV_NUM_PROCESSES, "num-processes")
    pid = _int_setting(process_id, ENV_PROCESS_ID, "process-id")
    if coord is None:
        if n not in (None, 1) or pid not in (None, 0):
            raise DistributedConfigError(
                f"num_processes={n} / process_id={pid} given without a coordinator: set "
                f"--coordinator or {ENV_COORDINATOR} (host:port of process 0, or 'auto')"
            )
        return DistributedSettings(None, None, None)
    if coord != AUTO:
        if n is None:
            raise DistributedConfigError(
                f"coordinator {coord!r} needs --num-processes or {ENV_NUM_PROCESSES}"
            )
        if pid is None:
            raise DistributedConfigError(
                f"coordinator {coord!r} needs --process-id or {ENV_PROCESS_ID}"
            )
        if n < 1 or not 0 <= pid < n:
            raise DistributedConfigError(
                f"process_id ({pid}) must be in [0, num_processes={n}) and num_processes >= 1"
            )
    return DistributedSettings(coord, n, pid)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> bool:
    """Start `jax.distributed` if a coordinator is configured; return True when running multi-host.

    Idempotent: a second call (with any arguments) returns the first call's outcome, and a
    runtime started by someone else through `jax.distributed.initialize` is recognised.
    A single process with coordinator settings (num_processes == 1) skips the service: it
    would only add a server thread and a port.
    """
    global _started
    if _started is not None:
        return _started.enabled
    if jax.distributed.is_initialized():
        _started = DistributedSettings("external", jax.process_count(), jax.process_index())
        return True
    settings = resolve(coordinator, num_processes, process_id)
    if not settings.enabled or settings.num_processes == 1:
        _started = DistributedSettings(None, None, None)
        return False
    if settings.auto:
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
    else:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=initialization_timeout,
        )
    _started = settings
    log.info(
        "jax.distributed started: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
