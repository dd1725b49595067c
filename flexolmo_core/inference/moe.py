"""The router module swap on transformers' FlexOlmo MoE block.

`FlexRouter` replaces `mlp.gate`: router rows split into frozen and trainable parts, an optional
non-positive logit bias per trainable expert, a logit offset for opt-out masks (-inf), a changeable
top-k, and routing-share recording for attribution.
It produces exactly what transformers' router produces for the same rows. (The owner model that splits the
experts into frozen and trainable storage is the test reference, `tests/reference/owner.py`; training uses
`training/model.py`'s FastOlmo.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexolmo_core.errors import InputError


class FlexRouter(nn.Module):
    def __init__(self, frozen_rows: torch.Tensor, trainable_rows: torch.Tensor, top_k: int,
                 norm_topk_prob: bool = False, use_bias: bool = False):
        super().__init__()
        self.register_buffer("frozen_rows", frozen_rows.detach().clone())
        self.trainable_rows = nn.Parameter(trainable_rows.detach().clone())
        n_frozen, n_train = frozen_rows.shape[0], trainable_rows.shape[0]
        self.num_experts = n_frozen + n_train
        self.hidden_dim = frozen_rows.shape[1] if n_frozen else trainable_rows.shape[1]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        # Paper's negative bias: one scalar per trainable expert, initialised to 0 (the reference leaves it
        # uninitialised), clamped <= 0 in the forward pass and projected after every optimiser step.
        self.logit_bias = nn.Parameter(torch.zeros(n_train)) if use_bias else None
        self.register_buffer("logit_offset", torch.zeros(self.num_experts), persistent=False)
        # Per-sequence masks for a batch that mixes expert choices (serving): [batch, experts] of 0 / -inf,
        # added to every token of that sequence. None = the same `logit_offset` for all.
        self.row_offset: torch.Tensor | None = None
        self.record: list[torch.Tensor] | None = None  # per-token routing weights, when attribution is on
        # Prefix pooling (ours, not the paper's; issue 14's lever): each token's logits become
        # (1 - a) * own + a * mean of the sequence's logits so far, so the choice also sees the sequence's
        # domain. Causal, no training; pooled before the opt-out offsets, so masking an expert still gives
        # exactly the model without it. A hook on the model (inference.install_prefix_pool) sets, per forward,
        # which tokens are real (`pool_valid`, [batch, new tokens]: padding is left out of the mean) and whether
        # it starts new sequences; the running sum is a state carried from step to step, so decoding with the
        # KV cache gives what a forward over the whole sequence gives.
        self.prefix_pool = 0.0
        self.pool_valid: torch.Tensor | None = None
        self.pool_fresh = True
        self.pool_sum: torch.Tensor | None = None  # [batch, experts]: sum of real tokens' logits so far
        self.pool_count: torch.Tensor | None = None  # [batch, 1]: how many

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen_rows, self.trainable_rows], dim=0)

    def bias_vector(self) -> torch.Tensor:
        n_frozen = self.frozen_rows.shape[0]
        full = torch.zeros(self.num_experts, dtype=self.trainable_rows.dtype, device=self.trainable_rows.device)
        if self.logit_bias is not None:
            full = torch.cat([full[:n_frozen], self.logit_bias.clamp(max=0.0)])
        return full

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight) + self.bias_vector()
        if self.prefix_pool:
            logits = self.pool(logits)
        logits = logits + self.logit_offset
        if self.row_offset is not None:  # the MoE block flattens [batch, seq] batch-major
            logits = logits + self.row_offset.repeat_interleave(logits.shape[0] // self.row_offset.shape[0], dim=0)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if self.record is not None:
            self.record.append(torch.zeros_like(probs).scatter(1, top_index, top_value).detach())
        return logits, top_value.to(logits.dtype), top_index

    def pool(self, logits: torch.Tensor) -> torch.Tensor:
        """[B*T, E] logits (batch-major) -> pooled with each sequence's running mean, continuing the state of
        the previous forward unless this one starts new sequences."""
        if self.pool_valid is None:
            raise RuntimeError("prefix pooling needs the batch shape: load the model with "
                               "load_flexolmo(prefix_pool=...)")
        valid = self.pool_valid.to(logits.dtype)[..., None]  # [B, T, 1]
        per_seq = logits.view(valid.shape[0], valid.shape[1], logits.shape[-1])
        total = (per_seq * valid).cumsum(dim=1)
        count = valid.cumsum(dim=1)
        if not self.pool_fresh and self.pool_sum is not None:
            total, count = total + self.pool_sum[:, None], count + self.pool_count[:, None]
        self.pool_sum, self.pool_count = total[:, -1].detach(), count[:, -1].detach()
        mean = total / count.clamp_min(1)
        return ((1 - self.prefix_pool) * per_seq + self.prefix_pool * mean).reshape(logits.shape)

    @torch.no_grad()
    def project_bias(self) -> None:
        """Keep the learned bias non-positive (call after each optimiser step)."""
        if self.logit_bias is not None:
            self.logit_bias.clamp_(max=0.0)


def pool_prefix(logits: torch.Tensor, seq_len: int | None, weight: float) -> torch.Tensor:
    """The reference formula of FlexRouter.pool for whole unpadded sequences: [B*T, E] router logits
    (batch-major) -> (1 - weight) * logits + weight * causal running mean over each sequence's positions."""
    if seq_len is None or logits.shape[0] % seq_len:
        raise RuntimeError("prefix pooling needs the sequence length: load the model with load_flexolmo(prefix_pool=...)")
    per_seq = logits.view(-1, seq_len, logits.shape[-1])
    steps = torch.arange(1, seq_len + 1, device=logits.device, dtype=logits.dtype)[None, :, None]
    mean = per_seq.cumsum(dim=1) / steps
    return ((1 - weight) * per_seq + weight * mean).reshape(logits.shape)


