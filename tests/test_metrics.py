"""MetricsWriter (JSONL + TensorBoard), read_metrics, PhaseTimer and the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.metrics import (
    METRICS_FILE,
    MetricsWriter,
    PhaseTimer,
    progress_bar,
    read_metrics,
    to_scalar,
)


def test_jsonl_contents_and_tensorboard_events(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=True, enabled=True) as writer:
        writer.write(
            1,
            {
                "reward/mean": jnp.float32(0.5),
                "actor/pg_loss": np.float64(-1.25),
                "count": np.int32(7),
                "ok": True,
                "tag": "ppo",
            },
        )
        writer.write(2, {"reward/mean": jnp.array([float("nan")]), "critic/vf": float("inf")})
        # flushed per write: readable before close
        assert len(read_metrics(tmp_path / METRICS_FILE)) == 2
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    first, second = (json.loads(line) for line in lines)  # strict JSON: no NaN tokens
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert first["step"] == 1 and first["reward/mean"] == 0.5 and first["actor/pg_loss"] == -1.25
    assert first["count"] == 7 and isinstance(first["count"], int) and first["tag"] == "ppo"
    assert "nonfinite" not in first and isinstance(first["time"], float)
    assert second["reward/mean"] is None and second["critic/vf"] is None
    assert second["nonfinite"] == ["reward/mean", "critic/vf"]
    assert read_metrics(tmp_path) == [first, second]
    events = list(tmp_path.glob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_scalars_readable(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True) as writer:
        for step in range(3):
            writer.write(step, {"reward/mean": step * 0.5})
    from tensorboardX.proto import event_pb2

    data = next(tmp_path.glob("events.out.tfevents*")).read_bytes()
    seen = []
    pos = 0
    while pos < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        n = int.from_bytes(data[pos : pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        seen += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    assert seen == [(0, "reward/mean", 0.0), (1, "reward/mean", 0.5), (2, "reward/mean", 1.0)]


def test_append_truncate_after_and_bad_lines(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False, enabled=True) as w:
        for step in range(1, 6):
            w.write(step, {"x": step})
    # resume from a checkpoint at step 3: steps 4 and 5 will be replayed, so drop them
    with MetricsWriter(tmp_path, tensorboard=False, enabled=True, truncate_after=3) as w:
        w.write(4, {"x": 40})
    got = [(r["step"], r["x"]) for r in read_metrics(tmp_path)]
    assert got == [(1, 1), (2, 2), (3, 3), (4, 40)]
    path = tmp_path / METRICS_FILE
    with path.open("a") as f:
        f.write('{"step": 5, "x"')  # killed mid-write: last line tolerated
    assert len(read_metrics(path)) == 4
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2"):
        read_metrics(path)
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_disabled_writer_and_bad_values(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "off", enabled=False)
    assert w.write(1, {"a": 1.0})["a"] == 1.0
    w.close()
    assert not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match="'vec'"):
        to_scalar(np.zeros(3), "vec")
    with (
        MetricsWriter(tmp_path, tensorboard=False, enabled=True) as w,
        pytest.raises(ValueError, match="reserved"),
    ):
        w.write(1, {"step": 3})


def test_phase_timer_accumulates_per_step() -> None:
    timer = PhaseTimer()
    for _ in range(2):
        with timer("rollout"):
            time.sleep(0.01)
    with timer("learner"):
        time.sleep(0.005)
    lap = timer.lap()
    assert set(lap) == {"time/rollout", "time/learner", "time/step"}
    assert lap["time/rollout"] >= 0.02 and lap["time/learner"] >= 0.005
    assert lap["time/step"] >= lap["time/rollout"] + lap["time/learner"]
    assert set(timer.lap()) == {"time/step"}  # reset for the next step


def test_phase_timer_blocks_only_when_asked() -> None:
    x = jnp.arange(3.0)
    assert PhaseTimer().ready(x) is x  # training: no synchronisation added
    timer = PhaseTimer(block=True)  # a benchmark's breakdown (Learner.update's timings)
    with timer("train_s"):
        y = timer.ready(x + 1)
    assert y.is_ready() and set(timer.totals) == {"train_s"} and timer.totals["train_s"] > 0


def test_progress_bar_shows_step_reward_and_rate() -> None:
    with progress_bar(10, initial=2) as bar:
        bar.update(3, {"reward/mean": jnp.float32(0.75)})
        bar.update(5, {})
        assert bar._bar.n == 5
        post = bar._bar.postfix
        assert "step=5" in post and "s/step=" in post and "reward" not in post
        bar.update(6, {"reward/mean": float("nan")})
        assert "reward=nan" in bar._bar.postfix
