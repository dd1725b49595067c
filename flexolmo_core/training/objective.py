"""The training objective (METHOD.md 3): token cross-entropy + router z-loss + output-logit z-loss.
No load-balancing loss (FlexOlmo has none)."""
from __future__ import annotations

import torch


def objective(logits: torch.Tensor, targets: torch.Tensor, router_z: torch.Tensor, router_z_coef: float,
              logit_z_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cross-entropy). `router_z` = sum over layers of mean logsumexp(router logits)^2.

    One logsumexp serves both the cross-entropy and the logit z-loss (the logits are the largest tensor)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    lse = torch.logsumexp(flat, dim=-1)
    target_logit = flat.gather(1, targets.reshape(-1, 1)).squeeze(1)
    ce = (lse - target_logit).mean()
    total = ce + router_z_coef * router_z + logit_z_coef * lse.pow(2).mean()
    return total, ce.detach()
