"""Tiny random checkpoints for tests and timing: a real byte-level BPE tokenizer, an Olmo2 anchor and a
FlexOlmo merged model whose expert 0 is the anchor's FFN. Random weights: numbers from them mean nothing,
they only exercise the code paths."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

from flexolmo_core.data import tokenizer

SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512)


def train_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Byte-level BPE trained on a few stdlib modules, saved as a transformers tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "string.py", "calendar.py")]
    tokenizer.train_tokenizer(text, vocab_size, out_dir)
    return tokenizer.load_tokenizer(out_dir)


def _shape(tokenizer, shape: dict | None = None) -> dict:
    shape = dict(SMOKE_SHAPE, **(shape or {}))
    return dict(shape, vocab_size=max(len(tokenizer), shape.get("vocab_size", 0)), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)


def build_anchor(out_dir: Path, tokenizer, seed: int = 0, shape: dict | None = None) -> Path:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(Olmo2Config(**_shape(tokenizer, shape)))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_merged(out_dir: Path, anchor_dir: Path, tokenizer, domains: list[str], top_k: int = 2,
                 seed: int = 1, noise: float = 0.05, shape: dict | None = None) -> Path:
    """FlexOlmo with experts [public (= the anchor FFN), *domains (anchor FFN + noise)], random router rows."""
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2ForCausalLM

    anchor = Olmo2ForCausalLM.from_pretrained(anchor_dir, use_safetensors=True)
    n_experts = 1 + len(domains)
    cfg = FlexOlmoConfig(**_shape(tokenizer, shape), num_experts=n_experts, num_experts_per_tok=top_k)
    model = FlexOlmoForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in anchor.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor.clone()
    for i, layer in enumerate(anchor.model.layers):
        gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], dim=0)
        down = layer.mlp.down_proj.weight
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack(
            [gate_up] + [gate_up + noise * torch.randn(gate_up.shape, generator=g) for _ in domains])
        state[p + "experts.down_proj"] = torch.stack(
            [down] + [down + noise * torch.randn(down.shape, generator=g) for _ in domains])
        state[p + "gate.weight"] = torch.randn(n_experts, cfg.hidden_size, generator=g)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    manifest = {"experts": [{"index": i, "domain": d} for i, d in enumerate(["public", *domains])],
                "top_k": top_k, "note": "smoke model with random weights"}
    (Path(out_dir) / "flexolmo.json").write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def write_domain_fixture(out_dir: Path, domains: list[str], n_docs: int = 4) -> Path:
    """`<dir>/<domain>/test.jsonl` with real text (stdlib sources, one module per domain)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    for k, domain in enumerate(domains):
        text = files[k].read_text(encoding="utf-8", errors="replace")
        chunk = max(200, len(text) // n_docs)
        docs = [text[i * chunk:(i + 1) * chunk][:600] for i in range(n_docs)]
        (Path(out_dir) / domain).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / domain / "test.jsonl", "w", encoding="utf-8") as handle:
            for d in docs:
                if d.strip():
                    handle.write(json.dumps({"text": d}) + "\n")
    return Path(out_dir)
