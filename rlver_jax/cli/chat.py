"""`rlver-jax chat`: one chat turn with a model, the smallest end-to-end check of an install."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

DEFAULT_MESSAGE = "I had a rough day at work and my boss yelled at me."


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlver-jax chat", description=__doc__)
    parser.add_argument("message", nargs="?", default=DEFAULT_MESSAGE, help="the user's message")
    parser.add_argument("--source", default="smollm2", choices=["smollm2", "hf", "gguf"])
    parser.add_argument("--path", default=None, help="HF checkpoint directory or GGUF file")
    parser.add_argument(
        "--system",
        default=None,
        help="system prompt (default: the plain English policy prompt of the scaffold)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(list(argv))

    from rlver_jax.model_io.loader import ModelSpec, load_model
    from rlver_jax.sampling.sampler import Sampler
    from rlver_jax.scaffold import ScaffoldConfig, system_prompt

    t0 = time.perf_counter()
    params, config, tok = load_model(
        ModelSpec(source=args.source, path=args.path, dtype=args.dtype)
    )
    t1 = time.perf_counter()
    system = args.system or system_prompt(ScaffoldConfig(mode="plain", language="en"))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": args.message}]
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    sampler = Sampler(config, pad_id=tok.pad_id, stop_token_ids=tok.stop_token_ids)
    out = sampler(
        params,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    t2 = time.perf_counter()
    n = int(out.lengths[0])
    reply = tok.decode(out.tokens[0, :n].tolist())
    print(f"user: {args.message}\nassistant: {reply.strip()}")
    print(
        f"[{config.family}, {config.num_params() / 1e6:.0f}M params, load {t1 - t0:.1f}s, "
        f"generate {n} tokens in {t2 - t1:.1f}s incl. compile]"
    )
    return 0
