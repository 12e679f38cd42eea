"""Five-dimension capability judge (RLVER §3.3, Fig. 2; spec §5.4) and bootstrap intervals.

The dimensions, their 1-5 level descriptors and the judge prompt come from
`rlver_jax/data/rubrics/{en,zh}.yaml` (`load_rubric`). Two judges implement `CapabilityJudge`:

* `LLMCapabilityJudge`: a language model reads the whole dialogue once per dimension (the
  rubric's `judge_prompt` as a user message in its chat template, then the generation prompt).
  The score is read off ONE compiled forward pass over the five answers "1".."5", with the
  candidate-table machinery of `env.llm_judge` (`build_candidate_table` with changes 1..5,
  `JudgeScorer`): `expected` = sum_k k * p_k under the renormalised candidate probabilities,
  `argmax` = the most likely candidate. Nothing is parsed from free text. Dialogues too long
  for the largest prompt bucket lose their oldest turns (an omission line marks it).
* `ReferenceCapabilityJudge`: deterministic lexicon rates over the policy's replies, for CPU
  runs (the mapping is documented on the class).

Only the visible part of each policy reply is judged (thoughts are never shown to the judge).
`summarize_scores` adds seeded bootstrap intervals over dialogues (`stats.bootstrap_ci`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from rlver_jax.env.lexicon_model import (
    SKILLS,
    ReplyFeatures,
    TokenizerLike,
    auto_ngram,
    bucket,
    build_lexicon_model,
    load_lexicon,
    pad_batch,
    reply_features,
)
from rlver_jax.env.llm_judge import (
    DEFAULT_TERMINATORS,
    CandidateTable,
    JudgeScorer,
    JudgeSetupError,
    build_candidate_table,
)
from rlver_jax.eval.stats import bootstrap_ci
from rlver_jax.model_io.tokenizer import Tokenizer, check_compatible
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import Params
from rlver_jax.parallel.rules import ROLLOUT_RULES, MeshAxes

DIMENSIONS: tuple[str, ...] = (  # rubric keys, in the order of RLVER's radar charts
    *("empathic_depth", "core_insight", "solution_crafting"),
    *("dialogue_guidance", "style_adaptability"),
)
CANDIDATE_SCORES: tuple[int, ...] = (1, 2, 3, 4, 5)
_LABELS = {"en": ("User", "AI"), "zh": ("用户", "AI")}
_SEP = {"en": ": ", "zh": "："}
_OMITTED = {"en": "(earlier messages omitted)", "zh": "（更早的对话已省略）"}


# --------------------------------------------------------------------------- rubric
@dataclasses.dataclass(frozen=True)
class Dimension:
    """One rubric dimension: key (e.g. "empathic_depth"), display name, description, and the
    descriptors of levels 1..5."""

    key: str
    name: str
    description: str
    levels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rubric:
    """The five dimensions (in `DIMENSIONS` order) and the judge prompt of one language."""

    language: str
    dimensions: tuple[Dimension, ...]
    judge_prompt: str

    @property
    def names(self) -> dict[str, str]:
        """Dimension key -> display name."""
        return {d.key: d.name for d in self.dimensions}

    def render(self, index: int, dialogue: str) -> str:
        """The judge prompt of dimension `index` for a formatted `dialogue`."""
        dim = self.dimensions[index]
        sep = _SEP.get(self.language, ": ")
        levels = "\n".join(f"{k}{sep}{text}" for k, text in enumerate(dim.levels, start=1))
        return self.judge_prompt.format(
            dimension_name=dim.name, description=dim.description, levels=levels, dialogue=dialogue
        )


def load_rubric(language: str = "en", path: str | Path | None = None) -> Rubric:
    """The packaged rubric `data/rubrics/{language}.yaml`, or the YAML file at `path` (same
    layout); ValueError naming what is missing."""
    if path is None:
        res = importlib.resources.files("rlver_jax") / "data" / "rubrics" / f"{language}.yaml"
        text = res.read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    where = path or f"rubrics/{language}.yaml"
    if not isinstance(data, dict) or "dimensions" not in data or "judge_prompt" not in data:
        raise ValueError(f"{where}: needs `dimensions` and `judge_prompt`")
    dims = []
    for key in DIMENSIONS:
        entry = data["dimensions"].get(key)
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: missing dimension {key!r}")
        levels = entry.get("levels") or {}
        if sorted(levels) != list(CANDIDATE_SCORES):
            raise ValueError(f"{where}: dimension {key!r} needs levels 1..5")
        dims.append(Dimension(key, str(entry["name"]), str(entry["description"]),
                              tuple(str(levels[k]) for k in CANDIDATE_SCORES)))  # fmt: skip
    prompt = str(data["judge_prompt"])
    for field in ("{dimension_name}", "{description}", "{levels}", "{dialogue}"):
        if field not in prompt:
            raise ValueError(f"{where}: judge_prompt lacks the placeholder {field}")
    return Rubric(language, tuple(dims), prompt)


def format_dialogue(
    messages: Sequence[dict[str, Any]], language: str = "en", omitted: bool = False
) -> str:
    """One line per message, "User: ..." / "AI: ..." (the visible reply only; whitespace
    collapsed), with an omission line first when older messages were dropped."""
    user, ai = _LABELS.get(language, _LABELS["en"])
    sep = _SEP.get(language, ": ")
    lines = [_OMITTED.get(language, _OMITTED["en"])] if omitted else []
    for m in messages:
        label = user if m["role"] == "user" else ai
        lines.append(f"{label}{sep}{' '.join(str(m['content']).split())}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- scores
@dataclasses.dataclass(frozen=True)
class CapabilityScores:
    """Scores of N dialogues on the D dimensions: `expected` [N, D] float in [1, 5] and
    `argmax` [N, D] int in 1..5 (the reference judge: its score, and that score rounded)."""

    dimensions: tuple[str, ...]
    names: dict[str, str]
    expected: np.ndarray
    argmax: np.ndarray

    def means(self) -> dict[str, float]:
        """Mean expected score per dimension key."""
        return {d: float(self.expected[:, i].mean()) for i, d in enumerate(self.dimensions)}

    def records(self, ids: Sequence[Any]) -> list[dict[str, Any]]:
        """One JSON-ready dict per dialogue: id, and per dimension its score and argmax."""
        out = []
        for n, dialogue_id in enumerate(ids):
            rec: dict[str, Any] = {"dialogue_id": dialogue_id}
            for i, d in enumerate(self.dimensions):
                rec[d] = round(float(self.expected[n, i]), 6)
                rec[f"{d}_argmax"] = int(self.argmax[n, i])
            out.append(rec)
        return out


class CapabilityJudge(Protocol):
    """Scores whole dialogues (rollout transcripts) on the five dimensions."""

    name: str

    def score(self, transcripts: Sequence[dict[str, Any]]) -> CapabilityScores: ...


def scores_from_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expected, argmax) from candidate log-probs [..., 5] of the answers 1..5: the mean under
    the renormalised probabilities, and the most likely answer (the first on ties)."""
    lp = np.asarray(logprobs, np.float64)
    z = np.exp(lp - lp.max(axis=-1, keepdims=True))
    p = z / z.sum(axis=-1, keepdims=True)
    values = np.asarray(CANDIDATE_SCORES, np.float64)
    return p @ values, values[np.argmax(lp, axis=-1)].astype(np.int32)


