"""Sequence packing: several whole samples per learner row, so the learner computes on tokens.

RLVER's dialogues differ a lot in length (early-ended dialogues, 1 to 8 turns), and a batch
padded to its longest row spends most of the learner's compute on padding. verl's answer is
dynamic batch size with padding removed; ours keeps every shape static (no recompiles):

- :func:`plan_packing` re-lays a right-padded ``[N, T]`` batch out as ``[N, T]`` rows that
  each hold several samples back to back (first-fit decreasing), **within each mini-batch**
  (so the PPO mini-batches, and hence the optimiser steps, are exactly those of the unpacked
  batch), filling the mini-batch's micro-batches in order; the rows left over are empty.
- The learner skips a micro-batch without loss tokens (its gradient is exactly zero, see
  :func:`rlver_jax.rl.optim.accumulate_gradients`) and a forward chunk without tokens, so its
  compute follows the filled rows instead of ``N x T``.
- Packed rows carry segment ids (samples 1, 2, ... in a row, 0 on padding) in ``token_mask``:
  attention stays within a segment and positions restart at each segment
  (:func:`rlver_jax.models.transformer.attention_mask`, ``positions_from_mask``), so each
  token sees what it saw unpacked. Shifted quantities (token ``t``'s logprob comes from
  position ``t - 1``) cross a segment boundary only at a sample's first token, a prompt token
  outside every loss and value mask; :func:`unpack` returns 0 there, as the unpacked forward's
  ``shift_right`` does.

Token-level math that runs along a row (GAE) runs unpacked: pack -> forward (old logprobs,
values) -> unpack -> advantages -> pack -> train step. Per-sequence loss aggregation would need
per-segment sums, so packing takes ``loss_agg="token-mean"`` (RLVER's and verl's default).

**Shared prefixes** (``share`` = :class:`Share`): the samples of a GRPO group start with the same
prompt, so a packed row can hold that prefix once, followed by each member's own tokens (the
layout of PrefixGrouper, arXiv 2506.05433)::

    [ prompt (segment p) | rest of sample 1 (segment s1) | rest of sample 2 (segment s2) | ...]

A member's tokens see the prefix and themselves (``token_mask = s | p << PREFIX_SHIFT``,
decoded by :func:`rlver_jax.models.transformer.segment_parts`), their positions continue from
the prefix's length, and the first of them is predicted from the prefix's last position
(:func:`rlver_jax.rl.model_outputs.align_to_targets`). Every token of every sample therefore sees
exactly what it saw alone, and the forward computes the prefix once per row instead of once
per member; its gradient is the sum of the members' (what autodiff of the shared activations
gives). A prefix stops before the first loss token of every member, so each loss / value token
still appears exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlver_jax.buckets import round_up, smallest_bucket
from rlver_jax.models.transformer import PREFIX_SHIFT
from rlver_jax.rl.optim import strided_split

Array = jax.Array

__all__ = ["PREFIX_SHIFT", "Packing", "Share", "best_row_length", "filled_rows", "pack"]
__all__ += ["packed_rows", "plan_packing", "unpack"]


@dataclasses.dataclass(frozen=True)
class Share:
    """What prefix sharing needs of a padded batch (host arrays): ``tokens``, ``loss_mask``
    ``[N, T]`` and ``group_ids`` ``[N]``: samples of a group in one mini-batch share their
    longest common prefix that precedes every member's first loss token."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    group_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Item:
    """What first-fit packs: ``members`` (sample indices) sharing their first ``prefix``
    tokens (0: a lone sample), ``length`` tokens in all."""

    members: tuple[int, ...]
    prefix: int
    length: int


@dataclasses.dataclass(frozen=True)
class Packing:
    """Index maps between a padded batch and its packed layout (both ``[N, T]``, host arrays).

    ``gather[r, u]``: flat index (``i * T + t``) of the unpacked token at packed slot ``(r, u)``,
    ``N * T`` on padding. ``scatter[i, t]``: flat index of unpacked token ``(i, t)`` in the packed
    batch, ``N * T`` at ``t = 0`` and on padding. ``segment_ids``: the packed ``token_mask``.
    """

    gather: np.ndarray
    scatter: np.ndarray
    segment_ids: np.ndarray


def _first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into ``lengths``) of total length ``<= capacity``: longest first,
    each into the first bin it fits (ties by index: deterministic). Zero lengths are dropped."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(np.flatnonzero(lengths > 0).tolist(), key=lambda i: (-lengths[i], i)):
        b = next((b for b, room in enumerate(free) if room >= lengths[i]), len(bins))
        if b == len(bins):
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= int(lengths[i])
    return bins


