"""Tests of the LLM-played simulated user (`env/llm_user.py`, `env/llm_judge.py`).

A tiny RANDOM decoder (vocabulary matched to `Tokenizer.tiny()`) plays the user. Its weights are
drawn with a large std so that its distributions are peaked and the 21 candidate scores are well
separated, which makes the exact argmax comparison meaningful. Model-running tests use compact
judge/reply templates (same placeholders and endings as the real ones) so that prompts fit a
512-token bucket; the real templates are checked as text. The SmolLM2 test is opt-in (slow).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from rlver_jax.env import llm_judge, llm_user
from rlver_jax.env.dynamics import detect_goodbye
from rlver_jax.env.llm_judge import (
    CANDIDATE_CHANGES,
    build_candidate_table,
    changes_from_scores,
    judge_prompt_text,
)
from rlver_jax.env.llm_user import LLMUser, LLMUserConfig, clean_reply
from rlver_jax.env.profiles import Profile
from rlver_jax.env.user import SimulatedUser, Turn
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import forward, init_params, positions_from_mask
from rlver_jax.parallel.compile_count import count_compiles
from rlver_jax.sampling.sampler import SampleOutput
from rlver_jax.scaffold import load_prompts

PERSONA = "- Name: Anna Lee\n- Age: 29\n- Job: teacher"
SCENE = "Her best friend forgot her birthday party."
THOUGHT = "SECRET-PLAN she is sad so flatter her"

SHORT = {
    "user_judge": "Persona: {persona}\nScene: {scene}\nGoal: {intention}\n"
    "Mood: {emotion}. {band_description}\n{history}\nThem now: {reply}\n"
    "Emotion change (-10 to 10): ",
    "user_reply": "Persona: {persona}\nScene: {scene}\nGoal: {intention}\n"
    "Mood: {emotion} ({band}). {band_description}\n{history}\nYour next message:",
    "user_opening": "Persona: {persona}\nScene: {scene}\nGoal: {intention}\n"
    "Mood: {emotion}. {band_description}\nYour first message:",
}


def make_profile(pid: str = "p0", language: str = "en", first_talk: str | None = None) -> Profile:
    return Profile(
        id=pid,
        persona=PERSONA if language == "en" else "- 姓名：王丽\n- 年龄：29",
        scene=SCENE if language == "en" else "好朋友忘了她的生日聚会。",
        personality="negative",
        traits=("a", "b", "c"),
        intention="empathy",
        language=language,  # type: ignore[arg-type]
        first_talk=first_talk,
    )


def dialogue(n_pairs: int, think: bool = False) -> list[Turn]:
    """Opening plus n (assistant, user) pairs; assistant turns may carry a thought."""
    turns = [Turn("user", "My friend forgot my birthday.")]
    for i in range(n_pairs):
        said = f"That must hurt, number {i}."
        text = f"<think>{THOUGHT}</think>{said}" if think else said
        turns += [Turn("assistant", text), Turn("user", f"Yes, it does {i}.")]
    return turns


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> tuple[Any, ModelConfig]:
    config = ModelConfig(
        family="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    # unsafe_rbg: the same random init, several times faster to compile than threefry on CPU.
    return init_params(config, jax.random.key(0, impl="unsafe_rbg"), std=0.5), config


@pytest.fixture
def short_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact templates for the model-running tests (prompts of 250-450 tiny-tokenizer ids)."""

    def patched(language: str) -> dict[str, Any]:
        return {**load_prompts(language), **SHORT}

    monkeypatch.setattr(llm_judge, "load_prompts", patched)
    monkeypatch.setattr(llm_user, "load_prompts", patched)


@pytest.fixture(scope="module")
def user(model: tuple[Any, ModelConfig], tok: Tokenizer) -> LLMUser:
    """The tiny user; use it together with `short_prompts`."""
    params, config = model
    cfg = LLMUserConfig(prompt_buckets=(512,), max_reply_tokens=12, seed=3)
    return LLMUser(params, config, tok, cfg)


def judge_batch() -> tuple[list[Profile], list[list[Turn]], list[str], np.ndarray]:
    """Four dialogues of different lengths (the prompts are left-padded differently)."""
    profiles = [make_profile(f"p{i}") for i in range(4)]
    histories = [dialogue(n) for n in (0, 2, 1, 4)]
    replies = ["I am so sorry.", "Whatever.", "Tell me more about it?", "You should relax."]
    return profiles, histories, replies, np.asarray([30, 45, 12, 71])


