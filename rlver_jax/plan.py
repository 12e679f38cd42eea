"""Per-device memory plan of a run, before launch: what each component needs on ONE device.

    plan = plan_memory(cfg, policy_config, user_config, num_devices=16, device_memory=95e9)
    print(plan.peak, plan.fits)

Every weight-like tensor is divided by its real shard count (`plan_sizes`): its logical axes
go through `rules.logical_to_spec` on the real shape, on an abstract mesh of the config's
(data, fsdp, tensor) sizes, so a dimension the mesh does not divide is replicated exactly as at
run time. Notation below: L layers, D hidden, F mlp, H / K query / kv heads, Dh head dim, V
vocab; X' = X divided by its mesh split (H', K', F', V' over `tensor`; rows over data x fsdp);
p / b = bytes of the param / compute dtype.

Resident (whole run):
  params          sum over weights of numel x p / shards          (policy; reference if
                                                                    kl_coef > 0; LLM user)
  AdamW moments   optax's own state of `LearnerConfig.optimizers()` (eval_shape of its init):
                  mu and nu sharded like their params, 2 x params in the param dtype by default
                  (the params themselves are the master copy; no separate fp32 copy)
  critic (PPO)    backbone without lm_head + value head, and its own 2 moments

Phases (their transients never overlap; the peak is resident + the largest phase group):
  init     the loaded policy weights while `Learner.init_state` copies them: 1 x params
  rollout  policy sampler | LLM-user sampler | LLM-user judge, one at a time:
             KV cache      2 x L x B' x (P + N) x K' x Dh x b   (B: batch bucket rounded to a
                           multiple of data x fsdp, P / N: prompt / new-token buckets)
             prefill       m x [P x (2 D + H' Dh + 2 K' Dh + F') x b + Pq x H' x S x a],
                           S = P, a = 8 (+ b when b < 4): f32 scores, their f32 exponentials
                           e = exp(s - max s) and e's cast to a narrower compute dtype for the
                           value product; Pq = min(P, attention_block), or Tc when the prompt
                           attends in causal blocks (Tc = `ModelConfig.causal_block` where the
                           prefill's attention resolves to xla_causal or the CPU kernel, i.e.
                           on CPU under auto; its last block, Tc queries over all P keys)
                           (the sampler's prefill attends over the prompt block alone,
                           `forward(empty_cache=True)`; the judge's over S = P + C slots)
             judge         22 x the prompt cache (the prompt cache and its 21 candidate copies,
                           S = P + C) + 2 x 21 x B' x C x V' x 4 (candidate log-softmax)
  old      forward-only pass of `Learner.compute_old` over m_f rows (forward micro-batch):
           max(prefill(m_f, T, T), m_f x T x V' x 4) (one layer or the fp32 logits); when the
           vocabulary projection runs in blocks (`rl.model_outputs.vocab_block(T)`: 64 target
           positions when 64 divides T) two blocks instead of T
  train    per model (actor, then critic): fp32 gradient accumulator (numel x 4 / shards)
           (+ the embedding's dense fp32 gradient, V x D x 4 / shards, for the critic; the
           actor's blocked vocabulary projection accumulates its own in place) + activations of a
           micro-batch of m rows x T tokens (T: the learner's sequence bucket):
             layer(m, T, S) = m x [T x (8 D + 3 H' Dh + 3 K' Dh + 6 F') x b
                                   + Tq x H' x S x r], Tq = min(T, attention_block)
                              r: bytes per score that the backward pass needs, the f32
                              exponentials e = exp(s - max s) and their cast to the compute
                              dtype that the value product reads (`attention` normalises after
                              that product: no probabilities are kept). r = 4 + b as a scanned
                              layer's residuals (two stacked arrays, even when b = 4);
             layer_r(m, T, S) = the same for a layer or block recomputed under
                              `jax.checkpoint`, r = 4 (+ b when b < 4): a cast to a 4-byte
                              dtype is no copy there
                              (blocked attention: one block's scores at a time, recomputed)
             logits(m, T)   = 5 x m x block x V' x 4 (fp32 logits, log-softmax, softmax for the
                                                      entropy and their gradients; actor only)
             remat none: L x layer + logits (blocked attention: L x layer without scores
                         + 1.5 x one block's scores of layer_r)
             remat full: L x m x T x D x b + max(logits, 1.5 x layer_r)
             remat dots: L x saved + max(logits, 1.5 x layer_r - saved),
                         saved = m x T x (2 D + H' Dh + 2 K' Dh + 2 F') x b (the dot outputs
                         the policy keeps: read back, not recomputed)
           + the learner batch (N x T x 32 bytes / rows split).
  FSDP     with fsdp > 1 every group also holds one layer (twice in training: its gradient
           before the reduce-scatter) and the lm_head all-gathered (split over `tensor` only;
           not in the actor's train step when its vocabulary projection runs in blocks).

The activation coefficients (8, 3, 3, 6, 5) were fitted to XLA's buffer assignment on CPU
(`compiled.memory_analysis()`, tests/test_plan.py checks the whole plan against it within 20%);
TPU/GPU fusion usually keeps fewer copies, so on accelerators the plan errs on the safe side.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from jax.sharding import AbstractMesh

from rlver_jax.kernels import select
from rlver_jax.models.attention import query_block
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import param_logical_axes, param_shapes
from rlver_jax.models.value_head import value_logical_axes, value_param_shapes
from rlver_jax.parallel.mesh import MESH_AXES
from rlver_jax.plan_sizes import (
    abstract_mesh,
    count,
    decode_weight_bytes,
    kv_cache_bytes,
    opt_state_bytes,
    rows_per_device,
    shard_count,
    split,
    tree_bytes,
)
from rlver_jax.rl.model_outputs import vocab_block
from rlver_jax.run_config import RunConfig
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.step_shapes import (
    CANDIDATE_WIDTH,
    JUDGE_CANDIDATES,
    StepShapes,
    learner_shape,
    step_shapes,
    user_sampler_config,
)

Phase = Literal["resident", "init", "rollout", "old", "train"]
GB = 1e9
C_EMBED, C_Q, C_KV, C_MLP, C_LOGITS, C_LOGITS_FWD, C_DECODE = 8, 3, 3, 6, 5, 1, 16
C_RECOMPUTE = 1.5  # remat: a recomputed layer's activations + its backward temporaries
BATCH_BYTES_PER_TOKEN = 32  # tokens, masks and the float32 columns of a LearnerBatch


@dataclasses.dataclass(frozen=True)
class Component:
    """Bytes one device holds for one thing; `group`s of a phase never coexist."""

    name: str
    phase: Phase
    nbytes: int
    formula: str
    group: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Components, device memory and the mesh they were planned for."""

    components: tuple[Component, ...]
    device_memory: int
    mesh: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def resident(self) -> int:
        """Bytes held for the whole run (params, optimiser states)."""
        return sum(c.nbytes for c in self.components if c.phase == "resident")

    def group_totals(self) -> dict[tuple[str, str], int]:
        """(phase, group) -> bytes of that transient group."""
        out: dict[tuple[str, str], int] = {}
        for c in self.components:
            if c.phase != "resident":
                out[(c.phase, c.group)] = out.get((c.phase, c.group), 0) + c.nbytes
        return out

    @property
    def peak_phase(self) -> tuple[str, str]:
        """The (phase, group) whose transients set the peak."""
        totals = self.group_totals()
        return max(totals, key=totals.__getitem__) if totals else ("resident", "")

    @property
    def peak(self) -> int:
        """resident + the largest transient group of any phase: the per-device need."""
        return self.resident + max(self.group_totals().values(), default=0)

    def fits(self, margin: float = 0.05) -> bool:
        """peak <= (1 - margin) x device memory (margin: fragmentation, compiler scratch)."""
        return self.peak <= (1.0 - margin) * self.device_memory


