"""Emotion-score dynamics of the simulated user: update, bands and episode termination.

The simulator LLM proposes a signed `Change` each turn; everything after that is plain
arithmetic, and it lives here so that it is verifiable, unit-tested and identical in rollouts,
evaluation and analysis (RLVER spec §1.3-1.4). The functions are pure and vectorised: they take
Python scalars, numpy arrays or jax arrays (also under `jit`), and answer in the same family
(jax in -> jax out, otherwise numpy), so a batch of dialogues is updated in one call.

Defaults follow RLVER: start at 30 in training and 40 in evaluation (SAGE); Change clamped to
[-10, 10] as in the vanilla simulator and SAGE (set `max_change=None` for the released "hard"
simulator, which has no clamp); score kept in [0, 100]; at most 8 policy replies in training and
10 in evaluation. RLVER's training loop has an off-by-one that allows a 9th reply; we use the
stated limit. Evaluation also ends, as in SAGE, when the score falls below the failure
threshold (10), reported as `EndReason.SCORE_LOW`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Mode = Literal["train", "eval"]
MODES: tuple[str, ...] = ("train", "eval")

# Emotion bands, lowest first, so that band_index grows with the score.
BANDS: tuple[str, ...] = ("F", "C", "B", "A", "S")
BAND_THRESHOLDS: tuple[int, ...] = (10, 40, 70, 100)  # lower edges of C, B, A, S
SCORE_MIN = 0
SCORE_MAX = 100


class EndReason(enum.IntEnum):
    """Why an episode ended (RUNNING: it has not). Integer-valued so it fits in arrays."""

    RUNNING = 0
    GOODBYE = 1  # the user said goodbye
    SCORE_ZERO = 2  # score <= 0 (when end_on_zero)
    SCORE_FULL = 3  # score >= success_threshold
    TURN_LIMIT = 4  # the policy has replied max_turns times
    SCORE_LOW = 5  # eval only: score < failure_threshold (SAGE's early stop)


@dataclasses.dataclass(frozen=True)
class EmotionDynamicsConfig:
    """Rules of the emotion score. Validated on construction; errors name the bad field.

    initial_train: the user's starting score in training (RLVER: 30, band C).
    initial_eval: the starting score in evaluation (SAGE: 40, band B).
    max_change: the largest change one reply can make, either way (None: no clamp, as in the
      released "hard" simulator).
    max_turns_train: the most policy replies in a training dialogue.
    max_turns_eval: the most policy replies in an evaluation dialogue.
    success_threshold: a score at or above it ends the dialogue, a success (SAGE).
    failure_threshold: in evaluation, a score below it ends the dialogue (SAGE's early stop).
    end_on_zero: end the dialogue when the score reaches 0.
    eval_end_on_failure: apply failure_threshold in evaluation.
    """

    initial_train: int = 30
    initial_eval: int = 40
    max_change: int | None = 10
    max_turns_train: int = 8
    max_turns_eval: int = 10
    success_threshold: int = 100
    failure_threshold: int = 10
    end_on_zero: bool = True
    eval_end_on_failure: bool = True

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"EmotionDynamicsConfig.{field}: {why} (got {getattr(self, field)!r})")

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        for field in ("initial_train", "initial_eval", "success_threshold", "failure_threshold"):
            v = getattr(self, field)
            if not is_int(v) or not SCORE_MIN <= v <= SCORE_MAX:
                fail(field, f"must be an int in [{SCORE_MIN}, {SCORE_MAX}]")
        if self.max_change is not None and (not is_int(self.max_change) or self.max_change < 1):
            fail("max_change", "must be a positive int, or None for no clamp")
        for field in ("max_turns_train", "max_turns_eval"):
            v = getattr(self, field)
            if not is_int(v) or v < 1:
                fail(field, "must be an int >= 1")
        if self.failure_threshold >= self.success_threshold:
            fail("failure_threshold", "must be below success_threshold")
        for field in ("end_on_zero", "eval_end_on_failure"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be a bool")


DEFAULT_CONFIG = EmotionDynamicsConfig()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def initial_score(cfg: EmotionDynamicsConfig = DEFAULT_CONFIG, mode: Mode = "train") -> int:
    """Starting score: 30 (band C) for training, 40 (band B, SAGE) for evaluation."""
    _check_mode(mode)
    return cfg.initial_train if mode == "train" else cfg.initial_eval


def max_turns(cfg: EmotionDynamicsConfig = DEFAULT_CONFIG, mode: Mode = "train") -> int:
    """Most policy replies in an episode: 8 for training, 10 for evaluation."""
    _check_mode(mode)
    return cfg.max_turns_train if mode == "train" else cfg.max_turns_eval


def _xp(*values: Any) -> Any:
    """jax.numpy if any input is a jax array (or tracer), else numpy."""
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def apply_change(score: Any, delta: Any, cfg: EmotionDynamicsConfig = DEFAULT_CONFIG) -> Any:
    """New score = clip(score + clamp(delta, ±max_change), 0, 100).

    The clamp bounds how much one reply can move the user, so a single lucky or garbled turn
    cannot decide the reward; the [0, 100] range keeps reward = score / 100 in [0, 1].
    """
    xp = _xp(score, delta)
    if cfg.max_change is not None:
        delta = xp.clip(delta, -cfg.max_change, cfg.max_change)
    return xp.clip(xp.asarray(score) + delta, SCORE_MIN, SCORE_MAX)


def band_index(score: Any) -> Any:
    """Index into `BANDS` (0 = F ... 4 = S): the number of band edges at or below the score."""
    xp = _xp(score)
    score = xp.asarray(score)
    return sum((score >= t).astype(xp.int32) for t in BAND_THRESHOLDS)


def band(score: Any) -> Any:
    """Band letter: S >= 100, A >= 70, B >= 40, C >= 10, F < 10.

    A scalar gives a `str`; an array gives a numpy array of letters (strings are host-side only).
    """
    idx = np.asarray(band_index(score))
    letters = np.asarray(BANDS)[idx]
    return str(letters) if letters.ndim == 0 else letters


def is_terminal(
    score: Any,
    turn: Any,
    said_goodbye: Any,
    cfg: EmotionDynamicsConfig = DEFAULT_CONFIG,
    mode: Mode = "train",
) -> tuple[Any, Any]:
    """Whether the episode is over after the policy's `turn`-th reply, and why.

    Args:
      score: current emotion score(s), after this turn's update.
      turn: number of policy replies so far (the first reply is turn 1).
      said_goodbye: whether the user's latest message is a goodbye (`detect_goodbye`).
      mode: "train" (limit 8) or "eval" (limit 10, plus the SAGE stop at score < 10).

    Returns:
      (done, reason). For scalar non-jax inputs: (bool, EndReason). Otherwise arrays of
      bool / int32 of the broadcast shape. When several rules hold, the first of
      SCORE_FULL, SCORE_ZERO, SCORE_LOW, GOODBYE, TURN_LIMIT is reported: the score-based
      reasons are the verifiable ones.
    """
    _check_mode(mode)
    xp = _xp(score, turn, said_goodbye)
    score, turn, said_goodbye = xp.asarray(score), xp.asarray(turn), xp.asarray(said_goodbye)
    limit = max_turns(cfg, mode)
    false = xp.zeros_like(said_goodbye, dtype=bool)
    rules = [
        (score >= cfg.success_threshold, EndReason.SCORE_FULL),
        ((score <= SCORE_MIN) if cfg.end_on_zero else false, EndReason.SCORE_ZERO),
        (
            (score < cfg.failure_threshold)
            if mode == "eval" and cfg.eval_end_on_failure
            else false,
            EndReason.SCORE_LOW,
        ),
        (said_goodbye.astype(bool), EndReason.GOODBYE),
        (turn >= limit, EndReason.TURN_LIMIT),
    ]
    reason = xp.asarray(int(EndReason.RUNNING), dtype=xp.int32)
    for cond, why in reversed(rules):  # earlier rules overwrite later ones
        reason = xp.where(cond, xp.int32(int(why)), reason)
    reason = xp.broadcast_to(
        reason, xp.broadcast_shapes(score.shape, turn.shape, said_goodbye.shape)
    )
    done = reason != int(EndReason.RUNNING)
    if xp is np and reason.ndim == 0:
        return bool(done), EndReason(int(reason))
    return done, reason


def is_success(final_score: Any, cfg: EmotionDynamicsConfig = DEFAULT_CONFIG) -> Any:
    """SAGE success: final score >= success_threshold (100)."""
    return _xp(final_score).asarray(final_score) >= cfg.success_threshold


def is_failure(final_score: Any, cfg: EmotionDynamicsConfig = DEFAULT_CONFIG) -> Any:
    """SAGE failure: final score < failure_threshold (10)."""
    return _xp(final_score).asarray(final_score) < cfg.failure_threshold


# English farewells, matched as whole words, case-insensitively. "see you" only counts when it
# closes a phrase ("see you!", "see you tomorrow."), not in "I can see you are upset".
_EN_GOODBYE = re.compile(
    r"\b(?:good[\s-]?bye|bye(?:[\s-]?bye)?|farewell|"
    r"(?:talk to|catch) you later|"
    r"see (?:you|ya)(?:\s+(?:later|soon|around|tomorrow|next time|then))?(?=\s*(?:[.!?,~]|$)))\b",
    re.IGNORECASE,
)
# RLVER's training rollout and SAGE both end on these two words (substring match).
_ZH_GOODBYE: tuple[str, ...] = ("再见", "拜拜")


def detect_goodbye(text: str, language: Literal["en", "zh"]) -> bool:
    """Whether a user message says goodbye, which ends the episode.

    The simulator is told to say goodbye at band S or F; RLVER detects it by keywords, so do
    we. Like RLVER's check this is lexical: "I never said goodbye to her" also matches.
    """
    if language == "zh":
        return any(word in text for word in _ZH_GOODBYE)
    if language == "en":
        return _EN_GOODBYE.search(text) is not None
    raise ValueError(f"language: expected 'en' or 'zh', got {language!r}")
