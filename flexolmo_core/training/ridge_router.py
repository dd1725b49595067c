"""A closed-form router (issue 29, item 3): each layer's router rows by ridge regression from the router's
actual input to the domain label of the proxy window a token came from. No gradient steps.

Not in the paper (its router is the domain embeddings, optionally tuned by gradient: METHOD.md 4, 6); the
idea is DUME's (arXiv 2603.29765) and mergekit's `hidden` gate mode. It reads the same proxy sets as router
tuning: a public sample and, per owner, the small set that owner chose to share.

Layers are fitted in order on the merged model itself: layer l's rows are fitted on the inputs layer l sees
once layers 0..l-1 route with their fitted rows (a router fitted on the anchor's hidden states would see
inputs the merged model never produces past the first layer).

Targets per token: 1 for the expert of the window's domain, and `public_target` for the public expert on an
owner's window (every owner trained its expert as a soft mixture with the public FFN, METHOD.md 3, so with
public_target 1 the merged top-2 on an owner's tokens is that same pair; 0 is the plain one-hot). Each
expert's row is a separate least-squares problem (its own target column), so dropping an expert and its row
leaves every other row as fitted: opt-out by masking stays the merge without it.
"""
from __future__ import annotations

import torch

from flexolmo_core.training.model import FastOlmo, rope_tables


def ridge_rows(gram: torch.Tensor, cross: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_W |X W - Y|^2 + lam |W|^2 from X^T X (`gram`, d x d) and X^T Y (`cross`, d x E), with lam =
    alpha x the mean diagonal of X^T X (scale-free: the same alpha for any width or token count).
    Returns the rows [E, d]."""
    d = gram.shape[0]
    lam = alpha * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), cross).T


def token_targets(labels: torch.Tensor, num_experts: int, public_target: float) -> torch.Tensor:
    """[N] window labels (0 = public, e = expert e) -> [N, E] regression targets."""
    y = torch.nn.functional.one_hot(labels, num_experts).double()
    y[labels != 0, 0] = public_target
    return y


@torch.no_grad()
def fit_ridge_router(model: FastOlmo, ids: torch.Tensor, labels: torch.Tensor, alpha: float = 1e-2,
                     public_target: float = 1.0, scale: float = 1.0, chunk: int = 16,
                     progress=None) -> tuple[list[torch.Tensor], list[float]]:
    """Fit every layer's router in place; returns the rows per layer ([E, d] each, fp32) and, per layer, the
    share of the proxy tokens whose top-1 expert is their window's own (on the data fitted: a sanity figure; with
    public_target 1 an owner's tokens score public and owner alike, so about half of them top-1 the public expert).

    ids [N, T]: proxy windows; labels [N]: the expert each window's domain belongs to (0 = public).
    `scale` multiplies the rows (a router temperature: the fitted scores are near 0 and 1, so at scale 1 the
    softmax is nearly flat). `chunk` windows go through a layer at a time; the residual stream of every window
    is held in fp32 between layers (N x T x d)."""
    E, dt = model.moe.num_experts, model.compute_dtype
    cos, sin = (t.to(dt) for t in rope_tables(model.cfg, ids.shape[1]))
    targets = token_targets(labels, E, public_target)  # per window; every token of a window shares it
    x = torch.nn.functional.embedding(ids, model.w.get("embed", torch.float32))
    fitted, own_top1 = [], []
    for i, layer in enumerate(model.layers):
        h = torch.empty_like(x)
        gram = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
        cross = torch.zeros(x.shape[-1], E, dtype=torch.float64)
        for s in range(0, len(ids), chunk):
            h[s:s + chunk] = layer.after_attention(x[s:s + chunk], cos, sin, dt)
            u = layer.ffn_input(h[s:s + chunk]).double()
            gram += torch.einsum("ntd,nte->de", u, u)
            cross += torch.einsum("ntd,ne->de", u, targets[s:s + chunk])
        rows = (scale * ridge_rows(gram, cross, alpha)).float()
        for e in range(E):
            getattr(layer.w, f"router_{e}").copy_(rows[e])
        layer.w.clear_cache()
        hits = 0
        for s in range(0, len(ids), chunk):
            hs = h[s:s + chunk]
            u = layer.ffn_input(hs)
            top1 = layer.router_logits(u.reshape(-1, u.shape[-1])).argmax(-1).view(u.shape[:2])
            hits += int((top1 == labels[s:s + chunk, None]).sum())
            out = layer.ffn(u, dt, [])
            x[s:s + chunk] = hs + (out.float() if model.cfg.pre_norm else layer.norm(out, "ffn_norm").float())
        fitted.append(rows)
        own_top1.append(round(hits / ids.numel(), 4))
        if progress:
            progress(i + 1, len(model.layers))
    return fitted, own_top1

