"""Checkpoints as others publish them, built by transformers itself at smoke size (no hub): dense anchors of
both families and released-style 2-expert models whose expert 0 and shared weights are an anchor's."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def save(model, tokenizer_dir, out: Path, **kwargs) -> Path:
    model.save_pretrained(out, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out


def token_ids(tokenizer_dir) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def released_style_expert(anchor_dir: Path, public_row: torch.Tensor, out: Path, seed: int = 1) -> Path:
    """A 2-expert FlexOlmo (OLMo-2 anchor) or Mixtral (Llama anchor) model as released per domain: the anchor's
    weights, expert 0 = its FFN, expert 1 = a different FFN, router rows [public; domain]. FlexOlmo keeps the
    released config values (norm_topk_prob false, num_experts_per_tok 2)."""
    from transformers import AutoModelForCausalLM, FlexOlmoConfig, MixtralConfig

    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
    values = {k: v for k, v in anchor.config.to_dict().items() if k in SHAPE or k.endswith("_token_id")}
    if anchor.config.model_type == "olmo2":
        config = FlexOlmoConfig(**values, num_experts=2, num_experts_per_tok=2, norm_topk_prob=False)
    else:
        config = MixtralConfig(**values, num_local_experts=2, num_experts_per_tok=2,
                               tie_word_embeddings=anchor.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    for name, tensor in anchor.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    for i, layer in enumerate(anchor.model.layers):
        p = f"model.layers.{i}.mlp."
        public = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
        state[p + "experts.gate_up_proj"][0] = public
        state[p + "experts.gate_up_proj"][1] = public + 0.05 * torch.randn_like(public)
        state[p + "experts.down_proj"][0] = layer.mlp.down_proj.weight
        state[p + "gate.weight"][0] = public_row[i]
        state[p + "gate.weight"][1] = torch.randn(config.hidden_size) * 0.1
    model.load_state_dict(state)
    return save(model, anchor_dir, out)
