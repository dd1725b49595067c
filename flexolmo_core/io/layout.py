"""The one tensor-layout converter: our internal tensor names <-> transformers' on-disk layouts.

Internal names (what training, merge, opt-out, soup and the dense baselines work in), per layer i:
  layers.i.{q,k,v,o,attn_norm,ffn_norm}                  shared weights (+ q_norm, k_norm: olmo2)
  layers.i.gate_up_<e> [2I, d], layers.i.down_<e> [d, I]  expert e's FFN (expert 0 = public)
  layers.i.router_<e> [d]                                 router row e (MoE only)
plus embed, norm and lm_head (absent when the LM head is tied to the embedding). attn_norm / ffn_norm are
the norms of the attention / FFN sublayer: after it in OLMo-2 (post_attention_layernorm /
post_feedforward_layernorm), before it in the Llama family (input_layernorm / post_attention_layernorm).
transformers' layouts, the same for both families apart from those norms:
  dense (Olmo2, Llama): model.layers.i.mlp.{gate,up,down}_proj.weight
  fused MoE (FlexOlmo, Mixtral): model.layers.i.mlp.experts.gate_up_proj [E, 2I, d] (gate rows first, then
                  up), model.layers.i.mlp.experts.down_proj [E, d, I], model.layers.i.mlp.gate.weight [E, d]
Reading also accepts the per-expert forms transformers' save_pretrained writes (FlexOlmo's
`mlp.experts.<e>.{gate,up,down}_proj.weight`, Mixtral's hub `block_sparse_moe.experts.<e>.w1|w3|w2.weight`);
writing is always fused, which transformers 5 loads for both."""
from __future__ import annotations

import re

import torch

PROJECTIONS = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
               "o": "self_attn.o_proj.weight"}
SHARED = {  # per family: internal name -> per-layer HF name
    "olmo2": {**PROJECTIONS, "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
              "attn_norm": "post_attention_layernorm.weight", "ffn_norm": "post_feedforward_layernorm.weight"},
    "llama": {**PROJECTIONS, "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight"},
}
TOP = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
# per-expert forms, as transformers' save_pretrained writes them: FlexOlmo (mlp.experts.<e>.{gate,up,down}_proj)
# and Mixtral's hub layout (block_sparse_moe.experts.<e>.w1 / w3 / w2 = gate / up / down)
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
ROUTER_NAMES = ("mlp.gate.weight", "block_sparse_moe.gate.weight")


def layout_name(names) -> str:
    """Which on-disk layout a checkpoint's tensor names are in (what `flexolmo inspect` reports)."""
    names = list(names)
    if any(n.endswith("mlp.experts.gate_up_proj") for n in names):
        return "fused experts (transformers 5's runtime form)"
    found = [m for m in map(_PER_EXPERT.match, names) if m]
    if found:
        mixtral = any(m.group(3).startswith("w") for m in found)
        return "per-expert (Mixtral's block_sparse_moe.experts.<e>.w1|w3|w2)" if mixtral else \
            "per-expert (FlexOlmo's mlp.experts.<e>.gate_proj|up_proj|down_proj)"
    return "dense"


def n_layers_of(state: dict) -> int:
    return 1 + max(int(name.split(".")[2]) for name in state if name.startswith("model.layers."))


def is_moe_state(names) -> bool:
    return any(n.endswith(ROUTER_NAMES) for n in names)


def num_experts_of(tensors: dict) -> int:
    return sum(1 for name in tensors if name.startswith("layers.0.down_"))


def hf_family(state: dict) -> str:
    """olmo2 or llama, from a transformers state dict's names."""
    return "llama" if "model.layers.0.input_layernorm.weight" in state else "olmo2"


def family_of(tensors: dict) -> str:
    """olmo2 or llama, from internal names (only OLMo-2 has QK-norm)."""
    return "olmo2" if "layers.0.q_norm" in tensors else "llama"


def _shared_from_hf(state: dict, n_layers: int, tied: bool) -> dict:
    shared = SHARED[hf_family(state)]
    tied = tied or TOP["lm_head"] not in state  # a file of a tied model has no LM head
    out = {k: state[v] for k, v in TOP.items() if not (tied and k == "lm_head")}
    for i in range(n_layers):
        out.update({f"layers.{i}.{k}": state[f"model.layers.{i}.{v}"] for k, v in shared.items()})
    return out


def _shared_to_hf(tensors: dict, n_layers: int) -> dict:
    shared = SHARED[family_of(tensors)]
    out = {v: tensors[k] for k, v in TOP.items() if k in tensors}  # a tied LM head is not stored
    for i in range(n_layers):
        out.update({f"model.layers.{i}.{v}": tensors[f"layers.{i}.{k}"] for k, v in shared.items()})
    return out


