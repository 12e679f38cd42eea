"""The simulated-user interface shared by every user implementation.

A simulated user does three things in a dialogue (RLVER spec §1.2-1.3):

* `opening`: the first user message of each dialogue (the profile's `first_talk` when set,
  otherwise the user's own words);
* `judge`: after each policy reply, the signed emotion change of each dialogue (the rollout then
  applies `dynamics.apply_change`, which clamps it and keeps the score in [0, 100]);
* `reply`: the user's next message, written knowing the updated emotion score (a goodbye at
  band S or F ends the episode, see `dynamics.detect_goodbye`).

Before a rollout, `set_seed` gives the user that rollout's seed (a sampling user draws its
messages from it; a deterministic one ignores it).

Everything is batched: index i of every argument and result belongs to dialogue i. Two users
implement this interface: `reference_user.ReferenceUser` (a small compiled lexicon model, fast
and deterministic, for tests and CPU experiments) and an LLM-played user. Rollout code depends
on `SimulatedUser` only.

Conventions for `judge(profiles, histories, replies, reply_ids, emotions)`:

* `histories[i]` is the dialogue BEFORE the reply being judged (opening first, ending with the
  user's latest message); `replies[i]` is the new policy reply (visible text, thoughts removed);
* `reply_ids[i]`, when given, are the tokens of `replies[i]` under the user's tokenizer (an
  implementation may use them to skip re-tokenising, or ignore them); trailing end-of-turn and
  padding tokens are allowed and ignored;
* `emotions[i]` is the score before this reply; the result is an int array [B] of changes.
  Given the same inputs the result is the same (deterministic), and row i does not depend on the
  other rows.

For `reply(profiles, histories, emotions, turn_index)`, `histories[i]` ends with the judged
policy reply, `emotions[i]` is the UPDATED score, and `turn_index` is the number of policy
replies so far (1 after the first reply, as `dynamics.is_terminal`'s `turn`), one int for all
rows or one per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from rlver_jax.env.profiles import Profile

Role = Literal["user", "assistant"]
ROLES: tuple[str, ...] = ("user", "assistant")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One message of a dialogue: `role` "user" (the simulated user) or "assistant" (policy)."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role: expected one of {ROLES}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Turn.text: expected str, got {type(self.text).__name__}")


@runtime_checkable
class SimulatedUser(Protocol):
    """What a rollout needs from a simulated user (see the module docstring for conventions)."""

    def set_seed(self, seed: int) -> None:
        """Seed the later openings and replies (the rollout's seed, once per rollout)."""
        ...

    def opening(self, profiles: Sequence[Profile]) -> list[str]:
        """First user message per dialogue: `profile.first_talk` if set, else generated."""
        ...

    def judge(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        replies: Sequence[str],
        reply_ids: Sequence[list[int]] | None,
        emotions: np.ndarray,
    ) -> np.ndarray:
        """Emotion change (int array [B]) caused by each policy reply."""
        ...

    def reply(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        emotions: np.ndarray,
        turn_index: int | Sequence[int],
    ) -> list[str]:
        """The user's next message per dialogue, given the updated emotion scores."""
        ...


def last_text(history: Sequence[Turn], role: Role) -> str | None:
    """Text of the latest turn by `role` in a history, or None if that role has not spoken."""
    for turn in reversed(history):
        if turn.role == role:
            return turn.text
    return None


def turn_indices(turn_index: int | Sequence[int], batch: int) -> list[int]:
    """`reply`'s `turn_index` as one int per row (a scalar is broadcast; a sequence is checked)."""
    if isinstance(turn_index, int | np.integer):
        return [int(turn_index)] * batch
    out = [int(t) for t in turn_index]
    if len(out) != batch:
        raise ValueError(f"turn_index: expected {batch} values, got {len(out)}")
    return out


def check_batch(name: str, values: Sequence[object] | np.ndarray, batch: int) -> None:
    """Raise ValueError naming `name` when a batched argument does not have `batch` rows."""
    if len(values) != batch:
        raise ValueError(f"{name}: expected {batch} rows (one per profile), got {len(values)}")


def reply_scores(
    histories: Sequence[Sequence[Turn]], emotions: np.ndarray | Sequence[int], batch: int
) -> np.ndarray:
    """`reply`'s emotions as a [batch] array, after checking both arguments have `batch` rows."""
    check_batch("histories", histories, batch)
    scores = np.atleast_1d(np.asarray(emotions))
    check_batch("emotions", scores, batch)
    return scores
