"""Graceful preemption and crash checkpoints for the training loop.

Cluster schedulers send SIGTERM (then SIGKILL after a grace period) and users press Ctrl-C.
Raising from a signal handler would unwind through whatever runs at that moment, possibly the
middle of a jitted step whose input buffers were donated, leaving no valid state to save. So
:class:`PreemptionGuard` only sets a flag; the loop checks it *between* steps, saves a forced
checkpoint, waits for it and returns normally. A second Ctrl-C still means "quit now".

::

    with PreemptionGuard() as guard, save_on_crash(ckpt) as last:
        for step in range(start + 1, total + 1):
            state, metrics = learner.update(state, batch)
            extra = checkpoint_extra(data_iterator=profiles, seed=seed, metrics=metrics)
            last.update(step, state, extra)
            ckpt.save(step, state, extra)
            if save_and_stop_if_requested(guard, ckpt, step, state, extra):
                break
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any

import jax
import numpy as np

from rlver_jax.rl.checkpoint import Checkpointer

log = logging.getLogger(__name__)

Handler = Any  # what signal.signal accepts / returns (callable, SIG_DFL, SIG_IGN, None)


class PreemptionGuard:
    """Context manager: SIGTERM / SIGINT set :attr:`should_stop` instead of killing the process.

    Handlers are installed on ``__enter__`` and the previous ones restored on ``__exit__``.
    A second SIGINT while a stop is already pending restores the previous handlers and raises
    ``KeyboardInterrupt`` (the usual "press Ctrl-C twice" escape; :func:`save_on_crash` does not
    save on it). Signal handlers can only be installed from the main thread; elsewhere the
    guard logs a warning and only :meth:`request_stop` sets the flag.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.signal_received: int | None = None
        self._stop = False
        self._previous: dict[int, Handler] = {}

    @property
    def should_stop(self) -> bool:
        """True once a stop was requested (signal or :meth:`request_stop`) on this process."""
        return self._stop

    def request_stop(self, signum: int | None = None) -> None:
        """Ask the loop to stop after the current step (also what the handler does)."""
        self._stop = True
        if signum is not None:
            self.signal_received = signum

    def stop_agreed(self) -> bool:
        """Whether *any* process was asked to stop. Schedulers may signal only some hosts, and
        a checkpoint save is collective, so on multi-host runs every process must call this at
        the same point of every step (it is an all-gather) and act on the common answer."""
        if jax.process_count() == 1:
            return self._stop
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._stop, np.int32))
        return bool(np.any(flags))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt(f"second {name}: exiting without a checkpoint")
        if not self._stop:
            log.warning("received %s: will checkpoint and stop after the current step", name)
        self.request_stop(signum)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard outside the main thread: signal handlers not installed")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()


def save_and_stop_if_requested(
    guard: PreemptionGuard,
    checkpointer: Checkpointer,
    step: int,
    state: Any,
    extra: dict[str, Any] | None = None,
) -> bool:
    """If a stop was requested (on any process), force-save ``step``, wait until the
    checkpoint is committed and return True (the loop should then break); else False."""
    if not guard.stop_agreed():
        return False
    checkpointer.save(step, state, extra, force=True)
    checkpointer.wait()
    log.warning("stopped at step %d; checkpoint in %s", step, checkpointer.directory)
    return True


class LastGood:
    """The most recent state known to be complete (set after each successful step)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.state: Any = None
        self.extra: dict[str, Any] | None = None

    def update(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> None:
        self.step, self.state, self.extra = int(step), state, extra


def _is_deleted(tree: Any) -> bool:
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


@contextlib.contextmanager
def save_on_crash(checkpointer: Checkpointer) -> Iterator[LastGood]:
    """On an ``Exception`` in the block, force-save the :class:`LastGood` state, wait, and
    re-raise the original error (a failed rescue save is attached as a note, never hides it).

    ``KeyboardInterrupt`` / ``SystemExit`` are not ``Exception``s and pass through unsaved. If
    the crash happened inside a train step that *donated* the last good state, its buffers are
    gone; then nothing is saved and a note says so (the previous periodic checkpoint remains).
    """
    last = LastGood()
    try:
        yield last
    except Exception as exc:
        if last.step is not None:
            if _is_deleted(last.state):
                exc.add_note(
                    f"save_on_crash: state of step {last.step} was donated/deleted; not saved"
                )
            else:
                try:
                    if checkpointer.save(last.step, last.state, last.extra, force=True):
                        log.error("crash: saved step %d to %s", last.step, checkpointer.directory)
                    checkpointer.wait()
                except Exception as save_exc:
                    exc.add_note(f"save_on_crash: saving step {last.step} failed: {save_exc!r}")
        raise
