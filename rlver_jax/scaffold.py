"""The policy's dialogue scaffold: think-then-say or plain replies, prompts, masks and samples.

RLVER (spec §1.5, §2, §3) trains the policy in two modes:

- plain: the reply is said directly; one training sample per dialogue, loss on the policy's
  tokens only.
- think: each reply is `<think>\\n...\\n</think>\\n` followed by what is said. The user simulator
  sees only the text after the last `</think>`, and so does the policy at its later turns
  (thoughts are stripped from its own context). A dialogue therefore has no single token
  sequence, and each policy turn becomes its own sample: the stripped history as context, then
  the turn's raw sampled ids (thought included, all trained).

This module holds the mode's config, its system prompts (from `rlver_jax/data/prompts`), the
reply parser, and the conversion of a finished dialogue into training `Sample`s and then into
`Trajectories`. Token sequences are concatenations of chat-template pieces (`ChatFormat`) and
the policy's sampled ids, never re-tokenised text: RLVER re-encoded decoded replies (a small
off-policy mismatch); here the trained ids are the sampled ids, and the ids the sampler was
prompted with (`policy_prompt_ids`) are exactly the prefix of the sample that trains them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import yaml

from rlver_jax.chat_format import ChatFormat
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.trajectories import Trajectories

ScaffoldMode = Literal["think", "plain"]
Language = Literal["en", "zh"]
Layout = Literal["plain", "per_turn"]
SCAFFOLD_MODES: tuple[str, ...] = ("think", "plain")
LANGUAGES: tuple[str, ...] = ("en", "zh")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The forced start of a think-mode reply: the sampler continues after it (so every reply opens
# a think block); these ids are prompt, not policy output.
THINK_PREFIX = "<think>\n"
_TAG = re.compile(r"</?think>")


@dataclasses.dataclass(frozen=True)
class ScaffoldConfig:
    """How the policy replies and how its replies become training samples.

    mode:                        "think" (think-then-say) or "plain".
    language:                    "en" or "zh": which system prompts to use.
    format_break_reward:         reward of a think-mode sample whose reply has no well-formed
                                 think block. 0.0 is the RLVER paper's rule; None: no penalty
                                 (the released RLVER code has none).
    strip_thoughts_from_context: RLVER: thoughts are removed from what the user sees and from
                                 the policy's own later context (per-turn samples). False keeps
                                 them in the policy's context (one sample per dialogue); the
                                 user never sees them either way.
    force_think_prefix:          give the sampler `<think>\\n` as a forced start in think mode,
                                 so the format cannot be skipped at the first token.
    """

    mode: ScaffoldMode = "think"
    language: Language = "en"
    format_break_reward: float | None = 0.0
    strip_thoughts_from_context: bool = True
    force_think_prefix: bool = True

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"ScaffoldConfig.{field}: {why} (got {getattr(self, field)!r})")

        if self.mode not in SCAFFOLD_MODES:
            fail("mode", f"must be one of {SCAFFOLD_MODES}")
        if self.language not in LANGUAGES:
            fail("language", f"must be one of {LANGUAGES}")
        frb = self.format_break_reward
        if frb is not None and (
            isinstance(frb, bool)
            or not isinstance(frb, int | float | np.floating | np.integer)
            or not math.isfinite(float(frb))
        ):
            fail("format_break_reward", "must be a finite number or None")
        for field in ("strip_thoughts_from_context", "force_think_prefix"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be a bool")

    @property
    def layout(self) -> Layout:
        """The sample layout: per_turn when thoughts are stripped from later context, else plain."""
        if self.mode == "think" and self.strip_thoughts_from_context:
            return "per_turn"
        return "plain"

    @property
    def forced_prefix(self) -> str:
        """Text the sampler is forced to start each reply with ("" when none)."""
        return THINK_PREFIX if self.mode == "think" and self.force_think_prefix else ""


# --------------------------------------------------------------------------- prompts
@functools.cache
def _load_prompts_cached(language: str) -> dict[str, Any]:
    resource = importlib.resources.files("rlver_jax").joinpath(
        "data", "prompts", f"{language}.yaml"
    )
    if not resource.is_file():
        raise FileNotFoundError(f"prompt file rlver_jax/data/prompts/{language}.yaml is missing")
    data = yaml.safe_load(resource.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"rlver_jax/data/prompts/{language}.yaml: top level must be a mapping")
    return data


def load_prompts(language: str) -> dict[str, Any]:
    """The prompt texts of `language` ("en" or "zh"), read once from the package data.

    Read through importlib.resources so it works from a checkout and an installed wheel.
    Returns a fresh copy of the top-level mapping (the cached one stays unmodified).
    """
    if language not in LANGUAGES:
        raise ValueError(f"language: must be one of {LANGUAGES}, got {language!r}")
    return dict(_load_prompts_cached(language))


_SYSTEM_KEYS = {"think": "policy_system_think", "plain": "policy_system_plain"}


def system_prompt(cfg: ScaffoldConfig) -> str:
    """The policy's system prompt for the config's mode and language (RLVER spec §3)."""
    key = _SYSTEM_KEYS[cfg.mode]
    prompts = load_prompts(cfg.language)
    text = prompts.get(key)
    if not isinstance(text, str) or not text.strip():
        raise KeyError(f"rlver_jax/data/prompts/{cfg.language}.yaml has no text under {key!r}")
    return text.strip()


# --------------------------------------------------------------------------- parsing
@dataclasses.dataclass(frozen=True)
class ParsedReply:
    """A reply split into its thought (None: no think block) and the part the user sees."""

    thought: str | None
    visible: str
    format_ok: bool


def parse_reply(text: str, mode: str) -> ParsedReply:
    """Split a decoded reply (forced prefix included) into thought and visible text.

    think mode. Well-formed (`format_ok`) = starts with `<think>` (after whitespace), exactly one
    `<think>` and one `</think>`, a non-empty thought and a non-empty visible part. As in RLVER,
    the visible part is the text after the LAST `</think>`, stripped. When `</think>` is missing,
    RLVER passes the whole output through; we pass it minus its leading `<think>` tag (a half
    thought is then visible, but no tag reaches the user). Stray think tags are always removed
    from the visible text, and the thought is whatever precedes the last `</think>`, so it never
    leaks into the visible part.

    plain mode. Always `format_ok`; visible = the text with any think tags removed, stripped.
    """
    if mode not in SCAFFOLD_MODES:
        raise ValueError(f"mode: must be one of {SCAFFOLD_MODES}, got {mode!r}")
    if mode == "plain":
        return ParsedReply(thought=None, visible=_TAG.sub("", text).strip(), format_ok=True)
    body = text.lstrip()
    starts_open = body.startswith(THINK_OPEN)
    if THINK_CLOSE not in body:
        visible = body[len(THINK_OPEN) :] if starts_open else body
        return ParsedReply(thought=None, visible=_TAG.sub("", visible).strip(), format_ok=False)
    head, _, tail = body.rpartition(THINK_CLOSE)
    thought = _TAG.sub("", head).strip()
    visible = _TAG.sub("", tail).strip()
    ok = (
        starts_open
        and body.count(THINK_OPEN) == 1
        and body.count(THINK_CLOSE) == 1
        and bool(thought)
        and bool(visible)
    )
    return ParsedReply(thought=thought, visible=visible, format_ok=ok)


def reply_text(sampled_ids: Sequence[int], cfg: ScaffoldConfig, tok: Tokenizer) -> str:
    """The reply as text: forced prefix + decoded sampled ids (special tokens skipped)."""
    return cfg.forced_prefix + tok.decode(list(sampled_ids), skip_special_tokens=True)


def sample_reward(score: float, format_ok: bool, cfg: ScaffoldConfig) -> float:
    """The reward of a sample: `score`, or `cfg.format_break_reward` for a think-mode sample
    with a broken format (when that penalty is set)."""
    if cfg.mode == "think" and not format_ok and cfg.format_break_reward is not None:
        return float(cfg.format_break_reward)
    return float(score)


# --------------------------------------------------------------------------- records
@dataclasses.dataclass
class PolicyTurn:
    """One policy reply as sampled: ids exactly as generated (thought and end-of-turn token
    included, forced prefix excluded), their sampler log-probs, and the parsed text."""

    sampled_ids: list[int]
    sampler_logprobs: list[float]
    parsed: ParsedReply

    def __post_init__(self) -> None:
        if len(self.sampled_ids) != len(self.sampler_logprobs):
            raise ValueError(
                f"PolicyTurn.sampler_logprobs: {len(self.sampler_logprobs)} values for "
                f"{len(self.sampled_ids)} sampled ids"
            )

    @classmethod
    def from_sample(
        cls,
        sampled_ids: Sequence[int],
        sampler_logprobs: Sequence[float],
        cfg: ScaffoldConfig,
        tok: Tokenizer,
    ) -> PolicyTurn:
        """Decode and parse sampled ids (the rollout's way of building a turn)."""
        parsed = parse_reply(reply_text(sampled_ids, cfg, tok), cfg.mode)
        return cls(list(sampled_ids), [float(x) for x in sampler_logprobs], parsed)


@dataclasses.dataclass
class DialogueRecord:
    """A dialogue on the host: user_0, policy_0, user_1, policy_1, ... (a final user message
    after the last policy turn is allowed and ignored for training).

    score:        the dialogue's outcome in reward units (RLVER: max(final emotion / 100, 0)).
    turn_rewards: optional per policy turn reward (e.g. the emotion change / 100 that the reply
                  caused), placed on that turn's last token when collating with per-turn rewards.
    """

    system_prompt: str
    user_messages: list[str]
    policy_turns: list[PolicyTurn] = dataclasses.field(default_factory=list)
    score: float = 0.0
    turn_rewards: list[float] | None = None
    dialogue_id: int = 0
    group_id: int = 0

    def validate(self) -> None:
        """Raise ValueError when the turns do not alternate user -> policy."""
        n_user, n_pol = len(self.user_messages), len(self.policy_turns)
        if n_user not in (n_pol, n_pol + 1):
            raise ValueError(
                f"DialogueRecord.user_messages: {n_user} user messages for {n_pol} policy "
                "turns (each policy turn answers one user message)"
            )
        if self.turn_rewards is not None and len(self.turn_rewards) != n_pol:
            raise ValueError(
                f"DialogueRecord.turn_rewards: {len(self.turn_rewards)} values for {n_pol} "
                "policy turns"
            )

    @property
    def format_ok(self) -> bool:
        return all(t.parsed.format_ok for t in self.policy_turns)

    def visible_messages(self) -> list[dict[str, str]]:
        """The transcript as the user simulator sees it: visible replies only, no system."""
        out: list[dict[str, str]] = []
        for i, user in enumerate(self.user_messages):
            out.append({"role": "user", "content": user})
            if i < len(self.policy_turns):
                out.append({"role": "assistant", "content": self.policy_turns[i].parsed.visible})
        return out


# --------------------------------------------------------------------------- samples
@dataclasses.dataclass
class Sample:
    """One training sample on the host (a row of `Trajectories` once collated).

    reward_index:     index of the last policy token (where the outcome reward goes).
    turn_end_indices: index of the last token of each policy turn in this sample.
    turn_indices:     which policy turns of the dialogue those are.
    turn_rewards:     optional per-turn rewards aligned with turn_end_indices.
    score:            the sample's outcome reward (format penalty applied, `sample_reward`).
    """

    tokens: list[int]
    loss_mask: list[bool]
    sampler_logprobs: list[float]
    reward_index: int
    turn_end_indices: list[int]
    turn_indices: list[int]
    score: float
    dialogue_id: int
    group_id: int
    format_ok: bool
    turn_rewards: list[float] | None = None


class _Seq:
    """Growing token sequence with its loss mask and sampler log-probs."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.mask: list[bool] = []
        self.logprobs: list[float] = []

    def add(self, ids: Sequence[int], mask: Sequence[bool], logprobs: Sequence[float] = ()) -> None:
        self.tokens += ids
        self.mask += mask
        it = iter(logprobs)
        self.logprobs += [next(it) if m else 0.0 for m in mask]


def _forced_ids(cfg: ScaffoldConfig, fmt: ChatFormat) -> list[int]:
    return fmt.encode(cfg.forced_prefix) if cfg.forced_prefix else []


def _context(record: DialogueRecord, upto: int, cfg: ScaffoldConfig, fmt: ChatFormat) -> _Seq:
    """System + turns 0..upto-1 in the layout's form + user message `upto` + generation prompt
    + forced prefix: the exact ids the sampler gets for policy turn `upto`."""
    seq = _Seq()
    seq.add(*fmt.message_ids("system", fmt.encode(record.system_prompt)))
    forced = _forced_ids(cfg, fmt)
    for i in range(upto):
        seq.add(*fmt.message_ids("user", fmt.encode(record.user_messages[i])))
        turn = record.policy_turns[i]
        if cfg.layout == "plain":
            ids, mask = fmt.message_ids(
                "assistant", turn.sampled_ids, generated=True, prefix_ids=forced
            )
            seq.add(ids, mask, turn.sampler_logprobs)
        else:
            visible = fmt.encode(turn.parsed.visible)
            seq.add(*fmt.message_ids("assistant", visible, generated=False))
    seq.add(*fmt.message_ids("user", fmt.encode(record.user_messages[upto])))
    prompt = fmt.generation_prompt_ids() + forced
    seq.add(prompt, [False] * len(prompt))
    return seq


def policy_prompt_ids(record: DialogueRecord, cfg: ScaffoldConfig, fmt: ChatFormat) -> list[int]:
    """The ids the sampler is given for the next policy turn of a dialogue in progress.

    `record` must end with a user message (one more user message than policy turns). The result
    is exactly the prefix of the training sample that will hold the next turn's sampled ids.
    """
    record.validate()
    if len(record.user_messages) != len(record.policy_turns) + 1:
        raise ValueError("policy_prompt_ids: the record must end with a user message")
    return _context(record, len(record.policy_turns), cfg, fmt).tokens


def dialogue_samples(record: DialogueRecord, cfg: ScaffoldConfig, fmt: ChatFormat) -> list[Sample]:
    """Training samples of a finished dialogue, in the config's layout.

    plain layout (plain mode, or think mode keeping thoughts): one sample,
    [system][user_0][gen prompt][policy ids 0][closing][user_1]...[policy ids n-1], mask 1 on the
    policy ids only. per-turn layout (think mode, thoughts stripped): one sample per policy turn,
    the stripped history (earlier replies re-encoded from their visible text, mask 0), then the
    turn's sampled ids (mask 1). A final user message after the last policy turn is left out:
    it carries no loss, and the reward sits on the last policy token. Turns with no sampled ids
    get no sample (per-turn) or no turn end (plain); a dialogue without policy ids gives none.
    """
    record.validate()
    kept = [k for k, t in enumerate(record.policy_turns) if t.sampled_ids]
    if not kept:
        return []

    def make(seq: _Seq, ends: list[int], turns: list[int], ok: bool) -> Sample:
        rewards = record.turn_rewards
        return Sample(
            tokens=seq.tokens,
            loss_mask=seq.mask,
            sampler_logprobs=seq.logprobs,
            reward_index=ends[-1],
            turn_end_indices=ends,
            turn_indices=turns,
            score=sample_reward(record.score, ok, cfg),
            dialogue_id=record.dialogue_id,
            group_id=record.group_id,
            format_ok=ok,
            turn_rewards=None if rewards is None else [float(rewards[k]) for k in turns],
        )

    def add_turn(seq: _Seq, turn: PolicyTurn) -> None:
        seq.add(turn.sampled_ids, [True] * len(turn.sampled_ids), turn.sampler_logprobs)

    if cfg.layout == "plain":
        last = len(record.policy_turns) - 1
        seq = _context(record, last, cfg, fmt)
        add_turn(seq, record.policy_turns[last])
        # Policy turns are separated by user messages, so each run of mask 1 is one turn.
        m = seq.mask
        ends = [i for i, on in enumerate(m) if on and (i + 1 == len(m) or not m[i + 1])]
        return [make(seq, ends, kept, record.format_ok)]
    samples = []
    for k in kept:
        seq = _context(record, k, cfg, fmt)
        turn = record.policy_turns[k]
        add_turn(seq, turn)
        samples.append(make(seq, [len(seq.tokens) - 1], [k], turn.parsed.format_ok))
    return samples


def collate(
    samples: Sequence[Sample],
    pad_id: int,
    *,
    per_turn_rewards: bool = False,
    seq_len: int | None = None,
) -> Trajectories:
    """Stack samples into right-padded `Trajectories` (numpy arrays on the host).

    Rewards: each sample's `score` on its `reward_index` (the last policy token), zero
    elsewhere; with `per_turn_rewards`, each turn's reward is added on that turn's last token
    (samples must then carry `turn_rewards`). `seq_len` pads to a fixed width (bounded
    compiles); it must fit the longest sample.
    """
    if not samples:
        raise ValueError("collate: no samples")
    width = max(len(s.tokens) for s in samples)
    if seq_len is not None:
        if seq_len < width:
            raise ValueError(f"collate: seq_len={seq_len} is shorter than a sample ({width})")
        width = seq_len
    n = len(samples)
    tokens = np.full((n, width), pad_id, np.int32)
    token_mask = np.zeros((n, width), bool)
    loss_mask = np.zeros((n, width), bool)
    logprobs = np.zeros((n, width), np.float32)
    rewards = np.zeros((n, width), np.float32)
    for i, s in enumerate(samples):
        t = len(s.tokens)
        if not (len(s.loss_mask) == len(s.sampler_logprobs) == t):
            raise ValueError(f"collate: sample {i} has mismatched tokens/mask/logprob lengths")
        tokens[i, :t] = s.tokens
        token_mask[i, :t] = True
        loss_mask[i, :t] = s.loss_mask
        logprobs[i, :t] = s.sampler_logprobs
        rewards[i, s.reward_index] += s.score
        if per_turn_rewards:
            if s.turn_rewards is None or len(s.turn_rewards) != len(s.turn_end_indices):
                raise ValueError(f"collate: sample {i} has no per-turn rewards")
            for idx, r in zip(s.turn_end_indices, s.turn_rewards, strict=True):
                rewards[i, idx] += r
    traj = Trajectories(
        tokens=tokens,
        token_mask=token_mask,
        loss_mask=loss_mask,
        sampler_logprobs=logprobs,
        rewards=rewards,
        scores=np.array([s.score for s in samples], np.float32),
        group_ids=np.array([s.group_id for s in samples], np.int32),
        dialogue_ids=np.array([s.dialogue_id for s in samples], np.int32),
        format_ok=np.array([s.format_ok for s in samples], bool),
    )
    traj.validate()
    return traj
