"""The learner's numerics against independent references (issue 27, item 7).

- bf16 compute with fp32 params (the 7B configs' setting) against the same step in fp32;
- ``remat: full`` and ``remat: dots`` gradients against no remat (scanned and unrolled layers);
- the untied head's blocked VJP (`rl.model_outputs`) at a length where the vocabulary blocks
  really split, against a plain ``log_softmax(hidden @ head)``;
- gradient clipping and the grad-norm metric against optax's ``clip_by_global_norm``, a
  float64 global norm and an optax AdamW step on a gradient taken outside the learner.

Tiny random models; every jit uses ``xla_backend_optimization_level=0`` (fast CPU compiles).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlver_jax.kernels.select import resolve_attention
from rlver_jax.models.config import ModelConfig
from rlver_jax.models.transformer import forward, init_params, positions_from_mask
from rlver_jax.rl import model_outputs
from rlver_jax.rl.learner import Learner, LearnerConfig
from rlver_jax.rl.model_outputs import TARGET_BLOCK, policy_outputs, vocab_block
from rlver_jax.rl.objectives import actor_objective
from rlver_jax.rl.optim import LearnerBatch, clip_by_global_norm
from rlver_jax.trajectories import Trajectories

FAST = {"xla_backend_optimization_level": 0}
# Qwen2.5's layout (q/k/v biases, untied head), as the 7B configs run it, at a tiny size.
MCFG = ModelConfig(
    family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=False,
)  # fmt: skip
N, T = 8, 32
BASE = dict(
    seq_buckets=(T,), actor_lr=1e-3, critic_lr=4e-3, actor_warmup_ratio=0.0,
    critic_warmup_ratio=0.0, total_steps=100,
)  # fmt: skip


def make_traj(seed: int, n: int = N, t: int = T) -> Trajectories:
    """Prompt (4 tokens), policy turn, user turn (3 tokens), policy turn of random length."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MCFG.vocab_size, (n, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, n)
    token_mask = np.arange(t)[None] < lengths[:, None]
    loss_mask = np.zeros((n, t), bool)
    loss_mask[:, 4:10] = True
    loss_mask[:, 13:] = True
    loss_mask &= token_mask
    scores = rng.normal(size=n).astype(np.float32)
    rewards = np.zeros((n, t), np.float32)
    rewards[np.arange(n), lengths - 1] = scores
    return Trajectories(
        tokens=tokens, token_mask=token_mask, loss_mask=loss_mask,
        sampler_logprobs=np.zeros((n, t), np.float32), rewards=rewards, scores=scores,
        group_ids=(np.arange(n) // 4).astype(np.int32), dialogue_ids=np.arange(n, dtype=np.int32),
        format_ok=np.ones(n, bool),
    )  # fmt: skip


def make_batch(seed: int, n: int = N, t: int = T) -> LearnerBatch:
    """A GRPO train batch with old logprobs off the policy's (ratios away from 1)."""
    traj = make_traj(seed, n, t)
    rng = np.random.default_rng(seed + 100)
    lmask = traj.loss_mask.astype(np.float32)
    old = (-4.2 + 0.3 * rng.normal(size=(n, t))).astype(np.float32) * lmask
    adv = rng.normal(size=(n, 1)).astype(np.float32) * lmask
    return LearnerBatch(
        *(jnp.asarray(x) for x in (traj.tokens, traj.token_mask, traj.loss_mask, old, adv))
    )


def host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def leaves_with_paths(tree: Any) -> list[tuple[str, np.ndarray]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), np.asarray(x, np.float64)) for p, x in flat]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def dots(hlo: str) -> list[tuple[str, str, str]]:
    """Every ``stablehlo.dot_general`` of a lowered program: ``(kind, lhs type, rhs type)``
    with kind "attention" (batched over rows and kv heads: the score and value products),
    "vector" (a rank-1 operand or result: the critic's value head, fp32 by design) or
    "projection" (a weight's matmul, forward or backward, the vocabulary head included)."""
    tensor = r"tensor<((?:[0-9?]+x)*)([a-z]+[0-9]*)>"
    sig = re.compile(rf":\s*\({tensor}, {tensor}\)\s*->\s*{tensor}")
    out = []
    for line in hlo.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        (lhs_dims, lhs, rhs_dims, rhs, out_dims, _) = sig.search(line).groups()
        rank1 = any(d.count("x") == 1 for d in (lhs_dims, rhs_dims, out_dims))
        kind = "attention" if "batching_dims" in line else "vector" if rank1 else "projection"
        out.append((kind, lhs, rhs))
    return out


