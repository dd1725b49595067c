"""Decode tokens/s of a merged FlexOlmo model against its dense anchor, at a preset's shape (random weights:
speed does not depend on values), on the CPU or a GPU, in the dtype the models are served in there.

    python benchmarks/decode_throughput.py [--preset tiny] [--experts 8] [--tokens 64] [--device auto]"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.machine import machine  # noqa: E402


def models(preset: str, experts: int, top_k: int):
    from transformers import FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

    from flexolmo_core.anchor.families import moe_config
    from flexolmo_core.anchor.presets import get_preset

    cfg = get_preset(preset)
    dense = Olmo2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                        num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                        tie_word_embeddings=False, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    return Olmo2ForCausalLM(dense), FlexOlmoForCausalLM(moe_config(dense, num_experts=experts, top_k=top_k))


@torch.no_grad()
def decode_speed(model, tokens: int, device, repeats: int = 3) -> float:
    """Greedy tokens/s of one sequence (best of `repeats`), an 8-token prompt, no early stop."""
    prompt = torch.arange(1, 9, device=device)[None]
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def main() -> None:
    from flexolmo_core.io.dtypes import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--experts", type=int, default=8, help="experts in the merged model (public included)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # flexolmo_core/io/dtypes.py rule 5
    dense, merged = (m.to(device, dtype).eval() for m in models(args.preset, args.experts, args.top_k))
    m = machine()
    speeds = {"dense anchor": decode_speed(dense, args.tokens, device),
              f"merged ({args.experts} experts, top-{args.top_k})": decode_speed(merged, args.tokens, device)}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; GPU: {gpu}; preset {args.preset}, {dtype}")
    for name, tps in speeds.items():
        print(f"decode, one sequence, greedy, {args.tokens} tokens: {name:32s} {tps:8.1f} tokens/s")
    print(json.dumps({"machine": m, "gpu": gpu, "args": vars(args), "tokens_per_s": speeds}))


if __name__ == "__main__":
    main()