class LLMCapabilityJudge:
    """LLM-as-a-judge over the rubric (see the module docstring); implements `CapabilityJudge`.

    Args:
      params, model_config, tokenizer: the judge model (params already placed for `mesh`).
      rubric: default `load_rubric(language)`.
      prompt_buckets: prompt lengths (powers of two); the largest bounds a prompt.
      batch_buckets: judge batch sizes (N dialogues x 5 dimensions run in chunks of the largest).
      answer_prefix: text after the generation prompt that the digit continues ("" = none).
      system_prompt: optional system message (None: the chat template's default).
    """

    name = "llm"

    def __init__(
        self,
        params: Params,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        *,
        rubric: Rubric | None = None,
        language: str = "en",
        prompt_buckets: Sequence[int] = (1024, 2048, 4096, 8192),
        batch_buckets: Sequence[int] = (1, 2, 4, 8),
        answer_prefix: str = "",
        system_prompt: str | None = None,
        terminators: Sequence[str] = DEFAULT_TERMINATORS,
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, MeshAxes]] = ROLLOUT_RULES,
    ) -> None:
        check_compatible(tokenizer, model_config)
        self.params = params
        self.tokenizer = tokenizer
        self.rubric = rubric or load_rubric(language)
        self.system_prompt = system_prompt
        self.answer_prefix = answer_prefix
        context = self._render("x") + answer_prefix
        try:
            table = build_candidate_table(
                tokenizer, context, changes=CANDIDATE_SCORES, terminators=terminators
            )
        except JudgeSetupError:  # a trailing space merged with the digit: answer " 1" instead
            self.answer_prefix = answer_prefix.rstrip()
            table = build_candidate_table(
                tokenizer, context.rstrip(), changes=CANDIDATE_SCORES, terminators=terminators
            )
        self.table: CandidateTable = table
        self.scorer = JudgeScorer(
            model_config, pad_id=tokenizer.pad_id, prompt_buckets=prompt_buckets,
            batch_buckets=batch_buckets, mesh=mesh, rules=rules,
        )  # fmt: skip
        self.max_prompt = min(
            max(prompt_buckets), model_config.max_position_embeddings - table.width
        )

    def _render(self, content: str) -> str:
        """`content` as a user message in the chat template, then the generation prompt."""
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.render_chat(messages, add_generation_prompt=True)

    def prompt_ids(self, messages: Sequence[dict[str, Any]], index: int) -> list[int]:
        """Ids of the judge prompt of dimension `index` for a dialogue, oldest turns dropped
        until it fits the largest prompt bucket."""
        lang = self.rubric.language
        kept, dropped = list(messages), False
        while True:
            text = self.rubric.render(index, format_dialogue(kept, lang, dropped))
            ids = self.tokenizer.encode(self._render(text) + self.answer_prefix)
            if len(ids) <= self.max_prompt:
                return ids
            if not kept:
                raise ValueError(
                    f"capability judge prompt has {len(ids)} tokens, more than {self.max_prompt} "
                    "even without the dialogue; raise prompt_buckets"
                )
            kept, dropped = kept[1:], True

    def candidate_logprobs(self, transcripts: Sequence[dict[str, Any]]) -> np.ndarray:
        """[N, 5 dimensions, 5 answers] log-probabilities of "1".."5" (and a terminator)."""
        dims = len(self.rubric.dimensions)
        prompts = [self.prompt_ids(t["messages"], i) for t in transcripts for i in range(dims)]
        scores = self.scorer(self.params, prompts, self.table)
        return scores.reshape(len(transcripts), dims, len(CANDIDATE_SCORES))

    def score(self, transcripts: Sequence[dict[str, Any]]) -> CapabilityScores:
        """Expected and argmax scores of every dialogue on every dimension."""
        expected, argmax = scores_from_logprobs(self.candidate_logprobs(transcripts))
        keys = tuple(d.key for d in self.rubric.dimensions)
        return CapabilityScores(keys, self.rubric.names, expected, argmax)