@pytest.fixture(scope="module")
def params() -> Any:
    # std 0.1, not 0.02: logits away from uniform (entropy 4.0 of log 64 = 4.16), and a
    # gradient well above rounding
    init = jax.jit(init_params, static_argnums=(0, 2), compiler_options=FAST)
    return init(MCFG, jax.random.key(0), 0.1)


# --------------------------------------------------------------------------- 1. bf16 compute
# Tolerances. bf16 keeps 8 significant bits: its spacing is 2^-8 = 3.9e-3 relative, one
# rounding is off by at most half of that. The bf16 step rounds every matmul input (the
# activations, and the fp32 weights cast to bf16) and accumulates in fp32; 2 layers, the head
# and the backward chain a few such roundings. The step's scalars are means over ~150 tokens
# (the NLL, the entropy, the value loss), where independent roundings average out: held to
# SCALAR_RTOL = 1e-2 (2.5 bf16 spacings; measured here at most 2e-3) and the grad norms to the
# same. A gradient element sums many products, each a few roundings off, and does not average
# them away: the param deltas of each leaf (linear in its gradient, see below) are held to a
# cosine of 0.998 and a relative L2 error of 0.06 (15 spacings; measured at most 0.022).
# Measured at init std 0.1; a sharper model (std 0.3) roughly triples the gradient errors.
SCALAR_RTOL, NORM_RTOL, MIN_COSINE, DELTA_RTOL = 1e-2, 1e-2, 0.998, 0.06


def update_and_dots(
    mcfg: ModelConfig, cfg: LearnerConfig, params: Any, traj: Trajectories
) -> tuple[Any, Any, dict[str, float], list[tuple[str, str, str]]]:
    """One `Learner.update`: the state before and after (on the host), the metrics, and the
    operand types of every dot of the train-step program it ran (lowered again from the
    abstract arguments it got)."""
    learner = Learner(mcfg, cfg, compiler_options=FAST)
    state = learner.init_state(params, jax.random.key(1))
    before, seen = host(state), {}
    train_step = learner.train_step

    def spy(state: Any, batch: LearnerBatch, **kw: Any) -> Any:
        abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        seen["args"] = jax.tree.map(abstract, (state, batch))
        seen["name"] = "train_on_policy" if kw.get("on_policy") else "train"
        return train_step(state, batch, **kw)

    learner.train_step = spy  # type: ignore[method-assign]
    state, metrics = learner.update(state, traj)
    hlo = learner._fns[(seen["name"], N, T)].lower(*seen["args"]).as_text()
    assert seen["name"] == ("train" if cfg.uses_critic else "train_on_policy")
    return before, host(state), metrics, dots(hlo)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_bf16_compute_step_matches_fp32(algo: str, params: Any) -> None:
    """GRPO (the on-policy step) and PPO (old logprobs, critic): model.dtype bfloat16 with
    fp32 params against float32, same init and data, within the tolerances above."""
    # weight_decay 0 (the delta is all gradient) and adam_eps 1.0 >> |g| (the first Adam step
    # lr * g / (|g| + eps) is then ~linear in g, not lr * sign(g), which would hide errors
    # in the magnitudes and flip the sign of the tiny components on rounding noise)
    cfg = LearnerConfig(
        algorithm=algo, mini_batch_size=N, micro_batch_size=N // 2, weight_decay=0.0,
        adam_eps=1.0, grad_clip=None, **BASE,
    )  # fmt: skip
    traj = make_traj(1)
    results = {
        dtype: update_and_dots(MCFG.replace(dtype=dtype, param_dtype="float32"), cfg, params, traj)
        for dtype in ("float32", "bfloat16")
    }
    (b32, s32, m32, dots32), (b16, s16, m16, dots16) = results["float32"], results["bfloat16"]
    # the bf16 step really ran its matmuls in bf16 (and the fp32 one none), params stay fp32:
    # every weight's product, forward and backward, in bf16; of the attention products at
    # least the forward's (2 per model). Autodiff runs the attention's backward products in
    # fp32 (their cotangents are fp32, from `preferred_element_type=float32`): 4 per model
    # at this commit, allowed here; the critic's [D] value head is fp32 by design.
    assert dots32 and all(d[1:] == ("f32", "f32") for d in dots32), dots32
    n_models = 2 if algo == "ppo" else 1
    proj = [d[1:] for d in dots16 if d[0] == "projection"]
    attn_bf16 = [d for d in dots16 if d[0] == "attention" and d[1:] == ("bf16", "bf16")]
    assert len(proj) >= 16 * n_models and all(d == ("bf16", "bf16") for d in proj), dots16
    assert len(attn_bf16) >= 2 * n_models, dots16
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.policy))

    # at ratio 1 (the first step) the pg loss is -mean(A): the same data, not the model's
    assert m16["actor/pg_loss"] == pytest.approx(m32["actor/pg_loss"], abs=1e-6)
    # the sampler's logprobs are 0, so the gap is the mean NLL of the policy tokens
    keys = ["rollout/logprob_gap_mean", "actor/entropy"]
    keys += ["critic/vf_loss", "critic/vpred_mean"] if algo == "ppo" else []
    for key in keys:
        assert m16[key] == pytest.approx(m32[key], rel=SCALAR_RTOL), key
    assert m16["actor/grad_norm"] == pytest.approx(m32["actor/grad_norm"], rel=NORM_RTOL)
    models = ["policy"] + (["critic"] if algo == "ppo" else [])
    if algo == "ppo":
        assert m16["critic/grad_norm"] == pytest.approx(m32["critic/grad_norm"], rel=NORM_RTOL)
    for model in models:
        d32 = leaves_with_paths(jax.tree.map(np.subtract, getattr(s32, model), getattr(b32, model)))
        d16 = leaves_with_paths(jax.tree.map(np.subtract, getattr(s16, model), getattr(b16, model)))
        for (path, x32), (_, x16) in zip(d32, d16, strict=True):
            assert np.abs(x32).max() > 0, (model, path)  # the step moved every leaf
            assert cosine(x16, x32) > MIN_COSINE, (model, path, cosine(x16, x32))
            rel = np.linalg.norm(x16 - x32) / np.linalg.norm(x32)
            assert rel < DELTA_RTOL, (model, path, rel)


