"""Baselines of the paper that need only HF checkpoints (safetensors), built without the model core:

- `extract_dense_expert`: one expert of a merged FlexOlmo checkpoint as a dense Olmo2 model ("expert alone").
- `slice_experts`: a FlexOlmo checkpoint keeping only some experts (opt-out variants, owners' 2-expert models).
- `model_soup`: average the FFNs of dense experts whose shared weights are identical.
- `prompt_route`: pick one expert per input by cosine similarity of the input's embedding to the domain
  embeddings (stand-in: the layer-0 router rows and the mean hidden state entering layer 0's MoE).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")
MOE_KEYS = ("num_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits", "router_aux_loss_coef",
            "num_local_experts")


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _config(model_dir) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _copy_tokenizer(src, dst) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def _write(out_dir, state: dict, config: dict, src_dir, manifest: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _copy_tokenizer(src_dir, out)
    if manifest is not None:
        (out / "flexolmo.json").write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(model_dir) -> dict:
    path = Path(model_dir) / "flexolmo.json"
    return json.loads(path.read_text()) if path.exists() else {}


def expert_domains(model_dir) -> list[str]:
    """Domain of each expert, in index order (from flexolmo.json; `expert<i>` when absent)."""
    experts = read_manifest(model_dir).get("experts")
    if experts:
        return [e["domain"] for e in sorted(experts, key=lambda e: e["index"])]
    return [f"expert{i}" for i in range(_config(model_dir)["num_experts"])]


def split_state(state: dict[str, torch.Tensor]):
    """(shared tensors, {layer prefix "model.layers.i.mlp.": {"gate","up","down"} stacked over experts},
    {layer prefix: router [E, d]}). Reads both on-disk layouts: fused `experts.gate_up_proj [E, 2I, d]` /
    `experts.down_proj [E, d, I]`, and the per-expert `experts.<e>.{gate,up,down}_proj.weight` that
    transformers' save_pretrained writes."""
    shared, per_expert, fused, router = {}, {}, {}, {}
    for name, tensor in state.items():
        if ".mlp.experts." not in name and not name.endswith(".mlp.gate.weight"):
            shared[name] = tensor
            continue
        prefix = name[: name.index(".mlp.") + len(".mlp.")]
        rest = name[len(prefix):]
        if rest == "gate.weight":
            router[prefix] = tensor
        elif rest == "experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)  # first half gate, second half up
            fused.setdefault(prefix, {}).update(gate=gate, up=up)
        elif rest == "experts.down_proj":
            fused.setdefault(prefix, {})["down"] = tensor
        else:  # experts.<e>.<gate|up|down>_proj.weight
            _, e, proj, _ = rest.split(".")
            per_expert.setdefault(prefix, {}).setdefault(proj.removesuffix("_proj"), {})[int(e)] = tensor
    for prefix, parts in per_expert.items():
        fused[prefix] = {k: torch.stack([v[e] for e in sorted(v)]) for k, v in parts.items()}
    return shared, fused, router


def join_state(shared, experts, router) -> dict[str, torch.Tensor]:
    """Inverse of split_state, in the per-expert layout (what transformers itself saves and reloads)."""
    out = dict(shared)
    for prefix, parts in experts.items():
        for kind in ("gate", "up", "down"):
            for e, w in enumerate(parts[kind]):
                out[f"{prefix}experts.{e}.{kind}_proj.weight"] = w.clone()
    for prefix, w in router.items():
        out[prefix + "gate.weight"] = w.clone()
    return out


def dense_expert_state(merged: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Shared weights + expert `index`'s FFN as Olmo2 `mlp.{gate,up,down}_proj`; router dropped."""
    shared, experts, _router = split_state(merged)
    out = dict(shared)
    for prefix, parts in experts.items():
        for kind in ("gate", "up", "down"):
            out[f"{prefix}{kind}_proj.weight"] = parts[kind][index].clone()
    return out


def dense_config(flex_config: dict) -> dict:
    cfg = {k: v for k, v in flex_config.items() if k not in MOE_KEYS}
    cfg.update(model_type="olmo2", architectures=["Olmo2ForCausalLM"])
    return cfg


def extract_dense_expert(merged_dir, index: int, out_dir) -> Path:
    """Expert `index` of a merged FlexOlmoForCausalLM as a dense Olmo2ForCausalLM checkpoint."""
    state = dense_expert_state(load_state(merged_dir), index)
    domain = expert_domains(merged_dir)[index]
    return _write(out_dir, state, dense_config(_config(merged_dir)), merged_dir,
                  {"baseline": "dense_expert", "expert_index": index, "domain": domain, "source": str(merged_dir)})


def slice_experts(merged_dir, keep: list[int], out_dir, top_k: int | None = None) -> Path:
    """A FlexOlmo checkpoint with only experts `keep` (their FFNs and router rows), in that order. The
    router softmax over the kept rows equals masking the others to -inf, so this is exact opt-out."""
    shared, experts, router = split_state(load_state(merged_dir))
    idx = torch.tensor(keep)
    experts = {p: {k: v.index_select(0, idx) for k, v in parts.items()} for p, parts in experts.items()}
    router = {p: w.index_select(0, idx) for p, w in router.items()}
    out = join_state(shared, experts, router)
    config = dict(_config(merged_dir))
    config["num_experts"] = len(keep)
    config["num_experts_per_tok"] = min(top_k or config["num_experts_per_tok"], len(keep))
    domains = expert_domains(merged_dir)
    manifest = dict(read_manifest(merged_dir))
    manifest["experts"] = [{"index": i, "domain": domains[k], "source_index": k} for i, k in enumerate(keep)]
    manifest["sliced_from"] = str(merged_dir)
    return _write(out_dir, out, config, merged_dir, manifest)


def model_soup(dense_dirs: list, out_dir, weights: list[float] | None = None) -> Path:
    """Average the FFNs of dense experts; every other tensor must be bit-identical across them."""
    states = [load_state(d) for d in dense_dirs]
    weights = weights or [1.0 / len(states)] * len(states)
    out = {}
    for name, first in states[0].items():
        if ".mlp." in name:
            out[name] = sum(w * s[name].float() for w, s in zip(weights, states)).to(first.dtype)
        else:
            for d, s in zip(dense_dirs[1:], states[1:]):
                if not torch.equal(s[name], first):
                    raise ValueError(f"model soup: shared tensor {name} differs between {dense_dirs[0]} and {d}")
            out[name] = first
    return _write(out_dir, out, _config(dense_dirs[0]), dense_dirs[0],
                  {"baseline": "model_soup", "sources": [str(d) for d in dense_dirs], "weights": weights})


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
