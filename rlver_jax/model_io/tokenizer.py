"""Tokenizers: a thin, read-only wrapper over `transformers.PreTrainedTokenizerFast`.

The rest of the project needs only a handful of operations (encode without special tokens,
decode, render a chat with the model's own template, stop ids, pad id), so they live on one small
class whatever the tokenizer's origin:

- `Tokenizer.from_hf_dir`: a HF checkpoint directory (tokenizer.json + tokenizer_config.json);
- `Tokenizer.from_gguf`: the byte-level BPE embedded in a GGUF file, rebuilt offline with the
  `tokenizers` library (llama.cpp's metadata carries vocab, merges, token types, special ids and
  the chat template);
- `Tokenizer.tiny`: a ~500-token byte-level BPE with ChatML special tokens, learned in memory
  from a built-in corpus in milliseconds, for fast tests of tiny models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlver_jax.model_io.gguf_file import gguf_field, open_gguf
from rlver_jax.models.config import ModelConfig

Message = dict[str, str]

# End-of-turn / end-of-text markers of the supported families; any present as special tokens
# stop generation in addition to the tokenizer's eos.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or does not fit the model; names the file or cause."""


class Tokenizer:
    """Read-only facade over a fast HF tokenizer (the wrapped object is `.hf`)."""

    __slots__ = ("_hf", "_stop_ids")

    def __init__(self, hf: PreTrainedTokenizerFast) -> None:
        object.__setattr__(self, "_hf", hf)
        added = hf.get_added_vocab()
        stops = [hf.eos_token_id] if hf.eos_token_id is not None else []
        stops += [added[t] for t in END_TOKENS if t in added]
        object.__setattr__(self, "_stop_ids", tuple(dict.fromkeys(stops)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Tokenizer is read-only")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through __init__ (pickle, copy, worker processes): setattr is disabled.
        return (Tokenizer, (self._hf,))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, stop_token_ids={self.stop_token_ids})"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer saved in a HF directory (tokenizer.json, tokenizer_config.json)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path}: no tokenizer.json in the directory")
        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise TokenizerError(f"{path}: cannot load the tokenizer ({err})") from None
        if not isinstance(hf, PreTrainedTokenizerFast):
            raise TokenizerError(f"{path}: expected a fast tokenizer, got {type(hf).__name__}")
        return cls(hf)

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> Tokenizer:
        """The byte-level BPE tokenizer stored in a GGUF file (a path or a `gguf.GGUFReader`)."""
        reader, source = open_gguf(reader_or_path)
        return cls(_hf_from_gguf(reader, source))

    @classmethod
    def tiny(cls) -> Tokenizer:
        """A small byte-level BPE with ChatML special tokens, for fast tests (built in ms)."""
        return cls(_tiny_hf())

    # ------------------------------------------------------------------ properties
    @property
    def hf(self) -> PreTrainedTokenizerFast:
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added tokens included): must fit the model's embedding."""
        return len(self._hf)

    @property
    def pad_id(self) -> int:
        """Pad id; falls back to eos (padding is masked out, so any real id serves)."""
        pad = self._hf.pad_token_id
        if pad is None:
            pad = self._hf.eos_token_id
        return 0 if pad is None else int(pad)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos plus every end-of-turn token in the vocab (e.g. `<|im_end|>`, `<|endoftext|>`)."""
        return self._stop_ids

    @property
    def chat_template(self) -> str | None:
        return self._hf.chat_template

    # ------------------------------------------------------------------ operations
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no bos/eos is added (chat templates place their own)."""
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The chat as text, through the model's own template (kept as shipped, e.g. SmolLM2
        inserts its default system prompt when the chat has none)."""
        if not self._hf.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        return self._hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of `render_chat(...)` (its special tokens map to their ids)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json (+ chat template) for `from_hf_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._hf.save_pretrained(str(out_dir))
        return out_dir


def check_compatible(tokenizer: Tokenizer, config: ModelConfig) -> None:
    """Raise TokenizerError when the tokenizer can emit ids the model has no embedding for.

    A model may have more rows than the tokenizer has tokens (vocab padded for speed), never
    fewer: that is the sign of a tokenizer from another model.
    """
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"tokenizer/model mismatch: the tokenizer has {tokenizer.vocab_size} tokens but the "
            f"model's embedding has only {config.vocab_size} rows; use the model's own tokenizer"
        )
    bad = [i for i in tokenizer.stop_token_ids if i >= config.vocab_size]
    if bad:
        raise TokenizerError(f"tokenizer/model mismatch: stop ids {bad} >= {config.vocab_size}")


# --------------------------------------------------------------------------- GGUF
# llama.cpp pre-tokenizer names -> digit handling. "smollm" (and the StarCoder family) split
# every digit on its own before the GPT-2 regex; plain GPT-2 does not.
_GGUF_PRE_DIGITS = {"smollm": True, "starcoder": True, "refact": True, "gpt-2": False}


def _field(reader: Any, key: str, source: str, default: Any = ...) -> Any:
    return gguf_field(reader, key, source, TokenizerError, default)


def _hf_from_gguf(reader: Any, source: str) -> PreTrainedTokenizerFast:
    kind = _field(reader, "tokenizer.ggml.model", source)
    if kind != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    pre = _field(reader, "tokenizer.ggml.pre", source, "gpt-2")
    if pre not in _GGUF_PRE_DIGITS:
        raise TokenizerError(
            f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {sorted(_GGUF_PRE_DIGITS)})"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", source)
    types: list[int] = _field(reader, "tokenizer.ggml.token_type", source, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", source)]
    if len(types) != len(tokens):
        raise TokenizerError(
            f"{source}: {len(types)} token types for {len(tokens)} tokens in the GGUF metadata"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    rust = _byte_level_bpe(vocab, merges, split_digits=_GGUF_PRE_DIGITS[pre])
    # token_type 3 = control (special), 4 = user-defined (added, not special).
    typed = list(zip(tokens, types, strict=True))
    rust.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3]
    )
    rust.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])

    def token_of(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id", source, None)
        return None if idx is None or idx >= len(tokens) else tokens[int(idx)]

    return PreTrainedTokenizerFast(
        tokenizer_object=rust,
        bos_token=token_of("bos"),
        eos_token=token_of("eos"),
        unk_token=token_of("unknown"),
        pad_token=token_of("padding"),
        chat_template=_field(reader, "tokenizer.chat_template", source, None),
        clean_up_tokenization_spaces=False,
    )


def _byte_level_bpe(
    vocab: dict[str, int], merges: list[tuple[str, ...]], split_digits: bool
) -> RustTokenizer:
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rust.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    rust.decoder = decoders.ByteLevel()
    return rust


# --------------------------------------------------------------------------- tiny
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TINY_MERGES = 253  # 3 specials + 256 bytes + 253 merges = 512 ids
_TINY_CORPUS = (
    "I hear you. That sounds really hard, and it makes sense that you feel tired and upset. "
    "Would you like to tell me more about what happened today? I am here to listen. "
    "It is okay to feel sad when things do not go the way you hoped. You are not alone. "
    "Thank you for sharing this with me. How are you feeling right now? What would help you "
    "the most at the moment? Sometimes talking about it helps a little. I understand why that "
    "would make you angry. Your feelings are valid, and you deserve to be heard and supported. "
    "The user is a student who feels stressed about exams and worried about the future. "
    "My friend did not call me back and I feel lonely. My boss said my work was not good "
    "enough and I feel like giving up. I am so happy that you told me about this! "
    "Let us think about what you can do next, one small step at a time. "
    "What is the capital of France? The capital of France is Paris. "
    "Hello, how are you? I am fine, thank you. Please tell me something about your day. "
    "我听到了你的感受。这听起来真的很难，你感到疲惫和难过是可以理解的。"
    "你愿意告诉我今天发生了什么吗？我在这里倾听你。你并不孤单。"
    "谢谢你和我分享这些。你现在感觉怎么样？我理解你为什么会生气。"
)


@cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's printable character for each byte value 0..255 (the byte-level alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


def _learn_merges(texts: Sequence[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training (most frequent pair, ties by the smaller pair): deterministic and
    independent of the `tokenizers` trainer's version."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = Counter(piece for text in texts for piece, _ in pre.pre_tokenize_str(text))
    words: dict[tuple[str, ...], int] = {tuple(w): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        pair, _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(pair)
        joined = pair[0] + pair[1]
        new_words: dict[tuple[str, ...], int] = {}
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


@cache
def _tiny_merges() -> tuple[tuple[str, str], ...]:
    return tuple(_learn_merges(_TINY_CORPUS.split(". "), _TINY_MERGES))


def _tiny_hf() -> PreTrainedTokenizerFast:
    """A fresh HF tokenizer each call (HF tokenizers are mutable); the merges are cached."""
    merges = _tiny_merges()
    symbols = [*_TINY_SPECIALS, *_bytes_to_unicode(), *(a + b for a, b in merges)]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    rust = _byte_level_bpe(vocab, list(merges), split_digits=False)
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _TINY_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=rust,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
