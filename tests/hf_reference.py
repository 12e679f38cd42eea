"""Tiny random HF torch models of each family, the independent reference for parity tests."""

from __future__ import annotations

import numpy as np

from rlver_jax.model_io.weight_map import leaf_from_hf
from rlver_jax.models.config import ModelConfig

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_torch_model(family: str, seed: int = 0, tie: bool = False, **overrides):
    """A random-init transformers model of `family` ("llama", "qwen2", "qwen3")."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    kwargs = dict(TINY, tie_word_embeddings=tie, **overrides)
    kwargs.setdefault("rope_theta", 10000.0 if family == "llama" else 1e6)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # Random norm scales and biases: HF initialises them to 1 and 0, which would hide bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def params_from_torch(model, config: ModelConfig) -> dict:
    """Our params from a torch model's state dict (through the shared weight map)."""
    import jax

    from rlver_jax.models.transformer import param_shapes

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaves = [
        leaf_from_hf(tuple(k.key for k in path), state.__getitem__, config, np.float32)
        for path, _ in flat
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()
