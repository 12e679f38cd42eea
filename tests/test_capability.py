"""Tests of the five-dimension capability judges and the bootstrap intervals (`eval/capability.py`,
`eval/stats.py`).

The LLM judge runs on a tiny RANDOM decoder with the tiny tokenizer (weights drawn with a large
std so that the five candidate scores are well separated) and a compact rubric with the real
placeholders and ending, so prompts fit one 512-token bucket. Its scores are checked against an
independent computation: for each candidate "1".."5" a plain `transformer.forward` over the whole
prompt + candidate (no cache, no left padding), summing the candidate's log-probs and the log of
the terminator set's total probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from rlver_jax.eval.capability import (
    CANDIDATE_SCORES,
    DIMENSIONS,
    Dimension,
    LLMCapabilityJudge,
    ReferenceCapabilityJudge,
    Rubric,
    format_dialogue,
    load_rubric,
    scores_from_logprobs,
    summarize_scores,
)
from rlver_jax.eval.report import radar_chart
from rlver_jax.eval.stats import bootstrap_ci, bootstrap_diff_ci
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import forward, init_params, positions_from_mask

THOUGHT = "SECRET-PLAN flatter them"


def transcript(pairs: list[tuple[str, str]], dialogue_id: int = 0) -> dict[str, Any]:
    """A rollout-style transcript from (user message, policy reply) pairs."""
    messages: list[dict[str, Any]] = []
    for i, (user, reply) in enumerate(pairs):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply, "thought": THOUGHT,
                         "format_ok": True, "emotion_after": 40 + i, "change": 1})  # fmt: skip
    return {"dialogue_id": dialogue_id, "profile_id": f"p{dialogue_id}", "messages": messages,
            "emotions": [40] + [40 + i for i in range(len(pairs))]}  # fmt: skip


def compact_rubric() -> Rubric:
    dims = tuple(
        Dimension(key, f"Dim {i}", f"desc {i}", tuple(f"level {k}" for k in range(1, 6)))
        for i, key in enumerate(DIMENSIONS)
    )
    prompt = "Rate {dimension_name}: {description}\n{levels}\n{dialogue}\nScore (1-5): "
    return Rubric("en", dims, prompt)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> tuple[Any, ModelConfig]:
    config = ModelConfig(
        family="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    return init_params(config, jax.random.key(1, impl="unsafe_rbg"), std=0.5), config


@pytest.fixture(scope="module")
def judge(model: tuple[Any, ModelConfig], tok: Tokenizer) -> LLMCapabilityJudge:
    params, config = model
    return LLMCapabilityJudge(
        params, config, tok, rubric=compact_rubric(), prompt_buckets=(512,), batch_buckets=(4, 8)
    )


def dialogues() -> list[dict[str, Any]]:
    return [
        transcript([("My boss yelled at me.", "That sounds awful.")], 0),
        transcript(
            [
                ("I failed the exam.", "Oh no."),
                ("Yes.", "You could retake it."),
                ("Maybe.", "What do you think?"),
            ],
            1,
        ),
        transcript([("Hi.", "Hello, tell me more.")] * 2, 2),
    ]


# --------------------------------------------------------------------------- rubric
@pytest.mark.parametrize("language", ["en", "zh"])
def test_packaged_rubrics(language: str) -> None:
    rubric = load_rubric(language)
    assert tuple(d.key for d in rubric.dimensions) == DIMENSIONS
    assert all(len(d.levels) == 5 for d in rubric.dimensions)
    text = rubric.render(2, format_dialogue(transcript([("a", "b")])["messages"], language))
    assert text.endswith("Score (1-5): ")
    assert rubric.dimensions[2].name in text and rubric.dimensions[2].levels[4] in text
    assert ("5: " if language == "en" else "5：") in text
    if language == "en":
        assert list(rubric.names.values()) == [
            "Empathic Depth", "Core Insight", "Solution Crafting", "Dialogue Guidance",
            "Style Adaptability",
        ]  # fmt: skip


def test_format_dialogue_shows_visible_text_only() -> None:
    t = transcript([("I feel  bad.", "I hear you.\nReally.")])
    text = format_dialogue(t["messages"], "en")
    assert text == "User: I feel bad.\nAI: I hear you. Really."
    assert THOUGHT not in text
    assert format_dialogue(t["messages"], "zh", omitted=True).startswith(
        "（更早的对话已省略）\n用户："
    )


def test_scores_from_logprobs() -> None:
    lp = np.log(np.asarray([[0.1, 0.2, 0.3, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0]]) + 1e-30)
    expected, argmax = scores_from_logprobs(lp + 5.0)  # unnormalised log-probs are fine
    np.testing.assert_allclose(expected, [0.1 + 0.4 + 0.9 + 0.8 + 1.0, 5.0], atol=1e-9)
    assert argmax.tolist() == [3, 5]
    assert scores_from_logprobs(np.zeros((1, 5)))[1].tolist() == [1]  # first on ties


# --------------------------------------------------------------------------- LLM judge
def independent_logprobs(
    params: Any, config: ModelConfig, tok: Tokenizer, prompts: list[list[int]], terms: list[int]
) -> np.ndarray:
    """[len(prompts), 5] log p(candidate k, then a terminator | prompt): per (prompt, candidate)
    the whole sequence prompt + candidate in a plain forward (no cache, no left padding; the
    rows right-padded into one batch), candidate ids from encoding the prompt text + the digit."""
    seqs, spans = [], []
    for prompt in prompts:
        text = tok.decode(prompt, skip_special_tokens=False)
        for k in CANDIDATE_SCORES:
            full = tok.encode(text + str(k))
            assert full[: len(prompt)] == prompt
            seqs.append(full)
            spans.append((len(prompt), len(full)))
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, True

    @jax.jit
    def logprobs(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        logits, _ = forward(params, tokens, positions_from_mask(mask), mask, config)
        return jax.nn.log_softmax(logits.astype(np.float32), axis=-1)

    lp = np.asarray(logprobs(params, tokens, mask), np.float64)
    out = np.zeros(len(seqs))
    for i, ((n, end), s) in enumerate(zip(spans, seqs, strict=True)):
        total = sum(lp[i, j - 1, s[j]] for j in range(n, end))
        last = lp[i, end - 1, terms]
        out[i] = total + np.log(np.exp(last - last.max()).sum()) + last.max()
    return out.reshape(len(prompts), len(CANDIDATE_SCORES))


def test_llm_judge_matches_independent_forward(
    judge: LLMCapabilityJudge, model: tuple[Any, ModelConfig], tok: Tokenizer
) -> None:
    params, config = model
    ts = dialogues()
    terms = list(judge.table.terminators)
    assert set(tok.stop_token_ids) <= set(terms)
    logprobs = judge.candidate_logprobs(ts)
    assert logprobs.shape == (3, 5, 5) and logprobs.dtype == np.float32
    prompts = [judge.prompt_ids(t["messages"], i) for t in ts for i in range(5)]
    for n, prompt in enumerate(prompts):
        text = tok.decode(prompt, skip_special_tokens=False)
        assert f"Rate Dim {n % 5}:" in text and THOUGHT not in text
        assert text.endswith("Score (1-5): <|im_end|>\n<|im_start|>assistant\n")
    assert len({len(p) for p in prompts}) >= 3  # different lengths share one padded batch
    ref = independent_logprobs(params, config, tok, prompts, terms).reshape(3, 5, 5)
    np.testing.assert_allclose(logprobs, ref, atol=2e-4, rtol=0)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    assert np.all(top2[..., 1] - top2[..., 0] > 1e-3)  # argmax well defined

    scores = judge.score(ts)
    p = np.exp(ref - ref.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(scores.expected, p @ np.arange(1, 6), atol=1e-3)
    assert scores.argmax.tolist() == (np.argmax(ref, axis=-1) + 1).tolist()
    assert np.all((scores.expected >= 1) & (scores.expected <= 5))
    assert judge.scorer.used_shapes == [(8, 512)]  # 15 prompts: chunks of 8, one program


def test_llm_judge_trims_long_dialogues(judge: LLMCapabilityJudge, tok: Tokenizer) -> None:
    long = transcript([(f"Message number {i} is long.", f"Reply {i}.") for i in range(60)])
    ids = judge.prompt_ids(long["messages"], 0)
    text = tok.decode(ids, skip_special_tokens=False)
    assert len(ids) <= 512 - judge.table.width
    assert "(earlier messages omitted)" in text and "Reply 59." in text and "Reply 0." not in text


# --------------------------------------------------------------------------- reference judge
EMPATHIC = [
    ("My dog died last week.", "I'm so sorry. That sounds heartbreaking, and it must be so "
     "painful to come home to an empty house."),
    ("I keep crying.", "Of course you feel this way. I can imagine how much you miss him."),
    ("Everyone says get over it.", "That's hard. Your grief makes sense; it must feel lonely."),
]  # fmt: skip
SOLUTIONS = [
    ("My dog died last week.", "You could make a list of tasks for this week and start by "
     "sorting his things."),
    ("I keep crying.", "One option is to set a schedule: for example, a walk tomorrow morning."),
    ("Everyone says get over it.", "I'd suggest you talk to a counsellor; write down a plan."),
]  # fmt: skip
QUESTIONS = [
    ("My dog died last week.", "Tell me more about him? What was he like?"),
    ("He was old.", "How did you feel when it happened? What do you think helps?"),
]
FLAT = [("My dog died last week.", "Okay."), ("He was old.", "Okay.")]


@pytest.fixture(scope="module")
def ref_judge(tok: Tokenizer) -> ReferenceCapabilityJudge:
    return ReferenceCapabilityJudge(tok)


def test_reference_judge_is_monotonic(ref_judge: ReferenceCapabilityJudge) -> None:
    ts = [transcript(d, i) for i, d in enumerate([EMPATHIC, SOLUTIONS, QUESTIONS, FLAT])]
    s = ref_judge.score(ts)
    col = {d: i for i, d in enumerate(DIMENSIONS)}
    emp, sol, que, flat = s.expected
    assert emp[col["empathic_depth"]] > sol[col["empathic_depth"]] + 1.0
    assert sol[col["solution_crafting"]] > emp[col["solution_crafting"]] + 1.0
    assert que[col["dialogue_guidance"]] > flat[col["dialogue_guidance"]] + 1.0
    assert que[col["dialogue_guidance"]] > sol[col["dialogue_guidance"]]
    # repeating one short reply is the least adaptive style
    assert flat[col["style_adaptability"]] < min(emp[col["style_adaptability"]],
                                                 sol[col["style_adaptability"]])  # fmt: skip
    assert np.all((s.expected >= 1) & (s.expected <= 5))
    assert s.argmax.tolist() == np.floor(s.expected + 0.5).astype(int).tolist()
    again = ReferenceCapabilityJudge(ref_judge.tokenizer).score(ts[::-1])
    np.testing.assert_array_equal(again.expected[::-1], s.expected)  # deterministic, row-free


def test_reference_judge_empty_dialogue(ref_judge: ReferenceCapabilityJudge) -> None:
    empty = {"dialogue_id": 0, "messages": [{"role": "user", "content": "hi"}], "emotions": [40]}
    s = ref_judge.score([empty])
    assert s.expected.tolist() == [[1.0] * 5] and s.argmax.tolist() == [[1] * 5]
    assert s.records([7])[0] == {"dialogue_id": 7} | {d: 1.0 for d in DIMENSIONS} | {
        f"{d}_argmax": 1 for d in DIMENSIONS
    }


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    for n in (5, 30, 200):
        x = rng.uniform(0, 100, n)
        ci = bootstrap_ci(x, n_boot=500, seed=11)
        assert ci.lo <= x.mean() <= ci.hi and ci.mean == pytest.approx(x.mean())
        assert ci == bootstrap_ci(x, n_boot=500, seed=11)
        assert ci != bootstrap_ci(x, n_boot=500, seed=12)
        assert ci.n == n and ci.level == 0.95
    wide, narrow = bootstrap_ci(x, level=0.99), bootstrap_ci(x, level=0.5)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi
    const = bootstrap_ci([3.0] * 10)
    assert (const.lo, const.mean, const.hi) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=1.5)


def test_bootstrap_diff_ci() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.5, 40)
    b = a - 1.0 + rng.normal(0, 0.05, 40)  # paired: a clear, consistent gain of ~1
    paired = bootstrap_diff_ci(a, b, seed=1)
    unpaired = bootstrap_diff_ci(a, b, paired=False, seed=1)
    assert paired.lo <= paired.mean <= paired.hi and paired.lo > 0.9 and paired.hi < 1.1
    assert paired.mean == pytest.approx(unpaired.mean)
    assert unpaired.hi - unpaired.lo > paired.hi - paired.lo  # pairing removes profile noise
    zero = bootstrap_diff_ci(a, a)
    assert (zero.lo, zero.mean, zero.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal sizes"):
        bootstrap_diff_ci(a, b[:10])


def test_summarize_scores_and_radar(ref_judge: ReferenceCapabilityJudge, tmp_path: Path) -> None:
    import matplotlib.image

    ts = [transcript(EMPATHIC, 0), transcript(SOLUTIONS, 1), transcript(QUESTIONS, 2)]
    scores = ref_judge.score(ts)
    summary = summarize_scores(scores, n_boot=200, seed=0)
    assert list(summary) == list(DIMENSIONS)
    for i, d in enumerate(DIMENSIONS):
        assert summary[d]["mean"] == pytest.approx(scores.expected[:, i].mean())
        assert summary[d]["lo"] <= summary[d]["mean"] <= summary[d]["hi"]
    assert summary["empathic_depth"]["name"] == "Empathic Depth"
    models = {"think": scores.means(), "plain": {d: 2.0 for d in DIMENSIONS}}
    path = radar_chart(models, tmp_path / "radar.png", names=ref_judge.names)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3


@pytest.mark.slow
def test_smollm2_capability_judge_real_rubric() -> None:
    """SmolLM2-135M judges with the packaged rubric: one program per bucket, scores in [1, 5]
    (a 135M model is no reliable judge; the scores are printed, not asserted to order)."""
    from rlver_jax.model_io.default_model import load_default_model

    params, config, tok = load_default_model()
    j = LLMCapabilityJudge(params, config, tok, batch_buckets=(5,))
    ts = [transcript(EMPATHIC, 0), transcript(SOLUTIONS, 1)]
    scores = j.score(ts)
    print("\nSmolLM2 capability judge (expected scores):")
    for name, row in zip(("empathic", "solutions"), scores.expected, strict=True):
        values = {d.name: round(float(v), 2) for d, v in zip(j.rubric.dimensions, row, strict=True)}
        print(f"  {name:<10}", values)
    assert scores.expected.shape == (2, 5) and np.all(
        (scores.expected >= 1) & (scores.expected <= 5)
    )
    assert len(j.scorer.used_shapes) == 1
