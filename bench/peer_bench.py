"""The same GRPO step in rlver_jax and in google-tunix, side by side (`python bench/peer_bench.py`;
not installed: it needs tunix, see bench/setup_peer_env.sh).

Both tools, in ONE process, run the same step on the same CPU: ``prompts x group`` rows of a
``prompt_len``-token prompt, ``new_tokens`` sampled tokens each (temperature 1, no stop token:
fixed lengths), then one GRPO update (one optimiser step over the whole batch, clipping 0.2,
token-mean loss, no KL term, AdamW lr 1e-6 with global-norm clipping 1.0) on the
``prompt_len + new_tokens``-token rows. The model is the same tiny Qwen2 shape in both (tied
embeddings, q/k/v biases) with random weights.

- rlver_jax: :class:`~rlver_jax.sampling.Sampler` + :meth:`Learner.update` (GRPO, one
  mini-batch: on-policy, so no compute_old forward, as in tunix); ``trainstep_tok`` is the
  train step alone. By default each group's rows are packed behind one copy of their shared
  prompt (``share_prefixes``, :func:`peer_learner_config`; the same update, fewer tokens
  computed); ``--no-share-prefixes`` trains on the padded rows as tunix does.
- tunix: ``tunix.models.qwen2.model.Qwen2`` + ``RLCluster`` (vanilla rollout: tunix's
  ``Sampler``) + ``GRPOLearner.train``; sampling = ``RLCluster.generate``, training =
  ``RLCluster.update_actor`` (run to completion: the params are blocked on). With
  ``num_iterations=1`` and ``beta=0`` tunix does not recompute old logprobs.

Rates: ``sample_tok_s = rows * new_tokens / sample_s`` and
``train_tok_s = rows * (prompt_len + new_tokens) / train_s``; best of the warm steps (the
first step of each tool compiles). The ``speedup`` row is rlver_jax's speed-up over tunix per
column (tunix seconds / ours, our rate / tunix's: > 1 means rlver_jax is faster); sampling
rates count the tokens each sampler actually returned.

tunix lives only in the peer environment (``bash bench/setup_peer_env.sh``); without it this
command says why and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np

from rlver_jax.bench.common import finish, format_row, header, machine_line

COLUMNS = (
    ("tool", "{}"), ("dtype", "{}"), ("rows", "{}"), ("compile_s", "{:.1f}"),
    ("sample_s", "{:.3f}"), ("sample_tok_s", "{:.0f}"), ("train_s", "{:.3f}"),
    ("train_tok_s", "{:.0f}"), ("trainstep_tok", "{:.0f}"), ("step_s", "{:.3f}"),
)  # fmt: skip
SPEEDUP_COLUMNS = tuple((name, "{}" if fmt == "{}" else "{:.2f}x") for name, fmt in COLUMNS)
SETUP_HINT = "bash bench/setup_peer_env.sh && /tmp/rlver-peer-venv/bin/python bench/peer_bench.py"
EXIT_NO_TUNIX = 2


@dataclasses.dataclass(frozen=True)
class Shape:
    """The shared model shape and GRPO batch (``rows = prompts * group``)."""

    vocab: int = 4096
    hidden: int = 256
    mlp: int = 768
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    prompts: int = 2
    group: int = 4
    prompt_len: int = 64
    new_tokens: int = 64
    dtype: str = "float32"

    @property
    def rows(self) -> int:
        return self.prompts * self.group


def tunix_status() -> tuple[bool, str]:
    """(importable, version or the exact import error)."""
    try:
        import importlib.metadata as md

        import tunix.generate.sampler
        import tunix.rl.grpo.grpo_learner  # noqa: F401

        return True, md.version("google-tunix")
    except Exception as err:  # ImportError, or anything tunix raises while importing
        return False, f"{type(err).__name__}: {err}"


def prompt_ids(shape: Shape, seed: int = 0) -> list[list[int]]:
    """``rows`` prompts (each group of ``group`` rows shares one) of ids in ``[2, vocab)``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(2, shape.vocab, (shape.prompts, shape.prompt_len)).tolist()
    return [p for p in base for _ in range(shape.group)]


