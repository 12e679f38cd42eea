"""One entry point for every model source a config can name.

    spec = ModelSpec(source="smollm2")                       # the embedded default (offline)
    spec = ModelSpec(source="hf", path="/ckpt/Qwen2.5-7B-Instruct", dtype="bfloat16")
    spec = ModelSpec(source="gguf", path="model.gguf")
    spec = ModelSpec(source="random", family="qwen3", hidden_size=64, ...)  # + tiny tokenizer

`load_model(spec, shardings_fn)` returns (params, ModelConfig, Tokenizer), checks that the
tokenizer fits the model, and, given a mesh, places params straight into their shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax

from rlver_jax.kernels.select import ATTENTION_CHOICES, check_choice
from rlver_jax.model_io.tokenizer import Tokenizer, check_compatible
from rlver_jax.models.config import ModelConfig, check_attention_block
from rlver_jax.models.transformer import Params, init_params

Source = Literal["smollm2", "hf", "gguf", "random"]
# Every pair of these runs (learner state: docs/architecture.md, "Precision of the learner state")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, and how it runs (dtype, scan over layers, remat, attention
    blocks)."""

    # smollm2: the embedded SmolLM2-135M-Instruct (offline); hf: a HF checkpoint directory;
    # gguf: a GGUF file; random: a random-init model of the shape below (tiny tokenizer)
    source: Source = "smollm2"
    path: str | None = None  # hf: checkpoint directory; gguf: file
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of activations, matmuls
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the weights are kept in
    scan_layers: bool = True  # run the layers as one lax.scan over stacked weights
    # recompute activations in the backward pass: none, full (every layer's), or dots (all
    # but the matmul outputs)
    remat: Literal["none", "full", "dots"] = "none"
    attention_block: int = 1024  # queries per attention block (0: unblocked); see ModelConfig
    # causal attention: auto | xla | xla_causal | cpu_kernel (kernels.select; auto: per program)
    attention: str = "auto"
    # source="random": the shape of a random-init model that uses the project's tiny tokenizer.
    family: Literal["llama", "qwen2", "qwen3"] = "qwen2"  # random: architecture family
    hidden_size: int = 64  # random: model width
    intermediate_size: int = 128  # random: MLP width
    num_layers: int = 2  # random: decoder layers
    num_heads: int = 4  # random: query heads
    num_kv_heads: int = 2  # random: key/value heads (grouped-query attention)
    head_dim: int = 16  # random: width of one head
    init_seed: int = 0  # random: seed of the weight initialisation

    def __post_init__(self) -> None:
        if self.source in ("hf", "gguf") and not self.path:
            raise ValueError(f"model.path is required when model.source is {self.source!r}")
        if self.source in ("hf", "gguf") and self.path and not Path(self.path).exists():
            raise ValueError(f"model.path {self.path!r} does not exist")
        for key in ("dtype", "param_dtype"):  # also when built in Python (no Literal check)
            if getattr(self, key) not in DTYPES:
                raise ValueError(
                    f"model.{key} must be one of {', '.join(DTYPES)}, got {getattr(self, key)!r}"
                    " (float16 would need loss scaling, which the learner does not do)"
                )
        check_attention_block(self.attention_block)  # at config load, before any work
        check_choice("model.attention", self.attention, ATTENTION_CHOICES)

    @property
    def runtime(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "scan_layers": self.scan_layers,
            "remat": self.remat,
            "attention_block": self.attention_block,
            "attention": self.attention,
        }

    def model_config(self) -> ModelConfig:
        """The ModelConfig without loading weights (for planning and abstract shapes)."""
        if self.source == "random":
            tok = Tokenizer.tiny()
            return ModelConfig(
                family=self.family,
                vocab_size=tok.vocab_size,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                tie_word_embeddings=True,
                attention_bias=self.family == "qwen2",
                qk_norm=self.family == "qwen3",
                eos_token_ids=tok.stop_token_ids,
                **self.runtime,
            )
        if self.source == "hf":
            return ModelConfig.from_hf_dir(self.path or "", **self.runtime)
        return load_model(self)[1]


ShardingsFn = Callable[[ModelConfig], Any]


def load_model(
    spec: ModelSpec, shardings_fn: ShardingsFn | None = None
) -> tuple[Params, ModelConfig, Tokenizer]:
    """Load (params, config, tokenizer) for `spec`; `shardings_fn(config)` gives placements."""
    if spec.source == "smollm2":
        from rlver_jax.model_io.default_model import default_hf_dir, load_default_model

        shardings = None
        if shardings_fn is not None:  # the config comes from the cached HF export
            shardings = shardings_fn(ModelConfig.from_hf_dir(default_hf_dir(), **spec.runtime))
        params, config, tok = load_default_model(shardings=shardings, **spec.runtime)
    elif spec.source == "hf":
        from rlver_jax.model_io.hf_io import load_hf_checkpoint

        config = ModelConfig.from_hf_dir(spec.path or "", **spec.runtime)
        shardings = None if shardings_fn is None else shardings_fn(config)
        params, config = load_hf_checkpoint(spec.path or "", shardings=shardings, **spec.runtime)
        tok = Tokenizer.from_hf_dir(spec.path or "")
    elif spec.source == "gguf":
        from rlver_jax.model_io.gguf_io import load_gguf

        params, config, tok = load_gguf(spec.path or "", **spec.runtime)
        if shardings_fn is not None:
            params = jax.device_put(params, shardings_fn(config))
    else:
        config = spec.model_config()
        tok = Tokenizer.tiny()
        init = jax.jit(
            init_params,
            static_argnums=0,
            out_shardings=None if shardings_fn is None else shardings_fn(config),
        )
        params = init(config, jax.random.key(spec.init_seed))
    check_compatible(tok, config)
    return params, config, tok
