"""The training objective (METHOD.md 3): token cross-entropy + router z-loss + output-logit z-loss.
No load-balancing loss (FlexOlmo has none).

The cross-entropy and the logit z-loss share one logsumexp, and their gradient is one softmax written
straight into the logits' dtype (a fused autograd function): at vocab 8192 the loss head was the largest
non-matmul cost of a step. `reference_objective` is the plain formula; a test checks they agree."""
from __future__ import annotations

import torch

ROWS_PER_CHUNK = 64  # 64 x vocab 8192 fp32 = 2 MiB: each chunk's upcast, exp and cast stay in cache


class _CrossEntropyAndZ(torch.autograd.Function):
    """(mean cross-entropy, mean logsumexp^2) of logits [N, V]; the backward is a single softmax pass.

    Both passes walk the rows in chunks: whole-tensor fp32 temporaries of [N, V] made the loss head
    memory-bound (at tiny it took a third of an expert step; chunked, about a tenth)."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        ce = lse - logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return ce.mean(), lse.pow(2).mean()

    @staticmethod
    def backward(ctx, g_ce, g_z):
        logits, targets, lse = ctx.saved_tensors
        n = logits.shape[0]
        scale = g_ce / n + g_z * 2.0 / n * lse  # d/dlogit of (ce + z) = softmax * scale - onehot * g_ce / n
        grad = torch.empty_like(logits)
        for start in range(0, n, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            g = logits[rows].float().sub_(lse[rows, None]).exp_().mul_(scale[rows, None])
            g[torch.arange(g.shape[0], device=g.device), targets[rows]] -= g_ce / n
            grad[rows] = g
        return grad, None


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
