"""Helpers shared by several test files: the tiny model and sampler buckets of the sampling and
kernel tests, random params, a per-layer KV cache, tiny random HF torch models of each family
(the independent reference of the parity tests), and the tiny run config and checkpoint of the
evaluation and experiment tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlver_jax.model_io.weight_map import leaf_from_hf
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.kv_cache import KVCache
from rlver_jax.models.transformer import param_shapes
from rlver_jax.rl.learner import Learner, TrainState
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.trajectories import Trajectories

# --------------------------------------------------------------------------- tiny sampler model
CONFIG = ModelConfig(
    family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16,
)  # fmt: skip
BUCKETS = SamplerConfig(prompt_buckets=(16,), batch_buckets=(4, 8), new_token_buckets=(16,))
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
PAD = 0


def random_params(config: ModelConfig, seed: int = 0, std: float = 0.3) -> dict:
    """Random N(0, std) weights of `config`'s shape in its param dtype, made on the host (an
    eager `init_params` would compile dozens of tiny ops)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), config.param_dtype),
        param_shapes(config),
    )


def unstack_cache(cache: KVCache) -> KVCache:
    """`cache` (a stacked one, as `transformer.forward` fills it) with one buffer per layer, the
    form `decode_step.decode_step` takes; a per-layer cache is returned as it is."""
    if cache.per_layer:
        return cache
    return cache.replace(k=tuple(cache.k), v=tuple(cache.v))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- HF torch references
TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def tiny_torch_model(family: str, seed: int = 0, tie: bool = False, **overrides: Any) -> Any:
    """A random-init transformers model of `family` ("llama", "qwen2", "qwen3")."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    kwargs = dict(TINY, tie_word_embeddings=tie, **overrides)
    kwargs.setdefault("rope_theta", 10000.0 if family == "llama" else 1e6)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # Random norm scales and biases: HF initialises them to 1 and 0, which would hide bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def params_from_torch(model: Any, config: ModelConfig) -> dict:
    """Our params from a torch model's state dict (through the shared weight map)."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaves = [
        leaf_from_hf(tuple(k.key for k in path), state.__getitem__, config, np.float32)
        for path, _ in flat
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def torch_logits(model: Any, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY_CONFIG = """\
name: tiny_eval
seed: 0
output_dir: {out}
model: {{source: random, family: qwen2, hidden_size: 32, intermediate_size: 64, num_layers: 1,
        num_heads: 2, num_kv_heads: 1, head_dim: 16}}
mesh: {{data: 1, fsdp: -1, tensor: 1}}
scaffold: {{mode: think, language: en, format_break_reward: null}}
user: {{kind: reference, reference: {{language: en, max_reply_tokens: 8}}}}
dynamics: {{max_turns_train: 1, max_turns_eval: 2}}
data: {{profile_set: en}}
rollout: {{profiles_per_batch: 2, samples_per_profile: 1, max_reply_tokens: 8,
          max_prompt_tokens: 1016, temperature: 1.0, seq_len_buckets: [512, 1024]}}
learner: {{algorithm: ppo, actor_lr: 1.0e-3, critic_lr: 3.0e-3, actor_warmup_ratio: 0.0,
          critic_warmup_ratio: 0.0, total_steps: 2, mini_batch_size: 2, micro_batch_size: 2,
          seq_buckets: [512, 1024]}}
trainer: {{steps: 2, checkpoint_every: 1, async_checkpoint: false, tensorboard: false,
          progress_bar: false, fast_compile: true}}
"""


# --------------------------------------------------------------------------- tiny run (eval)
def write_tiny_config(path: Path, out: Path) -> Path:
    """A test-local tiny RunConfig YAML (1-layer random model, 2 eval turns) at `path`."""
    path.write_text(TINY_CONFIG.format(out=out), encoding="utf-8")
    return path


def write_checkpoint(run_dir: Path, config: Path | Any, step: int = 3, shift: float = 0.0) -> Any:
    """A checkpoint in the trainer's layout (`run_dir/checkpoints/<step>`: the whole TrainState
    plus the JSON extra with the run config); the policy is the config's random init + `shift`.
    Returns the policy params."""
    from rlver_jax.model_io.loader import load_model
    from rlver_jax.rl.checkpoint import Checkpointer, checkpoint_extra
    from rlver_jax.rl.learner import Learner
    from rlver_jax.run_config import load_run_config, run_config_dict

    cfg = load_run_config(config) if isinstance(config, Path) else config
    params, mcfg, _ = load_model(cfg.model)
    params = jax.tree.map(lambda x: x + shift, params)
    key = jax.random.key_data(jax.random.key(0))
    state = Learner(mcfg, cfg.learner).init_state(params, key)
    with Checkpointer(run_dir / "checkpoints", save_every=1, keep=2, async_save=False) as ckpt:
        ckpt.save(step, state, checkpoint_extra(seed=0, config=run_config_dict(cfg)))
    return params


# --------------------------------------------------------------------------- learner tests
# The tiny random Llama, learner settings and trajectories the learner tests share.
FAST = {"xla_backend_optimization_level": 0}
MCFG = ModelConfig(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
N, T = 8, 32
BASE = dict(
    seq_buckets=(T,),
    actor_lr=1e-3,
    critic_lr=4e-3,
    actor_warmup_ratio=0.0,
    critic_warmup_ratio=0.0,
    total_steps=100,
)


def make_traj(seed: int, n: int = N, t: int = 24, scores: np.ndarray | None = None) -> Trajectories:
    """Prompt (4 tokens), policy turn, user turn (3 tokens), policy turn of random length."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MCFG.vocab_size, (n, t)).astype(np.int32)
    lengths = rng.integers(16, t + 1, n)
    token_mask = np.arange(t)[None] < lengths[:, None]
    loss_mask = np.zeros((n, t), bool)
    loss_mask[:, 4:10] = True
    loss_mask[:, 13:] = True
    loss_mask &= token_mask
    scores = (np.arange(n) % 2).astype(np.float32) if scores is None else scores
    rewards = np.zeros((n, t), np.float32)
    rewards[np.arange(n), lengths - 1] = scores
    return Trajectories(
        tokens=tokens,
        token_mask=token_mask,
        loss_mask=loss_mask,
        sampler_logprobs=np.zeros((n, t), np.float32),
        rewards=rewards,
        scores=scores.astype(np.float32),
        group_ids=(np.arange(n) // 4).astype(np.int32),
        dialogue_ids=np.arange(n, dtype=np.int32),
        format_ok=np.ones(n, bool),
    )


def host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees(a: Any, b: Any, atol: float = 0.0) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if atol == 0.0:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def max_delta(a: Any, b: Any) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip


def row_logprob(learner: Learner, state: TrainState, traj: Trajectories) -> np.ndarray:
    """Mean logprob of each row's policy tokens under the current policy."""
    old, _ = learner.compute_old(state, traj)
    lp, m = np.asarray(old.logprobs), np.asarray(traj.loss_mask, np.float32)
    return (lp * m).sum(1) / m.sum(1)
