"""Orbax checkpoints of the training state plus a JSON sidecar of everything needed to resume.

One checkpoint step directory holds two orbax items:

- ``state``: the ``TrainState`` pytree (policy / critic params, optimiser states, step, rng),
  written with ``StandardSave`` (tensorstore/OCDBT; every process writes only its own shards);
- ``extra``: a JSON object ``{"format", "step", "time", "extra": {...}}`` where ``extra`` is the
  caller's dict: data-iterator state, RNG seed info, config, last-step metrics (see
  :func:`checkpoint_extra`).

Nothing is ever unpickled: arrays come back through tensorstore and metadata through ``json``.

Restores go *into* an abstract target (``jax.ShapeDtypeStruct`` leaves carrying shardings, e.g.
``jax.eval_shape`` + ``Learner.state_shardings()``), so each process reads only its shards and
the state lands in the layout the jitted train step expects, without an unsharded copy. Scalar
leaves (``step``, optimiser ``count``) are a known trap: orbax records them with a
``SingleDeviceSharding`` and, restored that way, they would live on device 0 only and make the
next jit either fail or re-layout (tunix's ``_fix_sharding``). Any target leaf without a
``NamedSharding`` is therefore given a replicated ``NamedSharding`` on the state's mesh.

Typical loop (see also :mod:`rlver_jax.rl.signals`)::

    ckpt = Checkpointer(out_dir / "checkpoints", save_every=50, keep=3)
    if resume and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(abstract_state=abstract)
        restore_iterator(profiles, extra)
    ...
    ckpt.save(step, state, checkpoint_extra(data_iterator=profiles, ...))
    ...
    ckpt.wait(); ckpt.close()
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

log = logging.getLogger(__name__)

FORMAT = "rlver_jax.checkpoint/1"
STATE_ITEM, EXTRA_ITEM = "state", "extra"
EXTRA_FILE = "metadata"  # orbax JsonCheckpointHandler's default file name


class CheckpointError(Exception):
    """Base class of checkpoint errors; messages always name the offending path."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Resume was requested but the directory is missing or holds no finished checkpoint."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The stored state tree does not match the target (missing / extra key, shape, dtype)."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A checkpoint file is missing or unreadable (e.g. the metadata JSON)."""


# --------------------------------------------------------------------------- JSON helpers
def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types: jax / numpy scalars and 0-d arrays become Python numbers,
    tuples and arrays become lists, non-finite floats become ``None`` (strict JSON has no NaN,
    and a resumed run must not choke on its own metadata). Raises ``TypeError`` naming the key
    path for anything else, at save time rather than inside a background write."""
    return _json_safe(value, "extra")


def _json_safe(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: JSON object keys must be str, got {k!r}")
            out[k] = _json_safe(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        arr = np.asarray(jax.device_get(value))
        if arr.ndim == 0:
            return _json_safe(arr.item(), where)
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(arr.tolist())]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def checkpoint_extra(
    *,
    data_iterator: Any = None,
    seed: int | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The metadata dict saved next to the state, with the conventional keys: ``data_iterator``
    (``iterator.get_state()`` of a grain iterator, or an already-taken state dict), ``seed``,
    ``config`` and the last step's ``metrics``. Extra keys pass through."""
    it_state = data_iterator
    if data_iterator is not None and hasattr(data_iterator, "get_state"):
        it_state = data_iterator.get_state()
    extra = {"data_iterator": it_state, "seed": seed, "config": config, "metrics": metrics}
    return json_safe({**extra, **more})


def restore_iterator(iterator: Any, extra: Mapping[str, Any], key: str = "data_iterator") -> bool:
    """Put ``iterator`` back where the checkpoint left it. Uses ``set_state`` (grain: exact, O(1))
    when available; otherwise, if the saved value is an int, fast-forwards by consuming that many
    items (the tunix approach for plain iterators). Returns False when nothing was saved."""
    saved = extra.get(key)
    if saved is None:
        return False
    if hasattr(iterator, "set_state") and not isinstance(saved, int):
        iterator.set_state(saved)
        return True
    if isinstance(saved, int):
        for _ in range(saved):
            next(iterator)
        return True
    raise TypeError(f"extra[{key!r}]: cannot restore a {type(iterator).__name__} from {saved!r}")


