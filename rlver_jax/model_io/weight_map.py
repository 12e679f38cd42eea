"""The mapping between HF tensor names/layouts and our params pytree.

HF stores every linear layer as `weight[out, in]`; we store `kernel[in, ...out]` with the head
axes split out (`wq[embed, heads, head_dim]`) so that each axis carries its own logical name.
This module is the single place that knows both layouts; HF safetensors, GGUF import and HF export
all go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from rlver_jax.models.config import ModelConfig


class WeightError(ValueError):
    """A checkpoint tensor that is missing or has the wrong shape; names the file and tensor."""


# our layer key -> (HF suffix under model.layers.{i}., kind)
# kinds: "vec" copies, "in_out" transposes [out, in] -> [in, out], "heads" transposes then splits
# the output axis into (heads, head_dim), "heads_in" splits the input axis (o_proj),
# "bias_heads" splits a bias into (heads, head_dim).
_LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attn_norm": ("input_layernorm.weight", "vec"),
    "wq": ("self_attn.q_proj.weight", "heads"),
    "wk": ("self_attn.k_proj.weight", "heads"),
    "wv": ("self_attn.v_proj.weight", "heads"),
    "wo": ("self_attn.o_proj.weight", "heads_in"),
    "bq": ("self_attn.q_proj.bias", "bias_heads"),
    "bk": ("self_attn.k_proj.bias", "bias_heads"),
    "bv": ("self_attn.v_proj.bias", "bias_heads"),
    "q_norm": ("self_attn.q_norm.weight", "vec"),
    "k_norm": ("self_attn.k_norm.weight", "vec"),
    "mlp_norm": ("post_attention_layernorm.weight", "vec"),
    "w_gate": ("mlp.gate_proj.weight", "in_out"),
    "w_up": ("mlp.up_proj.weight", "in_out"),
    "w_down": ("mlp.down_proj.weight", "in_out"),
}


def layer_keys(config: ModelConfig) -> list[str]:
    keys = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
    if config.attention_bias:
        keys += ["bq", "bk", "bv"]
    if config.qk_norm:
        keys += ["q_norm", "k_norm"]
    return keys


def hf_tensor_names(config: ModelConfig) -> Iterator[str]:
    """Every HF tensor name a checkpoint of `config` must contain."""
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    if not config.tie_word_embeddings:
        yield "lm_head.weight"
    for i in range(config.num_layers):
        for key in layer_keys(config):
            yield f"model.layers.{i}.{_LAYER_TENSORS[key][0]}"


def expected_hf_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """The HF shape of tensor `name`."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (V, D)
    if name == "model.norm.weight":
        return (D,)
    suffix = name.split(".", 3)[3]
    table = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * Dh, D),
        "self_attn.k_proj.weight": (K * Dh, D),
        "self_attn.v_proj.weight": (K * Dh, D),
        "self_attn.o_proj.weight": (D, H * Dh),
        "self_attn.q_proj.bias": (H * Dh,),
        "self_attn.k_proj.bias": (K * Dh,),
        "self_attn.v_proj.bias": (K * Dh,),
        "self_attn.q_norm.weight": (Dh,),
        "self_attn.k_norm.weight": (Dh,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    return table[suffix]


def _to_ours(array: np.ndarray, kind: str, config: ModelConfig) -> np.ndarray:
    Dh = config.head_dim
    if kind == "vec":
        return array
    if kind == "in_out":
        return array.T
    if kind == "heads":  # [heads*Dh, D] -> [D, heads, Dh]
        return array.T.reshape(array.shape[1], -1, Dh)
    if kind == "heads_in":  # [D, H*Dh] -> [H, Dh, D]
        return array.T.reshape(-1, Dh, array.shape[0])
    if kind == "bias_heads":
        return array.reshape(-1, Dh)
    raise AssertionError(kind)


def _to_hf(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "vec":
        return array
    if kind == "in_out":
        return array.T
    if kind == "heads":  # [D, heads, Dh] -> [heads*Dh, D]
        return array.reshape(array.shape[0], -1).T
    if kind == "heads_in":  # [H, Dh, D] -> [D, H*Dh]
        return array.reshape(-1, array.shape[-1]).T
    if kind == "bias_heads":
        return array.reshape(-1)
    raise AssertionError(kind)


def checked(name: str, array: np.ndarray, config: ModelConfig, source: str) -> np.ndarray:
    """`array` if its shape is what `config` expects for tensor `name`, else a WeightError."""
    want = expected_hf_shape(name, config)
    if tuple(array.shape) != want:
        raise WeightError(
            f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {want} "
            "for this config.json"
        )
    return array


def leaf_from_hf(
    path: tuple[str, ...],
    get: Callable[[str], np.ndarray],
    config: ModelConfig,
    dtype: np.dtype,
) -> np.ndarray:
    """Our weight at `path` (e.g. ("layers", "wq")) assembled from HF tensors via `get(name)`.

    Layer weights are stacked on a leading axis. `get` must raise WeightError for a missing name.
    """
    if path == ("embed",):
        return np.asarray(get("model.embed_tokens.weight"), dtype)
    if path == ("final_norm",):
        return np.asarray(get("model.norm.weight"), dtype)
    if path == ("lm_head",):
        return np.asarray(get("lm_head.weight"), dtype).T
    if path[0] != "layers" or len(path) != 2:
        raise KeyError(path)
    suffix, kind = _LAYER_TENSORS[path[1]]
    return np.stack(
        [
            _to_ours(np.asarray(get(f"model.layers.{i}.{suffix}"), dtype), kind, config)
            for i in range(config.num_layers)
        ]
    )


def params_to_hf_tensors(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named float arrays from our params (host copies)."""
    out = {
        "model.embed_tokens.weight": np.asarray(params["embed"]),
        "model.norm.weight": np.asarray(params["final_norm"]),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    for key in layer_keys(config):
        suffix, kind = _LAYER_TENSORS[key]
        stacked = np.asarray(params["layers"][key])
        for i in range(config.num_layers):
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(_to_hf(stacked[i], kind))
    return out
