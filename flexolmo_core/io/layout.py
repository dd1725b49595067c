"""The one tensor-layout converter: our internal tensor names <-> transformers' on-disk layouts.

Internal names (what training, merge, opt-out, soup and the dense baselines work in), per layer i:
  layers.i.{q,k,v,o,attn_norm,ffn_norm}                  shared weights (+ q_norm, k_norm: olmo2)
  layers.i.gate_up_<e> [2I, d], layers.i.down_<e> [d, I]  expert e's FFN (expert 0 = public)
  layers.i.router_<e> [d]                                 router row e (MoE only)
plus embed, norm and lm_head (absent when the LM head is tied to the embedding). attn_norm / ffn_norm are
the norms of the attention / FFN sublayer: after it in OLMo-2 (post_attention_layernorm /
post_feedforward_layernorm), before it in the Llama family (input_layernorm / post_attention_layernorm).

On disk, per layer i (`LAYOUTS` names them; `flexolmo inspect` and flexolmo.json's `layout` say which):
  dense (Olmo2, Llama): model.layers.i.mlp.{gate,up,down}_proj.weight
  released, what every MoE checkpoint here is written in: one tensor per expert, as the released FlexOlmo and
    Mixtral models, transformers 4.x, vLLM and llama.cpp's converter have it (and what transformers 5's
    conversion map converts from when it loads):
      FlexOlmo: model.layers.i.mlp.experts.<e>.{gate,up,down}_proj.weight, model.layers.i.mlp.gate.weight
      Mixtral:  model.layers.i.block_sparse_moe.experts.<e>.{w1,w3,w2}.weight (gate, up, down),
                model.layers.i.block_sparse_moe.gate.weight
  fused, transformers 5's runtime form (what this project wrote before; still read, and what a model built
    in memory holds): model.layers.i.mlp.experts.gate_up_proj [E, 2I, d] (gate rows first),
    model.layers.i.mlp.experts.down_proj [E, d, I], model.layers.i.mlp.gate.weight [E, d] (both families).
`MoEReader` reads one expert's matrix from either MoE form; `released_moe_specs` writes the released one a
tensor at a time."""
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
# the released per-expert form, per family: (MoE block, gate, up, down) as the released checkpoints name them
RELEASED = {"olmo2": ("mlp", "gate_proj", "up_proj", "down_proj"),       # FlexOlmo
            "llama": ("block_sparse_moe", "w1", "w3", "w2")}             # Mixtral
PARTS = ("gate", "up", "down")
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
ROUTER_NAMES = ("mlp.gate.weight", "block_sparse_moe.gate.weight")
_FUSED = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
LAYOUTS = {
    "dense": "dense FFN: mlp.{gate,up,down}_proj.weight",
    "released-flex_olmo": "per expert, as released FlexOlmo: mlp.experts.<e>.{gate,up,down}_proj.weight",
    "released-mixtral": "per expert, as released Mixtral: block_sparse_moe.experts.<e>.{w1,w3,w2}.weight",
    "fused": "fused experts, transformers 5's runtime form: mlp.experts.gate_up_proj / down_proj "
             "(written by this project before the released layout; still read)",
}


def layout_name(names) -> str:
    """Which on-disk layout (a key of LAYOUTS) a checkpoint's tensor names are in."""
    names = list(names)
    if any(n.endswith(_FUSED[0]) for n in names):
        return "fused"
    found = [m for m in map(_PER_EXPERT.match, names) if m]
    if found:
        return "released-mixtral" if any(m[3].startswith("w") for m in found) else "released-flex_olmo"
    return "dense"


def expert_names(family: str, layer: int, expert: int) -> dict[str, str]:
    """{gate, up, down} -> the released name of one expert's matrix in one layer."""
    block, *names = RELEASED[family]
    return {part: f"model.layers.{layer}.{block}.experts.{expert}.{name}.weight" for part, name in zip(PARTS, names)}


def router_name(family: str, layer: int) -> str:
    return f"model.layers.{layer}.{RELEASED[family][0]}.gate.weight"


def is_moe_tensor(name: str) -> bool:
    """An expert FFN or router tensor, in either MoE form (everything else is shared with the anchor)."""
    return ".experts." in name or name.endswith(ROUTER_NAMES)


