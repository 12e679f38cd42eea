"""Device mesh from a small config, and placement of params / caches / batches on it.

The project uses one mesh with three axes, always in this order:

- `data`:   pure data parallelism (each group of devices holds full weights, different rows);
- `fsdp`:   rows are split as for `data`, and weights are split on their `embed` dimension
            (all-gathered inside each matmul);
- `tensor`: heads / mlp / vocab split across devices (Megatron-style tensor parallelism).

Which array dimension goes to which axis is decided by the logical-axis table in `rules.py`;
this module only builds the mesh and turns logical names into concrete `NamedSharding`s. Moving
host data onto a mesh goes through `host_to_global` / `to_host`, which also work when the mesh
spans several processes (multi-host), where `np.asarray` on a sharded array would fail.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlver_jax.parallel.rules import (
    DEFAULT_RULES,
    MESH_AXES,
    ROLLOUT_RULES,
    MeshAxes,
    merged_rules,
    named_sharding,
)

Rules = Sequence[tuple[str, MeshAxes]]


class MeshConfigError(ValueError):
    """A mesh shape that does not fit the devices; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the `data`, `fsdp` and `tensor` mesh axes.

    At most one size may be -1, meaning "all the devices the other axes leave over" (as in
    MaxText's `ici_*_parallelism`). The default puts every device on `fsdp`, which both splits
    the batch and shards the weights: the right choice for one host of a few chips.

    data: devices along the data axis (pure data parallelism: the batch splits, weights are
      replicated); -1: all the devices the other axes leave over.
    fsdp: devices along the fsdp axis (the batch splits and the weights are sharded); -1: fill.
    tensor: devices along the tensor axis (each matmul split across them); -1: fill.
    rules: the learner's logical axis rules changed from `parallel.rules.DEFAULT_RULES`, as
      ``name: axes`` pairs (axes: a mesh axis, a list of them, or null: replicated).
    rollout_rules: the same for the samplers' weights and caches, over
      `parallel.rules.ROLLOUT_RULES` (no FSDP sharding of the weights while decoding).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, Any] | tuple[tuple[str, Any], ...] = ()
    rollout_rules: dict[str, Any] | tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise MeshConfigError(
                    f"mesh.{name} must be a positive integer or -1, got {value!r}"
                )
        for key, base in (("rules", DEFAULT_RULES), ("rollout_rules", ROLLOUT_RULES)):
            value = getattr(self, key)
            pairs = tuple(value.items()) if isinstance(value, dict) else tuple(value)
            try:  # held as pairs: a frozen config stays hashable
                merged_rules(base, pairs)
            except (ValueError, TypeError) as err:
                raise MeshConfigError(f"mesh.{key}: {err}") from None
            object.__setattr__(self, key, tuple((n, _axes(a)) for n, a in pairs))
        fills = [n for n in MESH_AXES if getattr(self, n) == -1]
        if len(fills) > 1:
            raise MeshConfigError(f"only one mesh axis may be -1 (fill); got {', '.join(fills)}")

    @property
    def learner_rules(self) -> tuple[tuple[str, MeshAxes], ...]:
        """The learner's logical axis rules: the defaults with `rules` merged over them."""
        return merged_rules(DEFAULT_RULES, self.rules)

    @property
    def sampler_rules(self) -> tuple[tuple[str, MeshAxes], ...]:
        """The samplers' rules: `ROLLOUT_RULES` with `rollout_rules` merged over them."""
        return merged_rules(ROLLOUT_RULES, self.rollout_rules)

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) sizes for `num_devices` devices."""
        sizes = {n: getattr(self, n) for n in MESH_AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        fill = next((n for n in MESH_AXES if sizes[n] == -1), None)
        if fill is not None:
            if num_devices % fixed:
                others = ", ".join(f"{n}={v}" for n, v in sizes.items() if n != fill)
                raise MeshConfigError(
                    f"mesh.{fill}=-1 cannot fill {num_devices} devices: the other axes "
                    f"({others}, product {fixed}) do not divide the device count"
                )
            sizes[fill] = num_devices // fixed
        elif fixed != num_devices:
            # Name the first axis that does not divide the device count; else blame the product.
            bad = next((n for n in MESH_AXES if num_devices % sizes[n]), None)
            where = f"mesh.{bad}={sizes[bad]} does not divide" if bad else "the product of"
            raise MeshConfigError(
                f"{where} {num_devices} devices (data={sizes['data']}, fsdp={sizes['fsdp']}, "
                f"tensor={sizes['tensor']}, product {fixed}); set one axis to -1 to fill"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all devices).

    With several processes `jax.devices()` lists every process's devices, so the mesh spans
    hosts. On TPU/GPU the physical topology decides the device order (so that `tensor`, the axis
    with the most traffic, stays on the fastest links); CPU devices are simply reshaped, which
    keeps each process's devices contiguous along the last axes.
    """
    cfg = cfg or MeshConfig()
    devs = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devs))
    grid: np.ndarray | None = None
    if devs[0].platform in ("tpu", "gpu", "cuda", "rocm"):
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devs, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = None
    if grid is None:
        grid = np.asarray(devs, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# --------------------------------------------------------------------------- shardings
def shard_params(params: Any, shardings: Any) -> Any:
    """Place a params pytree (host numpy or device arrays) on the mesh of `shardings`.

    Leaves that are not fully addressable already (multi-host) are passed through
    `host_to_global`, which works from per-process copies of the full weights.
    """
    return jax.tree.map(host_to_global, params, shardings)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Rows split over the batch axes (`data`, `fsdp`), other dimensions replicated.

    The row count must be divisible by the batch axes to be split; otherwise it is replicated
    (see `rules.logical_to_spec`), which is correct but wastes memory.
    """
    names = ("batch",) + (None,) * (len(shape) - 1)
    return named_sharding(names, tuple(shape), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, keys, small tables)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_axis_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the `batch` logical axis is split on `mesh` (batch buckets must divide)."""
    axes = dict(rules).get("batch")
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return math.prod(mesh.shape[n] for n in names if n in mesh.shape)


# --------------------------------------------------------------------------- host <-> mesh
def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from a value every process holds in full.

    On one process this is `jax.device_put`. Across processes each one fills only its own
    shards (`make_array_from_callback`), so no process needs to address another's devices.
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(tree: Any) -> Any:
    """The full value of every (possibly multi-host) array in `tree` as numpy, on every process.

    Arrays spread over several processes are first replicated by ONE jitted identity for the
    whole tree (each new executable sets up cross-process collectives, which is slow), then
    read from a local replica.
    """
    leaves, treedef = jax.tree.flatten(tree)
    remote = [i for i, x in enumerate(leaves) if not x.is_fully_addressable]
    if remote:
        shardings = tuple(NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in remote)
        gathered = jax.jit(lambda *xs: xs, out_shardings=shardings)(*(leaves[i] for i in remote))
        for i, x in zip(remote, gathered, strict=True):
            leaves[i] = x.addressable_data(0)
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in jax.device_get(leaves)])


def _axes(axes: Any) -> MeshAxes:
    """A YAML value of a rule (a name, a list of names, null) as a hashable `MeshAxes`."""
    return tuple(axes) if isinstance(axes, list) else axes
