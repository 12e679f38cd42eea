"""HF safetensors round trips against transformers' torch models, sharded loading, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlver_jax.model_io.hf_io import INDEX_FILE, SINGLE_FILE, export_hf, load_hf_checkpoint
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.model_io.weight_map import WeightError
from rlver_jax.models.config import ModelConfigError
from rlver_jax.models.transformer import (
    forward,
    param_logical_axes,
    param_shapes,
    positions_from_mask,
)
from rlver_jax.parallel.rules import axis_rules, tree_shardings
from tests.helpers import tiny_torch_model, torch_logits

FAMILIES = ["llama", "qwen2", "qwen3"]
RNG = np.random.default_rng(7)
TOKENS = RNG.integers(0, 97, (2, 9))
MASK = np.ones_like(TOKENS)


def _forward(params: dict, config, tokens: np.ndarray = TOKENS) -> jax.Array:
    mask = jnp.ones(tokens.shape, bool)
    return forward(params, jnp.asarray(tokens), positions_from_mask(mask), mask, config)[0]


def _logits(params: dict, config, tokens: np.ndarray = TOKENS) -> np.ndarray:
    return np.asarray(_forward(params, config, tokens))


def _save_torch(tmp: Path, family: str, tie: bool, shard: bool, **kw) -> tuple[Path, object]:
    model = tiny_torch_model(family, tie=tie, **kw)
    path = tmp / "torch"
    model.save_pretrained(path, max_shard_size=60_000 if shard else "1GB")
    assert (path / (INDEX_FILE if shard else SINGLE_FILE)).is_file()
    return path, model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_with_transformers(tmp_path: Path, family: str, tie: bool) -> None:
    shard = tie  # cover the single-file and the index + shards layouts on every family
    path, model = _save_torch(tmp_path, family, tie, shard)
    params, config = load_hf_checkpoint(path)
    assert config.family == family and config.tie_word_embeddings == tie
    assert ("lm_head" in params) == (not tie)
    ref = torch_logits(model, TOKENS, MASK)
    np.testing.assert_allclose(_logits(params, config), ref, atol=1e-4, rtol=0)

    out = tmp_path / "export"
    export_hf(params, config, out, Tokenizer.tiny(), max_shard_bytes=50_000 if not shard else 10**9)
    assert (out / (SINGLE_FILE if shard else INDEX_FILE)).is_file()
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(again, TOKENS, MASK), ref, atol=1e-5, rtol=0)
    # Our own loader reads our export back bit for bit.
    params2, config2 = load_hf_checkpoint(out)
    assert config2 == config.replace(eos_token_ids=config2.eos_token_ids)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_writes_tokenizer_and_generation_config(tmp_path: Path) -> None:
    path, _ = _save_torch(tmp_path, "qwen2", tie=False, shard=False)
    params, config = load_hf_checkpoint(path)
    tok = Tokenizer.tiny()
    out = export_hf(params, config, tmp_path / "export", tok, max_shard_bytes=50_000)
    hf = AutoTokenizer.from_pretrained(str(out))
    text = "I hear you. 我在这里。"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert set(tok.stop_token_ids) <= set(eos if isinstance(eos, list) else [eos])
    assert gen["pad_token_id"] == tok.pad_id
    # Re-exporting as one file removes the stale shards and index.
    export_hf(params, config, out)
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
    assert list(out.glob("model-*.safetensors")) == []


def test_bf16_checkpoint(tmp_path: Path) -> None:
    model = tiny_torch_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    want = model.state_dict()["model.layers.1.mlp.up_proj.weight"].float().numpy().T
    params, config = load_hf_checkpoint(tmp_path, param_dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(params["layers"]["w_up"][1], np.float32), want)
    params32, _ = load_hf_checkpoint(tmp_path)
    assert params32["layers"]["w_up"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params32["layers"]["w_up"][1]), want)


def test_load_into_shardings(tmp_path: Path) -> None:
    path, model = _save_torch(tmp_path, "qwen2", tie=False, shard=True)
    _, config = load_hf_checkpoint(path)
    # Auto axes: the model places activations with sharding constraints (rules.constrain).
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    shardings = tree_shardings(param_logical_axes(config), param_shapes(config), mesh)
    params, _ = load_hf_checkpoint(path, shardings=shardings)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (key, leaf), want in zip(leaves, jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want, key
        shard_shape = want.shard_shape(leaf.shape)
        assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}, key
    assert params["layers"]["w_up"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    # A weight sharded 8 ways: each device holds an eighth of it.
    w_up = params["layers"]["w_up"]
    assert w_up.addressable_shards[0].data.size * 8 == w_up.size
    with axis_rules(mesh):
        logits = jax.jit(_forward, static_argnums=1)(params, config)
    ref = torch_logits(model, TOKENS, MASK)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_shardings_must_match_params(tmp_path: Path) -> None:
    path, _ = _save_torch(tmp_path, "llama", tie=True, shard=False)
    _, config = load_hf_checkpoint(path)
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    wrong = tree_shardings(
        param_logical_axes(config.replace(tie_word_embeddings=False)),
        param_shapes(config.replace(tie_word_embeddings=False)),
        mesh,
    )
    with pytest.raises(ValueError, match="shardings must be a pytree"):
        load_hf_checkpoint(path, shardings=wrong)


# --------------------------------------------------------------------------- bad input
def test_extra_tensors_are_ignored(tmp_path: Path) -> None:
    path, model = _save_torch(tmp_path, "llama", tie=True, shard=False)
    tensors = load_file(path / SINGLE_FILE)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    params, config = load_hf_checkpoint(path)
    np.testing.assert_allclose(
        _logits(params, config), torch_logits(model, TOKENS, MASK), atol=1e-4, rtol=0
    )


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    path, _ = _save_torch(tmp_path, "llama", tie=False, shard=False)
    config_file = path / "config.json"
    good = config_file.read_text()
    config_file.unlink()
    with pytest.raises(ModelConfigError, match=r"config\.json.*no config\.json"):
        load_hf_checkpoint(path)
    config_file.write_text(good[:40])
    with pytest.raises(ModelConfigError, match=r"config\.json: not valid JSON"):
        load_hf_checkpoint(path)
    raw = json.loads(good) | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    config_file.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"config\.json: unsupported architecture"):
        load_hf_checkpoint(path)


def test_missing_and_misshaped_tensors(tmp_path: Path) -> None:
    path, _ = _save_torch(tmp_path, "qwen2", tie=False, shard=False)
    file = path / SINGLE_FILE
    tensors = load_file(file)
    name = "model.layers.2.self_attn.k_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != name}, str(file))
    with pytest.raises(WeightError, match=rf"model\.safetensors: tensor '{name}' is missing"):
        load_hf_checkpoint(path)
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(bad, str(file))
    with pytest.raises(WeightError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp"):
        load_hf_checkpoint(path)
    file.unlink()
    with pytest.raises(WeightError, match=r"no model\.safetensors and no model\.safetensors\."):
        load_hf_checkpoint(path)


def test_sharded_checkpoint_errors(tmp_path: Path) -> None:
    path, _ = _save_torch(tmp_path, "qwen3", tie=False, shard=True)
    index_file = path / INDEX_FILE
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    # A tensor listed in the index but absent from its shard.
    name = "model.layers.0.self_attn.q_norm.weight"
    moved = dict(index, weight_map=index["weight_map"] | {name: shards[-1]})
    if index["weight_map"][name] == shards[-1]:
        moved["weight_map"][name] = shards[0]
    index_file.write_text(json.dumps(moved))
    with pytest.raises(WeightError, match=rf"safetensors: tensor '{name}' is listed in"):
        load_hf_checkpoint(path)
    # A tensor missing from the index altogether.
    dropped = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != name})
    index_file.write_text(json.dumps(dropped))
    with pytest.raises(WeightError, match=rf"index\.json: tensor '{name}' is missing"):
        load_hf_checkpoint(path)
    # A shard file listed in the index that is not on disk.
    index_file.write_text(json.dumps(index))
    (path / shards[1]).unlink()
    with pytest.raises(WeightError, match=rf"index\.json: shard file '{shards[1]}' is listed"):
        load_hf_checkpoint(path)
    index_file.write_text("{not json")
    with pytest.raises(WeightError, match=r"index\.json: not a safetensors index"):
        load_hf_checkpoint(path)