# --------------------------------------------------------------------------- 2. remat
def checkpoints(jaxpr: Any) -> list[Any]:
    """Every ``checkpoint`` (remat) equation of a jaxpr, nested ones included."""
    remat = ("checkpoint", "remat2")  # the primitive's name across JAX versions
    found = [eqn for eqn in jaxpr.eqns if eqn.primitive.name in remat]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += checkpoints(sub)
    return found


@pytest.mark.parametrize("scan", [True, False])
def test_remat_full_and_dots_gradients_equal_no_remat(scan: bool, params: Any) -> None:
    """The actor objective's gradient (PPO clip with off-policy ratios, entropy bonus) does
    not depend on what the backward recomputes. Remat only recomputes the same ops on the
    same inputs, so fp32 agrees to rounding (atol 1e-6)."""
    cfg = LearnerConfig(algorithm="grpo", mini_batch_size=4, micro_batch_size=4, **BASE)
    batch = make_batch(2, n=4)
    count = jnp.sum(batch.loss_mask.astype(jnp.float32))
    grads = {}
    for remat in ("none", "full", "dots"):
        mcfg = resolve_attention(MCFG.replace(scan_layers=scan, remat=remat), "train")
        loss = lambda p, mcfg=mcfg: actor_objective(cfg, mcfg, p, batch, count)[0]
        traced = jax.jit(jax.grad(loss), compiler_options=FAST).trace(params)
        found = checkpoints(traced.jaxpr.jaxpr)
        if remat == "none":
            assert not found
        else:  # one rematerialised layer body (scan) or one per layer (unrolled)
            assert len(found) == (1 if scan else MCFG.num_layers), len(found)
            saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            want = saveable if remat == "dots" else None  # full: save nothing
            assert all(e.params["policy"] == want for e in found), [
                e.params["policy"] for e in found
            ]
        grads[remat] = host(traced.lower().compile()(params))
    assert np.abs(grads["none"]["layers"]["wq"]).max() > 1e-3  # a gradient that means something
    for remat in ("full", "dots"):
        for (path, a), (_, b) in zip(
            leaves_with_paths(grads["none"]), leaves_with_paths(grads[remat]), strict=True
        ):
            np.testing.assert_allclose(b, a, atol=1e-6, rtol=0, err_msg=f"{remat} {path}")


