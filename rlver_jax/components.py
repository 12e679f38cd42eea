"""Build the pieces of a run from a `RunConfig`: mesh, policy + sampler, simulated user,
profiles and rollout engine. Commands (rollout, train, eval) share these builders."""

from __future__ import annotations

from typing import Literal

from jax.sharding import Mesh

from rlver_jax.env.dynamics import EmotionDynamicsConfig
from rlver_jax.env.profiles import Profile, load_builtin_profiles, load_profiles
from rlver_jax.env.rollout import RolloutEngine
from rlver_jax.env.user import SimulatedUser
from rlver_jax.model_io.loader import ModelSpec, load_model
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.models.sharding import param_shardings
from rlver_jax.models.transformer import Params
from rlver_jax.parallel import distributed
from rlver_jax.parallel.mesh import make_mesh
from rlver_jax.run_config import RunConfig
from rlver_jax.sampling.sampler import Sampler

Split = Literal["train", "test"]


def build_mesh(cfg: RunConfig) -> Mesh:
    """Start jax.distributed when the environment asks for it, then the (data, fsdp, tensor)
    mesh over every device of every host."""
    distributed.initialize()
    return make_mesh(cfg.mesh)


def build_policy(
    spec: ModelSpec, mesh: Mesh, cfg: RunConfig
) -> tuple[Params, object, Tokenizer, Sampler]:
    """(params placed on the mesh in the learner's layout, ModelConfig, tokenizer, sampler with
    the rollout's rules: the rollout engine makes its sampling copy, `Sampler.rollout_params`)."""
    rules = cfg.mesh.learner_rules
    params, config, tok = load_model(spec, lambda c: param_shardings(c, mesh, rules))
    sampler = Sampler(
        config,
        mesh=mesh,
        pad_id=tok.pad_id,
        stop_token_ids=tok.stop_token_ids,
        sampler_config=cfg.sampler,
        rules=cfg.mesh.sampler_rules,
        seed=cfg.seed,
    )
    return params, config, tok, sampler


def build_user(cfg: RunConfig, mesh: Mesh, policy_tokenizer: Tokenizer) -> SimulatedUser:
    """The simulated user named by `cfg.user.kind` (an LLM user runs on the policy's mesh)."""
    if cfg.user.kind == "reference":
        from rlver_jax.env.reference_user import ReferenceUser

        return ReferenceUser(policy_tokenizer, cfg.user.reference)
    from rlver_jax.env.llm_user import LLMUser

    rules = cfg.mesh.sampler_rules  # the user only decodes and judges: loaded in that layout
    params, config, tok = load_model(cfg.user.model, lambda c: param_shardings(c, mesh, rules))
    return LLMUser(params, config, tok, cfg.user.llm, mesh=mesh, rules=rules)


def load_split(cfg: RunConfig, split: Split) -> tuple[Profile, ...]:
    """The profiles of a split: a packaged set or the config's own JSONL files."""
    path = cfg.data.train_path if split == "train" else cfg.data.test_path
    if path is not None:
        return load_profiles(path, cfg.data.language or "en")
    return load_builtin_profiles(cfg.data.profile_set, split)


def build_engine(
    cfg: RunConfig,
    sampler: Sampler,
    tokenizer: Tokenizer,
    user: SimulatedUser,
    dynamics: EmotionDynamicsConfig | None = None,
) -> RolloutEngine:
    return RolloutEngine(
        sampler, tokenizer, user, cfg.scaffold, cfg.rollout, dynamics or cfg.dynamics
    )
