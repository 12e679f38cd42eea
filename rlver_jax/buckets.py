"""Padded sizes. A jitted program compiles once per input shape, so batches, prompts and
sequences are padded up to a few fixed sizes, their buckets, and a run compiles once per bucket
instead of once per size. Every such round-up of the package is one of these."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["capped_bucket", "pow2_bucket", "pow2_multiple", "round_up", "smallest_bucket"]


def smallest_bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """The smallest of `buckets` that is >= `n`; a ValueError naming `what` (say, "judge
    prompt length") when `n` exceeds them all."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}")


def capped_bucket(n: int, buckets: Sequence[int]) -> int:
    """`smallest_bucket`, or the largest bucket when `n` exceeds them all (the memory plan
    sizes a run by the largest shapes it can hold)."""
    return smallest_bucket(min(n, max(buckets)), buckets, "size")


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum, 1)."""
    return 1 << (max(int(n), int(minimum), 1) - 1).bit_length()


def pow2_multiple(n: int, unit: int) -> int:
    """`unit` x the smallest power of two with `unit * 2**k >= n` (e.g. the learner's rows:
    whole mini-batches, a power of two of them)."""
    return unit * pow2_bucket(-(-n // unit))


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (e.g. a batch split over data-parallel
    devices)."""
    return -(-n // multiple) * multiple