def gathered_bytes(
    c: ModelConfig, mesh: AbstractMesh, copies: int, phase: Phase, group: str,
    with_head: bool = True,
) -> Component:  # fmt: skip
    """FSDP all-gathers each weight inside its matmul, split over `tensor` only: `copies` x one
    layer (2 in training: its gradient before the reduce-scatter) + the vocabulary projection
    (lm_head, or the tied embedding) unless `with_head` is False: the train step's blocked
    projection (`rl.model_outputs`) gathers the head inside its own forward and backward, away
    from the layers' activation peak. Nothing when fsdp = 1."""
    axes, shapes = param_logical_axes(c), param_shapes(c)
    local = abstract_mesh({**mesh.shape, "fsdp": 1})
    layer = tree_bytes(axes["layers"], shapes["layers"], local) // c.num_layers
    k = "lm_head" if "lm_head" in axes else "embed"
    head = tree_bytes([axes[k]], [shapes[k]], local)
    head = head if with_head else 0
    nbytes = 0 if mesh.shape["fsdp"] == 1 else copies * layer + head
    what = f"{copies} x 1 layer" + (f" + {k}" if with_head else "")
    return Component("FSDP-gathered weights", phase, nbytes, f"{what}, / tensor only", group)


# --------------------------------------------------------------------------- formulas
def score_bytes(
    c: ModelConfig, rows: int, T: int, S: int, mesh: AbstractMesh, recomputed: bool = False
) -> int:
    """What the backward pass needs of one attention block's scores: rows x Tq x H' x S x r,
    the f32 exponentials e = exp(s - max s) and their cast to the compute dtype that the value
    product reads (`attention` normalises after that product, so no probabilities are kept).
    r = 4 + b as the residuals of a scanned layer (two stacked arrays even when b = 4);
    r = 4 (+ b when b < 4) when `recomputed` under `jax.checkpoint` (a remat layer, an
    attention block), where a cast to a 4-byte dtype is no copy."""
    b, H = np.dtype(c.dtype).itemsize, split(c.num_heads, "act_heads", mesh)
    r = 4 + (b if b < 4 or not recomputed else 0)
    return rows * query_block(c, T) * H * S * r


