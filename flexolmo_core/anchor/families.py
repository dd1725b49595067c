"""The two architecture families as transformers configs (DESIGN.md: two families, one code path).

  family  dense anchor (model types)   MoE form (owner and merged models)
  olmo2   olmo2                        flex_olmo  FlexOlmoForCausalLM: top-k of a softmax, raw probabilities
  llama   llama, mistral (SmolLM2)     mixtral    MixtralForCausalLM: top-k of a softmax, renormalised to sum 1

Tensors are the same in both (flexolmo_core.io.layout); only norms and these configs differ."""
from __future__ import annotations

import json
from pathlib import Path

from flexolmo_core.errors import InputError

FAMILY_OF = {"olmo2": "olmo2", "flex_olmo": "olmo2", "llama": "llama", "mistral": "llama", "mixtral": "llama"}
MOE_TYPE = {"olmo2": "flex_olmo", "llama": "mixtral"}
DENSE_TYPE = {"flex_olmo": "olmo2", "mixtral": "llama"}
# top-k weights renormalised to sum 1? FlexOlmo as released: no (raw probabilities); Mixtral: always. Equal at
# top_k == num_experts (owner training, router tuning with all experts); they differ in merged models at k < E.
RENORMALIZES = {"olmo2": False, "llama": True}
ARCHITECTURE = {"olmo2": "Olmo2ForCausalLM", "flex_olmo": "FlexOlmoForCausalLM", "llama": "LlamaForCausalLM",
                "mixtral": "MixtralForCausalLM"}
# config keys one form has and the other does not (dropped when converting)
MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits",
            "router_aux_loss_coef", "router_jitter_noise", "sliding_window")
DENSE_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")
VOLATILE_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "_model_name_or_path",
                 "quantization_config")


def family_of_type(model_type: str) -> str:
    if model_type not in FAMILY_OF:
        raise InputError(f"unsupported architecture {model_type!r}: supported model types are "
                         f"{', '.join(FAMILY_OF)} (the OLMo-2 and Llama families)")
    return FAMILY_OF[model_type]


def is_moe(config) -> bool:
    return _as_dict(config).get("model_type") in DENSE_TYPE


def moe_config(dense_config, num_experts: int, top_k: int):
    """The MoE config (FlexOlmo or Mixtral) with a dense anchor's shapes and ids."""
    from transformers import AutoConfig

    if not 1 <= top_k <= num_experts:
        raise InputError(f"top_k must be in [1, {num_experts}], got {top_k}")
    values = _as_dict(dense_config)
    moe_type = MOE_TYPE[family_of_type(values["model_type"])]
    kept = {k: v for k, v in values.items() if k not in VOLATILE_KEYS + DENSE_ONLY_KEYS + MOE_KEYS}
    if moe_type == "flex_olmo":  # the released FlexOlmo models: raw top-k probabilities (METHOD.md)
        extra = {"num_experts": num_experts, "norm_topk_prob": False}
    else:  # Mixtral has no such switch: it always renormalises (equal to FlexOlmo's at top_k == num_experts)
        extra = {"num_local_experts": num_experts, "router_jitter_noise": 0.0, "sliding_window": None}
    config = AutoConfig.for_model(moe_type, **kept, **extra, num_experts_per_tok=top_k)
    config.architectures = [ARCHITECTURE[moe_type]]
    return config


def dense_config_dict(moe_config_values) -> dict:
    """config.json of the dense model with one expert of a FlexOlmo / Mixtral model as its FFN."""
    values = _as_dict(moe_config_values)
    dense_type = DENSE_TYPE[values["model_type"]]
    out = {k: v for k, v in values.items() if k not in MOE_KEYS + ("transformers_version",)}
    out.update(model_type=dense_type, architectures=[ARCHITECTURE[dense_type]])
    return out


def expert_count(config) -> int:
    values = _as_dict(config)
    return values["num_experts"] if values["model_type"] == "flex_olmo" else values["num_local_experts"]


def set_expert_count(config, num_experts: int, top_k: int) -> None:
    """Change a loaded MoE config to `num_experts` experts, `top_k` per token (opt-out, strict loading)."""
    if config.model_type == "flex_olmo":
        config.num_experts = num_experts
    else:
        config.num_local_experts = num_experts
    config.num_experts_per_tok = top_k


def renormalizes(config) -> bool:
    """Whether the top-k routing weights are renormalised to sum 1 (Mixtral always; FlexOlmo if norm_topk_prob)."""
    values = _as_dict(config)
    return values["model_type"] == "mixtral" or bool(values.get("norm_topk_prob", False))


def portable_config(values: dict) -> dict:
    """config.json values that transformers 4.x reads as 5.x does: 5.x keeps RoPE in `rope_parameters`, which
    4.x ignores, falling back to its own default theta (500,000 for FlexOlmo, 1,000,000 for Mixtral: at smoke size
    logits off by up to 0.728 and 0.00575, benchmarks/interop.py), so its `rope_theta` / `rope_scaling` are written beside it.
    No transformers version: identical inputs give identical files."""
    values = {k: v for k, v in values.items() if k != "transformers_version"}
    rope = values.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            values["rope_scaling"] = scaling
    return values


def write_config(folder, config) -> None:
    """The one writer of a model folder's config.json (a transformers config, or its dict), portable to
    transformers 4.x. A config object is written as transformers writes it (only what differs from the defaults)."""
    path = Path(folder) / "config.json"
    if not isinstance(config, dict):
        config.save_pretrained(folder)
        config = json.loads(path.read_text())
    path.write_text(json.dumps(portable_config(config), indent=2, sort_keys=True) + "\n")


def load_weights(model, state: dict, source) -> None:
    """load_state_dict, strict except for the LM head of a tied model (files do not store it)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise InputError(f"{source}: weights do not fit the model (missing {sorted(set(missing) - allowed)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def _as_dict(config) -> dict:
    return config if isinstance(config, dict) else config.to_dict()