def _rates(
    shape: Shape, sampled: int, sample_s: float, train_s: float, step_s: float
) -> dict[str, float]:
    """Seconds and rates of one step; ``sampled``: tokens the sampler actually returned."""
    return {
        "sample_s": sample_s, "train_s": train_s, "step_s": step_s,
        "sample_tok_s": sampled / sample_s,
        "train_tok_s": shape.rows * (shape.prompt_len + shape.new_tokens) / train_s,
    }  # fmt: skip


def peer_learner_config(shape: Shape, share_prefixes: bool = True) -> Any:
    """Our GRPO learner for the peer step. ``share_prefixes``: each group's rows packed into
    one row behind one copy of their prompt (:mod:`rlver_jax.rl.packing`; rows of ``prompt +
    group x new_tokens`` tokens, all in the first micro-batch: the empty ones are skipped);
    the update is the same as on ``rows`` padded rows (tested), computed on fewer tokens."""
    from rlver_jax.rl.optim import LearnerConfig

    s, T = shape, shape.prompt_len + shape.new_tokens
    layout: dict[str, Any] = {"micro_batch_size": s.rows, "seq_buckets": (T,)}
    if share_prefixes:
        grouped = s.prompt_len + s.group * s.new_tokens
        layout = {"micro_batch_size": s.prompts, "seq_buckets": (T, grouped),
                  "pack_sequences": True, "share_prefixes": True}  # fmt: skip
    return LearnerConfig(
        algorithm="grpo", kl_coef=0.0, entropy_coef=0.0, mini_batch_size=s.rows,
        actor_lr=1e-6, actor_warmup_ratio=0.0, clip_low=0.2, clip_high=0.2,
        loss_agg="token-mean", **layout,
    )  # fmt: skip


