"""Checkpointer (orbax save / restore into sharded targets), metadata, preemption, crash saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlver_jax.env.profile_dataset import profile_iterator
from rlver_jax.env.profiles import load_builtin_profiles
from rlver_jax.parallel.mesh import MeshConfig, make_mesh
from rlver_jax.rl.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    checkpoint_extra,
    restore_iterator,
)
from rlver_jax.rl.signals import PreemptionGuard, save_and_stop_if_requested, save_on_crash

REPO = Path(__file__).resolve().parents[1]


@struct.dataclass
class State:
    """Mirrors the learner's TrainState: params, optax state, None critic, scalar step, rng."""

    policy: Any
    critic: Any
    policy_opt: Any
    step: jax.Array
    rng: jax.Array


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _specs() -> dict[str, PartitionSpec]:
    return {
        "w": PartitionSpec("fsdp", "tensor"),
        "b": PartitionSpec(("data", "fsdp")),
        "e": PartitionSpec(None, "tensor"),
    }


def _shapes() -> dict[str, tuple[int, ...]]:
    return {"w": (8, 4), "b": (8,), "e": (2, 6)}


def make_state(mesh: Mesh, seed: int = 0) -> State:
    """A sharded state whose scalars (step, adam count) are single-device, as from jnp.int32."""
    keys = jax.random.split(jax.random.key(seed), 3)
    policy = {
        name: jax.device_put(
            jax.random.normal(k, shape, jnp.float32), NamedSharding(mesh, _specs()[name])
        )
        for k, (name, shape) in zip(keys, _shapes().items(), strict=True)
    }
    opt = optax.adamw(1e-3).init(policy)
    opt = jax.tree.map(lambda x: x + 0.5 if x.ndim else x + 7, opt)  # non-trivial values
    return State(policy, None, opt, jnp.int32(5 + seed), jnp.array([seed, 42], jnp.uint32))


def abstract_of(mesh: Mesh) -> State:
    """``eval_shape`` targets: sharded weights, scalars and rng with *no* sharding (the gotcha)."""
    shaped = jax.eval_shape(lambda: make_state(mesh))

    def with_sharding(x: jax.ShapeDtypeStruct, path: Any) -> jax.ShapeDtypeStruct:
        name = str(getattr(path[-1], "key", ""))
        spec = _specs().get(name) if x.ndim else None
        sharding = NamedSharding(mesh, spec) if spec is not None else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(lambda p, x: with_sharding(x, p), shaped)


def host(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(host(a), host(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_bitwise_into_target_shardings(tmp_path: Path, mesh: Mesh) -> None:
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.save(1, state, {"seed": 3, "metrics": {"loss": np.float32(0.25)}})
        ckpt.wait()
        restored, extra = ckpt.restore(abstract_state=abstract_of(mesh))
    assert_bitwise_equal(state, restored)
    assert restored.critic is None
    assert extra == {"seed": 3, "metrics": {"loss": 0.25}}
    replicated = NamedSharding(mesh, PartitionSpec())
    assert restored.policy["w"].sharding == NamedSharding(mesh, _specs()["w"])
    assert restored.policy_opt[0].mu["b"].sharding == NamedSharding(mesh, _specs()["b"])
    for scalar in (restored.step, restored.rng, restored.policy_opt[0].count):
        assert scalar.sharding == replicated  # not SingleDeviceSharding as saved
    # the restored state feeds a jit with replicated in_shardings without any transfer error
    f = jax.jit(lambda s: s.step + 1, in_shardings=(jax.tree.map(lambda x: x.sharding, restored),))
    assert int(f(restored)) == 6


def test_keep_last_k(tmp_path: Path, mesh: Mesh) -> None:
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=1, keep=2, async_save=False) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]


def test_save_every_and_force(tmp_path: Path, mesh: Mesh) -> None:
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=3, keep=5) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state)]
        assert saved == [3, 6]
        assert ckpt.save(7, state, force=True)
        assert not ckpt.save(7, state, force=True)  # already saved: no duplicate
        ckpt.wait()
        assert ckpt.all_steps() == [3, 6, 7]


def test_async_save_survives_donation_then_wait(tmp_path: Path, mesh: Mesh) -> None:
    state = make_state(mesh)
    expected = host(state)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=True) as ckpt:
        assert ckpt.save(2, state, {"k": 1})
        for leaf in jax.tree.leaves(state):  # what donating the state to the next step does
            leaf.delete()
        ckpt.wait()
        assert ckpt.latest_step() == 2
        restored, _ = ckpt.restore(abstract_state=abstract_of(mesh))
    assert all(x.tobytes() == y.tobytes() for x, y in zip(expected, host(restored), strict=True))


def test_restore_missing_or_empty_directory(tmp_path: Path, mesh: Mesh) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as err:
        Checkpointer(missing, save_every=1, keep=1).restore(abstract_state=abstract_of(mesh))
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no finished checkpoint") as err:
        Checkpointer(empty, save_every=1, keep=1).restore(abstract_state=abstract_of(mesh))
    assert str(empty) in str(err.value)


