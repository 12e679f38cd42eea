"""Typed configs: YAML + dotted overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from rlver_jax.config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-6
    mode: Literal["ppo", "grpo"] = "ppo"
    buckets: tuple[int, ...] = (64, 128)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Outer:
    seed: int = 0
    name: str | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_yaml_and_overrides_build_nested_config(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ninner:\n  mode: grpo\n  buckets: [32, 64]\n")
    data = apply_overrides(load_yaml(path), ["inner.lr=2e-6", "name=run"])
    cfg = from_dict(Outer, data)
    assert cfg == Outer(seed=3, name="run", inner=Inner(lr=2e-6, mode="grpo", buckets=(32, 64)))
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"sede": 1}, "unknown config key 'sede'"),
        ({"inner": {"learning_rate": 1}}, r"unknown config key inner\.'learning_rate'"),
        ({"seed": "x"}, "seed: expected an integer"),
        ({"seed": True}, "seed: expected an integer"),
        ({"inner": {"mode": "dpo"}}, r"inner\.mode: 'dpo' is not one of"),
        ({"inner": {"buckets": [1, "a"]}}, r"inner\.buckets\[1\]: expected an integer"),
        ({"inner": {"lr": -1.0}}, "inner: lr must be positive"),
    ],
)
def test_bad_keys_and_values_name_the_key(data, match) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_bad_override_and_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["seed"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(unsafe)


@dataclasses.dataclass(frozen=True)
class Pair:
    betas: tuple[float, float] = (0.9, 0.999)


def test_fixed_length_tuple_round_trip() -> None:
    cfg = from_dict(Pair, {"betas": [0.8, 0.99]})
    assert cfg.betas == (0.8, 0.99)
    assert from_dict(Pair, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_dict(Pair, {"betas": [0.8]})


def test_bad_attention_block_is_refused_at_load() -> None:
    """A negative `model.attention_block` fails when the config is read, naming the section."""
    from rlver_jax.run_config import RunConfig

    with pytest.raises(ConfigError, match="model: attention_block must be >= 0"):
        from_dict(RunConfig, {"model": {"source": "random", "attention_block": -8}})
    assert from_dict(RunConfig, {"model": {"attention_block": 256}}).model.attention_block == 256
    from rlver_jax.bench.models import TINY
    from rlver_jax.models.config import ModelConfigError

    with pytest.raises(ModelConfigError, match="attention_block must be >= 0, an int"):
        TINY.replace(attention_block=1.5)  # the model config itself checks it the same way
