"""Baselines of the paper built from a merged checkpoint's safetensors, through the one layout converter
(`flexolmo_core.layout`):

- `extract_dense_expert`: one expert of a merged checkpoint as a dense model of the anchor's family ("expert alone").
- `model_soup`: average the FFNs of dense experts whose shared weights are identical.
- `prompt_route`: pick one expert per input by cosine similarity of the input's embedding to the domain
  embeddings (stand-in: the layer-0 router rows and the mean hidden state entering layer 0's MoE).
Opt-out variants and the owners' 2-expert models are `merge.opt_out`.

A dense baseline's flexolmo.json records `shared_sha256`, the hash of its non-FFN weights; `inspect` recomputes
it, so a baseline is checked against the anchor its merged model was verified against.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import layout
from .anchor import copy_tokenizer
from .atomic import atomic_dir, write_json
from .families import dense_config_dict
from .merge import MERGED_MANIFEST, MODEL_SIGNATURE, WEIGHTS_FILE, expert_domains, read_manifest
from .errors import InputError, MissingInput, read_json
from .stream_safetensors import check_safetensors_file, save_tensors



def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MissingInput(f"{model_dir}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        check_safetensors_file(f)
        state.update(load_file(str(f)))
    return state


def _config(model_dir) -> dict:
    return read_json(Path(model_dir) / "config.json", what="model config")


def shared_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of every non-FFN tensor (names sorted): equal for all dense baselines of one anchor."""
    h = hashlib.sha256()
    for name in sorted(n for n in state if ".mlp." not in n):
        t = state[name].detach().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_dense(out_dir, state: dict, config: dict, src_dir, manifest: dict) -> Path:
    with atomic_dir(out_dir, signature=MODEL_SIGNATURE) as tmp:
        save_tensors({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer(src_dir, tmp)
        write_json(tmp / MERGED_MANIFEST, {**manifest, "shared_sha256": shared_sha256(state)})
    return Path(out_dir)


def dense_expert_state(merged: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Shared weights + expert `index`'s FFN as a dense `mlp.{gate,up,down}_proj`; router dropped."""
    return layout.to_hf_dense(layout.from_hf_moe(merged), expert=index)


def extract_dense_expert(merged_dir, index: int, out_dir) -> Path:
    """Expert `index` of a merged FlexOlmo (Mixtral) checkpoint as a dense Olmo2 (Llama) checkpoint."""
    state = dense_expert_state(load_state(merged_dir), index)
    domain = expert_domains(merged_dir)[index]
    return _write_dense(out_dir, state, dense_config_dict(_config(merged_dir)), merged_dir,
                        {"baseline": "dense_expert", "expert_index": index, "domain": domain, "source": str(merged_dir),
                         "anchor_fingerprint": read_manifest(merged_dir).get("anchor_fingerprint")})


def model_soup(dense_dirs: list, out_dir, weights: list[float] | None = None) -> Path:
    """Average the FFNs of dense experts; every other tensor must be bit-identical across them."""
    states = [layout.from_hf_dense(load_state(d)) for d in dense_dirs]
    weights = weights or [1.0 / len(states)] * len(states)
    out = {}
    for name, first in states[0].items():
        if name.endswith(("gate_up_0", "down_0")):
            out[name] = sum(w * s[name].float() for w, s in zip(weights, states)).to(first.dtype)
        else:
            for d, s in zip(dense_dirs[1:], states[1:]):
                if not torch.equal(s[name], first):
                    raise InputError(f"model soup: shared tensor {name} differs between {dense_dirs[0]} and {d}")
            out[name] = first
    return _write_dense(out_dir, layout.to_hf_dense(out), _config(dense_dirs[0]), dense_dirs[0],
                        {"baseline": "model_soup", "sources": [str(d) for d in dense_dirs], "weights": weights,
                         "anchor_fingerprint": read_manifest(dense_dirs[0]).get("anchor_fingerprint")})


# ---- prompt-based routing -------------------------------------------------------------------------------------

def domain_embeddings(merged_model) -> torch.Tensor:
    """[E, d] router rows of layer 0 (stand-in for encoder domain embeddings until training provides them)."""
    return merged_model.model.layers[0].mlp.gate.weight.detach().float()


@torch.no_grad()
def prompt_embedding(merged_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the hidden state entering layer 0's MoE: the same space as the router rows."""
    captured = {}
    block = merged_model.model.layers[0].mlp
    handle = block.register_forward_pre_hook(lambda mod, args: captured.setdefault("h", args[0]))
    try:
        # Only layer 0 is needed; run the full model for simplicity (small models, one call per input).
        merged_model(input_ids)
    finally:
        handle.remove()
    return captured["h"].float().mean(dim=1)  # [B, d]


@torch.no_grad()
def prompt_route(merged_model, input_ids: torch.Tensor, embeddings: torch.Tensor | None = None) -> list[int]:
    """Expert index per row of input_ids: argmax cosine(prompt embedding, domain embedding)."""
    emb = embeddings if embeddings is not None else domain_embeddings(merged_model)
    h = prompt_embedding(merged_model, input_ids)
    sims = torch.nn.functional.cosine_similarity(h[:, None, :], emb[None, :, :], dim=-1)
    return sims.argmax(dim=-1).tolist()
