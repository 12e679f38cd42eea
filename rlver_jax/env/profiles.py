"""Simulated-user profiles: the `Profile` record and a strict JSONL loader.

A profile is everything the user simulator is conditioned on: a persona, a scene, a personality
type, three trait words and a hidden intention (RLVER spec §1.1). Both profile sets (RLVER's
Chinese set and the project's English set) share RLVER's JSONL schema:

    id, player, scene, main_cha, cha_group, task [, first_talk]

The loader is deliberately strict. Profiles are read once at start-up, and a silently skipped or
mis-parsed record would change the training distribution (e.g. the intention mix of Table 5)
without anyone noticing. Every problem therefore raises `ProfileError` naming the file, the
1-based line number and the offending field, so a broken data file is fixed in one look.

This module has no heavy imports (no jax, no tensorflow-datasets) so that tools which only need
the profiles stay fast to start.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from rlver_jax.env.intentions import INTENTIONS, PERSONALITIES, intention_key, personality_key

Language = Literal["en", "zh"]
LANGUAGES: tuple[str, ...] = ("en", "zh")

# Profile set name -> (package data folder, language, file name per split).
PROFILE_SETS: dict[str, tuple[str, Language, dict[str, str]]] = {
    "rlver": ("rlver", "zh", {"train": "train_profile.jsonl", "test": "test_profile.jsonl"}),
    "en": ("en", "en", {"train": "train.jsonl", "test": "test.jsonl"}),
}
SPLITS: tuple[str, ...] = ("train", "test")

REQUIRED_FIELDS: tuple[str, ...] = ("id", "player", "scene", "main_cha", "cha_group", "task")
OPTIONAL_FIELDS: tuple[str, ...] = ("first_talk",)
NUM_TRAITS = 3


class ProfileError(ValueError):
    """A malformed profile record.

    The message always has the form ``FILE:LINE: field 'FIELD': what is wrong`` so that it can
    be pasted into an editor; the parts are also kept as attributes for programmatic use.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, field: str, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(f"{self.path}:{line}: field {field!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class Profile:
    """One simulated user.

    Attributes:
      id: the record's unique id (a UUID in RLVER's files).
      persona: the `player` text (name, age, job, hobbies, speaking style).
      scene: the background story; RLVER's scenes end with the hidden-theme marker.
      personality: canonical personality key (one of `intentions.PERSONALITIES`).
      traits: the three `cha_group` trait words, in file order.
      intention: canonical hidden-intention key (one of `intentions.INTENTIONS`).
      language: "zh" for RLVER's set, "en" for the English set; picks prompts and goodbye words.
      first_talk: the fixed opening line (benchmark/test profiles only); None for training
        profiles, where the simulator writes its own opening.
    """

    id: str
    persona: str
    scene: str
    personality: str
    traits: tuple[str, ...]
    intention: str
    language: Language
    first_talk: str | None = None

    def __post_init__(self) -> None:
        # Cheap invariants for profiles built in code (the loader has already checked these).
        if self.intention not in INTENTIONS:
            raise ValueError(f"Profile.intention: unknown key {self.intention!r}")
        if self.personality not in PERSONALITIES:
            raise ValueError(f"Profile.personality: unknown key {self.personality!r}")
        if self.language not in LANGUAGES:
            raise ValueError(
                f"Profile.language: expected one of {LANGUAGES}, got {self.language!r}"
            )
        if not isinstance(self.traits, tuple):
            raise TypeError(f"Profile.traits: expected a tuple, got {type(self.traits).__name__}")


def _check_text(
    record: Mapping[str, Any], field: str, path: str | os.PathLike[str], line: int
) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise ProfileError(path, line, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ProfileError(path, line, field, "empty text")
    return value


def parse_profile_record(
    record: Any, language: Language, path: str | os.PathLike[str] = "<record>", line: int = 0
) -> Profile:
    """Validate one decoded JSON record and turn it into a `Profile`.

    `path` and `line` only feed error messages. Text is kept verbatim (not stripped), because it
    is pasted into the simulator's prompts exactly as the dataset authors wrote it.
    """
    if not isinstance(record, dict):
        raise ProfileError(
            path, line, "<record>", f"expected a JSON object, got {type(record).__name__}"
        )
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise ProfileError(path, line, field, "missing required field")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ProfileError(
            path, line, unknown[0], f"unknown field (allowed: {REQUIRED_FIELDS + OPTIONAL_FIELDS})"
        )
    texts = {f: _check_text(record, f, path, line) for f in ("id", "player", "scene")}
    main_cha = _check_text(record, "main_cha", path, line)
    task = _check_text(record, "task", path, line)
    try:
        personality = personality_key(main_cha)
    except ValueError as e:
        raise ProfileError(path, line, "main_cha", str(e)) from None
    try:
        intention = intention_key(task)
    except ValueError as e:
        raise ProfileError(path, line, "task", str(e)) from None
    group = record["cha_group"]
    if (
        not isinstance(group, list)
        or len(group) != NUM_TRAITS
        or not all(isinstance(t, str) and t.strip() for t in group)
    ):
        raise ProfileError(
            path,
            line,
            "cha_group",
            f"expected a list of {NUM_TRAITS} non-empty strings, got {group!r}",
        )
    first_talk = None
    if "first_talk" in record:
        first_talk = _check_text(record, "first_talk", path, line)
    return Profile(
        id=texts["id"],
        persona=texts["player"],
        scene=texts["scene"],
        personality=personality,
        traits=tuple(group),
        intention=intention,
        language=language,
        first_talk=first_talk,
    )


def load_profiles(path: str | os.PathLike[str], language: Language) -> tuple[Profile, ...]:
    """Read a profile JSONL file strictly; any bad record raises `ProfileError`.

    Every line must hold one JSON object (blank lines are errors too: they usually mean a file
    was hand-edited or truncated). Ids must be unique within the file, because rollouts, eval
    reports and checkpointed iterators refer to profiles by id.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language: expected one of {LANGUAGES}, got {language!r}")
    path = Path(path)
    profiles: list[Profile] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                raise ProfileError(path, line_no, "<record>", "blank line")
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ProfileError(path, line_no, "<json>", f"invalid JSON: {e.msg}") from None
            profile = parse_profile_record(record, language, path, line_no)
            if profile.id in first_line_of:
                raise ProfileError(
                    path,
                    line_no,
                    "id",
                    f"duplicate id {profile.id!r} (first seen on line {first_line_of[profile.id]})",
                )
            first_line_of[profile.id] = line_no
            profiles.append(profile)
    if not profiles:
        raise ProfileError(path, 1, "<record>", "file holds no profiles")
    return tuple(profiles)


def profile_set_language(set_name: str) -> Language:
    """Language of a built-in profile set ("rlver" -> "zh", "en" -> "en")."""
    if set_name not in PROFILE_SETS:
        raise ValueError(f"set_name: expected one of {tuple(PROFILE_SETS)}, got {set_name!r}")
    return PROFILE_SETS[set_name][1]


def builtin_profile_path(set_name: str, split: str) -> Path:
    """Path of a profile file shipped in the package (`rlver_jax/data/profiles/`).

    Resolved through importlib.resources so it works from a checkout and from an installed
    wheel alike. Raises FileNotFoundError if the file is not (yet) in the package.
    """
    if set_name not in PROFILE_SETS:
        raise ValueError(f"set_name: expected one of {tuple(PROFILE_SETS)}, got {set_name!r}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    folder, _, files = PROFILE_SETS[set_name]
    resource = importlib.resources.files("rlver_jax").joinpath(
        "data", "profiles", folder, files[split]
    )
    path = Path(str(resource))  # a real directory for source checkouts and wheel installs
    if not path.is_file():
        raise FileNotFoundError(f"profile set {set_name!r} split {split!r}: no file at {path}")
    return path


def load_builtin_profiles(set_name: str, split: str) -> tuple[Profile, ...]:
    """Load a packaged profile set, e.g. ``load_builtin_profiles("rlver", "test")``."""
    return load_profiles(builtin_profile_path(set_name, split), profile_set_language(set_name))