def routers(model) -> list[FlexRouter]:
    found = [layer.mlp.gate for layer in model.model.layers]
    if not all(isinstance(r, FlexRouter) for r in found):
        raise TypeError("model routers are not FlexRouter modules; load it with flexolmo_core.inference.model")
    return found


def rows_per_layer(rows: torch.Tensor | None, n_layers: int, d_model: int) -> list[torch.Tensor]:
    """One router vector per layer from a single vector [d], per-layer vectors [L, d], or None (zeros)."""
    if rows is None:
        rows = torch.zeros(d_model)
    rows = torch.as_tensor(rows, dtype=torch.float32)
    if rows.shape == (d_model,):
        return [rows.clone()[None] for _ in range(n_layers)]
    if rows.shape == (n_layers, d_model):
        return [rows[i].clone()[None] for i in range(n_layers)]
    raise InputError(f"router embedding must have shape [{d_model}] or [{n_layers}, {d_model}], got {tuple(rows.shape)}")


def install_routers(model, frozen_rows_per_layer: list[torch.Tensor], trainable_rows_per_layer: list[torch.Tensor],
                    use_bias: bool = False) -> None:
    cfg = model.config
    for layer, frozen, trainable in zip(model.model.layers, frozen_rows_per_layer, trainable_rows_per_layer):
        layer.mlp.gate = FlexRouter(frozen, trainable, cfg.num_experts_per_tok, cfg.norm_topk_prob, use_bias)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under plain transformers FlexOlmo names (router biases are not part of it)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if any(part in name for part in ("frozen_", "trainable_", "logit_bias", "logit_offset")):
            continue
        state[name] = tensor
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp"
        state[f"{prefix}.gate.weight"] = layer.mlp.gate.weight.detach()
        state[f"{prefix}.experts.gate_up_proj"] = layer.mlp.experts.gate_up_proj.detach()
        state[f"{prefix}.experts.down_proj"] = layer.mlp.experts.down_proj.detach()
    return state
