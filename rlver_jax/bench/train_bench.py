"""`rlver-jax bench train`: learner tokens/s and MFU against this machine's measured matmul peak.

One GRPO learner step (:meth:`rlver_jax.rl.learner.Learner.update`: pad, compute_old,
compute_advantages, train_step; one mini-batch, so on-policy: compute_old is skipped, see the
learner's docs) on a synthetic batch of ``batch x seq_len`` tokens, all real
(no padding), the second half of each row being policy tokens (the loss mask). The model is
SmolLM2-135M's shape with random weights (``--weights smollm2`` loads the real ones; the
speed is the same), another known shape with random weights (``--model qwen2.5-0.5b``: the GPU
benchmark, see the README) or a minuscule model (``--tiny``, for tests). Per compute dtype
it prints:

- compile_s: trace + lower + compile seconds of the first step (jax's monitoring events);
- step_s (best of the warm steps), old_s / train_s: its compute_old and train_step parts;
- tok_s = batch * seq_len / step_s;
- gflop_s = model FLOPs of the step / step_s, and mfu = gflop_s / peak_gflop, where peak_gflop
  is MEASURED here: the best rate of a jitted 2048 x 2048 @ 2048 x 2048 ``jnp.dot`` in the same
  dtype (:func:`rlver_jax.bench.common.matmul_peak`); mfu_train: train_step alone;
- warm_compiles: compilations during the warm steps (must be 0); rss_peak_mb (process-wide
  maximum so far, so later rows include earlier ones), dev_peak_mb (None on CPU).

Model FLOPs (the usual "model FLOPs", i.e. not counting rematerialisation), per token of a row
of length T, with L layers, D hidden, H query heads, K kv heads, Dh head dim, F MLP width, V
vocabulary::

    N_mm    = L (2 D H Dh + 2 D K Dh + 3 D F) + D V     # matmul weights: q, o, k, v, MLP, lm head
    fwd     = 2 N_mm + 4 L T H Dh                       # + QK^T and PV over all T keys
    train   = 3 fwd = 6 N_mm + 12 L T H Dh              # forward + backward (2x forward)
    step    = train (+ fwd where compute_old runs: not on-policy; GRPO without KL has one
              policy forward there, no ref/critic)

The embedding gather, norms, RoPE, softmax and the optimiser are not counted (a few % at most).
Our attention computes the full T x T score matrix (masked), hence T and not T / 2.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import numpy as np

from rlver_jax.bench.common import (
    finish,
    format_row,
    header,
    machine_line,
    matmul_peak,
    timed_update,
)
from rlver_jax.bench.models import check_model, model_and_params
from rlver_jax.bench.sample_bench import device_peak_mb, rss_peak_mb
from rlver_jax.models.config import ModelConfig
from rlver_jax.trajectories import Trajectories

COLUMNS = (
    ("model", "{}"), ("dtype", "{}"), ("batch", "{}"), ("seq", "{}"), ("compile_s", "{:.1f}"),
    ("step_s", "{:.3f}"), ("old_s", "{:.3f}"), ("train_s", "{:.3f}"), ("tok_s", "{:.0f}"),
    ("gflop_s", "{:.1f}"), ("peak_gflop", "{:.1f}"), ("mfu", "{:.3f}"), ("mfu_train", "{:.3f}"),
    ("recompiles", "{}"), ("rss_peak_mb", "{:.0f}"), ("dev_peak_mb", "{:.0f}"),
)  # fmt: skip
TARGET_MFU = 0.40
GROUP = 4  # GRPO group size of the synthetic batch


def matmul_params(cfg: ModelConfig) -> int:
    """``N_mm = L (2 D H Dh + 2 D K Dh + 3 D F) + D V``: weights used in matmuls (the tied or
    untied lm head included, the embedding gather, norms and biases excluded)."""
    d, hd, kd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = 2 * d * hd + 2 * d * kd + 3 * d * cfg.intermediate_size
    return cfg.num_layers * layer + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, on_policy: bool) -> dict[str, float]:
    """Model FLOPs per token (see the module docstring): ``fwd = 2 N_mm + 4 L T H Dh``,
    ``train = 3 fwd`` (forward + backward), ``step = train`` on-policy, else ``train + fwd``
    (compute_old)."""
    attn = 4.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    fwd = 2.0 * matmul_params(cfg) + attn
    return {"fwd": fwd, "train": 3.0 * fwd, "step": (3.0 if on_policy else 4.0) * fwd}


def synthetic_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> Trajectories:
    """``batch`` full rows of random tokens; the second half is the policy's (loss mask), the
    score varies within each GRPO group of ``GROUP`` rows (non-zero advantages)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (batch, seq_len), dtype=np.int32)
    token_mask = np.ones((batch, seq_len), bool)
    loss_mask = np.zeros((batch, seq_len), bool)
    loss_mask[:, seq_len // 2 :] = True
    scores = rng.random(batch).astype(np.float32)
    rewards = np.zeros((batch, seq_len), np.float32)
    rewards[:, -1] = scores
    return Trajectories(
        tokens=tokens, token_mask=token_mask, loss_mask=loss_mask,
        sampler_logprobs=np.zeros((batch, seq_len), np.float32), rewards=rewards, scores=scores,
        group_ids=(np.arange(batch) // GROUP).astype(np.int32),
        dialogue_ids=np.arange(batch, dtype=np.int32), format_ok=np.ones(batch, bool),
    )  # fmt: skip


def bench_dtype(dtype: str, args: argparse.Namespace, peak: float, model: str) -> dict[str, Any]:
    """Warm-up step (compiles), then ``args.steps - 1`` timed steps; returns the table row."""
    from rlver_jax.parallel.compile_count import count_compiles
    from rlver_jax.rl.learner import Learner
    from rlver_jax.rl.optim import LearnerConfig

    cfg, params = model_and_params(model, args.weights, dtype, args.param_dtype, args.remat)
    if args.attention_block is not None:
        cfg = cfg.replace(attention_block=args.attention_block)
    micro = args.micro_batch or args.batch
    lcfg = LearnerConfig(
        algorithm="grpo", kl_coef=0.0, mini_batch_size=args.batch, micro_batch_size=micro,
        forward_micro_batch_size=micro, seq_buckets=(args.seq_len,), actor_lr=1e-6,
        actor_warmup_ratio=0.0,
    )  # fmt: skip
    copts = {"xla_backend_optimization_level": 0} if args.fast_compile else None
    learner = Learner(cfg, lcfg, None, copts)
    state = learner.init_state(params, jax.random.key_data(jax.random.key(0)))
    del params
    traj = synthetic_batch(cfg, args.batch, args.seq_len)
    with count_compiles() as first:
        state, _, _ = timed_update(learner, state, traj)
    compile_s = first.seconds
    timings = []
    with count_compiles() as warm:
        for _ in range(max(args.steps - 1, 1)):
            state, metrics, tm = timed_update(learner, state, traj)
            timings.append(tm)
    if warm.count:
        print(f"  recompiled after warm-up: {warm.names}", flush=True)
    best = min(timings, key=lambda t: t["total_s"])
    fl = flops_per_token(cfg, args.seq_len, learner.on_policy(args.batch))
    tokens = args.batch * args.seq_len
    gflop_s = tokens * fl["step"] / best["total_s"] / 1e9
    del state
    return {
        "model": model, "dtype": dtype, "batch": args.batch, "seq": args.seq_len,
        "compile_s": compile_s, "step_s": best["total_s"], "old_s": best["old_s"],
        "train_s": best["train_s"], "tok_s": tokens / best["total_s"], "gflop_s": gflop_s,
        "peak_gflop": peak / 1e9, "mfu": gflop_s * 1e9 / peak,
        "mfu_train": tokens * fl["train"] / best["train_s"] / peak,
        "recompiles": warm.count, "rss_peak_mb": rss_peak_mb(),
        "dev_peak_mb": device_peak_mb(), "flops_per_token": fl,
        "matmul_params": matmul_params(cfg), "loss_finite": bool(np.isfinite(
            metrics.get("actor/pg_loss", 0.0))),
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlver-jax bench train", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="rows per step (one mini-batch)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: --batch")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes")
    ap.add_argument("--param-dtype", default="float32", help="master weights' dtype")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument(
        "--attention-block", type=int, default=None,
        help="model.attention_block: queries per attention block (0: unblocked; default: the "
        "model config's, 1024)",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=3, help="steps per dtype; the first compiles")
    ap.add_argument("--weights", default="random", choices=["random", "smollm2"])
    ap.add_argument("--tiny", action="store_true", help="a minuscule model (tests)")
    ap.add_argument(
        "--model", default="smollm2",
        help="smollm2 (SmolLM2-135M), or a shape `rlver-jax plan` knows, e.g. qwen2.5-0.5b "
        "(random weights; the GPU benchmark: --model qwen2.5-0.5b --dtypes bfloat16)",
    )  # fmt: skip
    ap.add_argument(
        "--fast-compile", action="store_true",
        help="XLA backend optimisation level 0 (tests: fast compiles, slow steps; not for MFU)",
    )  # fmt: skip
    ap.add_argument(
        "--peak-n", type=int, default=None,
        help="matmul size of the peak probe (default 2048 on CPU, 8192 on accelerators, where "
        "2048^3 is too small to reach the peak: 125 vs 631 TFLOP/s measured on an H100)",
    )  # fmt: skip
    ap.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse flags, measure the matmul peaks, run every dtype, print the table; returns rows."""
    args = build_parser().parse_args(argv)
    model = "tiny" if args.tiny else args.model
    check_model(model, args.weights)  # an unknown name or a bad pair fails before any work
    dtypes = [d for d in args.dtypes.split(",") if d]
    print(machine_line(f"bench train: GRPO learner step, {model}, {args.batch} x {args.seq_len}"))
    peak_n = args.peak_n or (2048 if jax.default_backend() == "cpu" else 8192)
    peaks = {d: matmul_peak(d, peak_n) for d in dtypes}
    print(
        "measured matmul peak ("
        + f"{peak_n}^3 jnp.dot): "
        + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()),
        flush=True,
    )
    print(header(COLUMNS), flush=True)
    rows = []
    for dtype in dtypes:
        rows.append(bench_dtype(dtype, args, peaks[dtype], model))
        print(format_row(COLUMNS, rows[-1]), flush=True)
    print(
        "flops/token (fwd, train = 3 fwd, step = train [+ compute_old fwd off-policy]): "
        + ", ".join(f"{r['dtype']} {r['flops_per_token']['step'] / 1e6:.1f} MFLOP" for r in rows)
    )
    for r in rows:
        verdict = "meets" if r["mfu"] >= TARGET_MFU else "BELOW"
        print(
            f"{r['dtype']}: mfu {r['mfu']:.1%} {verdict} the {TARGET_MFU:.0%} target; "
            f"{r['recompiles']} compiles after the first step"
        )
    finish(args.json_path, {"argv": argv, "peaks": peaks, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
