"""The tiny in-memory tokenizer, save/reload through HF files, and the model-fit check."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlver_jax.model_io.tokenizer import Tokenizer, TokenizerError, check_compatible
from rlver_jax.models.config import ModelConfig

TEXTS = [
    "I hear you. That sounds really hard, and it is okay to feel upset.",
    "我听到了你的感受。今天发生了什么？你并不孤单。",
    "Mixed: 12,345 apples, 3.5 kg, naïve café 😀 — done!\n\tnew line",
    "  leading and trailing spaces  ",
]


def _config(vocab: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )


def test_tiny_builds_fast_and_deterministically() -> None:
    start = time.perf_counter()
    tok = Tokenizer.tiny()
    assert time.perf_counter() - start < 1.0
    assert 300 <= tok.vocab_size <= 600
    again = Tokenizer.tiny()
    assert again.hf.get_vocab() == tok.hf.get_vocab()
    assert again.hf is not tok.hf  # each call gets its own (mutable) HF object


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_round_trip(text: str) -> None:
    tok = Tokenizer.tiny()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tiny_merges_compress_english() -> None:
    tok = Tokenizer.tiny()
    text = TEXTS[0]
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


def test_tiny_special_tokens_and_chat() -> None:
    tok = Tokenizer.tiny()
    vocab = tok.hf.get_vocab()
    im_start, im_end, eot = vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<|endoftext|>"]
    assert tok.encode("<|im_start|>") == [im_start]
    assert set(tok.stop_token_ids) == {im_end, eot}
    assert tok.hf.eos_token_id == im_end and tok.pad_id == eot
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "I feel lonely."},
    ]
    text = tok.render_chat(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nI feel lonely.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.render_chat(messages, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == im_start and ids.count(im_end) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "system\nBe kind.\nuser\nI feel lonely.\nassistant\n"


def test_read_only_but_picklable() -> None:
    tok = Tokenizer.tiny()
    with pytest.raises(AttributeError):
        tok.pad_id = 5  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert again.stop_token_ids == tok.stop_token_ids


def test_save_and_reload(tmp_path: Path) -> None:
    tok = Tokenizer.tiny()
    tok.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "你好, how are you?"}]
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert again.render_chat(messages) == tok.render_chat(messages)
    assert again.stop_token_ids == tok.stop_token_ids and again.pad_id == tok.pad_id
    assert again.vocab_size == tok.vocab_size


def test_from_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_check_compatible() -> None:
    tok = Tokenizer.tiny()
    check_compatible(tok, _config(tok.vocab_size))
    check_compatible(tok, _config(tok.vocab_size + 64))  # padded embedding: fine
    with pytest.raises(TokenizerError, match=r"mismatch.*512 tokens.*only 97 rows"):
        check_compatible(tok, _config(97))
