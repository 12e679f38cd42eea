"""A small compiled JAX model of what a policy reply DOES, computed from its tokens.

`ReferenceUser` (see `reference_user.py`) turns these features into an emotion change. The
features of each reply, batched and jitted:

* skill counts [B, 9]: occurrences of lexicon phrases per skill (`SKILLS`, from
  `rlver_jax/data/lexicons/{en,zh}.yaml`), plus a 9th column counting multi-token encodings of
  '?'/'？' (used by the question count when the tokenizer splits them);
* repetition: fraction of the reply's token n-grams that already occurred earlier in the reply;
* overlap: fraction of the reply's token n-grams that occur in the previous policy reply;
* garbage: fraction of the reply's tokens flagged in a vocab-sized table (special tokens, and
  tokens whose text has no letter, CJK character or digit and is not common punctuation/space);
* questions: tokens whose text holds '?' or '？' (plus the multi-token column above).

Pattern matching (exact, on token ids). Every lexicon phrase is encoded in variants (as is, with
a leading space, and for English capitalised, with and without the space; a lowercase English "i"
is written "I"), variants that contain another variant of the same phrase are dropped so an
occurrence is never counted twice, and all patterns are padded into `patterns` [P, L]. Pattern p
occurs at position i of a reply when tokens[i + j] == patterns[p, j] for all j < lengths[p], the
window lies inside the reply, and it does not cut a word: not (pattern starts with a word
character and token i-1 ends with one), and likewise at the end with token i + lengths[p]. Word
characters are letters/digits outside CJK (CJK text has no word boundaries). The jitted matcher
compares the token array shifted by each pattern offset with the patterns and sums matches per
skill with a one-hot contraction (only patterns starting with token i are compared). Chinese
caveat: byte-level BPE merges inside a run of CJK characters, so a Chinese phrase inside a longer
run may be tokenised differently from the phrase alone and then is not found; lexicon words that
are single tokens are always found.

n-grams: the repetition order `ngram` defaults to about two words' worth of tokens
(`auto_ngram`, 2 for typical BPE vocabularies on English), so byte-like tokenizers do not count
every repeated letter pair as repetition.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from rlver_jax.buckets import pow2_bucket

SKILLS: tuple[str, ...] = (
    "empathy",
    "insight",
    "solutions",
    "praise",
    "listening",
    "reflection",
    "dismissive",
    "generic_comfort",
)
QUESTION_COLUMN = len(SKILLS)  # pseudo-skill: '?' / '？' when they take several tokens
NUM_COLUMNS = len(SKILLS) + 1

PATTERN_PAD = -2  # never a token id
TOKEN_PAD = -1  # padding of the reply's tokens
PREV_PAD = -3  # padding of the previous reply's tokens (differs from TOKEN_PAD: pads never match)

COMMON_PUNCTUATION = frozenset(".,!?;:'\"-()[]…—–/%&、。，！？；：“”‘’（）《》【】～~·")
QUESTION_MARKS = ("?", "？")
_CALIBRATION = {
    "en": "I hear how hard this has been for you, and it makes sense that you feel tired.",
    "zh": "听起来这段时间你真的很辛苦，觉得很累也很孤单，这很正常。",
}
_NGRAM_TARGET_CHARS = {"en": 8.0, "zh": 3.0}  # about two words


class TokenizerLike(Protocol):
    """What the lexicon model needs from `rlver_jax.models.tokenizer.Tokenizer`."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class LexiconArrays(NamedTuple):
    """Device-side tables (a pytree, passed to the jitted functions as arguments)."""

    patterns: jax.Array  # [P, L] int32, PATTERN_PAD beyond each length
    lengths: jax.Array  # [P] int32
    columns: jax.Array  # [P] int32: the pattern's column (skill index, or QUESTION_COLUMN)
    first_row: jax.Array  # [V] int32: row of `candidates` for patterns starting with token v
    candidates: jax.Array  # [R, K] int32 pattern indices by first token, -1 padded; row 0 empty
    pat_starts_word: jax.Array  # [P] bool: first token's text begins with a word character
    pat_ends_word: jax.Array  # [P] bool: last token's text ends with a word character
    tok_starts_word: jax.Array  # [V] bool
    tok_ends_word: jax.Array  # [V] bool
    garbage: jax.Array  # [V] bool
    question: jax.Array  # [V] bool: the token's text holds '?' or '？'


@dataclasses.dataclass(frozen=True)
class LexiconModel:
    """Host-side description of the compiled patterns (for inspection) and the device tables."""

    arrays: LexiconArrays
    phrases: tuple[str, ...]  # the text variant of each pattern
    skills: tuple[int, ...]  # the column of each pattern
    token_texts: tuple[str, ...]  # decoded text of each vocab id (special tokens as-is)
    special_ids: frozenset[int]


