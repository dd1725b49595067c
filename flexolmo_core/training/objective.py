"""The training objective (METHOD.md 3): token cross-entropy + router z-loss + output-logit z-loss.
No load-balancing loss (FlexOlmo has none).

The cross-entropy and the logit z-loss share one logsumexp, and their gradient is one softmax written
straight into the logits' dtype (a fused autograd function): at vocab 8192 the loss head was the largest
non-matmul cost of a step. `reference_objective` is the plain formula; a test checks they agree."""
from __future__ import annotations

import torch


class _CrossEntropyAndZ(torch.autograd.Function):
    """(mean cross-entropy, mean logsumexp^2) of logits [N, V]; the backward is a single softmax pass."""

    @staticmethod
    def forward(ctx, logits, targets):
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        ce = lse - x.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return ce.mean(), lse.pow(2).mean()

    @staticmethod
    def backward(ctx, g_ce, g_z):
        logits, targets, lse = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.exp(logits.float() - lse[:, None])
        grad.mul_((g_ce / n + g_z * 2.0 / n * lse)[:, None])
        grad[torch.arange(n, device=grad.device), targets] -= g_ce / n
        return grad.to(logits.dtype), None


def objective(logits: torch.Tensor, targets: torch.Tensor, router_z: torch.Tensor, router_z_coef: float,
              logit_z_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cross-entropy). `router_z` = sum over layers of mean logsumexp(router logits)^2."""
    ce, z = _CrossEntropyAndZ.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + router_z_coef * router_z + logit_z_coef * z, ce.detach()


def reference_objective(logits, targets, router_z, router_z_coef: float, logit_z_coef: float):
    flat = logits.float().reshape(-1, logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1))
    z = torch.logsumexp(flat, dim=-1).pow(2).mean()
    return ce + router_z_coef * router_z + logit_z_coef * z, ce.detach()
