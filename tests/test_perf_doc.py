"""bench/perf_doc.py: docs/performance.md shows the newest result of each configuration, with
its command, and the committed page is up to date with bench/results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "perf_doc.py"


def load_perf_doc():
    spec = importlib.util.spec_from_file_location("perf_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["perf_doc"] = module
    spec.loader.exec_module(module)
    return module


perf_doc = load_perf_doc()


def sample_result(ms_per_step: float, e2e: float, **top) -> dict:
    row = {
        "engine": "jax", "dtype": "float32", "batch": 8, "compile_s": 10.0,
        "prefill_ms": 4000.0, "ms_per_step": ms_per_step, "decode_tok_s": 8000 / ms_per_step,
        "e2e_tok_s": e2e, "bound_ms": 30.0, "x_bound": ms_per_step / 30.0,
        "rss_peak_mb": 2000.0, "dev_peak_mb": None, "unroll_decode": True,
        "attention_kernel": True,
    }  # fmt: skip
    meta = {"copy_bandwidth_bytes_s": 2e10, "prompt_len": 256, "torch": "-", "new_tokens": 128}
    return {"meta": meta, "rows": [row]} | top


def write(path: Path, data: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_newer_result_wins(tmp_path):
    results, out = tmp_path / "results", tmp_path / "performance.md"
    write(results / "cpu-2030-01-01" / "old.json", sample_result(77.7, 11.1))
    write(results / "cpu-2030-01-02" / "new.json", sample_result(44.4, 22.2))
    write(
        results / "cpu-2030-01-02" / "new.log",
        "smollm2 (smollm2 weights), greedy, prompt 256, 128 new tokens, unroll_decode auto; "
        "jax 0.10.2 on cpu x1, torch on -, 2 CPUs; measured copy bandwidth 20.0 GB/s\n",
    )
    write(results / "cpu-2030-01-02" / "notes.txt", "free text")
    write(results / "cpu-2030-01-02" / "other.json", {"something": "else"})
    assert perf_doc.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()

    table = [line for line in text.splitlines() if line.startswith("| cpu_kernels")]
    assert len(table) == 1, text
    assert "44.4" in table[0] and "22.2" in table[0] and "1.48x" in table[0]
    assert "77.7" not in text and "11.1" not in text
    assert "`results/cpu-2030-01-02/new.json` (2030-01-02; cpu x1, 2 CPUs; jax 0.10.2" in text
    assert "rlver-jax bench sample --batches 8 --dtypes float32 --skip-torch" in text
    assert "Superseded by a newer result of the same configurations (not shown): " in text
    assert "`results/cpu-2030-01-01/old.json`" in text
    assert "`results/cpu-2030-01-02/other.json`: JSON of an unknown schema" in text
    assert "`results/cpu-2030-01-02/notes.txt`: auxiliary output" in text
    assert "No result recorded on this machine yet for: train" in text

    check = ["--results", str(results), "--out", str(out), "--check"]
    assert perf_doc.main(check) == 0
    out.write_text(text + "edited by hand\n")
    assert perf_doc.main(check) == 1


def test_own_timestamp_orders_runs_of_one_folder_and_argv_is_the_command(tmp_path):
    results, out = tmp_path / "results", tmp_path / "performance.md"
    folder = results / "h100-2030-01-01"
    # "a" sorts first by name but ran later: its own timestamp decides.
    write(folder / "a.json", sample_result(1.11, 900.0, timestamp="2030-01-01T18:00:00Z"))
    write(folder / "b.json", sample_result(2.22, 800.0, timestamp="2030-01-01T09:00:00Z"))
    train_row = {
        "model": "qwen2.5-0.5b", "dtype": "bfloat16", "batch": 8, "seq": 2048,
        "compile_s": 13.0, "step_s": 0.65, "tok_s": 25200.0, "gflop_s": 88000.0,
        "peak_gflop": 630000.0, "mfu": 0.1397, "recompiles": 0, "rss_peak_mb": 3800.0,
        "dev_peak_mb": 35000.0,
    }  # fmt: skip
    argv = ["--model", "qwen2.5-0.5b", "--micro-batch", "2", "--json", "/root/out/t.json"]
    write(folder / "train.json", {"argv": argv, "peaks": {"bfloat16": 6.3e14}, "rows": [train_row]})
    assert perf_doc.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()

    assert "1.11" in text and "2.22" not in text
    assert "(2030-01-01 18:00;" in text
    assert "| qwen2.5-0.5b | bf16 | 8 x 2,048 | 2 | 0.650 | 25,200 | 88.0 | 630 | 14.0% |" in text
    expected = "`rlver-jax bench train --model qwen2.5-0.5b --micro-batch 2 --json FILE.json`"
    assert expected in text
    assert "/root/out" not in text


def test_committed_page_is_up_to_date():
    """docs/performance.md is what the script makes of bench/results (rerun it if this fails)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