def is_word_char(ch: str) -> bool:
    """Letters and digits outside CJK (< U+2E80): characters that form space-separated words."""
    return ch.isalnum() and ord(ch) < 0x2E80


def _is_content_char(ch: str) -> bool:
    return ch.isalnum()  # letters (CJK included) and digits


def is_garbage_text(text: str) -> bool:
    """True for text with no letter/CJK/digit that is not only common punctuation and spaces.

    A lone piece of a multi-byte character (decoded as U+FFFD) is not garbage: byte-level
    tokenizers split CJK characters into such pieces.
    """
    if "\ufffd" in text:
        return False
    if any(_is_content_char(ch) for ch in text):
        return False
    return not all(ch.isspace() or ch in COMMON_PUNCTUATION for ch in text)


def load_lexicon(language: str) -> dict[str, list[str]]:
    """The packaged lexicon `rlver_jax/data/lexicons/{language}.yaml` (skill -> phrases)."""
    resource = importlib.resources.files("rlver_jax").joinpath(
        "data", "lexicons", f"{language}.yaml"
    )
    with resource.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"lexicon {language}: expected a mapping skill -> list of phrases")
    unknown = sorted(set(data) - set(SKILLS))
    if unknown:
        raise ValueError(f"lexicon {language}: unknown skill {unknown[0]!r} (known: {SKILLS})")
    out: dict[str, list[str]] = {}
    for skill in SKILLS:
        phrases = data.get(skill) or []
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise ValueError(f"lexicon {language}: skill {skill!r} must be a list of strings")
        out[skill] = [p.strip() for p in phrases if p.strip()]
    return out


def phrase_variants(phrase: str, language: str) -> list[str]:
    """Surface forms searched for: as is, with a leading space; English also capitalised (with
    and without the space) and with a curly apostrophe where the phrase has one."""
    if language == "en":
        phrase = re.sub(r"\bi\b", "I", phrase)
        cap = phrase[:1].upper() + phrase[1:]
        forms = [phrase, " " + phrase, cap, " " + cap]
        forms += [f.replace("'", "\u2019") for f in forms if "'" in f]  # curly apostrophe
    else:
        forms = [phrase, " " + phrase]
    return list(dict.fromkeys(forms))


def _contains(seq: tuple[int, ...], sub: tuple[int, ...]) -> bool:
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def _special_ids(tokenizer: TokenizerLike) -> frozenset[int]:
    hf = getattr(tokenizer, "hf", None)
    ids: set[int] = set(getattr(tokenizer, "stop_token_ids", ()))
    if hf is not None:
        ids.update(int(i) for i in hf.all_special_ids)
        for idx, tok in hf.added_tokens_decoder.items():
            if tok.special:
                ids.add(int(idx))
    return frozenset(i for i in ids if 0 <= i < tokenizer.vocab_size)


def _token_texts(tokenizer: TokenizerLike) -> list[str]:
    hf = getattr(tokenizer, "hf", None)
    ids = [[i] for i in range(tokenizer.vocab_size)]
    if hf is not None:
        return list(hf.batch_decode(ids, skip_special_tokens=False))
    return [tokenizer.decode(i, skip_special_tokens=False) for i in ids]