def summarize_scores(
    scores: CapabilityScores, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per dimension key: display name, mean expected score with its bootstrap interval, and
    the mean argmax score."""
    out = {}
    for i, d in enumerate(scores.dimensions):
        ci = bootstrap_ci(scores.expected[:, i], n_boot=n_boot, level=level, seed=seed + i)
        out[d] = {
            "name": scores.names.get(d, d),
            **ci.as_dict(),
            "argmax_mean": float(scores.argmax[:, i].mean()),
        }
    return out


# --------------------------------------------------------------------------- reference judge
_POSITIVE = ("empathy", "insight", "solutions", "praise", "listening", "reflection")
SATURATION = 1.0  # cue rate (per reply) at which a dimension reaches 1 - 1/e of its range
LENGTH_RATIO = 1.5  # reply tokens / preceding user-message tokens that fits best
_features_jit = jax.jit(reply_features, static_argnames=("ngram",))


def _sat(x: np.ndarray) -> np.ndarray:
    """1 - exp(-x / SATURATION) for x >= 0 (0 below)."""
    return 1.0 - np.exp(-np.maximum(x, 0.0) / SATURATION)


class ReferenceCapabilityJudge:
    """Deterministic capability judge from lexicon features (`env.lexicon_model`) of the policy's
    visible replies; implements `CapabilityJudge`.

    Per dialogue with k replies, rate_s = (occurrences of skill s's lexicon phrases) / k, and
    sat(x) = 1 - exp(-x / SATURATION). Each dimension gets raw in [0, 1] (clipped) and the score
    1 + 4 * raw (argmax: rounded half up):

      Empathic Depth     sat(rate_empathy + rate_praise / 2)
                         - sat(rate_dismissive + rate_generic_comfort) / 2
      Core Insight       sat(rate_insight)
      Solution Crafting  sat(rate_solutions)
      Dialogue Guidance  sat(share of replies asking a question + rate_listening
                         + rate_reflection)
      Style Adaptability (0.4 variety + 0.3 freshness + 0.3 length_fit) * (1 - garbage), with
                         variety = min(#positive skills used at least once / 3, 1),
                         freshness = 1 - mean(max(repetition, overlap with previous reply)),
                         length_fit = mean(clip(1 - |log2(n_reply / (1.5 n_user))| / 3, 0, 1))
                         (n_user: tokens of the user message the reply answers).

    A dialogue without replies scores 1 everywhere.
    """

    name = "reference"

    def __init__(
        self,
        tokenizer: TokenizerLike,
        *,
        language: str = "en",
        lexicons: dict[str, dict[str, Sequence[str]]] | None = None,
        ngram: int | None = None,
        max_tokens: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        lexicons = lexicons or {lang: load_lexicon(lang) for lang in ("en", "zh")}
        self.model = build_lexicon_model(tokenizer, lexicons)
        self.ngram = ngram or auto_ngram(tokenizer, language)
        self.names = load_rubric(language).names
        self.max_tokens = max_tokens

    def reply_features(self, transcripts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per dialogue: per-reply counts [k, columns], repetition, overlap, garbage, questions,
        reply and user-message lengths (numpy arrays of k rows)."""
        rows, owners = [], []
        for n, t in enumerate(transcripts):
            prev, user = "", ""
            for m in t["messages"]:
                if m["role"] == "user":
                    user = m["content"]
                    continue
                rows.append((m["content"], prev, user))
                owners.append(n)
                prev = m["content"]
        enc = self.tokenizer.encode
        ids = [(enc(r), enc(p), len(enc(u))) for r, p, u in rows]
        feats: list[tuple[np.ndarray, ...]] = []
        chunk = 64
        for s in range(0, len(ids), chunk):
            part = ids[s : s + chunk]
            pad = [([], [], 0)] * (bucket(len(part), 16) - len(part))
            tok, lens = pad_batch([x[0] for x in part + pad], cap=self.max_tokens)
            prev, prev_lens = pad_batch([x[1] for x in part + pad], cap=self.max_tokens)
            f = _features_jit(tok, lens, prev, prev_lens, self.model.arrays, ngram=self.ngram)
            feats.append(tuple(np.asarray(a)[: len(part)] for a in f))
        cat = [np.concatenate(c) for c in zip(*feats, strict=True)] if feats else None
        owner = np.asarray(owners, np.int64)
        out = []
        for n in range(len(transcripts)):
            sel = np.flatnonzero(owner == n)
            rec: dict[str, Any] = {
                "n_reply": np.asarray([len(ids[i][0]) for i in sel], np.float64),
                "n_user": np.asarray([ids[i][2] for i in sel], np.float64),
            }
            for key, arr in zip(ReplyFeatures._fields, cat or [np.zeros(0)] * 5, strict=True):
                rec[key] = arr[sel] if cat is not None else np.zeros((0,))
            out.append(rec)
        return out

    def raw_scores(self, feats: dict[str, Any]) -> np.ndarray:
        """The five raw values in [0, 1] of one dialogue's features (see the class docs)."""
        k = len(feats["n_reply"])
        if k == 0:
            return np.zeros(len(DIMENSIONS))
        rate = dict(zip(SKILLS, feats["counts"][:, : len(SKILLS)].sum(axis=0) / k, strict=True))
        used = sum(int(rate[s] > 0) for s in _POSITIVE)
        freshness = 1.0 - np.mean(np.maximum(feats["repetition"], feats["overlap"]))
        ratio = np.maximum(feats["n_reply"], 1.0) / (LENGTH_RATIO * np.maximum(feats["n_user"], 1))
        length_fit = np.mean(np.clip(1.0 - np.abs(np.log2(ratio)) / 3.0, 0.0, 1.0))
        style = (0.4 * min(used / 3.0, 1.0) + 0.3 * freshness + 0.3 * length_fit) * (
            1.0 - np.mean(feats["garbage"])
        )
        raw = [
            _sat(rate["empathy"] + rate["praise"] / 2)
            - _sat(rate["dismissive"] + rate["generic_comfort"]) / 2,
            _sat(rate["insight"]),
            _sat(rate["solutions"]),
            _sat(np.mean(feats["questions"] > 0) + rate["listening"] + rate["reflection"]),
            style,
        ]
        return np.clip(np.asarray(raw, np.float64), 0.0, 1.0)

    def score(self, transcripts: Sequence[dict[str, Any]]) -> CapabilityScores:
        """Scores 1 + 4 * raw of every dialogue on every dimension."""
        feats = self.reply_features(transcripts)
        raw = np.stack([self.raw_scores(f) for f in feats]) if feats else np.zeros((0, 5))
        expected = 1.0 + 4.0 * raw
        argmax = np.floor(expected + 0.5).astype(np.int32)
        return CapabilityScores(DIMENSIONS, self.names, expected, argmax)
