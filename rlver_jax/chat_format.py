"""Chat-template pieces as token ids, so dialogues are built by concatenation, never re-tokenised.

Why: RLVER trained on the re-tokenised text of decoded replies, so the trained ids could differ
from the sampled ones (a small off-policy mismatch; spec §3). Here the learner trains on exactly
the ids the sampler produced, and the sampler's prompt is exactly the prefix of the training
sample. Both follow from building every sequence as a concatenation of pieces:

    [header(role) + content + footer(role)] for context messages,
    [generation prompt + forced prefix + sampled ids + closing] for generated assistant turns.

The pieces are read off the tokenizer's own chat template: the template is rendered with unique
sentinel contents, one message more at a time, and each new stretch of text is split around its
sentinel into the role's header and footer. This works for any template that renders a chat as a
concatenation of per-message blocks (ChatML/Qwen, Llama 3, SmolLM2, ...); a template that is not
(one that rewrites earlier messages, reorders them, or drops the content) raises
`ChatFormatError` saying which check failed.

Each piece is encoded on its own (`Tokenizer.encode`), so at a piece boundary the ids can differ
from encoding the whole rendered string. That is harmless for RL (sampler and learner see the
same ids) and, for ChatML, the boundaries sit next to special tokens and newlines, where the two
agree (tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from rlver_jax.model_io.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Unlikely to occur in a template and free of whitespace (templates that trim content keep it).
_SENTINEL = "@@RLVER-SENTINEL-{}@@"


class ChatFormatError(ValueError):
    """The chat template cannot be split into per-message pieces (the message says why)."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Token-id pieces of a chat template, plus the tokenizer to encode message contents.

    headers / footers:  per role, the template ids before / after a message's content.
    generation_prompt:  the ids the template appends with `add_generation_prompt=True` (for
                        ChatML the assistant header `<|im_start|>assistant\\n`).
    end_of_turn:        the leading ids of the assistant footer that the policy generates itself
                        (stop tokens, e.g. `<|im_end|>`): trained like any sampled id.
    after_turn:         the rest of the assistant footer (e.g. the newline after `<|im_end|>`):
                        template, never trained.
    """

    tokenizer: Tokenizer
    headers: dict[str, tuple[int, ...]]
    footers: dict[str, tuple[int, ...]]
    generation_prompt: tuple[int, ...]
    end_of_turn: tuple[int, ...]
    after_turn: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> ChatFormat:
        """Derive the pieces from `tok.chat_template` (see the module docstring)."""
        texts = derive_template_texts(tok)
        headers = {r: tuple(tok.encode(texts["header_" + r])) for r in ROLES}
        footers = {r: tuple(tok.encode(texts["footer_" + r])) for r in ROLES}
        footer = footers["assistant"]
        stops = set(tok.stop_token_ids)
        n_eot = 0
        while n_eot < len(footer) and footer[n_eot] in stops:
            n_eot += 1
        return cls(
            tokenizer=tok,
            headers=headers,
            footers=footers,
            generation_prompt=tuple(tok.encode(texts["generation_prompt"])),
            end_of_turn=footer[:n_eot],
            after_turn=footer[n_eot:],
        )

    def encode(self, text: str) -> list[int]:
        """Content ids of `text` (no special tokens added)."""
        return self.tokenizer.encode(text)

    def generation_prompt_ids(self) -> list[int]:
        """What the sampler is given after the history to start an assistant turn."""
        return list(self.generation_prompt)

    def closing_ids(self, sampled_ids: Sequence[int]) -> list[int]:
        """Template ids that close a generated assistant turn before the next message.

        If the policy ended its turn with the end-of-turn ids (the normal case), only the rest of
        the footer follows. Otherwise (cut at the length limit, or stopped on another stop token
        such as `<|endoftext|>`), the whole footer is appended as template, so the next turn's
        context has the same shape as a normally closed turn.
        """
        eot = self.end_of_turn
        if eot and tuple(sampled_ids[-len(eot) :]) == eot:
            return list(self.after_turn)
        return list(eot + self.after_turn)

    def message_ids(
        self,
        role: str,
        content_ids: Sequence[int],
        *,
        generated: bool | None = None,
        prefix_ids: Sequence[int] = (),
    ) -> tuple[list[int], list[bool]]:
        """Ids and loss mask of one message.

        generated (default: role == "assistant"): `content_ids` are the policy's sampled ids,
        including the end-of-turn token it generated. They get mask 1; the layout is
        generation prompt + `prefix_ids` (forced, e.g. `<think>\\n`, mask 0) + sampled ids +
        `closing_ids` (mask 0). Otherwise the message is context: header + content + footer,
        mask 0 throughout (e.g. user turns, or an assistant turn re-encoded from its visible
        text).
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if generated is None:
            generated = role == "assistant"
        content = list(content_ids)
        if generated:
            if role != "assistant":
                raise ValueError(f"only assistant messages are generated, got role={role!r}")
            head = [*self.generation_prompt, *prefix_ids]
            tail = self.closing_ids(content)
            ids = head + content + tail
            mask = [False] * len(head) + [True] * len(content) + [False] * len(tail)
            return ids, mask
        if prefix_ids:
            raise ValueError("prefix_ids is only for generated assistant messages")
        ids = [*self.headers[role], *content, *self.footers[role]]
        return ids, [False] * len(ids)


