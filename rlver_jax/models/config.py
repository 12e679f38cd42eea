"""Model configuration: the decoder's shape, read from a HF `config.json`.

One frozen, hashable dataclass describes every supported family (Llama / SmolLM2, Qwen2 /
Qwen2.5, Qwen3); it is a static argument of every jitted function, so it must stay hashable.
Runtime choices (compute dtype, scan, remat, attention blocks) live beside the shape because
they change the compiled program, not the weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["llama", "qwen2", "qwen3"]
RematPolicy = Literal["none", "full", "dots"]

ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_HF_ARCHITECTURE: dict[Family, str] = {v: k for k, v in ARCHITECTURES.items()}
_HF_MODEL_TYPE: dict[Family, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class ModelConfigError(ValueError):
    """A model config that cannot be used; the message names the file and the key."""


def check_attention_block(value: Any, key: str = "attention_block") -> None:
    """`attention_block` (or `causal_block`) is a query count >= 0 (0: never blocked)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelConfigError(f"{key} must be >= 0, an int (0: unblocked), got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` "linear" or "llama3", as in HF's config)."""

    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer."""

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Runtime options: they change the compiled program, not the weights.
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: RematPolicy = "none"
    # Queries per attention block: longer blocks are attended in blocks of this many queries,
    # each under `jax.checkpoint`, so no T x T score matrix is ever whole (0: never blocked).
    attention_block: int = 1024
    # The implementation of causal self-attention (training, a prefill over its own prompt):
    # "xla" (the reference, `attention.attention`), "xla_causal" (the same, skipping the key
    # blocks above the diagonal), a kernel registered by `rlver_jax.kernels`, or "auto": the
    # sampler and the learner resolve it per program (`kernels.select.resolve_attention`);
    # traced unresolved (the model used on its own), "auto" is the reference.
    attention: str = "auto"
    # Queries per block of "xla_causal" (a parameter of that implementation, not a switch).
    causal_block: int = 64

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.remat not in ("none", "full", "dots"):
            raise ModelConfigError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        check_attention_block(self.attention_block)
        check_attention_block(self.causal_block, "causal_block")
        if not isinstance(self.attention, str):
            raise ModelConfigError(f"attention must be a name, got {self.attention!r}")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16", "float16"):
                raise ModelConfigError(
                    f"{key} must be float32, bfloat16 or float16, got {getattr(self, key)!r}"
                )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included, counted once when tied)."""
        d, f, h, k, dh = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * dh * 2 + d * k * dh * 2
        if self.attention_bias:
            attn += (h + 2 * k) * dh
        if self.qk_norm:
            attn += 2 * dh
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * layer + self.vocab_size * d + d + head

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from the dict of a HF `config.json`; errors name `source` and the key."""
        archs = raw.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            model_type = raw.get("model_type")
            family = model_type if model_type in ("llama", "qwen2", "qwen3") else None
        if family is None:
            raise ModelConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {sorted(ARCHITECTURES)}"
            )

        def need(key: str, kind: type = int) -> Any:
            if key not in raw or raw[key] is None:
                raise ModelConfigError(f"{source}: missing required key {key!r}")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise ModelConfigError(f"{source}: key {key!r} must be an integer, got {value!r}")
            if kind is int and value <= 0:
                raise ModelConfigError(f"{source}: key {key!r} must be positive, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = raw.get("head_dim") or hidden // heads
        rope = raw.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling_raw = raw.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rope_scaling=_parse_rope_scaling(scaling_raw, source),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path, **runtime: Any) -> ModelConfig:
        """Read `<path>/config.json`; `runtime` sets dtype, scan_layers, remat."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ModelConfigError(f"{file}: no config.json in the checkpoint directory")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ModelConfigError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{file}: expected a JSON object at the top level")
        return cls.from_hf_dict(raw, source=str(file)).replace(**runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """A HF `config.json` dict that transformers' AutoConfig reads back."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {
                **dataclasses.asdict(self.rope_scaling),
                "rope_theta": self.rope_theta,
            }
        out: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURE[self.family]],
            "model_type": _HF_MODEL_TYPE[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
        }
        if self.family == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = (
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
            )
        return out


def _parse_rope_scaling(raw: dict[str, Any] | None, source: str) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise ModelConfigError(
            f"{source}: rope scaling type {kind!r} is not supported (linear, llama3)"
        )
    try:
        return RopeScaling(
            rope_type=kind,
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    except KeyError as err:
        raise ModelConfigError(f"{source}: rope scaling is missing key {err}") from None
