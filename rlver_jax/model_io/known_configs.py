"""The shapes of common checkpoints (their config.json's shape keys), for planning and
benchmarks without the checkpoint itself: `rlver-jax plan --hf-config NAME`, `bench --model`."""

from __future__ import annotations

from typing import Any

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
# config.json of common checkpoints (shape keys only), by lower-case directory name.
KNOWN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b-instruct": _QWEN2 | {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "qwen2.5-1.5b-instruct": _QWEN2 | {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "qwen2.5-3b-instruct": _QWEN2 | {
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "qwen2.5-7b-instruct": _QWEN2 | {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 32768},
    "qwen2.5-14b-instruct": _QWEN2 | {
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
        "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 32768},
}  # fmt: skip
for _name in list(KNOWN_HF_CONFIGS):  # base models share their instruct variant's shape
    KNOWN_HF_CONFIGS[_name.removesuffix("-instruct")] = KNOWN_HF_CONFIGS[_name]
