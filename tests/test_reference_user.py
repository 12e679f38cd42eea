"""ReferenceUser: intention-dependent emotion changes, exact pattern matching, penalties,
determinism, batch independence, bounds and canned messages (tiny tokenizer, real text)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rlver_jax.env.dynamics import detect_goodbye
from rlver_jax.env.intentions import INTENTIONS, PERSONALITIES
from rlver_jax.env.lexicon_model import SKILLS, load_lexicon
from rlver_jax.env.profiles import Profile
from rlver_jax.env.reference_user import (
    ReferenceUser,
    ReferenceUserConfig,
    load_weights,
    message_templates,
    profile_name,
)
from rlver_jax.env.user import SimulatedUser, Turn
from rlver_jax.model_io.tokenizer import Tokenizer

PERSONA = {
    "en": "* Name: Alex Morgan\n* Age: 30\n* Occupation: nurse",
    "zh": "* 姓名：王小云\n* 年龄：23岁",
}
OPENER = {"en": "I had a really bad day at work.", "zh": "今天上班真的很糟糕。"}

# intention -> (a reply serving it, a dismissive reply or one serving a conflicting need)
EN_CASES: dict[str, tuple[str, str]] = {
    "validation": (
        "You did nothing wrong here. You handled that by the book, and it took courage. "
        "It wasn't your fault.",
        "Looking back, what was your part in it? Ask yourself what you could learn from this "
        "and do differently next time.",
    ),
    "reflection": (
        "Looking back, what do you think you'd do differently next time? What does that tell "
        "you about what matters to you?",
        "Honestly, you're overreacting. Just get over it.",
    ),
    "analysis": (
        "On one hand you had a point; on the other hand, it might be because they were under "
        "pressure. It seems like the real issue is a pattern on both sides.",
        "Don't worry, everything will be fine. Stay positive and cheer up!",
    ),
    "empathy": (
        "That sounds really painful. No wonder you feel drained; anyone would feel hurt after "
        "that. I'm so sorry.",
        "You could make a list and start by talking to your boss tomorrow. One option is to "
        "set a deadline.",
    ),
    "listening": (
        "I'm listening. Take your time and tell me more. What happened next?",
        "Here is my suggestion: write down the facts, then reach out to HR this week and ask "
        "for a meeting.",
    ),
    "insight_into_others": (
        "Maybe he did it because he was afraid of losing face. From his side, it could be that "
        "he felt threatened and didn't know how to admit it.",
        "Who cares what he thinks? Stop overthinking and deal with it.",
    ),
    "solutions": (
        "Here's what you could try: start by writing down what happened, then talk to your "
        "manager this week. One option is to ask for a mediator.",
        "Everything happens for a reason. Stay strong, it'll be okay, don't worry.",
    ),
    "praise": (
        "Honestly, the way you handled that was impressive. You stayed calm, you stood up for "
        "yourself, and I admire your patience. Be proud of that.",
        "That's not a big deal. You should have seen it coming, calm down.",
    ),
}
ZH_CASES: dict[str, tuple[str, str]] = {
    "validation": (
        "你做得很好，真的很有勇气，这不是你的错，你是对的。",
        "回头看，你觉得呢？下次你希望自己怎么做？",
    ),
    "reflection": (
        "回头看，你觉得呢？你从中学到了什么？下次你希望自己怎么做？",
        "别想太多，多大点事，你太敏感了。",
    ),
    "analysis": (
        "说到底，背后的原因可能是他的不安全感；另一方面，双方都有顾虑。",
        "别担心，一切都会好的，开心点。",
    ),
    "empathy": (
        "听起来你真的很委屈，换作是我也会很难受，一个人扛了这么久，辛苦你了。",
        "我建议你先把事情写下来，然后再找个时间跟他谈谈。",
    ),
    "listening": (
        "我在听，慢慢说，后来呢？当时发生了什么？",
        "你可以试试做个计划，第一步先把证据记录下来。",
    ),
    "insight_into_others": (
        "他可能是因为害怕失去面子，说到底，背后的原因是他的不安全感。",
        "至于吗？你太敏感了，别想太多。",
    ),
    "solutions": (
        "我建议你先把事情写下来，然后再找个时间跟他谈谈，可以试试这样说。",
        "别想太多，多大点事。",
    ),
    "praise": (
        "你做得很好，真的很有勇气，处理得很好，我真心佩服你。",
        "你自己的问题，早知道就别这样了，别抱怨。",
    ),
}


def make_profile(
    intention: str = "empathy",
    personality: str = "passive",
    language: str = "en",
    pid: str = "p0",
    first_talk: str | None = None,
) -> Profile:
    return Profile(
        id=pid,
        persona=PERSONA[language],
        scene="A bad day.",
        personality=personality,
        traits=("a", "b", "c"),
        intention=intention,
        language=language,  # type: ignore[arg-type]
        first_talk=first_talk,
    )


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def user(tok: Tokenizer) -> ReferenceUser:
    return ReferenceUser(tok, ReferenceUserConfig(max_reply_tokens=128))


def history(language: str = "en", previous: str | None = None) -> list[Turn]:
    turns = [Turn("user", OPENER[language])]
    if previous is not None:
        turns += [Turn("assistant", previous), Turn("user", "Hmm.")]
    return turns


@pytest.mark.parametrize("language", ["en", "zh"])
def test_good_reply_up_bad_reply_down_for_each_intention(user: ReferenceUser, language: str):
    cases = EN_CASES if language == "en" else ZH_CASES
    profiles, replies = [], []
    for intention, (good, bad) in cases.items():
        for personality in PERSONALITIES:
            profiles += [make_profile(intention, personality, language)] * 2
            replies += [good, bad]
    changes = user.judge(
        profiles, [history(language)] * len(replies), replies, None, np.full(len(replies), 30)
    )
    assert changes.dtype == np.int32 and changes.shape == (len(replies),)
    for k, (p, change) in enumerate(zip(profiles, changes, strict=True)):
        which = "good" if k % 2 == 0 else "bad"
        ok = change > 0 if which == "good" else change < 0
        assert ok, f"{language} {p.intention}/{p.personality}: {which} reply gave {change}"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() and ord(ch) < 0x2E80


def _as_str(seq: list[int]) -> str:  # one character per token id, so str.find searches ids
    return "".join(chr(0x10000 + t) for t in seq)


def _reference_counts(
    tok: Tokenizer, patterns: list[tuple[list[int], int]], ids: list[int]
) -> np.ndarray:
    """Plain-Python occurrence count per column: substring search on token ids + word edges."""
    texts = [tok.decode([t], skip_special_tokens=False) for t in ids]
    haystack = _as_str(ids)
    counts = np.zeros(len(SKILLS) + 1, np.int64)
    for pat, column in patterns:
        needle = _as_str(pat)
        first, last = tok.decode(pat[:1]), tok.decode(pat[-1:])
        i = haystack.find(needle)
        while i >= 0:
            j = i + len(pat)
            cut_before = i > 0 and texts[i - 1] and _is_word_char(texts[i - 1][-1])
            cut_after = j < len(ids) and texts[j] and _is_word_char(texts[j][0])
            cut = (cut_before and _is_word_char(first[0])) or (
                cut_after and _is_word_char(last[-1])
            )
            counts[column] += not cut
            i = haystack.find(needle, i + 1)
    return counts


def test_pattern_counts_match_plain_python(tok: Tokenizer, user: ReferenceUser):
    rng = random.Random(0)
    lex = {lang: load_lexicon(lang) for lang in ("en", "zh")}
    phrases = [p for lang in lex.values() for ps in lang.values() for p in ps]
    fillers = ["the", "and", "you", "really", "so", "I", "it", "我", "你", "的", "?", "？", "!"]
    pattern_tokens = sorted({t for phrase in user.model.phrases for t in tok.encode(phrase)})
    rows: list[list[int]] = []
    for _ in range(12):
        parts = []
        for _ in range(rng.randint(0, 8)):
            piece = rng.choice(phrases) if rng.random() < 0.6 else rng.choice(fillers)
            piece = piece.capitalize() if rng.random() < 0.3 else piece
            parts.append(piece + rng.choice(["", " ", ", ", ". ", "s "]))
        rows.append(tok.encode("".join(parts))[:128])
    for _ in range(4):  # random token soup over the patterns' own tokens: many partial matches
        rows.append([rng.choice(pattern_tokens) for _ in range(rng.randint(1, 60))])
    texts = [tok.decode(r) for r in rows]
    got = user.evaluate([make_profile()] * 16, [history()] * 16, texts, rows).features.counts
    patterns = [
        (tok.encode(p), c) for p, c in zip(user.model.phrases, user.model.skills, strict=True)
    ]
    want = np.stack([_reference_counts(tok, patterns, r) for r in rows])
    np.testing.assert_array_equal(got, want)
    assert want[:, : len(SKILLS)].sum() >= 15  # the texts did exercise the lexicon


def test_repeating_previous_reply_is_penalised(user: ReferenceUser):
    good = EN_CASES["listening"][0]
    p = [make_profile("listening")] * 3
    hist = [history(), history(previous=good), history()]
    repeated = " ".join([good] * 4)
    j = user.evaluate(p, hist, [good, good, repeated])
    assert j.features.overlap[1] > 0.9 and j.features.repetition[2] > 0.5
    assert j.change[1] < j.change[0] and j.raw[2] < j.raw[0]


def test_garbage_and_special_tokens_are_penalised(tok: Tokenizer, user: ReferenceUser):
    good = EN_CASES["empathy"][0]
    good_ids = tok.encode(good)
    special = tok.hf.convert_tokens_to_ids("<|im_start|>")
    replies = [good, "#$^*|<>#@^*|=+#", good, "", good]
    ids = [good_ids, tok.encode(replies[1]), good_ids + [special] * 20, [special] * 8, good_ids]
    ids[4] = [*good_ids, tok.stop_token_ids[0]]  # a trailing end-of-turn token is ignored
    j = user.evaluate([make_profile("empathy")] * 5, [history()] * 5, replies, ids)
    assert j.features.garbage[1] > 0.9 and j.features.garbage[3] == 1.0
    assert j.change[1] <= -8 and j.change[3] <= -8
    assert j.raw[2] < j.raw[0] - 5
    assert j.change[4] == j.change[0] and j.raw[4] == j.raw[0]


def test_overlong_and_empty_replies_are_penalised(tok: Tokenizer):
    text = EN_CASES["solutions"][0] + " " + EN_CASES["empathy"][0]
    assert len(tok.encode(text)) > 64
    p, h = [make_profile("solutions")], [history()]
    short_limit = ReferenceUser(tok, ReferenceUserConfig(max_reply_tokens=32))
    long_limit = ReferenceUser(tok, ReferenceUserConfig(max_reply_tokens=512))
    raw_short = short_limit.evaluate(p, h, [text]).raw[0]
    raw_long = long_limit.evaluate(p, h, [text]).raw[0]
    assert raw_short == pytest.approx(raw_long - load_weights()["penalties"]["overlong"]["weight"])
    assert long_limit.judge(p, h, [""], None, np.array([30]))[0] < -2  # base + too-short penalty


def test_challenging_user_is_stricter(tok: Tokenizer, user: ReferenceUser):
    strict = ReferenceUser(tok, ReferenceUserConfig(max_reply_tokens=128, challenging=True))
    p, h, r = [make_profile("empathy")], [history()], [EN_CASES["empathy"][0]]
    assert strict.evaluate(p, h, r).raw[0] < user.evaluate(p, h, r).raw[0]


def test_deterministic_and_batch_independent(user: ReferenceUser):
    profiles, replies, hists = [], [], []
    for k, (intention, (good, bad)) in enumerate(EN_CASES.items()):
        profiles += [make_profile(intention, PERSONALITIES[k % 3], pid=f"p{k}")] * 2
        replies += [good, bad]
        hists += [history(previous=bad), history()]
    replies[15] = " ".join(replies[14:16] * 2)  # a long row: the batch pads to T = 256
    first = user.evaluate(profiles, hists, replies)
    again = user.evaluate(profiles, hists, replies)
    np.testing.assert_array_equal(first.change, again.change)
    np.testing.assert_array_equal(first.raw, again.raw)
    for i in (0, 5, 11, 15):  # alone: other rows, smaller padded shapes; same result
        alone = user.evaluate(profiles[i : i + 1], hists[i : i + 1], replies[i : i + 1])
        assert alone.change[0] == first.change[i]
        np.testing.assert_allclose(alone.raw[0], first.raw[i], rtol=1e-6, atol=1e-6)
    order = list(reversed(range(len(replies))))
    perm = user.evaluate(
        [profiles[i] for i in order], [hists[i] for i in order], [replies[i] for i in order]
    )
    np.testing.assert_array_equal(perm.change, first.change[order])


def test_changes_always_within_bounds(tok: Tokenizer, user: ReferenceUser, tmp_path):
    rng = np.random.default_rng(0)
    lex = load_lexicon("en")
    replies = [
        " ".join(lex["dismissive"][:12]),
        " ".join(lex["empathy"][:8] + lex["listening"][:6]),
    ]
    replies += [tok.decode(rng.integers(0, tok.vocab_size, rng.integers(0, 80))) for _ in range(14)]
    profiles = [
        make_profile(INTENTIONS[k % 8], PERSONALITIES[k % 3], pid=str(k)) for k in range(16)
    ]
    profiles[0] = make_profile("empathy", "negative")
    profiles[1] = make_profile("empathy", "passive")
    for u in (
        user,
        ReferenceUser(tok, ReferenceUserConfig(challenging=True, max_reply_tokens=128)),
    ):
        changes = u.judge(profiles, [history()] * 16, replies, None, np.full(16, 50))
        assert changes.dtype == np.int32 and changes.min() >= -10 and changes.max() <= 10
        assert changes[0] == -10
    weights = tmp_path / "w.yaml"
    weights.write_text("skill_weights:\n  empathy: {empathy: 100}\n")
    big = ReferenceUser(tok, ReferenceUserConfig(weights_path=str(weights), max_reply_tokens=128))
    assert big.judge(profiles[:2], [history()] * 2, replies[1:3], None, np.zeros(2))[0] == 10
    weights.write_text("skill_weights:\n  empathy: {kindness: 1}\n")
    with pytest.raises(ValueError, match="kindness"):
        load_weights(weights)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_messages(user: ReferenceUser, language: str):
    assert isinstance(user, SimulatedUser)
    profiles = [make_profile(language=language, pid=f"id{k}") for k in range(5)]
    hist = [history(language)] * 5
    scores = np.array([100, 5, 80, 50, 20])  # S, F, A, B, C
    for turn in range(4):
        msgs = user.reply(profiles, hist, scores, turn)
        assert msgs == user.reply(profiles, hist, scores, [turn] * 5)  # deterministic
        user.set_seed(turn + 1)  # the Protocol's seed: a no-op for this user
        assert msgs == user.reply(profiles, hist, scores, turn)
        said_bye = [detect_goodbye(m, language) for m in msgs]
        assert said_bye == [True, True, False, False, False], msgs
        assert not any("{" in m for m in msgs)
    assert profile_name(profiles[0]) == ("Alex" if language == "en" else "王小云")
    with_first = make_profile(language=language, first_talk="My cat ran away.")
    openings = user.opening([with_first, profiles[0]])
    assert (
        openings[0] == "My cat ran away." and openings[1] in message_templates(language)["opening"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("language", ["en", "zh"])
def test_good_and_bad_replies_with_smollm2_tokenizer(language: str):
    """The same cases with a real 49k-vocab BPE (SmolLM2's, from its GGUF; ~10 s to load)."""
    from rlver_jax.model_io import default_model

    try:
        path = default_model.smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    real = ReferenceUser(Tokenizer.from_gguf(path), ReferenceUserConfig(max_reply_tokens=128))
    test_good_reply_up_bad_reply_down_for_each_intention(real, language)


def test_turn_validation():
    with pytest.raises(ValueError, match="role"):
        Turn("system", "hi")  # type: ignore[arg-type]