def derive_template_texts(tok: Tokenizer) -> dict[str, str]:
    """Split the chat template into per-role header/footer strings and the generation prompt.

    Renders [system, user, assistant, user, assistant, user] with unique sentinel contents,
    one message more at a time. Each rendering must extend the previous one (the template
    concatenates messages); the new stretch must hold exactly its own sentinel; every role must
    get the same header and footer each time it occurs. The system piece's header also holds
    whatever the template emits first (e.g. a BOS token), which is right because every RLVER
    dialogue starts with a system prompt.
    """
    if not tok.chat_template:
        raise ChatFormatError("the tokenizer has no chat template")
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    msgs = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]

    def render(k: int, gen: bool) -> str:
        try:
            return tok.render_chat(msgs[:k], add_generation_prompt=gen)
        except Exception as err:  # jinja errors, e.g. "System role not supported"
            raise ChatFormatError(
                f"the chat template failed to render {[m['role'] for m in msgs[:k]]}: {err}"
            ) from None

    pieces: dict[str, set[tuple[str, str]]] = {r: set() for r in ROLES}
    prev = ""
    for k, role in enumerate(roles, start=1):
        cur = render(k, gen=False)
        if not cur.startswith(prev):
            raise ChatFormatError(
                "the chat template is not a concatenation of messages: rendering message "
                f"{k} ({role}) changed the text of the earlier messages"
            )
        piece = cur[len(prev) :]
        sentinel = msgs[k - 1]["content"]
        if piece.count(sentinel) != 1 or any(
            m["content"] in piece for m in msgs if m is not msgs[k - 1]
        ):
            raise ChatFormatError(
                f"the chat template's text for message {k} ({role}) does not hold its content "
                "exactly once (the template rewrites or drops message contents)"
            )
        head, foot = piece.split(sentinel)
        pieces[role].add((head, foot))
        prev = cur
    texts: dict[str, str] = {}
    for role in ROLES:
        if role != "system" and len(pieces[role]) != 1:
            raise ChatFormatError(
                f"the chat template renders {role} messages with different headers/footers "
                f"at different positions: {sorted(pieces[role])}"
            )
        (head, foot) = next(iter(pieces[role]))
        texts["header_" + role], texts["footer_" + role] = head, foot
    gens = set()
    for k in (2, 4, 6):
        base, with_gen = render(k, gen=False), render(k, gen=True)
        if not with_gen.startswith(base):
            raise ChatFormatError(
                "the chat template changes the history when add_generation_prompt=True"
            )
        gens.add(with_gen[len(base) :])
    if len(gens) != 1:
        raise ChatFormatError(f"the generation prompt depends on the history: {sorted(gens)}")
    texts["generation_prompt"] = gens.pop()
    if not texts["generation_prompt"]:
        raise ChatFormatError("the chat template adds no generation prompt")
    return texts
