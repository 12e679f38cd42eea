"""The policy of a training run's checkpoint: restored (`load_checkpoint_policy`) or exported as
a HF directory (`export_checkpoint`, the library side of `rlver-jax export`).

The checkpoint is read with the trainer's checkpoint module (`rl.checkpoint.Checkpointer`: step
listing and the JSON sidecar holding the run's config); only the policy params are restored
from the orbax `state` item (a partial restore: optimiser states, critic and reference model
stay on disk). The model's architecture and tokenizer come from the saved config's `model`
spec. The HF directory (`models.hf_io.export_hf`: safetensors weights, config.json,
generation_config.json, tokenizer files) loads with `transformers.AutoModelForCausalLM` and
with `ModelSpec(source="hf", path=HFDIR)`.

`DIR` may be a run's output directory (holding `checkpoints/`), its `checkpoints/` directory or
one step directory `checkpoints/<step>`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from rlver_jax.model_io.loader import ModelSpec
    from rlver_jax.model_io.tokenizer import Tokenizer
    from rlver_jax.models.config import ModelConfig
    from rlver_jax.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """A policy restored from a training checkpoint."""

    params: Any
    model_config: ModelConfig
    tokenizer: Tokenizer
    model_spec: ModelSpec
    run_config: RunConfig | None  # None when the saved config no longer parses (see log)
    step: int
    directory: Path  # the checkpoints directory


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoints directory, step or None for the latest) of a run, checkpoints or step dir."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if path.is_dir():
        return path, None
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")


def model_config_and_tokenizer(spec: ModelSpec) -> tuple[ModelConfig, Tokenizer]:
    """The ModelConfig and tokenizer of a model spec, without loading weights (except GGUF)."""
    from rlver_jax.model_io.loader import load_model
    from rlver_jax.model_io.tokenizer import Tokenizer
    from rlver_jax.models.config import ModelConfig

    if spec.source == "random":
        return spec.model_config(), Tokenizer.tiny()
    if spec.source in ("hf", "smollm2"):
        if spec.source == "hf":
            path = Path(spec.path or "")
        else:
            from rlver_jax.model_io.default_model import default_hf_dir

            path = default_hf_dir()
        return ModelConfig.from_hf_dir(path, **spec.runtime), Tokenizer.from_hf_dir(path)
    _, config, tok = load_model(spec)
    return config, tok


def load_checkpoint_policy(
    path: str | Path, step: int | None = None, mesh: Mesh | None = None
) -> CheckpointPolicy:
    """Restore the policy params of a training checkpoint (latest step unless given), placed
    with `models.sharding.param_shardings` on `mesh` when given (host numpy arrays otherwise)."""
    import jax
    import orbax.checkpoint as ocp

    from rlver_jax.config_io import ConfigError, from_dict, load_yaml
    from rlver_jax.model_io.loader import ModelSpec
    from rlver_jax.models.transformer import param_shapes
    from rlver_jax.rl.checkpoint import STATE_ITEM, Checkpointer, CheckpointNotFoundError
    from rlver_jax.run_config import RunConfig

    directory, dir_step = resolve_checkpoint_dir(path)
    step = step if step is not None else dir_step
    ckpt = Checkpointer(directory, save_every=1, keep=1 << 30, async_save=False)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise CheckpointNotFoundError(f"{directory} holds no finished checkpoint")
        extra = ckpt.read_extra(step)
        state_dir = Path(str(ckpt.step_dir(step))) / STATE_ITEM
    finally:
        ckpt.close()
    saved = extra.get("config")
    if not isinstance(saved, dict):  # fall back to the run's config.yaml next to checkpoints/
        saved = load_yaml(directory.parent / "config.yaml")
    spec = from_dict(ModelSpec, saved.get("model"), "model")
    try:
        run_cfg: RunConfig | None = from_dict(RunConfig, saved)
    except ConfigError as e:  # only the model spec is needed to restore the policy
        log.warning("the checkpoint's saved config does not parse (%s); using its model only", e)
        run_cfg = None
    config, tok = model_config_and_tokenizer(spec)
    shapes = param_shapes(config)
    if mesh is not None:
        from rlver_jax.models.sharding import param_shardings

        shapes = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            param_shardings(config, mesh),
        )
    target = {"policy": shapes}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(state_dir, args=args)
    return CheckpointPolicy(restored["policy"], config, tok, spec, run_cfg, int(step), directory)


def export_checkpoint(path: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write the policy of a training checkpoint as a HF directory; returns `out_dir`."""
    from rlver_jax.model_io.hf_io import export_hf

    policy = load_checkpoint_policy(path, step)
    return export_hf(policy.params, policy.model_config, out_dir, policy.tokenizer)
