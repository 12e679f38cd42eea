"""Build and register the CPU sampler's kernels: `cpu_attention.cc`, `cpu_causal_attention.cc`
and `cpu_matmul.cc` (XLA FFI custom calls; their jax-side wrappers are `cpu_attention`,
`cpu_causal_attention` and `cpu_matmul`).

    if cpu_kernels.available():
        out = cpu_matmul.project(packed_w, x)

The sources are compiled on first use, into one shared library, with the system's C++ compiler
(``$CXX``, else ``g++``) against the XLA FFI headers that ship inside jaxlib, into a cache folder
(``$RLVER_JAX_CACHE``, default ``~/.cache/rlver_jax``) under a key of the sources, jaxlib's
version, the compiler and the CPU's instruction-set flags (they are built with
``-march=native``, so machines of different CPUs sharing a home folder get one build each).
Without a compiler, or when the build fails, `available()` is False with the reason logged, and
callers keep XLA's forms. Nothing is downloaded.
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
import jaxlib

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / f for f in ("cpu_attention.cc", "cpu_causal_attention.cc", "cpu_matmul.cc"))
HEADERS = (_HERE / "cpu_parallel.h", _HERE / "cpu_simd.h")
TARGETS = {  # FFI target name -> handler symbol in the library
    "rlver_one_query_attention_f32": "RlverOneQueryAttentionF32",
    "rlver_one_query_attention_bf16": "RlverOneQueryAttentionBF16",
    "rlver_one_query_attention_bf16_bits": "RlverOneQueryAttentionBF16Bits",
    "rlver_causal_attention_f32": "RlverCausalAttentionF32",
    "rlver_packed_matmul_f32": "RlverPackedMatmulF32",
    "rlver_packed_matmul_bf16": "RlverPackedMatmulBF16",
}
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=fast",
          "-std=c++17", "-shared", "-fPIC", "-pthread")  # fmt: skip


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (the message says why)."""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build(cxx: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile `SOURCES` (or reuse an earlier build) and return the shared library's path."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    compiler = shutil.which(cxx)
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler {cxx!r} on PATH (set CXX to one)")
    cache = Path(cache_dir or os.environ.get("RLVER_JAX_CACHE", "~/.cache/rlver_jax"))
    texts = [p.read_bytes() for p in (*SOURCES, *HEADERS)]
    parts = (jaxlib.__version__, compiler, " ".join(_FLAGS), _cpu_flags(), platform.machine())
    key = hashlib.sha256(b"\0".join([*texts, *(x.encode() for x in parts)])).hexdigest()[:16]
    lib = cache.expanduser() / "kernels" / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES)]
        proc = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders leave one whole file
    return lib


@functools.cache
def available() -> bool:
    """Build (once per process) and register the kernels; False, with the reason logged, where
    they cannot be built."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (KernelBuildError, OSError) as err:
        log.warning("CPU decode kernels unavailable, using XLA's forms: %s", err)
        return False
    for name, symbol in TARGETS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    return True


def require() -> None:
    """Register the kernels before a call that uses them; a clear error where they cannot be
    built (callers that can fall back check `available()` first)."""
    if not available():
        raise KernelBuildError("the CPU decode kernels could not be built (the log says why)")
