"""Emotion dynamics: every update, band and termination rule, on numpy and jax inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.env.dynamics import (
    BANDS,
    DEFAULT_CONFIG,
    EmotionDynamicsConfig,
    EndReason,
    apply_change,
    band,
    band_index,
    detect_goodbye,
    initial_score,
    is_failure,
    is_success,
    is_terminal,
    max_turns,
)

NO_CLAMP = EmotionDynamicsConfig(max_change=None)


def test_defaults_match_rlver() -> None:
    cfg = DEFAULT_CONFIG
    assert (cfg.initial_train, cfg.initial_eval, cfg.max_change) == (30, 40, 10)
    assert (cfg.max_turns_train, cfg.max_turns_eval) == (8, 10)
    assert (cfg.success_threshold, cfg.failure_threshold, cfg.end_on_zero) == (100, 10, True)
    assert initial_score(cfg, "train") == 30 and initial_score(cfg, "eval") == 40
    assert max_turns(cfg, "train") == 8 and max_turns(cfg, "eval") == 10
    with pytest.raises(ValueError, match="mode"):
        initial_score(cfg, "test")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("score", "delta", "expected"),
    [
        (30, 7, 37),  # inside the clamp: unchanged
        (30, 25, 40),  # clamped to +10
        (30, -25, 20),  # clamped to -10
        (30, 10, 40),  # exactly at the clamp
        (95, 8, 100),  # capped at 100
        (100, 5, 100),
        (5, -8, 0),  # floored at 0
        (0, -3, 0),
    ],
)
def test_apply_change_clamped(score: int, delta: int, expected: int) -> None:
    assert int(apply_change(score, delta)) == expected


@pytest.mark.parametrize(
    ("score", "delta", "expected"), [(30, 25, 55), (30, -25, 5), (30, -45, 0), (80, 35, 100)]
)
def test_apply_change_without_clamp(score: int, delta: int, expected: int) -> None:
    assert int(apply_change(score, delta, NO_CLAMP)) == expected


def test_apply_change_vectorised_numpy_and_jax() -> None:
    scores, deltas = [30, 30, 95, 5, 50], [25, -25, 8, -8, 3]
    expected = np.array([40, 20, 100, 0, 53])
    out_np = apply_change(np.array(scores), np.array(deltas))
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_array_equal(out_np, expected)
    out_jax = jax.jit(apply_change)(jnp.array(scores), jnp.array(deltas))
    assert isinstance(out_jax, jax.Array)
    np.testing.assert_array_equal(np.asarray(out_jax), expected)


@pytest.mark.parametrize(
    ("score", "letter"),
    [
        (0, "F"),
        (9, "F"),
        (10, "C"),
        (39, "C"),
        (40, "B"),
        (69, "B"),
        (70, "A"),
        (99, "A"),
        (100, "S"),
    ],
)
def test_band_edges(score: int, letter: str) -> None:
    assert band(score) == letter
    assert BANDS[int(band_index(score))] == letter
    assert int(band_index(jnp.asarray(score))) == BANDS.index(letter)


def test_band_arrays() -> None:
    np.testing.assert_array_equal(band(np.array([5, 10, 40, 70, 100])), ["F", "C", "B", "A", "S"])
    np.testing.assert_array_equal(np.asarray(band_index(jnp.array([9, 10, 100]))), [0, 1, 4])


def test_terminal_running() -> None:
    assert is_terminal(50, 3, False) == (False, EndReason.RUNNING)
    assert is_terminal(50, 3, False, mode="eval") == (False, EndReason.RUNNING)


def test_terminal_goodbye() -> None:
    assert is_terminal(50, 1, True) == (True, EndReason.GOODBYE)
    assert is_terminal(50, 1, True, mode="eval") == (True, EndReason.GOODBYE)


def test_terminal_score_zero() -> None:
    assert is_terminal(0, 2, False) == (True, EndReason.SCORE_ZERO)
    assert is_terminal(0, 2, False, EmotionDynamicsConfig(end_on_zero=False)) == (
        False,
        EndReason.RUNNING,
    )
    assert is_terminal(1, 2, False) == (False, EndReason.RUNNING)


def test_terminal_score_full() -> None:
    assert is_terminal(100, 2, False) == (True, EndReason.SCORE_FULL)
    assert is_terminal(99, 2, False) == (False, EndReason.RUNNING)
    # Several rules hold: the score-based reason wins.
    assert is_terminal(100, 8, True) == (True, EndReason.SCORE_FULL)
    assert is_terminal(0, 8, True) == (True, EndReason.SCORE_ZERO)


def test_terminal_turn_limit_train_vs_eval() -> None:
    assert is_terminal(50, 7, False, mode="train") == (False, EndReason.RUNNING)
    assert is_terminal(50, 8, False, mode="train") == (True, EndReason.TURN_LIMIT)
    assert is_terminal(50, 8, False, mode="eval") == (False, EndReason.RUNNING)
    assert is_terminal(50, 9, False, mode="eval") == (False, EndReason.RUNNING)
    assert is_terminal(50, 10, False, mode="eval") == (True, EndReason.TURN_LIMIT)


def test_terminal_eval_failure_stop() -> None:
    # SAGE stops an evaluation dialogue once the score is below 10; training does not.
    assert is_terminal(9, 2, False, mode="eval") == (True, EndReason.SCORE_LOW)
    assert is_terminal(10, 2, False, mode="eval") == (False, EndReason.RUNNING)
    assert is_terminal(9, 2, False, mode="train") == (False, EndReason.RUNNING)
    off = EmotionDynamicsConfig(eval_end_on_failure=False)
    assert is_terminal(9, 2, False, off, mode="eval") == (False, EndReason.RUNNING)


def test_terminal_vectorised_jit() -> None:
    scores = jnp.array([50, 100, 0, 50, 50, 5])
    turns = jnp.array([1, 1, 1, 1, 8, 1])
    bye = jnp.array([False, False, False, True, False, False])
    done, reason = jax.jit(lambda s, t, b: is_terminal(s, t, b, mode="train"))(scores, turns, bye)
    np.testing.assert_array_equal(np.asarray(done), [False, True, True, True, True, False])
    np.testing.assert_array_equal(
        np.asarray(reason),
        [
            EndReason.RUNNING,
            EndReason.SCORE_FULL,
            EndReason.SCORE_ZERO,
            EndReason.GOODBYE,
            EndReason.TURN_LIMIT,
            EndReason.RUNNING,
        ],
    )
    done_np, reason_np = is_terminal(np.asarray(scores), np.asarray(turns), np.asarray(bye))
    np.testing.assert_array_equal(done_np, np.asarray(done))
    np.testing.assert_array_equal(reason_np, np.asarray(reason))
    # Scalars broadcast against arrays.
    done_b, _ = is_terminal(np.array([50, 100]), 1, False)
    np.testing.assert_array_equal(done_b, [False, True])


def test_success_failure() -> None:
    np.testing.assert_array_equal(is_success(np.array([99, 100])), [False, True])
    np.testing.assert_array_equal(is_failure(np.array([9, 10])), [True, False])
    assert bool(is_success(jnp.asarray(100))) and not bool(is_failure(jnp.asarray(10)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial_train": -1}, "initial_train"),
        ({"initial_eval": 101}, "initial_eval"),
        ({"max_change": 0}, "max_change"),
        ({"max_change": 2.5}, "max_change"),
        ({"max_turns_train": 0}, "max_turns_train"),
        ({"max_turns_eval": True}, "max_turns_eval"),
        ({"success_threshold": 150}, "success_threshold"),
        ({"failure_threshold": 100}, "failure_threshold"),
        ({"end_on_zero": 1}, "end_on_zero"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"EmotionDynamicsConfig\.{field}\b"):
        EmotionDynamicsConfig(**kwargs)


@pytest.mark.parametrize(
    "text",
    [
        "Goodbye.",
        "goodbye!",
        "Good bye then",
        "good-bye",
        "OK, bye.",
        "Bye",
        "bye-bye!",
        "BYE BYE",
        "See you.",
        "see you tomorrow!",
        "See ya",
        "I'll see you later",
        "Farewell.",
        "talk to you later",
        "Thanks, I need to go now. Bye~",
    ],
)
def test_goodbye_en_positive(text: str) -> None:
    assert detect_goodbye(text, "en")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The byelaw says no.",
        "I live nearby.",
        "I went by the station.",
        "standby mode",
        "I can see you are trying",
        "See your doctor",
        "goodbyes are hard for me",
        "I'm fine, thanks.",
    ],
)
def test_goodbye_en_negative(text: str) -> None:
    assert not detect_goodbye(text, "en")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("好吧，再见。", True),
        ("拜拜啦", True),
        ("再见了，谢谢你", True),
        ("我还想再聊聊", False),
        ("再接再厉吧", False),
        ("我再也见不到他了", False),
        ("bye", False),
    ],
)
def test_goodbye_zh(text: str, expected: bool) -> None:
    assert detect_goodbye(text, "zh") is expected


def test_goodbye_bad_language() -> None:
    with pytest.raises(ValueError, match="language"):
        detect_goodbye("bye", "fr")  # type: ignore[arg-type]