def reference_scores(
    params: Any, config: ModelConfig, prompts: list[list[int]], table: Any
) -> np.ndarray:
    """Independent scores: per (prompt, candidate) the full sequence prompt + candidate in one
    plain forward (no cache, no left padding; rows right-padded to one shape), then the sum of
    the candidate tokens' log-probs and the log total probability of the terminator set."""
    K = len(table.ids)
    seqs = [p + list(c) for p in prompts for c in table.ids]
    L = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), L), np.int32)
    mask = np.zeros((len(seqs), L), bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, True

    @jax.jit
    def logprobs(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        logits, _ = forward(params, tokens, positions_from_mask(mask), mask, config)
        return jax.nn.log_softmax(logits, axis=-1)

    lp = np.asarray(logprobs(params, tokens, mask), np.float64)
    out = np.zeros((len(prompts), K))
    terms = list(table.terminators)
    for b, p in enumerate(prompts):
        n = len(p)
        for k, cand in enumerate(table.ids):
            row = lp[b * K + k]
            total = sum(row[n - 1 + j, t] for j, t in enumerate(cand))
            last = row[n + len(cand) - 1, terms]
            out[b, k] = total + np.log(np.sum(np.exp(last - last.max()))) + last.max()
    return out


# --------------------------------------------------------------------------- config & text
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("language", "fr"),
        ("judge_mode", "mode"),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("max_reply_tokens", 0),
        ("prompt_buckets", (100, 200)),
        ("prompt_buckets", (512, 256)),
        ("judge_batch_buckets", ()),
        ("answer_prefix", "Change: "),
        ("opening_emotion", 101),
        ("challenging", "yes"),
    ],
)
def test_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"LLMUserConfig\.{field}"):
        LLMUserConfig(**{field: value})


def test_judge_prompt_content_real_template() -> None:
    profile = make_profile()
    history = dialogue(2, think=True)
    reply = f"<think>{THOUGHT}</think>I hear you, that is a painful thing."
    text = judge_prompt_text(profile, history, reply, 30, language="en")
    prompts = load_prompts("en")
    assert PERSONA in text and SCENE in text
    assert "Your emotion score is 30 out of 100" in text
    assert prompts["bands"]["C"] in text
    assert "I hear you, that is a painful thing." in text
    assert "Me: My friend forgot my birthday." in text
    assert "Them: That must hurt, number 1." in text
    assert THOUGHT not in text and "<think>" not in text
    assert "empathise with your feelings" in text  # the hidden intention, second person
    assert text.endswith("Emotion change (-10 to 10): ")
    assert prompts["user_challenging_addendum"] not in text
    hard = judge_prompt_text(profile, history, reply, 30, language="en", challenging=True)
    assert prompts["user_challenging_addendum"] in hard and hard.endswith(text[-40:])

    zh = judge_prompt_text(make_profile(language="zh"), history[:1], "我懂你。", 55, language="zh")
    assert "我：My friend forgot my birthday." in zh and "我懂你。" in zh
    assert "你希望对方深刻共情你的感受" in zh and load_prompts("zh")["bands"]["B"] in zh


def test_prompt_ids_real_template(model: tuple[Any, ModelConfig], tok: Tokenizer) -> None:
    params, config = model
    u = LLMUser(params, config, tok, LLMUserConfig(challenging=True))
    ids = u.judge_prompt_ids(make_profile(), dialogue(1, think=True), "Sorry to hear it.", 30)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith("Emotion change (-10 to 10): <|im_end|>\n<|im_start|>assistant\n")
    assert THOUGHT not in text and load_prompts("en")["user_challenging_addendum"] in text


def test_long_history_is_trimmed(model: tuple[Any, ModelConfig], tok: Tokenizer) -> None:
    params, config = model
    u = LLMUser(params, config, tok, LLMUserConfig(prompt_buckets=(2048,)))
    long = dialogue(60)
    ids = u.judge_prompt_ids(make_profile(), long, "Okay.", 30)
    assert len(ids) <= 2048 - u.table.width
    text = tok.decode(ids, skip_special_tokens=False)
    assert "(earlier messages omitted)" in text and "Yes, it does 59." in text
    assert "Them: That must hurt, number 0." not in text


def test_candidate_table(tok: Tokenizer) -> None:
    ctx = "<|im_start|>assistant\n"
    table = build_candidate_table(tok, ctx)
    assert table.changes == CANDIDATE_CHANGES and len(table.ids) == 21
    for text, ids in zip(table.texts, table.ids, strict=True):
        assert tok.decode(list(ids)) == text
        assert tok.encode(ctx + text) == tok.encode(ctx) + list(ids)
    assert set(tok.stop_token_ids) <= set(table.terminators)
    assert tok.encode("\n")[0] in table.terminators
    spaced = build_candidate_table(tok, ctx + "Change:")
    assert spaced.texts[0] == " -10" and spaced.texts[-1] == " 10"


