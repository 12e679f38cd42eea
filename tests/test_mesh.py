"""Mesh construction, sharding helpers and the compile counter (8 fake CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlver_jax.models.config import ModelConfig
from rlver_jax.models.kv_cache import init_cache
from rlver_jax.models.sharding import cache_shardings, param_shardings
from rlver_jax.models.transformer import param_shapes
from rlver_jax.parallel import (
    MESH_AXES,
    MeshConfig,
    MeshConfigError,
    batch_axis_size,
    batch_sharding,
    count_compiles,
    host_to_global,
    make_mesh,
    replicated,
    shard_params,
    to_host,
)

CONFIG = ModelConfig(
    family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16,
)  # fmt: skip


def test_eight_fake_devices() -> None:
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        (MeshConfig(), (1, 8, 1)),
        (MeshConfig(data=2, fsdp=1, tensor=4), (2, 1, 4)),
        (MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
        (MeshConfig(data=-1, fsdp=1, tensor=1), (8, 1, 1)),
    ],
)
def test_mesh_shapes(cfg: MeshConfig, shape: tuple[int, int, int]) -> None:
    mesh = make_mesh(cfg)
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"data": 3, "fsdp": -1}, "mesh.fsdp=-1 cannot fill 8"),
        ({"data": 1, "fsdp": 1, "tensor": 3}, "mesh.tensor=3 does not divide 8"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "product 4"),
        ({"data": -1, "fsdp": -1}, "only one mesh axis"),
        ({"tensor": 0}, "mesh.tensor must be"),
    ],
)
def test_mesh_config_errors_name_the_field(kwargs: dict, needle: str) -> None:
    with pytest.raises(MeshConfigError, match=needle):
        make_mesh(MeshConfig(**kwargs))


def test_make_mesh_on_a_device_subset() -> None:
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    assert mesh.devices.shape == (1, 2, 2)


def test_param_shardings_follow_the_rules() -> None:
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sh = param_shardings(CONFIG, mesh)
    assert sh["layers"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert sh["layers"]["w_down"].spec == P(None, "tensor", "fsdp")
    assert sh["embed"].spec == P("tensor", "fsdp")
    params = jax.tree.map(
        lambda s: np.random.default_rng(0).random(s.shape, np.float32), param_shapes(CONFIG)
    )
    placed = shard_params(params, sh)
    assert placed["layers"]["wq"].sharding == sh["layers"]["wq"]
    np.testing.assert_array_equal(to_host(placed["embed"]), np.asarray(params["embed"]))


def test_cache_and_batch_shardings() -> None:
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    cache = jax.eval_shape(lambda: init_cache(CONFIG, 8, 16))
    sh = cache_shardings(cache, mesh)
    # 2 kv heads do not divide tensor=4: replicated on that dimension rather than failing.
    assert sh.k.spec == P(None, ("data", "fsdp"), None, None, None)
    assert sh.key_mask.spec == P(("data", "fsdp"), None)
    assert sh.end.spec == P()
    assert batch_sharding(mesh, (8, 5)).spec == P(("data", "fsdp"), None)
    assert batch_sharding(mesh, (3, 5)).spec == P(None, None)  # indivisible: replicated
    assert batch_axis_size(mesh) == 2
    assert replicated(mesh).spec == P()


def test_host_round_trip_of_a_tree() -> None:
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    g = host_to_global(x, batch_sharding(mesh, x.shape))
    assert len(g.addressable_shards) == 8
    back = to_host({"x": g, "s": jnp.int32(3)})
    np.testing.assert_array_equal(back["x"], x)
    assert int(back["s"]) == 3


def test_compile_counter_counts_real_compiles() -> None:
    f = jax.jit(lambda x: x * 2 + 1)
    with count_compiles() as c:
        f(np.ones(3, np.float32)).block_until_ready()
    assert c.count == 1 and any("lambda" in n for n in c.names) and c.seconds > 0
    with count_compiles() as c:
        f(np.zeros(3, np.float32)).block_until_ready()  # same shape: cached
    assert c.count == 0
    with count_compiles() as c:
        f(np.zeros(4, np.float32)).block_until_ready()  # new shape: recompiles
    assert c.count == 1