def bench_rlver(shape: Shape, steps: int, share_prefixes: bool = True) -> dict[str, Any]:
    """``steps`` GRPO steps with rlver_jax's Sampler and Learner; the best warm step."""
    from rlver_jax.bench.common import timed_update
    from rlver_jax.models.config import ModelConfig
    from rlver_jax.models.transformer import init_params
    from rlver_jax.parallel.compile_count import count_compiles
    from rlver_jax.rl.learner import Learner
    from rlver_jax.sampling.sampler import Sampler, SamplerConfig
    from rlver_jax.trajectories import Trajectories

    s, T = shape, shape.prompt_len + shape.new_tokens
    cfg = ModelConfig(
        family="qwen2", vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.mlp,
        num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, dtype=s.dtype,
        param_dtype=s.dtype, scan_layers=False,  # tunix's Qwen2 runs its layers in a Python loop
    )  # fmt: skip
    buckets = SamplerConfig(
        prompt_buckets=(s.prompt_len,), batch_buckets=(s.rows,), new_token_buckets=(s.new_tokens,)
    )
    sampler = Sampler(cfg, pad_id=0, sampler_config=buckets)
    learner = Learner(cfg, peer_learner_config(s, share_prefixes))
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    state = learner.init_state(params, jax.random.key_data(jax.random.key(0)))
    prompts = prompt_ids(s)
    rng = np.random.default_rng(1)
    results = []
    with count_compiles() as first:
        for i in range(steps):
            t0 = time.perf_counter()
            out = sampler(state.policy, prompts, max_new_tokens=s.new_tokens, temperature=1.0,
                          stop_token_ids=(), seed=i)  # fmt: skip
            sample_s = time.perf_counter() - t0
            tokens = np.concatenate([np.asarray(prompts, np.int32), out.tokens], axis=1)
            loss_mask = np.zeros((s.rows, T), bool)
            loss_mask[:, s.prompt_len :] = True
            lp = np.zeros((s.rows, T), np.float32)
            lp[:, s.prompt_len :] = out.logprobs
            scores = rng.random(s.rows).astype(np.float32)  # the reward function's scores
            traj = Trajectories(
                tokens=tokens, token_mask=np.ones((s.rows, T), bool), loss_mask=loss_mask,
                sampler_logprobs=lp, rewards=np.zeros((s.rows, T), np.float32), scores=scores,
                group_ids=(np.arange(s.rows) // s.group).astype(np.int32),
                dialogue_ids=np.arange(s.rows, dtype=np.int32), format_ok=np.ones(s.rows, bool),
            )  # fmt: skip
            state, _, lt = timed_update(learner, state, traj)
            step_s = time.perf_counter() - t0
            sampled = int(out.lengths.sum())
            results.append(_rates(s, sampled, sample_s, lt["total_s"], step_s) | {
                "trainstep_tok": s.rows * T / lt["train_s"]})  # fmt: skip
            if i == 0:
                compile_s = first.seconds
    best = _best(results)
    return {"tool": "rlver_jax", "dtype": s.dtype, "rows": s.rows, "compile_s": compile_s} | best


def _best(results: list[dict[str, float]]) -> dict[str, float]:
    """Per column, the best of the warm steps (all steps if there is only one)."""
    warm = results[1:] or results
    out = {}
    for key in warm[0]:
        pick = max if key.endswith("tok_s") or key == "trainstep_tok" else min
        out[key] = pick(r[key] for r in warm)
    return out


class IdTokenizer:
    """Text = space-separated token ids, so tunix's string API sees exactly our prompts.
    ``bos_id`` 0 is falsy: tunix prepends nothing; pad 0, eos 1 (never a prompt id)."""

    def encode(self, text: str, **_: Any) -> list[int]:
        return [int(t) for t in str(text).split()]

    def decode(self, ids: Any, **_: Any) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return 1

    def pad_id(self) -> int:
        return 0


def bench_tunix(shape: Shape, steps: int) -> dict[str, Any]:
    """``steps`` GRPO steps of tunix's GRPOLearner; generate / update_actor timed per step."""
    import optax
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    from rlver_jax.parallel.compile_count import count_compiles

    s, T = shape, shape.prompt_len + shape.new_tokens
    dtype = jax.numpy.dtype(s.dtype)
    mcfg = qwen2.ModelConfig(
        num_layers=s.layers, vocab_size=s.vocab, embed_dim=s.hidden, hidden_dim=s.mlp,
        num_heads=s.heads, head_dim=s.head_dim, num_kv_heads=s.kv_heads, rope_theta=10000,
        norm_eps=1e-6, use_tied_embedding=True, dtype=dtype, param_dtype=dtype,
    )  # fmt: skip
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto))
    model = qwen2.Qwen2(mcfg, rngs=nnx.Rngs(0))
    # tunix zero-initialises some kernels: give every matrix N(0, 0.02) as on our side.
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(
        lambda x: (0.02 * jax.random.normal(next(keys), x.shape)).astype(x.dtype)
        if x.ndim >= 2 else x, params))  # fmt: skip
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-6, b1=0.9, b2=0.999, weight_decay=0.01)
    )
    cluster = rlc.RLCluster(
        actor=model, reference=None, tokenizer=IdTokenizer(),
        cluster_config=rlc.ClusterConfig(
            role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rlc.RLTrainingConfig(
                actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=steps,
                mini_batch_size=s.prompts, train_micro_batch_size=s.prompts,  # prompts, not rows
                pbar_description=None,
            ),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=s.new_tokens, max_prompt_length=s.prompt_len,
                kv_cache_size=T, temperature=1.0, top_p=1.0, top_k=None,
                eos_tokens=[-1],  # no stop token (fixed lengths), as on our side
            ),
        ),
    )  # fmt: skip
    rng = np.random.default_rng(1)
    reward = lambda prompts, completions, **_: rng.random(len(completions)).tolist()
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=reward,
        algo_config=grpo_learner.GRPOConfig(
            num_generations=s.group, num_iterations=1, beta=0.0, epsilon=0.2,
            loss_agg_mode="token-mean",
        ),
    )  # fmt: skip
    times: list[dict[str, float]] = []
    generate, update = cluster.generate, cluster.update_actor

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        times.append({"t0": time.perf_counter()})
        out = generate(*args, **kwargs)
        times[-1]["sample_s"] = time.perf_counter() - times[-1]["t0"]
        times[-1]["sampled"] = sum(len(t) for t in out.tokens)
        return out

    def timed_update(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = update(*args, **kwargs)
        jax.block_until_ready(nnx.state(cluster.actor_trainer.model, nnx.Param))
        times[-1]["train_s"] = time.perf_counter() - t
        times[-1]["step_s"] = time.perf_counter() - times[-1]["t0"]
        return out

    cluster.generate, cluster.update_actor = timed_generate, timed_update  # instrumentation
    texts = [" ".join(map(str, p)) for p in prompt_ids(s)[:: s.group]]
    data = [{"prompts": np.array(texts)} for _ in range(steps)]  # batched like a grain batch
    with count_compiles() as compiles:
        learner.train(data)
    if len(times) != steps or any("train_s" not in t for t in times):
        raise RuntimeError(f"tunix ran {len(times)} generate calls for {steps} steps: {times}")
    results = [
        _rates(s, int(t["sampled"]), t["sample_s"], t["train_s"], t["step_s"]) for t in times
    ]
    for r in results:
        r["trainstep_tok"] = r["train_tok_s"]
    # tunix compiles lazily inside its loop: attribute all compile time to the first step.
    return {"tool": "tunix", "dtype": s.dtype, "rows": s.rows,
            "compile_s": compiles.seconds} | _best(results)  # fmt: skip


def speedup(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """rlver_jax's speed-up over tunix per column: ``theirs / ours`` for seconds, ``ours /
    theirs`` for rates, so every value > 1 means rlver_jax is faster."""
    out = {}
    for key, value in ours.items():
        if isinstance(value, float) and theirs.get(key):
            rate = key.endswith("tok_s") or key == "trainstep_tok"
            out[key] = value / theirs[key] if rate else theirs[key] / value
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/peer_bench.py", description=__doc__.split("\n")[0])
    for field in dataclasses.fields(Shape):
        flag = "--" + field.name.replace("_", "-")
        ap.add_argument(flag, type=type(field.default), default=field.default)
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps per tool; first compiles")
    ap.add_argument("--tiny", action="store_true", help="a minuscule shape (tests)")
    ap.add_argument(
        "--no-share-prefixes", dest="share_prefixes", action="store_false",
        help="train on the rows padded one sample each (no packing behind a shared prompt)",
    )  # fmt: skip
    ap.add_argument("--json", dest="json_path", help="also write the rows to this JSON file")
    return ap


TINY = {"vocab": 256, "hidden": 32, "mlp": 64, "layers": 1, "heads": 2, "kv_heads": 1,
        "head_dim": 16, "prompts": 1, "group": 2, "prompt_len": 8, "new_tokens": 8}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Check tunix, run both tools, print the table and the ratios; exits 2 without tunix."""
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)}
    shape = Shape(**(values | (TINY if args.tiny else {})))
    ok, version = tunix_status()
    print(machine_line(
        f"bench peer: GRPO step, rlver_jax vs google-tunix {version if ok else '(absent)'}"
    ), flush=True)  # fmt: skip
    if not ok:
        print(
            f"tunix is not usable in this environment ({version}); it is installed only in "
            f"the peer env: {SETUP_HINT}",
            flush=True,
        )
        raise SystemExit(EXIT_NO_TUNIX)
    print(
        f"shape: {shape}; rlver_jax shares each group's prompt: {args.share_prefixes}", flush=True
    )
    print(header(COLUMNS), flush=True)
    rows = []
    for bench in (functools.partial(bench_rlver, share_prefixes=args.share_prefixes), bench_tunix):
        rows.append(bench(shape, args.steps))
        print(format_row(COLUMNS, rows[-1]), flush=True)
    rows.append({"tool": "speedup", "dtype": shape.dtype, "rows": shape.rows} | speedup(*rows))
    print(format_row(SPEEDUP_COLUMNS, rows[-1]))
    up = rows[-1]
    print(
        f"rlver_jax vs tunix tokens/s: sampling {up['sample_tok_s']:.2f}x, training (update) "
        f"{up['train_tok_s']:.2f}x, train step alone {up['trainstep_tok']:.2f}x "
        "(> 1: rlver_jax faster)"
    )
    finish(args.json_path, {"shape": dataclasses.asdict(shape), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