def test_restore_mismatched_tree_names_key(tmp_path: Path, mesh: Mesh) -> None:
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, make_state(mesh))
        ckpt.wait()
        target = abstract_of(mesh)
        extra_key = target.replace(policy={**target.policy, "bias2": target.policy["b"]})
        with pytest.raises(CheckpointMismatchError, match="'policy/bias2'") as err:
            ckpt.restore(abstract_state=extra_key)
        assert str(tmp_path / "1" / "state") in str(err.value)
        missing = target.replace(policy={k: v for k, v in target.policy.items() if k != "e"})
        with pytest.raises(CheckpointMismatchError, match="'policy/e' is in the checkpoint"):
            ckpt.restore(abstract_state=missing)
        w = target.policy["w"]
        wide = jax.ShapeDtypeStruct((8, 8), w.dtype, sharding=w.sharding)
        reshaped = target.replace(policy={**target.policy, "w": wide})
        with pytest.raises(CheckpointMismatchError, match=r"'policy/w'.*float32\[8, 4\]"):
            ckpt.restore(abstract_state=reshaped)
        with pytest.raises(CheckpointNotFoundError, match="step 9"):
            ckpt.restore(9, abstract_state=target)


def test_corrupt_or_missing_metadata_names_path(tmp_path: Path, mesh: Mesh) -> None:
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, make_state(mesh), {"a": 1})
        ckpt.wait()
        meta = tmp_path / "1" / "extra" / "metadata"
        meta.write_text("{not json")
        with pytest.raises(CheckpointCorruptError, match="unreadable") as err:
            ckpt.restore(abstract_state=abstract_of(mesh))
        assert str(meta) in str(err.value)
        meta.unlink()
        with pytest.raises(CheckpointCorruptError, match="missing") as err:
            ckpt.read_extra()
        assert str(meta) in str(err.value)


def test_iterator_state_round_trip_through_metadata(tmp_path: Path, mesh: Mesh) -> None:
    profiles = load_builtin_profiles("en", "train")[:12]
    it = profile_iterator(profiles, seed=1, shard_index=0, shard_count=1)
    for _ in range(5):
        next(it)
    extra = checkpoint_extra(data_iterator=it, seed=1, config={"lr": 1e-6}, metrics={"x": 1.0})
    expected = [next(it).id for _ in range(10)]  # crosses an epoch boundary (12 records)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(5, make_state(mesh), extra)
        ckpt.wait()
        _, loaded = ckpt.restore(abstract_state=abstract_of(mesh))
    assert loaded["config"] == {"lr": 1e-6} and loaded["seed"] == 1
    fresh = profile_iterator(profiles, seed=1, shard_index=0, shard_count=1)
    assert restore_iterator(fresh, loaded)
    assert [next(fresh).id for _ in range(10)] == expected


def test_preemption_guard_sigterm_sets_flag_and_restores_handlers() -> None:
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop and guard.signal_received == signal.SIGTERM
        assert guard.stop_agreed()
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int


def test_preemption_guard_second_sigint_exits_immediately() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second SIGINT must raise")  # pragma: no cover
    assert signal.getsignal(signal.SIGINT) is before


def test_save_on_crash_saves_last_good_state(tmp_path: Path, mesh: Mesh) -> None:
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=100, keep=2) as ckpt:
        with pytest.raises(RuntimeError, match="boom"), save_on_crash(ckpt) as last:
            last.update(3, state, {"why": "crash"})
            raise RuntimeError("boom")
        assert ckpt.latest_step() == 3 and ckpt.read_extra() == {"why": "crash"}
        donated = make_state(mesh, seed=1)
        with pytest.raises(RuntimeError) as err, save_on_crash(ckpt) as last:
            last.update(4, donated)
            jax.tree.map(lambda x: x.delete(), donated)
            raise RuntimeError("inside a donated step")
        assert "donated" in "".join(err.value.__notes__)
        assert ckpt.latest_step() == 3
        # save_and_stop_if_requested: no stop -> nothing; stop -> forced save + wait
        guard = PreemptionGuard()
        assert not save_and_stop_if_requested(guard, ckpt, 5, state)
        guard.request_stop()
        assert save_and_stop_if_requested(guard, ckpt, 5, state)
        assert ckpt.all_steps() == [3, 5]


LOOP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from rlver_jax.rl.checkpoint import Checkpointer
    from rlver_jax.rl.signals import PreemptionGuard, save_and_stop_if_requested

    ckpt = Checkpointer(sys.argv[1], save_every=1000, keep=2)
    state = {"w": jnp.zeros((4,)), "step": jnp.int32(0)}
    with PreemptionGuard() as guard:
        for step in range(1, 100000):
            state = {"w": state["w"] + 1, "step": jnp.int32(step)}
            print(f"step {step}", flush=True)
            if save_and_stop_if_requested(guard, ckpt, step, state, {"iterator": step}):
                print(f"saved {step}", flush=True)
                break
            time.sleep(0.02)
    ckpt.close()
    """
)


def test_subprocess_sigterm_saves_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP_SCRIPT, str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith("step 3"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    saved = int(next(line for line in out.splitlines() if line.startswith("saved")).split()[1])
    assert saved >= 3
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
    assert ckpt.all_steps() == [saved]
    target = {
        "w": jax.ShapeDtypeStruct((4,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    state, extra = ckpt.restore(abstract_state=target)
    assert int(state["step"]) == saved and extra == {"iterator": saved}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, saved, np.float32))
    ckpt.close()
