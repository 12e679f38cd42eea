"""`LLMUser`: a simulated user played by any supported checkpoint (RLVER spec §1.2-1.5, §6).

The user model (params + `ModelConfig` + `Tokenizer`; e.g. SmolLM2 from
`models.default_model`, or a Qwen/Llama checkpoint) runs on the same mesh as the policy and does
the three jobs of `user.SimulatedUser`:

* `judge`: the `user_judge` prompt of `data/prompts/{lang}.yaml` (persona, scene, hidden
  intention, current emotion and band description, the dialogue as "Me:"/"Them:" lines, the
  policy's newest VISIBLE reply) is rendered as a user message in the model's chat template,
  followed by the assistant generation prompt and `answer_prefix`. The change is read by one
  compiled forward pass that scores the 21 answers "-10".."10" (`llm_judge`): "argmax" takes the
  most likely one (deterministic), "expectation" the probability-weighted mean, rounded. Nothing
  is parsed from free text.
* `reply`: the next user message, sampled with `sampling.Sampler` from the `user_reply` prompt
  (in character, in the prompt's language, fitting the band, never stating the hidden intention,
  a goodbye at band S or F). The output is cut to its first non-empty line, role labels and
  wrapping quotes are removed; an empty result falls back to a canned line of the band
  (`reference_user.<band>` in the prompts file) and is counted in `fallbacks`.
* `opening`: the profile's `first_talk`, else sampled from `user_opening` at `opening_emotion`.

Thoughts never reach the user (spec §1.5): assistant turns and the judged reply pass through
`scaffold.parse_reply(..., "think").visible`, which keeps the text after the last `</think>`
(plain text is unchanged). The challenging variant (spec §6) appends
`user_challenging_addendum` to the scene. Prompts longer than the largest bucket (or the
model's context) lose their oldest history turns, marked by an omission line.

Randomness: a sampling call uses seed = hash(config seed, "opening"/"reply", turn) and the
sampler folds in the row index, i.e. the dialogue index, so replies are deterministic given the
seed, the inputs and the row order. `set_seed` changes the seed (e.g. once per RL iteration).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from rlver_jax.env.dynamics import band, detect_goodbye
from rlver_jax.env.llm_judge import (
    DEFAULT_TERMINATORS,
    JUDGE_MODES,
    CandidateTable,
    JudgeMode,
    JudgeScorer,
    build_candidate_table,
    changes_from_scores,
    judge_prompt_text,
    opening_prompt_text,
    reply_prompt_text,
)
from rlver_jax.env.profiles import LANGUAGES, Language, Profile
from rlver_jax.env.reference_user import profile_name
from rlver_jax.env.user import Turn, check_batch, reply_scores, turn_indices
from rlver_jax.model_io.tokenizer import Tokenizer, check_compatible
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.sharding import param_shardings
from rlver_jax.models.transformer import Params
from rlver_jax.parallel import mesh as mesh_lib
from rlver_jax.parallel.rules import ROLLOUT_RULES, MeshAxes
from rlver_jax.sampling.sampler import Sampler, SamplerConfig
from rlver_jax.scaffold import load_prompts

_GOODBYE = {"en": "Bye.", "zh": "再见。"}
_GENERIC_LABELS = ("User", "Assistant", "You", "用户", "助手", "你")
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」", "『": "』"}


def _is_pow2(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class LLMUserConfig:
    """Settings of `LLMUser`; invalid values raise ValueError naming the field.

    language: prompts file for every dialogue ("en"/"zh"); None = each profile's own language.
    challenging: append `user_challenging_addendum` to the scene (spec §6).
    judge_mode: "argmax" (most likely change; default) or "expectation" (probability-weighted
      mean of -10..10, rounded half away from zero).
    temperature, top_p: sampling of replies and openings.
    max_reply_tokens: token budget of one sampled message.
    seed: base seed of reply/opening sampling (the judge is deterministic).
    prompt_buckets: powers of two; prompts are left-padded to one (judge and sampler), the
      largest bounds the prompt length (older history is dropped to fit).
    judge_batch_buckets: judge batch sizes; larger batches run in chunks of the largest.
    answer_prefix: text after the generation prompt that the answer continues (no trailing
      whitespace; the candidates then get a leading space). "" = answer right away.
    terminators: texts that may end an answer, besides the tokenizer's stop tokens.
    system_prompt: optional system message before the prompt (None: the chat template's own
      default, e.g. SmolLM2 inserts one).
    opening_emotion: emotion score written into the `user_opening` prompt.
    ensure_goodbye: append a goodbye when a reply at band S or F has none (small user models
      forget; without it such an episode only ends on score or turn limit).
    stop_at_newline: stop sampling at a newline token (only the first line is kept anyway).
    """

    language: Language | None = None
    challenging: bool = False
    judge_mode: JudgeMode = "argmax"
    temperature: float = 0.7
    top_p: float = 0.9
    max_reply_tokens: int = 64
    seed: int = 0
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    judge_batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    answer_prefix: str = ""
    terminators: tuple[str, ...] = DEFAULT_TERMINATORS
    system_prompt: str | None = None
    opening_emotion: int = 30
    ensure_goodbye: bool = True
    stop_at_newline: bool = True

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"LLMUserConfig.{field}: {why} (got {getattr(self, field)!r})")

        def is_int(v: object) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        if self.language is not None and self.language not in LANGUAGES:
            fail("language", f"expected one of {LANGUAGES} or None")
        if self.judge_mode not in JUDGE_MODES:
            fail("judge_mode", f"expected one of {JUDGE_MODES}")
        for field in ("challenging", "ensure_goodbye", "stop_at_newline"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be a bool")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            fail("temperature", "must be a number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not is_int(self.max_reply_tokens) or self.max_reply_tokens < 2:
            fail("max_reply_tokens", "must be an int >= 2")
        if not is_int(self.seed):
            fail("seed", "must be an int")
        buckets = self.prompt_buckets
        if (
            not isinstance(buckets, tuple)
            or not buckets
            or not all(_is_pow2(b) for b in buckets)
            or list(buckets) != sorted(set(buckets))
        ):
            fail("prompt_buckets", "must be a non-empty, increasing tuple of powers of two")
        jb = self.judge_batch_buckets
        if (
            not isinstance(jb, tuple)
            or not jb
            or not all(is_int(b) and b > 0 for b in jb)
            or list(jb) != sorted(set(jb))
        ):
            fail("judge_batch_buckets", "must be a non-empty, increasing tuple of positive ints")
        if (
            not isinstance(self.answer_prefix, str)
            or self.answer_prefix != self.answer_prefix.rstrip()
        ):
            fail("answer_prefix", "must be a string without trailing whitespace")
        if not isinstance(self.terminators, tuple) or not all(
            isinstance(t, str) and t for t in self.terminators
        ):
            fail("terminators", "must be a tuple of non-empty strings")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            fail("system_prompt", "must be a string or None")
        if not is_int(self.opening_emotion) or not 0 <= self.opening_emotion <= 100:
            fail("opening_emotion", "must be an int in [0, 100]")


def clean_reply(text: str, labels: Sequence[str]) -> str:
    """The first non-empty line of `text`, without leading role labels ("Me:", "**Them:**",
    "我：", ...) and without quotes wrapping the whole line; "" when nothing is left."""
    alternatives = "|".join(re.escape(lab) for lab in sorted(set(labels), key=len, reverse=True))
    label_re = re.compile(rf"^[\s*_#>\-]*(?:{alternatives})[\s*_]*[:：][\s*_]*", re.IGNORECASE)
    for raw in text.splitlines():
        line, prev = raw.strip(), None
        while line != prev:
            prev = line
            line = label_re.sub("", line).strip()
            if len(line) >= 2 and _QUOTE_PAIRS.get(line[0]) == line[-1]:
                line = line[1:-1].strip()
        if line:
            return line
    return ""


def _mix(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(repr, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------- the user
class LLMUser:
    """Simulated user played by a language model (implements `user.SimulatedUser`).

    Args:
      params, model_config, tokenizer: the user model (tokenizer checked against the config).
      config: `LLMUserConfig`.
      mesh, rules: place the params on `mesh` (the policy's) with the logical axis `rules`
        (default: the rollout's, `ROLLOUT_RULES`: weights never gathered per token);
        the judge and the sampler then run sharded there. None = single device.
      sampler: a `Sampler` for replies (default: one built for this model and mesh).
    """

    def __init__(
        self,
        params: Params,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        config: LLMUserConfig | None = None,
        *,
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, MeshAxes]] = ROLLOUT_RULES,
        sampler: Sampler | None = None,
    ) -> None:
        check_compatible(tokenizer, model_config)
        self.config = config or LLMUserConfig()
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.seed = int(self.config.seed)
        self.fallbacks = 0  # sampled messages replaced by a canned line (empty after cleaning)
        cfg = self.config
        self.table: CandidateTable = build_candidate_table(
            tokenizer, self._render("x") + cfg.answer_prefix, terminators=cfg.terminators
        )
        self.scorer = JudgeScorer(
            model_config,
            pad_id=tokenizer.pad_id,
            prompt_buckets=cfg.prompt_buckets,
            batch_buckets=cfg.judge_batch_buckets,
            mesh=mesh,
            rules=rules,
        )
        self.sampler = sampler or Sampler(
            model_config,
            mesh=mesh,
            pad_id=tokenizer.pad_id,
            stop_token_ids=tokenizer.stop_token_ids,
            sampler_config=SamplerConfig(prompt_buckets=cfg.prompt_buckets),
            rules=rules,
        )
        if mesh is not None:
            params = mesh_lib.shard_params(params, param_shardings(model_config, mesh, rules))
        self.params = params
        context = model_config.max_position_embeddings
        self.max_judge_prompt = min(max(cfg.prompt_buckets), context - self.table.width)
        sampler_buckets = getattr(
            getattr(self.sampler, "sampler_config", None), "prompt_buckets", cfg.prompt_buckets
        )
        self.max_sample_prompt = min(max(sampler_buckets), context - cfg.max_reply_tokens)
        stops = list(tokenizer.stop_token_ids)
        if cfg.stop_at_newline:
            for nl in ("\n", "\n\n"):
                ids = tokenizer.encode(nl)
                if len(ids) == 1:
                    stops.append(ids[0])
        self.stop_ids = tuple(dict.fromkeys(stops))

    # ------------------------------------------------------------------ helpers
    def set_seed(self, seed: int) -> None:
        """Use `seed` for later openings and replies (e.g. a new one per RL iteration)."""
        self.seed = int(seed)

    def _language(self, profile: Profile) -> Language:
        return self.config.language or profile.language

    def _render(self, content: str) -> str:
        messages = [{"role": "user", "content": content}]
        if self.config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        return self.tokenizer.render_chat(messages, add_generation_prompt=True)

    def _fit(
        self, build: Callable[[Sequence[Turn], bool], str], history: Sequence[Turn], limit: int,
        what: str, suffix: str = "",
    ) -> list[int]:  # fmt: skip
        """Ids of the chat-rendered prompt, dropping the oldest turns until it fits `limit`."""
        turns = list(history)
        dropped = False
        while True:
            ids = self.tokenizer.encode(self._render(build(turns, dropped)) + suffix)
            if len(ids) <= limit:
                return ids
            if not turns:
                raise ValueError(
                    f"{what} prompt has {len(ids)} tokens, more than the limit {limit} even "
                    "without history; raise LLMUserConfig.prompt_buckets or shorten the profile"
                )
            turns, dropped = turns[1:], True

    # ------------------------------------------------------------------ prompts
    def judge_prompt_ids(
        self, profile: Profile, history: Sequence[Turn], reply: str, emotion: int
    ) -> list[int]:
        """Token ids of one judge prompt: chat template, generation prompt, answer prefix."""
        lang = self._language(profile)

        def build(turns: Sequence[Turn], omitted: bool) -> str:
            return judge_prompt_text(
                profile, turns, reply, emotion, language=lang,
                challenging=self.config.challenging, omitted=omitted,
            )  # fmt: skip

        return self._fit(build, history, self.max_judge_prompt, "judge", self.config.answer_prefix)

    def reply_prompt_ids(
        self, profile: Profile, history: Sequence[Turn], emotion: int
    ) -> list[int]:
        """Token ids of one `user_reply` prompt (chat template + generation prompt)."""
        lang = self._language(profile)

        def build(turns: Sequence[Turn], omitted: bool) -> str:
            return reply_prompt_text(
                profile, turns, emotion, language=lang, challenging=self.config.challenging,
                omitted=omitted,
            )  # fmt: skip

        return self._fit(build, history, self.max_sample_prompt, "reply")

    def opening_prompt_ids(self, profile: Profile) -> list[int]:
        """Token ids of one `user_opening` prompt."""
        text = opening_prompt_text(
            profile, self.config.opening_emotion, language=self._language(profile),
            challenging=self.config.challenging,
        )  # fmt: skip
        return self._fit(lambda _t, _o: text, (), self.max_sample_prompt, "opening")

    # ------------------------------------------------------------------ judging
    def judge_candidate_scores(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        replies: Sequence[str],
        emotions: np.ndarray | Sequence[int],
    ) -> np.ndarray:
        """[B, 21] float32 log-probabilities of the answers -10..10 (see `llm_judge`)."""
        b = len(profiles)
        scores = np.atleast_1d(np.asarray(emotions))
        for name, values in (("histories", histories), ("replies", replies), ("emotions", scores)):
            check_batch(name, values, b)
        prompts = [
            self.judge_prompt_ids(p, h, r, int(e))
            for p, h, r, e in zip(profiles, histories, replies, scores, strict=True)
        ]
        return self.scorer(self.params, prompts, self.table)

    def judge(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        replies: Sequence[str],
        reply_ids: Sequence[list[int]] | None,
        emotions: np.ndarray,
    ) -> np.ndarray:
        """Emotion change per reply, int32 [B] in [-10, 10]. `reply_ids` is not used: the reply
        is judged as text inside the prompt, under the user model's own tokenizer."""
        scores = self.judge_candidate_scores(profiles, histories, replies, emotions)
        return changes_from_scores(scores, self.config.judge_mode, self.table.changes)

    # ------------------------------------------------------------------ messages
    def _labels(self, profile: Profile, language: Language) -> list[str]:
        prompts = load_prompts(language)
        labels = [prompts["history_user_label"], prompts["history_assistant_label"]]
        for key in ("user_reply", "user_opening"):  # e.g. "Your next message:"
            last = prompts[key].rstrip().splitlines()[-1].strip().rstrip(":：")
            labels.append(last)
        name = profile_name(profile)
        return [*labels, *_GENERIC_LABELS, name] if name else [*labels, *_GENERIC_LABELS]

    def _fallback(self, profile: Profile, letter: str, turn: int) -> str:
        self.fallbacks += 1
        section = load_prompts(profile.language).get("reference_user") or {}
        options = section.get(letter) or [_GOODBYE[profile.language]]
        text = options[_mix(profile.id, turn, letter) % len(options)]
        return text.format(name=profile_name(profile))

    def _sample(self, prompts: Sequence[Sequence[int]], seed: int) -> list[str]:
        cfg = self.config
        out = self.sampler(
            self.params,
            prompts,
            max_new_tokens=cfg.max_reply_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_token_ids=self.stop_ids,
            seed=seed,
        )
        return [self.tokenizer.decode(ids) for ids in out.sequences()]

    def opening(self, profiles: Sequence[Profile]) -> list[str]:
        """first_talk where set; the other rows sampled from `user_opening` (when any row needs
        sampling, the whole batch is sampled so that row i always draws as dialogue i)."""
        if all(p.first_talk is not None for p in profiles):
            return [str(p.first_talk) for p in profiles]
        texts = self._sample(
            [self.opening_prompt_ids(p) for p in profiles], _mix(self.seed, "opening", 0)
        )
        out = []
        for p, text in zip(profiles, texts, strict=True):
            if p.first_talk is not None:
                out.append(p.first_talk)
                continue
            lang = self._language(p)
            line = clean_reply(text, self._labels(p, lang))
            out.append(line or self._fallback(p, "opening", 0))
        return out

    def reply(
        self,
        profiles: Sequence[Profile],
        histories: Sequence[Sequence[Turn]],
        emotions: np.ndarray,
        turn_index: int | Sequence[int],
    ) -> list[str]:
        """The user's next message per dialogue (sampled; see the module docstring)."""
        b = len(profiles)
        scores = reply_scores(histories, emotions, b)
        turns = turn_indices(turn_index, b)
        key = turns[0] if len(set(turns)) == 1 else tuple(turns)
        prompts = [
            self.reply_prompt_ids(p, h, int(e))
            for p, h, e in zip(profiles, histories, scores, strict=True)
        ]
        texts = self._sample(prompts, _mix(self.seed, "reply", key))
        out = []
        for p, text, score, turn in zip(profiles, texts, scores, turns, strict=True):
            lang = self._language(p)
            letter = band(int(score))
            line = clean_reply(text, self._labels(p, lang)) or self._fallback(p, letter, turn)
            if (
                self.config.ensure_goodbye
                and letter in ("S", "F")
                and not detect_goodbye(line, p.language)
            ):
                line = f"{line} {_GOODBYE[p.language]}"
            out.append(line)
        return out
