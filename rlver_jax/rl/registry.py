"""Name -> function registries for advantage estimators and policy losses.

A researcher adds an estimator or a loss by decorating it::

    from rlver_jax.rl.advantages import AdvantageInputs, broadcast_to_tokens
    from rlver_jax.rl.registry import register_advantage

    @register_advantage("my_adv")
    def my_adv(x: AdvantageInputs) -> tuple[jax.Array, jax.Array | None]:
        per_sample = x.scores - x.scores.mean()
        return broadcast_to_tokens(per_sample, x.loss_mask), None

and the trainer config selects it by name (``learner.advantage_estimator: my_adv``).

Every advantage estimator has that one signature: ``estimator(inputs: AdvantageInputs) ->
(advantages, returns)``, ``advantages`` ``[B, T]`` float32 and 0 off the policy tokens,
``returns`` ``[B, T]`` (the critic's regression targets) or None. ``AdvantageInputs`` (see
:mod:`rlver_jax.rl.advantages`) holds the loss mask, the per-sample scores, group and dialogue
ids, the critic's rewards / values / mask (with a critic only) and the config's ``gamma``,
``lam``, ``whiten_advantages`` and ``grpo_eps``. ``algorithm: ppo`` runs "gae"; ``grpo`` runs
any other (outcome-level) estimator. Every policy loss is called as ``loss(logprobs,
old_logprobs, advantages, mask, clip_low, clip_high, agg_mode, clip_ratio_c) -> (LossTerm,
{name: LossTerm})`` (see :func:`rlver_jax.rl.losses.ppo_policy_loss`).

The built-in entries ("gae", "grpo", "rloo"; "ppo", "grpo") are registered when
:mod:`rlver_jax.rl.advantages` and :mod:`rlver_jax.rl.losses` are imported; the getters import
them lazily, so callers need not.

Registries are guarded by a lock, so registration from several threads is safe. Registering a
name twice raises unless ``override=True``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_BUILTIN_MODULES: tuple[str, ...] = ("rlver_jax.rl.advantages", "rlver_jax.rl.losses")


class Registry:
    """A thread-safe mapping from names to callables."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._lock = threading.RLock()

    def register(self, name: str, *, override: bool = False) -> Callable[[F], F]:
        """Return a decorator that registers ``fn`` under ``name`` and returns ``fn`` unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"{self.kind} {name!r} must be callable, got {type(fn).__name__}")
            with self._lock:
                if name in self._entries and not override and self._entries[name] is not fn:
                    raise ValueError(
                        f"{self.kind} {name!r} is already registered "
                        f"(to {self._entries[name].__qualname__}); pass override=True to replace it"
                    )
                self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """Return the callable registered under ``name``; raise ``KeyError`` listing known names."""
        _load_builtins()
        with self._lock:
            fn = self._entries.get(name)
            if fn is None:
                available = ", ".join(sorted(self._entries)) or "<none>"
                raise KeyError(f"unknown {self.kind} {name!r}; available: {available}")
            return fn

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no-op if absent). Mainly for tests."""
        with self._lock:
            self._entries.pop(name, None)

    def names(self) -> list[str]:
        """Sorted list of registered names."""
        _load_builtins()
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _load_builtins()
        with self._lock:
            return name in self._entries


ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")

_builtins_lock = threading.RLock()
_builtins_loaded = False


def _load_builtins() -> None:
    """Import the modules that register the built-in entries (once, thread-safe)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _builtins_lock:
        if _builtins_loaded:
            return
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def register_advantage(name: str, *, override: bool = False) -> Callable[[F], F]:
    """Decorator: register an advantage estimator ``fn(inputs: AdvantageInputs) ->
    (advantages, returns | None)`` under ``name`` (module docs)."""
    return ADVANTAGES.register(name, override=override)


def get_advantage(name: str) -> Callable[..., Any]:
    """Return the advantage estimator registered under ``name``."""
    return ADVANTAGES.get(name)


def list_advantages() -> list[str]:
    """Names of all registered advantage estimators."""
    return ADVANTAGES.names()


def register_policy_loss(name: str, *, override: bool = False) -> Callable[[F], F]:
    """Decorator: register a policy-loss function under ``name``."""
    return POLICY_LOSSES.register(name, override=override)


def get_policy_loss(name: str) -> Callable[..., Any]:
    """Return the policy-loss function registered under ``name``."""
    return POLICY_LOSSES.get(name)


def list_policy_losses() -> list[str]:
    """Names of all registered policy-loss functions."""
    return POLICY_LOSSES.names()