def build_lexicon_model(
    tokenizer: TokenizerLike, lexicons: Mapping[str, Mapping[str, Iterable[str]]]
) -> LexiconModel:
    """Compile `lexicons` (language -> skill -> phrases) for `tokenizer` into pattern tables."""
    entries: dict[tuple[tuple[int, ...], int], str] = {}
    for language, by_skill in lexicons.items():
        for skill in SKILLS:
            for phrase in by_skill.get(skill, ()):
                _add_variants(
                    entries, tokenizer, phrase_variants(phrase, language), SKILLS.index(skill)
                )
    for mark in QUESTION_MARKS:
        ids = tuple(tokenizer.encode(mark))
        if len(ids) > 1:  # single-token marks are counted by the `question` vocab table
            entries.setdefault((ids, QUESTION_COLUMN), mark)
    texts = _token_texts(tokenizer)
    specials = _special_ids(tokenizer)
    starts = np.array([bool(t) and is_word_char(t[0]) for t in texts])
    ends = np.array([bool(t) and is_word_char(t[-1]) for t in texts])
    garbage = np.array([i in specials or is_garbage_text(t) for i, t in enumerate(texts)])
    question = np.array(
        [i not in specials and any(q in t for q in QUESTION_MARKS) for i, t in enumerate(texts)]
    )
    keys = sorted(entries)  # deterministic order
    max_len = max([len(k[0]) for k in keys], default=1)
    patterns = np.full((max(len(keys), 1), max_len), PATTERN_PAD, np.int32)
    lengths = np.zeros(max(len(keys), 1), np.int32)
    columns = np.zeros(max(len(keys), 1), np.int32)
    by_first: dict[int, list[int]] = {}
    for p, (ids, col) in enumerate(keys):
        patterns[p, : len(ids)] = ids
        lengths[p] = len(ids)
        columns[p] = col
        by_first.setdefault(ids[0], []).append(p)
    if not keys:  # an empty pattern never matches: length 1 with a pad id
        lengths[0] = 1
    first_row = np.zeros(tokenizer.vocab_size, np.int32)
    width = max([len(v) for v in by_first.values()], default=1)
    candidates = np.full((len(by_first) + 1, width), -1, np.int32)
    for row, (token, pats) in enumerate(sorted(by_first.items()), start=1):
        first_row[token] = row
        candidates[row, : len(pats)] = pats
    first = np.maximum(patterns[:, 0], 0)
    last = np.maximum(patterns[np.arange(len(lengths)), lengths - 1], 0)
    arrays = LexiconArrays(
        patterns=jnp.asarray(patterns),
        lengths=jnp.asarray(lengths),
        columns=jnp.asarray(columns),
        first_row=jnp.asarray(first_row),
        candidates=jnp.asarray(candidates),
        pat_starts_word=jnp.asarray(starts[first] & (patterns[:, 0] >= 0)),
        pat_ends_word=jnp.asarray(ends[last]),
        tok_starts_word=jnp.asarray(starts),
        tok_ends_word=jnp.asarray(ends),
        garbage=jnp.asarray(garbage),
        question=jnp.asarray(question),
    )
    return LexiconModel(
        arrays=arrays,
        phrases=tuple(entries[k] for k in keys),
        skills=tuple(k[1] for k in keys),
        token_texts=tuple(texts),
        special_ids=specials,
    )


def _add_variants(
    entries: dict[tuple[tuple[int, ...], int], str],
    tokenizer: TokenizerLike,
    forms: Sequence[str],
    column: int,
) -> None:
    encoded = {tuple(tokenizer.encode(f)): f for f in forms}
    encoded.pop((), None)
    for ids, form in encoded.items():
        # A variant containing another variant would count each occurrence twice: drop it.
        if any(other != ids and _contains(ids, other) for other in encoded):
            continue
        entries.setdefault((ids, column), form)


def auto_ngram(tokenizer: TokenizerLike, language: str) -> int:
    """n-gram order spanning about two words: round(target chars / chars per token), in [2, 12]."""
    text = _CALIBRATION[language]
    chars_per_token = len(text) / max(len(tokenizer.encode(text)), 1)
    return int(np.clip(round(_NGRAM_TARGET_CHARS[language] / chars_per_token), 2, 12))


def _shift_left(x: jax.Array, j: int, fill: int) -> jax.Array:
    """y[:, i] = x[:, i + j] (fill past the end); `j` is static."""
    if j == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, j)), constant_values=fill)[:, j:]


def _ngram_equal(a: jax.Array, b: jax.Array, n: int, fill_a: int, fill_b: int) -> jax.Array:
    """[B, T, U] True where the n-gram of `a` at t equals the n-gram of `b` at u (pads differ)."""
    eq = jnp.ones((a.shape[0], a.shape[1], b.shape[1]), bool)
    for j in range(n):
        eq &= _shift_left(a, j, fill_a)[:, :, None] == _shift_left(b, j, fill_b)[:, None, :]
    return eq


class ReplyFeatures(NamedTuple):
    """Per-reply features (all [B] except counts [B, NUM_COLUMNS])."""

    counts: jax.Array  # int32 pattern occurrences per column
    repetition: jax.Array  # float32 in [0, 1]
    overlap: jax.Array  # float32 in [0, 1]
    garbage: jax.Array  # float32 in [0, 1]
    questions: jax.Array  # int32


def pattern_counts(tokens: jax.Array, lengths: jax.Array, arr: LexiconArrays) -> jax.Array:
    """Occurrences per column [B, NUM_COLUMNS] of the patterns in right-padded `tokens` [B, T].

    Sliding windows: windows[b, i, j] = tokens[b, i + j] (the token array shifted by each pattern
    offset j, padding past the end). At each position only the K patterns whose first token is
    tokens[b, i] are compared (`candidates`), so the work is [B, T, K, L] rather than
    [B, T, P, L]; matches are summed per column with a one-hot contraction.
    """
    b, t = tokens.shape
    max_len = arr.patterns.shape[1]
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    tok = jnp.where(valid, tokens, TOKEN_PAD)
    safe = jnp.maximum(tok, 0)
    starts = jnp.where(valid, arr.tok_starts_word[safe], False)
    ends = jnp.where(valid, arr.tok_ends_word[safe], False)
    tok_ext = jnp.pad(tok, ((0, 0), (0, max_len)), constant_values=TOKEN_PAD)
    windows = tok_ext[:, jnp.arange(t)[:, None] + jnp.arange(max_len)[None, :]]  # [B, T, L]
    cand = arr.candidates[jnp.where(valid, arr.first_row[safe], 0)]  # [B, T, K]
    pat = jnp.maximum(cand, 0)
    plen = arr.lengths[pat]  # [B, T, K]
    inside = jnp.arange(max_len) < plen[..., None]  # [B, T, K, L]
    same = jnp.all((windows[:, :, None, :] == arr.patterns[pat]) | ~inside, axis=-1)
    # Word edges: the token before position i, and the token right after the match (i + len).
    before_word = jnp.pad(ends, ((0, 0), (1, 0)))[:, :t]
    after_idx = (jnp.arange(t)[None, :, None] + plen).reshape(b, -1)
    starts_ext = jnp.pad(starts, ((0, 0), (0, max_len + 1)))
    after_word = jnp.take_along_axis(starts_ext, after_idx, axis=1).reshape(plen.shape)
    match = (cand >= 0) & same
    match &= ~(before_word[:, :, None] & arr.pat_starts_word[pat])
    match &= ~(after_word & arr.pat_ends_word[pat])
    onehot = jax.nn.one_hot(arr.columns[pat], NUM_COLUMNS, dtype=jnp.int32)  # [B, T, K, C]
    return jnp.einsum("btk,btkc->bc", match.astype(jnp.int32), onehot)


def reply_features(
    tokens: jax.Array,
    lengths: jax.Array,
    prev_tokens: jax.Array,
    prev_lengths: jax.Array,
    arr: LexiconArrays,
    ngram: int,
) -> ReplyFeatures:
    """All features of right-padded replies [B, T] given the previous replies [B, U].

    repetition = #{i : n-gram i equals some n-gram k < i} / max(#n-grams, 1);
    overlap = #{i : n-gram i occurs in the previous reply} / max(#n-grams, 1);
    garbage = #{flagged tokens} / max(#tokens, 1); with #n-grams = max(len - n + 1, 0).
    Traceable: call it inside `jax.jit` with `ngram` static.
    """
    t = tokens.shape[1]
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    tok = jnp.where(valid, tokens, TOKEN_PAD)
    tok_b = jnp.where(valid, tokens, PREV_PAD)  # same tokens, other pad: pads never match
    prev_valid = jnp.arange(prev_tokens.shape[1])[None, :] < prev_lengths[:, None]
    prev = jnp.where(prev_valid, prev_tokens, PREV_PAD)
    num_ngrams = jnp.maximum(lengths - ngram + 1, 0)
    denom = jnp.maximum(num_ngrams, 1).astype(jnp.float32)
    self_eq = _ngram_equal(tok, tok_b, ngram, TOKEN_PAD, PREV_PAD)
    earlier = jnp.tril(jnp.ones((t, t), bool), k=-1)  # k < i
    repeated = jnp.any(self_eq & earlier[None], axis=2)
    repetition = repeated.sum(axis=1) / denom
    overlap = jnp.any(_ngram_equal(tok, prev, ngram, TOKEN_PAD, PREV_PAD), axis=2).sum(1) / denom
    safe = jnp.maximum(tok, 0)
    garbage = (arr.garbage[safe] & valid).sum(axis=1) / jnp.maximum(lengths, 1).astype(jnp.float32)
    counts = pattern_counts(tokens, lengths, arr)
    questions = (arr.question[safe] & valid).sum(axis=1, dtype=jnp.int32)
    questions = questions + counts[:, QUESTION_COLUMN]
    return ReplyFeatures(counts, repetition, overlap, garbage, questions)


def pad_batch(
    seqs: Sequence[Sequence[int]], min_len: int = 128, cap: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists into [B, T] with T the next power of two >= max length (>= min_len),
    truncated to `cap` tokens per row when given; returns (tokens int32, lengths int32)."""
    lens = [len(s) if cap is None else min(len(s), cap) for s in seqs]
    t = pow2_bucket(max(lens, default=0), min_len)
    out = np.zeros((len(seqs), t), np.int32)
    for i, (s, n) in enumerate(zip(seqs, lens, strict=True)):
        out[i, :n] = np.asarray(s[:n], np.int32)
    return out, np.asarray(lens, np.int32)


bucket = pow2_bucket  # eval/capability.py imports it from here