def layer_bytes(
    c: ModelConfig, rows: int, T: int, S: int, mesh: AbstractMesh, recomputed: bool = False
) -> int:
    """Activations of one layer for `rows` local rows of T queries over S keys: as its
    residuals (no remat), or as a `recomputed` layer holds them (`score_bytes`)."""
    b = np.dtype(c.dtype).itemsize
    H, K = split(c.num_heads, "act_heads", mesh), split(c.num_kv_heads, "act_kv_heads", mesh)
    F, Dh = split(c.intermediate_size, "act_mlp", mesh), c.head_dim
    linear = (C_EMBED * c.hidden_size + C_Q * H * Dh + C_KV * K * Dh + C_MLP * F) * b
    return rows * T * linear + score_bytes(c, rows, T, S, mesh, recomputed)


def saved_bytes(c: ModelConfig, rows: int, T: int, mesh: AbstractMesh) -> int:
    """What a remat policy keeps for the backward pass of all L layers (blocked attention
    keeps no scores: each block recomputes its own in the backward pass, one block at a time,
    counted here without remat as C_RECOMPUTE x one recomputed block's)."""
    b, L, D = np.dtype(c.dtype).itemsize, c.num_layers, c.hidden_size
    if c.remat == "none":
        if query_block(c, T) < T:
            scores = score_bytes(c, rows, T, T, mesh)
            block = int(C_RECOMPUTE * score_bytes(c, rows, T, T, mesh, recomputed=True))
            return L * (layer_bytes(c, rows, T, T, mesh) - scores) + block
        return L * layer_bytes(c, rows, T, T, mesh)
    if c.remat == "full":
        return L * rows * T * D * b
    H, K = split(c.num_heads, "act_heads", mesh), split(c.num_kv_heads, "act_kv_heads", mesh)
    F = split(c.intermediate_size, "act_mlp", mesh)
    return L * rows * T * (2 * D + (H + 2 * K) * c.head_dim + 2 * F) * b


def train_activation_bytes(
    c: ModelConfig, rows: int, T: int, mesh: AbstractMesh, logits: bool
) -> int:
    """Peak activations of one micro-batch's forward + backward (see the module docstring)."""
    V = split(c.vocab_size, "act_vocab", mesh)
    lg = C_LOGITS * rows * vocab_block(T) * V * 4 if logits else 0
    saved = saved_bytes(c, rows, T, mesh)
    if c.remat == "none":
        return saved + lg
    recompute = int(C_RECOMPUTE * layer_bytes(c, rows, T, T, mesh, recomputed=True))
    if c.remat == "dots":  # the layer's saved dot outputs are read back, not recomputed
        recompute -= saved // c.num_layers
    return saved + max(lg, recompute)