def _common_prefix(share: Share, members: list[int], lengths: np.ndarray) -> int:
    """Tokens that all ``members`` share, stopping before any member's first loss token."""
    first = share.tokens[members[0]]
    limit = min(int(lengths[m]) for m in members)
    for m in members:
        loss = np.flatnonzero(share.loss_mask[m])
        limit = min(limit, int(loss[0]) if loss.size else limit)
        diff = np.flatnonzero(share.tokens[m, :limit] != first[:limit])
        limit = int(diff[0]) if diff.size else limit
    return limit


def _item(members: list[int], prefix: int, lengths: np.ndarray) -> _Item:
    """``members`` behind one copy of their first ``prefix`` tokens (a lone sample: none)."""
    if len(members) == 1:
        return _Item((members[0],), 0, int(lengths[members[0]]))
    return _Item(tuple(members), prefix, prefix + sum(int(lengths[m]) - prefix for m in members))


_Group = tuple[list[int], int]  # (members, shared prefix length; 0: nothing shared)


def _groups(rows: np.ndarray, lengths: np.ndarray, share: Share | None) -> list[_Group]:
    """The samples of one mini-batch (``rows``) grouped for packing: each alone, or with
    ``share`` the members of a group with their common prefix. Zero-length samples are dropped.
    Independent of the row length, so :func:`best_row_length` finds prefixes once."""
    real = [int(r) for r in rows if lengths[r] > 0]
    if share is None:
        return [([r], 0) for r in real]
    by_id: dict[int, list[int]] = {}
    for r in real:
        by_id.setdefault(int(share.group_ids[r]), []).append(r)
    out: list[_Group] = []
    for members in by_id.values():
        prefix = _common_prefix(share, members, lengths) if len(members) > 1 else 0
        out += [(members, prefix)] if prefix else [([m], 0) for m in members]
    return out


def _items(groups: list[_Group], lengths: np.ndarray, capacity: int) -> list[_Item]:
    """Packing items of ``groups``: a group sharing a prefix is split into items that fit
    ``capacity`` tokens, each with its own copy of the prefix."""
    items = []
    for members, prefix in groups:
        chunk: list[int] = []
        for m in members:  # a new item when this one is full
            if chunk and _item([*chunk, m], prefix, lengths).length > capacity:
                items.append(_item(chunk, prefix, lengths))
                chunk = []
            chunk.append(m)
        items.append(_item(chunk, prefix, lengths))
    return items


def _bins(items: list[_Item], capacity: int) -> list[list[_Item]]:
    """:func:`_first_fit_decreasing` over items."""
    lengths = np.array([it.length for it in items], np.int64)
    return [[items[i] for i in b] for b in _first_fit_decreasing(lengths, capacity)]


def _layout(n: int, n_mini: int, n_micro: int) -> np.ndarray:
    """``[n_mini, rows]``: each mini-batch's row indices, in micro-batch order."""
    return np.asarray(strided_split(np.arange(n), n_mini, n_micro)).reshape(n_mini, -1)


def packed_rows(
    lengths: np.ndarray, n_mini: int, n_micro: int, seq_len: int, share: Share | None = None
) -> int:
    """Rows the train step computes on once samples of ``lengths`` are packed into rows of
    ``seq_len`` (:func:`plan_packing`): per mini-batch, the micro-batches up to its last bin.
    Equals ``filled_rows(plan_packing(...).segment_ids, ...)`` without building the layout."""
    lengths = np.asarray(lengths)
    return _packed_rows(_mini_batch_groups(lengths, n_mini, n_micro, share), lengths, seq_len)


def _mini_batch_groups(
    lengths: np.ndarray, n_mini: int, n_micro: int, share: Share | None
) -> tuple[list[list[_Group]], int]:
    """(each mini-batch's :func:`_groups`, rows per micro-batch)."""
    layout = _layout(len(lengths), n_mini, n_micro)
    return [_groups(rows, lengths, share) for rows in layout], layout.shape[1] // n_micro


def _packed_rows(grouped: tuple[list[list[_Group]], int], lengths: np.ndarray, seq_len: int) -> int:
    groups, m = grouped
    bins = (len(_bins(_items(g, lengths, seq_len), seq_len)) for g in groups)
    return sum(round_up(b, m) for b in bins)


