"""The padded sizes of `rlver_jax.buckets`, shared by the sampler, the rollout, the learner, the
judge, the reference user and the memory plan."""

from __future__ import annotations

import pytest

from rlver_jax.buckets import capped_bucket, pow2_bucket, pow2_multiple, round_up, smallest_bucket


def test_smallest_bucket_and_its_error_names_what() -> None:
    assert [smallest_bucket(n, (16, 4, 8), "batch size") for n in (0, 4, 5, 16)] == [4, 4, 8, 16]
    with pytest.raises(ValueError, match="judge prompt length 17 exceeds the largest bucket 16"):
        smallest_bucket(17, (4, 16), "judge prompt length")


def test_capped_bucket_stops_at_the_largest() -> None:
    assert [capped_bucket(n, (512, 1024)) for n in (1, 512, 513, 5000)] == [512, 512, 1024, 1024]


def test_powers_of_two_and_multiples() -> None:
    assert [pow2_bucket(n) for n in (-3, 0, 1, 2, 3, 64, 65)] == [1, 1, 1, 2, 4, 64, 128]
    assert pow2_bucket(3, 128) == 128 and pow2_bucket(300, 128) == 512
    # the learner's rows (the trainer's padding): whole mini-batches, a power of two of them
    assert [pow2_multiple(n, 4) for n in (1, 4, 5, 8, 9, 17)] == [4, 4, 8, 8, 16, 32]
    assert [round_up(n, 4) for n in (0, 1, 4, 6)] == [0, 4, 4, 8]
