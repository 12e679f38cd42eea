"""HF safetensors checkpoints in and out: the bridge between transformers' files and our params.

Loading is lazy (`safe_open` memory-maps each file and reads one tensor at a time), checks every
tensor's presence and shape before any weight is converted (so a bad checkpoint fails in
milliseconds with the file and tensor named), and can place each weight straight into its
`NamedSharding`: every device receives only its own slice from host memory, so no device ever
holds an unsharded copy of the whole model.

Export writes what `transformers.AutoModelForCausalLM.from_pretrained` reads (float32 safetensors,
split into shards with an index past `max_shard_bytes`), so that torch can serve as the reference
implementation for our weights (parity tests, generate benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlver_jax.model_io.weight_map import (
    WeightError,
    checked,
    hf_tensor_names,
    leaf_from_hf,
    params_to_hf_tensors,
)
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import Params, param_shapes

if TYPE_CHECKING:
    from rlver_jax.model_io.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


# --------------------------------------------------------------------------- reading
def _tensor_index(path: Path) -> tuple[dict[str, Path], Path]:
    """Map each tensor name to the file that holds it; also return the file to blame.

    The index's `weight_map` is trusted for *where* a tensor lives; whether the shard really
    contains it is checked when the shard is opened.
    """
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single), single
    if not index.is_file():
        raise WeightError(
            f"{path}: no {SINGLE_FILE} and no {INDEX_FILE} in the checkpoint directory"
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
    if not isinstance(weight_map, dict):
        raise WeightError(f"{index}: 'weight_map' must map tensor names to shard files")
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            names = sorted(n for n, s in weight_map.items() if s == shard)
            raise WeightError(
                f"{index}: shard file {shard!r} is listed (for tensors such as {names[0]!r}) "
                f"but {path / shard} does not exist"
            )
    return {name: path / shard for name, shard in weight_map.items()}, index


class _LazyTensors:
    """Named tensors across open safetensors files, read on demand and shape-checked."""

    def __init__(self, path: Path, config: ModelConfig, stack: ExitStack) -> None:
        self.config = config
        self.where, self.blame = _tensor_index(path)
        self.files: dict[Path, Any] = {}
        self.keys: dict[Path, set[str]] = {}
        for file in sorted(set(self.where.values())):
            self.files[file] = stack.enter_context(safe_open(file, framework="numpy"))
            self.keys[file] = set(self.files[file].keys())

    def check_all(self) -> None:
        """Presence and shape of every expected tensor, before any weight is read."""
        for name in hf_tensor_names(self.config):
            file = self.where.get(name)
            if file is None:
                raise WeightError(
                    f"{self.blame}: tensor {name!r} is missing from the checkpoint "
                    f"(needed by this config.json)"
                )
            if name not in self.keys[file]:
                raise WeightError(
                    f"{file}: tensor {name!r} is listed in {INDEX_FILE} but not in this shard"
                )
            shape = tuple(self.files[file].get_slice(name).get_shape())
            # A zero-memory stand-in with the tensor's shape: nothing is read yet.
            checked(name, np.broadcast_to(np.bool_(0), shape), self.config, str(file))

    def get(self, name: str) -> np.ndarray:
        file = self.where.get(name)
        if file is None:
            raise WeightError(f"{self.blame}: tensor {name!r} is missing from the checkpoint")
        return checked(name, self.files[file].get_tensor(name), self.config, str(file))


def _param_paths(config: ModelConfig) -> tuple[list[tuple[str, ...]], Any]:
    """Key paths of every params leaf (e.g. ("layers", "wq")) and the params treedef."""
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return [tuple(k.key for k in path) for path, _ in flat], jax.tree.structure(shapes)


def params_from_hf_getter(
    get: Callable[[str], np.ndarray],
    config: ModelConfig,
    shardings: Any = None,
) -> Params:
    """Our params from HF-named tensors served by `get`, placed on devices leaf by leaf.

    Shared by the safetensors and GGUF loaders. Each leaf is assembled on the host in the
    runtime `param_dtype`, then either copied whole to the default device or, with `shardings`
    (a pytree of `NamedSharding` shaped like the params), cut so each device gets only its slice.
    At most one leaf at a time is held on the host beyond what the devices hold.
    """
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    paths, treedef = _param_paths(config)
    sharding_leaves: list[Any] = [None] * len(paths)
    if shardings is not None:
        if jax.tree.structure(shardings) != treedef:
            raise ValueError(
                "shardings must be a pytree of NamedSharding with the params' structure: "
                f"got {jax.tree.structure(shardings)}, expected {treedef}"
            )
        sharding_leaves = jax.tree.leaves(shardings)
    leaves = []
    for path, sharding in zip(paths, sharding_leaves, strict=True):
        host = leaf_from_hf(path, get, config, dtype)
        if not (host.flags.owndata and host.flags.c_contiguous):
            host = host.copy()  # views of memory-mapped files must not reach a device
        if sharding is None:
            leaves.append(jax.device_put(host))
        else:
            leaves.append(
                jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
            )
        del host
    return jax.tree.unflatten(treedef, leaves)


def load_hf_checkpoint(
    path: str | Path, *, shardings: Any = None, **runtime: Any
) -> tuple[Params, ModelConfig]:
    """Load a HF Llama/Qwen2/Qwen3 safetensors checkpoint directory.

    Args:
      path: directory with `config.json` and `model.safetensors` or `model.safetensors.index.json`
        plus its shards.
      shardings: optional pytree of `jax.sharding.NamedSharding` matching the params (for example
        `rules.tree_shardings(param_logical_axes(config), param_shapes(config), mesh)`).
      runtime: ModelConfig runtime fields (`param_dtype`, `dtype`, `scan_layers`, `remat`).

    Tensors the model does not use (`lm_head.weight` when embeddings are tied, rotary
    `inv_freq` buffers, ...) are ignored. Raises ModelConfigError / WeightError naming the file
    and the key or tensor at fault.
    """
    path = Path(path)
    config = ModelConfig.from_hf_dir(path, **runtime)
    with ExitStack() as stack:
        tensors = _LazyTensors(path, config, stack)
        tensors.check_all()
        params = params_from_hf_getter(tensors.get, config, shardings)
    return params, config


# --------------------------------------------------------------------------- writing
def _shard_plan(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` (an oversize tensor goes alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    return shards


def _remove_old_weights(out_dir: Path) -> None:
    """Delete weights of an earlier export: a stale single file beside a new index (or the
    reverse) would make transformers load the wrong one."""
    for file in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
        file.unlink(missing_ok=True)


def export_hf(
    params: Params,
    config: ModelConfig,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a HF checkpoint directory that transformers loads with `from_pretrained`.

    Weights are float32 (the CPU reference runs fp32; bf16 matmuls are slow on CPUs without bf16
    instructions). `generation_config.json` stops on every stop token of `tokenizer` (else the
    config's eos ids), so that `model.generate` stops where our sampler does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out_dir)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = params_to_hf_tensors(host, config)
    shards = _shard_plan(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(out_dir / file), metadata=metadata)
            weight_map.update(dict.fromkeys(names, file))
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    hf_config = config.to_hf_dict()
    generation: dict[str, Any] = {"_from_model_config": False}
    if config.bos_token_id is not None:
        generation["bos_token_id"] = config.bos_token_id
    eos = list(config.eos_token_ids)
    if tokenizer is not None:
        eos = list(dict.fromkeys([*eos, *tokenizer.stop_token_ids]))
        generation["pad_token_id"] = tokenizer.pad_id
        hf_config.setdefault("pad_token_id", tokenizer.pad_id)
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir
