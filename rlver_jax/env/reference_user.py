"""`ReferenceUser`: a fast, deterministic simulated user for tests and quick CPU experiments.

The emotion change of each policy reply comes from a small compiled JAX model over the reply's
tokens (`lexicon_model.reply_features`: lexicon skill counts, repetition, overlap with the
previous reply, garbage, length, questions) and a hand-set weight table:

    skill_s  = 1 - exp(-count_s / saturation_s)              (s in lexicon_model.SKILLS)
    q        = 1 - exp(-questions / saturation_q)
    affect   = sum_s W[intention, s] * skill_s + Q[intention] * q
    raw      = base + g+[personality] * max(affect, 0) + g-[personality] * min(affect, 0)
               - penalties
    change   = clip(round(raw), -10, 10)

    penalties = repetition * ramp(rep, lo, hi) + overlap * ramp(overlap, lo, hi)
              + garbage * ramp(garbage, lo, hi) + overlong * ramp(n, L, 2 L)
              + too_short * ramp(min_tokens - n, 0, min_tokens) + questions * ramp(#?, lo, hi)
    ramp(x, lo, hi) = clip((x - lo) / (hi - lo), 0, 1);  n = reply tokens, L = max_reply_tokens

`base` < 0, so an empty or irrelevant reply lowers the emotion. `challenging=True` multiplies the
gains by `challenging.gain_scale` and adds `challenging.base_offset` to the base (a stricter
user). W (the 8 x 8 intention x skill table), Q, gains, saturations and penalties live in
`rlver_jax/data/reference_user_weights.yaml` (documented there); a YAML file with the same layout
(any subset of keys) given as `ReferenceUserConfig.weights_path` overrides them.

Messages are canned: `reply` picks a template of the prompts file's `reference_user.<band>` list
(`rlver_jax/data/prompts/{language}.yaml`) by a hash of (profile id, turn index), filled with
the name from the persona's first "Name: ..." / "姓名：..." bullet; at band S or F the message is
a goodbye. `opening` is the profile's first_talk, else a template of `reference_user.opening`
(built-in `FALLBACK_OPENINGS` if the prompts file has none), picked by the profile id.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from rlver_jax.buckets import pow2_bucket
from rlver_jax.env.dynamics import BANDS, band, detect_goodbye
from rlver_jax.env.intentions import INTENTIONS, PERSONALITIES
from rlver_jax.env.lexicon_model import (
    SKILLS,
    LexiconArrays,
    LexiconModel,
    ReplyFeatures,
    TokenizerLike,
    auto_ngram,
    build_lexicon_model,
    load_lexicon,
    pad_batch,
    reply_features,
)
from rlver_jax.env.profiles import LANGUAGES, Language, Profile
from rlver_jax.env.user import Turn, check_batch, last_text, reply_scores, turn_indices

# Replies are analysed up to max(2 * max_reply_tokens, this) tokens (rounded up to a power of 2);
# the length penalties always see the full length.
MIN_ANALYSED_TOKENS = 256
MIN_ROWS = 16  # smallest padded batch (few shapes, few compilations)
DEFAULT_WEIGHTS_FILE = "reference_user_weights.yaml"  # in rlver_jax/data/: W, Q, gains, ...

FALLBACK_OPENINGS: dict[str, tuple[str, ...]] = {
    "en": (
        "Hey, can I talk to you about something? It's been bugging me all week.",
        "I don't even know where to start. Something happened and I can't stop thinking about it.",
        "Got a minute? I need to get something off my chest.",
        "Ugh. It's been a rough few days, honestly.",
    ),
    "zh": (
        "在吗？有件事想跟你聊聊，心里挺堵的。",
        "唉，最近发生了一件事，我一直想不通。",
        "你有空吗？我想找个人说说话。",
        "这几天真的挺烦的，不知道从哪儿说起。",
    ),
}
_FALLBACK_GOODBYE = {"en": "Bye.", "zh": "再见。"}
_FALLBACK_NAME = {"en": "you", "zh": "你"}
_NAME_RE = re.compile(r"^\W*(?:name|姓名)\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class ReferenceUserConfig:
    """Settings of `ReferenceUser`.

    language: the prompts file of the canned messages ("en" or "zh"); replies are judged with the
      lexicons of both languages.
    max_reply_tokens: replies longer than this are penalised (full penalty at twice this).
    base: change of a reply with no skill at all (< 0: an irrelevant reply hurts).
    weights_path: YAML overriding parts of the packaged weights file, or None.
    challenging: the stricter variant (smaller gains, lower base).
    ngram: n-gram order of repetition/overlap; None = `lexicon_model.auto_ngram` (~two words).
    """

    language: Language = "en"
    max_reply_tokens: int = 256
    base: float = -2.0
    weights_path: str | None = None
    challenging: bool = False
    ngram: int | None = None

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"ReferenceUserConfig.language: expected one of {LANGUAGES}")
        if not isinstance(self.max_reply_tokens, int) or self.max_reply_tokens < 1:
            raise ValueError("ReferenceUserConfig.max_reply_tokens: must be an int >= 1")
        if self.ngram is not None and (not isinstance(self.ngram, int) or self.ngram < 1):
            raise ValueError("ReferenceUserConfig.ngram: must be an int >= 1 or None")


class Params(NamedTuple):
    """The weight table as arrays (a pytree argument of the jitted kernel)."""

    w: jax.Array  # [8 intentions, 8 skills]
    q: jax.Array  # [8]
    saturation: jax.Array  # [8]
    q_saturation: jax.Array  # []
    gain_pos: jax.Array  # [3 personalities]
    gain_neg: jax.Array  # [3]
    base: jax.Array  # []
    pen: jax.Array  # [15]: (w, lo, hi) rep, overlap, garbage; long w; short w, min; questions


class Judgement(NamedTuple):
    """`ReferenceUser.evaluate` output, per row: the change, the unrounded score, the features."""

    change: np.ndarray  # int32 [B]
    raw: np.ndarray  # float32 [B]
    features: ReplyFeatures  # numpy arrays


def merge_weights(base: Mapping[str, Any], override: Mapping[str, Any], where: str = "") -> dict:
    """`base` with `override`'s values put in (recursively); unknown keys raise ValueError."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key not in out:
            raise ValueError(f"reference-user weights: unknown key {where + str(key)!r}")
        if isinstance(out[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"reference-user weights: {where + str(key)!r} must be a mapping")
            out[key] = merge_weights(out[key], value, f"{where}{key}.")
        else:
            out[key] = float(value)
    return out


def _read_yaml(path: Any) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_weights(path: str | Path | None = None) -> dict[str, Any]:
    """The packaged weights (`rlver_jax/data/reference_user_weights.yaml`), overridden by the
    YAML file at `path` when given (any subset of keys; unknown keys raise ValueError)."""
    weights = _read_yaml(importlib.resources.files("rlver_jax") / "data" / DEFAULT_WEIGHTS_FILE)
    if path is None:
        return weights
    return merge_weights(weights, _read_yaml(Path(path)))


def make_params(weights: Mapping[str, Any], cfg: ReferenceUserConfig) -> Params:
    """Arrays of a weights mapping (`load_weights`' layout) for the kernel."""
    chal = weights["challenging"]
    scale = chal["gain_scale"] if cfg.challenging else 1.0
    base = cfg.base + (chal["base_offset"] if cfg.challenging else 0.0)
    p = weights["penalties"]
    gains = weights["personality_gains"]
    pen = [
        *(p["repetition"][k] for k in ("weight", "lo", "hi")),
        *(p["overlap"][k] for k in ("weight", "lo", "hi")),
        *(p["garbage"][k] for k in ("weight", "lo", "hi")),
        p["overlong"]["weight"],
        p["too_short"]["weight"],
        p["too_short"]["min_tokens"],
        *(p["questions"][k] for k in ("weight", "lo", "hi")),
    ]
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return Params(
        w=f32([[weights["skill_weights"][i][s] for s in SKILLS] for i in INTENTIONS]),
        q=f32([weights["question_weights"][i] for i in INTENTIONS]),
        saturation=f32([weights["saturation"][s] for s in SKILLS]),
        q_saturation=f32(weights["saturation"]["questions"]),
        gain_pos=f32([gains[k]["positive"] * scale for k in PERSONALITIES]),
        gain_neg=f32([gains[k]["negative"] for k in PERSONALITIES]),
        base=f32(base),
        pen=f32(pen),
    )


def _ramp(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip((x - lo) / jnp.maximum(hi - lo, 1e-6), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("ngram",))
def _kernel(
    tokens: jax.Array,
    lengths: jax.Array,
    full_lengths: jax.Array,
    prev: jax.Array,
    prev_lengths: jax.Array,
    intention: jax.Array,
    personality: jax.Array,
    max_tokens: jax.Array,
    arr: LexiconArrays,
    params: Params,
    ngram: int,
) -> tuple[jax.Array, jax.Array, ReplyFeatures]:
    """(change int32 [B], raw float32 [B], features) by the module docstring's formula."""
    feats = reply_features(tokens, lengths, prev, prev_lengths, arr, ngram)
    counts = feats.counts[:, : len(SKILLS)].astype(jnp.float32)
    skill = 1.0 - jnp.exp(-counts / params.saturation[None, :])
    q = 1.0 - jnp.exp(-feats.questions.astype(jnp.float32) / params.q_saturation)
    affect = jnp.sum(params.w[intention] * skill, axis=1) + params.q[intention] * q
    pen = params.pen
    n = full_lengths.astype(jnp.float32)
    max_t = max_tokens.astype(jnp.float32)
    penalty = (
        pen[0] * _ramp(feats.repetition, pen[1], pen[2])
        + pen[3] * _ramp(feats.overlap, pen[4], pen[5])
        + pen[6] * _ramp(feats.garbage, pen[7], pen[8])
        + pen[9] * _ramp(n, max_t, 2.0 * max_t)
        + pen[10] * _ramp(pen[11] - n, 0.0, pen[11])
        + pen[12] * _ramp(feats.questions.astype(jnp.float32), pen[13], pen[14])
    )
    raw = (
        params.base
        + params.gain_pos[personality] * jnp.maximum(affect, 0.0)
        + params.gain_neg[personality] * jnp.minimum(affect, 0.0)
        - penalty
    )
    change = jnp.clip(jnp.round(raw), -10, 10).astype(jnp.int32)
    return change, raw, feats


@functools.cache
def message_templates(language: str) -> dict[str, tuple[str, ...]]:
    """The `reference_user` section of `rlver_jax/data/prompts/{language}.yaml`: band letter ->
    templates, plus "opening" (`FALLBACK_OPENINGS` when the file has none)."""
    resource = importlib.resources.files("rlver_jax") / "data" / "prompts" / f"{language}.yaml"
    with resource.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    section = data.get("reference_user") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"prompts/{language}.yaml: missing the `reference_user` section")
    out = {"opening": FALLBACK_OPENINGS[language]}
    for key, templates in section.items():
        if not isinstance(templates, list) or not templates:
            raise ValueError(f"prompts/{language}.yaml: reference_user.{key} must be a list")
        out[key] = tuple(str(t) for t in templates)
    missing = [b for b in BANDS if b not in out]
    if missing:
        raise ValueError(f"prompts/{language}.yaml: reference_user lacks band {missing[0]!r}")
    return out


def profile_name(profile: Profile) -> str:
    """The persona's "Name: ..." / "姓名：..." value (English: the first name), or a fallback."""
    m = _NAME_RE.search(profile.persona)
    if not m:
        return _FALLBACK_NAME[profile.language]
    name = m.group(1).strip()
    return name.split()[0] if profile.language == "en" and name.split() else name


def _pick(options: Sequence[str], *key: object) -> str:
    digest = hashlib.blake2b("\x1f".join(map(str, key)).encode(), digest_size=8).digest()
    return options[int.from_bytes(digest, "little") % len(options)]


class ReferenceUser:
    """Lexicon-model simulated user (implements `user.SimulatedUser`); see the module docs."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        config: ReferenceUserConfig | None = None,
        lexicons: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or ReferenceUserConfig()
        if lexicons is None:
            lexicons = {lang: load_lexicon(lang) for lang in LANGUAGES}
        self.model: LexiconModel = build_lexicon_model(tokenizer, lexicons)
        self.weights = load_weights(self.config.weights_path)
        self.params = make_params(self.weights, self.config)
        self.ngram = self.config.ngram or auto_ngram(tokenizer, self.config.language)
        stops = set(getattr(tokenizer, "stop_token_ids", ()))
        pad = getattr(tokenizer, "pad_id", None)
        self._strip = frozenset(stops | ({pad} if pad is not None else set()))

    def set_seed(self, seed: int) -> None:
        """A no-op: the reference user samples nothing (a hash of the profile id and the turn
        picks each message), so no seed changes them."""
        del seed

    # ------------------------------------------------------------------ judging
    def _ids(
        self, replies: Sequence[str], reply_ids: Sequence[list[int]] | None
    ) -> list[list[int]]:
        if reply_ids is None:
            return [self.tokenizer.encode(r) for r in replies]
        out = []
        for ids in reply_ids:
            ids = list(ids)
            while ids and ids[-1] in self._strip:
                ids.pop()
            out.append(ids)
        return out

    def evaluate(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        replies: Sequence[str],
        reply_ids: Sequence[list[int]] | None = None,
    ) -> Judgement:
        """Change, raw score and features of each reply (`judge` returns the change only)."""
        b = len(profiles)
        for name, values in (("histories", histories), ("replies", replies)):
            check_batch(name, values, b)
        if reply_ids is not None:
            check_batch("reply_ids", reply_ids, b)
        if b == 0:
            empty = np.zeros(0, np.int32)
            return Judgement(empty, np.zeros(0, np.float32), ReplyFeatures(*([empty] * 5)))
        ids = self._ids(replies, reply_ids)
        prev_ids = [self.tokenizer.encode(last_text(h, "assistant") or "") for h in histories]
        rows = pow2_bucket(b, MIN_ROWS)  # pad the batch too: one compilation per (rows, T, U)
        ids += [[]] * (rows - b)
        prev_ids += [[]] * (rows - b)
        cap = pow2_bucket(max(2 * self.config.max_reply_tokens, MIN_ANALYSED_TOKENS))
        tokens, lengths = pad_batch(ids, cap=cap)
        prev, prev_lengths = pad_batch(prev_ids, cap=cap)
        full = np.asarray([len(x) for x in ids], np.int32)
        pad_rows = [0] * (rows - b)
        intention = [INTENTIONS.index(p.intention) for p in profiles] + pad_rows
        personality = [PERSONALITIES.index(p.personality) for p in profiles] + pad_rows
        change, raw, feats = _kernel(
            *(tokens, lengths, full, prev, prev_lengths),
            *(np.asarray(intention, np.int32), np.asarray(personality, np.int32)),
            *(np.int32(self.config.max_reply_tokens), self.model.arrays, self.params),
            ngram=self.ngram,
        )
        feats = ReplyFeatures(*(np.asarray(f)[:b] for f in feats))
        return Judgement(np.asarray(change)[:b], np.asarray(raw)[:b], feats)

    def judge(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        replies: Sequence[str],
        reply_ids: Sequence[list[int]] | None,
        emotions: np.ndarray,
    ) -> np.ndarray:
        """Emotion change per reply, int32 [B] in [-10, 10] (independent of `emotions`)."""
        check_batch("emotions", np.atleast_1d(emotions), len(profiles))
        return self.evaluate(profiles, histories, replies, reply_ids).change

    # ------------------------------------------------------------------ messages
    def opening(self, profiles: Sequence[Profile]) -> list[str]:
        """first_talk when set, else an opening template picked by the profile id."""
        out = []
        for p in profiles:
            if p.first_talk is not None:
                out.append(p.first_talk)
                continue
            options = message_templates(p.language)["opening"]
            out.append(_pick(options, p.id, 0).format(name=profile_name(p)))
        return out

    def reply(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        emotions: np.ndarray,
        turn_index: int | Sequence[int],
    ) -> list[str]:
        """A template of the score's band (hash of profile id and turn); a goodbye at S or F."""
        b = len(profiles)
        scores = reply_scores(histories, emotions, b)
        out = []
        for p, score, turn in zip(profiles, scores, turn_indices(turn_index, b), strict=True):
            letter = band(int(score))
            text = _pick(message_templates(p.language)[letter], p.id, turn, letter)
            text = text.format(name=profile_name(p))
            if letter in ("S", "F") and not detect_goodbye(text, p.language):
                text = f"{text} {_FALLBACK_GOODBYE[p.language]}".strip()
            out.append(text)
        return out
