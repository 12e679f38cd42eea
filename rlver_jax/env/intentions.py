"""The eight hidden intentions and three personality types of RLVER's user profiles.

RLVER's profiles store both as Chinese free text (`task`, `main_cha`). The project works with
short canonical keys; this module is the one place that maps between the two. The English
profile set stores the keys directly.
"""

from __future__ import annotations

INTENTIONS: tuple[str, ...] = (
    "validation",  # wants the listener to agree they bore no fault
    "reflection",  # wants to be guided to reflect on themselves and grow
    "analysis",  # wants a dialectical, balanced analysis of the problem
    "empathy",  # wants deep empathy with their feelings, not plain comfort
    "listening",  # wants to be listened to while venting
    "insight_into_others",  # wants to understand why the other people acted as they did
    "solutions",  # wants advice that really helps with the current predicament
    "praise",  # wants sincere praise for specific things they did
)

INTENTION_DESCRIPTIONS_EN: dict[str, str] = {
    "validation": "You believe you bore no responsibility or fault in what happened, and you want "
    "the other person to agree that you did nothing wrong.",
    "reflection": "You want the other person to guide you to reflect on yourself and grow from "
    "what happened.",
    "analysis": "You want the other person to analyse the problems in what happened in a "
    "balanced, dialectical way.",
    "empathy": "You want the other person to deeply empathise with your feelings, not just "
    "comfort you.",
    "listening": "You want the other person to listen attentively while you vent your emotions.",
    "insight_into_others": "You want to understand why the other people in the story acted as "
    "they did.",
    "solutions": "You want advice that really helps you out of your current predicament.",
    "praise": "You want the other person to sincerely praise specific things you did.",
}

# RLVER's `task` strings (Chinese) -> canonical keys.
INTENTION_FROM_ZH: dict[str, str] = {
    "你认为自己在事件中没有任何责任和错误，你想要对方也认同你没有错": "validation",
    "你希望对方引导你针对事件进行自我反思，收获自我成长": "reflection",
    "你希望对方辩证地分析事件中的问题": "analysis",
    "你希望对方深刻共情你的感受，而不是简单的安慰": "empathy",
    "你希望对方用心倾听你的情绪宣泄": "listening",
    "你想分析事件中其他人物这么做的原因": "insight_into_others",
    "你想获得能真实帮助你解决当下困境的建议": "solutions",
    "你希望对方真诚地夸奖你在事件中的具体行为": "praise",
}

PERSONALITIES: tuple[str, ...] = ("negative", "passive", "avoidant")

PERSONALITY_FROM_ZH: dict[str, str] = {
    "负面型": "negative",
    "被动型": "passive",
    "回避型": "avoidant",
}


def _canonical(
    value: str, keys: tuple[str, ...], from_zh: dict[str, str], what: str, zh: str
) -> str:
    """`value` if it is one of `keys`, else the key of its Chinese text in `from_zh`."""
    if value in keys:
        return value
    try:
        return from_zh[value.strip()]
    except KeyError:
        raise ValueError(
            f"unknown {what} {value!r}: expected one of {keys} or one of {zh}"
        ) from None


def intention_key(task: str) -> str:
    """Canonical key of a profile's `task` field (a key already, or RLVER's Chinese text)."""
    zh = "RLVER's eight Chinese task strings"
    return _canonical(task, INTENTIONS, INTENTION_FROM_ZH, "hidden intention", zh)


def personality_key(main_cha: str) -> str:
    """Canonical key of a profile's `main_cha` field (a key already, or RLVER's Chinese text)."""
    zh = "负面型 / 被动型 / 回避型"
    return _canonical(main_cha, PERSONALITIES, PERSONALITY_FROM_ZH, "personality type", zh)