def test_clean_reply() -> None:
    labels = ["Me", "Them", "Your next message", "我"]
    assert clean_reply('Me: "Fine, I guess."\nThem: ok', labels) == "Fine, I guess."
    assert clean_reply("\n\n**Your next message:** Me: whatever", labels) == "whatever"
    assert clean_reply("我：算了吧。", labels) == "算了吧。"
    assert clean_reply("  \n Me:  \n", labels) == ""
    assert clean_reply("Meanwhile: it rains", labels) == "Meanwhile: it rains"


def test_changes_from_scores_rounding() -> None:
    scores = np.log(np.eye(21)[[0, 20, 10]] + 1e-30)
    assert changes_from_scores(scores, "argmax").tolist() == [-10, 10, 0]
    half = np.full((1, 21), -np.inf)
    half[0, [10, 11]] = 0.0  # mean 0.5 -> 1 (half away from zero)
    assert changes_from_scores(half, "expectation").tolist() == [1]
    assert changes_from_scores(half[:, ::-1], "expectation").tolist() == [-1]  # -0.5 -> -1


# --------------------------------------------------------------------------- judging
def test_judge_matches_independent_forward(
    user: LLMUser, model: tuple[Any, ModelConfig], short_prompts: None
) -> None:
    params, config = model
    profiles, histories, replies, emotions = judge_batch()
    prompts = [
        user.judge_prompt_ids(p, h, r, int(e))
        for p, h, r, e in zip(profiles, histories, replies, emotions, strict=True)
    ]
    assert len({len(p) for p in prompts}) == 4  # really different lengths
    scores = user.judge_candidate_scores(profiles, histories, replies, emotions)
    ref = reference_scores(params, config, prompts, user.table)
    assert scores.shape == (4, 21) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref, atol=1e-4, rtol=0)
    top2 = np.sort(ref, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)  # argmax is well defined
    assert np.array_equal(np.argmax(scores, axis=1), np.argmax(ref, axis=1))

    changes = user.judge(profiles, histories, replies, None, emotions)
    assert changes.dtype == np.int32 and changes.shape == (4,)
    assert changes.tolist() == [CANDIDATE_CHANGES[k] for k in np.argmax(ref, axis=1)]
    assert np.all((changes >= -10) & (changes <= 10))

    # Expectation mode (same compiled program): the probability-weighted mean, in numpy.
    exp_user = LLMUser(params, config, user.tokenizer, LLMUserConfig(
        prompt_buckets=(512,), judge_mode="expectation"))  # fmt: skip
    p = np.exp(ref - ref.max(axis=1, keepdims=True))
    mean = (p / p.sum(axis=1, keepdims=True)) @ np.arange(-10, 11)
    want = np.sign(mean) * np.floor(np.abs(mean) + 0.5)
    got = exp_user.judge(profiles, histories, replies, None, emotions)
    assert got.tolist() == want.astype(int).tolist()
    assert np.all(np.abs(got) <= 10)


def test_judge_deterministic_row_independent_bounded_compiles(
    user: LLMUser, short_prompts: None
) -> None:
    profiles, histories, replies, emotions = judge_batch()
    first = user.judge(profiles, histories, replies, None, emotions)
    with count_compiles() as counter:
        again = user.judge(profiles, histories, replies, None, emotions)
        rev = user.judge(profiles[::-1], histories[::-1], replies[::-1], None, emotions[::-1])
        # other lengths in the same (batch, prompt) buckets
        other = user.judge(profiles[:3], [dialogue(3)] * 3, ["Hm."] * 3, None, emotions[:3])
    assert counter.count == 0, counter.names
    assert np.array_equal(first, again) and np.array_equal(first, rev[::-1])
    assert other.shape == (3,) and user.scorer.used_shapes == [(4, 512)]
    assert isinstance(user, SimulatedUser)


def test_judge_on_mesh_matches_single_device(
    user: LLMUser, model: tuple[Any, ModelConfig], tok: Tokenizer, short_prompts: None
) -> None:
    from rlver_jax.parallel.mesh import MeshConfig, make_mesh

    params, config = model
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    sharded = LLMUser(params, config, tok, user.config, mesh=mesh)
    assert sharded.params["embed"].sharding.mesh.shape["fsdp"] == 2
    profiles, histories, replies, emotions = judge_batch()
    want = user.judge_candidate_scores(profiles, histories, replies, emotions)
    got = sharded.judge_candidate_scores(profiles, histories, replies, emotions)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.array_equal(np.argmax(got, axis=1), np.argmax(want, axis=1))


