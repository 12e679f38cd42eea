"""The rollout layout: the sampler decodes on weights that are tensor-parallel but not
FSDP-sharded (`parallel.rules.ROLLOUT_RULES`), made from the learner's FSDP layout by one
jitted copy per rollout (`Sampler.rollout_params`); it samples what the learner's layout samples
and its decode program gathers no weight per token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlver_jax.bench.models import model_config
from rlver_jax.env.llm_judge import CandidateTable, JudgeScorer
from rlver_jax.models.sharding import param_shardings
from rlver_jax.models.transformer import param_shapes
from rlver_jax.parallel import MeshConfig, make_mesh, shard_params
from rlver_jax.parallel.collectives import collective_traffic
from rlver_jax.parallel.rules import DEFAULT_RULES, ROLLOUT_RULES, merged_rules
from rlver_jax.sampling.config import SamplerConfig
from rlver_jax.sampling.sampler import Sampler
from tests.helpers import BUCKETS, CONFIG, PAD, PROMPTS, random_params


def _params() -> dict:
    return random_params(CONFIG, std=0.5)


MESHES = [
    MeshConfig(data=1, fsdp=8, tensor=1),
    MeshConfig(data=1, fsdp=2, tensor=4),
]


def _learner_layout(params: dict, mesh: jax.sharding.Mesh) -> dict:
    return shard_params(params, param_shardings(CONFIG, mesh, DEFAULT_RULES))


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["fsdp8", "fsdp2_tensor4"])
def test_rollout_layout_samples_what_the_learner_layout_samples(mesh_cfg: MeshConfig) -> None:
    """Greedy tokens and log-probs of the rollout layout equal those of the learner's layout
    (the sampler traced with the learner's rules) and of one device."""
    params = _params()
    mesh = make_mesh(mesh_cfg)
    one = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS)
    learner_rules = Sampler(
        CONFIG, mesh=mesh, pad_id=PAD, sampler_config=BUCKETS, rules=DEFAULT_RULES
    )
    rollout = Sampler(CONFIG, mesh=mesh, pad_id=PAD, sampler_config=BUCKETS)
    learner_params = _learner_layout(params, mesh)
    decoding = rollout.rollout_params(learner_params)
    embed = decoding["layers"]["w_gate"].sharding.spec
    assert "fsdp" not in jax.tree.leaves(tuple(embed))  # not FSDP-sharded while decoding
    ref = one(params, PROMPTS, max_new_tokens=10, temperature=0.0)
    for sampler, p in ((learner_rules, learner_params), (rollout, decoding)):
        out = sampler(p, PROMPTS, max_new_tokens=10, temperature=0.0)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


def test_rollout_params_copy_only_what_differs() -> None:
    """One device in float32: the params themselves (no copy). bf16 compute: a bf16 copy of
    the same values. A mesh: the rollout layout, by one jitted copy, the learner's untouched."""
    params = jax.tree.map(np.asarray, _params())
    one = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS)
    assert one.rollout_params(params) is params
    bf16 = Sampler(CONFIG.replace(dtype="bfloat16"), pad_id=PAD, sampler_config=BUCKETS)
    cast = bf16.rollout_params(params)
    assert {x.dtype for x in jax.tree.leaves(cast)} == {np.dtype("bfloat16")}
    np.testing.assert_array_equal(
        np.asarray(cast["embed"], np.float32),
        np.asarray(params["embed"].astype("bfloat16"), np.float32),
    )
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    sharded = Sampler(CONFIG, mesh=mesh, pad_id=PAD, sampler_config=BUCKETS)
    learner_params = _learner_layout(params, mesh)
    decoding = sharded.rollout_params(learner_params)
    assert decoding is not learner_params
    assert sharded.rollout_params(decoding) is decoding  # already in layout: no second copy
    wq = learner_params["layers"]["wq"]
    assert "fsdp" in str(wq.sharding.spec) and "fsdp" not in str(
        decoding["layers"]["wq"].sharding.spec
    )


