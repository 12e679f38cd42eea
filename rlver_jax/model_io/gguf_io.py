"""Import llama-architecture GGUF files (llama.cpp's format), e.g. SmolLM2-135M-Instruct.

A GGUF carries the config (`llama.*` metadata), quantized weights and the tokenizer in one file,
which makes it the one real chat model available offline here. The import dequantizes every tensor
to float, renames it to its HF name, undoes llama.cpp's q/k row permutation (llama.cpp rotates
interleaved pairs, HF and our model rotate halves) and then goes through the shared weight map,
so GGUF weights reach our params by exactly the same code path as HF safetensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from rlver_jax.model_io.gguf_file import gguf_field, open_gguf
from rlver_jax.model_io.hf_io import params_from_hf_getter
from rlver_jax.model_io.tokenizer import Tokenizer, check_compatible
from rlver_jax.model_io.weight_map import WeightError, checked, expected_hf_shape, hf_tensor_names
from rlver_jax.models.config import ModelConfig, ModelConfigError, RopeScaling
from rlver_jax.models.transformer import Params

SUPPORTED_ARCHITECTURES = ("llama",)

_TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# HF suffix under model.layers.{i}. -> GGUF suffix under blk.{i}.
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of HF tensor `hf_name`."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[suffix]}"


def _meta(reader: GGUFReader, key: str, source: str, default: Any = ...) -> Any:
    return gguf_field(reader, key, source, ModelConfigError, default)


def config_from_gguf(reader: GGUFReader, source: str = "<gguf>", **runtime: Any) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; embeddings are tied when there is no output.weight."""
    arch = _meta(reader, "general.architecture", source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{source}: unsupported GGUF architecture {arch!r}; supported: "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelConfigError(
            f"{source}: per-frequency RoPE factors (tensor 'rope_freqs.weight', Llama-3.1 style) "
            "are not supported by the GGUF import; use the HF checkpoint instead"
        )

    def need(key: str) -> int:
        return int(_meta(reader, f"{arch}.{key}", source))

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", source, hidden // heads))
    rope_dim = int(_meta(reader, f"{arch}.rope.dimension_count", source, head_dim))
    if rope_dim != head_dim:
        raise ModelConfigError(
            f"{source}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dim}, "
            f"head_dim={head_dim}) are not supported"
        )
    scaling_type = _meta(reader, f"{arch}.rope.scaling.type", source, "none")
    scaling = None
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(_meta(reader, f"{arch}.rope.scaling.factor", source)))
    elif scaling_type != "none":
        raise ModelConfigError(f"{source}: RoPE scaling {scaling_type!r} is not supported")
    tokens = _meta(reader, "tokenizer.ggml.tokens", source, None)
    vocab = _meta(reader, f"{arch}.vocab_size", source, None)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        raise ModelConfigError(f"{source}: cannot tell the vocab size ({arch}.vocab_size)")
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", source, None)
    eos = _meta(reader, "tokenizer.ggml.eos_token_id", source, None)
    # float32 metadata (9.99999975e-06): keep 7 significant digits so the export reads 1e-05.
    eps = float(f"{float(_meta(reader, f'{arch}.attention.layer_norm_rms_epsilon', source)):.7g}")
    config = ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=heads,
        num_kv_heads=int(_meta(reader, f"{arch}.attention.head_count_kv", source, heads)),
        head_dim=head_dim,
        rope_theta=float(_meta(reader, f"{arch}.rope.freq_base", source, 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=eps,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_meta(reader, f"{arch}.context_length", source, 4096)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    return config.replace(**runtime)


def unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of a q/k projection (rows [n_heads * head_dim, ...]).

    llama.cpp reorders each head's rows from HF's (half, pair) order to (pair, half) so that its
    interleaved RoPE sees HF's rotate-half pairs; this is the inverse reshape.
    """
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


class _GGUFTensors:
    """HF-named, dequantized, shape-checked tensors of a GGUF file, read on demand."""

    def __init__(self, reader: GGUFReader, config: ModelConfig, source: str) -> None:
        self.config, self.source = config, source
        self.tensors = {t.name: t for t in reader.tensors}

    def _find(self, hf_name: str) -> Any:
        name = gguf_name(hf_name)
        tensor = self.tensors.get(name)
        if tensor is None:
            raise WeightError(
                f"{self.source}: tensor {name!r} (HF {hf_name!r}) is missing from the GGUF file"
            )
        return tensor

    def check_all(self) -> None:
        """Presence and shape of every needed tensor, before anything is dequantized."""
        for hf_name in hf_tensor_names(self.config):
            tensor = self._find(hf_name)
            shape = tuple(int(d) for d in reversed(tensor.shape))
            if shape != expected_hf_shape(hf_name, self.config):
                checked(hf_name, np.broadcast_to(np.bool_(0), shape), self.config, self.source)

    def get(self, hf_name: str) -> np.ndarray:
        tensor = self._find(hf_name)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type)).reshape(shape)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_rope(array, self.config.num_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_rope(array, self.config.num_kv_heads)
        return checked(hf_name, array, self.config, self.source)


def load_gguf(
    path: Any, *, shardings: Any = None, **runtime: Any
) -> tuple[Params, ModelConfig, Tokenizer]:
    """Params, config and tokenizer of a llama-architecture GGUF file (path or GGUFReader).

    `runtime` sets ModelConfig runtime fields (`param_dtype`, `dtype`, ...); `shardings` places
    each weight into its NamedSharding as in `hf_io.load_hf_checkpoint`. Weights are dequantized
    to float: the model runs at float precision, only the values carry the quantization error.
    """
    reader, source = open_gguf(path)
    config = config_from_gguf(reader, source, **runtime)
    tensors = _GGUFTensors(reader, config, source)
    tensors.check_all()
    tokenizer = Tokenizer.from_gguf(reader)
    check_compatible(tokenizer, config)
    params = params_from_hf_getter(tensors.get, config, shardings)
    return params, config, tokenizer