# --------------------------------------------------------------------------- messages
class SpySampler:
    """Records every call; returns the given texts (encoded, + <|im_end|>) as samples."""

    def __init__(self, tok: Tokenizer, texts: list[str]) -> None:
        self.tok, self.texts, self.calls = tok, texts, []

    def __call__(self, params: Any, prompts: Any, **kwargs: Any) -> SampleOutput:
        self.calls.append((params, [list(p) for p in prompts], kwargs))
        rows = [[*self.tok.encode(t), self.tok.hf.eos_token_id] for t in self.texts[: len(prompts)]]
        N = max(len(r) for r in rows)
        tokens = np.zeros((len(rows), N), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        lengths = np.asarray([len(r) for r in rows], np.int32)
        zeros = np.zeros(len(rows), np.int8)
        return SampleOutput(tokens, np.zeros(tokens.shape, np.float32), lengths, zeros)


def test_reply_uses_sampler_with_user_model(
    model: tuple[Any, ModelConfig], tok: Tokenizer, short_prompts: None
) -> None:
    params, config = model
    texts = ['Them: "I guess you are right."\nMe: more', "", "Fine, whatever."]
    spy = SpySampler(tok, texts)
    u = LLMUser(params, config, tok, LLMUserConfig(seed=5, temperature=0.9), sampler=spy)  # type: ignore[arg-type]
    profiles = [make_profile(f"p{i}") for i in range(3)]
    histories = [dialogue(1, think=True) for _ in range(3)]
    out = u.reply(profiles, histories, np.asarray([50, 40, 5]), 1)
    assert out[0] == "I guess you are right."
    assert out[1] and u.fallbacks == 1  # empty sample -> canned line of band B
    assert out[2].startswith("Fine, whatever.") and "Bye" in out[2]  # band F: goodbye added
    params_seen, prompts_seen, kwargs = spy.calls[0]
    assert params_seen is u.params
    assert prompts_seen == [u.reply_prompt_ids(p, h, e) for p, h, e in
                            zip(profiles, histories, [50, 40, 5], strict=True)]  # fmt: skip
    assert kwargs["temperature"] == 0.9 and kwargs["max_new_tokens"] == 64
    assert all(THOUGHT not in tok.decode(p) for p in prompts_seen)
    u.reply(profiles, histories, np.asarray([50, 40, 5]), 1)
    u.reply(profiles, histories, np.asarray([50, 40, 5]), 2)
    seeds = [c[2]["seed"] for c in spy.calls]
    assert seeds[0] == seeds[1] != seeds[2]
    u.set_seed(6)
    u.reply(profiles, histories, np.asarray([50, 40, 5]), 1)
    assert spy.calls[-1][2]["seed"] != seeds[0]


def test_reply_and_opening_with_real_sampler(user: LLMUser, short_prompts: None) -> None:
    profiles = [make_profile("a"), make_profile("b")]
    histories = [dialogue(1), dialogue(2)]
    first = user.reply(profiles, histories, np.asarray([30, 100]), 1)
    again = user.reply(profiles, histories, np.asarray([30, 100]), 1)
    assert first == again
    assert all(isinstance(t, str) and t.strip() for t in first)
    assert "\n" not in first[0] and detect_goodbye(first[1], "en")  # band S: goodbye
    fixed = user.opening([make_profile("c", first_talk="Hi, got a minute?")])
    assert fixed == ["Hi, got a minute?"]
    sampled = user.opening([make_profile("d"), make_profile("e", first_talk="Hey.")])
    assert sampled[1] == "Hey." and sampled[0].strip()


# --------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_judges_kind_vs_rude() -> None:
    from rlver_jax.model_io.default_model import load_default_model

    params, config, tok = load_default_model()
    u = LLMUser(params, config, tok)
    profile = make_profile("smol")
    history = [Turn("user", "My best friend forgot my birthday party. I waited all evening.")]
    kind = (
        "Oh no, waiting all evening for someone you love and they never came... that must have "
        "really hurt. I'm so sorry. Do you want to tell me how the evening went?"
    )
    rude = "Stop whining, nobody cares about your stupid birthday. Grow up."
    scores = u.judge_candidate_scores([profile] * 2, [history] * 2, [kind, rude], [30, 30])
    changes = u.judge([profile] * 2, [history] * 2, [kind, rude], None, np.asarray([30, 30]))
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    mean = probs @ np.arange(-10, 11)
    print(f"\nSmolLM2 judge: kind -> {changes[0]:+d}, rude -> {changes[1]:+d}; "
          f"expected change kind {mean[0]:+.2f}, rude {mean[1]:+.2f}")  # fmt: skip
    assert np.all(np.abs(changes) <= 10)
    reply = u.reply([profile], [[*history, Turn("assistant", kind)]], np.asarray([35]), 1)
    print(f"SmolLM2 user reply: {reply[0]!r}")
    assert reply[0].strip()