# --------------------------------------------------------------------------- tree helpers
def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree: Any) -> dict[str, Any]:
    """``{"policy/layers/0/w": leaf}``: one spelling for dict keys, attributes and indices, so
    a dataclass target and orbax's dict-of-dicts metadata compare equal."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(e) for e in path): leaf for path, leaf in leaves}


def _find_mesh(tree: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def abstract_target(tree: Any, mesh: Mesh | None = None) -> Any:
    """``tree`` (arrays or ``ShapeDtypeStruct``s) as ``ShapeDtypeStruct``s with a sharding on
    every leaf: leaves without a ``NamedSharding`` (scalars from ``eval_shape``, single-device
    arrays) get a replicated one on ``mesh`` (default: the mesh of the tree's other leaves)."""
    mesh = mesh if mesh is not None else _find_mesh(tree)
    fallback = (
        NamedSharding(mesh, PartitionSpec())
        if mesh is not None
        else SingleDeviceSharding(jax.devices()[0])
    )

    def one(leaf: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            sharding = fallback
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


# --------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Periodic, optionally asynchronous orbax checkpoints that keep the last ``keep`` steps.

    ``async_save=True`` returns from :meth:`save` once the arrays are copied off the devices
    (so the caller may donate them to the next train step) and writes files in a background
    thread; :meth:`wait` blocks until the last save is committed. A step directory only counts
    as a checkpoint once committed, so a crash mid-write never yields a half checkpoint.
    Every process must call ``save`` / ``restore`` (the writes are collective).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        # epath: local paths and object stores (gs://...) alike, as orbax itself uses.
        directory = os.fspath(directory)
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self.save_every, self.keep = save_every, keep
        self._existed = self.directory.is_dir()
        self._last_saved: int | None = None  # includes a save still being written
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save killed mid-write
            enable_async_checkpointing=async_save,
        )
        handlers = {
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            EXTRA_ITEM: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int, force: bool = False) -> bool:
        """Whether :meth:`save` would write ``step``: every ``save_every`` steps or when forced,
        never twice for the same step (a forced save right after a periodic one is a no-op)."""
        if step == self._last_saved or step in self.all_steps():
            return False
        return force or step % self.save_every == 0

    def save(
        self, step: int, state: Any, extra: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Save ``state`` and the JSON ``extra`` as ``step`` if :meth:`should_save`; returns
        whether a save was started. ``extra`` is validated (and made JSON-safe) here, so a bad
        value fails in the caller rather than in the background writer."""
        step = int(step)
        if not self.should_save(step, force):
            return False
        meta = {
            "format": FORMAT,
            "step": step,
            "time": time.time(),
            "extra": json_safe(extra or {}),
        }
        json.dumps(meta, allow_nan=False)
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(meta)}
        )
        saved = bool(self._manager.save(step, args=args, force=True))
        if saved:
            self._last_saved = step
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def wait(self) -> None:
        """Block until the pending async save (if any) is committed; re-raises its error."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's background threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ listing
    def all_steps(self) -> list[int]:
        """Checkpoint steps, ascending. A step whose async save is still being written is
        included (orbax records it at ``save``); :meth:`wait` first for committed-only."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step (see :meth:`all_steps`), or None when there is none (fresh run)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # ------------------------------------------------------------------ restoring
    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            what = "holds no finished checkpoint" if self._existed else "does not exist"
            raise CheckpointNotFoundError(
                f"cannot resume: checkpoint directory {self.directory} {what}"
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (available: {steps})"
            )
        return step

    def read_extra(self, step: int | None = None) -> dict[str, Any]:
        """The caller's ``extra`` dict of ``step`` (default latest), without touching arrays
        (e.g. to read the saved config before building the abstract state)."""
        step = self._resolve_step(step)
        path = self.step_dir(step) / EXTRA_ITEM / EXTRA_FILE
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointCorruptError(f"checkpoint metadata file {path} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointCorruptError(f"checkpoint metadata {path} is unreadable: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointCorruptError(f"{path}: not a {FORMAT} metadata object")
        if meta.get("step") != step or not isinstance(meta.get("extra"), dict):
            raise CheckpointCorruptError(
                f"{path}: records step {meta.get('step')!r} (expected {step}) or lacks 'extra'"
            )
        return meta["extra"]

    def _check_tree(self, step: int, target: Any) -> None:
        """Compare the stored tree with ``target`` key by key; name the first differences."""
        path = self.step_dir(step) / STATE_ITEM
        try:
            stored_tree = self._manager.metadata(step).item_metadata[STATE_ITEM].tree
        except Exception as e:
            msg = f"checkpoint state metadata in {path} is unreadable: {e}"
            raise CheckpointCorruptError(msg) from e
        stored, wanted = _flat(stored_tree), _flat(target)
        missing = sorted(set(wanted) - set(stored))
        unexpected = sorted(set(stored) - set(wanted))
        problems = [f"key {k!r} is in the target state but not in the checkpoint" for k in missing]
        problems += [f"key {k!r} is in the checkpoint but not in the target" for k in unexpected]
        for key in sorted(set(stored) & set(wanted)):
            s, w = stored[key], wanted[key]
            if tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(w.dtype):
                problems.append(
                    f"key {key!r}: checkpoint has {np.dtype(s.dtype).name}{list(s.shape)}, "
                    f"target wants {np.dtype(w.dtype).name}{list(w.shape)}"
                )
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointMismatchError(
                f"checkpoint {path} does not match the state: " + "; ".join(problems[:5]) + more
            )

    def restore(
        self, step: int | None = None, *, abstract_state: Any, mesh: Mesh | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, extra)`` of ``step`` (default: the latest) into ``abstract_state``.

        ``abstract_state`` has the structure of the state and ``ShapeDtypeStruct`` (or array)
        leaves; each restored leaf gets that leaf's sharding (scalars without a
        ``NamedSharding`` are replicated on ``mesh`` / the tree's mesh, see module docs).
        Raises :class:`CheckpointNotFoundError`, :class:`CheckpointMismatchError` or
        :class:`CheckpointCorruptError`, each naming the path.
        """
        self.wait()  # a save still in flight becomes restorable
        step = self._resolve_step(step)
        extra = self.read_extra(step)
        target = abstract_target(abstract_state, mesh)
        self._check_tree(step, target)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
        try:
            restored = self._manager.restore(step, args=args)
        except (OSError, ValueError) as e:
            raise CheckpointCorruptError(
                f"cannot read checkpoint arrays in {self.step_dir(step) / STATE_ITEM}: {e}"
            ) from e
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored[STATE_ITEM], extra
