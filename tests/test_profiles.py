"""Profiles: strict JSONL loading, the tfds array_record builder and the grain iterator."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from rlver_jax.env.intentions import INTENTIONS, PERSONALITIES
from rlver_jax.env.profile_dataset import (
    custom_profile_config,
    prepare_profiles,
    profile_data_source,
    profile_from_example,
    profile_iterator,
)
from rlver_jax.env.profiles import (
    Profile,
    ProfileError,
    builtin_profile_path,
    load_builtin_profiles,
    load_profiles,
)

_DROP = object()  # marks a field to leave out of a record


def _record(i: int, **overrides: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": f"id-{i}",
        "player": f"* Name: Person {i}\n* Age: {20 + i}",
        "scene": f"Scene {i}: something happened at work.",
        "main_cha": ("negative", "passive", "avoidant")[i % 3],
        "cha_group": ["shy", "modest", "resentful"],
        "task": INTENTIONS[i % len(INTENTIONS)],
    }
    rec.update(overrides)
    return {k: v for k, v in rec.items() if v is not _DROP}


def _counts(field: str, keys: tuple[str, ...], profiles: Any) -> dict[str, int]:
    """Profiles per value of `field`, every key of `keys` present (zeros included), in order."""
    counts = collections.Counter(getattr(p, field) for p in profiles)
    return {k: counts.get(k, 0) for k in keys}


def _write(path: Path, lines: list[Any]) -> Path:
    text = "".join(
        (x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines
    )
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- RLVER files


def test_rlver_train_profiles() -> None:
    train = load_builtin_profiles("rlver", "train")
    assert len(train) == 500
    assert _counts("intention", INTENTIONS, train) == {
        "validation": 66,
        "reflection": 66,
        "analysis": 66,
        "empathy": 64,
        "listening": 63,
        "insight_into_others": 60,
        "solutions": 58,
        "praise": 57,
    }
    assert _counts("personality", PERSONALITIES, train) == {
        "negative": 183,
        "passive": 174,
        "avoidant": 143,
    }
    assert all(p.first_talk is None and p.language == "zh" and len(p.traits) == 3 for p in train)
    # Spec §1.1 example: record 0 is 王丽娜, passive, wants helpful advice.
    assert "王丽娜" in train[0].persona
    assert (train[0].personality, train[0].intention) == ("passive", "solutions")


def test_rlver_test_profiles() -> None:
    test = load_builtin_profiles("rlver", "test")
    train_ids = {p.id for p in load_builtin_profiles("rlver", "train")}
    assert len(test) == 100
    assert all(p.first_talk for p in test)
    assert _counts("personality", PERSONALITIES, test) == {
        "negative": 41,
        "passive": 34,
        "avoidant": 25,
    }
    assert sum(_counts("intention", INTENTIONS, test).values()) == 100
    assert not train_ids & {p.id for p in test}
    assert "王小云" in test[0].persona
    assert (test[0].personality, test[0].intention) == ("negative", "insight_into_others")


def test_builtin_path_errors() -> None:
    assert builtin_profile_path("rlver", "test").name == "test_profile.jsonl"
    with pytest.raises(ValueError, match="set_name"):
        builtin_profile_path("fr", "test")
    with pytest.raises(ValueError, match="split"):
        builtin_profile_path("rlver", "dev")


@pytest.mark.parametrize("split", ["train", "test"])
def test_english_profiles_if_present(split: str) -> None:
    try:
        profiles = load_builtin_profiles("en", split)
    except FileNotFoundError:
        pytest.skip("English profile files not written yet")
    assert profiles and all(p.language == "en" and len(p.traits) == 3 for p in profiles)
    if split == "test":
        assert all(p.first_talk for p in profiles)


# ---------------------------------------------------------------- strict loading


def test_load_valid_temp_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.jsonl", [_record(0), _record(1, first_talk="Hi.")])
    a, b = load_profiles(path, "en")
    assert a == Profile(
        "id-0",
        "* Name: Person 0\n* Age: 20",
        "Scene 0: something happened at work.",
        "negative",
        ("shy", "modest", "resentful"),
        "validation",
        "en",
        None,
    )
    assert b.first_talk == "Hi." and b.intention == "reflection"


@pytest.mark.parametrize(
    ("bad_line", "field", "reason"),
    [
        ('{"id": "x", "player": ', "<json>", "invalid JSON"),
        ("", "<record>", "blank line"),
        (["not", "an", "object"], "<record>", "JSON object"),
        (_record(1, scene=_DROP), "scene", "missing"),
        (_record(1, player=5), "player", "string"),
        (_record(1, scene="   "), "scene", "empty"),
        (_record(1, id=""), "id", "empty"),
        (_record(1, task="wants cake"), "task", "unknown hidden intention"),
        (_record(1, main_cha="happy"), "main_cha", "unknown personality"),
        (_record(0), "id", "duplicate id"),
        (_record(1, cha_group=["a", "b"]), "cha_group", "list of 3"),
        (_record(1, cha_group="a,b,c"), "cha_group", "list of 3"),
        (_record(1, cha_group=["a", "b", 3]), "cha_group", "list of 3"),
        (_record(1, cha_group=["a", "b", " "]), "cha_group", "list of 3"),
        (_record(1, first_talk=""), "first_talk", "empty"),
        (_record(1, topic="extra"), "topic", "unknown field"),
    ],
)
def test_malformed_record_names_file_line_field(
    tmp_path: Path, bad_line: Any, field: str, reason: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", [_record(0), bad_line, _record(2)])
    with pytest.raises(ProfileError) as info:
        load_profiles(path, "en")
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 2, field)
    assert f"{path}:2:" in str(err) and repr(field) in str(err) and reason in str(err)


def test_empty_file_and_bad_language(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ProfileError, match="no profiles"):
        load_profiles(path, "en")
    with pytest.raises(ValueError, match="language"):
        load_profiles(path, "fr")  # type: ignore[arg-type]


# ---------------------------------------------------------------- tfds builder


@pytest.fixture(scope="module")
def rlver_builder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return prepare_profiles("rlver", tmp_path_factory.mktemp("tfds"))


def test_tfds_rlver_round_trip(rlver_builder: Any) -> None:
    assert rlver_builder.info.splits["train"].num_examples == 500
    source = rlver_builder.as_data_source("test")
    expected = load_builtin_profiles("rlver", "test")
    assert len(source) == 100
    assert [profile_from_example(source[i]) for i in range(len(source))] == list(expected)
    assert int(source[7]["index"]) == 7


def test_tfds_custom_set_round_trip_and_regenerates(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", [_record(i) for i in range(5)])
    test = _write(tmp_path / "test.jsonl", [_record(i, first_talk=f"Hello {i}") for i in range(3)])
    config = custom_profile_config("tiny", "en", train_path=train, test_path=test)
    data_dir = tmp_path / "tfds"
    for split, path in (("train", train), ("test", test)):
        source = profile_data_source(config, split, data_dir)
        assert [profile_from_example(r) for r in source] == list(load_profiles(path, "en"))
    assert (
        profile_from_example(profile_data_source(config, "train", data_dir)[0]).first_talk is None
    )
    # Changed source bytes: the prepared copy is rebuilt, not served stale.
    _write(train, [_record(i, scene=f"New scene {i}") for i in range(6)])
    source = profile_data_source(config, "train", data_dir)
    assert len(source) == 6 and profile_from_example(source[5]).scene == "New scene 5"


def test_tfds_rejects_malformed_before_writing(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", [_record(0), _record(1, task="nope")])
    config = custom_profile_config("broken", "en", train_path=train)
    with pytest.raises(ProfileError, match="task"):
        prepare_profiles(config, tmp_path / "tfds")
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))


# ---------------------------------------------------------------- grain iterator


def _ids(it: Any, n: int) -> list[str]:
    return [next(it).id for _ in range(n)]


def test_iterator_deterministic_by_seed(rlver_builder: Any) -> None:
    source = rlver_builder.as_data_source("test")
    a = _ids(profile_iterator(source, seed=3), 40)
    b = _ids(profile_iterator(source, seed=3), 40)
    c = _ids(profile_iterator(source, seed=4), 40)
    assert a == b and a != c
    unshuffled = _ids(profile_iterator(source, seed=3, shuffle=False), 3)
    assert unshuffled == [profile_from_example(source[i]).id for i in range(3)]


def test_iterator_disjoint_host_shards() -> None:
    profiles = load_builtin_profiles("rlver", "test")
    shards = [
        [
            p.id
            for p in profile_iterator(profiles, seed=0, num_epochs=1, shard_index=i, shard_count=2)
        ]
        for i in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == {p.id for p in profiles}
    with pytest.raises(ValueError, match="shard"):
        profile_iterator(profiles, seed=0, shard_index=2, shard_count=2)


def test_iterator_repeats_forever_with_fresh_epochs() -> None:
    profiles = load_builtin_profiles("rlver", "test")[:10]
    ids = _ids(profile_iterator(profiles, seed=0), 35)  # default shard: process 0 of 1
    epochs = [ids[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == sorted(p.id for p in profiles) for e in epochs)
    assert epochs[0] != epochs[1]  # re-shuffled each epoch, by seed


def test_iterator_checkpoint_round_trip(rlver_builder: Any) -> None:
    source = rlver_builder.as_data_source("test")
    it = profile_iterator(source, seed=7, shard_index=1, shard_count=2)
    _ids(it, 63)  # crosses the 50-record epoch boundary of this shard
    state = it.get_state()
    json.dumps(state)  # plain data: goes into the run checkpoint as is
    expected = _ids(it, 20)
    restored = profile_iterator(source, seed=7, shard_index=1, shard_count=2)
    restored.set_state(state)
    assert _ids(restored, 20) == expected


def test_iterator_batches() -> None:
    profiles = load_builtin_profiles("rlver", "test")[:10]
    batches = list(profile_iterator(profiles, seed=0, num_epochs=1, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(isinstance(p, Profile) for b in batches for p in b)
    dropped = list(
        profile_iterator(profiles, seed=0, num_epochs=1, batch_size=4, drop_remainder=True)
    )
    assert [len(b) for b in dropped] == [4, 4]