# --------------------------------------------------------------------------- 3. blocked head
HEAD_CFG = ModelConfig(
    family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
    num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
)  # fmt: skip
HEAD_T, HEAD_B, N_BLOCKS, TEMP, ENT = 4 * TARGET_BLOCK, 3, 4, 0.7, 0.3


@functools.cache
def head_case() -> tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Params, tokens, token mask, loss mask and per-token loss weights of the blocked-head
    tests: T=256 splits into 4 blocks of 64 targets; blocks 1 and 3 are needed by no row,
    block 2 by two rows from different columns on, one of them up to its last real token."""
    rng = np.random.default_rng(3)
    init = jax.jit(init_params, static_argnums=(0, 2), compiler_options=FAST)
    params = init(HEAD_CFG, jax.random.key(3), 0.2)
    tokens = rng.integers(1, HEAD_CFG.vocab_size, (HEAD_B, HEAD_T)).astype(np.int32)
    lengths = np.array([HEAD_T, HEAD_T - 7, 3 * TARGET_BLOCK - 20])
    tmask = np.arange(HEAD_T)[None] < lengths[:, None]
    needed = np.zeros((HEAD_B, HEAD_T), bool)
    needed[0, 1:20] = True  # block 0 (column 0 predicts nothing)
    needed[1, 2 * TARGET_BLOCK : 2 * TARGET_BLOCK + 30] = True  # block 2 from its first column
    needed[2, 2 * TARGET_BLOCK + 40 :] = True  # block 2, to row 2's end (masked below)
    needed &= tmask
    weights = rng.normal(size=(HEAD_B, HEAD_T)).astype(np.float32)
    return params, *(jnp.asarray(x) for x in (tokens, tmask, needed, weights))


def plain_outputs(logits: jax.Array, targets: jax.Array, entropy_grad: bool) -> Any:
    """The unblocked reference: ``log_softmax(z)[target]`` and ``-sum softmax(z) log_softmax(z)``
    of fp32 logits ``z`` (already divided by the temperature)."""
    logsm = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logsm, targets[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, axis=-1)
    return logp, ent if entropy_grad else jax.lax.stop_gradient(ent)


def test_blocked_head_case_really_splits_and_skips() -> None:
    _, _, _, needed, _ = head_case()
    assert vocab_block(HEAD_T) == TARGET_BLOCK and HEAD_T // TARGET_BLOCK == N_BLOCKS
    assert vocab_block(T) == T  # the default learner tests' T=32: one block, nothing splits
    used = np.asarray(needed).reshape(HEAD_B, N_BLOCKS, TARGET_BLOCK).any(axis=(0, 2))
    assert used.tolist() == [True, False, True, False]


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_blocked_head_vjp_equals_plain_log_softmax(entropy_grad: bool) -> None:
    """`_blocked_outputs`' hand-written VJP on the untied head: outputs, and gradients w.r.t.
    the head and the hidden states, equal plain autodiff of ``log_softmax(h @ W / temp)``
    (fp32, atol 1e-5); the skipped blocks output zeros and get no hidden-state gradient."""
    params, tokens, _, needed, weights = head_case()
    head = {"lm_head": params["lm_head"]}
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(HEAD_B, HEAD_T, HEAD_CFG.hidden_size)), jnp.float32)
    run = model_outputs._blocked_outputs(HEAD_CFG, TEMP, entropy_grad)
    blocks = lambda x: jnp.swapaxes(x.reshape(HEAD_B, N_BLOCKS, TARGET_BLOCK, *x.shape[2:]), 0, 1)
    unblock = lambda x: jnp.swapaxes(x, 0, 1).reshape(HEAD_B, HEAD_T)
    w = weights * needed

    def blocked(head: Any, hidden: jax.Array) -> tuple[jax.Array, Any]:
        logp, ent = (unblock(o) for o in run(head, blocks(hidden), blocks(tokens), blocks(needed)))
        return jnp.sum(w * (logp + ENT * ent)), (logp, ent)

    def plain(head: Any, hidden: jax.Array) -> tuple[jax.Array, Any]:
        logits = jnp.einsum("btd,dv->btv", hidden, head["lm_head"]) / TEMP
        logp, ent = plain_outputs(logits, tokens, entropy_grad)
        return jnp.sum(w * (logp + ENT * ent)), (logp, ent)

    grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True), compiler_options=FAST)
    (_, out_b), (g_head_b, g_hid_b) = grad(blocked)(head, hidden)
    (_, out_p), (g_head_p, g_hid_p) = grad(plain)(head, hidden)
    cols = np.arange(HEAD_T) // TARGET_BLOCK
    used = np.isin(cols, [0, 2])
    for b, p in zip(out_b, out_p, strict=True):
        np.testing.assert_allclose(np.asarray(b)[:, used], np.asarray(p)[:, used], atol=1e-5)
        assert not np.asarray(b)[:, ~used].any()  # skipped blocks: zeros, not computed
    g_head_b, g_head_p = np.asarray(g_head_b["lm_head"]), np.asarray(g_head_p["lm_head"])
    assert np.abs(g_head_p).max() > 0.1  # a real gradient
    np.testing.assert_allclose(g_head_b, g_head_p, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_hid_b), np.asarray(g_hid_p), atol=1e-5, rtol=1e-5)
    assert not np.asarray(g_hid_b)[:, ~used].any()
    # the gradient reaches exactly the needed targets' hidden states
    reached = np.abs(np.asarray(g_hid_b)).sum(-1) > 0
    np.testing.assert_array_equal(reached, np.asarray(needed))


def test_policy_outputs_untied_blocked_equal_plain_forward() -> None:
    """End to end: `policy_outputs` with ``needed`` (the blocked path, its VJP and the
    alignment to targets) against the model's own unblocked logits, log-softmaxed and
    shifted by hand; gradients w.r.t. every parameter (the head, and the layers through
    the hidden states) agree to 1e-5 (fp32)."""
    params, tokens, tmask, needed, weights = head_case()
    mcfg = resolve_attention(HEAD_CFG, "train")
    w = weights * needed

    def blocked(p: Any) -> tuple[jax.Array, Any]:
        logp, ent = policy_outputs(p, tokens, tmask, mcfg, TEMP, needed=needed)
        return jnp.sum(w * (logp + ENT * ent)), (logp, ent)

    def plain(p: Any) -> tuple[jax.Array, Any]:
        logits, _ = forward(p, tokens, positions_from_mask(tmask), tmask, mcfg)
        logp, ent = plain_outputs(logits[:, :-1] / TEMP, tokens[:, 1:], True)
        logp, ent = (jnp.pad(x, ((0, 0), (1, 0))) for x in (logp, ent))  # column 0: nothing
        return jnp.sum(w * (logp + ENT * ent)), (logp, ent)

    grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST)
    (_, out_b), g_b = grad(blocked)(params)
    (_, out_p), g_p = grad(plain)(params)
    m = np.asarray(needed)
    for b, p in zip(out_b, out_p, strict=True):
        np.testing.assert_allclose(np.asarray(b)[m], np.asarray(p)[m], atol=1e-5)
    assert np.abs(np.asarray(g_p["lm_head"])).max() > 0.1
    for (path, b), (_, p) in zip(leaves_with_paths(g_b), leaves_with_paths(g_p), strict=True):
        np.testing.assert_allclose(b, p, atol=1e-5, rtol=1e-5, err_msg=path)


# --------------------------------------------------------------------------- 4. clipping
def global_norm(tree: Any) -> float:
    """The reference norm: float64 numpy, not the optax function the learner calls."""
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


def random_tree(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shapes = {"a": (3, 5), "b": (7,), "c": {"d": (2, 3, 4), "e": ()}}
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


@pytest.mark.parametrize("ratio", [0.25, 4.0])  # max_norm below / above the gradient's norm
def test_clip_by_global_norm_matches_optax(ratio: float) -> None:
    grads = random_tree(5)
    norm = global_norm(grads)
    max_norm = ratio * norm
    clipped, got_norm = jax.jit(clip_by_global_norm, static_argnums=1)(grads, max_norm)
    want, _ = jax.jit(optax.clip_by_global_norm(max_norm).update)(grads, optax.EmptyState())
    assert float(got_norm) == pytest.approx(norm, rel=1e-6)  # the norm before clipping
    # torch's formula divides by norm + 1e-6 where optax divides by norm: 1e-6 / norm apart
    for (path, g), (_, o) in zip(leaves_with_paths(clipped), leaves_with_paths(want), strict=True):
        np.testing.assert_allclose(g, o, rtol=1e-6 / norm + 1e-6, atol=0, err_msg=path)
    got_clipped_norm = global_norm(clipped)
    assert got_clipped_norm == pytest.approx(min(norm, max_norm), rel=1e-5)
    none, none_norm = clip_by_global_norm(grads, None)
    assert none is grads and float(none_norm) == pytest.approx(norm, rel=1e-6)


@pytest.fixture(scope="module")
def clip_case(params: Any) -> tuple[LearnerBatch, Any, float]:
    """A GRPO batch, its mini-batch mean actor gradient taken in one piece (no accumulation,
    no learner: the independent reference) and that gradient's global norm."""
    batch = make_batch(6)
    cfg = LearnerConfig(algorithm="grpo", mini_batch_size=N, micro_batch_size=N, **BASE)
    count = jnp.sum(batch.loss_mask.astype(jnp.float32))
    mcfg = resolve_attention(MCFG, "train")
    loss = lambda p: actor_objective(cfg, mcfg, p, batch, count)[0]
    grads = jax.jit(jax.grad(loss), compiler_options=FAST)(params)
    return batch, grads, global_norm(grads)