def from_hf_dense(state: dict[str, torch.Tensor], n_layers: int | None = None,
                  tied: bool = False) -> dict[str, torch.Tensor]:
    """Olmo2ForCausalLM / LlamaForCausalLM state dict -> internal names (one expert: index 0). With `tied`,
    the LM head is the embedding and is left out (transformers' state_dict lists it anyway)."""
    n_layers = n_layers or n_layers_of(state)
    out = _shared_from_hf(state, n_layers, tied)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        out[f"layers.{i}.gate_up_0"] = torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"]])
        out[f"layers.{i}.down_0"] = state[p + "down_proj.weight"]
    return out


def to_hf_dense(tensors: dict[str, torch.Tensor], n_layers: int | None = None, expert: int = 0) -> dict[str, torch.Tensor]:
    """Internal names -> Olmo2ForCausalLM / LlamaForCausalLM state dict, with `expert`'s FFN as the dense FFN."""
    n_layers = n_layers or _internal_layers(tensors)
    out = _shared_to_hf(tensors, n_layers)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        gate, up = tensors[f"layers.{i}.gate_up_{expert}"].chunk(2)
        out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = gate, up
        out[p + "down_proj.weight"] = tensors[f"layers.{i}.down_{expert}"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_moe(state: dict[str, torch.Tensor], n_layers: int | None = None,
                tied: bool = False) -> dict[str, torch.Tensor]:
    """FlexOlmoForCausalLM / MixtralForCausalLM state dict (fused or per-expert experts) -> internal names."""
    n_layers = n_layers or n_layers_of(state)
    out = _shared_from_hf(state, n_layers, tied)
    per_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _PER_EXPERT.match(name)
        if match:
            per_expert.setdefault((int(match[1]), int(match[2])), {})[_PART[match[3]]] = tensor
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        rows = next(state[n] for n in (f"model.layers.{i}.{r}" for r in ROUTER_NAMES) if n in state)
        if p + "experts.gate_up_proj" in state:
            gate_up, down = state[p + "experts.gate_up_proj"], state[p + "experts.down_proj"]
        else:
            parts = [per_expert[(i, e)] for e in range(len(rows))]
            gate_up = [torch.cat([x["gate"], x["up"]]) for x in parts]
            down = [x["down"] for x in parts]
        for e in range(len(rows)):
            out[f"layers.{i}.gate_up_{e}"], out[f"layers.{i}.down_{e}"] = gate_up[e], down[e]
            out[f"layers.{i}.router_{e}"] = rows[e]
    return out


def to_hf_moe(tensors: dict[str, torch.Tensor], n_layers: int | None = None,
              experts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Internal names -> fused FlexOlmo / Mixtral state dict with `experts` (default all), in that order."""
    n_layers = n_layers or _internal_layers(tensors)
    experts = list(range(num_experts_of(tensors))) if experts is None else experts
    out = _shared_to_hf(tensors, n_layers)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        out[p + "experts.gate_up_proj"] = torch.stack([tensors[f"layers.{i}.gate_up_{e}"] for e in experts])
        out[p + "experts.down_proj"] = torch.stack([tensors[f"layers.{i}.down_{e}"] for e in experts])
        out[p + "gate.weight"] = torch.stack([tensors[f"layers.{i}.router_{e}"] for e in experts])
    return {k: v.detach().contiguous() for k, v in out.items()}


def to_package(tensors: dict[str, torch.Tensor], expert: int = 1) -> dict[str, torch.Tensor]:
    """Internal names -> an expert package's names: `expert`'s FFN and router row, the public router row
    (row 0) every owner trains against, and the expert's logit bias (kept <= 0) when the model has one."""
    out = {}
    for i in range(_internal_layers(tensors)):
        out[f"layers.{i}.gate_up_proj"] = tensors[f"layers.{i}.gate_up_{expert}"]
        out[f"layers.{i}.down_proj"] = tensors[f"layers.{i}.down_{expert}"]
        out[f"layers.{i}.router"] = tensors[f"layers.{i}.router_{expert}"]
        out[f"layers.{i}.public_router"] = tensors[f"layers.{i}.router_0"]
        if f"layers.{i}.bias_{expert}" in tensors:
            out[f"layers.{i}.logit_bias"] = tensors[f"layers.{i}.bias_{expert}"].clamp(max=0.0)
    return {k: v.detach().contiguous() for k, v in out.items()}


def fused_moe_names(layer: int) -> tuple[str, str, str]:
    """(gate_up, down, router) names of one layer in the fused FlexOlmo layout (the streaming merge)."""
    p = f"model.layers.{layer}.mlp."
    return p + "experts.gate_up_proj", p + "experts.down_proj", p + "gate.weight"


def dense_ffn_names(layer: int) -> tuple[str, str, str]:
    """(gate, up, down) names of one layer's dense Olmo2 FFN."""
    p = f"model.layers.{layer}.mlp."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def _internal_layers(tensors: dict) -> int:
    return 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("layers."))
