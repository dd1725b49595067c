"""The reference owner model (tests only; training runs `flexolmo_core.training.model.FastOlmo`, and tests
check the two agree): the anchor upcycled into a 2-expert FlexOlmo MoE, and the trainable contract.

Expert 0 = the anchor's FFN (frozen buffer), expert 1 = a trainable copy. Router row 0 = the public
embedding (frozen), row 1 = the owner's domain embedding (trainable). Optional non-positive logit bias.
Everything else (embeddings, attention, norms, LM head) is frozen."""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoExperts

from flexolmo_core.anchor.families import moe_config
from flexolmo_core.errors import InputError
from flexolmo_core.inference.moe import FlexRouter, hf_state_dict, install_routers, rows_per_layer


class SplitExperts(FlexOlmoExperts):
    """FlexOlmo experts whose first `n_frozen` experts are buffers and the rest trainable parameters."""

    def __init__(self, config, frozen_gate_up, frozen_down, trainable_gate_up, trainable_down):
        super().__init__(config)
        del self.gate_up_proj, self.down_proj  # replaced by the split storage below
        self.register_buffer("frozen_gate_up_proj", frozen_gate_up.detach().clone())
        self.register_buffer("frozen_down_proj", frozen_down.detach().clone())
        self.trainable_gate_up_proj = nn.Parameter(trainable_gate_up.detach().clone())
        self.trainable_down_proj = nn.Parameter(trainable_down.detach().clone())

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return torch.cat([self.frozen_gate_up_proj, self.trainable_gate_up_proj], dim=0)

    @property
    def down_proj(self) -> torch.Tensor:
        return torch.cat([self.frozen_down_proj, self.trainable_down_proj], dim=0)


def anchor_ffn(anchor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor FFN of one layer as FlexOlmo's fused (gate_up [2I, d], down [d, I])."""
    mlp = anchor.model.layers[layer].mlp
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach()
    return gate_up, mlp.down_proj.weight.detach()


def upcycle(anchor, public_rows: torch.Tensor | None = None, domain_rows: torch.Tensor | None = None,
            use_bias: bool = False):
    """Build the owner's 2-expert FlexOlmoForCausalLM from an Olmo2ForCausalLM anchor (top-2 of 2).
    Owner training itself runs on the training model (training.stages.owner_fast_model, both families); this
    HF module form, with its frozen/trainable split, is kept for OLMo-2 anchors."""
    from transformers import FlexOlmoForCausalLM

    cfg = anchor.config
    if cfg.model_type != "olmo2":
        raise InputError(f"upcycle builds FlexOlmo owner models from OLMo-2 anchors, not {cfg.model_type!r}; the "
                         "owner model of any anchor is the merge of the anchor and its package (flexolmo merge)")
    model = FlexOlmoForCausalLM(moe_config(cfg, num_experts=2, top_k=2))
    shared = {k: v for k, v in anchor.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected:
        raise RuntimeError(f"anchor has tensors the owner model does not: {unexpected}")
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    install_routers(model, rows_per_layer(public_rows, L, d), rows_per_layer(domain_rows, L, d), use_bias)
    for i, layer in enumerate(model.model.layers):
        gate_up, down = anchor_ffn(anchor, i)
        layer.mlp.experts = SplitExperts(model.config, gate_up[None], down[None], gate_up[None], down[None])
    freeze_to_contract(model)
    return model


def freeze_to_contract(model) -> None:
    """requires_grad only on what an owner may train: expert 1's FFN, router row 1, the bias."""
    allowed = set(trainable_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in allowed)


def trainable_parameter_names(model) -> list[str]:
    """The trainable contract: the only parameters an owner's training may change."""
    names = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp"
        if not isinstance(layer.mlp.gate, FlexRouter) or not isinstance(layer.mlp.experts, SplitExperts):
            raise TypeError("not an owner model (use reference.owner.upcycle)")
        names += [f"{prefix}.experts.trainable_gate_up_proj", f"{prefix}.experts.trainable_down_proj",
                  f"{prefix}.gate.trainable_rows"]
        if layer.mlp.gate.logit_bias is not None:
            names.append(f"{prefix}.gate.logit_bias")
    return names


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[n] for n in trainable_parameter_names(model)]


def project_after_step(model) -> None:
    for layer in model.model.layers:
        layer.mlp.gate.project_bias()


def frozen_differences(model, anchor, public_rows: torch.Tensor | None = None) -> list[str]:
    """Names of frozen tensors that are not bit-identical to the anchor's (empty list = contract kept)."""
    state = hf_state_dict(model)
    anchor_state = anchor.state_dict()
    bad = []
    for name, tensor in anchor_state.items():
        if ".mlp." in name:
            continue
        if not torch.equal(state[name], tensor):
            bad.append(name)
    L, d = anchor.config.num_hidden_layers, anchor.config.hidden_size
    expected_public = rows_per_layer(public_rows, L, d) if public_rows is not None else None
    for i, layer in enumerate(model.model.layers):
        gate_up, down = anchor_ffn(anchor, i)
        if not torch.equal(layer.mlp.experts.frozen_gate_up_proj[0], gate_up):
            bad.append(f"model.layers.{i}.mlp.experts[0].gate_up_proj")
        if not torch.equal(layer.mlp.experts.frozen_down_proj[0], down):
            bad.append(f"model.layers.{i}.mlp.experts[0].down_proj")
        if expected_public is not None and not torch.equal(layer.mlp.gate.frozen_rows, expected_public[i]):
            bad.append(f"model.layers.{i}.mlp.gate.weight[0]")
    return bad
