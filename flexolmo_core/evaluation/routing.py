"""Routing share: for each domain's held-out text, the fraction of (token, layer, top-k slot) assignments
that went to each expert of a FlexOlmo model (read from the routers with forward hooks)."""
from __future__ import annotations

import torch


@torch.no_grad()
def routing_share(model, tokenizer, texts_by_domain: dict[str, list[str]], max_tokens: int = 256) -> dict[str, list[float]]:
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    if not routers:
        return {}
    n_experts = routers[0].weight.shape[0]
    counts = torch.zeros(n_experts)

    def count(module, args, output):  # router output: (logits, top-k weights, top-k indices); must return None
        counts.add_(torch.bincount(output[2].reshape(-1), minlength=n_experts)[:n_experts].float())

    hooks = [r.register_forward_hook(count) for r in routers]
    out = {}
    try:
        for domain, texts in texts_by_domain.items():
            counts.zero_()
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
                if ids.shape[1]:
                    model(ids)
            total = counts.sum().item()
            out[domain] = [round(c / total, 4) if total else 0.0 for c in counts.tolist()]
    finally:
        for h in hooks:
            h.remove()
    return out