class MoEReader:
    """One expert's gate / up / down matrix, or a layer's router, from a MoE checkpoint in the released or the
    fused form, each read when asked: `get(name, index)` is a checkpoint getter (io/checkpoint.py), which reads
    one expert's slice of a fused tensor without the rest, so the reads stay one expert matrix at a time."""

    def __init__(self, names, get):
        names = list(names)
        self.get = get
        self.fused = any(n.endswith(_FUSED[0]) for n in names)
        self.per_expert = {(int(m[1]), int(m[2]), _PART[m[3]]): m[0] for m in map(_PER_EXPERT.match, names) if m}
        self.routers = {int(n.split(".")[2]): n for n in names if n.endswith(ROUTER_NAMES)}

    def part(self, layer: int, expert: int, part: str) -> torch.Tensor:
        if not self.fused:
            return self.get(self.per_expert[(layer, expert, part)], None)
        prefix = f"model.layers.{layer}"
        if part == "down":
            return self.get(prefix + _FUSED[1], expert)
        gate_up = self.get(prefix + _FUSED[0], expert)
        half = gate_up.shape[0] // 2
        return (gate_up[:half] if part == "gate" else gate_up[half:]).clone()

    def gate_up(self, layer: int, expert: int) -> torch.Tensor:
        return torch.cat([self.part(layer, expert, "gate"), self.part(layer, expert, "up")])

    def router(self, layer: int) -> torch.Tensor:
        return self.get(self.routers[layer], None)


def released_moe_specs(family: str, layer: int, experts: int, dtype, inter: int, d: int, part, router) -> list:
    """Tensor specs (stream_safetensors) of one MoE layer in the released form: `part(e, "gate"|"up"|"down")`
    and `router()` ([experts, d]) run when their tensor is written, so a streamed write holds one matrix."""
    shapes = {"gate": (inter, d), "up": (inter, d), "down": (d, inter)}
    specs = [(name, dtype, shapes[p], lambda e=e, p=p: part(e, p))
             for e in range(experts) for p, name in expert_names(family, layer, e).items()]
    return specs + [(router_name(family, layer), dtype, (experts, d), router)]


def state_getter(state: dict[str, torch.Tensor]):
    """(names, get) over an in-memory state dict, as io/checkpoint.checkpoint_getter gives over a folder."""
    return list(state), lambda name, index: state[name] if index is None else state[name][index]


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
    """FlexOlmoForCausalLM / MixtralForCausalLM state dict (released or fused experts) -> internal names."""
    n_layers = n_layers or n_layers_of(state)
    out = _shared_from_hf(state, n_layers, tied)
    reader = MoEReader(*state_getter(state))
    for i in range(n_layers):
        rows = reader.router(i)
        for e in range(len(rows)):
            out[f"layers.{i}.gate_up_{e}"], out[f"layers.{i}.down_{e}"] = reader.gate_up(i, e), reader.part(i, e, "down")
            out[f"layers.{i}.router_{e}"] = rows[e]
    return out


def to_hf_moe(tensors: dict[str, torch.Tensor], n_layers: int | None = None,
              experts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Internal names -> a FlexOlmo / Mixtral state dict in the released layout, with `experts` (default all)
    in that order."""
    n_layers = n_layers or _internal_layers(tensors)
    experts = list(range(num_experts_of(tensors))) if experts is None else experts
    family = family_of(tensors)
    out = _shared_to_hf(tensors, n_layers)
    for i in range(n_layers):
        for j, e in enumerate(experts):
            gate, up = tensors[f"layers.{i}.gate_up_{e}"].chunk(2)
            names = expert_names(family, i, j)
            out[names["gate"]], out[names["up"]], out[names["down"]] = gate, up, tensors[f"layers.{i}.down_{e}"]
        out[router_name(family, i)] = torch.stack([tensors[f"layers.{i}.router_{e}"] for e in experts])
    return {k: v.detach().contiguous() for k, v in out.items()}


def runtime_moe_state(reader: MoEReader, layer: int, experts: list[int]) -> dict[str, torch.Tensor]:
    """One layer's experts (those listed, in that order) and router in the fused form transformers 5's modules
    hold (both families), for load_state_dict."""
    p = f"model.layers.{layer}.mlp."
    return {p + "experts.gate_up_proj": torch.stack([reader.gate_up(layer, e) for e in experts]),
            p + "experts.down_proj": torch.stack([reader.part(layer, e, "down") for e in experts]),
            p + "gate.weight": reader.router(layer)[experts]}


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


def dense_ffn_names(layer: int) -> tuple[str, str, str]:
    """(gate, up, down) names of one layer's dense Olmo2 FFN."""
    p = f"model.layers.{layer}.mlp."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def _internal_layers(tensors: dict) -> int:
    return 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("layers."))
