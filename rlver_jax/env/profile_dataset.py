"""Profiles as a tensorflow-datasets dataset (array_record, no TensorFlow) and a grain iterator.

Why tfds + grain for 600 small records: the training loop wants the same data path on one host
and on a pod. tfds gives a versioned, prepared-once on-disk copy (`array_record` files, which
need no TensorFlow to write or read) with random access through `as_data_source`; grain turns
that random-access source into a deterministic, per-host-sharded, checkpointable iterator, so a
resumed run draws exactly the profiles it would have drawn without the interruption.

What works without TensorFlow (checked with tensorflow-datasets 4.9.10, no `tensorflow`
installed): `GeneratorBasedBuilder` with `file_format="array_record"`, `FeaturesDict` of
`Text`, `Sequence(Text)` and `Scalar(np.int64)`, `download_and_prepare`, `as_data_source`.
Pitfalls avoided here: `Scalar` needs a numpy dtype (the string "int64" is rejected without
TF); `dataset_info_from_configs` wants a package folder of metadata files, so `_info` builds a
`DatasetInfo` directly; `code_path` is overridden (tfds' lookup needs the uninstalled
`importlib_resources` backport for a builder defined in a package); `tfds.list_builders()` and
`tfds.load` by name are not used (they import TF). Text features come back as `bytes` and are
decoded in `profile_from_example`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from rlver_jax.env.profiles import (
    PROFILE_SETS,
    SPLITS,
    Language,
    Profile,
    builtin_profile_path,
    load_profiles,
)

DATA_DIR_ENV = "RLVER_JAX_TFDS_DIR"

_CITATION = """@article{wang2025rlver,
  title={RLVER: Reinforcement Learning with Verifiable Emotion Rewards for Empathetic Agents},
  author={Wang, Peisong and others},
  journal={arXiv preprint arXiv:2507.03112},
  year={2025}
}"""


def default_data_dir() -> Path:
    """Where prepared datasets go unless a caller says otherwise.

    `$RLVER_JAX_TFDS_DIR` if set (point it at the run's output dir), else
    `~/.cache/rlver_jax/tfds`. Not tfds' own `~/tensorflow_datasets`, so our prepared files
    never mix with other projects' datasets of a similar name.
    """
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "rlver_jax" / "tfds"


@dataclasses.dataclass(eq=False)
class ProfileSetConfig(tfds.core.BuilderConfig):
    """A profile set: the packaged "rlver" / "en" sets, or custom JSONL files.

    For the packaged sets `set_name` is given and the paths are found in the package. A custom
    set (tests, new data) gives `train_path` and/or `test_path`; only those splits are built.
    Prepared data is keyed by config name and VERSION; the source files' sha256 is stored in
    the dataset metadata and `prepare_profiles` re-generates when it no longer matches.
    """

    language: Language = "zh"
    set_name: str | None = None
    train_path: str | None = None
    test_path: str | None = None

    def split_paths(self) -> dict[str, Path]:
        """Split name -> source JSONL path, for the splits this config has."""
        if self.set_name is not None:
            return {s: builtin_profile_path(self.set_name, s) for s in SPLITS}
        paths = {"train": self.train_path, "test": self.test_path}
        return {s: Path(p) for s, p in paths.items() if p is not None}


def _sha256s(config: ProfileSetConfig) -> dict[str, str]:
    return {s: hashlib.sha256(p.read_bytes()).hexdigest() for s, p in config.split_paths().items()}


def custom_profile_config(
    name: str,
    language: Language,
    *,
    train_path: str | os.PathLike[str] | None = None,
    test_path: str | os.PathLike[str] | None = None,
) -> ProfileSetConfig:
    """Config for profile JSONL files outside the package (names must not be "rlver"/"en")."""
    if name in PROFILE_SETS:
        raise ValueError(f"name: {name!r} is a packaged set; pick another config name")
    if train_path is None and test_path is None:
        raise ValueError("train_path/test_path: give at least one")
    return ProfileSetConfig(
        name=name,
        language=language,
        train_path=None if train_path is None else os.fspath(train_path),
        test_path=None if test_path is None else os.fspath(test_path),
        description=f"custom {language} profile set",
    )


class RlverProfiles(tfds.core.GeneratorBasedBuilder):
    """tfds builder for simulated-user profiles (one example per profile, file order kept)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "RLVER's 500/100 Chinese profiles; English set."
    }
    BUILDER_CONFIGS: ClassVar[list[ProfileSetConfig]] = [
        ProfileSetConfig(
            name="rlver",
            language="zh",
            set_name="rlver",
            description="RLVER's released Chinese profiles (MIT, Tencent); test = SAGE benchmark.",
        ),
        ProfileSetConfig(
            name="en",
            language="en",
            set_name="en",
            description="The project's English profile set (RLVER schema, canonical keys).",
        ),
    ]
    DEFAULT_CONFIG_NAME = "rlver"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code folder: it only locates url checksum files, and we download nothing.

        tfds' own lookup for a builder defined inside a package imports the optional
        `importlib_resources` backport, which is not installed, and fails.
        """
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        features = tfds.features.FeaturesDict(
            {
                "index": tfds.features.Scalar(
                    dtype=np.int64, doc="0-based line index in the JSONL"
                ),
                "id": text(),
                "persona": text(),
                "scene": text(),
                "personality": text(doc="canonical personality key"),
                "traits": tfds.features.Sequence(text()),
                "intention": text(doc="canonical hidden-intention key"),
                "language": text(),
                "first_talk": text(doc="opening line; empty string when the profile has none"),
            }
        )
        config = self.builder_config
        assert isinstance(config, ProfileSetConfig)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Simulated-user profiles for RLVER-style empathetic-dialogue RL.",
            features=features,
            # Keep file order: records are addressed by index and it makes data sources
            # reproducible independent of tfds' key hashing.
            disable_shuffling=True,
            homepage="https://github.com/Tencent/digitalhuman/tree/main/RLVER",
            citation=_CITATION,
            license="MIT (RLVER profiles, (c) 2025 THL A29 Limited, Tencent)",
            metadata=tfds.core.MetadataDict(source_sha256=_sha256s(config)),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        # Local packaged/custom files only: no download, so `dl_manager` is unused.
        del dl_manager
        config = self.builder_config
        assert isinstance(config, ProfileSetConfig)
        return {
            split: self._generate_examples(load_profiles(path, config.language))  # validates
            for split, path in config.split_paths().items()
        }

    def _generate_examples(self, profiles: Sequence[Profile]) -> Any:
        for i, p in enumerate(profiles):
            yield p.id, profile_to_example(p, i)


def profile_to_example(profile: Profile, index: int) -> dict[str, Any]:
    """A `Profile` as a tfds example dict (None `first_talk` stored as "")."""
    return {
        "index": index,
        "id": profile.id,
        "persona": profile.persona,
        "scene": profile.scene,
        "personality": profile.personality,
        "traits": list(profile.traits),
        "intention": profile.intention,
        "language": profile.language,
        "first_talk": profile.first_talk or "",
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def profile_from_example(example: Mapping[str, Any] | Profile) -> Profile:
    """Decode a data-source record (Text features arrive as bytes) back into a `Profile`.

    A `Profile` passes through unchanged, so iterators also work over `load_profiles` output.
    The "" <-> None mapping of `first_talk` is lossless because the loader rejects empty text.
    """
    if isinstance(example, Profile):
        return example
    first_talk = _text(example["first_talk"])
    return Profile(
        id=_text(example["id"]),
        persona=_text(example["persona"]),
        scene=_text(example["scene"]),
        personality=_text(example["personality"]),
        traits=tuple(_text(t) for t in example["traits"]),
        intention=_text(example["intention"]),
        language=_text(example["language"]),  # type: ignore[arg-type]
        first_talk=first_talk or None,
    )


def profile_builder(
    config: str | ProfileSetConfig = "rlver", data_dir: str | os.PathLike[str] | None = None
) -> RlverProfiles:
    """The tfds builder for a packaged set name ("rlver", "en") or a custom config."""
    return RlverProfiles(
        config=config,
        data_dir=os.fspath(data_dir if data_dir is not None else default_data_dir()),
        file_format="array_record",
    )


def prepare_profiles(
    config: str | ProfileSetConfig = "rlver", data_dir: str | os.PathLike[str] | None = None
) -> RlverProfiles:
    """Build (once) the array_record files of a profile set and return the prepared builder.

    If the set was prepared before from different source bytes (sha256 mismatch), it is
    regenerated instead of silently serving stale profiles.
    """
    builder = profile_builder(config, data_dir)
    download_config = None
    if builder.is_prepared():
        stored = dict(builder.info.metadata or {}).get("source_sha256")
        cfg = builder.builder_config
        assert isinstance(cfg, ProfileSetConfig)
        if stored != _sha256s(cfg):
            download_config = tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
            )
            builder = profile_builder(config, data_dir)
    builder.download_and_prepare(download_config=download_config)
    return builder


def profile_data_source(
    config: str | ProfileSetConfig = "rlver",
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
) -> Sequence[Any]:
    """Random-access source (`len`, `[i]` -> example dict) of one split, prepared if needed."""
    return prepare_profiles(config, data_dir).as_data_source(split)


def profile_iterator(
    source: Sequence[Any],
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    batch_size: int | None = None,
    drop_remainder: bool = False,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """A deterministic, per-host-sharded, checkpointable iterator of `Profile`s.

    Args:
      source: random-access records: a tfds data source (`profile_data_source`) or a sequence
        of `Profile`s (e.g. `load_profiles(...)`).
      seed: shuffle seed; the same seed gives the same stream on every run.
      shuffle: shuffle within the host's shard (re-shuffled every epoch, still by seed).
      num_epochs: None repeats forever (training); 1 gives each of the host's records once.
      shard_index / shard_count: this host's shard; default `jax.process_index()` /
        `jax.process_count()`, read at call time (not import time, which would initialise
        the JAX backend on import). Host i gets records i, i+n, i+2n, ...: disjoint and
        fixed, so no profile is seen twice in an epoch across the pod.
      batch_size: None yields single `Profile`s; else tuples of `batch_size` profiles.
      drop_remainder: drop a last short batch (only matters for finite epochs).
      read_options: grain prefetch settings; default 1 thread, 16 records ahead (decoding is
        cheap; grain's default of 16 threads x 500 records is wasted on this data).

    Returns:
      a `grain.DatasetIterator`; `get_state()` / `set_state()` checkpoint its position.
    """
    if shard_index is None:
        shard_index = jax.process_index()
    if shard_count is None:
        shard_count = jax.process_count()
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index/shard_count: need 0 <= {shard_index} < {shard_count}")
    if len(source) < shard_count:
        raise ValueError(f"shard_count: {shard_count} shards but only {len(source)} records")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs: must be >= 1 or None, got {num_epochs}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1 or None, got {batch_size}")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(profile_from_example)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=tuple)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
    return iter(ds.to_iter_dataset(read_options))
