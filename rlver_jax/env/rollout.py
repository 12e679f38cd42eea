"""Batched multi-turn rollouts: B profiles x G samples, every turn in lockstep.

One turn of every unfinished dialogue at once:

    prompts  = scaffold.policy_prompt_ids(record)            # thoughts stripped per the scaffold
    replies  = sampler(policy params, prompts)               # one jitted prefill + decode
    visible  = the "say" part of each reply                   # what the user sees
    change   = user.judge(profiles, histories, visible, emotion)   # compiled forward pass
    emotion  = dynamics.apply_change(emotion, change)        # clamp, keep in [0, 100]
    ended?   = dynamics.is_terminal(...)                      # score, turn limit
    message  = user.reply(...)                                # goodbye also ends the dialogue

Finished dialogues leave the batch, so later turns sample only what is still running. The G
samples of a profile are clones (same profile, same opening), as in RLVER. The reward of a
dialogue is max(final emotion / 100, 0) on its last policy token (RLVER); per-turn emotion
changes / 100 can be added on each turn's last token.

`RolloutEngine.run` (training) also collates the dialogues into learner `Trajectories`, padded
to a `seq_len_buckets` width; `RolloutEngine.play` (the benchmark) stops at the transcripts, so
evaluation needs no training buckets. The longest training sample is the last prompt a dialogue
may send (<= max_prompt_tokens) plus its reply (<= max_reply_tokens), whatever the number of
turns; `run_config.check_training_lengths` checks that bound against the buckets at config load.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rlver_jax.buckets import smallest_bucket
from rlver_jax.chat_format import ChatFormat
from rlver_jax.env import dynamics
from rlver_jax.env.profiles import Profile
from rlver_jax.env.user import SimulatedUser, Turn
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.models.transformer import Params
from rlver_jax.sampling.sampler import Sampler
from rlver_jax.scaffold import (
    DialogueRecord,
    PolicyTurn,
    ScaffoldConfig,
    collate,
    dialogue_samples,
    policy_prompt_ids,
    system_prompt,
)
from rlver_jax.trajectories import Trajectories

# A dialogue whose next policy prompt no longer fits the context ends with this reason.
CONTEXT_FULL = 100


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How dialogues are rolled out.

    profiles_per_batch: B distinct profiles per rollout.
    samples_per_profile: G dialogues per profile (RLVER: 1 for PPO, 4 for GRPO).
    mode: "train" (emotion starts at 30, 8 turns) or "eval" (40, 10 turns; the SAGE protocol).
    max_reply_tokens: the policy's token budget per turn (thought included).
    max_prompt_tokens: a dialogue whose next prompt is longer ends (reason CONTEXT_FULL).
    temperature, top_p, top_k: the policy's sampling (top_k 0: no top-k cut).
    per_turn_reward: add each turn's emotion change / 100 on that turn's last token.
    seq_len_buckets: widths the collated Trajectories of `RolloutEngine.run` are padded to
      (bounded learner compiles); the largest must hold max_prompt_tokens + max_reply_tokens.
      `RolloutEngine.play` (evaluation) builds no Trajectories and ignores them.
    """

    profiles_per_batch: int = 4
    samples_per_profile: int = 1
    mode: Literal["train", "eval"] = "train"
    max_reply_tokens: int = 128
    max_prompt_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    per_turn_reward: bool = False
    seq_len_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)

    def __post_init__(self) -> None:
        for name in (
            "profiles_per_batch",
            "samples_per_profile",
            "max_reply_tokens",
            "max_prompt_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"RolloutConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"RolloutConfig.top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class DialogueResult:
    """What `RolloutEngine.play` produced: per-dialogue transcripts and summary metrics."""

    transcripts: list[dict[str, Any]]
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class RolloutResult:
    """What a training rollout produced: learner arrays, per-dialogue transcripts and summary
    metrics."""

    trajectories: Trajectories
    transcripts: list[dict[str, Any]]
    metrics: dict[str, float]


@dataclasses.dataclass
class _Dialogue:
    profile: Profile
    record: DialogueRecord
    emotions: list[int]
    changes: list[int]
    done: bool = False
    end_reason: int = int(dynamics.EndReason.RUNNING)


class RolloutEngine:
    """Runs dialogues between the policy (through `sampler`) and a simulated `user`."""

    def __init__(
        self,
        sampler: Sampler,
        tokenizer: Tokenizer,
        user: SimulatedUser,
        scaffold: ScaffoldConfig,
        config: RolloutConfig,
        dynamics_config: dynamics.EmotionDynamicsConfig = dynamics.DEFAULT_CONFIG,
    ) -> None:
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.user = user
        self.scaffold = scaffold
        self.config = config
        self.dynamics = dynamics_config
        self.format = ChatFormat.from_tokenizer(tokenizer)
        self.system_prompt = system_prompt(scaffold)

    def run(self, params: Params, profiles: Sequence[Profile], seed: int) -> RolloutResult:
        """Roll out G dialogues for each profile and collate their training samples;
        deterministic given params, profiles, seed."""
        dialogues, sampled_tokens, timings = self._play(params, profiles, seed)
        t = time.perf_counter()
        trajectories = self._collate(dialogues)
        timings["collate_s"] = time.perf_counter() - t
        metrics = self._metrics(dialogues, sampled_tokens, timings, trajectories.num_samples)
        return RolloutResult(trajectories, [self._transcript(d) for d in dialogues], metrics)

    def play(self, params: Params, profiles: Sequence[Profile], seed: int) -> DialogueResult:
        """The dialogues of `run` (same seeds, same transcripts) without training samples: for
        evaluation, which never trains and so needs no `seq_len_buckets`."""
        dialogues, sampled_tokens, timings = self._play(params, profiles, seed)
        metrics = self._metrics(dialogues, sampled_tokens, timings)
        return DialogueResult([self._transcript(d) for d in dialogues], metrics)

    def _play(
        self, params: Params, profiles: Sequence[Profile], seed: int
    ) -> tuple[list[_Dialogue], int, dict[str, float]]:
        """(finished dialogues, tokens sampled, timings) of G dialogues per profile."""
        cfg, dyn = self.config, self.dynamics
        G = cfg.samples_per_profile
        timings = {"policy_sampling_s": 0.0, "user_judging_s": 0.0, "user_replies_s": 0.0}
        params = self.sampler.rollout_params(params)  # the decoding layout, freed on return
        self.user.set_seed(seed)  # a sampling user (LLM) draws fresh messages per rollout
        t0 = time.perf_counter()
        openings = self.user.opening(list(profiles))
        timings["user_replies_s"] += time.perf_counter() - t0
        start = dynamics.initial_score(dyn, cfg.mode)
        dialogues = [
            _Dialogue(
                profile=p,
                record=DialogueRecord(
                    self.system_prompt, [openings[b]], dialogue_id=b * G + g, group_id=b
                ),
                emotions=[int(start)],
                changes=[],
            )
            for b, p in enumerate(profiles)
            for g in range(G)
        ]
        turn = 0
        sampled_tokens = 0
        while True:
            active = [d for d in dialogues if not d.done]
            prompts = []
            for d in active:
                ids = policy_prompt_ids(d.record, self.scaffold, self.format)
                if len(ids) > cfg.max_prompt_tokens:
                    d.done, d.end_reason = True, CONTEXT_FULL
                else:
                    prompts.append(ids)
            active = [d for d in active if not d.done]
            if not active:
                break
            t = time.perf_counter()
            out = self.sampler(
                params, prompts, max_new_tokens=cfg.max_reply_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                seed=seed * 1009 + turn,
            )  # fmt: skip
            timings["policy_sampling_s"] += time.perf_counter() - t
            for i, d in enumerate(active):
                n = int(out.lengths[i])
                sampled_tokens += n
                d.record.policy_turns.append(
                    PolicyTurn.from_sample(
                        out.tokens[i, :n].tolist(),
                        out.logprobs[i, :n].tolist(),
                        self.scaffold,
                        self.tokenizer,
                    )
                )
            turn += 1

            t = time.perf_counter()
            histories = [self._history(d, include_last_reply=False) for d in active]
            visible = [d.record.policy_turns[-1].parsed.visible for d in active]
            before = np.array([d.emotions[-1] for d in active], np.int32)
            changes = np.asarray(
                self.user.judge([d.profile for d in active], histories, visible, None, before)
            )
            timings["user_judging_s"] += time.perf_counter() - t
            after = np.asarray(dynamics.apply_change(before, changes, dyn)).astype(np.int32)
            for i, d in enumerate(active):
                d.changes.append(int(after[i] - before[i]))
                d.emotions.append(int(after[i]))
                done, reason = dynamics.is_terminal(int(after[i]), turn, False, dyn, cfg.mode)
                if done:
                    d.done, d.end_reason = True, int(reason)
            talking = [d for d in active if not d.done]
            if not talking:
                continue
            t = time.perf_counter()
            messages = self.user.reply(
                [d.profile for d in talking],
                [self._history(d, include_last_reply=True) for d in talking],
                np.array([d.emotions[-1] for d in talking], np.int32),
                turn,
            )
            timings["user_replies_s"] += time.perf_counter() - t
            for d, message in zip(talking, messages, strict=True):
                d.record.user_messages.append(message)
                if dynamics.detect_goodbye(message, d.profile.language):
                    d.done, d.end_reason = True, int(dynamics.EndReason.GOODBYE)

        return dialogues, sampled_tokens, timings

    # ------------------------------------------------------------------ helpers
    def _history(self, d: _Dialogue, include_last_reply: bool) -> list[Turn]:
        """The dialogue as the user sees it (visible replies only)."""
        messages = d.record.visible_messages()
        if not include_last_reply and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return [Turn(m["role"], m["content"]) for m in messages]  # type: ignore[arg-type]

    def _collate(self, dialogues: list[_Dialogue]) -> Trajectories:
        samples = []
        for d in dialogues:
            d.record.score = max(d.emotions[-1] / 100.0, 0.0)
            if self.config.per_turn_reward:
                d.record.turn_rewards = [c / 100.0 for c in d.changes]
            samples.extend(dialogue_samples(d.record, self.scaffold, self.format))
        # run_config.check_training_lengths refuses configs whose samples can outgrow these
        longest = max(len(s.tokens) for s in samples)
        what = "rollout.seq_len_buckets: a training sample of length"
        width = smallest_bucket(longest, self.config.seq_len_buckets, what)
        return collate(
            samples,
            self.tokenizer.pad_id,
            per_turn_rewards=self.config.per_turn_reward,
            seq_len=width,
        )

    def _metrics(
        self,
        dialogues: list[_Dialogue],
        sampled: int,
        timings: dict[str, float],
        samples: int | None = None,
    ) -> dict[str, float]:
        """Summary metrics; `samples` (training samples collated) only from `run`."""
        dyn = self.dynamics
        final = np.array([d.emotions[-1] for d in dialogues], np.float64)
        turns = [t for d in dialogues for t in d.record.policy_turns]
        reply_lens = [len(self.tokenizer.encode(t.parsed.visible)) for t in turns]
        thought_lens = [len(self.tokenizer.encode(t.parsed.thought or "")) for t in turns]
        total = sum(timings.values())
        out = {
            "reward_mean": float(np.mean(np.maximum(final / 100.0, 0.0))),
            "final_emotion_mean": float(final.mean()),
            "success_rate": float(np.mean(dynamics.is_success(final, dyn))),
            "failure_rate": float(np.mean(dynamics.is_failure(final, dyn))),
            "turns_mean": float(np.mean([len(d.record.policy_turns) for d in dialogues])),
            "format_break_rate": float(np.mean([not t.parsed.format_ok for t in turns])),
            "reply_tokens_mean": float(np.mean(reply_lens)),
            "thought_tokens_mean": float(np.mean(thought_lens)),
            "sampled_tokens": float(sampled),
            "sampling_tokens_per_s": sampled / max(timings["policy_sampling_s"], 1e-9),
            **{f"time/{k}": v for k, v in timings.items()},
            "time/rollout_s": total,
        }
        if samples is not None:
            out["samples"] = float(samples)
        return out

    def _transcript(self, d: _Dialogue) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for i, user in enumerate(d.record.user_messages):
            messages.append({"role": "user", "content": user})
            if i < len(d.record.policy_turns):
                parsed = d.record.policy_turns[i].parsed
                messages.append({
                    "role": "assistant", "content": parsed.visible, "thought": parsed.thought,
                    "format_ok": parsed.format_ok, "emotion_after": d.emotions[i + 1],
                    "change": d.changes[i],
                })  # fmt: skip
        reason = d.end_reason
        name = "CONTEXT_FULL" if reason == CONTEXT_FULL else dynamics.EndReason(reason).name
        return {
            "dialogue_id": d.record.dialogue_id,
            "group_id": d.record.group_id,
            "profile_id": d.profile.id,
            "intention": d.profile.intention,
            "personality": d.profile.personality,
            "language": d.profile.language,
            "scaffold": self.scaffold.mode,
            "emotions": d.emotions,
            "final_emotion": d.emotions[-1],
            "end_reason": name,
            "format_ok": d.record.format_ok,
            "messages": messages,
        }


def write_transcripts(path: str | Path, transcripts: Sequence[dict[str, Any]]) -> Path:
    """Append transcripts as JSON lines (one dialogue per line, UTF-8, non-ASCII kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for t in transcripts:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    return path


def format_transcript(t: dict[str, Any]) -> str:
    """A human-readable dialogue with its emotion trajectory."""
    lines = [
        f"--- dialogue {t['dialogue_id']} (profile {t['profile_id'][:8]}, "
        f"{t['intention']}, {t['scaffold']}): emotions {t['emotions']} -> {t['end_reason']}"
    ]
    for m in t["messages"]:
        if m["role"] == "user":
            lines.append(f"  user: {m['content']}")
        else:
            if m.get("thought"):
                lines.append(f"  [think] {m['thought']}")
            lines.append(
                f"  policy: {m['content']}   (emotion {m['emotion_after']}, {m['change']:+d})"
            )
    return "\n".join(lines)