# --------------------------------------------------------------------------- the plan
def _models(
    run: RunConfig, policy: ModelConfig, user: ModelConfig | None, mesh: AbstractMesh
) -> list[Component]:
    """Params and optimiser states (resident) and the init-time copy of the loaded weights."""
    p_axes, p_shapes = param_logical_axes(policy), param_shapes(policy)
    pbytes, (actor_opt, critic_opt) = tree_bytes(p_axes, p_shapes, mesh), run.learner.optimizers()
    size = lambda c: f"{count(c.num_params())} x {np.dtype(c.param_dtype).itemsize} B"
    moments = lambda opt, axes, shapes: opt_state_bytes(opt, axes, shapes, mesh)
    out = [
        Component("policy params", "resident", pbytes, f"{size(policy)} / shards"),
        Component("policy AdamW moments", "resident", moments(actor_opt, p_axes, p_shapes),
                  "optax mu + nu, sharded like params"),
        Component("loaded policy weights", "init", pbytes, "copied by init_state", "init"),
    ]  # fmt: skip
    if run.learner.uses_critic:
        c_axes, c_shapes = value_logical_axes(policy), value_param_shapes(policy)
        out += [
            Component("critic params", "resident", tree_bytes(c_axes, c_shapes, mesh),
                      "backbone (no lm_head) + value head"),
            Component("critic AdamW moments", "resident", moments(critic_opt, c_axes, c_shapes),
                      "optax mu + nu of the critic"),
        ]  # fmt: skip
    if run.learner.uses_reference:
        out.append(Component("reference params", "resident", pbytes, "kl_coef > 0: 1 x params"))
    if user is not None:
        ubytes = tree_bytes(param_logical_axes(user), param_shapes(user), mesh)
        out.append(Component("LLM user params", "resident", ubytes, f"{size(user)} / shards"))
    return out


def prefill_queries(c: ModelConfig, P: int, causal: bool) -> int:
    """Queries of a P-query block whose scores `attention.attention` holds at once in a
    forward pass: `query_block`, or with `causal` (the queries' own keys, no cache) the causal
    block ``c.causal_block`` when it splits an unblocked P (its last block attends all P keys)."""
    block, Tc = query_block(c, P), c.causal_block
    return Tc if causal and block == P and 0 < Tc < P else block


def prefill_bytes(
    c: ModelConfig, rows: int, P: int, S: int, mesh: AbstractMesh, causal: bool = False
) -> int:
    """One layer of a forward-only prefill of P tokens over S cache slots:
    rows x [P x (2 D + H' Dh + 2 K' Dh + F') x b + Pq x H' x S x a], a = 8 (+ b when b < 4):
    f32 scores, their f32 exponentials e = exp(s - max s), and e's cast to a narrower
    compute dtype for the value product (`attention`, two batched GEMMs normalised after the
    second), for the Pq = `prefill_queries(c, P, causal)` queries attended at once."""
    b = np.dtype(c.dtype).itemsize
    H, K = split(c.num_heads, "act_heads", mesh), split(c.num_kv_heads, "act_kv_heads", mesh)
    F = split(c.intermediate_size, "act_mlp", mesh)
    linear = (2 * c.hidden_size + (H + 2 * K) * c.head_dim + F) * b
    a = 8 + (b if b < 4 else 0)
    return rows * P * linear + rows * prefill_queries(c, P, causal) * H * S * a


def sampler_choices(
    c: ModelConfig, sc: SamplerConfig, platform: str, devices: int
) -> tuple[bool, int]:
    """(whether the decode is unrolled, the prefill's causal block or 0) of a sampler of `c`
    on `devices` devices of `platform`, resolved by `kernels.select` as the sampler does. The
    CPU prefill kernel is counted as causal blocks: it holds less than their scores."""
    target = select.Target(platform, devices)
    unroll = select.decode_choice(sc.decode, c, target, sc.pallas_blocks).unrolled
    impl = select.attention_choice(c, "prefill", target).impl
    return unroll, c.causal_block if impl in ("xla_causal", "cpu_kernel") else 0


