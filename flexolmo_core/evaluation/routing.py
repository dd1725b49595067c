"""Routing diagnostics: for each domain's held-out text, per expert of a FlexOlmo model, the mean router
probability (softmax over all experts, averaged over tokens and layers; read from the routers with forward
hooks) and the share of token-layers where it is the top-1 expert, with the mean entropy of the routing
distribution. The probability, not only the top-k selection count, because with k = E (owners' 2-expert
models, -RT) every expert is always selected and counts say nothing. On a domain whose expert is in the model,
p(own) and own top-1 say whether the router sends that domain's text to its owner's expert (chance: 1/E)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def routing_share(model, tokenizer, texts_by_domain: dict[str, list[str]], max_tokens: int = 128) -> dict[str, dict]:
    """domain -> {"share": mean probability per expert, "top1": top-1 share per expert, "entropy_bits": mean
    entropy of the routing distribution}, over every token of the texts and every layer."""
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    if not routers:
        return {}
    n_experts = routers[0].weight.shape[0]
    total, top1 = torch.zeros(n_experts, dtype=torch.float64), torch.zeros(n_experts, dtype=torch.float64)
    acc = {"seen": 0, "entropy": 0.0}

    def record(module, args, output):  # router output: (logits, top-k weights, top-k indices); returns None
        probs = torch.softmax(output[0].float(), dim=-1).reshape(-1, n_experts)
        total.add_(probs.sum(0).double())
        top1.add_(torch.bincount(probs.argmax(-1), minlength=n_experts).double())
        acc["entropy"] += float(-(probs * probs.clamp_min(1e-12).log()).sum()) / math.log(2)
        acc["seen"] += probs.shape[0]

    hooks = [r.register_forward_hook(record) for r in routers]
    out = {}
    try:
        for domain, texts in texts_by_domain.items():
            total.zero_()
            top1.zero_()
            acc.update(seen=0, entropy=0.0)
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
                if ids.shape[1]:
                    model(ids.to(model.device))
            seen = acc["seen"] or 1
            out[domain] = {"share": [round(v / seen, 4) for v in total.tolist()],
                           "top1": [round(v / seen, 4) for v in top1.tolist()],
                           "entropy_bits": round(acc["entropy"] / seen, 4)}
    finally:
        for h in hooks:
            h.remove()
    return out