def best_row_length(
    lengths: np.ndarray, n_mini: int, n_micro: int, buckets: Sequence[int],
    share: Share | None = None,
) -> int:  # fmt: skip
    """The bucket (``>=`` the longest sample) whose packing computes the fewest tokens,
    ``packed_rows x T``; ties go to the shorter rows (less attention per token)."""
    lengths = np.asarray(lengths)
    longest = max(int(lengths.max(initial=1)), 1)
    shortest = smallest_bucket(longest, buckets, "sequence length")
    fits = [b for b in buckets if b >= shortest]
    grouped = _mini_batch_groups(lengths, n_mini, n_micro, share)  # prefixes found once
    return min(fits, key=lambda b: (_packed_rows(grouped, lengths, b) * b, b))


def plan_packing(
    token_mask: np.ndarray, n_mini: int, n_micro: int, share: Share | None = None
) -> Packing:
    """Pack the right-padded rows of ``token_mask`` ``[N, T]`` (real tokens a prefix of each row).

    Mini-batch ``k`` and its micro-batches are the learner's strided split
    (:func:`~rlver_jax.rl.optim.strided_split` with ``(n_mini, n_micro)``); the samples of
    mini-batch ``k`` are packed into the rows of mini-batch ``k``, the fullest bins in the first
    micro-batches, so empty rows gather in the last ones. ``share``: groups share their common
    prefix (module docs).
    """
    mask = np.asarray(token_mask, bool)
    n, t = mask.shape
    lengths = mask.sum(axis=1)
    if np.any(mask.cumsum(axis=1)[np.arange(n), np.maximum(lengths - 1, 0)] != lengths):
        raise ValueError("plan_packing needs right-padded rows (real tokens first)")
    if share is not None and t >= 1 << (31 - PREFIX_SHIFT):  # prefix ids shifted into an int32
        raise ValueError(
            f"prefix sharing needs rows under {1 << (31 - PREFIX_SHIFT)} tokens, not {t}"
        )
    layout = _layout(n, n_mini, n_micro)
    empty = n * t
    gather = np.full((n, t), empty, np.int64)
    scatter = np.full((n, t), empty, np.int64)
    segment_ids = np.zeros((n, t), np.int64)
    for rows in layout:  # rows of one mini-batch, in micro-batch order
        items_of_rows = _bins(_items(_groups(rows, lengths, share), lengths, t), t)
        for row, items in zip(rows, items_of_rows, strict=False):
            offset, seg = 0, 0
            for item in items:
                p, prefix_seg = item.prefix, 0
                if p:  # the shared prefix, read from the first member; every member maps to it
                    seg += 1
                    prefix_seg = seg
                    gather[row, offset : offset + p] = item.members[0] * t + np.arange(p)
                    segment_ids[row, offset : offset + p] = seg
                    for member in item.members:
                        scatter[member, 1:p] = row * t + offset + np.arange(1, p)
                    offset += p
                for member in item.members:
                    length = int(lengths[member])
                    if length == p:
                        continue  # all of it is the prefix
                    seg += 1
                    span = slice(offset, offset + length - p)
                    gather[row, span] = member * t + np.arange(p, length)
                    scatter[member, max(p, 1) : length] = row * t + np.arange(
                        offset + max(p, 1) - p, offset + length - p
                    )
                    segment_ids[row, span] = seg | prefix_seg << PREFIX_SHIFT
                    offset += length - p
    return Packing(gather.astype(np.int32), scatter.astype(np.int32), segment_ids.astype(np.int32))


def _take_flat(x: Array, index: Array) -> Array:
    """``x`` ``[N, T, ...]`` flattened to ``[N * T, ...]`` plus one zero entry, indexed by
    ``index`` ``[N, T]`` (index ``N * T`` reads the zero)."""
    flat = x.reshape((-1, *x.shape[2:]))
    flat = jnp.concatenate([flat, jnp.zeros((1, *x.shape[2:]), x.dtype)])
    return jnp.take(flat, index, axis=0)


def pack(x: Array, packing_gather: Array) -> Array:
    """A token-level ``[N, T]`` array in the packed layout (0 / False on packed padding)."""
    return _take_flat(x, packing_gather)


def unpack(x: Array, packing_scatter: Array) -> Array:
    """A packed token-level array back in the padded layout; 0 at each sample's first token
    and on padding (see the module docs)."""
    return _take_flat(x, packing_scatter)


def filled_rows(token_mask: np.ndarray, n_mini: int, n_micro: int) -> int:
    """Rows the learner computes on: all rows of each micro-batch that holds a real token
    (the train step skips the others)."""
    mask = np.asarray(token_mask) != 0
    micro = np.asarray(strided_split(mask.any(axis=1), n_mini, n_micro))  # [n_mini, n_micro, m]
    return int(micro.any(axis=-1).sum() * micro.shape[-1])