def test_the_rollout_decode_gathers_no_weight_per_token() -> None:
    """The decode loop compiled on an fsdp=8 mesh: with the learner's rules it all-gathers the
    weights (every layer's, every token); with the rollout's it gathers no weight, only the
    step's [B, V] logits rows (activations: 4 KB here, a few MB for a 7B against its 15 GB of
    bf16 weights). XLA's compiled program, abstract inputs."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    weight_bytes = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(param_shapes(CONFIG)))
    gathered = {}
    for name, rules in (("learner", DEFAULT_RULES), ("rollout", ROLLOUT_RULES)):
        sampler = Sampler(
            CONFIG, mesh=mesh, pad_id=PAD, sampler_config=SamplerConfig(
                prompt_buckets=(16,), batch_buckets=(8,), new_token_buckets=(16,), decode="scan"
            ), rules=rules,
        )  # fmt: skip
        hlo = sampler.trace_programs(8, 16, 16)["decode"].lower().compile().as_text()
        gathered[name] = collective_traffic(hlo).per_iteration.get("all-gather", 0)
    assert gathered["learner"] > 0.5 * weight_bytes  # the FSDP layout gathers the weights
    assert gathered["rollout"] <= 8 * CONFIG.vocab_size * 4, gathered  # B x V float32 logits


def test_a_qwen2_shape_decodes_with_under_one_percent_of_its_weights_in_collectives() -> None:
    """The dry run at a real shape: Qwen2.5-1.5B's decode loop compiled for 8 fake devices
    (fsdp 8, batch 32, prompt 512, 128 new tokens, bf16 compute, abstract inputs). Per decoded
    token the learner's layout moves more than the policy's bf16 weights in collectives, the
    rollout layout under 1% of them: what is left is the step's [B, V] logits, gathered for
    `lax.top_k` (`bench/rollout_collectives.py` prints the 7B figures)."""
    config = model_config("qwen2.5-1.5b").replace(dtype="bfloat16")
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    sc = SamplerConfig(prompt_buckets=(512,), batch_buckets=(32,), new_token_buckets=(128,),
                       decode="scan")  # fmt: skip
    weights_bf16 = config.num_params() * 2
    moved = {}
    for name, rules in (("learner", DEFAULT_RULES), ("rollout", ROLLOUT_RULES)):
        sampler = Sampler(config, mesh=mesh, sampler_config=sc, rules=rules)
        hlo = sampler.trace_programs(32, 512, 128)["decode"].lower().compile().as_text()
        moved[name] = collective_traffic(hlo).total_per_iteration
    assert moved["learner"] > weights_bf16, moved
    assert moved["rollout"] <= 0.01 * weights_bf16, moved


def test_rules_from_the_config_merge_over_the_defaults() -> None:
    cfg = MeshConfig(rollout_rules={"mlp": None}, rules={"embed": ["data", "fsdp"]})
    assert dict(cfg.sampler_rules)["mlp"] is None and dict(cfg.sampler_rules)["embed"] is None
    assert dict(cfg.learner_rules)["embed"] == ("data", "fsdp")
    assert dict(merged_rules(DEFAULT_RULES, {}))["embed"] == "fsdp"
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        MeshConfig(rules={"embd": "fsdp"})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        MeshConfig(rollout_rules={"mlp": "model"})


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["fsdp8", "fsdp2_tensor4"])
def test_the_llm_user_judges_and_replies_alike_in_both_layouts(mesh_cfg: MeshConfig) -> None:
    """The LLM user's two programs, its judge (`JudgeScorer`) and its reply sampler, on weights
    placed as `LLMUser` places them (`shard_params` in the rollout's rules) give the scores and
    the greedy replies of the learner's layout and of one device."""
    params = _params()
    mesh = make_mesh(mesh_cfg)
    table = CandidateTable(
        changes=(-1, 0, 1), texts=("-1", "0", "1"), ids=((5, 6), (7,), (8, 9)), terminators=(3,)
    )
    kw = {"pad_id": PAD, "prompt_buckets": (16,), "batch_buckets": (8,)}
    ref = JudgeScorer(CONFIG, **kw)(params, PROMPTS, table)
    ref_reply = Sampler(CONFIG, pad_id=PAD, sampler_config=BUCKETS)(
        params, PROMPTS, max_new_tokens=8, temperature=0.0
    )
    for rules in (ROLLOUT_RULES, DEFAULT_RULES):
        placed = shard_params(params, param_shardings(CONFIG, mesh, rules))
        scores = JudgeScorer(CONFIG, mesh=mesh, rules=rules, **kw)(placed, PROMPTS, table)
        np.testing.assert_allclose(scores, ref, atol=1e-4)
        sampler = Sampler(CONFIG, mesh=mesh, pad_id=PAD, sampler_config=BUCKETS, rules=rules)
        reply = sampler(placed, PROMPTS, max_new_tokens=8, temperature=0.0)
        np.testing.assert_array_equal(reply.tokens, ref_reply.tokens)
        np.testing.assert_allclose(reply.logprobs, ref_reply.logprobs, atol=1e-4)
