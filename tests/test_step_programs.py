"""The compiled dry run of an RL step (`rlver-jax plan --compile`): its accounting against
closed forms (collectives by loop trip counts, matmul FLOPs), and the dry run itself on a
Qwen2 shape on 8 fake devices (the 7B configs: slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlver_jax.cli import plan as plan_cli
from rlver_jax.parallel.collectives import collective_traffic
from rlver_jax.parallel.flops import traced_flops

ROOT = Path(__file__).resolve().parent.parent
S = jax.ShapeDtypeStruct


def test_collectives_count_each_loop_trip_and_report_unknown_loops_per_iteration() -> None:
    """A psum of f32[16] per device inside a scan of 5 inside a scan of 3 (15 all-reduces of
    64 B), and one inside a while loop of unknown length (per iteration)."""
    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])

    def body(x: jax.Array) -> jax.Array:
        inner = lambda c, _: (c + jax.lax.psum(c, "x") * 0.5, None)
        outer = lambda c, _: (jax.lax.scan(inner, c, None, length=5)[0], None)
        y = jax.lax.scan(outer, x, None, length=3)[0]
        loop = lambda c: (c[0] + jax.lax.psum(c[0], "x") * 0.5, c[1] + 1)
        return jax.lax.while_loop(lambda c: c[1] < jnp.sum(c[0]), loop, (y, 0))[0]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = S((128,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    hlo = fn.lower(x).compile().as_text()
    traffic = collective_traffic(hlo)
    assert traffic.per_call == {"all-reduce": 15 * 16 * 4}, traffic
    assert traffic.per_iteration == {"all-reduce": 16 * 4}, traffic


def test_flops_count_scan_lengths_remat_and_while_bodies() -> None:
    """grad of a rematerialised 4-layer scan: forward, recomputed forward and two backward
    matmuls per layer (4 x the forward); a while body's matmul per iteration."""
    w, x = S((4, 128, 128), jnp.float32), S((16, 128), jnp.float32)
    layer = lambda h, wi: (jnp.tanh(h @ wi), None)
    loss = lambda w, x: jax.lax.scan(jax.checkpoint(layer), x, w)[0].sum()
    forward = 4 * 2 * 16 * 128 * 128
    assert traced_flops(jax.jit(jax.grad(loss)).trace(w, x)).per_call == 4 * forward

    def loop(w: jax.Array, x: jax.Array) -> jax.Array:
        step = lambda c: (c[0] @ w[0], c[1] + 1)
        return jax.lax.while_loop(lambda c: c[1] < 3, step, (x, 0))[0]

    flops = traced_flops(jax.jit(loop).trace(w, x))
    assert (flops.per_call, flops.per_iteration) == (0, 2 * 16 * 128 * 128)


QWEN_SMALL = [
    "--config", "configs/qwen2.5-7b_grpo_think_h100.yaml", "--device-kind", "h100",
    "--devices", "8", "model.path=/absent/qwen2.5-1.5b-instruct",
    "user.model.path=/absent/qwen2.5-0.5b-instruct", "rollout.profiles_per_batch=8",
    "rollout.max_prompt_tokens=1024", "rollout.max_reply_tokens=256",
    "learner.micro_batch_size=8", "dynamics.max_turns_train=2",
]  # fmt: skip


def test_dry_run_of_a_qwen2_step_on_8_devices(capsys: pytest.CaptureFixture[str]) -> None:
    """Every program of a GRPO think step (Qwen2.5-1.5B policy, Qwen2.5-0.5B LLM user) compiles
    on 8 fake devices; the decode moves at most 1% of the policy's bf16 weights per token, each
    program fits an H100, and the refusal names the compiled program that does not fit."""
    assert plan_cli.main([*QWEN_SMALL, "--compile", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["rows"]}
    assert {"reshard", "policy prefill", "policy decode", "user judge", "user prefill",
            "user decode", "advantages", "train step"} <= set(rows)  # fmt: skip
    assert "old logprobs" not in rows  # GRPO, one mini-batch: on-policy, no old forward
    weights_bf16 = 2 * 1_543_714_304  # Qwen2.5-1.5B's parameters
    decode = rows["policy decode"]
    assert decode["iterations"] == 256
    per_token = sum(decode["traffic"]["per_iteration"].values())
    assert 0 < per_token <= 0.01 * weights_bf16
    usable = 0.95 * doc["device_memory"]
    assert all(0 < r["judged_peak"] <= usable for r in rows.values())
    assert rows["train step"]["flops"] > 6 * 1.5e9 * 8 * 1024  # 6 N tokens at the least
    # a device too small for the compiled programs (and the formula): exit 2
    assert plan_cli.main([*QWEN_SMALL, "--compile", "--device-memory-gb", "2"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,flags",
    [("qwen2.5-7b_ppo_think_v5p", ["--accelerator", "v5p-32"]),
     ("qwen2.5-7b_ppo_think_h100", ["--device-kind", "h100", "--devices", "8"])],
)  # fmt: skip
def test_dry_run_of_the_7b_configs(config: str, flags: list[str]) -> None:
    """The shipped 7B PPO think configs, compiled at full size on 16 / 8 fake devices (a fresh
    process: the device count is set before JAX starts): every program fits, the decode's
    collectives per token are at most 1% of the policy's bf16 weights."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "rlver_jax.cli", "plan", "--compile", "--json",
           "--config", f"configs/{config}.yaml", *flags, "--hf-config",
           "qwen2.5-7b-instruct"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    decode = next(r for r in doc["rows"] if r["name"] == "policy decode")
    per_token = sum(decode["traffic"]["per_iteration"].values())
    assert per_token <= 0.01 * 2 * 7_615_616_512
    assert max(r["judged_peak"] for r in doc["rows"]) <= 0.95 * doc["device_memory"]
    assert np.isfinite([r["flops"] for r in doc["rows"]]).all()