def _sampler(
    label: str, c: ModelConfig, batch: int, P: int, N: int, mesh: AbstractMesh, unroll: bool,
    causal_block: int,
) -> list[Component]:  # fmt: skip
    """One `Sampler` call as two programs that never coexist: prefill (group `label`: KV cache
    + prefill activations, attending in `causal_block`-query blocks, 0: none; see
    `sampler_choices`) and decode (group `label decode`: the donated KV cache + decode-step
    buffers; with `unroll`, an unrolled `sampler.decode`, the prefill fills the
    per-layer cache the decode reads, and a per-layer copy of the layer weights that the sampler
    keeps between calls is resident)."""
    rows = rows_per_device(batch, mesh)
    pre = c.replace(causal_block=causal_block)
    Tc = f", Tc={causal_block}" if prefill_queries(pre, P, True) == causal_block else ""
    V = split(c.vocab_size, "act_vocab", mesh)
    cache = kv_cache_bytes(c, batch, P + N, mesh)
    weights = decode_weight_bytes(c, mesh) if unroll else 0
    dec = f"{label} decode"
    cache_formula = f"2 x L x B={batch} x (P={P} + N={N}) x K x Dh x b"
    return [
        Component(f"{label} KV cache", "rollout", cache, cache_formula, label),
        Component(
            f"{label} prefill", "rollout", prefill_bytes(pre, rows, P, P, mesh, causal=True),
            f"prefill(m={rows}, P={P}, S={P}{Tc})", label,
        ),
        gathered_bytes(c, mesh, 1, "rollout", label),
        Component(f"{dec} KV cache", "rollout", cache, cache_formula, dec),
        Component(
            f"{dec} buffers", "rollout", C_DECODE * rows * V * 4,
            f"{C_DECODE} x m x V' x 4 (logits, top-k/top-p)", dec,
        ),
        Component(f"{label} per-layer weights", "resident", weights,
                  "unrolled sampler.decode: decode_weights (layer params"
                  + (", lm_head" if not c.tie_word_embeddings else "") + "), kept by the sampler"),
        gathered_bytes(c, mesh, 1, "rollout", dec),
    ]  # fmt: skip


def _user(
    run: RunConfig, u: ModelConfig, shapes: StepShapes, mesh: AbstractMesh, platform: str
) -> list[Component]:
    """The LLM user's reply sampler (its decode unrolled and its prefill in causal blocks as
    its own `SamplerConfig` resolves them on `platform`) and its judge (see
    `env/llm_judge.py`)."""
    assert shapes.user is not None and shapes.judge is not None
    reply, judge = shapes.user, shapes.judge
    devices = math.prod(mesh.axis_sizes)
    choices = sampler_choices(u, user_sampler_config(run), platform, devices)
    out = _sampler("user sampler", u, reply.batch, reply.prompt, reply.new_tokens, mesh, *choices)
    Bj, P, C = judge.batch, judge.prompt, judge.new_tokens
    rows, V = rows_per_device(Bj, mesh), split(u.vocab_size, "act_vocab", mesh)
    cache = kv_cache_bytes(u, Bj, P + C, mesh)
    K = JUDGE_CANDIDATES
    # Two programs' worth of memory that never coexist: the prompt's prefill, then the
    # candidates' forward over 21 copies of its cache.
    cand = "user judge candidates"
    out += [
        Component("judge prompt KV cache", "rollout", cache,
                  f"2 x L x B={Bj} x (P={P} + C={C}) x K x Dh x b", "user judge"),
        Component(
            "judge prefill", "rollout", prefill_bytes(u, rows, P, P + C, mesh),
            f"prefill(m={rows}, P={P}, S={P + C})", "user judge",
        ),
        gathered_bytes(u, mesh, 1, "rollout", "user judge"),
        Component(
            "judge KV caches", "rollout", (K + 1) * cache,
            f"(1 + {K}) x 2 x L x B={Bj} x (P={P} + C={C}) x K x Dh x b", cand,
        ),
        Component(
            "judge candidate logits", "rollout", 2 * K * rows * C * V * 4,
            f"2 x {K} x m x C x V' x 4", cand,
        ),
        gathered_bytes(u, mesh, 1, "rollout", cand),
    ]  # fmt: skip
    return out


def _fwd_logit_positions(T: int) -> int:
    """Logit positions a forward-only pass holds: all ``T`` unblocked, else two vocabulary
    blocks (a block's logits and its softmax; fitted as C_LOGITS_FWD was)."""
    block = vocab_block(T)
    return C_LOGITS_FWD * T if block == T else 2 * block


