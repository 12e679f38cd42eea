"""The CPU decode step's attention as a compiled kernel: `cpu_attention.cc`, an XLA FFI call.

    if cpu_attention.available():
        attn = cpu_attention.one_query_attention(q, k, v, mask, config)  # decode_step's form

`decode_step.one_query_attention` in XLA streams the cache several times (scores, softmax
reductions, output) on one core; the kernel reads each (row, kv head) block of the cache once,
only over the row's unmasked span, and splits the pairs over the cores (why and how: the .cc
file's header). The `Sampler` uses it for an unrolled decode on one CPU device
(`SamplerConfig.cpu_attention_kernel`); on a mesh the XLA form stays, since XLA cannot
partition a custom call.

The source is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``)
against the XLA FFI headers that ship inside jaxlib, into a cache folder
(``$RLVER_JAX_CACHE``, default ``~/.cache/rlver_jax``) under a key of the source, jaxlib's
version, the compiler and the CPU's instruction-set flags (it is built with ``-march=native``,
so machines of different CPUs sharing a home folder get one build each). Without a compiler, or
when the build fails, `available()` is False with the reason logged, and callers keep the XLA
form. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.decode_step import grouped_query

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGETS = {  # k/v dtype -> (FFI target name, handler symbol in the library)
    jnp.dtype(jnp.float32): ("rlver_one_query_attention_f32", "RlverOneQueryAttentionF32"),
    jnp.dtype(jnp.bfloat16): ("rlver_one_query_attention_bf16", "RlverOneQueryAttentionBF16"),
}
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared",
          "-fPIC", "-pthread")  # fmt: skip


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded (the message says why)."""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build(cxx: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile `SOURCE` (or reuse an earlier build) and return the shared library's path."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    compiler = shutil.which(cxx)
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler {cxx!r} on PATH (set CXX to one)")
    cache = Path(cache_dir or os.environ.get("RLVER_JAX_CACHE", "~/.cache/rlver_jax"))
    source = SOURCE.read_bytes()
    parts = (jaxlib.__version__, compiler, " ".join(_FLAGS), _cpu_flags(), platform.machine())
    key = hashlib.sha256(b"\0".join([source, *(x.encode() for x in parts)])).hexdigest()[:16]
    lib = cache.expanduser() / "kernels" / f"cpu_attention-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders leave one whole file
    return lib


@functools.cache
def available() -> bool:
    """Build (once per process) and register the kernel; False, with the reason logged, where
    it cannot be built."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (KernelBuildError, OSError) as err:
        log.warning("CPU attention kernel unavailable, using XLA's form: %s", err)
        return False
    for name, symbol in _TARGETS.values():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    return True


def one_query_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: ModelConfig
) -> jax.Array:
    """`decode_step.one_query_attention` (same arguments, same result to float32 rounding) as
    the FFI kernel; call `available()` first. q [B,1,H,Dh]; k [B,K,Dh,S] and v [B,K,S,Dh] in
    float32 or bfloat16; mask [B,1,S]."""
    B, _, H, Dh = q.shape
    if jnp.dtype(k.dtype) not in _TARGETS or k.dtype != v.dtype:
        raise TypeError(f"the CPU attention kernel takes float32 or bfloat16 caches, not {k.dtype}")
    qg = grouped_query(q, config)
    call = jax.ffi.ffi_call(
        _TARGETS[jnp.dtype(k.dtype)][0], jax.ShapeDtypeStruct(qg.shape, qg.dtype)
    )
    return call(qg, k, v, mask[:, 0, :]).astype(q.dtype).reshape(B, 1, H, Dh)
