"""Routing share: for each domain's held-out text, the mean router probability of each expert of a FlexOlmo
model (softmax over all experts, averaged over tokens and layers; read from the routers with forward hooks).
The probability, not the top-k selection count, because with k = E (owners' 2-expert models, -RT) every
expert is always selected and counts say nothing."""
from __future__ import annotations

import torch


@torch.no_grad()
def routing_share(model, tokenizer, texts_by_domain: dict[str, list[str]], max_tokens: int = 128) -> dict[str, list[float]]:
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    if not routers:
        return {}
    n_experts = routers[0].weight.shape[0]
    total = torch.zeros(n_experts, dtype=torch.float64)
    seen = [0]

    def record(module, args, output):  # router output: (logits, top-k weights, top-k indices); returns None
        probs = torch.softmax(output[0].float(), dim=-1).reshape(-1, n_experts)
        total.add_(probs.sum(0).double())
        seen[0] += probs.shape[0]

    hooks = [r.register_forward_hook(record) for r in routers]
    out = {}
    try:
        for domain, texts in texts_by_domain.items():
            total.zero_()
            seen[0] = 0
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
                if ids.shape[1]:
                    model(ids)
            out[domain] = [round(v / seen[0], 4) if seen[0] else 0.0 for v in total.tolist()]
    finally:
        for h in hooks:
            h.remove()
    return out
