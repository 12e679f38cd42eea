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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlver_jax.rl.optim import strided_split

Array = jax.Array

__all__ = ["Packing", "best_row_length", "filled_rows", "pack", "packed_rows", "plan_packing"]
__all__ += ["unpack"]


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


def _layout(n: int, n_mini: int, n_micro: int) -> np.ndarray:
    """``[n_mini, rows]``: each mini-batch's row indices, in micro-batch order."""
    return np.asarray(strided_split(np.arange(n), n_mini, n_micro)).reshape(n_mini, -1)


def packed_rows(lengths: np.ndarray, n_mini: int, n_micro: int, seq_len: int) -> int:
    """Rows the train step computes on once samples of ``lengths`` are packed into rows of
    ``seq_len`` (:func:`plan_packing`): per mini-batch, the micro-batches up to its last bin.
    Equals ``filled_rows(plan_packing(...).segment_ids, ...)`` without building the layout."""
    lengths = np.asarray(lengths)
    layout = _layout(len(lengths), n_mini, n_micro)
    m = layout.shape[1] // n_micro
    bins = (len(_first_fit_decreasing(lengths[rows], seq_len)) for rows in layout)
    return sum(-(-b // m) * m for b in bins)


def best_row_length(lengths: np.ndarray, n_mini: int, n_micro: int, buckets: Sequence[int]) -> int:
    """The bucket (``>=`` the longest sample) whose packing computes the fewest tokens,
    ``packed_rows x T``; ties go to the shorter rows (less attention per token)."""
    lengths = np.asarray(lengths)
    longest = max(int(lengths.max(initial=1)), 1)
    fits = [b for b in buckets if b >= longest]
    if not fits:
        raise ValueError(f"sequence length {longest} exceeds the largest bucket {max(buckets)}")
    return min(fits, key=lambda b: (packed_rows(lengths, n_mini, n_micro, b) * b, b))


def plan_packing(token_mask: np.ndarray, n_mini: int, n_micro: int) -> Packing:
    """Pack the right-padded rows of ``token_mask`` ``[N, T]`` (real tokens a prefix of each row).

    Mini-batch ``k`` and its micro-batches are the learner's strided split
    (:func:`~rlver_jax.rl.optim.strided_split` with ``(n_mini, n_micro)``); the samples of
    mini-batch ``k`` are packed into the rows of mini-batch ``k``, the fullest bins in the first
    micro-batches, so empty rows gather in the last ones.
    """
    mask = np.asarray(token_mask, bool)
    n, t = mask.shape
    lengths = mask.sum(axis=1)
    if np.any(mask.cumsum(axis=1)[np.arange(n), np.maximum(lengths - 1, 0)] != lengths):
        raise ValueError("plan_packing needs right-padded rows (real tokens first)")
    layout = _layout(n, n_mini, n_micro)
    empty = n * t
    gather = np.full((n, t), empty, np.int64)
    scatter = np.full((n, t), empty, np.int64)
    segment_ids = np.zeros((n, t), np.int32)
    for rows in layout:  # rows of one mini-batch, in micro-batch order
        for row, members in zip(rows, _first_fit_decreasing(lengths[rows], t), strict=False):
            offset = 0
            for seg, member in enumerate(members, start=1):
                sample, length = rows[member], int(lengths[rows[member]])
                span = slice(offset, offset + length)
                gather[row, span] = sample * t + np.arange(length)
                scatter[sample, 1:length] = row * t + offset + np.arange(1, length)
                segment_ids[row, span] = seg
                offset += length
    return Packing(gather.astype(np.int32), scatter.astype(np.int32), segment_ids)


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