def _learner(run: RunConfig, c: ModelConfig, mesh: AbstractMesh) -> list[Component]:
    """compute_old's forward pass, and the train step of the actor then the critic."""
    s = learner_shape(run, mesh)
    T, m, mf = s.seq, s.micro, s.forward_micro
    V, VD = split(c.vocab_size, "act_vocab", mesh), (c.vocab_size, c.hidden_size)
    embed_grad = math.prod(VD) * 4 // shard_count(("vocab", "embed"), VD, mesh)
    batch = s.rows_per_device * T * BATCH_BYTES_PER_TOKEN
    grads = tree_bytes(param_logical_axes(c), param_shapes(c), mesh, itemsize=4)
    act = train_activation_bytes(c, m, T, mesh, logits=True)
    remat = f"remat={c.remat}, m={m}, T={T}"
    out = [
        Component("actor fp32 grads", "train", grads, "numel x 4", "actor"),
        Component("actor activations", "train", act, remat, "actor"),
        Component("learner batch", "train", batch, f"N={s.rows} x T x 32 B / rows", "actor"),
        Component(
            "old-logprob forward", "old",
            max(prefill_bytes(c, mf, T, T, mesh, causal=True),
                mf * _fwd_logit_positions(T) * V * 4),
            f"max(prefill(m_f={mf}, T, T), m_f x (T | 2 blocks) x V' x 4)", "forward",
        ),
        Component("old outputs", "old", 3 * s.rows_per_device * T * 4, "3 x N x T x 4", "forward"),
        gathered_bytes(c, mesh, 1, "old", "forward"),
        gathered_bytes(c, mesh, 2, "train", "actor", with_head=vocab_block(T) == T),
    ]  # fmt: skip
    if run.learner.uses_critic:
        cgrads = tree_bytes(value_logical_axes(c), value_param_shapes(c), mesh, itemsize=4)
        cact = train_activation_bytes(c, m, T, mesh, logits=False)
        out += [
            Component("critic fp32 grads", "train", cgrads + embed_grad, "numel x 4", "critic"),
            Component("critic activations", "train", cact, remat, "critic"),
            Component("learner batch", "train", batch, "N x T x 32 B / rows", "critic"),
            gathered_bytes(c, mesh, 2, "train", "critic"),
        ]
    return out


def plan_memory(
    run: RunConfig,
    policy: ModelConfig,
    user: ModelConfig | None,
    num_devices: int,
    device_memory: float,
    *,
    user_prompt_tokens: int | None = None,
    candidate_width: int = CANDIDATE_WIDTH,
    platform: str = "tpu",
) -> MemoryPlan:
    """The per-device plan of `run` on `num_devices` devices of `device_memory` bytes.

    `policy` / `user` are the resolved ModelConfigs (user None unless user.kind == "llm").
    `user_prompt_tokens` (default: rollout.max_prompt_tokens + 512 for persona and
    instructions) sizes the LLM user's prompt bucket; `candidate_width` is C, the judge's
    longest candidate in tokens. `platform` ("cpu" or an accelerator) resolves
    `sampler.decode` and `model.attention` as the samplers do (`sampler_choices`).
    """
    sizes = dict(zip(MESH_AXES, run.mesh.shape(num_devices), strict=True))
    mesh = abstract_mesh(sizes)
    ro, sc = run.rollout, run.sampler
    dialogues = ro.profiles_per_batch * ro.samples_per_profile
    shapes = step_shapes(run, user, mesh, user_prompt_tokens, candidate_width)
    B, P, N = shapes.policy.batch, shapes.policy.prompt, shapes.policy.new_tokens
    comps = _models(run, policy, user, mesh)
    choices = sampler_choices(policy, sc, platform, num_devices)
    comps += _sampler("policy sampler", policy, B, P, N, mesh, *choices)
    if user is not None:
        comps += _user(run, user, shapes, mesh, platform)
    comps += _learner(run, policy, mesh)
    notes = []
    dp = sizes["data"] * sizes["fsdp"]
    for key in ("micro_batch_size", "forward_micro_batch_size"):
        value = getattr(run.learner, key) or run.learner.micro_batch_size
        if value % dp:
            notes.append(
                f"learner.{key}={value} is not a multiple of data x fsdp = {dp}: its rows are "
                "replicated (every device computes all of them); use a multiple of it"
            )
    if dialogues > max(sc.batch_buckets):
        notes.append(f"{dialogues} dialogues exceed sampler.batch_buckets (max {B})")
    return MemoryPlan(tuple(comps), int(device_memory), sizes, tuple(notes))