@pytest.mark.parametrize("ratio", [0.2, 5.0])  # grad_clip below / above the gradient's norm
def test_learner_clip_and_grad_norm_match_optax(
    ratio: float, params: Any, clip_case: tuple[LearnerBatch, Any, float]
) -> None:
    """One learner train step (two accumulated micro-batches) reports ``actor/grad_norm`` =
    the global norm of the reference gradient, and moves the params as optax's
    ``clip_by_global_norm`` + ``adamw`` chain does on that gradient. A large Adam eps makes
    the first step ~linear in the clipped gradient (otherwise lr * sign(g): blind to the
    clip's scale); the clipped update must then be ~ratio times the unclipped one."""
    batch, grads, norm = clip_case
    assert norm > 0.05
    # lr 0.5: with eps = 10 |g| the step is ~lr |g| / 10, large against the params' fp32
    # spacing (with lr 1e-2 the rounding of p + delta alone is ~5e-4 of the largest delta)
    lr, eps, wd = 0.5, 10.0 * norm, 0.01
    cfg = LearnerConfig(
        algorithm="grpo", mini_batch_size=N, micro_batch_size=N // 2, adam_eps=eps,
        weight_decay=wd, grad_clip=ratio * norm, **{**BASE, "actor_lr": lr},
    )  # fmt: skip
    learner = Learner(MCFG, cfg, compiler_options=FAST)
    state = learner.init_state(params, jax.random.key(1))
    new_state, metrics = learner.train_step(state, batch)
    assert float(metrics["actor/grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(metrics["actor/skipped"]) == 0.0

    b1, b2 = cfg.betas
    tx = optax.chain(
        optax.clip_by_global_norm(ratio * norm),
        optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd),
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)  # eager: an op per leaf
    ours = jax.tree.map(np.subtract, host(new_state.policy), host(params))
    want = host(updates)
    for (path, a), (_, b) in zip(leaves_with_paths(ours), leaves_with_paths(want), strict=True):
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=path)
    # the clip's scale shows in the update: ~ min(1, ratio) of the unclipped gradient step
    plain = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0)
    unclipped, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    g_part = lambda u: np.concatenate([np.ravel(x) for x in jax.tree.leaves(host(u))])
    decay = -lr * wd * g_part(params)
    got = (g_part(ours) - decay) @ g_part(unclipped) / (g_part(unclipped) @ g_part(unclipped))
    assert got == pytest.approx(min(1.0, ratio), rel=1e-2)  # measured 2e-3 (eps: not linear)
